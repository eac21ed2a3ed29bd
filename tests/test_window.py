"""probes/window.py: the dilution study's read-outs, thresholds and lists, against plain
references (synthetic logits and activations; no model, no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probes import window
from probes.calibrate import threshold_at_fpr
from probes.collect import Activations
from probes.datasets import ChatExample
from probes.lists import Lists, NoFillerRows, long_requests, validation_lists
from probes.pooled import SourceData
from probes.sources import Source
from probes.window import (
    ZCLIP,
    Readout,
    WindowRow,
    choose,
    mean_logit,
    run_window_study,
    split_thresholds,
    union_thresholds,
    window_max_logit,
)


def _grouped(rng: np.random.Generator, n_ex: int, max_len: int
             ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Random logits grouped by example (some examples empty, some beyond ±ZCLIP)."""
    lens = rng.integers(0, max_len + 1, n_ex)
    per = [rng.normal(0, 6, int(k)) for k in lens]
    z = np.concatenate(per) if per else np.zeros(0)
    ex = np.repeat(np.arange(n_ex), lens)
    return z, ex, per


def _plain_window(zs: np.ndarray, n: int, m: int) -> float:
    best = -math.inf
    for t in range(1, len(zs) + 1):
        if t < m:
            continue
        w = [max(min(float(v), ZCLIP), -ZCLIP) for v in zs[max(0, t - n):t]]
        best = max(best, sum(w) / len(w))
    return best


def test_window_max_logit_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    z, ex, per = _grouped(rng, 40, 30)
    for n in (1, 2, 5, 8, 64):
        for m in (1, 3, n):
            got = window_max_logit(z, ex, 40, n, m)
            want = np.array([_plain_window(p, n, m) for p in per])
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # a request shorter than the window, every prefix judged: the max of its running means;
    # judged from the N-th token only: never judged
    short = np.array([3.0, -1.0, 0.5])
    assert window_max_logit(short, np.zeros(3, np.int64), 1, 8, 1)[0] == 3.0
    assert window_max_logit(short, np.zeros(3, np.int64), 1, 8, 8)[0] == -math.inf
    with pytest.raises(ValueError, match="expected >= 1"):
        window_max_logit(short, np.zeros(3, np.int64), 1, 0)
    with pytest.raises(ValueError, match="grouped in ascending order"):
        window_max_logit(short, np.array([1, 0, 1]), 2, 2)


def test_mean_logit_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    z, ex, per = _grouped(rng, 30, 20)
    got = mean_logit(z, ex, 30, 0.25)
    for g, p in zip(got, per, strict=True):
        if p.size == 0:
            assert g == -math.inf
            continue
        c = [max(min(float(v), ZCLIP), -ZCLIP) for v in p]
        assert g == pytest.approx(sum(c) / len(c) - 0.25 * math.log(len(c)), abs=1e-12)


def test_union_thresholds_hold_the_budget_and_are_the_smallest() -> None:
    rng = np.random.default_rng(2)
    for trial in range(40):
        n = int(rng.integers(50, 600))
        a = rng.random(n)
        b = np.round(0.5 * a + 0.5 * rng.random(n), 2 if trial % 2 else 12)  # ties sometimes
        ta, tb = union_thresholds(a, b, 0.01, 0.005)
        assert ta == threshold_at_fpr(a, 0.005)
        hit = (a >= ta) | (b >= tb)
        assert hit.sum() <= math.floor(0.01 * n + 1e-9)
        # the next lower distinct b among the rows a does not alert on would overspend
        below = np.unique(b[(a < ta) & (b < tb)])
        if below.size:
            assert ((a >= ta) | (b >= below[-1])).sum() > math.floor(0.01 * n + 1e-9)
    # the whole budget to a: b fires above every score a leaves
    a, b = np.linspace(0.001, 0.999, 200), np.linspace(0.999, 0.001, 200)  # inside (0, 1)
    ta, tb = union_thresholds(a, b, 0.01, 0.01)
    assert not ((a < ta) & (b >= tb)).any()
    with pytest.raises(ValueError, match="fpr_a <= fpr"):
        union_thresholds(a, b, 0.01, 0.02)
    with pytest.raises(ValueError, match="equal non-empty"):
        union_thresholds(a, b[:5], 0.01, 0.005)


