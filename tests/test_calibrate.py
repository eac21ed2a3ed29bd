"""probes/calibrate.py: thresholds under each calibration weighting, against plain references
(exact rational arithmetic, hand-computed examples, ties, the one-source case)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from probes.calibrate import (
    RATE_TOL,
    calibrate,
    calibration_weights,
    ecdf_scores,
    kish_n,
    threshold_at_fpr,
)

NEXT = np.nextafter


def _old_row_rule(benign: np.ndarray, fpr: float) -> float:
    """The pre-weighting implementation (sessions 1-7): just above the
    (⌊α n⌋ + 1)-th largest score."""
    s = np.sort(np.asarray(benign, dtype=np.float64))[::-1]
    k = int(np.floor(fpr * s.size + 1e-9))
    t = float(np.nextafter(s[k], np.inf)) if k < s.size else float(s[-1])
    return float(min(max(t, 0.0), 1.0))


def _plain(benign: np.ndarray, groups: np.ndarray, fpr: float, weighting: str) -> float:
    """The module rule by brute force in exact fractions: among the candidate thresholds
    (every score and the float just above it), the smallest whose weighted rate is
    ≤ α (``worst``: every source's own rate ≤ α)."""
    s = [float(v) for v in benign]
    g = [str(x) for x in groups]
    names = sorted(set(g))
    n_g = {k: g.count(k) for k in names}
    a = Fraction(fpr)
    cands = sorted({*s, *(float(NEXT(v, np.inf)) for v in s)})
    for t in cands:
        if weighting == "row":
            ok = Fraction(sum(v >= t for v in s), len(s)) <= a
        elif weighting == "source":
            ok = sum(Fraction(sum(v >= t for v, h in zip(s, g, strict=True) if h == k),
                              len(names) * n_g[k]) for k in names) <= a
        else:
            ok = all(Fraction(sum(v >= t for v, h in zip(s, g, strict=True) if h == k),
                              n_g[k]) <= a for k in names)
        if ok:
            return min(max(t, 0.0), 1.0)
    raise AssertionError("no candidate threshold")  # pragma: no cover


def test_row_weighting_is_the_old_rule_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for n in [1, 2, 5, 99, 100, 101, 518, 999, 1000, 1629, 3001]:
        s = rng.random(n)
        s[: n // 3] = np.round(s[: n // 3], 2)         # ties
        for a in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3):
            assert threshold_at_fpr(s, a) == _old_row_rule(s, a), (n, a)
            assert threshold_at_fpr(s, a, np.zeros(n), "row") == _old_row_rule(s, a)


def test_hand_computed_source_and_worst() -> None:
    # A: 8 low rows, B: 2 high rows. α = 0.2.
    a = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    b = [0.9, 0.95]
    s, g = np.array(a + b), np.array(["A"] * 8 + ["B"] * 2)
    # row: ⌊0.2·10⌋ = 2 rows may lie above -> just above the 3rd largest (0.8)
    assert threshold_at_fpr(s, 0.2, g, "row") == NEXT(0.8, 1)
    # source: B's rows weigh 1/4 each, A's 1/16: even B's top row alone (0.25) > 0.2
    assert threshold_at_fpr(s, 0.2, g, "source") == NEXT(0.95, 1)
    # worst: A alone allows ⌊1.6⌋ = 1 row (t = 0.7+), B allows none (0.95+): the max
    assert threshold_at_fpr(s, 0.2, g, "worst") == NEXT(0.95, 1)
    # at α = 0.3 source admits B's top row (0.25 ≤ 0.3) but not also A's 0.8 (0.3125)
    assert threshold_at_fpr(s, 0.3, g, "source") == NEXT(0.9, 1)
    # equal source sizes: source == row; worst is stricter
    s2, g2 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]), np.array(["A"] * 4 + ["B"] * 4)
    assert threshold_at_fpr(s2, 0.25, g2, "source") == threshold_at_fpr(s2, 0.25) \
        == NEXT(0.6, 1)
    assert threshold_at_fpr(s2, 0.25, g2, "worst") == NEXT(0.7, 1)  # B's own 25%


def test_ties_are_never_split_and_a_rate_equal_to_alpha_is_allowed() -> None:
    s = np.array([0.5, 0.5, 0.5, 0.1, 0.2, 0.3])
    g = np.array(["A", "A", "A", "A", "B", "B"])   # A rows 1/8, B rows 1/4
    # the three tied 0.5 weigh 3/8 together: at α = 0.25 they must all fall below t
    assert threshold_at_fpr(s, 0.25, g, "source") == NEXT(0.5, 1)
    # at α = 3/8 exactly they may all lie above; B's 0.3 would add 1/4
    assert threshold_at_fpr(s, 0.375, g, "source") == NEXT(0.3, 1)
    # a rate that is α only up to float rounding still counts as α: 3 sources of 100
    # rows with one row above each: mean rate 0.01 (1/300 summed 3 times in floats)
    rng = np.random.default_rng(1)
    s3 = np.concatenate([np.r_[rng.uniform(0, 0.5, 99), 0.9 + 0.01 * i] for i in range(3)])
    g3 = np.repeat(["x", "y", "z"], 100)
    low = s3[s3 < 0.9].max()
    assert threshold_at_fpr(s3, 0.01, g3, "source") == NEXT(low, 1)   # all 3 above
    assert threshold_at_fpr(s3, 0.0099, g3, "source") == NEXT(0.9, 1)  # 2 above
    w = calibration_weights(s3.size, g3, "source")
    assert abs(w[s3 >= 0.9].sum() - 0.01) < RATE_TOL


