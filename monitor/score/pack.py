"""Pack every component of one layer into one matrix, and every detector into one read-out.

For a layer with components ``c = 1..C`` (``k_c`` columns each, ``n = Σ k_c``) and
detectors ``1..D``, the fused scorer computes, for a batch ``X [n_rows, d_model]``::

    P = X · W + b                                   [n_rows, n]   one GEMM
    P[:, ln] = (X · W)[:, ln] / sqrt(var(X) + ε) + b[:, ln]        layer_norm columns only
    Z = P · [P > θ]                                 [n_rows, n]   epilogue, per column
    S = sigmoid(Z · R + c)                          [n_rows, D]   read-out

Folding (per component; ``A`` is its stored weight ``[d_model, k]``). A component sees
``u = pre(x)`` (see ``bundle.Preprocessing``), then a probe standardises
``(u − mean) / std`` and an SAE subtracts ``b_dec``; both are affine in ``u``::

    ((u − m) / s) · A + a  =  u · (A / s[:, None]) + (a − (m / s) · A)     probe
    (u − b_dec) · A + a     =  u · A + (a − b_dec · A)                     SAE
    =>  u · A' + a'

* no layer_norm: ``u = scale · x``, so ``W = scale · A'``, ``b = a'``.
* layer_norm: ``u = (scale·x − scale·μ) / sqrt(scale²·var + ε) = (x − μ) / sqrt(var + ε/scale²)``.
  Centre the columns, ``W = A' − mean_d(A')``: then ``x · W = (x − μ) · A'`` exactly
  (``Σ_i W_ij = 0``), so no per-row mean is needed, only ``var(x)``; the column's
  ``ln_eps = ε / scale²``. (This replaces the ``x·W − μ·colsum(W)`` bookkeeping: same
  math, without the cancellation between two large terms.)

Epilogue thresholds ``θ``: identity ``−inf``, relu ``0``, jumprelu ``max(θ_file, 0)``
(``z·[z > max(θ, 0)] = relu(z)·[z > θ]``, the SAELens / Gemma Scope JumpReLU).

Extending (not implemented): a *gated* SAE (SAELens ``b_gate``, ``b_mag``, ``r_mag``,
magnitude weights ``W_enc · exp(r_mag)``) reuses the same GEMM column ``π = u·W_enc``:
add per-column ``mag_scale = exp(r_mag)`` and ``mag_bias = b_mag`` to ``PackedLayer``
and use the epilogue ``z = relu(mag_scale·π + mag_bias) · [π + b_gate > 0]``; identity /
relu / jumprelu columns get ``mag_scale = 1, mag_bias = b, b_gate = −θ``. *TopK*
(sparsify, OpenAI) is not column-separable: membership depends on all ``d_sae``
pre-activations, so it needs its own full-width block (a second GEMM over the full
encoder + ``topk``) or an explicit JumpReLU approximation with calibrated thresholds,
registered as a new kind in ``_FOLDERS`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bundle import Bundle, Component

__all__ = ["ColumnRef", "PackedLayer", "fold_component", "pack_bundle", "pack_layer"]


@dataclass(frozen=True)
class ColumnRef:
    """Where a packed column comes from: ``component``'s local column ``index``."""

    component: str
    index: int
    latent_id: int | None  # the source SAE latent, for sae_latents


@dataclass(frozen=True)
class FoldedBlock:
    """One component folded to ``p = x · W + b`` (or its layer_norm form), float32.

    ``W [d_model, k]``, ``b [k]``, ``theta [k]``; ``ln_eps`` is None without layer_norm.
    """

    W: torch.Tensor
    b: torch.Tensor
    theta: torch.Tensor
    ln_eps: float | None


@dataclass(frozen=True, eq=False)
class PackedLayer:
    """All detectors of one layer as one matrix plus a read-out. All tensors float32, CPU.

    ``W [d_model, n_cols]``, ``b [n_cols]``, ``theta [n_cols]`` (epilogue thresholds).
    ``ln_cols`` (bool ``[n_cols]``) and ``ln_eps`` (``[n_cols]``, 0 elsewhere) are None
    when no column on the layer uses layer_norm. ``R [n_cols, n_detectors]``,
    ``c [n_detectors]``; ``detectors`` names the read-out columns, ``columns`` maps each
    packed column to its component and local index, ``slices`` maps a component name to
    its columns.
    """

    layer: int
    W: torch.Tensor
    b: torch.Tensor
    theta: torch.Tensor
    ln_cols: torch.Tensor | None
    ln_eps: torch.Tensor | None
    R: torch.Tensor
    c: torch.Tensor
    detectors: tuple[str, ...]
    columns: tuple[ColumnRef, ...]
    slices: dict[str, slice]

    @property
    def d_model(self) -> int:
        return int(self.W.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.W.shape[1])