def _fits(tb: float, ta: float, ra: np.ndarray, rb: np.ndarray, la: np.ndarray,
          lb: np.ndarray) -> bool:
    """The union (a >= ta or b >= tb) keeps 1% on the rows and on the lists, each."""
    return bool((((ra >= ta) | (rb >= tb)).sum() <= math.floor(0.01 * ra.size + 1e-9))
                and (((la >= ta) | (lb >= tb)).sum() <= math.floor(0.01 * la.size + 1e-9)))


def test_split_thresholds_bound_each_population_and_are_the_smallest() -> None:
    # T_a on the rows alone; T_b the smallest that keeps the union within budget on the
    # rows AND on the lists (brute force over every candidate threshold)
    rng = np.random.default_rng(5)
    for trial in range(30):
        n, m = int(rng.integers(100, 500)), int(rng.integers(100, 1500))
        ra, rb = rng.random(n), rng.random(n)
        la = 0.8 * rng.random(m)  # the lists' mean read-out is diluted
        # hot windows, ties sometimes; inside (0, 1) like any sigmoid (thresholds clip to 1)
        lb = 0.001 + 0.998 * np.round(rng.random(m) ** 0.5, 2 if trial % 2 else 12)
        ta, tb = split_thresholds(ra, rb, la, lb, 0.01, 0.008)
        assert ta == threshold_at_fpr(ra, 0.008)  # the lists never move T_a

        assert _fits(tb, ta, ra, rb, la, lb)
        lower = np.unique(np.concatenate([rb, lb]))
        lower = lower[lower < tb]
        if lower.size:
            assert not _fits(lower[-1], ta, ra, rb, la, lb)
    with pytest.raises(ValueError, match="equal non-empty"):
        split_thresholds(ra, rb, la, lb[:3], 0.01, 0.008)


def test_served_union_is_split_thresholds_per_severity_with_its_counts() -> None:
    """The served pair (window.served_union): per severity, split_thresholds at the
    budget with SERVED_SHARE of it to A; the counts it records are the alerts on each
    calibration population, within budget; union_rates counts "either fires"."""
    from probes.evaluate import wilson_ci

    rng = np.random.default_rng(11)
    ra, rb = rng.random(1600), rng.random(1600)
    la, lb = 0.7 * rng.random(1000), rng.random(1000) ** 0.5
    lv = window.served_union(ra, rb, la, lb)
    assert set(lv) == {"warn", "critical"} and window.SERVED_SHARE == 0.8
    for sev, fpr in (("warn", 0.01), ("critical", 0.001)):
        v = lv[sev]
        assert (v.t_a, v.t_b) == split_thresholds(ra, rb, la, lb, fpr, 0.8 * fpr)
        assert (v.n_rows, v.n_lists) == (1600, 1000)
        assert v.rows_a == int((ra >= v.t_a).sum()) <= int(0.8 * fpr * 1600)
        assert v.rows_union == int(((ra >= v.t_a) | (rb >= v.t_b)).sum()) <= int(fpr * 1600)
        assert v.lists_union == int(((la >= v.t_a) | (lb >= v.t_b)).sum()) <= int(fpr * 1000)
    assert lv["warn"].t_a <= lv["critical"].t_a and lv["warn"].t_b <= lv["critical"].t_b
    a, b = np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0])
    got = window.union_rates(a, b, lv)
    assert got["n"] == 4 and got["rate@warn"] == 0.5 and got["rate@warn_ci"] == wilson_ci(2, 4)
    with pytest.raises(ValueError, match="share"):
        window.served_union(ra, rb, la, lb, share=0.0)


def _src(name: str, kind: str, lens: list[int], hot: float, rng: np.random.Generator,
         texts: list[str] | None = None) -> SourceData:
    """Examples of the given token counts; feature 0 of every row ~ N(0, 1) + ``hot``."""
    n, rows = len(lens), int(sum(lens))
    x = rng.normal(size=(rows, 4)).astype(np.float16)
    x[:, 0] += hot
    label = int(kind == "harmful")
    acts = Activations((15,), {15: x}, np.repeat(np.arange(n), lens), np.zeros(rows, np.int64),
                       np.zeros(rows, bool), np.zeros(rows, np.int64), np.zeros(rows, np.int64),
                       np.full(n, label, np.int8), n)
    texts = texts or [f"{name} request {i}" for i in range(n)]
    exs = [ChatExample.make([{"role": "user", "content": t}], label, source=name)
           for t in texts]
    return SourceData(Source(name, kind, "train", "project", f"{name}.jsonl"), exs, acts,
                      np.ones(rows, bool))


