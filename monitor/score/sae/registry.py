"""SAE architectures: the registry, the shared base of their bundle component kinds.

An :class:`Architecture` knows, for a loaded :class:`~monitor.score.sae.model.SAE`:

* ``encode_pre(sae, h)``: the full-width latent activations from the hidden
  pre-activations ``h = u' · W_enc + b_enc`` (``u'`` the preprocessed row after the
  ``b_dec`` shift), ``[n, d_sae]`` float32 — the reference the tests compare with
  ``sae-lens``'s own ``encode``;
* ``select(sae, ids)``: the bundle component tensors (roles of its
  :class:`~monitor.score.kinds.ComponentKind`) for a latent subset, or a
  :class:`SAEError` when a subset cannot be computed exactly (TopK).

Each architecture lives in its own module (``standard.py``, ``jumprelu.py``,
``gated.py``, ``topk.py``) and registers both here and, for its component kind, in
``monitor/score/kinds.py``. Filled at import time, read-only afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from ..kinds import ComponentKind, Epilogue, FieldError

if TYPE_CHECKING:  # no torch at import: bundle validation runs without it (onnxruntime)
    import torch

    from .model import SAE

__all__ = ["Architecture", "SAEError", "SAELatentsKind", "architectures", "get_architecture",
           "register_architecture"]


class SAEError(FieldError):
    """An SAE was refused. ``str(e)`` is ``"<source>: <field>: expected <...>, found <...>"``."""


class SAELatentsKind(ComponentKind):
    """Selected latents of an SAE: ``W_enc [d_model, k]``, ``b_enc [k]``, optional
    ``b_dec [d_model]``; subclasses add roles and the epilogue."""

    kind = "sae_latents"
    main = "W_enc"
    roles: ClassVar[Mapping[str, str]] = {"b_enc": "k", "b_dec": "d_model"}
    required = frozenset({"W_enc", "b_enc"})
    has_b_dec = True

    def fold(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors["W_enc"].double(), tensors["b_enc"].double()


class Architecture:
    """Base of an SAE architecture (see the module docstring).

    ``params``: the parameter names beyond ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
    d_out]``, ``b_dec [d_out]``, each ``[d_sae]``. ``gate_bias``: the parameter added to
    ``u'·W_enc`` for ``h`` (``b_enc``, or ``b_gate`` for gated SAEs).
    """

    name: str = ""
    params: tuple[str, ...] = ("b_enc",)
    gate_bias: str = "b_enc"

    def encode_pre(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, sae: SAE, ids: Sequence[int]) -> tuple[str, dict[str, torch.Tensor]]:
        """``(activation, {role: tensor})`` of the component for latents ``ids``."""
        raise NotImplementedError


_ARCHS: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    _ARCHS[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    try:
        return _ARCHS[name]
    except KeyError:
        raise KeyError(f"no SAE architecture {name!r} (registered: {sorted(_ARCHS)})") \
            from None


def architectures() -> tuple[str, ...]:
    return tuple(_ARCHS)


def relu_epilogue(k: int, theta: torch.Tensor | None = None) -> Epilogue:
    """relu (``theta`` None) or jumprelu (``relu(p)·[p > θ] = p·[p > max(θ, 0)]``)."""
    import torch

    zeros = torch.zeros(k, dtype=torch.float32)
    th = zeros if theta is None else theta.float().clamp(min=0.0)
    return Epilogue(theta=th, floor=zeros)
