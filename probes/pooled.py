"""Request-level detectors on pooled features: the data they read, their sample weights,
the leave-one-source-out fold runner and every fitter the recipe and the study compare.

One owner for what :mod:`probes.harmful` (the recipe, its read-out exploration) and
:mod:`probes.study` (the variant study) both fit; it imports neither, so both import it.

- **Data**: :class:`SourceData`, one source's examples, activations (float16
  ``[n_rows, d_model]`` per layer, rows grouped by example in position order,
  ``probes.collect``) and in-scope mask (bool ``[n_rows]``); pooled features are the
  mean of the in-scope rows per example, float32 ``[n_examples, d_model]``.
- **Weights** (:func:`source_weights`): every source the same total weight within its
  class, times a per-kind / per-name multiplier, then each class rescaled to ``n/2``.
- **Fitters**: a :data:`Fitter` maps training rows (:data:`Parts`) to a :data:`Scorer`
  that scores every example of a source (float64 ``[n_examples]``, higher = more
  harmful). :func:`fitter_folds` runs one leave-one-source-out: each source scored by a
  detector fit without it, with the fold's calibration scores (the other sources'
  held-back benign rows).

Threads: none; every fitter is a pure function of its rows (sklearn ``random_state=0``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.calibrate import ecdf_scores
from probes.collect import Activations
from probes.datasets import ChatExample
from probes.sources import Source
from probes.train import (
    LinearProbe,
    aggregate_requests,
    fit_length_slope,
    fit_logreg,
    log_tokens,
)

__all__ = [
    "Fitter", "Fold", "Parts", "Scorer", "SourceData", "average", "cascade", "class_balanced",
    "concat", "conjunction", "contrast", "ecdf_scores", "ensemble", "fit_pooled", "fitter_folds",
    "gbt_pca", "group_dro", "kind_weights", "knn", "lda_shrunk", "length_debiased", "linear",
    "mlp", "pca_logreg", "pooled_features", "served_scores", "skip_first", "source_bagging",
    "source_log_loss", "source_weights", "stage2_share", "style_directions",
]


# ----------------------------------------------------------------------- data
def pooled_features(acts: Activations, layer: int, mask: np.ndarray) -> np.ndarray:
    """Mean of the masked rows per example: float32 ``[n_examples, d_model]`` (zeros for
    an example without masked rows). Rows must be grouped by example (collect order)."""
    x = acts.x[layer][mask].astype(np.float32)
    ex = acts.example[mask]
    d = acts.x[layer].shape[1]
    out = np.zeros((acts.n_examples, d), dtype=np.float32)
    if ex.size == 0:
        return out
    if np.any(np.diff(ex) < 0):
        raise ValueError("pooled_features: rows must be grouped by example in ascending order")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ex)) + 1])
    sums = np.add.reduceat(x, starts, axis=0)
    counts = np.diff(np.concatenate([starts, [ex.size]])).astype(np.float32)
    out[ex[starts]] = sums / counts[:, None]
    return out


def served_scores(probe: LinearProbe, acts: Activations, mask: np.ndarray,
                  agg: dict[str, Any], min_tokens: int,
                  rows: np.ndarray | None = None, judge_at: str = "every_token"
                  ) -> np.ndarray:
    """The request statistic the monitor alerts on (``probes.harmful`` module doc), per
    example (float ``[n_examples]``).
    ``rows``: the masked rows of ``probe.layer`` as float32 when the caller has them."""
    x = acts.x[probe.layer][mask] if rows is None else rows
    scores = np.zeros(acts.n_rows, dtype=np.float32)
    scores[mask] = probe.scores(x)
    return aggregate_requests(scores, acts.example, acts.n_examples, agg, min_tokens, mask,
                              judge_at)


@dataclass
class SourceData:
    """One source's examples, activations and per-layer pooled user-token features."""

    source: Source
    examples: list[ChatExample]
    acts: Activations
    mask: np.ndarray
    feats: dict[int, np.ndarray] = field(default_factory=dict)
    rows32: dict[int, np.ndarray] = field(default_factory=dict)
    prefix_cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict)
    skip_views: dict[int, SourceData] = field(default_factory=dict)
    """:meth:`skipping` views made so far, by ``k`` (each keeps its own feature cache)."""

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def labels(self) -> np.ndarray:
        return self.acts.labels.astype(np.int8)

    def take(self, idx: np.ndarray) -> SourceData:
        """The examples ``idx`` (int, strictly increasing) as a source of their own:
        their rows in the same order, examples renumbered ``0..len(idx)-1``; pooled
        features already computed are carried over (``features(l)[idx]``)."""
        idx = np.asarray(idx, dtype=np.int64)
        n = self.acts.n_examples
        if idx.ndim != 1 or (idx.size and (idx[0] < 0 or idx[-1] >= n
                                           or np.any(np.diff(idx) <= 0))):
            raise ValueError(f"take({self.name}): expected strictly increasing indices in "
                             f"[0, {n}); found {idx.size} indices")
        new = np.full(n, -1, dtype=np.int64)
        new[idx] = np.arange(idx.size)
        keep = new[self.acts.example] >= 0
        a = self.acts.subset_rows(keep)
        acts = Activations(a.layers, a.x, new[a.example], a.position, a.generated, a.segment,
                           a.from_end, self.acts.labels[idx], int(idx.size))
        return SourceData(self.source, [self.examples[i] for i in idx], acts, self.mask[keep],
                          {lay: f[idx] for lay, f in self.feats.items()})

    def relabelled(self, labels: np.ndarray) -> SourceData:
        """This source with every example's label replaced by ``labels`` (int ``[n_examples]``,
        0/1): same examples, activations and mask, sharing the pooled-feature cache (the
        features do not depend on labels); for a label-permutation control."""
        y = np.asarray(labels)
        if y.shape != (self.acts.n_examples,) or not np.isin(y, (0, 1)).all():
            raise ValueError(f"relabelled({self.name}): labels: expected 0/1 of shape "
                             f"({self.acts.n_examples},); found shape {y.shape}")
        acts = dataclasses.replace(self.acts, labels=y.astype(self.acts.labels.dtype))
        return SourceData(self.source, self.examples, acts, self.mask, self.feats)

    def skipping(self, k: int) -> SourceData:
        """This source with the first ``k`` in-scope rows of every example that has more
        than ``k`` left out of the scope (an example with ``n ≤ k`` keeps all ``n``): the
        rows the served ``mean_logit`` with ``skip_tokens: k`` pools at the request's last
        in-scope token (``monitor.judge.aggregate.MeanLogitAggregator``). Same examples,
        activations and row order; only ``mask`` changes, so pooled features,
        :meth:`in_scope_tokens` (``n − k``) and everything derived from them follow.
        ``k = 0``: this source itself."""
        if k < 0:
            raise ValueError(f"skipping({self.name}): k: expected >= 0; found {k}")
        if k == 0:
            return self
        if k in self.skip_views:
            return self.skip_views[k]
        idx = np.flatnonzero(self.mask)
        ex = self.acts.example[idx]
        if np.any(np.diff(ex) < 0):
            raise ValueError(f"skipping({self.name}): rows must be grouped by example in "
                             "ascending order")
        starts = np.flatnonzero(np.r_[True, np.diff(ex) != 0])
        sizes = np.diff(np.r_[starts, idx.size])
        rank = np.arange(idx.size) - np.repeat(starts, sizes)   # 0-based within example
        n = np.repeat(sizes, sizes)
        mask = self.mask.copy()
        mask[idx[(rank < k) & (n > k)]] = False
        view = SourceData(self.source, self.examples, self.acts, mask)
        self.skip_views[k] = view
        return view

    def in_scope_tokens(self) -> np.ndarray:
        """In-scope rows per example: int64 ``[n_examples]`` (``t`` of the served
        aggregate at the example's last in-scope token)."""
        return np.bincount(self.acts.example[self.mask],
                           minlength=self.acts.n_examples).astype(np.int64)

    def rows(self, layer: int) -> np.ndarray:
        """The in-scope rows of ``layer`` as float32 (cached)."""
        if layer not in self.rows32:
            self.rows32[layer] = self.acts.x[layer][self.mask].astype(np.float32)
        return self.rows32[layer]

    def served(self, probe: LinearProbe, agg: dict[str, Any], min_tokens: int,
               judge_at: str = "every_token") -> np.ndarray:
        """:func:`served_scores` of this source."""
        return served_scores(probe, self.acts, self.mask, agg, min_tokens,
                             self.rows(probe.layer), judge_at)

    def prefix_features(self, layer: int, min_tokens: int, k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Means of the first ``t`` in-scope rows for up to ``k`` prefix lengths ``t``
        evenly spaced in ``[min_tokens, T]`` (always including ``T``) per example:
        (float32 ``[n_prefixes, d]``, owning example ``[n_prefixes]``). The monitor judges
        every such prefix (``S = max_{t ≥ m} a_t``), so benign prefixes are negatives."""
        key = (layer, min_tokens, k)
        if key in self.prefix_cache:
            return self.prefix_cache[key]
        rows = self.rows(layer)
        ex = self.acts.example[self.mask]
        feats, owner = [], []
        if ex.size:
            bounds = np.concatenate([[0], np.flatnonzero(np.diff(ex)) + 1, [ex.size]])
            for a, b in itertools.pairwise(bounds):
                n = int(b - a)
                ts = np.unique(np.round(np.linspace(min(min_tokens, n), n, k)).astype(int))
                cs = np.cumsum(rows[a:b], axis=0, dtype=np.float64)[ts - 1] / ts[:, None]
                feats.append(cs.astype(np.float32))
                owner.append(np.full(ts.size, ex[a], dtype=np.int64))
        d = self.acts.x[layer].shape[1]
        out = (np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
               np.concatenate(owner) if owner else np.zeros(0, np.int64))
        self.prefix_cache[key] = out
        return out

    def features(self, layer: int) -> np.ndarray:
        if layer not in self.feats:
            self.feats[layer] = pooled_features(self.acts, layer, self.mask)
        return self.feats[layer]


def source_weights(parts: Sequence[tuple[SourceData, np.ndarray]],
                   kind_weight: dict[str, float], per_source: bool = True) -> np.ndarray:
    """Per-example weights for the rows ``idx`` of each source: each source's rows sum to
    ``kind_weight.get(name, kind_weight.get(kind, 1))`` (a source's name overrides its
    kind; ``per_source=False``: each ROW weighs that much instead), then each class is
    rescaled to total ``n/2`` (balanced)."""
    ws, ys = [], []
    for sd, idx in parts:
        n = max(len(idx), 1) if per_source else 1
        mult = kind_weight.get(sd.source.name, kind_weight.get(sd.source.kind, 1.0))
        ws.append(np.full(len(idx), mult / n))
        ys.append(sd.labels[idx])
    w = np.concatenate(ws)
    y = np.concatenate(ys)
    for c in (0, 1):
        tot = w[y == c].sum()
        if tot > 0:
            w[y == c] *= 1.0 / tot
    return w * len(w) / 2.0


def fit_pooled(parts: Sequence[tuple[SourceData, np.ndarray]], layer: int, C: float,
               kind_weight: dict[str, float], prefixes: int = 0,
               min_tokens: int = 2, style: str = "") -> LinearProbe:
    """L2 logistic regression on pooled user-token features of the given rows.

    ``prefixes > 0``: a benign example contributes the means of up to ``prefixes`` of its
    prefixes (``SourceData.prefix_features``, its weight split evenly across them)
    instead of only its full mean, so no prefix of a benign request — each of which the
    monitor judges — is pushed over the threshold; harmful examples keep the full mean.
    ``style`` (``benign`` | ``both``; "" off): the standardised rows are projected off
    :func:`style_directions` of ``parts`` before the fit, ``z̃ = z − (z Vᵀ) V``, and the
    weight returned is ``(I − VᵀV) w``: one linear probe on the raw features whose
    logit is the same function of ``z̃``."""
    w_ex = source_weights(parts, kind_weight)
    xs, ys, ws = [], [], []
    off = 0
    for sd, idx in parts:
        w_sd = w_ex[off:off + idx.size]
        off += idx.size
        if prefixes > 0 and sd.source.kind != "harmful":
            f, owner = sd.prefix_features(layer, min_tokens, prefixes)
            pos = np.full(sd.labels.size, -1, dtype=np.int64)
            pos[idx] = np.arange(idx.size)
            keep = pos[owner] >= 0
            cnt = np.bincount(owner[keep], minlength=sd.labels.size).astype(np.float64)
            xs.append(f[keep])
            ys.append(sd.labels[owner[keep]])
            ws.append(w_sd[pos[owner[keep]]] / cnt[owner[keep]])
        else:
            xs.append(sd.features(layer)[idx])
            ys.append(sd.labels[idx])
            ws.append(w_sd)
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    # class balance is already in w; fit_logreg's 'balanced' then only rescales slightly
    project = (None if not style else
               lambda mean, std: style_directions(parts, layer, mean, std, style))
    return fit_logreg(x, y, layer, C, w, max_iter=500, project_out=project)


def kind_weights(scary_weight: float) -> dict[str, float]:
    """Per-kind source weight multipliers (benign-but-scary and persona sources)."""
    return {"scary": scary_weight, "persona": scary_weight}


@dataclass
class Fold:
    """One leave-one-source-out fold: the held-out source's scores and the scores of the
    fold's calibration rows (the held-back benign rows of the OTHER sources), per read-out
    (index 0 = pooled logit, then one per served read-out)."""

    held: SourceData
    held_scores: list[np.ndarray]
    cal_scores: list[np.ndarray]
    cal_groups: np.ndarray | None = None
    """The source name of each calibration row (``[n_cal]``, the order of ``cal_scores``;
    for the ``source`` / ``worst`` calibration weightings, ``probes.calibrate``); None:
    one source."""


Parts = Sequence[tuple[SourceData, np.ndarray]]
"""Training rows: ``(source, row indices into that source)`` per source."""
Scorer = Callable[[SourceData], np.ndarray]
"""Scores every example of a source: float64 ``[n_examples]`` (higher = more harmful)."""
Fitter = Callable[[Parts], Scorer]
"""Fits a detector on the given rows and returns its scorer."""


# ----------------------------------------------------------------------- folds
def fitter_folds(data: Sequence[SourceData], fit_idx: dict[str, np.ndarray],
                 cal_idx: dict[str, np.ndarray], fit: Fitter) -> list[Fold]:
    """Leave one source out with any :data:`Fitter`: for each source ``S`` of ``data``,
    a detector fit on the ``fit_idx`` rows of every other source scores all of ``S``
    (``held_scores[0]``) and the other sources' ``cal_idx`` rows (``cal_scores[0]``,
    concatenated in ``data`` order; ``cal_groups`` their source names)."""
    folds = []
    for held in data:
        others = [d for d in data if d.name != held.name]
        score = fit([(d, fit_idx[d.name]) for d in others])
        cal_src = [d for d in others if cal_idx[d.name].size]
        if not cal_src:
            raise ValueError(f"fitter_folds: fold {held.name!r} has no calibration rows "
                             "(expected at least one other benign source)")
        cal = [np.asarray(score(d), dtype=np.float64)[cal_idx[d.name]] for d in cal_src]
        groups = np.concatenate([np.full(cal_idx[d.name].size, d.name) for d in cal_src])
        folds.append(Fold(held, [np.asarray(score(held), dtype=np.float64)],
                          [np.concatenate(cal)], groups))
    return folds


# ----------------------------------------------------------------------- fitters
def _xy(parts: Parts, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of ``layers`` concatenated (float32 ``[n, d·len(layers)]``) and
    labels (int8 ``[n]``) of the given rows."""
    x = np.concatenate([np.concatenate([d.features(lay)[i] for lay in layers], 1)
                        for d, i in parts])
    return x, np.concatenate([d.labels[i] for d, i in parts])


