"""Standard (ReLU) SAE: ``z = relu(h)``; a latent subset is exact (column-separable).

SAELens ``architecture: "standard"`` and ``"transcoder"`` / ``"skip_transcoder"`` (the
skip path only changes the decoder); bundle component ``sae_latents`` / ``relu``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..kinds import Epilogue, register_kind
from .registry import Architecture, SAELatentsKind, register_architecture, relu_epilogue

if TYPE_CHECKING:  # torch only when encoding / folding (see registry.py)
    import torch

    from .model import SAE


class ReluKind(SAELatentsKind):
    activation = "relu"

    def epilogue(self, tensors: Mapping[str, torch.Tensor]) -> Epilogue:
        return relu_epilogue(int(tensors["W_enc"].shape[1]))


class Standard(Architecture):
    name = "standard"
    params = ("b_enc",)

    def encode_pre(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        return h.relu()

    def select(self, sae: SAE, ids: Sequence[int]) -> tuple[str, dict[str, torch.Tensor]]:
        return "relu", select_tensors(sae, ids, ("W_enc", "b_enc"))


def select_tensors(sae: SAE, ids: Sequence[int],
                   names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The gathered per-latent tensors, plus ``b_dec`` when the encoder subtracts it."""
    from .model import gather

    out = gather(sae.params, ids, names)
    if sae.preprocessing.apply_b_dec_to_input:
        out["b_dec"] = sae.params["b_dec"].contiguous()
    return out


register_kind(ReluKind())
register_architecture(Standard())
