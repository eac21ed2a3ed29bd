"""Synthetic-data tests for probes.train / calibrate / evaluate (fast, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from probes.calibrate import calibrate, policy_snippet, threshold_at_fpr
from probes.evaluate import auroc, evaluate_scores, roc_curve, tpr_at_fpr
from probes.train import (
    aggregate_requests,
    fit_diff_of_means,
    fit_logreg,
    running_aggregate,
)


def _blobs(n: int = 600, d: int = 16, sep: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    scale = rng.uniform(0.5, 5.0, size=d)  # unequal feature scales: standardisation matters
    x = (rng.normal(size=(n, d)) + sep * y[:, None] * direction) * scale + 3.0
    return x.astype(np.float32), y


@pytest.mark.parametrize("fit", [lambda x, y: fit_logreg(x, y, 3, C=1.0),
                                 lambda x, y: fit_diff_of_means(x, y, 3)])
def test_probes_separate_heldout_blobs(fit) -> None:
    x, y = _blobs(n=1200, seed=2)
    xt, yt = x[800:], y[800:]
    probe = fit(x[:800], y[:800])
    s = probe.scores(xt)
    assert s.dtype == np.float32 and ((s >= 0) & (s <= 1)).all()
    assert auroc(yt, s) > 0.85
    # served formula: sigmoid(((x - mean)/std) . w + b)
    z = ((xt - probe.mean) / probe.std) @ probe.weight + probe.bias
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-6)


def test_logreg_fails_on_random_labels() -> None:
    x, _ = _blobs(n=1200, seed=3)
    y = np.random.default_rng(4).integers(0, 2, 1200)
    probe = fit_logreg(x[:800], y[:800], 0, C=0.01)
    assert abs(auroc(y[800:], probe.scores(x[800:])) - 0.5) < 0.1


def test_auroc_and_tpr_known_values() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.95])
    assert auroc(y, s) == pytest.approx(7 / 8)
    assert auroc(y, -s) == pytest.approx(1 / 8)
    # 25% FPR allows one negative (0.9) above the threshold: t = just above 0.3
    assert tpr_at_fpr(y, s, 0.25) == 1.0
    # 0% FPR: t just above 0.9, only 0.95 passes
    assert tpr_at_fpr(y, s, 0.0) == 0.5
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    m = evaluate_scores(y, s, ["a", "a", "a", "a", "x", None], {"warn": 0.85})
    assert m["tpr@warn"] == 0.5 and m["fpr@warn"] == 0.25
    assert set(m["per_category"]) == {"x", "uncategorised"}


def test_tpr_at_fpr_is_scale_free() -> None:
    # logit-scale scores (most above 1): TPR@FPR is a ranking metric, so it must equal the
    # sigmoid's; a threshold clipped to [0, 1] put every logit above 1 over it (0.415 vs
    # 0.141 in session 14's REPORT, its mean-logit reference line)
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(900), np.ones(300)].astype(int)
    z = np.r_[rng.normal(0.0, 1.5, 900), rng.normal(2.5, 1.5, 300)]
    sig = 1 / (1 + np.exp(-z))
    for a in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(y, z, a) == tpr_at_fpr(y, sig, a)
        assert tpr_at_fpr(y, z - 10, a) == tpr_at_fpr(y, z, a)   # negative scores too
    t = threshold_at_fpr(z[y == 0], 0.01, clip=False)
    assert t > 1 and (z[y == 0] >= t).mean() <= 0.01
    assert threshold_at_fpr(z[y == 0], 0.01) == 1.0   # the served (probability) scale


def test_threshold_at_fpr_guarantees_rate() -> None:
    rng = np.random.default_rng(0)
    benign = rng.random(5000)
    for a in (0.01, 0.001, 0.05):
        t = threshold_at_fpr(benign, a)
        assert (benign >= t).mean() <= a
        # and it is the smallest such threshold: the next lower benign score would exceed
        below = benign[benign < t].max()
        assert (benign >= below).mean() > a
    cal = calibrate(benign, benign_set="b")
    assert cal["fpr_0.01"] < cal["fpr_0.001"] and cal["n_benign"] == 5000
    snip = policy_snippet({"d": {"scope": "prompt", "aggregation": {"kind": "ema",
                                                                    "half_life_tokens": 4.0},
                                 "min_tokens": 4, "thresholds": {"warn": 0.5,
                                                                 "critical": 0.9}}})
    from monitor.judge.policy import parse_policy

    pol = parse_policy(snip)
    assert pol.detectors["d"].aggregation.half_life_tokens == 4.0
    assert pol.detectors["d"].thresholds == (("warn", 0.5), ("critical", 0.9))


@pytest.mark.parametrize("agg", [{"kind": "max"}, {"kind": "mean"},
                                 {"kind": "ema", "half_life_tokens": 3.0},
                                 {"kind": "window_max", "window_tokens": 4}])
def test_running_aggregate_matches_the_per_token_definition(agg) -> None:
    s = np.random.default_rng(5).random(37)
    ref, a = [], 0.0
    for t, x in enumerate(s):
        if agg["kind"] == "max":
            a = max(a, x) if t else x
        elif agg["kind"] == "mean":
            a = float(np.mean(s[:t + 1]))
        elif agg["kind"] == "ema":
            alpha = 0.5 ** (1 / agg["half_life_tokens"])
            a = x if t == 0 else alpha * a + (1 - alpha) * x
        else:
            a = float(s[max(0, t - agg["window_tokens"] + 1):t + 1].max())
        ref.append(a)
    np.testing.assert_allclose(running_aggregate(s, agg), ref, rtol=1e-12)


def test_unknown_aggregation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="aggregation kind: expected one of"):
        running_aggregate(np.zeros(3), {"kind": "median"})
    with pytest.raises(ValueError, match="half_life_tokens: required for kind ema"):
        running_aggregate(np.zeros(3), {"kind": "ema"})


def test_request_statistic_respects_min_tokens_and_scope() -> None:
    # request 0: spike at token 1 only; request 1: sustained high scores; request 2: 2 tokens
    scores = np.array([0.1, 0.9, 0.1, 0.1, 0.1, 0.8, 0.8, 0.8, 0.8, 0.8, 0.99, 0.99])
    example = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    s = aggregate_requests(scores, example, 3, {"kind": "max"}, min_tokens=1)
    np.testing.assert_allclose(s, [0.9, 0.8, 0.99])
    s = aggregate_requests(scores, example, 3, {"kind": "max"}, min_tokens=3)
    np.testing.assert_allclose(s, [0.9, 0.8, 0.0])  # request 2 never reaches 3 tokens
    e = aggregate_requests(scores, example, 3, {"kind": "ema", "half_life_tokens": 1.0})
    assert e[1] > e[0]  # EMA smooths the one-token spike, keeps the sustained signal
    m = aggregate_requests(scores, example, 3, {"kind": "mean"}, min_tokens=5)
    assert m[0] == pytest.approx(max(np.cumsum(scores[:5])[4:] / 5))
    scope = np.array([False] * 5 + [True] * 7)
    assert aggregate_requests(scores, example, 3, {"kind": "max"}, 1, scope)[0] == 0.0


def test_span_end_statistic_is_what_the_tracker_judges() -> None:
    """The toolkit's request statistic under judge_at: span_end equals the aggregate the
    tracker judges: random roles, several user spans, random frame chunking; the highest
    judged aggregate crosses a threshold placed just below it (and one just above: not)."""
    from monitor.constants import RequestKey
    from monitor.judge.policy import parse_policy
    from monitor.judge.tracker import RequestTracker
    from monitor.roles import TokenRole as R

    rng = np.random.default_rng(2)
    for trial in range(40):
        n = int(rng.integers(2, 80))
        roles = rng.choice([R.SYSTEM, R.USER, R.USER, R.TEMPLATE], n).astype(np.int8)
        scores = rng.random(n).astype(np.float32)
        in_scope = roles == R.USER
        for agg, text in (({"kind": "mean"}, "mean"), ({"kind": "mean_logit"}, "mean_logit"),
                          ({"kind": "mean_logit", "length_slope": 0.6},
                           "{kind: mean_logit, length_slope: 0.6}")):
            s = float(aggregate_requests(scores, np.zeros(n, np.int64), 1, agg, 2,
                                         in_scope, "span_end")[0])
            every = aggregate_requests(scores, np.zeros(n, np.int64), 1, agg, 2,
                                       in_scope)[0]
            assert s <= every + 1e-12  # span ends are a subset of the prefixes
            if s == 0.0 or not 1e-6 < s < 1 - 1e-6:
                continue
            for thr, crosses in ((s - 1e-9, True), (min(s + 1e-9, 1 - 1e-9), False)):
                pol = parse_policy(f'version: "t"\ndetectors:\n  d:\n    scope: user\n'
                                   f"    aggregation: {text}\n    min_tokens: 2\n"
                                   f"    judge_at: span_end\n    thresholds: {{warn: {thr!r}}}\n")
                tr = RequestTracker(pol)
                key = RequestKey("c", str(trial))
                ups = []
                for sl in np.array_split(np.arange(n), int(rng.integers(1, 6))):
                    ups += tr.observe(key, "d", sl.astype(np.int64), np.zeros(sl.size, bool),
                                      scores[sl], roles[sl])
                ups += tr.finish(key)
                assert (ups[-1].severity == "warn") == crosses, (trial, agg, s)


def test_span_end_statistic_known_values() -> None:
    # one request: user 0.9 0.9 | template | user 0.1 0.1 0.1 0.1  -> judged after each span
    scores = np.array([0.9, 0.9, 0.5, 0.1, 0.1, 0.1, 0.1])
    scope = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    ex = np.zeros(7, np.int64)
    s = aggregate_requests(scores, ex, 1, {"kind": "mean"}, 1, scope, "span_end")
    assert s[0] == pytest.approx(0.9)  # first span end: mean 0.9; second: 2.2/6
    s = aggregate_requests(scores, ex, 1, {"kind": "mean"}, 3, scope, "span_end")
    assert s[0] == pytest.approx(2.2 / 6)  # min_tokens 3: the first span end is too early
    z = np.log(0.9 / 0.1)
    s = aggregate_requests(scores, ex, 1, {"kind": "mean_logit"}, 1, scope, "span_end")
    assert s[0] == pytest.approx(1 / (1 + np.exp(-z)))
    with pytest.raises(ValueError, match="judge_at"):
        aggregate_requests(scores, ex, 1, {"kind": "mean"}, 1, scope, "span_start")


def test_fit_length_slope_is_the_least_squares_slope_on_log_n():
    from probes.train import fit_length_slope

    rng = np.random.default_rng(0)
    n = rng.integers(1, 400, 200)
    s = 0.8 * np.log(n) - 1.0 + rng.normal(0, 0.3, n.size)
    ln = np.log(n)
    ref = np.sum((ln - ln.mean()) * (s - s.mean())) / np.sum((ln - ln.mean()) ** 2)
    assert fit_length_slope(s, n) == pytest.approx(ref, rel=1e-9)
    assert abs(fit_length_slope(s, n) - 0.8) < 0.1
    # a request without in-scope tokens counts as one token (log 1 = 0)
    assert fit_length_slope(np.array([0.0, 2.0]), np.array([0, np.e ** 2])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two distinct lengths"):
        fit_length_slope(np.array([1.0, 2.0]), np.array([5, 5]))
    with pytest.raises(ValueError, match="same length"):
        fit_length_slope(np.array([1.0, 2.0]), np.array([5]))


def test_policy_thresholds_are_rounded_up_never_down() -> None:
    from probes.calibrate import policy_threshold

    # the session-14 bundle's thresholds: .6g rounded every one of them DOWN, below the
    # calibration score each sits just above (nextafter), so that score alerted
    for t, want in ((0.8754973219913627, "0.875498"), (0.9838080826609837, "0.983809"),
                    (0.9934620853774545, "0.993463"), (0.9990580785465735, "0.999059"),
                    (0.5, "0.5"), (0.25, "0.25"), (0.0123456789, "0.0123457"),
                    (np.nextafter(0.7, 1.0), "0.700001"), (0.9, "0.9"), (0.0, "0")):
        assert policy_threshold(t) == want, t
        assert float(want) >= t
    rng = np.random.default_rng(4)
    for t in rng.random(2000):
        s = policy_threshold(float(t))
        assert float(s) >= t and float(s) - t < 1e-6 * max(t, 1e-300) * 10
    # a calibration set whose threshold rounds down: the written policy keeps the rate
    benign = np.r_[np.linspace(0.1, 0.8, 611), [0.8754973219913627, 0.9, 0.95, 0.99]]
    t = threshold_at_fpr(benign, 0.005)           # floor(0.005 * 615) = 3 above
    assert (benign >= t).sum() == 3
    snip = policy_snippet({"d": {"scope": "user", "aggregation": {"kind": "mean"},
                                 "min_tokens": 1, "thresholds": {"warn": t,
                                                                 "critical": 0.999}}})
    from monitor.judge.policy import parse_policy

    warn = dict(parse_policy(snip).detectors["d"].thresholds)["warn"]
    assert (benign >= warn).sum() == 3 and (benign >= float(f"{t:.6g}")).sum() == 4


def test_calibrate_records_rates_no_threshold_can_hold(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    # 6 of 200 benign statistics saturated at exactly 1.0 (a mean of float32 sigmoids):
    # no threshold in [0, 1] holds 1% or 0.1%; the clipped threshold alerts on 3%
    benign = np.r_[np.linspace(0.0, 0.9, 194), np.ones(6)]
    with caplog.at_level("WARNING", logger="probes.calibrate"):
        cal = calibrate(benign, benign_set="answers")
    assert cal["fpr_0.01"] == 1.0
    assert cal["unattainable"] == {"fpr_0.01": pytest.approx(0.03),
                                   "fpr_0.001": pytest.approx(0.03)}
    assert "saturate" in caplog.text and "answers" in caplog.text
    g = np.r_[np.zeros(100), np.ones(100)].astype(int)      # the six all in source 1
    assert calibrate(benign, groups=g, weighting="worst")["unattainable"]["fpr_0.01"] == \
        pytest.approx(0.06)
    assert "unattainable" not in calibrate(np.linspace(0, 0.99, 200))


def test_roc_curve_steps_ties_diagonally_whatever_the_order() -> None:
    y = np.array([1, 1, 0, 0])
    for s in (np.zeros(4), np.ones(4)):
        fpr, tpr = roc_curve(y, s)
        assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.9, 0.9, 0.5, 0.5, 0.1])
    fpr, tpr = roc_curve(y, s)
    assert fpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert tpr.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s))