def _feats(d: SourceData, layers: Sequence[int]) -> np.ndarray:
    return np.concatenate([d.features(lay) for lay in layers], 1)


def _standardiser(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mu, sd = x.mean(0), x.std(0) + 1e-4
    return lambda z: (z - mu) / sd


def linear(layer: int, C: float, kind_weight: dict[str, float] | None = None,
           prefixes: int = 0, style: str = "") -> Fitter:
    """The recipe's probe (:func:`fit_pooled`: standardised L2 logistic regression, every
    source the same total weight within its class, times ``kind_weight``, default 1;
    ``prefixes``: benign prefix negatives; ``style``: :func:`style_directions` of the
    training sources projected out, still one linear probe, ``w' = (I − VᵀV) w``, so every
    training source of the class has the same mean logit); score = the pooled logit
    ``((x̄ − μ)/σ)·w + b`` (what ``mean_logit`` at ``span_end`` serves)."""
    kw = kind_weights(1.0) if kind_weight is None else kind_weight

    def fit(parts: Parts) -> Scorer:
        p = fit_pooled(parts, layer, C, kw, prefixes, style=style)
        return lambda d: p.logits(d.features(layer)).astype(np.float64)
    return fit


def concat(layers: Sequence[int], C: float, kind_weight: dict[str, float] | None = None
           ) -> Fitter:
    """One logistic regression on the user means of several layers concatenated
    (standardised, source-balanced weights times ``kind_weight``, default 1). Served it
    would be a sum of per-layer mean logits: ``z = Σ_l ((x̄_l − μ_l)/σ_l)·w_l + b``."""
    kw = kind_weights(1.0) if kind_weight is None else kind_weight

    def fit(parts: Parts) -> Scorer:
        from sklearn.linear_model import LogisticRegression

        x, y = _xy(parts, layers)
        st = _standardiser(x)
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=500)
        clf.fit(st(x), y, sample_weight=source_weights(parts, kw))
        return lambda d: clf.decision_function(st(_feats(d, layers))).astype(np.float64)
    return fit


