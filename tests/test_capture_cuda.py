"""The capture plugin and CUDA graphs (issue 9, "GPU"), without a GPU.

The host-sink op `capture_resid` runs its Python kernel only while a CUDA graph is
recorded, never on replay (bench/RESULTS.md, "GPU rerun at session 9"). So on a CUDA model
with CUDA graphs on, the plugin must not install the host-sink capture: it refuses, names
the fix, and says so in its stats file, which the API-server gate reads. The model runner,
model and vLLM config here are stand-ins: `_install` reads only their attributes (a
parameter's `device` says "cuda" without a GPU being present).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from monitor.capture import op
from monitor.capture.config import CaptureConfig
from monitor.capture.gate import _worker_stats
from monitor.capture.plugin import _install, cuda_graphs, graph_refusal


class LlamaDecoderLayer(nn.Module):
    """Named as vLLM's, so `check_architecture` accepts the stand-in model."""

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden, hidden if residual is None else residual


class LlamaForCausalLM(nn.Module):
    """Stand-in vLLM model whose parameters claim `device` (no memory on it)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.model = SimpleNamespace(layers=nn.ModuleList(LlamaDecoderLayer() for _ in range(3)))
        self._device = torch.device(device)

    def parameters(self, recurse: bool = True):
        return iter([SimpleNamespace(device=self._device)])


def _vllm_config(enforce_eager: bool, cudagraph_mode: object) -> SimpleNamespace:
    return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=enforce_eager),
                           compilation_config=SimpleNamespace(cudagraph_mode=cudagraph_mode))


def _modes() -> list[object]:
    """vLLM's own `CUDAGraphMode` values where vLLM is installed, else their names."""
    try:
        from vllm.config.compilation import CUDAGraphMode
    except ImportError:
        return [SimpleNamespace(name=n) for n in ("NONE", "PIECEWISE", "FULL_AND_PIECEWISE")]
    return [CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE]


def test_cuda_graphs_reads_enforce_eager_and_cudagraph_mode() -> None:
    none, piecewise, full = _modes()
    assert cuda_graphs(_vllm_config(False, none)) is None
    assert cuda_graphs(_vllm_config(True, full)) is None  # enforce_eager wins
    assert cuda_graphs(_vllm_config(False, piecewise)) == "cudagraph_mode PIECEWISE"
    assert cuda_graphs(_vllm_config(False, full)) == "cudagraph_mode FULL_AND_PIECEWISE"
    # a config that does not say: vLLM's default on CUDA (graphs on)
    assert "default" in str(cuda_graphs(_vllm_config(False, None)))
    assert cuda_graphs(SimpleNamespace(model_config=SimpleNamespace())) is not None


@pytest.mark.parametrize("device,eager,refused", [
    ("cuda", False, True), ("cuda", True, False), ("cpu", False, False), ("cpu", True, False)])
def test_graph_refusal_only_on_cuda_with_graphs(device: str, eager: bool, refused: bool) -> None:
    full = _modes()[2]
    why = graph_refusal(LlamaForCausalLM(device), _vllm_config(eager, full))
    assert (why is not None) == refused
    if why is not None:
        assert "--enforce-eager" in why and "FULL_AND_PIECEWISE" in why and "replay" in why


def test_install_refuses_on_cuda_graphs_logs_once_and_writes_the_stats_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """CUDA model + CUDA graphs: nothing wrapped, no sink, one ERROR naming the fix, and the
    stats file says `installed: false` with the reason; the gate reads it as unmonitored."""
    stats = tmp_path / "stats.json"
    cfg = CaptureConfig(addr="127.0.0.1:1", model="m", stats_file=str(stats))
    model = LlamaForCausalLM("cuda")
    forwards = [layer.forward for layer in model.model.layers]
    runner = SimpleNamespace(vllm_config=_vllm_config(False, _modes()[1]),
                             speculative_config=None, get_model=lambda: model)
    op.set_sink(None)
    with caplog.at_level(logging.ERROR, logger="monitor.capture"):
        assert _install(runner, cfg) is None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "NOT installed" in errors[0] and "--enforce-eager" in errors[0]
    assert [layer.forward for layer in model.model.layers] == forwards  # nothing wrapped
    assert op._sink is None and getattr(runner, "_safety_monitor_session", None) is None
    st = json.loads(stats.read_text())
    assert st["installed"] is False and "CUDA graphs are on" in st["not_installed"]
    queued, refused = _worker_stats(str(stats))
    assert queued is None and len(refused) == 1 and "--enforce-eager" in refused[0]


def test_speculative_decoding_refusal_is_in_the_stats_file_too(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    cfg = CaptureConfig(addr="127.0.0.1:1", model="m", stats_file=str(stats))
    runner = SimpleNamespace(vllm_config=_vllm_config(True, None),
                             speculative_config=object())
    assert _install(runner, cfg) is None
    _, refused = _worker_stats(str(stats))
    assert len(refused) == 1 and "speculative decoding" in refused[0]
    # a later, installed worker rewrites the file (the janitor): no refusal read then
    stats.write_text(json.dumps({"installed": True, "queued": 2}))
    assert _worker_stats(str(stats)) == (2, [])