def _sources(rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    """Source labels of 1-4 sources with ``lo..hi-1`` rows each."""
    sizes = rng.integers(lo, hi, size=int(rng.integers(1, 5)))
    return np.concatenate([np.full(k, f"s{i}") for i, k in enumerate(sizes)])


@pytest.mark.parametrize("weighting", ["row", "source", "worst"])
def test_every_weighting_matches_the_exact_plain_rule(weighting: str) -> None:
    rng = np.random.default_rng(2)
    for trial in range(30):
        g = _sources(rng, 1, 40)
        s = rng.beta(1 + np.unique(g, return_inverse=True)[1], 3)  # levels differ by source
        s[rng.random(s.size) < 0.3] = 0.5                  # many ties
        for a in (0.0, 0.01, 0.05, 0.1, 0.25):
            assert threshold_at_fpr(s, a, g, weighting) == _plain(s, g, a, weighting), \
                (trial, a)


def test_one_source_every_weighting_is_row() -> None:
    s = np.random.default_rng(3).random(257)
    for a in (0.001, 0.01, 0.1):
        want = threshold_at_fpr(s, a)
        for w in ("source", "worst"):
            assert threshold_at_fpr(s, a, np.full(s.size, "only"), w) == want
            assert threshold_at_fpr(s, a, None, w) == want


@pytest.mark.parametrize("weighting", ["row", "source", "worst"])
def test_the_study_scale_agrees_with_the_threshold(weighting: str) -> None:
    """``u ≥ 1 − α − RATE_TOL`` ⇔ ``s ≥ t`` (the study's warn flag is the threshold's)."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        g = _sources(rng, 5, 120)
        cal = np.round(rng.random(g.size) * 0.9, 2)      # ties; below 1 (no clip)
        s = np.r_[np.round(rng.random(300) * 0.9, 2), cal]
        for a in (0.01, 0.05, 0.2):
            t = threshold_at_fpr(cal, a, g, weighting)
            u = ecdf_scores(cal, s, g, weighting)
            assert ((u >= 1 - a - RATE_TOL) == (s >= t)).all()
    # the plain definitions of u
    cal, g = np.array([0.1, 0.2, 0.3, 0.4, 0.5]), np.array(["a", "a", "a", "b", "b"])
    s = np.array([0.0, 0.25, 0.45, 0.6])
    fa = np.array([0, 2 / 3, 1, 1])
    fb = np.array([0, 0, 0.5, 1])
    want = {"row": np.array([0, 2, 4, 5]) / 5, "source": (fa + fb) / 2,
            "worst": np.minimum(fa, fb)}[weighting]
    np.testing.assert_allclose(ecdf_scores(cal, s, g, weighting), want)


def test_weights_kish_n_and_the_recorded_calibration_block() -> None:
    g = np.array(["a"] * 6 + ["b"] * 2 + ["c"] * 4)
    w = calibration_weights(g.size, g, "source")
    np.testing.assert_allclose(w, [1 / 18] * 6 + [1 / 6] * 2 + [1 / 12] * 4)
    assert w.sum() == pytest.approx(1.0)
    assert kish_n(calibration_weights(12, g, "row")) == pytest.approx(12.0)
    assert kish_n(w) == pytest.approx(9 / (1 / 6 + 1 / 2 + 1 / 4))  # G² / Σ 1/n_g
    s = np.linspace(0.0, 0.9, 12)
    cal = calibrate(s, benign_set="x", groups=g, weighting="source")
    assert cal["weighting"] == "source" and cal["n_benign"] == 12
    assert cal["n_per_source"] == {"a": 6, "b": 2, "c": 4}
    assert cal["n_eff"] == round(9 / (1 / 6 + 1 / 2 + 1 / 4), 1)
    assert cal["fpr_0.01"] == threshold_at_fpr(s, 0.01, g, "source")
    assert "same total weight" in cal["weighting_rule"]
    worst = calibrate(s, groups=g, weighting="worst")
    assert worst["n_eff"] == 2 and worst["binding_source"]["fpr_0.01"] == "c"  # top rows
    row = calibrate(s)
    assert row["weighting"] == "row" and row["n_eff"] == 12.0 and "n_per_source" not in row


def test_refusals_name_what_was_expected() -> None:
    s = np.array([0.1, 0.2])
    with pytest.raises(ValueError, match=r"expected one of .*row.*found 'rows'"):
        threshold_at_fpr(s, 0.01, None, "rows")
    with pytest.raises(ValueError, match=r"one source label per score \(2\); found shape"):
        threshold_at_fpr(s, 0.01, np.array(["a"]), "source")
    with pytest.raises(ValueError, match="no benign scores"):
        threshold_at_fpr(np.zeros(0), 0.01, None, "source")
    with pytest.raises(ValueError, match="fpr must be in"):
        threshold_at_fpr(s, 1.0)