def skip_first(base: Fitter, k: int) -> Fitter:
    """``base`` fit and scored on every source :meth:`SourceData.skipping` ``k`` (the first
    ``k`` in-scope tokens of a request with more than ``k`` left out of the pool; what
    ``mean_logit`` with ``skip_tokens: k`` serves; each source caches its view)."""
    if k < 0:
        raise ValueError(f"skip_first: k: expected >= 0; found {k}")

    def fit(parts: Parts) -> Scorer:
        f = base([(d.skipping(k), i) for d, i in parts])
        return lambda d: f(d.skipping(k))
    return fit


def average(fitters: Sequence[Fitter]) -> Fitter:
    """Mean of the request logits of several detectors, each fit on the same parts
    (float64 ``[n]``; the logits are averaged as they are, not rescaled)."""
    if not fitters:
        raise ValueError("average: expected at least one fitter; found none")

    def fit(parts: Parts) -> Scorer:
        fs = [f(parts) for f in fitters]
        return lambda d: np.mean([f(d) for f in fs], axis=0)
    return fit


def source_log_loss(score: Scorer, d: SourceData, idx: np.ndarray) -> float:
    """Mean log-loss of the rows ``idx`` of ``d`` under a logit scorer:
    ``mean_i log(1 + exp(−(2y_i − 1)·s_i))`` (float64, natural log; 0 rows: 0.0)."""
    if idx.size == 0:
        return 0.0
    s = np.asarray(score(d), dtype=np.float64)[idx]
    sign = 2.0 * d.labels[idx].astype(np.float64) - 1.0
    return float(np.mean(np.logaddexp(0.0, -sign * s)))


