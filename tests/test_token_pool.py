"""probes/token_pool.py: the learned token poolings against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes import pooled
from probes.collect import Activations
from probes.evaluate import auroc
from probes.pooled import SourceData
from probes.sources import Source
from probes.token_pool import fit_token_pool, pool_logits, pool_logits_torch


def _plain_pool(z: np.ndarray, q: np.ndarray, example: np.ndarray, n: int) -> np.ndarray:
    """``Σ_t softmax(q)_t z_t`` per example, one example at a time (no max shift)."""
    out = np.full(n, np.nan)
    for e in range(n):
        sel = example == e
        if sel.any():
            a = np.exp(q[sel]) / np.exp(q[sel]).sum()
            out[e] = float(a @ z[sel])
    return out


def test_pool_logits_matches_a_plain_softmax_and_its_limits() -> None:
    rng = np.random.default_rng(0)
    example = np.array([2, 0, 0, 2, 2, 0, 3, 2])     # any order; example 1 has no rows
    z = rng.normal(size=example.size) * 3
    q = rng.normal(size=example.size)
    got = pool_logits(z, q, example, 4)
    want = _plain_pool(z, q, example, 4)
    np.testing.assert_allclose(got[[0, 2, 3]], want[[0, 2, 3]], rtol=1e-12)
    assert np.isnan(got[1])
    means = [z[example == e].mean() for e in (0, 2, 3)]
    maxes = [z[example == e].max() for e in (0, 2, 3)]
    # softmax probe q = z/τ: τ → ∞ is the mean, τ → 0 the max
    np.testing.assert_allclose(pool_logits(z, z / 1e9, example, 4)[[0, 2, 3]], means,
                               rtol=1e-7)
    np.testing.assert_allclose(pool_logits(z, z / 1e-4, example, 4)[[0, 2, 3]], maxes,
                               rtol=1e-7)
    # stable where the plain form overflows
    assert np.isfinite(pool_logits(z, q + 1e4, example, 4)[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="one shape"):
        pool_logits(z, q[:-1], example, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pool_logits(z, q, example, 3)


def test_torch_pooling_equals_the_numpy_reference_and_its_gradient() -> None:
    rng = np.random.default_rng(1)
    example = np.repeat(np.arange(5), [1, 3, 7, 2, 4])
    z = rng.normal(size=example.size)
    q = rng.normal(size=example.size) * 2
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    qt = torch.tensor(q, dtype=torch.float64, requires_grad=True)
    got = pool_logits_torch(zt.float(), qt.float(), torch.from_numpy(example), 5)
    np.testing.assert_allclose(got.detach().numpy(), pool_logits(z, q, example, 5),
                               rtol=1e-5, atol=1e-6)
    # the max shift is detached: the gradient must still be the plain softmax's
    out = pool_logits_torch(zt, qt, torch.from_numpy(example), 5)
    out.sum().backward()
    assert qt.grad is not None
    eps = 1e-6
    for j in (0, 3, 9):
        d = np.zeros_like(q)
        d[j] = eps
        fd = (_plain_pool(z, q + d, example, 5).sum()
              - _plain_pool(z, q - d, example, 5).sum()) / (2 * eps)
        assert qt.grad[j].item() == pytest.approx(fd, abs=1e-6)


def _src(name: str, kind: str, n: int, rng: np.random.Generator, hot: float,
         lengths: tuple[int, int] = (2, 6), d: int = 6, layer: int = 15,
         spread: float = 0.0) -> SourceData:
    """``n`` examples of ``lengths`` user rows (normal noise); a harmful example has ONE
    row with feature 0 shifted by ``hot``, plus every row's feature 1 by ``spread``."""
    label = 1 if kind == "harmful" else 0
    counts = rng.integers(lengths[0], lengths[1] + 1, size=n)
    example = np.repeat(np.arange(n), counts)
    x = rng.normal(size=(example.size, d))
    if label:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        x[starts + rng.integers(0, counts), 0] += hot
        x[:, 1] += spread
    rows = example.size
    acts = Activations((layer,), {layer: x.astype(np.float16)}, example,
                       np.zeros(rows, np.int64), np.zeros(rows, bool), np.zeros(rows, np.int64),
                       np.zeros(rows, np.int64), np.full(n, label, np.int8), n)
    return SourceData(Source(name, kind, "train", "project", f"{name}.jsonl"),
                      [None] * n, acts, np.ones(rows, bool))  # type: ignore[list-item]


