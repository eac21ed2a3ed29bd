"""bench/bench_sae_speed.py runs end to end on CPU at tiny sizes (the GPU run is the lead's)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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
    assert "| 32 | 1024 | 512 | fp32 | 8 |" in (tmp_path / "sae_speed.md").read_text()
    assert "triton" not in r["ms"]  # CPU without TRITON_INTERPRET: skipped, and said so
    assert doc["meta"]["triton_skipped"]


def test_cpu_tiny_triton_interpreted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The triton path's dry run: the kernel under Triton's interpreter, checked against
    the naive path before timing, at rows 1 and 17 (not a timing)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = bench_sae_speed.main(["--device", "cpu", "--out", str(tmp_path), "--rows", "1,17",
                               "--reps", "1", "--d-models", "32", "--latents", "1024",
                               "--threads", "1", "--dtypes", "bf16",
                               "--triton-blocks", "16x32x16"])
    assert rc == 0
    doc = json.loads((tmp_path / "sae_speed.json").read_text())
    assert [(r["dtype"], r["rows"]) for r in doc["results"]] == [("bf16", 1), ("bf16", 17)]
    for r in doc["results"]:
        assert {"fused", "gemm", "triton", "triton[split1]", "triton[16x32x16]"} <= set(r["ms"])
        assert r["triton_over_gemm"] > 0
    assert doc["meta"]["triton_skipped"] == []
    md = (tmp_path / "sae_speed.md").read_text().splitlines()
    assert md[2].count("|") == md[3].count("|")  # header and separator agree
    assert "| 32 | 1024 | 512 | bf16 | 17 |" in "\n".join(md)


def test_runs_without_grpc_protobuf_or_vllm(tmp_path: Path) -> None:
    """The GPU hosts have torch (and triton) but may lack grpcio / protobuf / vllm: the
    bench and the kernel module import and run with those imports refused."""
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import importlib.abc, runpy, sys
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("grpc", "google", "vllm", "onnxruntime",
                                          "prometheus_client", "sae_lens", "transformers"):
                    raise ImportError("refused for the test: " + name)
        sys.meta_path.insert(0, Refuse())
        sys.path.insert(0, {str(root)!r})
        import monitor.score.triton_fused
        sys.argv = ["bench_sae_speed.py", "--device", "cpu", "--out", {str(tmp_path)!r},
                    "--rows", "4", "--reps", "1", "--d-models", "32", "--latents", "1024",
                    "--threads", "1"]
        runpy.run_path({str(root / "bench" / "bench_sae_speed.py")!r}, run_name="__main__")
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sae_speed.json").exists()
    assert "grpc" not in proc.stderr


def test_cuda_small(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert bench_sae_speed.main(["--device", "cuda", "--out", str(tmp_path), "--rows", "64",
                                 "--reps", "2", "--d-models", "64",
                                 "--latents", "2048"]) == 0