def group_dro(make: Callable[[dict[str, float]], Fitter], rounds: int, eta: float) -> Fitter:
    """Group DRO in its reweighting form (Sagawa et al. 2020, one group per source): start
    every source at multiplier ``q_s = 1``, then ``rounds`` times fit ``make(q)`` on the
    parts and set ``q_s ← q_s·exp(η·L_s)``, ``L_s`` = :func:`source_log_loss` of that
    source's fit rows under the fit's own scorer (for the recipe: the served, length-
    debiased mean logit); the last ``q`` is fit once more and returned. ``make`` maps
    per-source-name multipliers to a fitter (e.g. ``lambda q: linear(15, 3e-3, q)``: a
    name overrides a kind in :func:`source_weights`, and every class is rescaled there, so
    only ratios within a class matter; ``q`` is divided by its maximum each round to stay
    finite). ``rounds = 0`` or ``η = 0`` is ``make({name: 1})`` itself."""
    if rounds < 0:
        raise ValueError(f"group_dro: rounds: expected >= 0; found {rounds}")

    def fit(parts: Parts) -> Scorer:
        q = {d.name: 1.0 for d, _ in parts}
        for _ in range(rounds):
            f = make(dict(q))(parts)
            for d, i in parts:
                q[d.name] *= float(np.exp(eta * source_log_loss(f, d, i)))
            top = max(q.values())
            q = {k: v / top for k, v in q.items()}
        return make(dict(q))(parts)
    return fit


