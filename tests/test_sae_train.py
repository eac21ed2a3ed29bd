"""The BatchTopK trainer and the latent detector's bundle parts, on synthetic data.

* Rows drawn from a known sparse dictionary (2 of 24 atoms active) must be reconstructed
  (FVU well below 1) at an L0 near the BatchTopK k, after saving as SAELens fp16 and
  loading back, and ``sae-lens`` must encode the saved folder identically (the folded
  input scale and the JumpReLU threshold included).
* A bundle written from ``sae_detector_parts`` scores exactly
  ``sigmoid(z[:, ids] · w + b)`` with ``z`` the SAE's own encode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.score import Scorer, write_bundle
from monitor.score.sae import load_saelens, save_saelens
from probes.sae_detector import LatentDetector, sae_detector_parts
from probes.sae_train import TrainConfig, reconstruction_metrics, train_batchtopk


def _sparse_rows(n: int, d: int = 32, m: int = 24, active: int = 2, seed: int = 0
                 ) -> np.ndarray:
    atoms = np.random.default_rng(1234).normal(size=(m, d))  # one dictionary for all seeds
    rng = np.random.default_rng(seed)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, m))
    for i in range(n):
        j = rng.choice(m, size=active, replace=False)
        codes[i, j] = rng.uniform(1.0, 3.0, size=active)
    return (codes @ atoms * 7.0 + 2.0).astype(np.float32)  # offset + scale: folded later


def test_batchtopk_learns_a_sparse_dictionary(tmp_path: Path) -> None:
    x = _sparse_rows(3000)
    cfg = TrainConfig(d_sae=48, k=2, epochs=8, batch=128, lr=3e-3, aux_k=8,
                      dead_after_tokens=2000)
    sae, info = train_batchtopk(x, cfg, hook_name="blocks.2.hook_resid_post", model_name="m")
    assert info["theta"] > 0
    save_saelens(sae, tmp_path / "sae", dtype=torch.float16)
    loaded = load_saelens(tmp_path / "sae")
    assert loaded.architecture == "jumprelu"
    torch.testing.assert_close(loaded.params["threshold"],
                               torch.full((48,), info["theta"]), atol=1e-2, rtol=1e-3)
    held = _sparse_rows(1000, seed=1)
    m = reconstruction_metrics(loaded, held)
    assert m["fvu"] < 0.25, m
    assert 1.0 < m["l0"] < 5.0, m
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"), dtype="float32")
    with torch.no_grad():
        ref = theirs.encode(torch.from_numpy(held))
    torch.testing.assert_close(loaded.encode(torch.from_numpy(held)), ref, atol=1e-4,
                               rtol=1e-4)


def test_detector_parts_score_the_sparse_read_out(tmp_path: Path) -> None:
    x = _sparse_rows(1000)
    sae, _ = train_batchtopk(x, TrainConfig(d_sae=32, k=2, epochs=1, batch=256),
                             hook_name="blocks.4.hook_resid_post", model_name="m")
    ids = [5, 1, 30]
    det = LatentDetector(ids, np.array([0.7, -0.2, 1.1]), -0.4, np.zeros(3),
                         {"fpr_0.01": 0.6, "fpr_0.001": 0.8}, {"kind": "mean"}, 2)
    comp, detector, tensors = sae_detector_parts(sae, det)
    bundle = write_bundle(tmp_path / "b", {
        "name": "t", "model": {"name": "m", "d_model": 32, "n_layers": 8},
        "components": [comp], "detectors": [detector]}, tensors)
    xs = torch.from_numpy(_sparse_rows(200, seed=3))
    got = Scorer(bundle).score(4, xs)[:, 0]
    z = sae.encode(xs)[:, ids].double().numpy()
    want = 1 / (1 + np.exp(-(z @ det.weights + det.bias)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert detector["default_thresholds"] == {"warn": 0.6, "critical": 0.8}
