"""JumpReLU SAE: ``z = relu(h) · [h > θ]`` per latent; a latent subset is exact.

SAELens ``"jumprelu"`` / ``"jumprelu_transcoder"`` / ``"jumprelu_skip_transcoder"``,
Gemma Scope ``params.npz``, Llama Scope (scalar θ), and BatchTopK-trained SAEs, whose
inference rule *is* a JumpReLU with one global threshold (stored per latent). Bundle
component ``sae_latents`` / ``jumprelu`` with a ``threshold [k]`` tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from ..kinds import Epilogue, register_kind
from .registry import Architecture, SAELatentsKind, register_architecture, relu_epilogue
from .standard import select_tensors

if TYPE_CHECKING:  # torch only when encoding / folding (see registry.py)
    import torch

    from .model import SAE


class JumpReluKind(SAELatentsKind):
    activation = "jumprelu"
    roles: ClassVar[Mapping[str, str]] = {**SAELatentsKind.roles, "threshold": "k"}
    required = frozenset({"W_enc", "b_enc", "threshold"})

    def epilogue(self, tensors: Mapping[str, torch.Tensor]) -> Epilogue:
        return relu_epilogue(int(tensors["W_enc"].shape[1]), tensors["threshold"])


class JumpRelu(Architecture):
    name = "jumprelu"
    params = ("b_enc", "threshold")

    def encode_pre(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        return h.relu() * (h > sae.params["threshold"])

    def select(self, sae: SAE, ids: Sequence[int]) -> tuple[str, dict[str, torch.Tensor]]:
        return "jumprelu", select_tensors(sae, ids, ("W_enc", "b_enc", "threshold"))


register_kind(JumpReluKind())
register_architecture(JumpRelu())
