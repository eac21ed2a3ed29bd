"""The checked-in default bundle loads in the sidecar and its calibration holds on a
small slice of the shared datasets (skips without ../shared/datasets or the model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "default"
DATASETS = REPO.parent / "shared" / "datasets"


def test_default_bundle_loads_and_has_calibration() -> None:
    from monitor.score.bundle import load_bundle

    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("bundles/default not built")
    b = load_bundle(BUNDLE)
    names = {d.name: d for d in b.detectors}
    assert {"harmful_intent", "deception"} <= set(names)
    assert names["harmful_intent"].token_scope in ("user", "prompt")
    assert names["deception"].token_scope == "generated"
    for d in b.detectors:
        cal = d.calibration
        # the calibration keys behind the ladder (a detector served in a union takes a
        # share of the budget: probes.window), else the 1% / 0.1% ones
        keys = cal.get("thresholds_from", {"warn": "fpr_0.01", "critical": "fpr_0.001"})
        assert 0 < cal[keys["warn"]] <= cal[keys["critical"]] <= 1
        assert d.default_thresholds["warn"] == pytest.approx(cal[keys["warn"]])
        from monitor.judge.aggregate import AGGREGATION_KINDS

        assert cal["aggregation"]["kind"] in AGGREGATION_KINDS
        assert d.provenance["metrics"]
    from monitor.judge.policy import check_policy, load_policy

    pol = load_policy(BUNDLE / "policy.suggested.yaml")
    assert set(pol.detectors) == set(names)
    for name, d in names.items():  # the suggested policy judges the tokens it was trained on
        assert pol.detectors[name].scope == d.token_scope
        # and is judged where the calibration was measured (every token or span end)
        assert pol.detectors[name].judge_at == d.calibration.get("judge_at", "every_token")
    assert not [w for w in check_policy(pol, b) if "below" in w]
    # the window read-out reads harmful_intent's probe (one component), judged every
    # token, and the two thresholds are the union's (split calibration)
    win = names["harmful_intent_window"]
    assert [i.component for i in win.inputs] == [i.component
                                                  for i in names["harmful_intent"].inputs]
    assert pol.detectors["harmful_intent_window"].judge_at == "every_token"
    assert pol.detectors["harmful_intent_window"].aggregation.kind == "window_mean_logit"
    union = win.calibration["union"]
    for sev in ("warn", "critical"):
        assert union[sev]["harmful_intent"] == pytest.approx(
            names["harmful_intent"].default_thresholds[sev])
        assert union[sev]["harmful_intent_window"] == pytest.approx(
            win.default_thresholds[sev])
    # policies/default.yaml judges both the way the bundle was calibrated
    pols = load_policy(REPO / "policies" / "default.yaml").detectors
    for name in ("harmful_intent", "harmful_intent_window"):
        default = pols[name]
        assert default.aggregation == pol.detectors[name].aggregation
        assert default.judge_at == pol.detectors[name].judge_at
        assert default.scope == pol.detectors[name].scope
        assert default.min_tokens == pol.detectors[name].min_tokens
        assert dict(default.thresholds) == pytest.approx(
            dict(names[name].default_thresholds), abs=1e-6)
        for sev, t in names[name].default_thresholds.items():
            # written rounded UP (probes.calibrate.policy_threshold): a threshold rounded
            # down alerts on the calibration score it sits just above
            assert dict(default.thresholds)[sev] >= t, (name, sev)
            assert dict(pol.detectors[name].thresholds)[sev] >= t, (name, sev)
    hi = names["harmful_intent"].calibration
    assert pols["harmful_intent"].aggregation.length_slope == hi.get("length_slope", 0.0)
    assert pols["harmful_intent"].aggregation.skip_tokens == hi.get("skip_tokens", 0)


@pytest.mark.slow
def test_default_bundle_calibration_on_shared_slice() -> None:
    """Harmful-intent served exactly like the sidecar (the bundle's Scorer on captured
    rows, the policy's scope, aggregation and judge_at via monitor.judge.aggregate):
    held-out Do-Not-Answer questions mostly alert, held-out OpenAssistant chat mostly does
    not; the served statistic (length term included) is the trained one,
    ``σ(z(x̄) − a·log n)``, on these real rows."""
    from probes.sources import HARMFUL_SOURCES, load_source, sources_available

    if not sources_available():
        pytest.skip("../shared datasets absent")
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("bundles/default not built")
    try:
        from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model

        path = prepare_default_model()
    except Exception as e:
        pytest.skip(f"default model unavailable: {e}")
    import torch

    from monitor.judge.policy import load_policy
    from monitor.score.bundle import load_bundle
    from monitor.score.scorer import Scorer
    from probes.collect import TokenSelection, TransformersCollector
    from probes.evaluate import auroc
    from probes.harmful import scope_mask, token_roles
    from probes.train import aggregate_requests

    b = load_bundle(BUNDLE)
    det = next(d for d in b.detectors if d.name == "harmful_intent")
    pol = load_policy(BUNDLE / "policy.suggested.yaml").detectors["harmful_intent"]
    src = {s.name: s for s in HARMFUL_SOURCES}
    pos = load_source(src["do_not_answer"])[:40]
    neg = load_source(src["oasst"])[:80]
    col = TransformersCollector(path, DEFAULT_MODEL_NAME)
    exs = pos + neg
    acts = col.collect(exs, [det.layer], TokenSelection("prompt"), progress=False)
    scorer = Scorer(b)
    tok = scorer.score(det.layer, torch.from_numpy(acts.x[det.layer].astype(np.float32)))
    tok = tok[:, scorer.detectors_on(det.layer).index("harmful_intent")]
    agg = {"kind": pol.aggregation.kind, **pol.aggregation.params()}
    mask = scope_mask(token_roles(acts, exs, col), str(pol.scope))
    s = aggregate_requests(np.asarray(tok), acts.example, acts.n_examples, agg,
                           pol.min_tokens, mask, pol.judge_at)
    y = acts.labels.astype(bool)
    warn = dict(pol.thresholds)["warn"]
    # the bundle as served == the recipe's read-out of the same tensors (export is exact)
    from probes.harmful import served_scores
    from probes.train import LinearProbe

    comp = b.components[f"harmful_intent_logreg_l{det.layer}"]
    t = {k: v.numpy() for k, v in comp.tensors.items()}
    probe = LinearProbe(det.layer, t["weight"][:, 0], float(t["bias"][0]), t["mean"], t["std"])
    np.testing.assert_allclose(s, served_scores(probe, acts, mask, agg, pol.min_tokens,
                                                judge_at=pol.judge_at), atol=2e-5)
    if pol.aggregation.kind == "mean_logit" and pol.judge_at == "span_end":
        from monitor.judge.aggregate import LOGIT_EPS, span_end_rows
        from probes.harmful import pooled_features

        a = float(pol.aggregation.length_slope or 0.0)
        assert a == det.calibration.get("length_slope", 0.0)
        # skip_tokens k: the first k in-scope rows of a request with more than k are not
        # pooled (the probe was fit so: probes.pooled.SourceData.skipping)
        k = int(pol.aggregation.skip_tokens or 0)
        assert k == det.calibration.get("skip_tokens", 0)
        pool = mask.copy()
        for i in range(acts.n_examples):
            r = np.flatnonzero(mask & (acts.example == i))
            if r.size > k:
                pool[r[:k]] = False
        n = np.bincount(acts.example[pool], minlength=acts.n_examples)
        one = np.array([span_end_rows(mask[acts.example == i]).sum() == 1
                        for i in range(acts.n_examples)])
        assert one.sum() >= 0.9 * acts.n_examples
        # plain reference of the served statistic on requests with one span in scope (one
        # judged token): σ(mean of the clipped logits of the sidecar's token scores over the
        # pooled rows − a·ln n), n = the rows pooled
        q = np.clip(np.asarray(tok, np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
        lg = np.log(q) - np.log1p(-q)
        mean_lg = np.bincount(acts.example[pool], lg[pool], acts.n_examples) / np.maximum(n, 1)
        ref = 1 / (1 + np.exp(-(mean_lg - a * np.log(np.maximum(n, 1)))))
        np.testing.assert_allclose(s[one], ref[one], rtol=1e-9)
        # = the trained statistic σ(z(x̄) − a·ln n) (the probe on the mean activation) where
        # no token's logit saturates the float32 score (|z_t| > 13.8 is clipped, as served)
        zt = ((acts.x[det.layer].astype(np.float32) - probe.mean) / probe.std) @ probe.weight
        zt = zt + probe.bias
        sat = np.bincount(acts.example[pool & (np.abs(zt) > 13.0)],
                          minlength=acts.n_examples) > 0
        z = (pooled_features(acts, det.layer, pool) - probe.mean) / probe.std @ probe.weight
        z = z + probe.bias - a * np.log(np.maximum(n, 1))
        ok = one & ~sat
        assert ok.sum() >= 0.5 * acts.n_examples
        np.testing.assert_allclose(s[ok], 1 / (1 + np.exp(-z[ok])), atol=1e-3)
        # the length term lowers a long benign request's score by exactly a·ln n in logit
        plain = aggregate_requests(np.asarray(tok), acts.example, acts.n_examples,
                                   {"kind": "mean_logit", "skip_tokens": k}, pol.min_tokens,
                                   mask, pol.judge_at)
        i = int(np.flatnonzero(one & ~y)[np.argmax(n[one & ~y])])

        def logit(p: float) -> float:
            return float(np.log(p) - np.log1p(-p))

        assert logit(plain[i]) - logit(s[i]) == pytest.approx(a * np.log(n[i]), rel=1e-6)
        assert n[i] > 50 and (s[i] < plain[i]) == (a > 0)
    # quality on this slice, loosely (REPORT.md has the whole sources with CIs)
    assert auroc(y, s) > 0.7
    assert (s[~y] >= warn).mean() <= 0.2