def source_bagging(base: Fitter, members: int, share: float, seed: int = 0) -> Fitter:
    """Mean of the scores of ``members`` fits of ``base``, each on a random ``share`` of
    the harmful sources and the same share of the other sources (``max(1,
    round(share·n))`` of each, drawn without replacement by ``numpy`` ``default_rng(seed)``
    in parts order); a member's sources keep all their fit rows. For a linear ``base``
    (with or without a length term) the mean is again one linear probe and one slope."""
    if members < 1 or not 0 < share <= 1:
        raise ValueError(f"source_bagging: expected members >= 1 and 0 < share <= 1; found "
                         f"members={members}, share={share}")

    def fit(parts: Parts) -> Scorer:
        rng = np.random.default_rng(seed)
        pos = [k for k, (d, _) in enumerate(parts) if d.source.kind == "harmful"]
        neg = [k for k, (d, _) in enumerate(parts) if d.source.kind != "harmful"]
        fs = []
        for _ in range(members):
            keep: set[int] = set()
            for group in (pos, neg):
                m = max(1, round(share * len(group))) if group else 0
                keep.update(int(k) for k in rng.choice(group, size=m, replace=False))
            fs.append(base([p for k, p in enumerate(parts) if k in keep]))
        return lambda d: np.mean([f(d) for f in fs], axis=0)
    return fit


