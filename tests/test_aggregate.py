"""Streaming aggregators vs a naive per-token Python reference, over random chunkings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor.judge.aggregate import (
    EmaAggregator,
    MaxAggregator,
    MeanAggregator,
    WindowMaxAggregator,
    make_aggregator,
    span_end_rows,
)
from monitor.judge.policy import Aggregation


def naive(kind: str, scores: list[float], param: float | int | None = None) -> list[float]:
    # param: ema half-life, window_max N, mean_logit length_slope (a)
    """Per-token definitions, written as plainly as possible."""
    out: list[float] = []
    state = None
    total = 0.0
    for t, s in enumerate(scores):
        if kind == "max":
            state = s if state is None else max(state, s)
        elif kind == "mean":
            total += s
            state = total / (t + 1)
        elif kind == "mean_logit":
            q = min(max(s, 1e-6), 1 - 1e-6)
            total += math.log(q) - math.log(1 - q)
            state = 1 / (1 + math.exp(-(total / (t + 1) - (param or 0.0) * math.log(t + 1))))
        elif kind == "ema":
            assert param is not None, "ema needs a half-life"
            alpha = 0.5 ** (1.0 / param)
            state = s if state is None else alpha * state + (1 - alpha) * s
        elif kind == "window_max":
            assert param is not None, "window_max needs N"
            state = max(scores[max(0, t - int(param) + 1) : t + 1])
        elif kind == "window_mean_logit":
            assert param is not None, "window_mean_logit needs N"
            win = [min(max(v, 1e-6), 1 - 1e-6) for v in scores[max(0, t - int(param) + 1) : t + 1]]
            mean = sum(math.log(q) - math.log(1 - q) for q in win) / len(win)
            state = 1 / (1 + math.exp(-mean))
        assert state is not None, f"unknown kind {kind!r}"
        out.append(state)
    return out


def random_chunks(rng: np.random.Generator, x: np.ndarray) -> list[np.ndarray]:
    """Split x at random cut points, with empty and one-token chunks among them."""
    n_cuts = int(rng.integers(0, 30))
    cuts = np.sort(rng.integers(0, x.size + 1, n_cuts))
    return np.split(x, cuts)


CASES = [
    Aggregation("max"),
    Aggregation("mean"),
    Aggregation("mean_logit"),
    Aggregation("mean_logit", length_slope=0.42),
    Aggregation("mean_logit", length_slope=-1.5),
    Aggregation("ema", half_life_tokens=0.5),
    Aggregation("ema", half_life_tokens=1.0),
    Aggregation("ema", half_life_tokens=7.3),
    Aggregation("ema", half_life_tokens=300.0),
    Aggregation("window_max", window_tokens=1),
    Aggregation("window_max", window_tokens=2),
    Aggregation("window_max", window_tokens=5),
    Aggregation("window_max", window_tokens=64),
    Aggregation("window_max", window_tokens=1000),
    Aggregation("window_mean_logit", window_tokens=1),
    Aggregation("window_mean_logit", window_tokens=2),
    Aggregation("window_mean_logit", window_tokens=8),
    Aggregation("window_mean_logit", window_tokens=64),
    Aggregation("window_mean_logit", window_tokens=1024),
]


@pytest.mark.parametrize("agg", CASES, ids=lambda a: a.describe())
@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_reference_under_any_chunking(agg, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 700))
    # float32 scores like the scorer's, with plateaus and spikes
    x = rng.random(n).astype(np.float32)
    x[rng.random(n) < 0.05] = 1.0
    param = {"ema": agg.half_life_tokens, "window_max": agg.window_tokens,
             "window_mean_logit": agg.window_tokens,
             "mean_logit": agg.length_slope}.get(agg.kind)
    ref = np.array(naive(agg.kind, [float(v) for v in x], param))

    results = []
    for _ in range(3):  # several chunkings of the same stream
        a = make_aggregator(agg)
        outs = []
        for chunk in random_chunks(rng, x):
            got = a.update(chunk)
            assert got.dtype == np.float64 and got.shape == chunk.shape
            outs.append(got)
        full = np.concatenate(outs)
        # mean_logit: log1p vs log(1 - q) and the exp differ in the last bits
        tol = 1e-9 if "mean_logit" in agg.kind else 1e-12
        np.testing.assert_allclose(full, ref, rtol=tol, atol=0)
        assert a.n == n
        assert a.value == pytest.approx(ref[-1], rel=tol)
        results.append(full)
    # chunking does not change a bit
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    one = make_aggregator(agg).update(x)
    assert np.array_equal(one, results[0])


@pytest.mark.parametrize("agg", CASES, ids=lambda a: a.describe())
def test_push_matches_update_bit_for_bit(agg):
    rng = np.random.default_rng(3)
    x = rng.random(400).astype(np.float32)
    ref = make_aggregator(agg).update(x)
    a = make_aggregator(agg)
    got = []
    i = 0
    while i < x.size:  # interleave single pushes with chunks
        if rng.random() < 0.6:
            got.append(a.push(float(x[i])))
            i += 1
        else:
            k = int(rng.integers(1, 20))
            got.extend(a.update(x[i : i + k]).tolist())
            i += k
    assert np.array_equal(np.array(got), ref)
    assert a.n == x.size and a.value == ref[-1]


def test_max_mean_known_values():
    m = MaxAggregator()
    assert m.value == 0.0
    assert m.update(np.array([0.2, 0.1, 0.5])).tolist() == [0.2, 0.2, 0.5]
    assert m.update(np.array([0.3])).tolist() == [0.5]
    mean = MeanAggregator()
    np.testing.assert_allclose(mean.update(np.array([1.0, 0.0])), [1.0, 0.5])
    np.testing.assert_allclose(mean.update(np.array([0.5, 0.5])), [0.5, 0.5])


def test_ema_half_life_semantics():
    # After a step from 0 to 1, the EMA closes half the gap every half-life.
    h = 8.0
    e = EmaAggregator(h)
    e.update(np.zeros(1))
    out = e.update(np.ones(32))
    assert out[7] == pytest.approx(0.5, rel=1e-12)  # 8 tokens of 1.0
    assert out[15] == pytest.approx(0.75, rel=1e-12)
    assert e.alpha == pytest.approx(0.5 ** (1 / h))
    first = EmaAggregator(3.0)
    assert first.update(np.array([0.7], dtype=np.float32))[0] == float(np.float32(0.7))


def test_window_max_forgets_after_window():
    w = WindowMaxAggregator(3)
    out = w.update(np.array([0.9, 0.1, 0.1, 0.1, 0.2]))
    assert out.tolist() == [0.9, 0.9, 0.9, 0.1, 0.2]
    out = w.update(np.array([0.05]))
    assert out.tolist() == [0.2]
    assert w.value == 0.2


def test_empty_chunks_and_bad_input():
    for agg in CASES:
        a = make_aggregator(agg)
        assert a.update(np.empty(0)).size == 0
        assert a.n == 0 and a.value == 0.0
        with pytest.raises(ValueError):
            a.update(np.zeros((2, 2)))
    with pytest.raises(ValueError):
        EmaAggregator(0.0)
    with pytest.raises(ValueError):
        WindowMaxAggregator(0)


def test_long_stream_mean_is_accurate():
    # 200k tokens in chunks: running mean stays accurate (sequential float64 sums).
    rng = np.random.default_rng(1)
    x = rng.random(200_000)
    a = MeanAggregator()
    for chunk in np.array_split(x, 977):
        last = a.update(chunk)
    assert math.isclose(last[-1], float(np.mean(x)), rel_tol=1e-12)


def test_mean_logit_is_sigmoid_of_mean_logit_and_clips():
    z = np.array([-3.0, 0.5, 2.0, 7.0])
    p = 1 / (1 + np.exp(-z))
    got = make_aggregator(Aggregation("mean_logit")).update(p)
    want = 1 / (1 + np.exp(-np.cumsum(z) / np.arange(1, 5)))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # scores of exactly 0 and 1 (float32 saturation) stay finite: logit clipped to ±13.8
    a = make_aggregator(Aggregation("mean_logit"))
    out = a.update(np.array([1.0, 1.0, 0.0], dtype=np.float32))
    assert np.all(np.isfinite(out))
    edge = math.log((1 - 1e-6) / 1e-6)
    assert out[0] == pytest.approx(1 / (1 + math.exp(-edge)), rel=1e-9)
    assert out[2] == pytest.approx(1 / (1 + math.exp(-edge / 3)), rel=1e-6)
    assert a.push(float("nan")) != a.push(0.5)  # NaN propagates, as for mean


def test_length_slope_zero_is_the_plain_mean_logit_bit_for_bit():
    rng = np.random.default_rng(5)
    x = rng.random(300).astype(np.float32)
    plain = make_aggregator(Aggregation("mean_logit")).update(x)
    assert Aggregation("mean_logit") == Aggregation("mean_logit", length_slope=0.0)
    assert np.array_equal(make_aggregator(Aggregation("mean_logit", length_slope=0.0))
                          .update(x), plain)
    # a > 0 lowers every a_t with t > 1 by exactly a·ln t in logit space (t = 1: ln 1 = 0)
    a = 0.37
    deb = make_aggregator(Aggregation("mean_logit", length_slope=a)).update(x)
    logit = np.log(deb) - np.log1p(-deb)
    plain_logit = np.log(plain) - np.log1p(-plain)
    np.testing.assert_allclose(plain_logit - logit, a * np.log(np.arange(1, 301)), atol=1e-7)
    assert deb[0] == plain[0] and np.all(deb[1:] < plain[1:])


def test_length_slope_params_describe_and_refusals():
    agg = Aggregation("mean_logit", length_slope=0.25)
    assert agg.describe() == "mean_logit(a=0.25)" and agg.params() == {"length_slope": 0.25}
    assert Aggregation("mean_logit").describe() == "mean_logit"
    assert Aggregation("mean_logit").params() == {}  # the default is left out
    with pytest.raises(ValueError, match="length_slope: expected a finite number; found nan"):
        Aggregation("mean_logit", length_slope=float("nan"))
    with pytest.raises(ValueError, match="length_slope: only applies to kind mean_logit"):
        Aggregation("mean", length_slope=0.1)


def test_span_end_rows_definition():
    m = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=bool)
    assert span_end_rows(m).tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 1]
    assert span_end_rows(m, complete=False).tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 0]
    assert span_end_rows(np.zeros(0, bool)).size == 0


def test_window_mean_logit_reads_the_last_n_logits_only():
    lo, hi = 1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-2.0))   # logits -2 and +2
    w = make_aggregator(Aggregation("window_mean_logit", window_tokens=4))
    out = w.update(np.array([lo] * 10 + [hi] * 4 + [lo] * 4))
    # a hot stretch of N tokens after 10 cold ones: the window reads it whole (logit +2)
    # while a mean over the request would read (−20 + 8) / 14
    assert out[13] == pytest.approx(hi, rel=1e-9)
    assert out[9] == pytest.approx(lo, rel=1e-9) and out[17] == pytest.approx(lo, rel=1e-9)
    assert out[11] == pytest.approx(0.5, abs=1e-12)                # two of each
    # before N tokens: the mean so far
    first = make_aggregator(Aggregation("window_mean_logit", window_tokens=4))
    assert first.update(np.array([hi, lo]))[1] == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="window_tokens: expected an integer in"):
        Aggregation("window_mean_logit", window_tokens=1025)
