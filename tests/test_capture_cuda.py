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
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from monitor.capture import op
from monitor.capture.config import CaptureConfig
from monitor.capture.gate import _worker_stats
from monitor.capture.plugin import _install, cuda_graphs, graph_refusal, select_path


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


@pytest.mark.parametrize("setting,device,path", [
    ("auto", "cuda", "static"), ("auto", "cpu", "host"), ("static", "cpu", "static"),
    ("host", "cpu", "host"), ("host", "cuda", None)])
def test_select_path(setting: str, device: str, path: str | None) -> None:
    """`auto` is the static path on CUDA, the host path elsewhere; the host path on CUDA
    with graphs on is refused, naming the setting and both fixes."""
    got, why = select_path(setting, LlamaForCausalLM(device), _vllm_config(False, _modes()[2]))
    if path is None:
        assert why is not None and "SAFETY_MONITOR_CAPTURE_PATH=host" in why
        assert "--enforce-eager" in why and "static" in why
    else:
        assert (got, why) == (path, None)
    assert select_path(setting, LlamaForCausalLM(device), _vllm_config(True, None))[1] is None


def test_install_refuses_on_cuda_graphs_logs_once_and_writes_the_stats_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """CUDA model + CUDA graphs: nothing wrapped, no sink, one ERROR naming the fix, and the
    stats file says `installed: false` with the reason; the gate reads it as unmonitored."""
    stats = tmp_path / "stats.json"
    cfg = CaptureConfig(addr="127.0.0.1:1", model="m", stats_file=str(stats),
                        capture_path="host")
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


# ------------------------------------------------------------------ the static path (CPU)
# The static capture path (`SAFETY_MONITOR_CAPTURE_PATH=static`, `auto` on CUDA) run on CPU:
# the graph-safe op fills the static buffers, the `execute_model` wrapper gathers the kept
# rows after each step. It must send exactly what the host path sends for the same steps,
# over real loopback gRPC to the recording sink.

D, FF, L = 32, 64, 4
HOOKS = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.3.hook_resid_pre",
         "blocks.3.hook_resid_post")
PLENS = [5, 3, 4]  # prompt lengths of r0, r1, r2
#: (computed, rows) per request present in the step (None: not scheduled / finished),
#: whether the forward runs (False: `execute_model` returns without one, as vLLM's does
#: when no token is scheduled; the runner's step state is then stale or partial)
STEPS: list[tuple[list[tuple[int, int] | None], bool]] = [
    ([(0, 3), (0, 3), None], True),      # prefill: r0's first chunk, r1's whole prompt
    ([(3, 2), (3, 1), (0, 4)], True),    # mixed: r0's last chunk, r1 decodes, r2 prefills
    ([(5, 1), (4, 1), (4, 1)], False),   # no forward ran: nothing may be sent
    ([(5, 1), (4, 1), (4, 1)], True),    # decode of three
    ([(6, 1), None, (5, 1)], True),      # r1 finished: decode of two
]
MAX_ROWS = 12


def _step_state(runner: SimpleNamespace, step: int) -> tuple[torch.Tensor, int]:
    """Point the stand-in runner at step `step`; (positions of its rows, rows)."""
    from synthetic_decoder import fake_runner

    live = [(i, cr) for i, cr in enumerate(STEPS[step][0]) if cr is not None]
    r = fake_runner([PLENS[i] for i, _ in live], [c for _, (c, _) in live],
                    [n for _, (_, n) in live])
    ids = [f"r{i}" for i, _ in live]  # keep each request's own id across steps
    r.input_batch.req_ids = ids
    runner.input_batch, runner.query_start_loc = r.input_batch, r.query_start_loc
    runner.requests = {rid: runner.states.setdefault(rid, st)
                       for rid, st in zip(ids, r.requests.values(), strict=True)}
    pos = torch.cat([torch.arange(c, c + n) for _, (c, n) in live])
    return pos, int(pos.numel())


