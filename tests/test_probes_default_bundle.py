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
    assert names["harmful_intent"].token_scope == "prompt"
    assert names["deception"].token_scope == "generated"
    for d in b.detectors:
        cal = d.calibration
        assert 0 < cal["fpr_0.01"] <= cal["fpr_0.001"] <= 1
        assert d.default_thresholds["warn"] == pytest.approx(cal["fpr_0.01"])
        assert cal["aggregation"]["kind"] in ("max", "mean", "ema", "window_max")
        assert d.provenance["metrics"]
    from monitor.judge.policy import check_policy, load_policy

    pol = load_policy(BUNDLE / "policy.suggested.yaml")
    assert set(pol.detectors) == set(names)
    assert not [w for w in check_policy(pol, b) if "below" in w]


@pytest.mark.slow
def test_default_bundle_calibration_on_shared_slice() -> None:
    """Harmful-intent served exactly like the sidecar (bundle Scorer on captured rows,
    policy aggregation): harmful_val mostly alerts, a harmless_val slice mostly not."""
    if not DATASETS.is_dir():
        pytest.skip("../shared/datasets absent")
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip("bundles/default not built")
    try:
        from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model

        path = prepare_default_model()
    except Exception as e:
        pytest.skip(f"default model unavailable: {e}")
    import torch

    from monitor.score.bundle import load_bundle
    from monitor.score.scorer import Scorer
    from probes.collect import TokenSelection, TransformersCollector
    from probes.datasets import load_refusal_json
    from probes.evaluate import auroc
    from probes.train import aggregate_requests

    b = load_bundle(BUNDLE)
    det = next(d for d in b.detectors if d.name == "harmful_intent")
    cal = det.calibration
    pos = load_refusal_json("harmful_intent/harmful_val.json", 1, DATASETS)[:20]
    neg = load_refusal_json("harmful_intent/harmless_val.json", 0, DATASETS)[:100]
    col = TransformersCollector(path, DEFAULT_MODEL_NAME)
    acts = col.collect(pos + neg, [det.layer], TokenSelection("prompt"), progress=False)
    scorer = Scorer(b)
    tok = scorer.score(det.layer, torch.from_numpy(acts.x[det.layer].astype(np.float32)))
    tok = tok[:, scorer.detectors_on(det.layer).index("harmful_intent")]
    s = aggregate_requests(tok, acts.example, acts.n_examples, cal["aggregation"],
                           cal["min_tokens"])
    y = acts.labels.astype(bool)
    assert auroc(y, s) > 0.9
    assert (s[~y] >= cal["fpr_0.01"]).mean() <= 0.05  # 1% target, slack for n = 100
    assert (s[y] >= cal["fpr_0.01"]).mean() >= 0.6
