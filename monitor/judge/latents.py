"""Which SAE latents fired for a verdict, with their labels (bounded).

A detector whose inputs include ``sae_latents`` components reads ``m`` packed columns
``Z[:, cols]`` (the epilogue values ``z ≥ 0`` of its latents, ``Scorer.score_and_columns``)
with read-out weights ``w [m]``. Per (request, detector) :class:`LatentTracker` keeps the
peak activation of each column over the request's scored tokens in the detector's scope::

    peak_j = max over in-scope rows r of Z[r, cols_j]          (0 before any row)

A verdict carries the latents with ``peak_j > 0``, ordered by contribution
``w_j · peak_j`` (largest first), at most :data:`MAX_LATENTS`; each with the component
(SAE) name, its latent index in the source SAE, ``peak_j`` and the component's label.

A maximum is idempotent: rows scored twice (recomputes, duplicates) change nothing, so
this needs none of the tracker's position bookkeeping. Memory: ``m`` float32 per
(request, detector), released by :meth:`LatentTracker.drop` when the request's finals
are written (the pipeline retires tracker and registry state at the same point).

Column layout (:func:`latent_map`): the scorer packs the components of a hook point in
manifest order, ``k`` columns each (``monitor.score.pack``); offsets are computed from
the bundle here, without torch (the onnxruntime backend has the same layout).

Thread rules: a :class:`LatentTracker` is used by the scoring worker only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from monitor.constants import RequestKey
from monitor.roles import scope_mask

if TYPE_CHECKING:  # the judge never loads bundles itself
    from monitor.score.bundle import Bundle

__all__ = ["MAX_LATENTS", "DetectorLatents", "LatentHit", "LatentTracker", "latent_map"]

#: Most latents on one verdict, audit line or alert.
MAX_LATENTS = 8


@dataclass(frozen=True)
class LatentHit:
    """One fired latent: ``name`` (the SAE component), ``index`` (latent id in the source
    SAE), ``value`` (peak activation), ``label`` (the component's label, "" if none)."""

    name: str
    index: int
    value: float
    label: str


@dataclass(frozen=True, eq=False)
class DetectorLatents:
    """The SAE columns of one detector: ``cols`` int64 ``[m]`` into its hook point's packed
    columns, ``weights`` float64 ``[m]`` (read-out), and per column the component name,
    latent index and label."""

    cols: np.ndarray
    weights: np.ndarray
    names: tuple[str, ...]
    ids: tuple[int, ...]
    labels: tuple[str, ...]


def latent_map(bundle: Bundle) -> dict[str, DetectorLatents]:
    """``{detector: DetectorLatents}`` for the detectors reading ``sae_latents`` components
    (``bundle`` may be loaded with or without tensors)."""
    offsets: dict[str, int] = {}
    width: dict[str, int] = {}
    for c in bundle.components.values():  # manifest order = packing order per hook point
        offsets[c.name] = width.get(c.hook_name, 0)
        width[c.hook_name] = offsets[c.name] + c.k
    out: dict[str, DetectorLatents] = {}
    for det in bundle.detectors:
        cols: list[int] = []
        ws: list[float] = []
        names: list[str] = []
        ids: list[int] = []
        labels: list[str] = []
        for inp in det.inputs:
            c = bundle.components[inp.component]
            if c.kind != "sae_latents" or c.latent_ids is None:
                continue
            lab = c.latent_labels or ("",) * c.k
            for j in range(c.k):
                cols.append(offsets[c.name] + j)
                ws.append(float(inp.weights[j]))
                names.append(c.name)
                ids.append(int(c.latent_ids[j]))
                labels.append(lab[j])
        if cols:
            out[det.name] = DetectorLatents(np.asarray(cols, dtype=np.int64),
                                            np.asarray(ws, dtype=np.float64), tuple(names),
                                            tuple(ids), tuple(labels))
    return out


class LatentTracker:
    """Peak SAE-column activations per (request, detector); see the module docstring."""

    def __init__(self, latents: Mapping[str, DetectorLatents]) -> None:
        self.latents = dict(latents)
        self._peaks: dict[RequestKey, dict[str, np.ndarray]] = {}

    def __contains__(self, detector: str) -> bool:
        return detector in self.latents

    @property
    def n_live(self) -> int:
        """Requests with state."""
        return len(self._peaks)

    def observe(self, key: RequestKey, detector: str, scope: str, z: np.ndarray,
                roles: np.ndarray) -> None:
        """Rows ``z [n, n_cols]`` (the hook point's packed column values, float) of one
        span of ``key``; ``roles`` int8 ``[n]``; ``scope`` the policy scope of
        ``detector``. A detector without SAE columns is ignored."""
        dl = self.latents.get(detector)
        if dl is None or z.shape[0] == 0:
            return
        rows = z[:, dl.cols]
        if scope != "both":
            rows = rows[scope_mask(scope)[np.asarray(roles, dtype=np.int8)]]
            if rows.shape[0] == 0:
                return
        peak = rows.max(axis=0).astype(np.float32)
        per = self._peaks.setdefault(key, {})
        old = per.get(detector)
        per[detector] = peak if old is None else np.maximum(old, peak)

    def hits(self, key: RequestKey, detector: str) -> tuple[LatentHit, ...]:
        """The fired latents of (``key``, ``detector``), strongest contribution first,
        at most :data:`MAX_LATENTS`; ``()`` when none fired or nothing was observed."""
        dl = self.latents.get(detector)
        peak = self._peaks.get(key, {}).get(detector)
        if dl is None or peak is None:
            return ()
        fired = np.flatnonzero(peak > 0)
        if fired.size == 0:
            return ()
        contrib = dl.weights[fired] * peak[fired].astype(np.float64)
        order = fired[np.argsort(-contrib, kind="stable")][:MAX_LATENTS]
        return tuple(LatentHit(dl.names[j], dl.ids[j], float(peak[j]), dl.labels[j])
                     for j in order)

    def drop(self, key: RequestKey) -> None:
        """Forget ``key`` (after its finals)."""
        self._peaks.pop(key, None)