def _run(static: bool, compiled: bool, generated_only: bool, sender: str = "thread",
         replies: Callable[[Any], list[Any]] | None = None
         ) -> tuple[list[tuple], dict[str, int], list[tuple]]:
    """Frames (hook, spans, rows) the sink received for STEPS, the session's stats and the
    RequestFinished received (request, prompt / generated counts, reason).
    `generated_only`: the plan keeps generated rows only (the mixed step's kept rows are
    then gathered, not a prefix of the forward); `sender`: `SAFETY_MONITOR_SENDER`;
    `replies`: the sink's answers to each client message (`CaptureSink.replies`): the run
    then waits for one block order and a judged position of r0 (stats `judged_r0`)."""
    from capture_sink import CaptureSink
    from synthetic_decoder import SyntheticDecoder

    from monitor.capture.plugin import CaptureSession, plan_sites, wrap_execute_model
    from monitor.tools.launch import eventually
    from monitor.v1 import monitor_pb2

    torch._dynamo.reset()
    kinds = ((monitor_pb2.TOKEN_KIND_GENERATED,) if generated_only else
             (monitor_pb2.TOKEN_KIND_PROMPT, monitor_pb2.TOKEN_KIND_GENERATED))
    sink = CaptureSink(port=0, model="m", d_model=D, hook_names=HOOKS, kinds=kinds).start()
    sink.replies = replies
    m = SyntheticDecoder(D, FF, L, seed=3)
    runner = SimpleNamespace(states={})
    cfg = CaptureConfig(addr=sink.addr, model="m", ring_slots=len(STEPS), queue_size=64,
                        stats_period_s=0.1, capture_path="static" if static else "host",
                        sender=sender)
    s = CaptureSession(runner, cfg, model_name="m", d_model=D, n_layers=L, max_rows=MAX_ROWS,
                       static=static)
    g = torch.Generator().manual_seed(7)
    try:
        plan = s.transport.fetch_plan(10.0)
        assert plan is not None
        s.wrap_layers(m.model.layers, plan_sites(plan.points), device=torch.device("cpu"),
                      dtype=torch.float32)
        if not static:  # static: the sender validates it, the first step installs it
            s.set_plan(plan)
        s.start()
        assert eventually(lambda: s.transport.connected, 20.0)
        assert (s._state is None) == static and (s._pending_plan is not None) == static
        fwd = torch.compile(m, dynamic=False) if compiled else m
        step_input: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]

        def execute_model() -> None:  # the runner's: one forward of this step's rows
            got = step_input[0]
            if got is not None:
                with torch.no_grad():
                    fwd(*got)

        runner.execute_model = execute_model
        if static:
            wrap_execute_model(runner, s)
        else:
            op.set_sink(s)
        for i, (_, runs) in enumerate(STEPS):
            pos, n = _step_state(runner, i)
            # padded forwards: compiled to one shape (as CUDA graphs are), eager padded by 2
            n_tok = MAX_ROWS if compiled else n + 2
            pos_p = torch.cat([pos, torch.zeros(n_tok - n, dtype=torch.int64)])
            step_input[0] = (pos_p, torch.randn(n_tok, D, generator=g)) if runs else None
            runner.execute_model()
        want = 0  # rows kept over the steps whose forward ran
        for runs_, ok in STEPS:
            for k, cr in enumerate(runs_):
                if ok and cr is not None:
                    c, n = cr
                    want += n if not generated_only else max(0, c + n - max(c, PLENS[k]))
        assert eventually(lambda: sink.rows_received() >= want * len(HOOKS), 20.0)
        # a process sender's counters reach the worker with its next report (0.25 s)
        assert eventually(lambda: s.transport.stats()["sent_rows"] >= want * len(HOOKS), 20.0)
        assert eventually(lambda: s.transport.stats()["dropped_frames"] >= (
            len(HOOKS) if static else 0), 20.0)
        if replies is not None:
            assert eventually(lambda: s.blocks.stats()["blocks_ordered"] >= 1
                              and "r0" in s.blocks._judged
                              and s.stats()["verdicts"] >= 2, 20.0)
        s._flush_finished()  # r1 left the batch at the last step
        assert eventually(lambda: len(sink.log.finished) >= 1, 20.0)
        with sink.lock:
            frames = [(fr.layer, fr.kind, fr.spans, fr.x.copy()) for fr in sink.log.frames]
            fins = [(f.request_id, f.n_prompt_tokens, f.n_generated_tokens, f.reason)
                    for f in sink.log.finished]
        st = {k: v for k, v in s.stats().items() if isinstance(v, int)}
        st["judged_r0"] = s.blocks._judged.get("r0", -1)
        return frames, st, fins
    finally:
        op.set_sink(None)
        s._stop.set()
        s.transport.close()
        sink.stop()


@pytest.mark.parametrize("generated_only", [False, True], ids=["all_rows", "generated"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_static_path_sends_exactly_the_host_paths_rows(compiled: bool,
                                                       generated_only: bool) -> None:
    """Prefill (chunked), decode, mixed and padded forwards, a step whose forward did not
    run, and a finished request: the static path's frames equal the host path's (same hook
    points, spans and rows; float32 sums computed alike, so bit-equal eager), kept rows a
    prefix (narrow) or gathered (index_select); the no-forward step is dropped and counted
    on the static path (the host path never opens it)."""
    host, hs, _ = _run(False, compiled, generated_only)
    static, ss, _ = _run(True, compiled, generated_only)
    n_steps = 3 if generated_only else 4  # steps with kept rows whose forward ran
    assert len(host) == len(static) == n_steps * len(HOOKS)
    for h, s in zip(host, static, strict=True):
        assert h[:3] == s[:3]
        if compiled:  # two compiled graphs (with either op) may fuse differently
            torch.testing.assert_close(s[3], h[3], rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(s[3], h[3])
    assert (hs["dropped_frames"], ss["dropped_frames"]) == (0, len(HOOKS))
    assert ss["dropped_rows"] == 3 * len(HOOKS) and ss["hook_errors"] == 0
    assert hs["sent_frames"] == ss["sent_frames"] == n_steps * len(HOOKS)
    # the static path queues the no-forward step too; its sender drops it (above)
    assert (hs["steps_sent"], ss["steps_sent"]) == (n_steps, n_steps + 1)
    # the mixed step's spans: r1's one generated row is row 2 of its forward
    mixed = host[0 if generated_only else len(HOOKS)][2]
    assert mixed == ([("r1", 1, 3, 3)] if generated_only else
                     [("r0", 2, 3, 5), ("r1", 1, 3, 3), ("r2", 4, 0, 4)])


def test_static_check_drops_a_step_without_forward_or_with_foreign_positions() -> None:
    """The sender's check of a static-path slot: `meta` must have grown during the step
    (else the buffers hold an older forward's rows, even if their positions happen to
    match), and the kept rows' positions must be the spans'."""
    from monitor.capture.plugin import _static_check

    spans = [("r0", 2, 3, 5, 0), ("r1", 1, 7, 4, 4)]
    pos = torch.tensor([3, 4, 7, 0, 0])
    grew = torch.tensor([0, 1, 0, 1])
    assert _static_check(grew, pos, spans) is None
    assert _static_check(torch.zeros(4, dtype=torch.int64), pos, spans) == \
        "no forward ran in the step"
    assert "positions" in str(_static_check(grew, torch.tensor([3, 4, 8, 0, 0]), spans))
