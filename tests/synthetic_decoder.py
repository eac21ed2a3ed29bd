"""Stand-ins for vLLM's model side, for the capture tests and `bench/bench_capture_op.py`
(no vLLM needed): a small decoder with vLLM's decoder-layer calling convention, and a
model runner carrying the per-step fields `StepTracker` reads (`fake_runner`).

Each layer has the signature of vLLM's Llama decoder layer,
`forward(positions, hidden_states, residual) -> (hidden, residual)`, with the fused
add-RMSNorm semantics (`residual <- hidden + residual`, normalized copy to the block) and a
SwiGLU MLP in place of attention + MLP (attention needs vLLM's metadata; the op only sees
the layer boundary, which is the same). Shapes: hidden/residual `[num_tokens, d_model]`,
positions int64 `[num_tokens]`. Defaults are SmolLM2-135M's sizes (576, 1536, 30 layers).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn


def fake_runner(plens: list[int], computed: list[int], rows: list[int],
                prompts: list[list[int]] | None = None) -> SimpleNamespace:
    """A V1 model runner's step state: request `r{i}` has prompt length `plens[i]`,
    `computed[i]` tokens already computed and `rows[i]` rows in this step's forward.
    `prompts[i]`, when given, is request i's prompt token ids (role segmentation reads
    them); `len(prompts[i])` must equal `plens[i]`."""
    if prompts is not None and [len(p) for p in prompts] != list(plens):
        raise ValueError(f"fake_runner: prompt lengths {[len(p) for p in prompts]} "
                         f"!= plens {list(plens)}")
    reqs = {f"r{i}": SimpleNamespace(num_prompt_tokens=p,
                                     prompt_token_ids=None if prompts is None else prompts[i],
                                     sampling_params=None, output_token_ids=[])
            for i, p in enumerate(plens)}
    qsl = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    ib = SimpleNamespace(num_reqs=len(plens), req_ids=list(reqs),
                         num_computed_tokens_cpu=np.array(computed, np.int64))
    return SimpleNamespace(input_batch=ib, requests=reqs,
                           query_start_loc=SimpleNamespace(np=qsl))


class SyntheticLayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states if residual is None else hidden_states + residual
        g, u = self.gate_up(self.norm(residual)).chunk(2, dim=-1)
        return self.down(nn.functional.silu(g) * u), residual


class _Body(nn.Module):
    """Holds the decoder layers as ``.layers`` (vLLM's ``model.model.layers``)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers


class SyntheticDecoder(nn.Module):
    """`forward(positions, x) -> [num_tokens, d_model]`; layers at `.model.layers`
    (where `monitor.capture.op.find_decoder_layers` looks)."""

    def __init__(self, d_model: int = 576, d_ff: int = 1536, n_layers: int = 30,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.model = _Body(nn.ModuleList(SyntheticLayer(d_model, d_ff)
                                         for _ in range(n_layers)))
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual)
        assert residual is not None
        return x + residual
