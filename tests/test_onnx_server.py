"""The onnxruntime sidecar without torch: the real server, over real sockets.

The server subprocess gets a ``sitecustomize`` that makes ``import torch`` (and any
``torch.*``) raise ImportError and records each attempt, so a torch import anywhere on
the serving path fails the server or shows up in the record (~10 s, in CI). Scores are
compared with the torch Scorer in this (test) process.

The literal test, a fresh venv holding ``pip install .[onnx]`` and no torch, takes ~4 min
to install here, so it runs only on request: ``SAFETY_MONITOR_SLIM_VENV=/path/to/venv``
(created and installed if it does not exist; reused otherwise).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import D_MODEL, MODEL, N_LAYERS, POLICY_V1, MonitorServer
from test_server_integration import (
    assert_stream_usable,
    fin,
    frame_msg,
    good_tail,
    make_rows,
    rid,
    stream,
    verdicts,
)

from monitor.score import Scorer, build_placeholder_bundle, export_onnx, load_bundle
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame

pytestmark = pytest.mark.timeout(120)

BLOCKER = '''\
import sys, traceback

_RECORD = {record!r}


class _NoTorch:
    """Meta path finder: every import of torch fails and is written to _RECORD ("import"),
    as is a mere importlib.util.find_spec probe ("probe": what --backend auto asks)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            stack = traceback.format_stack(limit=12)
            kind = "probe" if any("importlib.util" in s for s in stack) else "import"
            with open(_RECORD, "a") as f:
                f.write(kind + " " + name + "\\n" + "".join(stack) + "\\n")
            raise ImportError(f"torch is blocked in this test ({{name}})")
        return None


sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The placeholder test bundle (conftest's ``bundle_dir``, same seed: same weights and
    so the same ``geometry``), exported to ONNX."""
    out = tmp_path_factory.mktemp("onnx") / "bundle"
    build_placeholder_bundle(out, model_name=MODEL, d_model=D_MODEL, n_layers=N_LAYERS,
                             layers=(2, 3), seed=0)
    export_onnx(out)
    return out


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dir with the blocking sitecustomize.py, the file that records torch imports)."""
    d = tmp_path_factory.mktemp("notorch")
    record = d / "torch_imports.txt"
    (d / "sitecustomize.py").write_text(BLOCKER.format(record=str(record)))
    return d, record


@pytest.fixture(scope="module")
def ort_server(tmp_path_factory: pytest.TempPathFactory, onnx_bundle: Path,
               no_torch: tuple[Path, Path]) -> Iterator[MonitorServer]:
    from conftest import REPO

    srv = MonitorServer(tmp_path_factory.mktemp("ort"), onnx_bundle, POLICY_V1,
                        extra=["--backend", "auto", "--policy-watch-s", "0"],
                        env={"PYTHONPATH": f"{no_torch[0]}:{REPO}"})
    yield srv
    srv.stop()


def test_blocker_really_blocks(no_torch: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    record = tmp_path / "r.txt"
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(record=str(record)))
    r = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                       env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "torch is blocked" in r.stderr
    assert record.read_text().startswith("import torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_unary_scores_equal_torch(ort_server: MonitorServer, onnx_bundle: Path,
                                  geometry: dict, dtype: torch.dtype) -> None:
    x = make_rows(geometry, "harmful_intent", 9, pushed=[4]).to(dtype)
    stub = monitor_pb2_grpc.MonitorStub(ort_server.channel)
    resp = stub.Score(monitor_pb2.ScoreRequest(
        frame=encode_frame(x, seq=1, model=MODEL, layer=2, spans=[])), timeout=10)
    got = {d.detector: np.array(d.scores) for d in resp.detectors}
    scorer = Scorer(load_bundle(onnx_bundle))
    want = scorer.score(2, x)
    for j, det in enumerate(scorer.detectors_on(2)):
        np.testing.assert_allclose(got[det], want[:, j], atol=1e-5)
    assert got["harmful_intent"][4] > 0.99 > 0.1 > got["harmful_intent"][0]


