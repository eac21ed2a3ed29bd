"""The sidecar refuses a bundle whose d_model or layer count differs from the served model
(`serve --served-model DIR`), at start-up, with one line naming field, expected, found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.tools.models import check_bundle_matches_model, read_model_shape

REPO = Path(__file__).resolve().parents[1]


def _model_dir(tmp_path: Path, **cfg) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    base = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 6}
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    return d


def test_read_model_shape_and_check(tmp_path):
    d = _model_dir(tmp_path)
    s = read_model_shape(d)
    assert (s.architecture, s.d_model, s.n_layers) == ("Qwen3ForCausalLM", 64, 6)
    check_bundle_matches_model(bundle_model="m", bundle_d_model=64, bundle_n_layers=6,
                               model_dir=d)
    with pytest.raises(ValueError, match=r"model\.d_model: expected 64 .* found 576"):
        check_bundle_matches_model(bundle_model="m", bundle_d_model=576, bundle_n_layers=6,
                                   model_dir=d)
    with pytest.raises(ValueError, match=r"model\.n_layers: expected 6 .* found 30"):
        check_bundle_matches_model(bundle_model="m", bundle_d_model=64, bundle_n_layers=30,
                                   model_dir=d)
    # multimodal configs keep the text model's sizes in text_config
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"hidden_size": 32, "num_hidden_layers": 4}}))
    assert read_model_shape(mm).d_model == 32 and read_model_shape(mm).n_layers == 4
    (mm / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="hidden_size: expected a positive integer"):
        read_model_shape(mm)


def test_serve_refuses_mismatched_bundle_at_start(tmp_path, bundle_dir):
    """conftest's placeholder bundle is d_model 64, 6 layers."""
    wrong = _model_dir(tmp_path, num_hidden_layers=30)
    proc = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "serve", "--bundle", str(bundle_dir),
         "--served-model", str(wrong), "--port", "0", "--metrics-port", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.n_layers: expected 30" in proc.stderr and "found 6" in proc.stderr


def test_recipe_layers_scale_with_depth():
    """`build-default --model` collects the recipes' layers at the same relative depths."""
    from probes.harmful import LAYERS
    from probes.recipes import scaled_layers

    assert scaled_layers(LAYERS, 30) == tuple(LAYERS)
    assert scaled_layers((9, 12, 15, 18), 28) == (8, 11, 14, 17)  # e.g. Qwen2.5-1.5B
    assert scaled_layers((9, 12, 15, 18), 3) == (1, 2)  # tiny test models: unique, in range
    assert all(0 <= x < n for n in range(1, 80) for x in scaled_layers((0, 9, 29), n))
