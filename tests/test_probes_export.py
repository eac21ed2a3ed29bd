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

    @property
    def thresholds(self) -> dict[str, float]:
        return {"warn": self.calibration["fpr_0.01"], "critical": self.calibration["fpr_0.001"]}


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


def test_export_rejects_wrong_dimension(tmp_path: Path) -> None:
    from probes.export import export_bundle

    with pytest.raises(bundle_mod.BundleError):
        export_bundle(tmp_path, [cast("DetectorResult", _Result("x", _probe(2, 16, 0)))],
                      model_name="m",
                      d_model=32, n_layers=6, name="t")