def test_validation_lists_draw_only_from_calibration_rows_in_disjoint_halves() -> None:
    rng = np.random.default_rng(3)
    train = [_src("h1", "harmful", [3] * 10, 0, rng), _src("h2", "harmful", [3] * 12, 0, rng),
             _src("alpaca", "benign", [3] * 40, 0, rng), _src("medquad", "scary", [3] * 30, 0, rng),
             _src("personas_train", "persona", [3] * 20, 0, rng),
             _src("long", "benign", [3] * 10, 0, rng, ["x" * 500] * 10)]
    cal = {"h1": np.arange(0), "h2": np.arange(0), "alpaca": np.arange(0, 40, 3),
           "medquad": np.arange(0, 30, 2), "personas_train": np.arange(10),
           "long": np.arange(10)}
    meta = validation_lists(train, cal, n_per_harmful=5, n_benign=20, n_calibration=15)
    assert len(meta.where("harmful")) == 10 and len(meta.where("benign")) == 20
    # calibration lists per filler kind: 15 of ordinary fillers only, 15 of scary only
    kinds = np.array(meta.filler_kind)
    assert sorted(kinds[meta.where("calibration")].tolist()) == ["benign"] * 15 + ["scary"] * 15
    assert set(kinds[meta.where("benign")]) == set(kinds[meta.where("harmful")]) == {"mixed"}
    kind_of = {d.name: d.source.kind for d in train}
    for i in meta.where("calibration"):
        assert {kind_of[s] for s in meta.filler_sources[i]} == {kinds[i]}
    src = {d.name: d for d in train}
    cal_text = {src[s].examples[int(i)].user_text: s for s in ("alpaca", "medquad")
                for i in cal[s]}
    used: dict[str, set[str]] = {"calibration": set(), "reported": set()}
    for i, e in enumerate(meta.examples):
        items = [ln.split(". ", 1)[1] for ln in e.user_text.splitlines()[1:-1]]
        task = meta.task_source[i]
        if meta.role[i] == "harmful":
            own = {x.user_text for x in src[task].examples}
            assert sum(x in own for x in items) == 1 and e.label == 1
            items = [x for x in items if x not in own]
        else:
            assert task == "" and e.label == 0
        # fillers: short calibration rows of benign / scary sources only, provenance kept
        assert all(x in cal_text for x in items)
        assert meta.filler_sources[i] == frozenset(cal_text[x] for x in items)
        used["calibration" if meta.role[i] == "calibration" else "reported"] |= set(items)
    assert used["calibration"] and used["reported"]
    assert not used["calibration"] & used["reported"]


def test_calibration_mix_changes_only_the_calibration_lists() -> None:
    """``pooled`` (runs 1-5) draws each calibration list from every kind's fillers; the
    harmful and reported lists are the same lists under either mix."""
    rng = np.random.default_rng(5)
    train = [_src("h1", "harmful", [3] * 10, 0, rng), _src("alpaca", "benign", [3] * 40, 0, rng),
             _src("medquad", "scary", [3] * 40, 0, rng)]
    cal = {"h1": np.arange(0), "alpaca": np.arange(0, 40, 2), "medquad": np.arange(0, 40, 2)}
    per = validation_lists(train, cal, n_per_harmful=4, n_benign=10, n_calibration=40)
    pooled = validation_lists(train, cal, n_per_harmful=4, n_benign=10, n_calibration=40,
                              calibration_mix="pooled")
    for r in ("harmful", "benign"):
        assert [per.examples[i] for i in per.where(r)] == [pooled.examples[i]
                                                           for i in pooled.where(r)]
    c = pooled.where("calibration")
    assert len(c) == 40 and {pooled.filler_kind[i] for i in c} == {"mixed"}
    # drawn from both kinds' pools: some lists hold fillers of both
    assert any(pooled.filler_sources[i] == {"alpaca", "medquad"} for i in c)
    with pytest.raises(ValueError, match="calibration_mix"):
        validation_lists(train, cal, calibration_mix="balanced")


