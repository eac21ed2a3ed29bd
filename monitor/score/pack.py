"""Pack every component of one hook point into one matrix, every detector into one read-out.

A "layer" below is one hook point (``blocks.L.hook_<kind>``, ``monitor.wire.hooks``): the
components and detectors that read the same tensor. A bare layer number ``L`` means
``blocks.L.hook_resid_post`` (bundles without ``hook_name``); e.g. an SAE trained on
``blocks.9.hook_resid_pre`` packs apart from a probe on ``blocks.9.hook_resid_post``.

For a layer with components ``c = 1..C`` (``k_c`` columns each, ``n = Σ k_c``) and
detectors ``1..D``, the fused scorer computes, for a batch ``X [n_rows, d_model]``::

    P = X · W + b                                   [n_rows, n]   one GEMM
    P[:, ln] = (X · W)[:, ln] / sqrt(var(X) + ε) + b[:, ln]        layer_norm columns only
    P[:, lns] = (X · W)[:, lns] / (sqrt(var(X)·d/(d−1)) + ε) + b[:, lns]   layer_norm_std
    Z = P · [P > θ]                                 [n_rows, n]   epilogue, per column
    Z = [P > θ] · max(s·P + t, floor)               the general epilogue (gated columns)
    S = sigmoid(Z · R + c)                          [n_rows, D]   read-out

Folding (per component; ``A`` is its stored weight ``[d_model, k]``). A component sees
``u = pre(x)`` (see ``bundle.Preprocessing``), then a probe standardises
``(u − mean) / std`` and an SAE subtracts ``b_dec``; both are affine in ``u``::

    ((u − m) / s) · A + a  =  u · (A / s[:, None]) + (a − (m / s) · A)     probe
    (u − b_dec) · A + a     =  u · A + (a − b_dec · A)                     SAE
    =>  u · A' + a'

* no layer_norm: ``u = scale · x``, so ``W = scale · A'``, ``b = a'``.
* layer_norm_std: ``u = (scale·x − scale·μ) / (scale·std + ε) = (x − μ) / (std + ε/scale)``:
  the same centred ``W``, ``ln_eps = ε / scale``, and the row factor uses the unbiased std.
* layer_norm: ``u = (scale·x − scale·μ) / sqrt(scale²·var + ε) = (x − μ) / sqrt(var + ε/scale²)``.
  Centre the columns, ``W = A' − mean_d(A')``: then ``x · W = (x − μ) · A'`` exactly
  (``Σ_i W_ij = 0``), so no per-row mean is needed, only ``var(x)``; the column's
  ``ln_eps = ε / scale²``. (This replaces the ``x·W − μ·colsum(W)`` bookkeeping: same
  math, without the cancellation between two large terms.)

Epilogues (``θ``, ``s``, ``t``, ``floor`` per column) come from the component's kind
(``kinds.py``): identity ``θ = −inf``, relu ``0``, jumprelu ``max(θ_file, 0)``
(``z·[z > max(θ, 0)] = relu(z)·[z > θ]``, the SAELens / Gemma Scope JumpReLU), gated
``θ = 0`` with ``s = exp(r_mag)``, ``t = b_mag − s·b_gate``. ``s``/``t``/``floor`` are
kept only when some column of the layer needs them (a gated column).

*TopK* (sparsify, OpenAI, SAELens topk) is not column-separable and has no kind:
``monitor/score/sae/topk.py`` refuses a subset (a BatchTopK SAE converts exactly to
jumprelu).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monitor.wire.hooks import hook_key

from .bundle import Bundle
from .kinds import Component, get_kind

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
    ln_std: bool
    floor: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class TopKBlock:
    """A full-width TopK component's row mask (``monitor/score/sae/topk.py``), float32.

    ``W [d_model, m]``, ``b [m]``: the full encoder folded like the packed columns
    (``r = x · W + b`` is the rank value of every latent); ``k``: how many latents of a
    row stay active; ``cols``: the component's packed columns; ``ids`` int64 ``[len(cols)]``
    its latent indices into ``r``.
    """

    W: torch.Tensor
    b: torch.Tensor
    k: int
    cols: slice
    ids: torch.Tensor


@dataclass(frozen=True, eq=False)
class PackedLayer:
    """All detectors of one layer as one matrix plus a read-out. All tensors float32, CPU.

    ``W [d_model, n_cols]``, ``b [n_cols]``, ``theta [n_cols]`` (epilogue thresholds).
    ``ln_cols`` (bool ``[n_cols]``) and ``ln_eps`` (``[n_cols]``, 0 elsewhere) are None
    when no column on the layer uses layer_norm; ``ln_std`` (bool ``[n_cols]``, None if
    none) marks the layer_norm_std columns among them. ``mag_scale``, ``mag_shift``,
    ``floor`` (``[n_cols]``) are None unless a column needs the general epilogue.
    ``R [n_cols, n_detectors]``, ``c [n_detectors]``; ``detectors`` names the read-out
    columns, ``columns`` maps each packed column to its component and local index,
    ``slices`` maps a component name to its columns. ``hook_name`` is the hook point all
    of them read (``layer`` is its layer).
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
    ln_std: torch.Tensor | None = None
    mag_scale: torch.Tensor | None = None
    mag_shift: torch.Tensor | None = None
    floor: torch.Tensor | None = None
    hook_name: str = ""
    #: TopK components: their columns are also masked by the row's top-k (scorer)
    topk: tuple[TopKBlock, ...] = ()

    @property
    def d_model(self) -> int:
        return int(self.W.shape[0])

    @property
    def n_cols(self) -> int:
        return int(self.W.shape[1])


