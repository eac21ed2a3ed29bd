"""Gated SAE (SAELens ``"gated"``): one encoder, two paths::

    π = u' · W_enc
    z = [π + b_gate > 0] · relu(exp(r_mag) · π + b_mag)

A latent subset is exact. Packed, the GEMM column is the gate ``p = π + b_gate``
(``b_gate`` plays ``b_enc``'s role) and the magnitude is an affine function of the same
``p``: ``exp(r_mag)·p + (b_mag − exp(r_mag)·b_gate)`` (see ``kinds.py``). Bundle
component ``sae_latents`` / ``gated`` with ``b_enc`` = b_gate, ``b_mag``, ``r_mag``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from ..kinds import Epilogue, register_kind
from .registry import Architecture, SAELatentsKind, register_architecture
from .standard import select_tensors

if TYPE_CHECKING:  # torch only when encoding / folding (see registry.py)
    import torch

    from .model import SAE


class GatedKind(SAELatentsKind):
    activation = "gated"
    roles: ClassVar[Mapping[str, str]] = {**SAELatentsKind.roles, "b_mag": "k", "r_mag": "k"}
    required = frozenset({"W_enc", "b_enc", "b_mag", "r_mag"})

    def epilogue(self, tensors: Mapping[str, torch.Tensor]) -> Epilogue:
        k = int(tensors["W_enc"].shape[1])
        s = tensors["r_mag"].double().exp()
        t = tensors["b_mag"].double() - s * tensors["b_enc"].double()
        zeros = tensors["W_enc"].new_zeros(k, dtype=s.dtype).float()
        return Epilogue(theta=zeros, floor=zeros, scale=s.float(), shift=t.float())


class Gated(Architecture):
    name = "gated"
    params = ("b_gate", "b_mag", "r_mag")
    gate_bias = "b_gate"

    def encode_pre(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        pi = h - sae.params["b_gate"]
        mag = (pi * sae.params["r_mag"].exp() + sae.params["b_mag"]).relu()
        return (h > 0).float() * mag

    def select(self, sae: SAE, ids: Sequence[int]) -> tuple[str, dict[str, torch.Tensor]]:
        t = select_tensors(sae, ids, ("W_enc", "b_gate", "b_mag", "r_mag"))
        t["b_enc"] = t.pop("b_gate")
        return "gated", t


register_kind(GatedKind())
register_architecture(Gated())
