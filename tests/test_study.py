"""probes/study.py: the leave-one-source-out-over-every-source study, against plain references."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.roles import TokenRole
from probes import pooled, study
from probes.collect import Activations
from probes.evaluate import auroc
from probes.harmful import split_calibration
from probes.pooled import SourceData, ecdf_scores, source_weights
from probes.sources import Source
from probes.study import readout_mask, study_table


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
    row = study_table(data, "user", 15, 1.0).summary
    assert row.auroc_ordinary > 0.97 and row.tpr_warn > 0.8
    assert row.per_source["oasst"][1] == 200 and row.per_source["h1"][0] == "harmful"
    # a benign style that looks harmful on the probe's direction is caught only when unseen
    data.append(_source("lookalike", "scary", 150, 5.0, rng))
    row2 = study_table(data, "user", 15, 1.0).summary
    assert row2.per_source["lookalike"][2] > 0.5
    assert row2.fpr_warn_ordinary < 0.1


# ----------------------------------------------------------------------- the variant study
def _multi(name: str, kind: str, n: int, rng: np.random.Generator, shift: dict[int, float],
           d: int = 6, max_tokens: int = 4) -> SourceData:
    """``n`` examples of 1..max_tokens user rows at layers 12 and 15; feature 0 of layer
    ``l`` is shifted by ``shift[l]`` for harmful examples."""
    label = 1 if kind == "harmful" else 0
    counts = rng.integers(1, max_tokens + 1, size=n)
    example = np.repeat(np.arange(n), counts)
    rows = example.size
    x = {}
    for lay in (12, 15):
        v = rng.normal(size=(rows, d))
        v[:, 0] += shift.get(lay, 0.0) * label
        x[lay] = v.astype(np.float16)
    acts = Activations((12, 15), x, example, np.zeros(rows, np.int64), np.zeros(rows, bool),
                       np.zeros(rows, np.int64), np.zeros(rows, np.int64),
                       np.full(n, label, np.int8), n)
    return SourceData(Source(name, kind, "train", "project", f"{name}.jsonl"),
                      [None] * n, acts, np.ones(rows, bool))  # type: ignore[list-item]


def _world(rng: np.random.Generator, shift: dict[int, float]) -> list[SourceData]:
    return [_multi("h1", "harmful", 60, rng, shift), _multi("h2", "harmful", 60, rng, shift),
            _multi("oasst", "benign", 80, rng, shift), _multi("alpaca", "benign", 80, rng, shift),
            _multi("scary", "scary", 60, rng, shift), _multi("persona", "persona", 40, rng, shift)]


def _feature(layer: int, j: int) -> pooled.Fitter:
    """A fitter that learns nothing: score = pooled feature ``j`` of ``layer``."""
    return lambda parts: (lambda d: d.features(layer)[:, j].astype(np.float64))


def test_loso_scores_match_a_plain_loop() -> None:
    data = _world(np.random.default_rng(2), {15: 3.0})
    u, raw = study.loso_scores(data, _feature(15, 0))
    _, cal_idx = split_calibration(data)
    for held in data:
        cal = [float(v) for d in data if d.name != held.name
               for v in d.features(15)[cal_idx[d.name], 0]]
        s = held.features(15)[:, 0]
        np.testing.assert_allclose(raw[held.name], s)
        want = [sum(c < v for c in cal) / len(cal) for v in s]
        np.testing.assert_allclose(u[held.name], want)
    with pytest.raises(ValueError, match="no calibration rows"):
        study.loso_scores([data[0], data[1], data[2]], _feature(15, 0))


def test_calibration_weightings_reweight_each_folds_scale_only() -> None:
    """``source`` / ``worst``: per held-out source, u = the mean / min over the other
    benign sources of each one's own CDF; the fits (raw scores) are shared, and
    run_variants reads every weighting from one fit per variant, paired to the first."""
    data = _world(np.random.default_rng(5), {15: 2.0})
    _, cal_idx = split_calibration(data)
    for w, comb in (("source", np.mean), ("worst", np.min)):
        u, raw = study.loso_scores(data, _feature(15, 0), weighting=w)
        for held in data:
            s = held.features(15)[:, 0]
            per = [[sum(c < v for c in d.features(15)[cal_idx[d.name], 0]) / cal_idx[d.name].size
                    for v in s] for d in data if d.name != held.name and cal_idx[d.name].size]
            np.testing.assert_allclose(u[held.name], comb(per, axis=0))
            np.testing.assert_allclose(raw[held.name], s)
    calls = []

    def counting(parts: pooled.Parts) -> pooled.Scorer:
        calls.append(1)
        return _feature(15, 0)(parts)

    v = [study.Variant("baseline", "feature 0", "yes", counting)]
    rows = study.run_variants(data, v, weightings=("row", "source", "worst"))
    assert [r.weighting for r in rows] == ["row", "source", "worst"]
    assert len(calls) == len(data)                    # one fit per fold, not per weighting
    kind = {d.name: d.source.kind for d in data}
    for r in rows:
        u, _ = study.loso_scores(data, _feature(15, 0), weighting=r.weighting)
        assert r.summary.per_source == study.summarise(u, kind).per_source
    assert rows[0].summary.per_source == study.run_variants(data, v)[0].summary.per_source
    md = study.variants_markdown(rows)
    assert "| feature 0; source-weighted calibration | yes |" in md
    assert "| feature 0; worst-weighted calibration | feature 0 | " in md  # paired to row
    assert "| source | kind | n | baseline | best | row-weighted | source-weighted |" in md


def test_summarise_matches_plain_counts() -> None:
    rng = np.random.default_rng(3)
    u = {"h": rng.uniform(0.5, 1.0, 40), "oasst": rng.uniform(0.0, 1.0, 30),
         "s": rng.uniform(0.9, 1.0, 20), "p": rng.uniform(0.0, 0.5, 10)}
    kind = {"h": "harmful", "oasst": "benign", "s": "scary", "p": "persona"}
    m = study.summarise(u, kind, n_boot=50)
    pairs = [(a > b) + 0.5 * (a == b) for a in u["h"] for b in u["oasst"]]
    assert m.auroc_ordinary == pytest.approx(float(np.mean(pairs)))
    neg = np.r_[u["oasst"], u["s"], u["p"]]
    pairs = [(a > b) + 0.5 * (a == b) for a in u["h"] for b in neg]
    assert m.auroc_all_benign == pytest.approx(float(np.mean(pairs)))
    assert m.tpr_warn == sum(v >= 0.99 for v in u["h"]) / 40
    assert m.fpr_warn_scary == sum(v >= 0.99 for v in u["s"]) / 20
    assert m.fpr_warn_persona == 0.0
    assert m.n == {"harmful": 40, "ordinary": 30, "scary": 20, "persona": 10}
    lo, hi = m.auroc_ordinary_ci
    assert lo <= m.auroc_ordinary <= hi
    lo, hi = m.rate_ci["harmful"]
    assert lo <= m.tpr_warn <= hi
    with pytest.raises(ValueError, match="harmful and ordinary"):
        study.summarise({"s": u["s"]}, kind)


def test_source_weights_name_overrides_kind() -> None:
    rng = np.random.default_rng(4)
    data = _world(rng, {15: 3.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    w = source_weights(parts, {"scary": 2.0, "oasst": 4.0})
    # plain: per source total = multiplier, then each class scaled to total n/2
    mult = {"h1": 1, "h2": 1, "oasst": 4, "alpaca": 1, "scary": 2, "persona": 1}
    raw = np.concatenate([np.full(d.labels.size, mult[d.name] / d.labels.size) for d in data])
    y = np.concatenate([d.labels for d in data])
    for c in (0, 1):
        raw[y == c] /= raw[y == c].sum()
    np.testing.assert_allclose(w, raw * y.size / 2)
    # per_source=False: every ROW weighs its multiplier, then the same class rescaling
    w2 = source_weights(parts, {"scary": 2.0, "oasst": 4.0}, per_source=False)
    raw2 = np.concatenate([np.full(d.labels.size, float(mult[d.name])) for d in data])
    for c in (0, 1):
        raw2[y == c] /= raw2[y == c].sum()
    np.testing.assert_allclose(w2, raw2 * y.size / 2)


def test_ensemble_is_the_mean_of_per_layer_probes() -> None:
    data = _world(np.random.default_rng(5), {12: 2.0, 15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    f = pooled.ensemble([12, 15], 1.0)(parts)
    a, b = pooled.linear(12, 1.0)(parts), pooled.linear(15, 1.0)(parts)
    for d in data:
        np.testing.assert_allclose(f(d), (a(d) + b(d)) / 2)
    with pytest.raises(ValueError, match="at least one fitter"):
        pooled.average([])


def test_contrast_fits_on_harmful_and_the_named_benign_kinds_only() -> None:
    data = _world(np.random.default_rng(7), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    seen: list[str] = []

    def record(ps: pooled.Parts) -> pooled.Scorer:
        seen.extend(d.name for d, _ in ps)
        return _feature(15, 0)(ps)
    pooled.contrast(record, frozenset({"scary", "persona"}))(parts)
    assert seen == ["h1", "h2", "scary", "persona"]
    with pytest.raises(ValueError, match="contrast: expected harmful rows"):
        pooled.contrast(record, frozenset({"scary"}))(parts[2:])


def test_conjunction_is_the_min_of_benign_standardised_scores() -> None:
    data = _world(np.random.default_rng(8), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    a, b = _feature(15, 0), _feature(15, 1)
    f = pooled.conjunction([a, b])(parts)
    ben = [d for d in data if d.source.kind != "harmful"]
    ga, gb = a(parts), b(parts)
    sa, sb = (np.concatenate([g(d) for d in ben]) for g in (ga, gb))
    for d in data:
        want = np.minimum((ga(d) - sa.mean()) / sa.std(), (gb(d) - sb.mean()) / sb.std())
        np.testing.assert_allclose(f(d), want)
    with pytest.raises(ValueError, match="at least one fitter"):
        pooled.conjunction([])


def test_concat_and_heads_find_a_signal_only_in_another_layer() -> None:
    """Harmful rows differ only at layer 12: the single layer-15 probe is at chance,
    the layer-12+15 heads are not."""
    data = _world(np.random.default_rng(6), {12: 3.0})
    kind = {d.name: d.source.kind for d in data}
    for fitter, lo, hi in ((pooled.linear(15, 1.0), 0.0, 0.7),
                           (pooled.concat([12, 15], 1.0), 0.95, 1.0),
                           (pooled.mlp([12, 15], 16, 1e-2), 0.85, 1.0)):
        m = study.summarise(study.loso_scores(data, fitter)[0], kind, n_boot=10)
        assert lo <= m.auroc_ordinary <= hi, m.auroc_ordinary


def test_recipe_explore_runs_the_shared_fitters() -> None:
    """The recipe's read-out exploration (probes.harmful.explore) is the shared fitters
    through the shared fold runner: its rows equal fold_metrics of pooled.fitter_folds,
    and on a signal only at layer 12 the chosen layer-15 probe is near chance while the
    concatenated layers find it."""
    from probes.harmful import Config, explore, fold_metrics

    data = _world(np.random.default_rng(11), {12: 3.0})
    fit_idx, cal_idx = split_calibration(data)
    cfg = Config(15, 1.0, 1.0, (("kind", "mean_logit"),), 1)
    rows = explore(data, fit_idx, cal_idx, cfg, layers=(12, 15))
    assert [r["read-out (pooled statistic)"] for r in rows] == [
        "linear, layer 15 (chosen)", "linear, layers 12+15 concatenated",
        "ensemble: mean logit of per-layer probes (12, 15)",
        "MLP head (64 hidden, alpha=1), layer 15"]
    kw = pooled.kind_weights(1.0)
    for row, f in zip(rows, (pooled.linear(15, 1.0, kw), pooled.concat([12, 15], 0.5, kw)),
                      strict=False):
        want = fold_metrics(pooled.fitter_folds(data, fit_idx, cal_idx, f), 0)
        assert row["auroc"] == pytest.approx(round(want["auroc"], 4))
    assert rows[0]["auroc"] < 0.7 < 0.95 < rows[1]["auroc"]
    # with the recipe's length term every read-out carries its own benign length slope
    deb = explore(data, fit_idx, cal_idx, Config(15, 1.0, 1.0, (("kind", "mean_logit"),), 1,
                                                 length_debias=True), layers=(12, 15))
    assert deb[0]["read-out (pooled statistic)"] == "linear, layer 15 (chosen) − a·log n"
    want = fold_metrics(pooled.fitter_folds(
        data, fit_idx, cal_idx, pooled.length_debiased(pooled.linear(15, 1.0, kw))), 0)
    assert deb[0]["fpr@cal1%"] == pytest.approx(round(want["fpr@cal1%"], 4))
    assert deb[0]["auroc"] == pytest.approx(round(want["auroc"], 4))


def test_lda_whitens_a_correlated_nuisance() -> None:
    """Feature 1 carries a large nuisance shared with feature 0; harmful rows add a small
    shift to feature 0 only. The mean difference points along feature 0, which the
    nuisance swamps; the whitened discriminant subtracts feature 1 and separates."""
    rng = np.random.default_rng(7)
    data = _world(rng, {15: 3.0})
    for d in data:
        x = d.acts.x[15].astype(np.float32)
        nuis = np.asarray(rng.normal(scale=6.0, size=x.shape[0]), np.float32)
        x[:, 0] += nuis
        x[:, 1] = nuis + rng.normal(scale=0.05, size=x.shape[0])
        d.acts.x[15] = x.astype(np.float16)
    parts = [(d, np.arange(d.labels.size)) for d in data]
    y = np.concatenate([d.labels for d in data])
    s = np.concatenate([pooled.lda_shrunk(15)(parts)(d) for d in data])
    plain = np.concatenate([d.features(15)[:, 0] for d in data])
    assert auroc(y, s) > 0.95 > auroc(y, plain) + 0.1


def test_knn_matches_a_plain_neighbour_vote() -> None:
    data = _world(np.random.default_rng(8), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    k = 5
    s = pooled.knn(15, k=k, n_pca=4)(parts)(data[0])[:6]
    # plain reference with the same embedding (PCA of the standardised features)
    from sklearn.decomposition import PCA

    x = np.concatenate([d.features(15) for d in data])
    y = np.concatenate([d.labels for d in data])
    w = source_weights(parts, {"scary": 1.0, "persona": 1.0})
    mu, sd = x.mean(0), x.std(0) + 1e-4
    pca = PCA(4, random_state=0).fit((x - mu) / sd)
    e = pca.transform((x - mu) / sd)
    e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-9
    for i in range(6):
        sim = e @ e[i]
        nb = np.argsort(-sim, kind="stable")[:k]
        share = sum(w[j] for j in nb if y[j] == 1) / sum(w[j] for j in nb)
        tie = (sum(sim[j] for j in nb if y[j] == 1) - sum(sim[j] for j in nb if y[j] == 0)) / k
        assert s[i] == pytest.approx(share + 1e-3 * tie, abs=1e-6)


def test_cascade_matches_a_plain_rule() -> None:
    data = _world(np.random.default_rng(9), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    band = (0.5, 0.9)
    f = pooled.cascade(_feature(15, 0), _feature(15, 1), band)(parts)
    neg0 = np.concatenate([d.features(15)[d.labels == 0, 0] for d in data])
    neg1 = np.concatenate([d.features(15)[d.labels == 0, 1] for d in data])
    lo, hi = np.quantile(neg0, band[0]), np.quantile(neg0, band[1])
    for d in data:
        got = f(d)
        for v0, v1, g in zip(d.features(15)[:, 0], d.features(15)[:, 1], got, strict=True):
            u0 = float(np.mean(neg0 < v0))
            want = (u0 if v0 < lo else 2 + u0 if v0 > hi
                    else 1 + 0.5 * float(np.mean(neg1 < v1)))
            assert g == pytest.approx(want)
    raw = {d.name: f(d) for d in data}
    share = pooled.stage2_share(raw)
    allv = np.concatenate([d.features(15)[:, 0] for d in data])
    assert share == pytest.approx(float(np.mean((allv >= lo) & (allv <= hi))))


def test_length_debiased_removes_the_benign_length_slope() -> None:
    data = _world(np.random.default_rng(10), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]

    def by_length(parts: pooled.Parts) -> pooled.Scorer:
        return lambda d: 2.0 * np.log(d.in_scope_tokens()) + d.features(15)[:, 0]

    f = pooled.length_debiased(by_length)(parts)
    n = np.concatenate([d.in_scope_tokens() for d in data])
    assert n.tolist() == [int(np.sum(d.acts.example == i)) for d in data
                          for i in range(d.acts.n_examples)]
    y = np.concatenate([d.labels for d in data])
    s = np.concatenate([f(d) for d in data])
    slope = np.polyfit(np.log(n[y == 0]), s[y == 0], 1)[0]
    assert abs(slope) < 1e-6


def test_variant_table_renders_every_variant() -> None:
    data = _world(np.random.default_rng(11), {15: 3.0})
    vs = [study.Variant("baseline", "feature 0", "yes", _feature(15, 0)),
          study.Variant("4 cascade", "c", "no", pooled.cascade(_feature(15, 0), _feature(15, 1)))]
    rows = study.run_variants(data, vs)
    assert rows[1].stage2_share is not None and rows[0].stage2_share is None
    md = study.variants_markdown(rows)
    assert "| baseline | feature 0 | yes |" in md and "| 4 cascade | c | no |" in md
    assert "harmful 120, ordinary 160, scary 60, persona 40" in md
    assert len(study.variants()) >= 15
    # a short run shows every row's per-source rate, in table order
    assert "| source | kind | n | row 1 | row 2 |" in md
    h1 = [ln for ln in md.splitlines() if ln.startswith("| h1 | harmful | 60 |")]
    want = [f"{r.summary.per_source['h1'][2]:.3f}" for r in rows]
    assert h1 == [f"| h1 | harmful | 60 | {want[0]} | {want[1]} |"]


# ----------------------------------------------------------------------- data-size axis
def test_subsample_keeps_the_old_rows_and_nests_where_sampling_does() -> None:
    import random

    from probes.sources import subsample

    # the pre-refactor expression of load_source, kept here as the plain reference
    def old(n: int, limit: int | None) -> list[int]:
        if limit is None or n <= limit:
            return list(range(n))
        return sorted(random.Random(0).sample(range(n), limit))

    for n, lim in ((18793, 300), (2413, 250), (100, None), (50, 80), (553, 300)):
        assert subsample(n, lim) == old(n, lim)
    # set-selection path for both sizes (alpaca 300 -> 2500) and "all rows" nest
    assert set(subsample(18793, 300)) <= set(subsample(18793, 2500))
    assert set(subsample(2413, 250)) <= set(subsample(2413, 2500))
    # pool path for the larger size (2413 rows, 1000 kept): not a superset
    assert not set(subsample(2413, 250)) <= set(subsample(2413, 1000))


def test_take_is_the_examples_as_a_source_of_their_own() -> None:
    rng = np.random.default_rng(21)
    d = _multi("h1", "harmful", 12, rng, {15: 2.0})
    f_before = d.features(15).copy()
    idx = np.array([1, 4, 5, 11])
    t = d.take(idx)
    assert t.acts.n_examples == 4 and t.labels.tolist() == d.labels[idx].tolist()
    np.testing.assert_array_equal(t.features(15), f_before[idx])       # carried over
    t.feats.clear()
    np.testing.assert_allclose(t.features(15), f_before[idx], rtol=1e-6)  # recomputed
    np.testing.assert_array_equal(t.in_scope_tokens(), d.in_scope_tokens()[idx])
    for j, i in enumerate(idx):  # every row of example i, in order, as example j
        np.testing.assert_array_equal(t.acts.x[12][t.acts.example == j],
                                      d.acts.x[12][d.acts.example == i])
    with pytest.raises(ValueError, match="strictly increasing"):
        d.take(np.array([3, 2]))
    with pytest.raises(ValueError, match=r"in \[0, 12\)"):
        d.take(np.array([0, 12]))


def test_data_sizes_parse_and_cover_every_arm() -> None:
    srcs = [Source("a", "benign", "train", "v2", "a", 300),
            Source("t", "benign", "test", "v2", "t", 250),
            Source("p", "harmful", "train", "project", "p")]
    big = study.data_size("2500", srcs)
    assert big.limits == {"a": 2500, "p": 2500} and big.name == "rows up to 2500"
    assert study.data_size("shipped", srcs).source(srcs[0]) == srcs[0]
    assert study.data_size("session6", srcs).limits == study.SESSION6_LIMITS
    loaded = study.loaded_sources(srcs, [study.data_size("shipped", srcs), big])
    assert [s.limit for s in loaded] == [2500, 250, None]  # None: an arm keeps all rows
    with pytest.raises(ValueError, match="shipped, session6, without:NAME"):
        study.data_size("all", srcs)
    minus = study.data_size("without:a+p", srcs)
    assert minus.limits == {"a": 0, "p": 0} and minus.name == "without a, p"
    assert minus.source(srcs[1]) == srcs[1]
    with pytest.raises(ValueError, match="unknown"):
        study.data_size("without:a+zz", srcs)
    with pytest.raises(ValueError, match="unknown nothing"):
        study.data_size("without:", srcs)
    # a source no arm keeps is not loaded; one another arm keeps is loaded for it
    assert [s.name for s in study.loaded_sources(srcs, [minus])] == ["t"]
    assert [s.limit for s in study.loaded_sources(srcs, [minus, big])] == [2500, 250, 2500]


def test_arm_rows_point_at_the_arms_rows_and_refuse_non_nesting(tmp_path, monkeypatch) -> None:
    import json

    from probes import sources

    monkeypatch.setenv("SAFETY_PROBES_DATASETS_V2", str(tmp_path))
    (tmp_path / "harmful_intent").mkdir()
    (tmp_path / "harmful_intent" / "f.jsonl").write_text("".join(
        json.dumps({"prompt": f"q{i}", "label": 0}) + "\n" for i in range(2413)))
    src = Source("s", "benign", "train", "v2", "f", 250)
    loaded = replace_limit(src, 2500)
    small = study.DataSize("small", {"s": 250})
    pos = study.arm_rows(loaded, small)
    all_rows = sources.load_source(loaded)
    assert [all_rows[i].user_text for i in pos] == [
        e.user_text for e in sources.load_source(src)]
    with pytest.raises(ValueError, match="do not nest"):
        study.arm_rows(replace_limit(src, 1000), small)


def replace_limit(src: Source, limit: int | None) -> Source:
    from dataclasses import replace

    return replace(src, limit=limit)


def test_arms_score_the_same_requests_and_the_full_arm_is_a_plain_run() -> None:
    data = _world(np.random.default_rng(31), {15: 1.5})
    full = study.DataSize("all")
    half = study.DataSize("half")
    rows_half = {d.name: np.arange(0, d.acts.n_examples, 2) for d in data}
    arms = [study.Arm(half, rows_half),
            study.Arm(full, {d.name: np.arange(d.acts.n_examples) for d in data})]
    fitter = pooled.linear(15, 1.0)
    v = [study.Variant("baseline", "lin", "yes", fitter)]
    r_half, r_full = study.run_variants(data, v, arms=arms)
    assert (r_half.arm, r_full.arm) == ("half", "all")
    # both arms scored on the half arm's requests
    assert r_half.summary.n == r_full.summary.n
    assert r_full.summary.n["harmful"] == sum(rows_half[n].size for n in ("h1", "h2"))
    # the full arm = a plain run on all rows, read on the common requests
    u, _ = study.loso_scores(data, fitter)
    kind = {d.name: d.source.kind for d in data}
    want = study.summarise({n: x[rows_half[n]] for n, x in u.items()}, kind)
    assert r_full.summary.auroc_ordinary == pytest.approx(want.auroc_ordinary)
    assert r_full.summary.per_source == want.per_source
    # the half arm = a plain run on the half data (its own split and thresholds)
    u2, _ = study.loso_scores([d.take(rows_half[d.name]) for d in data], fitter)
    assert r_half.summary.per_source == study.summarise(u2, kind).per_source
    fit_idx, cal_idx = split_calibration(data)
    assert r_full.n_cal == sum(i.size for i in cal_idx.values())
    assert r_full.n_fit == sum(i.size for i in fit_idx.values())
    md = study.variants_markdown([r_half, r_full])
    assert "| lin; half | yes |" in md and "Data-size arms" in md
    assert f"all: {r_full.n_fit} fit rows, thresholds on {r_full.n_cal}" in md


def test_an_arm_without_a_source_is_a_plain_run_without_it_on_the_same_requests() -> None:
    """``without:`` arms: the dropped source gets no fold and is neither fit on nor
    calibrated with; both arms are scored on the requests of the other sources only, and
    the arm that keeps every source is the plain run read on those requests."""
    data = _world(np.random.default_rng(37), {15: 1.5})
    data.append(_multi("extra", "benign", 50, np.random.default_rng(38), {15: 1.5}))
    every = {d.name: np.arange(d.acts.n_examples) for d in data}
    drop = study.DataSize("without extra", {"extra": 0})
    arms = [study.Arm(drop, {**every, "extra": np.arange(0)}),
            study.Arm(study.DataSize("all"), every)]
    fitter = pooled.linear(15, 1.0)
    r_without, r_with = study.run_variants(
        data, [study.Variant("baseline", "lin", "yes", fitter)], arms=arms)
    kind = {d.name: d.source.kind for d in data}
    assert set(r_without.u) == set(r_with.u) == {d.name for d in data[:-1]}
    assert r_without.summary.n == r_with.summary.n
    u0, _ = study.loso_scores(data[:-1], fitter)  # never saw "extra"
    assert r_without.summary.per_source == study.summarise(u0, kind).per_source
    u1, _ = study.loso_scores(data, fitter)
    want = study.summarise({n: x for n, x in u1.items() if n != "extra"}, kind)
    assert r_with.summary.per_source == want.per_source
    assert any(not np.array_equal(r_with.u[n], r_without.u[n]) for n in r_with.u)  # it mattered
    assert r_with.n_cal - r_without.n_cal == round(0.3 * 50)
    assert "without extra" in study.variants_markdown([r_without, r_with])


def test_style_projection_gives_every_source_of_a_class_the_same_mean_logit() -> None:
    rng = np.random.default_rng(41)
    data = _world(rng, {15: 2.0})
    # give every source its own style offset on features 1..3 (both classes)
    for d in data:
        off = rng.normal(scale=2.0, size=3)
        d.feats[15] = d.features(15).copy()
        d.feats[15][:, 1:4] += off
    parts = [(d, np.arange(d.acts.n_examples)) for d in data]
    x = np.concatenate([d.features(15) for d in data]).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-4
    v = pooled.style_directions(parts, 15, mean, std, "benign")
    assert v.shape[0] == 3  # 4 benign sources -> rank 3
    np.testing.assert_allclose(v @ v.T, np.eye(3), atol=1e-9)
    for kinds, want_equal in (("benign", ("benign",)), ("both", ("benign", "harmful"))):
        score = pooled.linear(15, 1.0, style=kinds)(parts)
        for cls in want_equal:
            means = [float(score(d).mean()) for d in data
                     if (d.source.kind == "harmful") == (cls == "harmful")]
            assert max(means) - min(means) < 1e-3, (kinds, cls, means)
        # still a harmful-vs-benign detector
        s = np.concatenate([score(d) for d in data])
        y = np.concatenate([d.labels for d in data])
        assert auroc(y, s) > 0.9
    # the plain probe does NOT give equal means (the offsets are real)
    plain = pooled.linear(15, 1.0)(parts)
    means = [float(plain(d).mean()) for d in data if d.source.kind != "harmful"]
    assert max(means) - min(means) > 1e-2
    with pytest.raises(ValueError, match="benign or both"):
        pooled.style_directions(parts, 15, mean, std, "scary")


def test_paired_auroc_diff_against_plain_aurocs() -> None:
    rng = np.random.default_rng(51)
    kind = {"h": "harmful", "oasst": "benign", "s": "scary"}
    ua = {"h": rng.uniform(0.3, 1.0, 60), "oasst": rng.uniform(0.0, 0.8, 40),
          "s": rng.uniform(size=10)}
    ub = {"h": np.clip(ua["h"] + 0.1, 0, 1), "oasst": ua["oasst"], "s": ua["s"]}
    d, (lo, hi) = study.paired_auroc_diff(ua, ub, kind, n_boot=200)
    lab = np.r_[np.ones(60), np.zeros(40)]
    want = auroc(lab, np.r_[ub["h"], ub["oasst"]]) - auroc(lab, np.r_[ua["h"], ua["oasst"]])
    assert d == pytest.approx(want) and d > 0 and 0 <= lo <= d <= hi
    assert study.paired_auroc_diff(ua, ua, kind, n_boot=50) == (0.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="same requests"):
        study.paired_auroc_diff(ua, {**ub, "h": ub["h"][:5]}, kind)
    data = _world(np.random.default_rng(52), {15: 2.0})
    vs = [study.Variant("baseline", "f0", "yes", _feature(15, 0)),
          study.Variant("x", "f1", "yes", _feature(15, 1))]
    rows = study.run_variants(data, vs)
    md = study.variants_markdown(rows, vs[1])
    d01, _ = study.paired_auroc_diff(rows[1].u, rows[0].u,
                                     {d.name: d.source.kind for d in data}, n_boot=10)
    assert "each variant minus f1" in md and f"| f0 | f1 | {d01:+.3f} [" in md


def test_skip_first_fits_and_scores_without_the_first_rows() -> None:
    """``pooled.skip_first(base, k)``: ``base`` sees every source with the first ``k``
    in-scope rows of each example longer than ``k`` left out (plain per-example loop)."""
    data = _world(np.random.default_rng(14), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    seen: list[SourceData] = []

    def base(ps: pooled.Parts) -> pooled.Scorer:
        seen.extend(d for d, _ in ps)
        return lambda d: d.features(15)[:, 0].astype(np.float64)

    f = pooled.skip_first(base, 2)(parts)
    assert all(s.mask.sum() <= d.mask.sum() for s, d in zip(seen, data, strict=True))
    for d in data:
        got = f(d)
        for i in range(d.acts.n_examples):
            rows = d.acts.x[15][(d.acts.example == i) & d.mask][:, 0].astype(np.float32)
            kept = rows[2:] if rows.size > 2 else rows
            assert got[i] == pytest.approx(float(kept.mean()), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="k: expected >= 0"):
        pooled.skip_first(base, -1)


def test_source_log_loss_matches_a_plain_sum() -> None:
    data = _world(np.random.default_rng(11), {15: 2.0})
    d = data[0]
    idx = np.array([0, 3, 7])
    score = _feature(15, 0)([])
    s = d.features(15)[:, 0].astype(np.float64)
    want = sum(np.log1p(np.exp(-(2 * d.labels[i] - 1) * s[i])) for i in idx) / idx.size
    assert pooled.source_log_loss(score, d, idx) == pytest.approx(want)
    assert pooled.source_log_loss(score, d, np.zeros(0, np.int64)) == 0.0


def test_group_dro_reweights_each_source_by_its_loss_as_a_plain_loop_does() -> None:
    """Each round's multipliers are the previous ones times exp(eta * the source's log-loss
    under the previous fit), divided by their maximum; the returned scorer is the fit at
    the last multipliers; eta = 0 is the plain fit."""
    data = _world(np.random.default_rng(12), {15: 1.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    seen: list[dict[str, float]] = []

    def make(q: dict[str, float]) -> pooled.Fitter:
        seen.append(dict(q))
        return pooled.linear(15, 0.1, q)
    f = pooled.group_dro(make, 2, 1.5)(parts)
    q = {d.name: 1.0 for d in data}
    want = [dict(q)]
    for _ in range(2):
        g = pooled.linear(15, 0.1, q)(parts)
        for d in data:
            s = g(d)
            loss = np.mean(np.logaddexp(0, -(2.0 * d.labels - 1) * s))
            q[d.name] *= np.exp(1.5 * loss)
        q = {k: v / max(q.values()) for k, v in q.items()}
        want.append(dict(q))
    assert len(seen) == 3
    for got, exp in zip(seen, want, strict=True):
        assert got == pytest.approx(exp)
    # the sources the fit ranks worst gain weight: the multipliers differ from 1
    assert min(seen[-1].values()) < 0.999
    last = pooled.linear(15, 0.1, want[-1])(parts)
    plain = pooled.linear(15, 0.1, {d.name: 1.0 for d in data})(parts)
    for d in data:
        np.testing.assert_allclose(f(d), last(d))
        np.testing.assert_allclose(pooled.group_dro(make, 3, 0.0)(parts)(d), plain(d))
    with pytest.raises(ValueError, match="rounds: expected >= 0"):
        pooled.group_dro(make, -1, 1.0)


def test_source_bagging_is_the_mean_of_fits_on_drawn_sources() -> None:
    data = _world(np.random.default_rng(13), {15: 2.0})
    parts = [(d, np.arange(d.labels.size)) for d in data]
    members: list[list[str]] = []

    def record(ps: pooled.Parts) -> pooled.Scorer:
        members.append([d.name for d, _ in ps])
        return pooled.linear(15, 0.1)(ps)
    f = pooled.source_bagging(record, 4, 0.5, seed=3)(parts)
    # 2 harmful sources -> 1 drawn; 4 benign -> 2 drawn; parts order kept
    order = [d.name for d in data]
    for m in members:
        assert len(m) == 3 and sum(n in ("h1", "h2") for n in m) == 1
        assert m == sorted(m, key=order.index)
    rng = np.random.default_rng(3)
    plain = []
    for _ in range(4):
        keep = {int(k) for k in rng.choice([0, 1], 1, replace=False)} | \
            {int(k) for k in rng.choice([2, 3, 4, 5], 2, replace=False)}
        plain.append(pooled.linear(15, 0.1)([p for k, p in enumerate(parts) if k in keep]))
    for d in data:
        np.testing.assert_allclose(f(d), np.mean([g(d) for g in plain], axis=0))
    # share 1 with one member is the plain fit
    whole = pooled.source_bagging(pooled.linear(15, 0.1), 1, 1.0)(parts)
    one = pooled.linear(15, 0.1)(parts)
    for d in data:
        np.testing.assert_allclose(whole(d), one(d))
    with pytest.raises(ValueError, match="members >= 1 and 0 < share <= 1"):
        pooled.source_bagging(record, 0, 0.5)


def test_shuffled_parts_permute_the_fit_labels_across_sources_only() -> None:
    from probes.harmful import shuffled_parts

    data = _world(np.random.default_rng(14), {15: 2.0})
    parts = [(d, np.arange(0, d.labels.size, 2)) for d in data]
    got = shuffled_parts(parts, np.random.default_rng(5))
    y = np.random.default_rng(5).permutation(
        np.concatenate([d.labels[i] for d, i in parts]))
    np.testing.assert_array_equal(np.concatenate([d.labels[i] for d, i in got]), y)
    for (d, i), (g, j) in zip(parts, got, strict=True):
        np.testing.assert_array_equal(i, j)
        rest = np.setdiff1d(np.arange(d.labels.size), i)
        np.testing.assert_array_equal(g.labels[rest], d.labels[rest])   # unfit rows kept
        assert g.source == d.source and g.features(15) is not None
        np.testing.assert_array_equal(g.features(15), d.features(15))
    # the permutation mixes classes inside a source (both labels appear in a harmful one)
    assert any(set(np.unique(g.labels[j])) == {0, 1} for g, j in got)
    with pytest.raises(ValueError, match=r"labels: expected 0/1 of shape \(60,\)"):
        data[0].relabelled(np.zeros(3, np.int8))
