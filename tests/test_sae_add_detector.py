"""`python -m probes add-sae-detector`: merges an SAE detector bundle into a bundle, in
observe mode, idempotently, with latent labels; the result validates, its ONNX graphs are
re-exported and both backends score the SAE detector like the source bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.judge.policy import check_policy, load_policy
from monitor.score import Scorer, build_placeholder_bundle, load_bundle, write_bundle
from monitor.score.bundle import BundleError
from monitor.score.onnx_export import export_onnx
from monitor.score.onnx_scorer import OnnxScorer
from probes.sae_detector import add_sae_detector, short_label

D, L = 32, 6


def _source(root: Path, model: str = "m/x") -> Path:
    g = torch.Generator().manual_seed(3)
    ids = [7, 3, 11]
    tensors = {"sae_l4.W_enc": torch.randn(D, 3, generator=g), "sae_l4.b_enc": torch.zeros(3),
               "sae_l4.threshold": torch.full((3,), 0.1), "sae_l4.b_dec": torch.zeros(D)}
    write_bundle(root, {
        "name": "src", "model": {"name": model, "d_model": D, "n_layers": L},
        "components": [{"name": "sae_l4", "kind": "sae_latents", "layer": 4,
                        "activation": "jumprelu", "latent_ids": ids,
                        "preprocessing": {"apply_b_dec_to_input": True},
                        "tensors": {r: f"sae_l4.{r}" for r in
                                    ("W_enc", "b_enc", "threshold", "b_dec")}}],
        "detectors": [{"name": "harmful_intent_sae", "token_scope": "prompt", "bias": -0.5,
                       "inputs": [{"component": "sae_l4", "latent_weights": [1.0, 0.5, -0.2]}],
                       "default_thresholds": {"warn": 0.6, "critical": 0.7},
                       "calibration": {"fpr_0.01": 0.6, "fpr_0.001": 0.7},
                       "provenance": {"aggregation": {"kind": "mean"}, "min_tokens": 3,
                                      "metrics": {"sae_latents": {"auroc": 0.8,
                                                                  "tpr@fpr0.01": 0.1},
                                                  "dense_probe": {"auroc": 0.99,
                                                                  "tpr@fpr0.01": 0.9}}}}],
    }, tensors)
    labels = {"7": {"top": [{"token": " bomb"}, {"token": " bomb"}, {"token": "\n"}]},
              "3": {"top": []}}
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def _target(root: Path) -> Path:
    build_placeholder_bundle(root, model_name="m/x", d_model=D, n_layers=L, layers=(2, 3),
                             seed=0)
    export_onnx(root)
    (root / "policy.suggested.yaml").write_text(
        'version: "t"\ndefaults:\n  mode: observe\ndetectors:\n  harmful_intent:\n'
        "    scope: prompt\n    thresholds:\n      warn: 0.5\n")
    (root / "REPORT.md").write_text("# report\n")
    return root


def test_merge_is_observe_only_labelled_and_idempotent(tmp_path: Path) -> None:
    src, dst = _source(tmp_path / "src"), _target(tmp_path / "dst")
    before = load_bundle(dst)
    b = add_sae_detector(dst, src)
    assert [d.name for d in b.detectors] == [d.name for d in before.detectors] + [
        "harmful_intent_sae"]
    comp = b.components["sae_l4"]
    assert comp.latent_labels == ('top tokens: " bomb", "\\n"', "fired on no corpus token",
                                  "fired on no corpus token")
    cal = b.detector("harmful_intent_sae").calibration
    assert (cal["aggregation"], cal["min_tokens"], cal["scope"]) == ({"kind": "mean"}, 3,
                                                                     "prompt")
    assert b.onnx is not None and sorted(b.onnx.files) == [2, 3, 4]
    pol = load_policy(dst / "policy.suggested.yaml")
    assert pol.detectors["harmful_intent_sae"].mode == "observe"
    assert pol.detectors["harmful_intent_sae"].min_tokens == 3
    assert not [w for w in check_policy(pol, b) if w.startswith("error")]
    # the merged detector scores like the source bundle, on both backends
    x = np.random.default_rng(0).standard_normal((9, D), dtype=np.float32)
    want = Scorer(load_bundle(src)).score(4, x)
    got = Scorer(b).score(4, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(OnnxScorer(load_bundle(dst, load_tensors=False)).score(4, x),
                               want, rtol=1e-5, atol=1e-6)
    # the other detectors are untouched
    np.testing.assert_allclose(Scorer(b).score(2, x), Scorer(before).score(2, x), rtol=1e-6)
    # a second run changes nothing
    snap = tmp_path / "snap"
    shutil.copytree(dst, snap)
    add_sae_detector(dst, src)
    for f in sorted(p.name for p in snap.iterdir()):
        assert (dst / f).read_bytes() == (snap / f).read_bytes(), f
    assert (dst / "REPORT.md").read_text().count("## SAE latent detector") == 1


def test_model_mismatch_is_refused_by_field(tmp_path: Path) -> None:
    src, dst = _source(tmp_path / "src", model="m/other"), _target(tmp_path / "dst")
    with pytest.raises(BundleError, match=r"model\.name: expected 'm/x'"):
        add_sae_detector(dst, src)


def test_short_label_is_bounded() -> None:
    info = {"top": [{"token": "x" * 500}]}
    assert len(short_label(info)) == 120


def test_latent_labels_validated(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    doc = json.loads((src / "manifest.json").read_text())
    doc["components"][0]["latent_labels"] = ["a", "b"]
    (src / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"components\[0\]\.latent_labels: expected 3 labels"):
        load_bundle(src)
    doc["components"][0]["latent_labels"] = ["a", "b", "c" * 121]
    (src / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"latent_labels\[2\]: expected at most 120"):
        load_bundle(src)