def fold_component(comp: Component) -> FoldedBlock:
    """Fold preprocessing, the kind's affine map and ``b_dec`` into ``p = x·W + b``.

    Computed in float64 and rounded to float32 once, at the end.
    """
    spec = get_kind(comp.kind, comp.activation)
    W, a, ln_eps = _fold_pre(comp, *spec.fold(comp.tensors))
    epi = spec.epilogue(comp.tensors)
    pre = comp.preprocessing
    return FoldedBlock(W=W.float().contiguous(), b=a.float(), theta=epi.theta,
                       ln_eps=ln_eps, ln_std=pre.normalize == "layer_norm_std",
                       floor=epi.floor, scale=epi.scale, shift=epi.shift)


def _fold_pre(comp: Component, A: torch.Tensor, a: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Fold ``comp``'s preprocessing into ``u · A + a`` (float64): ``(W, b, ln_eps)``."""
    pre = comp.preprocessing
    if pre.apply_b_dec_to_input:  # (u − b_dec)·A + a = u·A + (a − b_dec·A)
        a = a - comp.tensors["b_dec"].double() @ A
    if pre.normalize == "layer_norm":
        return A - A.mean(dim=0, keepdim=True), a, pre.layer_norm_eps / pre.scale**2
    if pre.normalize == "layer_norm_std":
        return A - A.mean(dim=0, keepdim=True), a, pre.layer_norm_eps / pre.scale
    return pre.scale * A, a, None


def fold_topk(comp: Component, cols: slice) -> TopKBlock:
    """The full-width block of a TopK component (normalize none: the bundle checks)."""
    A, a, k = get_kind(comp.kind, comp.activation).fold_full(comp.tensors)
    W, b, ln_eps = _fold_pre(comp, A, a)
    assert ln_eps is None and comp.latent_ids is not None
    return TopKBlock(W=W.float().contiguous(), b=b.float(), k=k, cols=cols,
                     ids=torch.tensor(comp.latent_ids, dtype=torch.long))


def pack_layer(bundle: Bundle, point: int | str) -> PackedLayer:
    """Pack the components and detectors of hook point ``point`` (a name, or a bare layer
    ``L`` = ``blocks.L.hook_resid_post``; manifest order) into a PackedLayer."""
    hook = hook_key(point)
    comps = bundle.components_on(hook)
    dets = bundle.detectors_on(hook)
    if not dets:
        raise KeyError(f"bundle {bundle.name!r} has no detector on {hook} "
                       f"(hook points {list(bundle.hook_names)})")
    layer = dets[0].layer
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

    ln_std = torch.cat([torch.full((blk.W.shape[1],), blk.ln_std) for blk in blocks])
    general = any(blk.scale is not None for blk in blocks)
    ones = [torch.ones(blk.W.shape[1]) for blk in blocks]
    has_ln = bool(ln_mask.any())
    return PackedLayer(
        layer=layer,
        hook_name=hook,
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
        ln_std=ln_std if bool(ln_std.any()) else None,
        mag_scale=torch.cat([blk.scale if blk.scale is not None else o
                             for blk, o in zip(blocks, ones, strict=True)]) if general else None,
        mag_shift=torch.cat([blk.shift if blk.shift is not None else 0 * o
                             for blk, o in zip(blocks, ones, strict=True)]) if general else None,
        floor=torch.cat([blk.floor for blk in blocks]) if general else None,
        topk=tuple(fold_topk(c, slices[c.name]) for c in comps
                   if get_kind(c.kind, c.activation).full_width),
    )


def pack_bundle(bundle: Bundle) -> dict[str, PackedLayer]:
    """``{hook name: PackedLayer}`` for every hook point with a detector."""
    return {hook: pack_layer(bundle, hook) for hook in bundle.hook_names}