def test_split_thresholds_hold_the_rate_on_every_group_of_lists() -> None:
    """With ``groups`` (each list's filler kind) the union holds ``fpr`` on the rows and on
    each group's lists separately: one hot group of lists moves ``T_b`` where pooling all
    lists would dilute it below the budget; the threshold is the least that does so."""
    rng = np.random.default_rng(12)
    ra, rb = rng.random(800), rng.random(800) * 0.9
    la = 0.5 * rng.random(600)
    lb = np.concatenate([rng.random(400) * 0.95, 0.9 + 0.1 * rng.random(200)])  # scary hot
    g = np.array(["benign"] * 400 + ["scary"] * 200)
    for fpr in (0.01, 0.001):
        ta, tb_pooled = split_thresholds(ra, rb, la, lb, fpr, 0.8 * fpr)
        ta2, tb = split_thresholds(ra, rb, la, lb, fpr, 0.8 * fpr, g)
        assert ta2 == ta and tb >= tb_pooled
        for k in ("benign", "scary"):
            sel = g == k
            assert int(((la[sel] >= ta) | (lb[sel] >= tb)).sum()) <= int(fpr * sel.sum())
        assert int(((ra >= ta) | (rb >= tb)).sum()) <= int(fpr * 800)
        sel = g == "scary"   # the hot group decides, and pooled it would exceed its budget
        assert tb == window.second_threshold(la[sel], lb[sel], ta, fpr)
        if fpr == 0.01:   # (at 0.1% no list of 600 may alert either way)
            assert int(((la[sel] >= ta) | (lb[sel] >= tb_pooled)).sum()) > int(fpr * 200)
    lv = window.served_union(ra, rb, la, lb, groups=g)
    for sev, fpr in (("warn", 0.01), ("critical", 0.001)):
        v = lv[sev]
        assert (v.t_a, v.t_b) == split_thresholds(ra, rb, la, lb, fpr, 0.8 * fpr, g)
        assert v.by_group == {k: (int(((la >= v.t_a) | (lb >= v.t_b))[g == k].sum()),
                                  int((g == k).sum())) for k in ("benign", "scary")}
        assert v.lists_union == sum(a for a, _ in v.by_group.values())
    with pytest.raises(ValueError, match="groups"):
        split_thresholds(ra, rb, la, lb, 0.01, 0.008, g[:5])


def test_validation_lists_refuse_sources_without_short_calibration_rows() -> None:
    """A ``--limit`` smoke build can leave one short benign calibration row (one half
    empty) or only long ones: a named refusal (``NoFillerRows``), never empty lists."""
    rng = np.random.default_rng(4)
    train = [_src("h1", "harmful", [3] * 4, 0, rng), _src("alpaca", "benign", [3] * 3, 0, rng),
             _src("long", "benign", [3] * 4, 0, rng, ["x" * 500] * 4)]
    for cal_alpaca in (np.arange(0), np.arange(1)):
        cal = {"h1": np.arange(0), "alpaca": cal_alpaca, "long": np.arange(4)}
        with pytest.raises(NoFillerRows, match=r"short calibration rows.*found 0 / "):
            validation_lists(train, cal, n_per_harmful=1, n_benign=2, n_calibration=4)
    cal = {"h1": np.arange(0), "alpaca": np.arange(2), "long": np.arange(4)}
    meta = validation_lists(train, cal, n_per_harmful=1, n_benign=2, n_calibration=4)
    assert len(meta.where("calibration")) == 4


def test_long_requests_picked_records_the_fillers_without_changing_the_lists() -> None:
    fill = [ChatExample.make([{"role": "user", "content": f"f{i}"}], 0) for i in range(9)]
    task = [ChatExample.make([{"role": "user", "content": "t"}], 1)]
    picked: list[list[int]] = []
    a = long_requests(task, fill, 6, 5, "s", True)
    b = long_requests(task, fill, 6, 5, "s", True, picked)
    assert a == b and len(picked) == 6
    for e, idx in zip(b, picked, strict=True):
        items = [ln.split(". ", 1)[1] for ln in e.user_text.splitlines()[1:-1]]
        assert [x for x in items if x != "t"] == [f"f{j}" for j in idx]


