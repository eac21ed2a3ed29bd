"""How much of a probe's measured quality is the style of its sources (``study-split``).

The same requests and the same fitter (the shipped recipe, :func:`probes.study.recipe_fitter`)
under two protocols, plus a probe of style itself:

- **random split** (:func:`random_split_scores`): ``K`` folds over requests, drawn within
  each source (every source in every fold, ``⌊n/K⌋`` or ``⌈n/K⌉`` of its requests per
  fold). Fold ``k``'s detector is fit on every other fold's requests of every source and
  scores fold ``k``; each request is scored once, by a fit that never saw it. The ``K``
  fits see the same distribution, so their raw request scores are pooled as they are
  (what ``sklearn``'s ``cross_val_predict`` reports). This is the usual "held-out test
  split" of one dataset.
- **leave one source out** (:func:`probes.study.loso_scores`): each source scored by a
  detector fit without it, pooled through each fold's calibration CDF ``u``; the protocol
  of every other table in docs/PROBES.md.
- **source identity** (:func:`source_identity_accuracy`): a multinomial logistic
  regression (standardised features, ``C`` = :data:`IDENTITY_C`) predicting each
  request's SOURCE from its pooled user-token features, ``K``-fold accuracy against
  chance (the largest source's share).

When the random split scores far above leave-one-source-out and the source can be read
off the features, a random split mostly measures how well the probe tells the training
sources' styles apart, not the intent behind them: the reason docs/PROBES.md chooses and
reports on whole held-out sources. Nothing here is served or chosen.

Thread rules: none (single-threaded numpy / sklearn on arrays it owns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probes.evaluate import auroc, auroc_ci
from probes.pooled import Fitter, SourceData

__all__ = ["IDENTITY_C", "SplitRow", "random_split_folds", "random_split_scores",
           "source_identity_accuracy", "split_markdown", "split_rows"]

IDENTITY_C = 0.01
"""Inverse L2 strength of the source-identity classifier (the order of the recipe's C
on standardised features, so it reads what a strongly regularised probe can read)."""


def random_split_folds(data: Sequence[SourceData], k: int, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """Per source, each request's fold in ``0..k-1`` (int64 ``[n_examples]``): a seeded
    permutation of ``arange(n) % k``, so every fold holds ``⌊n/k⌋`` or ``⌈n/k⌉`` of the
    source's requests."""
    if k < 2:
        raise ValueError(f"k: expected at least 2 folds; found {k}")
    out = {}
    for i, d in enumerate(data):
        n = len(d.examples)
        if n < k:
            raise ValueError(f"random_split_folds: source {d.name!r}: expected at least "
                             f"{k} requests (one per fold); found {n}")
        rng = np.random.default_rng(seed + 7919 * i)
        out[d.name] = rng.permutation(np.arange(n) % k).astype(np.int64)
    return out


def random_split_scores(data: Sequence[SourceData], fit: Fitter, k: int = 5, seed: int = 0
                        ) -> dict[str, np.ndarray]:
    """Per source, every request's score (float64 ``[n_examples]``) from the fold's
    detector that did not see it (module doc, random split)."""
    folds = random_split_folds(data, k, seed)
    out = {d.name: np.full(len(d.examples), np.nan) for d in data}
    for j in range(k):
        score = fit([(d, np.flatnonzero(folds[d.name] != j)) for d in data])
        for d in data:
            held = folds[d.name] == j
            out[d.name][held] = np.asarray(score(d), dtype=np.float64)[held]
    return out


def source_identity_accuracy(data: Sequence[SourceData], layer: int, k: int = 5,
                             seed: int = 0) -> tuple[float, float]:
    """(``K``-fold accuracy of predicting each request's source from its pooled
    ``layer`` features, chance = the largest source's share of the requests)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([d.features(layer) for d in data]).astype(np.float64)
    g = np.concatenate([np.full(len(d.examples), i) for i, d in enumerate(data)])
    folds = np.concatenate(list(random_split_folds(data, k, seed).values()))
    hit = np.zeros(g.size, dtype=bool)
    for j in range(k):
        tr = folds != j
        sc = StandardScaler().fit(x[tr])
        m = LogisticRegression(C=IDENTITY_C, max_iter=2000).fit(sc.transform(x[tr]), g[tr])
        hit[~tr] = m.predict(sc.transform(x[~tr])) == g[~tr]
    return float(hit.mean()), float(np.bincount(g).max() / g.size)


@dataclass(frozen=True)
class SplitRow:
    """One protocol's pooled AUROCs (harmful requests against the benign ones)."""

    protocol: str
    auroc_all: float
    ci_all: tuple[float, float]
    auroc_ordinary: float
    ci_ordinary: tuple[float, float]
    n_harmful: int
    n_benign: int
    n_ordinary: int


def _row(protocol: str, scores: dict[str, np.ndarray], data: Sequence[SourceData],
         ordinary: frozenset[str]) -> SplitRow:
    kind = {d.name: d.source.kind for d in data}
    pos = np.concatenate([s for n, s in scores.items() if kind[n] == "harmful"])
    neg = np.concatenate([s for n, s in scores.items() if kind[n] != "harmful"])
    ordn = np.concatenate([s for n, s in scores.items() if n in ordinary]
                          or [np.zeros(0)])

    def au(n: np.ndarray) -> tuple[float, tuple[float, float]]:
        y = np.r_[np.ones(pos.size), np.zeros(n.size)]
        s = np.r_[pos, n]
        return auroc(y, s), auroc_ci(y, s)

    a_all, c_all = au(neg)
    a_ord, c_ord = au(ordn)
    return SplitRow(protocol, a_all, c_all, a_ord, c_ord, int(pos.size), int(neg.size),
                    int(ordn.size))


def split_rows(data: Sequence[SourceData], fit: Fitter, ordinary: frozenset[str],
               k: int = 5, seed: int = 0) -> list[SplitRow]:
    """The random split and leave-one-source-out rows for the same requests and fitter."""
    from probes.study import loso_scores

    u, _ = loso_scores(data, fit, seed)
    return [_row(f"random split, {k} folds within every source", random_split_scores(
                data, fit, k, seed), data, ordinary),
            _row("leave one source out (each source scored by a fit without it)", u, data,
                 ordinary)]


def split_markdown(rows: Sequence[SplitRow], identity: tuple[float, float], n_sources: int,
                   layer: int, k: int) -> str:
    """The study's table and its source-identity line (``identity``:
    :func:`source_identity_accuracy` over ``k`` folds)."""
    def ci(c: tuple[float, float]) -> str:
        return f"[{c[0]:.3f}, {c[1]:.3f}]"

    lines = ["| protocol (same requests, same fitter) | AUROC vs all benign [95% CI] | "
             "AUROC vs ordinary chat [95% CI] | n harmful / benign / ordinary |",
             "|---|---|---|---|"]
    lines += [f"| {r.protocol} | {r.auroc_all:.3f} {ci(r.ci_all)} | {r.auroc_ordinary:.3f} "
              f"{ci(r.ci_ordinary)} | {r.n_harmful} / {r.n_benign} / {r.n_ordinary} |"
              for r in rows]
    acc, chance = identity
    lines += ["", f"Source identity: a linear classifier reads each request's source (one "
              f"of {n_sources}) off its layer-{layer} user-token mean with accuracy "
              f"**{acc:.3f}** ({k}-fold; chance, the largest source's share: {chance:.3f})."]
    return "\n".join(lines) + "\n"
