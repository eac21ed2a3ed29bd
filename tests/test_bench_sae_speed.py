"""bench/bench_sae_speed.py runs end to end on CPU at tiny sizes (the GPU run is the lead's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_sae_speed


def test_cpu_tiny(tmp_path: Path) -> None:
    rc = bench_sae_speed.main(["--device", "cpu", "--out", str(tmp_path), "--rows", "8",
                               "--reps", "1", "--d-models", "32", "--latents", "1024",
                               "--threads", "1"])
    assert rc == 0
    doc = json.loads((tmp_path / "sae_speed.json").read_text())
    (r,) = doc["results"]
    assert (r["d_model"], r["d_sae"], r["selected"]) == (32, 1024, 512)
    assert {"fused", "naive", "gemm"} <= set(r["ms"])
    assert "| 32 | 1024 | 512 | fp32 |" in (tmp_path / "sae_speed.md").read_text()


def test_cuda_small(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert bench_sae_speed.main(["--device", "cuda", "--out", str(tmp_path), "--rows", "64",
                                 "--reps", "2", "--d-models", "64",
                                 "--latents", "2048"]) == 0