def _row(name: str, window_n: int, rates: dict[str, float]) -> WindowRow:
    return WindowRow(Readout(name, window_n), {g: (round(1000 * rates.get(g, 0.0)), 1000)
                                               for g in window.GROUPS}, {})


def test_choose_applies_the_written_rule() -> None:
    base = _row("a", 0, {"hidden harmful (lists)": 0.05, "short harmful": 0.5,
                         "ordinary": 0.02, "scary": 0.10})
    good = _row("u16", 16, {"hidden harmful (lists)": 0.40, "short harmful": 0.49,
                            "ordinary": 0.03, "scary": 0.10, "benign lists": 0.02})
    better_but_noisy = _row("u8", 8, {"hidden harmful (lists)": 0.60, "short harmful": 0.5,
                                      "ordinary": 0.035, "scary": 0.10})
    lists_fire = _row("u32", 32, {"hidden harmful (lists)": 0.70, "short harmful": 0.5,
                                  "benign lists": 0.03})
    short_drop = _row("u64", 64, {"hidden harmful (lists)": 0.70, "short harmful": 0.47})
    small_gain = _row("u4", 4, {"hidden harmful (lists)": 0.09, "short harmful": 0.5})
    assert choose([base, good, better_but_noisy, lists_fire, short_drop, small_gain]) is good
    assert choose([base, better_but_noisy, lists_fire, short_drop, small_gain]) is None


def test_run_window_study_catches_a_diluted_item_and_scores_each_list_once() -> None:
    rng = np.random.default_rng(4)
    def short(n: int) -> list[int]:
        return [int(k) for k in rng.integers(4, 9, n)]

    train = [_src("h1", "harmful", short(60), 3.0, rng),
             _src("h2", "harmful", short(60), 3.0, rng),
             _src("alpaca", "benign", short(300), 0.0, rng),
             _src("medquad", "scary", short(300), 0.0, rng),
             _src("personas_train", "persona", short(100), 0.0, rng)]
    cal = {"h1": np.arange(0), "h2": np.arange(0), "alpaca": np.arange(0, 300, 2),
           "medquad": np.arange(0, 300, 2), "personas_train": np.arange(0, 100, 2)}
    fit = {d.name: np.setdiff1d(np.arange(d.acts.n_examples), cal[d.name]) for d in train}
    # 40 lists of 60 tokens with a 10-token harmful stretch in the middle, 40 benign lists
    # (fillers from alpaca) and 40 calibration lists (fillers from medquad)
    n = 120
    hot = _src("lists", "benign", [60] * n, 0.0, rng)
    ex = hot.acts.example
    pos = np.arange(ex.size) - 60 * ex
    hot.acts.x[15][(ex < 40) & (pos >= 25) & (pos < 35), 0] += 3.0
    meta = Lists(hot.examples, ["h1"] * 20 + ["h2"] * 20 + [""] * 80,
                 [frozenset({"alpaca"})] * 80 + [frozenset({"medquad"})] * 40,
                 ["harmful"] * 40 + ["benign"] * 40 + ["calibration"] * 40,
                 ["mixed"] * 80 + ["scary"] * 40)
    seen: list[str] = []
    rows = run_window_study(
        train, hot, meta, window.readouts((8,)), fit, cal,
        lambda parts: ((lambda d: d.rows(15)[:, 0].astype(np.float64)), 0.0), 0.01,
        seen.append)
    base, union = rows[0], next(r for r in rows if r.readout.window == 8
                                and r.readout.min_tokens == 8 and not r.readout.b_only)
    for r in rows:      # every list and every held-out row scored exactly once
        assert r.counts["hidden harmful (lists)"][1] == 40
        assert r.counts["benign lists"][1] == 40
        assert r.counts["short harmful"][1] == 120 and r.counts["persona"][1] == 100
    assert base.rate("hidden harmful (lists)") < 0.2 < 0.9 < union.rate("hidden harmful (lists)")
    assert union.rate("benign lists") <= 0.1
    # fold medquad calibrates without the lists filled from medquad rows
    assert any(s.startswith("fold medquad") and s.endswith(" 0 calibration lists")
               for s in seen)
    assert any(s.startswith("fold alpaca") and s.endswith(" 40 calibration lists")
               for s in seen)
    text = window.window_markdown(rows)
    assert "Rule's choice" in text and "lists with a h1 task" in text


