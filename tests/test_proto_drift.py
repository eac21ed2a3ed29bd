"""The committed stubs in monitor/v1/ must equal freshly generated ones byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = ("monitor_pb2.py", "monitor_pb2.pyi", "monitor_pb2_grpc.py")


def test_generated_stubs_match(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in STUBS:
        fresh = (tmp_path / "monitor" / "v1" / name).read_bytes()
        committed = (REPO / "monitor" / "v1" / name).read_bytes()
        assert fresh == committed, (
            f"monitor/v1/{name} drifted from proto/monitor/v1/monitor.proto; "
            "run scripts/gen_proto.sh")