def _parts(data: list[SourceData]) -> pooled.Parts:
    return [(d, np.arange(d.acts.n_examples)) for d in data]


def test_mean_control_reproduces_the_linear_probe_on_the_means() -> None:
    rng = np.random.default_rng(2)
    data = [_src("h1", "harmful", 80, rng, 2.0, spread=1.0),
            _src("h2", "harmful", 60, rng, 2.0, spread=1.0),
            _src("alpaca", "benign", 100, rng, 0.0), _src("oasst", "benign", 70, rng, 0.0)]
    for style in ("", "benign"):
        lin = pooled.linear(15, 0.05, style=style)(_parts(data))
        ctl = fit_token_pool(_parts(data), 15, 0.05, "mean", style=style)
        for d in data:
            np.testing.assert_allclose(ctl.scores(d), lin(d), atol=2e-3)
    held = _src("h3", "harmful", 50, rng, 2.0, spread=1.0)
    neg = _src("self_instruct", "benign", 50, rng, 0.0)
    s = np.r_[ctl.scores(held), ctl.scores(neg)]
    assert auroc(np.r_[np.ones(50), np.zeros(50)], s) > 0.9


def test_learned_pooling_finds_one_hot_token_that_the_mean_dilutes() -> None:
    rng = np.random.default_rng(3)

    def world(n: int) -> list[SourceData]:
        return [_src("h1", "harmful", n, rng, 5.0, (8, 24)),
                _src("h2", "harmful", n, rng, 5.0, (8, 24)),
                _src("alpaca", "benign", n, rng, 0.0, (8, 24)),
                _src("oasst", "benign", n, rng, 0.0, (8, 24))]
    train, test = world(120), world(120)
    lab = np.concatenate([d.labels for d in test])
    res = {}
    for pool in ("mean", "softmax", "attention"):
        p = fit_token_pool(_parts(train), 15, 1.0, pool)
        res[pool] = auroc(lab, np.concatenate([p.scores(d) for d in test]))
        if pool == "softmax":
            assert p.beta > 0.1                       # learned: towards the max
        if pool == "attention":
            assert p.v is not None and abs(p.v[0]) == np.abs(p.v).max()
    assert res["mean"] < 0.95
    assert res["softmax"] > res["mean"] + 0.03 and res["softmax"] > 0.97
    assert res["attention"] > res["mean"] + 0.03 and res["attention"] > 0.97


