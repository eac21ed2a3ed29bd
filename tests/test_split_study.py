"""probes.split_study: random split vs leave one source out (plain references)."""

from __future__ import annotations

import numpy as np
import pytest

from probes import pooled, split_study
from probes.collect import Activations
from probes.pooled import SourceData
from probes.sources import Source


def _source(name: str, kind: str, n: int, rng: np.random.Generator, style: int,
            signal: float, d: int = 12) -> SourceData:
    """``n`` one-row requests: feature 0 carries the label (harmful +``signal``), feature
    ``style`` (1..d-1) is the source's own style (+4), shared by none of the others."""
    x = rng.normal(size=(n, d))
    label = 1 if kind == "harmful" else 0
    x[:, 0] += signal * label
    if style:
        x[:, style] += 4.0
    acts = Activations((15,), {15: x.astype(np.float16)}, np.arange(n), np.zeros(n, np.int64),
                       np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64),
                       np.full(n, label, np.int8), n)
    return SourceData(Source(name, kind, "train", "project", f"{name}.jsonl"),
                      [None] * n, acts, np.ones(n, bool))  # type: ignore[list-item]


def _world(rng: np.random.Generator, styled: bool, signal: float) -> list[SourceData]:
    names = [("h1", "harmful"), ("h2", "harmful"), ("h3", "harmful"),
             ("alpaca", "benign"), ("oasst", "benign"), ("scary", "scary")]
    return [_source(n, k, 150, rng, i + 1 if styled else 0, signal)
            for i, (n, k) in enumerate(names)]


def test_folds_partition_every_source_evenly() -> None:
    rng = np.random.default_rng(0)
    data = _world(rng, False, 1.0)
    data[0] = _source("h1", "harmful", 23, rng, 0, 1.0)
    folds = split_study.random_split_folds(data, 5, seed=3)
    for d in data:
        f = folds[d.name]
        assert f.shape == (len(d.examples),) and set(f.tolist()) == set(range(5))
        counts = np.bincount(f, minlength=5)
        assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="at least 5 requests"):
        split_study.random_split_folds([_source("t", "benign", 4, rng, 0, 0.0)], 5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        split_study.random_split_folds(data, 1)


def test_every_request_is_scored_by_a_fit_that_never_saw_it() -> None:
    rng = np.random.default_rng(1)
    data = _world(rng, False, 1.0)
    seen: list[dict[str, set[int]]] = []

    def recording(parts: pooled.Parts) -> pooled.Scorer:
        rows = {d.name: {int(i) for i in idx} for d, idx in parts}
        seen.append(rows)
        fold = len(seen) - 1
        # score = the fold index, so the output says which fit scored each request
        return lambda d: np.full(len(d.examples), float(fold))

    s = split_study.random_split_scores(data, recording, k=4, seed=2)
    folds = split_study.random_split_folds(data, 4, seed=2)
    assert len(seen) == 4
    for d in data:
        assert not np.isnan(s[d.name]).any()
        for i, j in enumerate(s[d.name].astype(int)):
            assert j == folds[d.name][i]          # scored by the fit of its own fold
            assert i not in seen[j][d.name]       # which never trained on it
            assert all(i in seen[o][d.name] for o in range(4) if o != j)


def test_source_styles_inflate_a_random_split_not_leave_one_source_out() -> None:
    fit = pooled.linear(15, 1.0)
    ordinary = frozenset({"alpaca", "oasst"})
    # every source its own style, a weak shared label signal: a random split rewards
    # reading the style (each source is one class), leaving a source out does not
    styled = _world(np.random.default_rng(2), True, 0.6)
    r_split, r_loso = split_study.split_rows(styled, fit, ordinary, k=5)
    assert r_split.auroc_all > 0.97
    assert r_split.auroc_all - r_loso.auroc_all > 0.15
    assert r_split.n_harmful == 450 and r_split.n_benign == 450 and r_split.n_ordinary == 300
    acc, chance = split_study.source_identity_accuracy(styled, 15, 5)
    assert acc > 0.9 and chance == pytest.approx(1 / 6)
    # the control: no source styles, the same label signal: the protocols agree
    plain = _world(np.random.default_rng(3), False, 2.0)
    p_split, p_loso = split_study.split_rows(plain, fit, ordinary, k=5)
    assert abs(p_split.auroc_all - p_loso.auroc_all) < 0.03
    acc0, _ = split_study.source_identity_accuracy(plain, 15, 5)
    assert acc0 < 0.45   # harmful vs benign is readable (2 classes of sources), no more
    md = split_study.split_markdown([r_split, r_loso], (acc, chance), 6, 15, 5)
    assert "random split" in md and f"{acc:.3f}" in md and md.count("\n|") == 3
    assert "(5-fold;" in md
    assert "(3-fold;" in split_study.split_markdown([r_split], (acc, chance), 6, 15, 3)
