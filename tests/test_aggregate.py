"""Streaming aggregators vs a naive per-token Python reference, over random chunkings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor.judge.aggregate import (
    EmaAggregator,
    MaxAggregator,
    MeanAggregator,
    SoftmaxLogitAggregator,
    WindowMaxAggregator,
    make_aggregator,
    span_end_rows,
)
from monitor.judge.policy import Aggregation


def naive(kind: str, scores: list[float], param: float | int | None = None,
          slope: float = 0.0, skip: int = 0) -> list[float]:
    # param: ema half-life, window_max N, mean_logit length_slope (a), softmax_logit τ;
    # slope: softmax_logit's length_slope; skip: mean_logit's skip_tokens
    """Per-token definitions, written as plainly as possible."""
    out: list[float] = []
    state = None
    total = 0.0
    weights = 0.0
    logits: list[float] = []
    for t, s in enumerate(scores):
        if kind == "max":
            state = s if state is None else max(state, s)
        elif kind == "mean":
            total += s
            state = total / (t + 1)
        elif kind == "mean_logit":
            q = min(max(s, 1e-6), 1 - 1e-6)
            logits.append(math.log(q) - math.log(1 - q))
            # more than `skip` seen: the first `skip` are left out of the sum and the count
            pooled = logits[skip:] if len(logits) > skip else logits
            total = sum(pooled)
            state = 1 / (1 + math.exp(-(total / len(pooled)
                                        - (param or 0.0) * math.log(len(pooled)))))
        elif kind == "softmax_logit":
            assert param is not None, "softmax_logit needs a temperature"
            q = min(max(s, 1e-6), 1 - 1e-6)
            ell = math.log(q) - math.log(1 - q)
            weights += math.exp(ell / param)
            total += math.exp(ell / param) * ell
            state = 1 / (1 + math.exp(-(total / weights - slope * math.log(t + 1))))
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
    Aggregation("mean_logit", skip_tokens=1),
    Aggregation("mean_logit", length_slope=0.42, skip_tokens=4),
    Aggregation("mean_logit", length_slope=-1.5, skip_tokens=64),
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
    Aggregation("softmax_logit", temperature=0.25),
    Aggregation("softmax_logit", temperature=1.0),
    Aggregation("softmax_logit", temperature=2.0, length_slope=0.42),
    Aggregation("softmax_logit", temperature=4.0, length_slope=-1.5),
    Aggregation("softmax_logit", temperature=1e6),
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
             "mean_logit": agg.length_slope, "softmax_logit": agg.temperature}.get(agg.kind)
    ref = np.array(naive(agg.kind, [float(v) for v in x], param,
                         agg.length_slope if agg.kind == "softmax_logit" else 0.0,
                         agg.skip_tokens or 0))

    results = []
    for _ in range(3):  # several chunkings of the same stream
        a = make_aggregator(agg)
        outs = []
        for chunk in random_chunks(rng, x):
            got = a.update(chunk)
            assert got.dtype == np.float64 and got.shape == chunk.shape
            outs.append(got)
        full = np.concatenate(outs)
        # the logit kinds: log1p vs log(1 - q) and the exp differ in the last bits
        tol = 1e-9 if "logit" in agg.kind else 1e-12
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


def test_skip_tokens_leaves_the_first_k_out_once_more_were_seen():
    """``skip_tokens: k``: up to ``t = k`` the plain mean logit; after it the mean (and the
    length term's ``t``) over tokens ``k+1..t`` only, so the first words of a request
    cannot move the statistic at its end; 0 is the plain aggregator bit for bit."""
    rng = np.random.default_rng(7)
    x = rng.random(50).astype(np.float32)
    plain = make_aggregator(Aggregation("mean_logit", length_slope=0.3)).update(x)
    assert Aggregation("mean_logit") == Aggregation("mean_logit", skip_tokens=0)
    assert np.array_equal(make_aggregator(Aggregation("mean_logit", length_slope=0.3,
                                                      skip_tokens=0)).update(x), plain)
    got = make_aggregator(Aggregation("mean_logit", length_slope=0.3, skip_tokens=4)).update(x)
    np.testing.assert_array_equal(got[:4], plain[:4])
    # at t = 10: the mean of the logits of tokens 5..10, minus 0.3 * log 6
    lg = np.log(x.astype(np.float64)) - np.log1p(-x.astype(np.float64))
    assert got[9] == pytest.approx(1 / (1 + math.exp(-(lg[4:10].mean() - 0.3 * math.log(6)))),
                                   rel=1e-12)
    # whatever the first 4 scores, the statistic after them is the same
    y = x.copy()
    y[:4] = [0.999, 0.999, 0.999, 0.999]
    again = make_aggregator(Aggregation("mean_logit", length_slope=0.3, skip_tokens=4)).update(y)
    assert np.array_equal(again[4:], got[4:]) and not np.array_equal(again[:4], got[:4])
    agg = Aggregation("mean_logit", length_slope=0.25, skip_tokens=4)
    assert agg.describe() == "mean_logit(a=0.25, skip=4)"
    assert agg.params() == {"length_slope": 0.25, "skip_tokens": 4}
    assert Aggregation("mean_logit", skip_tokens=2).describe() == "mean_logit(skip=2)"
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="skip_tokens: expected an integer in"):
            Aggregation("mean_logit", skip_tokens=bad)
    with pytest.raises(ValueError, match="skip_tokens: only applies to kind mean_logit"):
        Aggregation("softmax_logit", temperature=1.0, skip_tokens=2)


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


def _logits_of(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(q) - np.log1p(-q)


def test_softmax_logit_is_the_token_pool_reference_and_its_limits():
    """``softmax_logit`` at the last token = ``probes.token_pool.pool_logits`` (the
    trainer's reference, a max-shifted softmax) on the same logits; ``τ → ∞`` is
    ``mean_logit``; a small ``τ`` reads the running max of the logits."""
    from probes.token_pool import pool_logits

    rng = np.random.default_rng(7)
    for tau in (0.25, 0.5, 1.0, 2.0, 4.0, 100.0):
        for n in (1, 2, 17, 300):
            z = rng.normal(0.0, 3.0, n)                     # |z| well inside ±13.8: no clip
            p = 1 / (1 + np.exp(-z))
            got = make_aggregator(Aggregation("softmax_logit", temperature=tau)).update(p)
            ell = _logits_of(p)
            prefix = [pool_logits(ell[:t], ell[:t] / tau, np.zeros(t, np.int64), 1)[0]
                      for t in range(1, n + 1)]
            np.testing.assert_allclose(np.log(got) - np.log1p(-got), prefix,
                                       rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(prefix[-1], pool_logits(z, z / tau, np.zeros(n, int),
                                                               1)[0], rtol=1e-6, atol=1e-6)
    x = rng.random(500).astype(np.float32)
    mean = make_aggregator(Aggregation("mean_logit")).update(x)
    flat = make_aggregator(Aggregation("softmax_logit", temperature=1e6)).update(x)
    np.testing.assert_allclose(np.log(flat) - np.log1p(-flat),
                               np.log(mean) - np.log1p(-mean), atol=1e-3)
    # separated logits (-4 .. +6, step 1 apart in order of appearance): at τ = 0.25 the
    # largest gets weight >= 1 / (1 + Σ_k e^{-4k}) ~ 0.98 of the others' total
    z = np.array([-4.0, 2.0, -1.0, 6.0, 0.0, 3.0, -2.0])
    got = make_aggregator(Aggregation("softmax_logit", temperature=0.25)).update(
        1 / (1 + np.exp(-z)))
    np.testing.assert_allclose(np.log(got) - np.log1p(-got), np.maximum.accumulate(z),
                               atol=0.1)


def test_softmax_logit_length_slope_edges_and_refusals():
    rng = np.random.default_rng(8)
    x = rng.random(300).astype(np.float32)
    plain = make_aggregator(Aggregation("softmax_logit", temperature=2.0)).update(x)
    assert np.array_equal(make_aggregator(Aggregation("softmax_logit", temperature=2.0,
                                                      length_slope=0.0)).update(x), plain)
    a = 0.37
    deb = make_aggregator(Aggregation("softmax_logit", temperature=2.0,
                                      length_slope=a)).update(x)
    np.testing.assert_allclose(np.log(plain) - np.log1p(-plain) - (np.log(deb) - np.log1p(-deb)),
                               a * np.log(np.arange(1, 301)), atol=1e-7)
    assert deb[0] == plain[0]
    # one token: σ(ℓ_1), whatever τ; saturated scores stay finite (ℓ clipped to ±13.8,
    # e^{±55.3} at τ = 0.25 neither overflows nor underflows)
    for tau in (0.25, 1.0, 1e6):
        one = SoftmaxLogitAggregator(tau)
        assert one.value == 0.0 and one.update(np.empty(0)).size == 0 and one.n == 0
        assert one.push(0.3) == pytest.approx(0.3, rel=1e-9)
        out = SoftmaxLogitAggregator(tau).update(np.array([1.0, 0.0, 1.0, 0.0] * 1000,
                                                          dtype=np.float32))
        assert np.all(np.isfinite(out)) and np.all((out > 0) & (out < 1))
    nan = SoftmaxLogitAggregator(1.0)
    nan.update(np.array([0.2, np.nan]))
    assert math.isnan(nan.push(0.5))  # NaN sticks, as for mean_logit
    agg = Aggregation("softmax_logit", temperature=2.0, length_slope=0.25)
    assert agg.describe() == "softmax_logit(tau=2, a=0.25)"
    assert agg.params() == {"temperature": 2.0, "length_slope": 0.25}
    assert Aggregation("softmax_logit", temperature=4.0).params() == {"temperature": 4.0}
    assert Aggregation("softmax_logit", temperature=4.0).describe() == "softmax_logit(tau=4)"
    with pytest.raises(ValueError, match="temperature: required for kind softmax_logit"):
        Aggregation("softmax_logit")
    with pytest.raises(ValueError, match=r"temperature: expected a number in \[0.25, "
                                         r"1e\+06\]; found 0.2"):
        Aggregation("softmax_logit", temperature=0.2)
    with pytest.raises(ValueError, match=r"temperature: expected a number in .*found inf"):
        Aggregation("softmax_logit", temperature=math.inf)
    with pytest.raises(ValueError, match="temperature: only applies to kind softmax_logit; "
                                         "this aggregation is kind mean_logit"):
        Aggregation("mean_logit", temperature=2.0)
    with pytest.raises(ValueError, match="length_slope: expected a finite number"):
        Aggregation("softmax_logit", temperature=2.0, length_slope=math.nan)
    with pytest.raises(ValueError, match=r"temperature: expected a number in \[0.25"):
        SoftmaxLogitAggregator(0.1)