def contrast(base: Fitter, benign_kinds: frozenset[str]) -> Fitter:
    """``base`` fit on the harmful rows against the benign rows of sources whose kind is
    in ``benign_kinds`` only (e.g. ``{"scary", "persona"}``: a harmful-vs-benign-but-scary
    probe); the other benign sources' rows are not fit on. Scores every source."""
    def fit(parts: Parts) -> Scorer:
        kept = [(d, i) for d, i in parts
                if d.source.kind == "harmful" or d.source.kind in benign_kinds]
        if not any(d.source.kind == "harmful" for d, _ in kept) or \
                not any(d.source.kind != "harmful" for d, _ in kept):
            raise ValueError(f"contrast: expected harmful rows and rows of kinds "
                             f"{sorted(benign_kinds)}; found kinds "
                             f"{sorted({d.source.kind for d, _ in kept})}")
        return base(kept)
    return fit


def conjunction(fitters: Sequence[Fitter]) -> Fitter:
    """Alert only when every detector would: score ``min_k (s_k − μ_k)/σ_k``, with ``μ_k,
    σ_k`` the mean and standard deviation of detector ``k``'s scores on the benign
    TRAINING rows (float64 ``[n]``), so each member is on its benign scale before the
    minimum. Each member is fit on the same parts (a member may restrict them itself:
    :func:`contrast`)."""
    if not fitters:
        raise ValueError("conjunction: expected at least one fitter; found none")

    def fit(parts: Parts) -> Scorer:
        fs = [f(parts) for f in fitters]
        scales = []
        for f in fs:
            b = np.concatenate([f(d)[i[d.labels[i] == 0]] for d, i in parts])
            scales.append((float(b.mean()), max(float(b.std()), 1e-12)))
        return lambda d: np.min([(f(d) - m) / sd for f, (m, sd) in zip(fs, scales,
                                                                        strict=True)], axis=0)
    return fit


def ensemble(layers: Sequence[int], C: float, kind_weight: dict[str, float] | None = None,
             prefixes: int = 0) -> Fitter:
    """Mean of the pooled logits of one :func:`linear` probe per layer (same ``C``,
    ``kind_weight`` and ``prefixes``): :func:`average`."""
    return average([linear(lay, C, kind_weight, prefixes) for lay in layers])