def test_fits_are_deterministic_and_shaped() -> None:
    rng = np.random.default_rng(4)
    data = [_src("h1", "harmful", 40, rng, 4.0), _src("alpaca", "benign", 40, rng, 0.0)]
    a = fit_token_pool(_parts(data), 15, 0.1, "attention")
    b = fit_token_pool(_parts(data), 15, 0.1, "attention")
    assert a.v is not None and b.v is not None
    np.testing.assert_array_equal(a.w, b.w)
    np.testing.assert_array_equal(a.v, b.v)
    assert a.w.shape == a.v.shape == (6,) and a.w.dtype == np.float64
    s = a.scores(data[0])
    assert s.shape == (40,) and s.dtype == np.float64
    fixed = fit_token_pool(_parts(data), 15, 0.1, "softmax", beta=2.0)
    assert fixed.beta == 2.0 and fixed.v is None
    with pytest.raises(ValueError, match="pooling"):
        fit_token_pool(_parts(data), 15, 0.1, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        fit_token_pool(_parts(data), 15, 0.1, "attention", beta=1.0)


def test_an_example_without_rows_scores_as_a_zero_pooled_feature() -> None:
    rng = np.random.default_rng(5)
    data = [_src("h1", "harmful", 40, rng, 4.0, spread=1.0),
            _src("alpaca", "benign", 40, rng, 0.0)]
    p = fit_token_pool(_parts(data), 15, 0.1, "softmax")
    d = data[1]
    mask = d.mask.copy()
    mask[d.acts.example == 7] = False
    hole = SourceData(d.source, d.examples, d.acts, mask)
    s = p.scores(hole)
    assert s[7] == pytest.approx(float((-p.mean / p.std).astype(np.float64) @ p.w) + p.b)
    np.testing.assert_allclose(np.delete(s, 7), np.delete(p.scores(d), 7))


def _length_world(rng: np.random.Generator) -> list[SourceData]:
    """Two harmful sources (one hot row, a shifted feature) and two benign ones whose
    requests vary in length, so the length slope has something to fit."""
    return [_src("h1", "harmful", 60, rng, 3.0, (4, 20), spread=0.5),
            _src("h2", "harmful", 50, rng, 3.0, (4, 20), spread=0.5),
            _src("alpaca", "benign", 70, rng, 0.0, (2, 30)),
            _src("oasst", "benign", 60, rng, 0.0, (2, 30))]


def test_softmax_recipe_exports_a_linear_probe_that_softmax_logit_serves() -> None:
    """The recipe's softmax pooling (probes.harmful Config pooling="softmax"): the
    exported one-column probe + the served ``softmax_logit`` aggregator over the rows
    (``SourceData.served``, the tracker's aggregator) reproduce ``TokenPoolProbe``'s
    request logits minus the length term; the style projection is folded into ``w``."""
    from probes.harmful import Config, request_logits
    from probes.pooled import kind_weights, style_directions
    from probes.train import fit_length_slope, log_tokens

    rng = np.random.default_rng(5)
    data = _length_world(rng)
    parts = _parts(data)
    tau = 2.0
    cfg = Config(15, 0.05, 1.0, (("kind", "softmax_logit"), ("temperature", tau)), 1,
                 judge_at="span_end", length_debias=True, style="benign", pooling="softmax",
                 temperature=tau)
    probe, agg = cfg.fit(parts)
    tp = fit_token_pool(parts, 15, 0.05, "softmax", 1 / tau, kind_weights(1.0), "benign")
    assert (probe.method, probe.layer, probe.C) == ("softmax", 15, 0.05)
    assert np.array_equal(probe.weight, tp.w.astype(np.float32)) and probe.bias == tp.b
    assert np.array_equal(probe.mean, tp.mean) and np.array_equal(probe.std, tp.std)
    vt = style_directions(parts, 15, tp.mean.astype(np.float64), tp.std.astype(np.float64),
                          "benign")
    assert vt.shape[0] == 1 and np.abs(vt @ tp.w).max() < 1e-9 * np.linalg.norm(tp.w)
    # the length slope: fit on the request logits L of the benign fit rows
    ben = [d for d in data if d.source.kind == "benign"]
    a_ref = fit_length_slope(np.concatenate([tp.scores(d) for d in ben]),
                             np.concatenate([d.in_scope_tokens() for d in ben]))
    assert agg["kind"] == "softmax_logit" and agg["temperature"] == tau
    assert agg["length_slope"] == pytest.approx(a_ref, abs=2e-4) and abs(a_ref) > 0.01
    a = agg["length_slope"]
    for d in data:
        want = tp.scores(d) - a * log_tokens(d.in_scope_tokens())
        np.testing.assert_allclose(request_logits(probe, d, tau), tp.scores(d), atol=1e-5)
        s = d.served(probe, agg, 1, "span_end")
        assert np.abs(want).max() < 9  # float32 sigmoids far from saturation
        np.testing.assert_allclose(np.log(s) - np.log1p(-s), want, atol=1e-4)


def test_default_recipe_fit_is_the_mean_pooled_linear_probe() -> None:
    """Config's default pooling (mean) fits exactly what it fit before the softmax
    option: ``fit_pooled`` with the same arguments, the slope of ``z(x̄)`` on ``log n``."""
    from probes.harmful import (
        DEFAULT_POOLING,
        Config,
        fit_pooled,
        kind_weights,
        request_logits,
        search_space,
    )
    from probes.train import fit_length_slope

    assert DEFAULT_POOLING == "mean"
    rng = np.random.default_rng(6)
    data = _length_world(rng)
    parts = _parts(data)
    cfg = Config(15, 0.05, 1.0, (("kind", "mean_logit"),), 1, judge_at="span_end",
                 length_debias=True, style="benign")
    assert cfg.pooling == "mean"
    probe, agg = cfg.fit(parts)
    ref = fit_pooled(parts, 15, 0.05, kind_weights(1.0), 0, style="benign")
    assert np.array_equal(probe.weight, ref.weight) and probe.bias == ref.bias
    assert probe.method == "logreg"
    ben = [d for d in data if d.source.kind == "benign"]
    a = round(fit_length_slope(np.concatenate([ref.logits(d.features(15)) for d in ben]),
                               np.concatenate([d.in_scope_tokens() for d in ben])), 4)
    assert agg == {"kind": "mean_logit", "length_slope": a}
    assert np.array_equal(request_logits(probe, data[0]), probe.logits(data[0].features(15)))
    # the default search space is unchanged; the softmax one is its one read-out
    assert search_space("span_end") == ((({"kind": "mean_logit"}, 1, 1.0, "span_end"),
                                         ({"kind": "mean"}, 1, 1.0, "span_end")), (0,))
    assert search_space("any", "softmax", 4.0) == (
        (({"kind": "softmax_logit", "temperature": 4.0}, 1, 1.0, "span_end"),), (0,))
    with pytest.raises(ValueError, match=r"judge_at: .*expected span_end or any"):
        search_space("every_token", "softmax", 2.0)
    with pytest.raises(ValueError, match=r"temperature: expected a number in \[0.25"):
        search_space("span_end", "softmax", 0.1)
    with pytest.raises(ValueError, match="aggregation: a softmax probe is served as"):
        Config(15, 0.05, 1.0, (("kind", "mean_logit"),), 1, pooling="softmax")
    with pytest.raises(ValueError, match="expected pooling softmax with it, found pooling "
                                         "mean"):
        Config(15, 0.05, 1.0, (("kind", "softmax_logit"), ("temperature", 2.0)), 1)


def test_softmax_selection_folds_read_the_softmax_logit() -> None:
    """``select`` with the softmax pooling: every fold fits the softmax probe, the
    reference row is its softmax-pooled logit and the chosen config serves
    ``softmax_logit`` at ``span_end``."""
    from probes.harmful import explore, search_space, select

    rng = np.random.default_rng(7)
    data = _length_world(rng)
    fit_idx = {d.name: np.arange(d.acts.n_examples) for d in data}
    cal_idx = {d.name: (np.arange(0, d.acts.n_examples, 3) if d.source.kind == "benign"
                        else np.arange(0)) for d in data}
    for d in data:
        if d.source.kind == "benign":
            fit_idx[d.name] = np.setdiff1d(fit_idx[d.name], cal_idx[d.name])
    served, prefixes = search_space("span_end", "softmax", 2.0)
    cfg, table = select(data, fit_idx, cal_idx, [15], [0.05], [1.0], served, prefixes,
                        progress=False, length_debias=True, style="benign",
                        pooling="softmax", temperature=2.0)
    assert (cfg.pooling, cfg.temperature, cfg.judge_at) == ("softmax", 2.0, "span_end")
    assert cfg.agg == {"kind": "softmax_logit", "temperature": 2.0}
    names = {r["read-out"] for r in table}
    assert names == {"softmax-pooled logit (tau=2) − a·log n (reference)",
                     "softmax_logit(tau=2) − a·log t @span_end"}
    assert all(r["auroc"] > 0.9 for r in table)
    rows = explore(data, fit_idx, cal_idx, cfg, layers=[15])
    assert rows[0]["read-out (pooled statistic)"] == ("softmax probe tau=2, layer 15 "
                                                      "(chosen) − a·log n")
    assert rows[1]["read-out (pooled statistic)"] == "linear, layer 15 − a·log n"
