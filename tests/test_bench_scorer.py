"""bench/bench_scorer.py --targets runs end to end at tiny sizes, with a same-run baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_scorer


def test_targets_tiny_with_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    out = tmp_path / "RESULTS.md"
    rc = bench_scorer.main(["--targets", "--threads", "1", "--repeats", "1", "--budget-ms",
                            "1", "--sweep-rows", "3", "--sweep-d-models", "576",
                            "--baseline", "HEAD", "--write", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text.count("| 576 |") == 5  # synthetic, default bundle's 3 hook points, SAE 512
    for shape in ("synthetic 8 probes + 512 latents | 520 | 3 |",
                  "default bundle 18 (sae_latents) | 16 | 3 |",
                  "default SAE 512 latents + 1 probe | 513 | 3 |"):
        assert shape in text
    assert "GEMM / before" in text and "--baseline HEAD" in text