def lda_shrunk(layer: int) -> Fitter:
    """Whitened linear: Fisher's discriminant with a Ledoit-Wolf shrunk within-class
    covariance on standardised features, ``w = Σ⁻¹(μ₁ − μ₀)`` (class means weighted by the
    source-balanced weights), score ``(x − (μ₁ + μ₀)/2)·w``. One linear probe."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.covariance import ledoit_wolf

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        xs = st(x).astype(np.float64)
        w = source_weights(parts, kind_weights(1.0))
        m1 = np.average(xs[y == 1], axis=0, weights=w[y == 1])
        m0 = np.average(xs[y == 0], axis=0, weights=w[y == 0])
        resid = xs - np.where((y == 1)[:, None], m1, m0)
        cov, _ = ledoit_wolf(resid, assume_centered=True)
        wv = np.linalg.solve(cov, m1 - m0)
        mid = (m1 + m0) / 2
        return lambda d: (st(d.features(layer)).astype(np.float64) - mid) @ wv
    return fit


def style_directions(parts: Parts, layer: int, mean: np.ndarray, std: np.ndarray,
                     kinds: str = "benign") -> np.ndarray:
    """Orthonormal rows (float64 ``[r, d]``) spanning the differences between the
    standardised mean features of the training sources of one class: ``kinds`` =
    ``benign`` (every non-harmful source) or ``both`` (that, plus the same for the
    harmful sources). ``r`` ≤ sources − 1 per class (singular values ≤ 1e-6 × the
    largest dropped). A direction along which benign sources differ from each other is
    style or topic, not evidence of harm (that is the idea tried; the study judges it)."""
    if kinds not in ("benign", "both"):
        raise ValueError(f"style_directions kinds: expected benign or both; found {kinds!r}")
    blocks = []
    for harmful in ((False, True) if kinds == "both" else (False,)):
        m = [((d.features(layer)[i].astype(np.float64) - mean) / std).mean(0)
             for d, i in parts if (d.source.kind == "harmful") == harmful and i.size]
        if len(m) > 1:
            blocks.append(np.stack(m) - np.mean(m, axis=0))
    if not blocks:
        return np.zeros((0, mean.size))
    _, sv, vt = np.linalg.svd(np.concatenate(blocks), full_matrices=False)
    return vt[sv > 1e-6 * sv[0]] if sv.size and sv[0] > 0 else np.zeros((0, mean.size))


def pca_logreg(layer: int, k: int, C: float) -> Fitter:
    """PCA (``k`` components of the standardised training features) then logistic
    regression (source-balanced weights). Linear overall: one linear probe."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        pca = PCA(k, random_state=0).fit(st(x))
        z = pca.transform(st(x))
        zs = _standardiser(z)
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=500)
        clf.fit(zs(z), y, sample_weight=source_weights(parts, kind_weights(1.0)))
        return lambda d: clf.decision_function(
            zs(pca.transform(st(d.features(layer))))).astype(np.float64)
    return fit


def class_balanced(layer: int, C: float, kind_weight: dict[str, float] | None = None
                   ) -> Fitter:
    """The linear probe WITHOUT per-source balancing: every request of a class the same
    weight (times its source's ``kind_weight`` multiplier), what per-source weights buy."""
    kw = kind_weights(1.0) if kind_weight is None else kind_weight

    def fit(parts: Parts) -> Scorer:
        x, y = _xy(parts, [layer])
        p = fit_logreg(x, y, layer, C, source_weights(parts, kw, per_source=False),
                       max_iter=500)
        return lambda d: p.logits(d.features(layer)).astype(np.float64)
    return fit


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def mlp(layers: Sequence[int], hidden: int = 64, alpha: float = 1.0) -> Fitter:
    """A small MLP head (sklearn, ReLU, early stopping on 10% of the rows) on standardised
    pooled features; sklearn's MLP takes no sample weights, so harmful rows are
    oversampled to balance the classes. Score: log-odds."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.neural_network import MLPClassifier

        x, y = _xy(parts, layers)
        st = _standardiser(x)
        rng = np.random.default_rng(0)
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        small, big = (pos, neg) if pos.size < neg.size else (neg, pos)
        idx = np.r_[big, small, rng.choice(small, big.size - small.size)]
        clf = MLPClassifier((hidden,), alpha=alpha, max_iter=200, early_stopping=True,
                            random_state=0)
        clf.fit(st(x)[idx], y[idx])
        return lambda d: _logit(clf.predict_proba(st(_feats(d, layers)))[:, 1])
    return fit


def gbt_pca(layer: int, k: int = 32) -> Fitter:
    """Gradient-boosted trees (sklearn ``HistGradientBoostingClassifier``, early stopping)
    on ``k`` PCA components of the standardised features, source-balanced weights."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.decomposition import PCA
        from sklearn.ensemble import HistGradientBoostingClassifier

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        pca = PCA(k, random_state=0).fit(st(x))
        clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05,
                                             early_stopping=True, random_state=0)
        clf.fit(pca.transform(st(x)), y, sample_weight=source_weights(parts, kind_weights(1.0)))
        return lambda d: clf.decision_function(
            pca.transform(st(d.features(layer)))).astype(np.float64)
    return fit


