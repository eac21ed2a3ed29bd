"""probes/study.py: the leave-one-source-out-over-every-source study, against plain references."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.roles import TokenRole
from probes.collect import Activations
from probes.harmful import SourceData
from probes.sources import Source
from probes.study import ecdf_scores, readout_mask, study_table


def test_ecdf_scores_matches_a_plain_count() -> None:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=50)
    s = np.r_[rng.normal(size=20), cal[:5]]          # ties with calibration values included
    want = np.array([sum(c < v for c in cal) / cal.size for v in s])
    np.testing.assert_allclose(ecdf_scores(cal, s), want)
    with pytest.raises(ValueError, match="cal must not be empty"):
        ecdf_scores(np.zeros(0), s)


def test_readout_masks_match_a_plain_loop() -> None:
    U, T, S, G = (int(r) for r in (TokenRole.USER, TokenRole.TEMPLATE, TokenRole.SYSTEM,
                                   TokenRole.GENERATED))
    # example 0: T S T U U T T | G G ; example 1: T T (no user) ; example 2: U T U T
    roles = np.array([T, S, T, U, U, T, T, G, G, T, T, U, T, U, T])
    example = np.array([0] * 9 + [1] * 2 + [2] * 4)
    generated = roles == G
    assert readout_mask(roles, example, "user").tolist() == (roles == U).tolist()
    assert readout_mask(roles, example, "prompt").tolist() == (~generated).tolist()
    post = readout_mask(roles, example, "post")
    want = []
    for i in range(roles.size):
        ex = example[i]
        users = [j for j in range(roles.size) if example[j] == ex and roles[j] == U]
        want.append(bool(users) and i > max(users) and not generated[i])
    assert post.tolist() == want
    with pytest.raises(ValueError, match="readout"):
        readout_mask(roles, example, "last")


def _source(name: str, kind: str, n: int, shift: float, rng: np.random.Generator,
            d: int = 8) -> SourceData:
    """``n`` one-row examples whose feature 0 is shifted by ``shift`` (harmful: +5)."""
    x = rng.normal(size=(n, d)).astype(np.float16)
    x[:, 0] += shift
    label = 1 if kind == "harmful" else 0
    acts = Activations((15,), {15: x}, np.arange(n), np.zeros(n, np.int64), np.zeros(n, bool),
                       np.zeros(n, np.int64), np.zeros(n, np.int64),
                       np.full(n, label, np.int8), n)
    return SourceData(Source(name, kind, "train", "project", f"{name}.jsonl"),
                      [None] * n, acts, np.ones(n, bool))  # type: ignore[list-item]


def test_study_separable_sources_and_an_unseen_style() -> None:
    rng = np.random.default_rng(1)
    data = [_source("h1", "harmful", 120, 5.0, rng), _source("h2", "harmful", 120, 5.0, rng),
            _source("oasst", "benign", 200, 0.0, rng), _source("alpaca", "benign", 200, 0.0, rng),
            _source("scary", "scary", 200, 0.0, rng)]
    row = study_table(data, "user", 15, 1.0)
    assert row.auroc_ordinary > 0.97 and row.tpr_warn > 0.8
    assert row.per_source["oasst"][1] == 200 and row.per_source["h1"][0] == "harmful"
    # a benign style that looks harmful on the probe's direction is caught only when unseen
    data.append(_source("lookalike", "scary", 150, 5.0, rng))
    row2 = study_table(data, "user", 15, 1.0)
    assert row2.per_source["lookalike"][2] > 0.5
    assert row2.fpr_warn_ordinary < 0.1
