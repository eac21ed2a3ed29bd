"""The harmful-intent recipe's pieces against plain references, and a small slice of the
recipe end to end (skips without ../shared datasets or the default model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import pytest

from probes.collect import SEG_GENERATED, SEG_USER, Activations
from probes.evaluate import auroc, auroc_ci, wilson_ci
from probes.harmful import Config, SourceData, pooled_features, served_scores, source_weights
from probes.sources import HARMFUL_SOURCES, Source, sources_available
from probes.train import LinearProbe

if TYPE_CHECKING:
    from probes.datasets import ChatExample


def _acts(lengths: list[int], labels: list[int], d: int = 6, seed: int = 0) -> Activations:
    rng = np.random.default_rng(seed)
    ex = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    n = ex.size
    x = rng.normal(size=(n, d)).astype(np.float16)
    return Activations((3,), {3: x}, ex, pos, np.zeros(n, bool), np.full(n, SEG_USER, np.int8),
                       np.zeros(n, np.int32), np.array(labels, np.int8), len(lengths))


def test_pooled_features_is_the_mean_of_masked_rows() -> None:
    acts = _acts([3, 1, 5], [1, 0, 1])
    mask = np.ones(acts.n_rows, bool)
    mask[[0, 6]] = False
    got = pooled_features(acts, 3, mask)
    for i in range(3):
        rows = acts.x[3][(acts.example == i) & mask].astype(np.float32)
        np.testing.assert_allclose(got[i], rows.mean(0), rtol=1e-6)
    mask[3] = False  # example 1 loses its only row: zeros
    assert not pooled_features(acts, 3, mask)[1].any()


def test_served_scores_is_max_over_t_of_the_running_mean() -> None:
    acts = _acts([7, 2, 4], [1, 0, 0], seed=1)
    probe = LinearProbe(3, np.arange(6, dtype=np.float32) - 2.5, 0.3,
                        np.zeros(6, np.float32), np.ones(6, np.float32))
    mask = np.ones(acts.n_rows, bool)
    mask[1] = False
    got = served_scores(probe, acts, mask, {"kind": "mean"}, 3)
    for i in range(3):
        rows = acts.x[3][(acts.example == i) & mask].astype(np.float32)
        s = 1 / (1 + np.exp(-(rows @ probe.weight + probe.bias)))
        if len(s) < 3:  # fewer tokens in scope than min_tokens: never alerts
            assert got[i] == 0.0
            continue
        running = np.cumsum(s) / np.arange(1, len(s) + 1)
        assert got[i] == pytest.approx(running[2:].max(), rel=1e-5)


def test_source_weights_give_every_source_the_same_class_share() -> None:
    class _S:
        def __init__(self, kind: str, labels: list[int]) -> None:
            self.source = Source("s", kind, "train", "v2", "f")
            self.labels = np.array(labels, np.int8)

    a, b, c = _S("harmful", [1] * 10), _S("harmful", [1] * 2), _S("scary", [0] * 4)
    d = _S("benign", [0] * 8)
    parts = [(a, np.arange(10)), (b, np.arange(2)), (c, np.arange(4)), (d, np.arange(8))]
    w = source_weights(cast("list[tuple[SourceData, np.ndarray]]", parts), {"scary": 3.0})
    assert w[:10].sum() == pytest.approx(w[10:12].sum())  # harmful sources equal
    assert w[12:16].sum() == pytest.approx(3 * w[16:].sum())  # scary × 3
    assert w[:12].sum() == pytest.approx(w[12:].sum())  # classes balanced


def test_intervals_cover_the_estimate() -> None:
    lo, hi = wilson_ci(3, 100)
    assert 0 < lo < 0.03 < hi < 0.1
    assert wilson_ci(0, 50)[0] == 0.0 and wilson_ci(0, 50)[1] > 0.0
    y = np.r_[np.ones(50), np.zeros(50)]
    s = np.r_[np.linspace(0.3, 1, 50), np.linspace(0, 0.7, 50)]
    lo, hi = auroc_ci(y, s)
    assert lo <= auroc(y, s) <= hi and hi - lo < 0.2


def test_test_sources_cover_each_required_style() -> None:
    test = {s.name: s for s in HARMFUL_SOURCES if s.role == "test"}
    assert {"do_not_answer", "oasst", "coconot_contrast", "personas_test"} <= set(test)
    train = {s.name for s in HARMFUL_SOURCES if s.role == "train"}
    assert not train & set(test)
    assert Config(12, 1e-3, 1.0, (("kind", "mean"),), 2).agg == {"kind": "mean"}


def test_token_roles_match_the_shared_segmenter_on_user_text() -> None:
    try:
        from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model

        path = prepare_default_model()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"default model unavailable: {e}")
    from transformers import AutoTokenizer

    from monitor.roles import TokenRole
    from probes.collect import _ChatEncoder
    from probes.datasets import ChatExample
    from probes.harmful import scope_mask, token_roles

    enc = _ChatEncoder()
    enc.tokenizer = AutoTokenizer.from_pretrained(path)
    exs = [ChatExample.make([{"role": "user", "content": "How do I kill a Python process?"}], 0),
           ChatExample.make([{"role": "system", "content": "You are a pirate."},
                             {"role": "user", "content": "Hello there"}], 0, completion="Arr")]
    ex, pos, gen = [], [], []
    for i, example in enumerate(exs):
        ids, plen, _ = enc.encode(example)
        ex += [i] * len(ids)
        pos += list(range(len(ids)))
        gen += [p >= plen for p in range(len(ids))]
    n = len(ex)
    acts = Activations((0,), {0: np.zeros((n, 2), np.float16)}, np.array(ex, np.int32),
                       np.array(pos, np.int32), np.array(gen), np.zeros(n, np.int8),
                       np.zeros(n, np.int32), np.zeros(2, np.int8), 2)
    roles = token_roles(acts, exs, enc)
    user = scope_mask(roles, "user")
    text = [enc.tokenizer.decode(
        [enc.encode(exs[i])[0][p] for p in acts.position[user & (acts.example == i)]])
        for i in range(2)]
    assert text == ["How do I kill a Python process?", "Hello there"], DEFAULT_MODEL_NAME
    assert (roles[np.array(gen)] == int(TokenRole.GENERATED)).all()
    assert (roles == int(TokenRole.SYSTEM)).any()  # pirate and SmolLM2's default prompt
    assert scope_mask(roles, "prompt").sum() == (~np.array(gen)).sum()
    assert SEG_GENERATED == 3


@pytest.mark.slow
def test_recipe_small_slice_end_to_end(tmp_path) -> None:
    """A few rows per source through collection, leave-one-source-out selection, fit,
    calibration and per-source evaluation: a working probe comes out."""
    if not sources_available():
        pytest.skip("../shared/datasets or ../shared/datasets-v2 absent")
    try:
        from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model

        path = prepare_default_model()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"default model unavailable: {e}")
    from probes.collect import TransformersCollector
    from probes.harmful import harmful_intent_recipe

    names = {"catqa", "stl_harmful", "alpaca", "project_scary", "do_not_answer", "oasst",
             "mtbench", "refusal_harmful"}
    srcs = [s for s in HARMFUL_SOURCES if s.name in names]
    col = TransformersCollector(path, DEFAULT_MODEL_NAME)
    # the shipped read-out; the default recipe leaves the first 4 user tokens out of it
    served = (({"kind": "mean_logit"}, 1, 1.0, "span_end"),)
    r, w = harmful_intent_recipe(col, tmp_path, sources=srcs, layers=(12,), Cs=(1e-3,),
                                 scary_weights=(1.0,), served=served, limit=24,
                                 explore_readouts=False, progress=False)
    m = r.metrics
    assert set(m["test_sources"]) == {"do_not_answer", "oasst", "long_benign",
                                      "long_with_harmful"}
    assert m["test_pooled"]["auroc"] > 0.7  # chance is 0.5; the full build: REPORT.md
    assert 0 < r.thresholds["warn"] < r.thresholds["critical"] < 1
    assert r.selection and r.selection[0]["layer"] == 12
    assert r.aggregation["skip_tokens"] == 4 and r.calibration["skip_tokens"] == 4
    assert r.aggregation["length_slope"] == r.calibration["length_slope"]
    assert m["calibration_set"]["n"] == sum(round(0.3 * 24) for _ in range(3))
    # the window detector: same probe, its own read-out, thresholds by split calibration
    # (harmful_intent at 0.8% of the rows; the union <= 1% on rows and on lists, each)
    assert w.name == "harmful_intent_window" and w.probe is r.probe
    assert w.component_of == "harmful_intent" and w.judge_at == "every_token"
    assert w.aggregation == {"kind": "window_mean_logit", "window_tokens": 8}
    u = w.calibration["union"]["warn"]
    assert u["harmful_intent"] == r.thresholds["warn"]
    assert u["harmful_intent_window"] == w.thresholds["warn"]
    n_rows, n_lists = w.calibration["n_rows"], w.calibration["n_lists"]
    # calibration lists per filler kind (alpaca, mtbench: benign; project_scary: scary),
    # the union within budget on each kind's lists
    by_kind = u["lists_alerted_union_by_kind"]
    assert n_rows == m["calibration_set"]["n"] and n_lists == 2 * 4 * 24
    assert {k: v["n"] for k, v in by_kind.items()} == {"benign": 4 * 24, "scary": 4 * 24}
    assert u["rows_alerted_union"] <= int(0.01 * n_rows)
    assert all(v["alerted"] <= int(0.01 * v["n"]) for v in by_kind.values())
    assert u["lists_alerted_union"] == sum(v["alerted"] for v in by_kind.values())
    assert u["rows_alerted_harmful_intent"] <= int(0.008 * n_rows)
    assert set(w.metrics["union_test_sources"]) == set(m["test_sources"])


def test_fold_metrics_judge_each_fold_by_its_own_threshold() -> None:
    from probes.harmful import Fold, fold_metrics, scaled

    class _D:
        def __init__(self, kind: str) -> None:
            self.source = Source(kind, kind, "train", "v2", "f")

    cal = np.linspace(0.0, 0.5, 200)  # fold's held-back benign rows; 1% threshold ~0.4975
    def d(kind: str) -> SourceData:  # duck-typed: fold_metrics reads only .source
        return cast(SourceData, _D(kind))

    folds = [Fold(d("harmful"), [np.array([0.9, 0.8, 0.1, 0.7])], [cal]),
             Fold(d("benign"), [np.array([0.1, 0.6, 0.2, 0.3])], [cal]),
             Fold(d("scary"), [np.array([0.2, 0.2])], [cal + 0.5])]  # own, higher threshold
    m = fold_metrics(folds, 0)
    assert m["tpr@cal1%"] == pytest.approx(0.75)
    assert m["fpr@cal1%"] == pytest.approx((0.25 + 0.0) / 2)
    assert m["worst_fpr@cal1%"] == pytest.approx(0.25)
    assert m["criterion"] == pytest.approx((m["auroc"] + 0.75) / 2 - 0.125)
    # source weighting: the fold's calibration rows are two sources, 190 low rows and 10
    # high ones; by row 2 rows may lie above 1% (t above the 3rd highest), weighted per
    # source the high source alone is 50% of the weight: t goes above all of it
    cal2 = np.r_[np.linspace(0.0, 0.5, 190), np.linspace(0.6, 0.69, 10)]
    grp = np.r_[np.full(190, "low"), np.full(10, "high")]
    f2 = [Fold(d("harmful"), [np.array([0.68, 0.695, 0.1])], [cal2], grp),
          Fold(d("benign"), [np.array([0.685, 0.1])], [cal2], grp)]
    assert fold_metrics(f2, 0)["tpr@cal1%"] == pytest.approx(2 / 3)
    assert fold_metrics(f2, 0)["fpr@cal1%"] == pytest.approx(0.5)
    assert fold_metrics(f2, 0, "source")["tpr@cal1%"] == pytest.approx(1 / 3)
    assert fold_metrics(f2, 0, "source")["fpr@cal1%"] == 0.0
    p = LinearProbe(0, np.array([1.0, -2.0], np.float32), 0.5, np.zeros(2, np.float32),
                    np.ones(2, np.float32))
    x = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    q = scaled(p, 0.05)
    np.testing.assert_allclose(q.logits(x), 0.05 * p.logits(x), rtol=1e-5, atol=1e-6)
    assert (np.argsort(q.scores(x)) == np.argsort(p.scores(x))).all()


def test_length_slope_is_fit_on_benign_fit_rows_and_served_by_mean_logit() -> None:
    from probes.harmful import SourceData, length_slope, served_scores, with_slope
    from probes.train import fit_length_slope

    rng = np.random.default_rng(4)
    lens = [int(v) for v in rng.integers(2, 90, 40)]
    ben = _acts(lens, [0] * 40, seed=5)
    for i, n in enumerate(lens):  # benign requests drift up with log(length) on feature 0
        ben.x[3][ben.example == i, 0] += np.float16(0.5 * np.log(n))
    harm = _acts(lens[:20], [1] * 20, seed=6)
    harm.x[3][:, 0] += np.float16(2.0)
    mask_b, mask_h = np.ones(ben.n_rows, bool), np.ones(harm.n_rows, bool)
    mask_b[ben.example % 7 == 0] = False  # some requests have no in-scope tokens (n -> 1)
    no_text = cast("list[ChatExample]", [None] * 40)  # the fit reads activations only
    sb = SourceData(Source("b", "benign", "train", "v2", "f"), no_text, ben, mask_b)
    sh = SourceData(Source("h", "harmful", "train", "v2", "f"), no_text[:20], harm, mask_h)
    probe = LinearProbe(3, np.array([1.0, 0.2, 0, 0, 0, -0.3], np.float32), -0.5,
                        np.zeros(6, np.float32), np.ones(6, np.float32))
    fit_rows = np.arange(0, 40, 2)  # calibration rows (odd) must not enter the fit
    parts = [(sb, fit_rows), (sh, np.arange(20))]
    # plain reference: per benign fit request, the probe's logit of its mean in-scope row
    z: list[float] = []
    n_rows: list[int] = []
    for req in fit_rows:
        rows = ben.x[3][(ben.example == req) & mask_b].astype(np.float32)
        xm = rows.mean(0) if rows.size else np.zeros(6, np.float32)
        z.append(float(xm @ probe.weight + probe.bias))
        n_rows.append(max(len(rows), 1))
    a = length_slope(probe, parts)
    assert a == round(fit_length_slope(np.array(z), np.array(n_rows)), 4) and a > 0.3
    sh.acts.x[3][:] = 0  # harmful rows do not enter the fit
    sh.feats.clear()
    assert length_slope(probe, parts) == a
    sb.acts.x[3][sb.acts.example == 1] += np.float16(5.0)  # nor do held-back benign rows
    sb.feats.clear()
    assert length_slope(probe, parts) == a
    assert with_slope({"kind": "mean"}, a) == {"kind": "mean"}
    agg = with_slope({"kind": "mean_logit"}, a)
    assert agg == {"kind": "mean_logit", "length_slope": a}
    # served (span_end, one span per request) = σ(z(x̄) − a·log n) on every request
    s = served_scores(probe, ben, mask_b, agg, 1, judge_at="span_end")
    for i in range(0, 40, 3):
        rows = ben.x[3][(ben.example == i) & mask_b].astype(np.float32)
        if not rows.size:
            assert s[i] == 0.0  # nothing in scope: never judged
            continue
        zi = float(rows.mean(0) @ probe.weight + probe.bias) - a * np.log(len(rows))
        assert s[i] == pytest.approx(1 / (1 + np.exp(-zi)), rel=1e-5)


def test_skipping_view_is_what_mean_logit_skip_tokens_serves() -> None:
    """``SourceData.skipping(k)`` pools the in-scope rows after the first ``k`` of every
    request longer than ``k`` (all rows otherwise), and the served ``mean_logit`` with
    ``skip_tokens: k`` at the user's span end is ``σ`` of that pool's logit minus
    ``a·log`` of its size: the probe is trained on exactly what the tracker serves."""
    from probes.harmful import skipping_served, with_slope

    rng = np.random.default_rng(12)
    lens = [int(v) for v in rng.integers(1, 30, 50)]
    acts = _acts(lens, [0] * 50, seed=13)
    mask = np.ones(acts.n_rows, bool)
    lead = rng.integers(0, 3, 50)  # out-of-scope rows before the user's text (one span each)
    for i in range(50):
        mask[np.flatnonzero(acts.example == i)[: min(int(lead[i]), lens[i] - 1)]] = False
    no_text = cast("list[ChatExample]", [None] * 50)
    sd = SourceData(Source("b", "benign", "train", "v2", "f"), no_text, acts, mask)
    probe = LinearProbe(3, np.array([0.7, -0.2, 0.1, 0, 0.4, -0.3], np.float32), 0.2,
                        np.zeros(6, np.float32), np.ones(6, np.float32))
    assert sd.skipping(0) is sd
    with pytest.raises(ValueError, match="k: expected >= 0"):
        sd.skipping(-1)
    for k in (1, 4):
        v = sd.skipping(k)
        assert sd.skipping(k) is v and v.acts is sd.acts  # one view per k, same rows
        a = 0.37
        agg = skipping_served([(with_slope({"kind": "mean_logit"}, a), 1, 1.0, "span_end"),
                               ({"kind": "mean"}, 1, 1.0, "span_end")], k)
        assert [x[0] for x in agg] == [{"kind": "mean_logit", "length_slope": a,
                                        "skip_tokens": k}]
        served = served_scores(probe, acts, mask, agg[0][0], 1, judge_at="span_end")
        feats = v.features(3)
        n_pooled = v.in_scope_tokens()
        for i in range(50):
            rows = acts.x[3][(acts.example == i) & mask].astype(np.float32)
            kept = rows[k:] if len(rows) > k else rows
            np.testing.assert_allclose(feats[i], kept.mean(0), rtol=1e-5, atol=1e-6)
            assert n_pooled[i] == len(kept)
            z = float(kept.mean(0) @ probe.weight + probe.bias) - a * np.log(len(kept))
            assert served[i] == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-5)
    with pytest.raises(ValueError, match="skip_tokens: a probe fit without the first 2"):
        skipping_served([({"kind": "mean"}, 1, 1.0, "span_end")], 2)


def test_fold_metrics_and_rows_read_logits_like_their_sigmoid() -> None:
    """Read-out 0 of a fold is the pooled LOGIT: thresholds on it must not be clipped to
    [0, 1] (with the clip every logit above 1 alerted: tpr 0.98 / fpr 0.49 where the
    sigmoid of the same scores gives the true 0.40 / 0.004)."""
    from probes.harmful import fold_metrics, fold_rows
    from probes.pooled import Fold

    rng = np.random.default_rng(5)

    def src(name: str, kind: str) -> SourceData:
        return cast("SourceData", type("S", (), {"source": Source(name, kind, "train",
                                                                  "project", name),
                                                  "name": name})())

    folds_z, folds_p = [], []
    cal = rng.normal(2.0, 1.0, 600)                     # benign logits, mostly above 1
    groups = np.repeat(["a", "b", "c"], 200)
    for name, kind, mu in (("h1", "harmful", 4.0), ("h2", "harmful", 3.5),
                           ("b1", "benign", 2.0), ("b2", "benign", 2.2)):
        z = rng.normal(mu, 1.0, 300)
        folds_z.append(Fold(src(name, kind), [z], [cal], groups))
        folds_p.append(Fold(src(name, kind), [1 / (1 + np.exp(-z))],
                            [1 / (1 + np.exp(-cal))], groups))
    for w in ("row", "source", "worst"):
        mz, mp = fold_metrics(folds_z, 0, w), fold_metrics(folds_p, 0, w)
        assert mz == pytest.approx(mp), w
        assert mz["fpr@cal1%"] < 0.05
        rz, rp = fold_rows(folds_z, 0, w), fold_rows(folds_p, 0, w)
        for name in rz:
            for sev in ("warn", "critical"):
                assert rz[name][f"rate@{sev}"] == rp[name][f"rate@{sev}"], (w, name, sev)


def test_category_rows_slice_each_source_by_category() -> None:
    """``category_scores`` splits a source with several categories into one entry per
    category (its own scores, sliced), groups categories below ``min_rows``, leaves
    one-category sources out, and
    ``source_rows`` then rates each category against the same reference as a plain count."""
    from probes.datasets import ChatExample
    from probes.harmful import category_scores, source_rows

    rng = np.random.default_rng(3)
    n = 9
    x = rng.normal(size=(n, 4)).astype(np.float16)
    acts = Activations((15,), {15: x}, np.arange(n), np.zeros(n, np.int64), np.zeros(n, bool),
                       np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, np.int8), n)
    cats = ["b", "a", None, "a", "b", "a", None, "b", "a"]
    ex = [ChatExample.make([{"role": "user", "content": f"q{i}"}], 1, category=c)
          for i, c in enumerate(cats)]
    sd = SourceData(Source("h", "harmful", "test", "v2", "f"), ex, acts, np.ones(n, bool))
    one = SourceData(Source("o", "benign", "test", "v2", "f"),
                     [ChatExample.make([{"role": "user", "content": "x"}], 0, category="c")] * n,
                     acts, np.ones(n, bool))
    s = np.linspace(0.1, 0.9, n)
    split = category_scores({"h": (sd, s), "o": (one, s)}, min_rows=1)
    assert list(split) == ["h / a", "h / b", "h / uncategorised"]
    idx = {"a": [1, 3, 5, 8], "b": [0, 4, 7], "uncategorised": [2, 6]}
    # categories below min_rows go together; a source left with one big category is out
    small = category_scores({"h": (sd, s)}, min_rows=3)
    assert list(small) == ["h / a", "h / b", "h / 1 smaller categories"]
    np.testing.assert_array_equal(small["h / 1 smaller categories"][1], s[[2, 6]])
    assert category_scores({"h": (sd, s)}, min_rows=4) == {}
    for c, want in idx.items():
        sub, sc = split[f"h / {c}"]
        np.testing.assert_array_equal(sc, s[want])
        assert [e.user_text for e in sub.examples] == [f"q{i}" for i in want]
        np.testing.assert_array_equal(sub.features(15), sd.features(15)[want])
    neg = np.array([0.2, 0.55, 0.3])
    rows = source_rows(split, {"warn": 0.5, "critical": 0.8}, np.zeros(0), neg)
    a = rows["h / a"]
    assert a["n"] == 4 and a["kind"] == "harmful"
    assert a["rate@warn"] == np.mean(s[idx["a"]] >= 0.5)
    assert a["rate@critical"] == np.mean(s[idx["a"]] >= 0.8)
    want_auc = np.mean([(p > q) + 0.5 * (p == q) for p in s[idx["a"]] for q in neg])
    assert a["auroc"] == pytest.approx(want_auc)


def test_fold_category_rows_score_each_category_by_its_sources_fold() -> None:
    """Validation per category: each category's slice of the held-out scores against the
    fold's own calibration rows and thresholds, as a plain count."""
    from probes.calibrate import threshold_at_fpr
    from probes.datasets import ChatExample
    from probes.harmful import fold_category_rows
    from probes.pooled import Fold

    rng = np.random.default_rng(5)
    n = 60
    x = rng.normal(size=(n, 4)).astype(np.float16)
    acts = Activations((15,), {15: x}, np.arange(n), np.zeros(n, np.int64), np.zeros(n, bool),
                       np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, np.int8), n)
    cats = ["a"] * 25 + ["b"] * 30 + ["c"] * 5
    ex = [ChatExample.make([{"role": "user", "content": f"q{i}"}], 1, category=c)
          for i, c in enumerate(cats)]
    held = SourceData(Source("h", "harmful", "train", "v2", "f"), ex, acts, np.ones(n, bool))
    served = rng.random(n)
    cal = rng.random(300) * 0.9
    f = Fold(held, [rng.normal(size=n), served], [rng.normal(size=300), cal])
    rows = fold_category_rows([f])
    assert list(rows) == ["h / a", "h / b", "h / 1 smaller categories"]
    t = {"warn": threshold_at_fpr(cal, 0.01, clip=False),
         "critical": threshold_at_fpr(cal, 0.001, clip=False)}
    for key, idx in (("h / a", np.arange(25)), ("h / b", np.arange(25, 55)),
                     ("h / 1 smaller categories", np.arange(55, 60))):
        r, s = rows[key], served[idx]
        assert r["n"] == idx.size
        for sev in t:
            assert r[f"rate@{sev}"] == np.mean(s >= t[sev])
        assert r["auroc"] == pytest.approx(np.mean([(p > q) + 0.5 * (p == q)
                                                    for p in s for q in cal]))