def knn(layer: int, k: int = 25, n_pca: int = 64) -> Fitter:
    """k nearest neighbours (cosine, on ``n_pca`` PCA components of the standardised
    features): score = the source-balanced weight share of harmful neighbours, plus a
    1e-3 tie-break by the mean cosine similarity to harmful minus benign neighbours."""
    def fit(parts: Parts) -> Scorer:
        from sklearn.decomposition import PCA

        x, y = _xy(parts, [layer])
        st = _standardiser(x)
        pca = PCA(n_pca, random_state=0).fit(st(x))

        def emb(f: np.ndarray) -> np.ndarray:
            z = pca.transform(st(f))
            return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-9)

        ref, w = emb(x), source_weights(parts, kind_weights(1.0))

        def score(d: SourceData) -> np.ndarray:
            sim = emb(d.features(layer)) @ ref.T
            nb = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            wn, yn = w[nb], y[nb] == 1
            sn = np.take_along_axis(sim, nb, 1)
            share = (wn * yn).sum(1) / wn.sum(1)
            tie = (np.where(yn, sn, 0).sum(1) - np.where(yn, 0, sn).sum(1)) / k
            return share + 1e-3 * tie
        return score
    return fit


def cascade(first: Fitter, second: Fitter, band: tuple[float, float] = (0.9, 0.999)
            ) -> Fitter:
    """Two stages: ``first`` decides confident requests; a request whose first-stage score
    lies in the band between the ``band`` quantiles of the first stage's scores on the
    benign TRAINING rows goes to ``second``. Score (ordered by stage): below the band
    ``F₁(s₁)`` ∈ [0, 1), in the band ``1 + F₂(s₂)/2`` ∈ [1, 1.5] (so a stage-2 score above
    every benign one stays inside the band's range), above it ``2 + F₁(s₁)``, with ``F``
    each stage's empirical CDF on the benign training rows. In the band ⇔ ``1 ≤ score < 2``
    (:func:`stage2_share`)."""
    def fit(parts: Parts) -> Scorer:
        f1, f2 = first(parts), second(parts)
        neg = [(d, i[d.labels[i] == 0]) for d, i in parts]
        n1 = np.sort(np.concatenate([f1(d)[i] for d, i in neg]))
        n2 = np.sort(np.concatenate([f2(d)[i] for d, i in neg]))
        lo, hi = np.quantile(n1, band[0]), np.quantile(n1, band[1])

        def score(d: SourceData) -> np.ndarray:
            s1 = f1(d)
            u1 = ecdf_scores(n1, s1)
            mid = (s1 >= lo) & (s1 <= hi)
            out = np.where(s1 > hi, 2.0 + u1, u1)
            if mid.any():
                out[mid] = 1.0 + 0.5 * ecdf_scores(n2, f2(d)[mid])
            return out
        return score
    return fit


def stage2_share(raw: dict[str, np.ndarray]) -> float:
    """Share of all requests a :func:`cascade` sent to its second stage."""
    r = np.concatenate(list(raw.values()))
    return float(np.mean((r >= 1.0) & (r < 2.0)))


def length_debiased(base: Fitter) -> Fitter:
    """``base``'s score minus its least-squares slope (``probes.train.fit_length_slope``)
    on ``log n`` over the benign training rows, ``n`` = the request's in-scope tokens
    (:meth:`SourceData.in_scope_tokens`): ``s' = s − a·log(max(n, 1))``; for a linear
    ``base`` what ``mean_logit`` with ``length_slope: a`` serves at ``span_end``."""
    def fit(parts: Parts) -> Scorer:
        f = base(parts)
        s = np.concatenate([f(d)[i[d.labels[i] == 0]] for d, i in parts])
        n = np.concatenate([d.in_scope_tokens()[i[d.labels[i] == 0]] for d, i in parts])
        a = fit_length_slope(s, n)
        return lambda d: f(d) - a * log_tokens(d.in_scope_tokens())
    return fit