def test_the_study_reads_what_the_served_aggregation_serves() -> None:
    """Read-out B of the study = the tracker's statistic for ``window_mean_logit`` with
    ``judge_at: every_token`` (``max_{t ≥ min_tokens} a_t``, 0 when never judged), and
    read-out A = ``mean_logit`` with ``length_slope`` at ``span_end``."""
    from probes.train import aggregate_requests

    rng = np.random.default_rng(5)
    z, ex, _ = _grouped(rng, 25, 40)
    s = 1.0 / (1.0 + np.exp(-z))                     # float64 scores: the same math exactly
    for n, m in ((8, 1), (8, 8), (3, 3), (64, 1)):
        served = aggregate_requests(s, ex, 25, {"kind": "window_mean_logit",
                                                "window_tokens": n}, m)
        study = 1.0 / (1.0 + np.exp(-window_max_logit(z, ex, 25, n, m)))
        np.testing.assert_allclose(study, served, rtol=1e-9, atol=1e-12)
    served = aggregate_requests(s, ex, 25, {"kind": "mean_logit", "length_slope": 0.3}, 1,
                                judge_at="span_end")
    study = 1.0 / (1.0 + np.exp(-mean_logit(z, ex, 25, 0.3)))
    np.testing.assert_allclose(study, served, rtol=1e-9, atol=1e-12)


def test_study_mean_readout_with_skip_tokens_is_the_served_mean_logit() -> None:
    """With ``skip_tokens`` the study's read-out ``A`` pools what the served ``mean_logit``
    with ``skip_tokens`` pools (the first ``k`` in-scope rows of a longer request left
    out, ``n`` the rows pooled), and ``B`` still reads every in-scope row."""
    from probes.train import aggregate_requests
    from probes.window import _probe_scores

    rng = np.random.default_rng(9)
    d = _src("alpaca", "benign", [int(k) for k in rng.integers(1, 30, 40)], 0.0, rng)
    d.mask[np.flatnonzero(d.acts.example == 3)[:2]] = False   # out-of-scope rows first
    rows = d.acts.x[15].astype(np.float64)

    def logits(s: SourceData) -> np.ndarray:
        return rows[s.mask, 0]

    s = np.zeros(d.acts.n_rows)
    s[d.mask] = 1.0 / (1.0 + np.exp(-rows[d.mask, 0]))
    for k in (0, 3):
        a, b = _probe_scores(d, logits, 0.3, [(8, 1)], k)
        served = aggregate_requests(s, d.acts.example, d.acts.n_examples,
                                    {"kind": "mean_logit", "length_slope": 0.3,
                                     "skip_tokens": k}, 1, d.mask, "span_end")
        np.testing.assert_allclose(a, served, rtol=1e-9, atol=1e-12)
        window_served = aggregate_requests(s, d.acts.example, d.acts.n_examples,
                                           {"kind": "window_mean_logit", "window_tokens": 8},
                                           1, d.mask)
        np.testing.assert_allclose(b[(8, 1)], window_served, rtol=1e-9, atol=1e-12)


def test_second_threshold_logs_a_population_the_first_read_out_already_exceeds(
        caplog: pytest.LogCaptureFixture) -> None:
    a = np.r_[np.full(12, 0.99), np.linspace(0.0, 0.5, 188)]   # 12 of 200 above T_a
    b = np.linspace(0.0, 0.99, 200)   # served window statistics stay below 1 (ZCLIP)
    with caplog.at_level("WARNING", logger="probes.window"):
        tb = window.second_threshold(a, b, 0.9, 0.01)          # 2 allowed
    assert "12 of 200" in caplog.text
    assert not (b[a < 0.9] >= tb).any()                       # b adds no alert
    caplog.clear()
    with caplog.at_level("WARNING", logger="probes.window"):
        window.second_threshold(a, b, 0.995, 0.01)
    assert not caplog.text
