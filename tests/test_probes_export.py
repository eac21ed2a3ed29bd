"""Export round trip: the sidecar's scorer reproduces the probe's per-token scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import torch

from probes.train import LinearProbe

bundle_mod = pytest.importorskip("monitor.score.bundle")

if TYPE_CHECKING:
    from probes.export import DetectorResult


@dataclass
class _Result:
    """The fields of `probes.export.DetectorResult` that export reads (duck-typed)."""

    name: str
    probe: LinearProbe
    scope: str = "prompt"
    description: str = "test"
    aggregation: dict[str, Any] = field(default_factory=lambda: {"kind": "ema",
                                                                  "half_life_tokens": 4.0})
    min_tokens: int = 4
    calibration: dict[str, Any] = field(default_factory=lambda: {
        "fpr_0.01": 0.6, "fpr_0.001": 0.8, "benign_set": "synthetic", "n_benign": 10})
    metrics: dict[str, Any] = field(default_factory=lambda: {
        "test": {"auroc": 0.99, "per_category": {"a": {}}, "flagged": ["x"]}})
    selection: list[dict[str, Any]] = field(default_factory=list)
    datasets: list[str] = field(default_factory=lambda: ["synthetic"])
    token_labels: str = "synthetic"
    judge_at: str = "every_token"
    component_of: str = ""

    @property
    def thresholds(self) -> dict[str, float]:
        from probes.export import threshold_ladder

        return threshold_ladder(self.calibration)


def _probe(layer: int, d: int, seed: int) -> LinearProbe:
    rng = np.random.default_rng(seed)
    return LinearProbe(layer, rng.normal(size=d).astype(np.float32) * 0.3,
                       float(rng.normal()), rng.normal(size=d).astype(np.float32),
                       rng.uniform(0.5, 2, size=d).astype(np.float32), "logreg", 0.01)


def test_export_roundtrip_scores_match(tmp_path: Path) -> None:
    from monitor.judge.policy import check_policy, load_policy
    from monitor.score.scorer import Scorer
    from probes.export import export_bundle

    d = 32
    results = [_Result("harmful_intent", _probe(2, d, 0), judge_at="span_end"),
               _Result("deception", _probe(3, d, 1), scope="generated",
                       aggregation={"kind": "mean"})]
    bundle = export_bundle(tmp_path, cast("list[DetectorResult]", results), model_name="m",
                           d_model=d, n_layers=6, name="t")
    loaded = bundle_mod.load_bundle(tmp_path)
    assert [x.name for x in loaded.detectors] == ["harmful_intent", "deception"]
    spec = loaded.detectors[0]
    assert spec.calibration["fpr_0.01"] == 0.6 and spec.token_scope == "prompt"
    assert spec.default_thresholds == {"warn": 0.6, "critical": 0.8}
    assert spec.provenance["layer"] == 2 and spec.provenance["method"] == "logreg"
    scorer = Scorer(bundle)
    x = np.random.default_rng(2).normal(size=(50, d)).astype(np.float32)
    for r in results:
        out = scorer.score(r.probe.layer, torch.from_numpy(x))
        col = scorer.detectors_on(r.probe.layer).index(r.name)
        np.testing.assert_allclose(out[:, col], r.probe.scores(x), rtol=1e-4, atol=1e-5)
    pol = load_policy(tmp_path / "policy.suggested.yaml")
    assert pol.detectors["harmful_intent"].aggregation.kind == "ema"
    assert pol.detectors["harmful_intent"].judge_at == "span_end"
    assert pol.detectors["deception"].judge_at == "every_token"
    assert loaded.detectors[0].provenance["judge_at"] == "span_end"
    assert pol.detectors["deception"].scope == "generated"
    assert not [w for w in check_policy(pol, loaded) if "below" in w]


def test_two_detectors_on_one_probe_share_its_column_and_both_are_judged(
        tmp_path: Path) -> None:
    """harmful_intent and harmful_intent_window (``component_of``): the bundle holds the
    probe once, the sidecar's scorer gives both detectors its score, the suggested policy
    judges both (the window every token, ``thresholds_from`` its union keys), and on a
    request whose 8 hot tokens sit among 32 cool ones the tracker alerts the window
    detector while the span-end mean stays quiet."""
    from monitor.constants import RequestKey
    from monitor.judge.policy import check_policy, load_policy
    from monitor.judge.tracker import RequestTracker
    from monitor.roles import TokenRole
    from monitor.score.pack import pack_layer
    from monitor.score.scorer import Scorer
    from probes.export import export_bundle

    d = 16
    p = _probe(2, d, 3)
    base = _Result("harmful_intent", p, scope="user", judge_at="span_end",
                   aggregation={"kind": "mean_logit", "length_slope": 0.1},
                   min_tokens=1, calibration={"fpr_0.01": 0.55, "fpr_0.001": 0.8,
                                              "fpr_0.008": 0.6, "fpr_0.0008": 0.85,
                                              "thresholds_from": {"warn": "fpr_0.008",
                                                                  "critical": "fpr_0.0008"},
                                              "threshold_rule": "share of the union",
                                              "benign_set": "s", "n_benign": 10})
    win = _Result("harmful_intent_window", p, scope="user",
                  aggregation={"kind": "window_mean_logit", "window_tokens": 8},
                  min_tokens=1, component_of="harmful_intent",
                  calibration={"union_fpr_0.01": 0.7, "union_fpr_0.001": 0.9,
                               "thresholds_from": {"warn": "union_fpr_0.01",
                                                   "critical": "union_fpr_0.001"},
                               "benign_set": "s", "n_benign": 10})
    bundle = export_bundle(tmp_path, cast("list[DetectorResult]", [base, win]),
                           model_name="m", d_model=d, n_layers=6, name="t")
    loaded = bundle_mod.load_bundle(tmp_path)
    assert list(loaded.components) == ["harmful_intent_logreg_l2"]
    assert [x.name for x in loaded.detectors] == ["harmful_intent", "harmful_intent_window"]
    assert {x.name: x.default_thresholds for x in loaded.detectors} == {
        "harmful_intent": {"warn": 0.6, "critical": 0.85},
        "harmful_intent_window": {"warn": 0.7, "critical": 0.9}}
    assert pack_layer(loaded, 2).W.shape[1] == 1  # one column, read out twice
    # rows whose probe logit is -3 (32 of them) with 8 consecutive at +5
    unit = p.weight / float(p.weight @ p.weight)
    z = np.r_[np.full(12, -3.0), np.full(8, 5.0), np.full(20, -3.0)]
    x = (p.mean + p.std * np.outer(z - p.bias, unit)).astype(np.float32)
    np.testing.assert_allclose(p.logits(x), z, atol=1e-3)
    out = Scorer(bundle).score(2, torch.from_numpy(x))
    np.testing.assert_allclose(out[:, 0], out[:, 1])
    np.testing.assert_allclose(out[:, 0], p.scores(x), rtol=1e-4, atol=1e-5)
    pol = load_policy(tmp_path / "policy.suggested.yaml")
    assert pol.detectors["harmful_intent_window"].judge_at == "every_token"
    assert pol.detectors["harmful_intent_window"].aggregation.kind == "window_mean_logit"
    assert pol.detectors["harmful_intent"].judge_at == "span_end"
    assert not [w for w in check_policy(pol, loaded) if w.startswith(("error", "warning"))]
    tr = RequestTracker(pol)
    key = RequestKey("c", "r")
    pos, gen = np.arange(40, dtype=np.int64), np.zeros(40, bool)
    roles = np.full(40, int(TokenRole.USER), np.int8)
    ups = []
    for j, name in enumerate(("harmful_intent", "harmful_intent_window")):
        ups += tr.observe(key, name, pos, gen, np.asarray(out[:, j], np.float64), roles)
    finals = {u.detector: u for u in ups + tr.finish(key) if u.final}
    assert finals["harmful_intent"].severity == "none"      # σ(-1.4 - 0.1 ln 40) < 0.6
    assert finals["harmful_intent_window"].severity == "critical"  # σ(5) > 0.9
    # first window over critical: rows 10..17, 6 of them hot: mean logit 3, σ = 0.953
    assert finals["harmful_intent_window"].crossed_at_position == 17


def test_export_rejects_wrong_dimension(tmp_path: Path) -> None:
    from probes.export import export_bundle

    with pytest.raises(bundle_mod.BundleError):
        export_bundle(tmp_path, [cast("DetectorResult", _Result("x", _probe(2, 16, 0)))],
                      model_name="m",
                      d_model=32, n_layers=6, name="t")


def test_softmax_probe_bundle_serves_its_softmax_pooled_logit(tmp_path: Path) -> None:
    """A softmax probe (``probes.harmful`` ``pooling="softmax"``) exports as the same
    one-column linear probe; its suggested policy names ``softmax_logit`` with the
    temperature and slope, which the policy parser reads back, and the tracker's final
    score over the bundle's per-token scores is ``σ(L − a·ln n)``, ``L`` the
    softmax-pooled logit (``probes.token_pool.pool_logits``) of the probe's logits."""
    from monitor.constants import RequestKey
    from monitor.judge.aggregate import Aggregation
    from monitor.judge.policy import check_policy, load_policy
    from monitor.judge.tracker import RequestTracker
    from monitor.roles import TokenRole
    from monitor.score.scorer import Scorer
    from probes.export import export_bundle
    from probes.token_pool import pool_logits

    d = 16
    q = _probe(2, d, 4)
    p = LinearProbe(q.layer, q.weight, q.bias, q.mean, q.std, "softmax", 3e-3)
    agg = {"kind": "softmax_logit", "temperature": 2.0, "length_slope": 0.1}
    r = _Result("harmful_intent", p, scope="user", judge_at="span_end", aggregation=agg,
                min_tokens=1)
    bundle = export_bundle(tmp_path, cast("list[DetectorResult]", [r]), model_name="m",
                           d_model=d, n_layers=6, name="t")
    loaded = bundle_mod.load_bundle(tmp_path)
    assert list(loaded.components) == ["harmful_intent_softmax_l2"]
    assert loaded.detectors[0].provenance["aggregation"] == agg
    pol = load_policy(tmp_path / "policy.suggested.yaml")
    det = pol.detectors["harmful_intent"]
    assert det.aggregation == Aggregation("softmax_logit", temperature=2.0, length_slope=0.1)
    assert det.judge_at == "span_end"
    assert not [w for w in check_policy(pol, loaded) if w.startswith(("error", "warning"))]
    x = np.random.default_rng(5).normal(size=(30, d)).astype(np.float32) * 3 + p.mean
    out = Scorer(bundle).score(2, torch.from_numpy(x))[:, 0]
    tr = RequestTracker(pol)
    key = RequestKey("c", "r")
    roles = np.full(30, int(TokenRole.USER), np.int8)
    ups = tr.observe(key, "harmful_intent", np.arange(30, dtype=np.int64), np.zeros(30, bool),
                     np.asarray(out, np.float64), roles)
    (final,) = [u for u in ups + tr.finish(key) if u.final]
    z = p.logits(x).astype(np.float64)
    assert np.abs(z).max() < 12  # inside the aggregator's logit clip
    want = pool_logits(z, z / 2.0, np.zeros(30, np.int64), 1)[0] - 0.1 * np.log(30)
    assert final.score == pytest.approx(1 / (1 + np.exp(-want)), abs=1e-4)