def test_stream_verdicts_without_torch(ort_server: MonitorServer, geometry: dict,
                                       no_torch: tuple[Path, Path]) -> None:
    bad, ok, tail = rid("bad"), rid("ok"), rid("tail")
    x = make_rows(geometry, "harmful_intent", 6, pushed=[2])
    y = make_rows(geometry, "deception", 3)
    msgs = [frame_msg(1, 2, x, [Span(bad, 3, 0, 3), Span(ok, 3, 0, 3)]),
            frame_msg(2, 3, y.bfloat16(), [Span(bad, 3, 3, 3)]),
            fin(bad), fin(ok), *good_tail(geometry, 3, tail)]
    out = stream(ort_server, msgs)
    finals = {v.detector: v for v in verdicts(out, bad, final=True)}
    assert finals["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL
    assert finals["deception"].n_tokens_scored == 3
    ok_final = {v.detector: v for v in verdicts(out, ok, final=True)}
    assert ok_final["harmful_intent"].severity == monitor_pb2.SEVERITY_NONE
    assert_stream_usable(out, tail)
    assert ort_server.alive()
    log = ort_server.log()
    assert "scorer backend onnxruntime (auto: torch is not installed)" in log
    record = no_torch[1].read_text() if no_torch[1].exists() else ""
    assert "import torch" not in record, f"torch was imported:\n{record}"
    assert ort_server.metric("safety_monitor_build_info", backend="onnxruntime") == 1


def test_plan_and_check_without_torch(onnx_bundle: Path, no_torch: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    """The slim image's other commands: `plan` and `check` work with torch blocked."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    env = {"PYTHONPATH": f"{no_torch[0]}:{REPO}", "PATH": "/usr/bin:/bin"}
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_V1)
    plan = subprocess.run([sys.executable, "-m", "monitor.cli", "plan", "--bundle",
                           str(onnx_bundle), "--policy", str(policy)], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["layers"] == [2, 3]
    check = subprocess.run([sys.executable, "-m", "monitor.cli", "check", "--bundle",
                            str(onnx_bundle), "--policy", str(policy)], capture_output=True,
                           text=True, timeout=60, cwd=REPO, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Traceback" not in check.stderr + plan.stderr


def test_missing_graphs_refused_at_startup(tmp_path: Path, no_torch: tuple[Path, Path],
                                           bundle_dir: Path) -> None:
    """--backend onnxruntime on a bundle without graphs: exit 2, one line, no traceback."""
    import subprocess
    import sys

    from conftest import REPO

    plain = tmp_path / "plain"
    shutil.copytree(bundle_dir, plain)
    r = subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--bundle", str(plain),
                        "--backend", "onnxruntime", "--port", "0", "--metrics-port", "-1"],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={"PYTHONPATH": f"{no_torch[0]}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    assert "expected ONNX graphs for the onnxruntime backend" in r.stderr
    assert "Traceback" not in r.stderr




@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_in_a_venv_without_torch(tmp_path: Path, onnx_bundle: Path,
                                        geometry: dict) -> None:
    """`pip install .[onnx]` into a fresh venv pulls no torch, and that server scores."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    where = os.environ.get("SAFETY_MONITOR_SLIM_VENV")
    if not where:
        pytest.skip("set SAFETY_MONITOR_SLIM_VENV=/path/to/venv to run (~4 min install)")
    venv = Path(where)
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"{REPO}[onnx]"], check=True,
                       timeout=1800)
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    srv = MonitorServer(tmp_path / "srv", onnx_bundle, POLICY_V1, python=str(py),
                        extra=["--backend", "auto", "--policy-watch-s", "0"])
    try:
        x = make_rows(geometry, "harmful_intent", 5, pushed=[1])
        resp = monitor_pb2_grpc.MonitorStub(srv.channel).Score(monitor_pb2.ScoreRequest(
            frame=encode_frame(x.bfloat16(), seq=1, model=MODEL, layer=2, spans=[])),
            timeout=10)
        got = {d.detector: np.array(d.scores) for d in resp.detectors}
        scorer = Scorer(load_bundle(onnx_bundle))
        want = scorer.score(2, x.bfloat16())
        for j, det in enumerate(scorer.detectors_on(2)):
            np.testing.assert_allclose(got[det], want[:, j], atol=1e-5)
        assert "auto: torch is not installed" in srv.log()
    finally:
        srv.stop()