def _affine(comp: Component, A: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """Fold the post-preprocessing affine map of ``u`` (probe std., SAE b_dec) into A, a.

    Computed in float64 (A, a are float64 here) and rounded to float32 once, at the end.
    """
    t = {name: v.double() for name, v in comp.tensors.items()}
    if comp.kind == "linear_probe":
        std = t.get("std")
        if std is not None:
            A = A / std[:, None]
        if "mean" in t:
            a = a - t["mean"] @ A
    if comp.preprocessing.apply_b_dec_to_input:
        a = a - t["b_dec"] @ A
    return A, a


def _theta(comp: Component) -> torch.Tensor:
    k = comp.k
    if comp.activation == "identity":
        return torch.full((k,), float("-inf"))
    if comp.activation == "relu":
        return torch.zeros(k)
    return comp.tensors["threshold"].clamp(min=0.0)  # jumprelu


def _fold_probe(comp: Component) -> tuple[torch.Tensor, torch.Tensor]:
    return comp.tensors["weight"], comp.tensors["bias"]


def _fold_sae(comp: Component) -> tuple[torch.Tensor, torch.Tensor]:
    return comp.tensors["W_enc"], comp.tensors["b_enc"]


#: kind -> (component -> stored weight [d_model, k], bias [k]). New kinds register here.
_FOLDERS: dict[str, Callable[[Component], tuple[torch.Tensor, torch.Tensor]]] = {
    "linear_probe": _fold_probe,
    "sae_latents": _fold_sae,
}


def fold_component(comp: Component) -> FoldedBlock:
    """Fold preprocessing, standardisation and ``b_dec`` into ``p = x·W + b`` (float32)."""
    A, a = _FOLDERS[comp.kind](comp)
    A, a = _affine(comp, A.double(), a.double())
    pre = comp.preprocessing
    if pre.normalize == "layer_norm":
        W = A - A.mean(dim=0, keepdim=True)
        ln_eps: float | None = pre.layer_norm_eps / pre.scale**2
    else:
        W = pre.scale * A
        ln_eps = None
    return FoldedBlock(W=W.float().contiguous(), b=a.float(), theta=_theta(comp),
                       ln_eps=ln_eps)


def pack_layer(bundle: Bundle, layer: int) -> PackedLayer:
    """Pack the components and detectors of ``layer`` (manifest order) into a PackedLayer."""
    comps = bundle.components_on(layer)
    dets = bundle.detectors_on(layer)
    if not dets:
        raise KeyError(f"bundle {bundle.name!r} has no detector on layer {layer}")
    blocks = [fold_component(c) for c in comps]

    slices: dict[str, slice] = {}
    columns: list[ColumnRef] = []
    start = 0
    for comp in comps:
        slices[comp.name] = slice(start, start + comp.k)
        ids = comp.latent_ids or (None,) * comp.k
        columns.extend(ColumnRef(comp.name, j, ids[j]) for j in range(comp.k))
        start += comp.k
    n_cols = start

    ln_mask = torch.cat([torch.full((blk.W.shape[1],), blk.ln_eps is not None)
                         for blk in blocks])
    ln_eps = torch.cat([torch.full((blk.W.shape[1],), blk.ln_eps or 0.0) for blk in blocks])

    R = torch.zeros(n_cols, len(dets), dtype=torch.float64)
    for j, det in enumerate(dets):
        for inp in det.inputs:
            R[slices[inp.component], j] = torch.tensor(inp.weights, dtype=torch.float64)

    has_ln = bool(ln_mask.any())
    return PackedLayer(
        layer=layer,
        W=torch.cat([blk.W for blk in blocks], dim=1).contiguous(),
        b=torch.cat([blk.b for blk in blocks]),
        theta=torch.cat([blk.theta for blk in blocks]),
        ln_cols=ln_mask if has_ln else None,
        ln_eps=ln_eps.float() if has_ln else None,
        R=R.float(),
        c=torch.tensor([d.bias for d in dets], dtype=torch.float32),
        detectors=tuple(d.name for d in dets),
        columns=tuple(columns),
        slices=slices,
    )


def pack_bundle(bundle: Bundle) -> dict[int, PackedLayer]:
    """``{layer: PackedLayer}`` for every layer with a detector."""
    return {layer: pack_layer(bundle, layer) for layer in bundle.layers}
