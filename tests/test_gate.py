"""Fail-open / fail-closed gate (`monitor.capture.gate`) against a real sidecar process.

The sidecar (`safety-monitor serve`, gRPC on loopback) is started, killed and started
again on the same port with policies that choose the fail mode (`enforcement:`, sent in
the capture plan); the gate's ASGI callable is driven directly. The same gate inside a
real `vllm serve --middleware` is tested in tests/test_enforce.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from monitor.capture import gate as gate_mod
from monitor.capture.gate import SidecarGate, fail_mode, max_behind_frames
from monitor.tools.launch import SidecarServer, start_sidecar, stop
from monitor.tools.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def _policy(d: Path, mode: str, behind: int = 0) -> Path:
    p = d / f"policy-{mode}-{behind}.yaml"
    p.write_text(f"""version: "gate-{mode}"
detectors:
  harmful_intent: {{mode: observe, thresholds: {{warn: 0.5, critical: 0.9}}}}
enforcement: {{fail_mode: {mode}, max_behind_frames: {behind}}}
""")
    return p


def _sidecar(port: int, mport: int, log: Path, policy: Path) -> subprocess.Popen[bytes]:
    return start_sidecar(SidecarServer(
        bundle=ROOT / "bundles/default", port=port, metrics_port=mport, log=log,
        append_log=True, policy=policy, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        ready_timeout_s=90))


def _call(g: SidecarGate, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}"}

    async def send(m: Any) -> None:
        sent.append(dict(m))

    g.app = inner
    asyncio.run(g({"type": "http", "method": "POST", "path": path}, receive, send))
    return int(sent[0]["status"]), bytes(sent[1]["body"])


def test_env_overrides_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFETY_MONITOR_FAIL_MODE", raising=False)
    monkeypatch.delenv("SAFETY_MONITOR_MAX_BEHIND_FRAMES", raising=False)
    assert fail_mode() is None and max_behind_frames() is None
    monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "Closed")
    assert fail_mode() == "closed"
    monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "shut")
    with pytest.raises(ValueError, match="SAFETY_MONITOR_FAIL_MODE: expected one of open, "
                                         "closed, found 'shut'"):
        fail_mode()
    monkeypatch.setenv("SAFETY_MONITOR_MAX_BEHIND_FRAMES", "7")
    assert max_behind_frames() == 7
    monkeypatch.setenv("SAFETY_MONITOR_MAX_BEHIND_FRAMES", "-1")
    with pytest.raises(ValueError, match="SAFETY_MONITOR_MAX_BEHIND_FRAMES: expected an "
                                         "integer >= 0, found '-1'"):
        max_behind_frames()


@pytest.fixture
def gate_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    port, mport = free_port(), free_port()
    monkeypatch.setenv("SAFETY_MONITOR_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("SAFETY_MONITOR_GATE_PERIOD_S", "0.2")
    monkeypatch.setenv("SAFETY_MONITOR_STATS_FILE", str(tmp_path / "stats.json"))
    monkeypatch.delenv("SAFETY_MONITOR_FAIL_MODE", raising=False)
    monkeypatch.delenv("SAFETY_MONITOR_MAX_BEHIND_FRAMES", raising=False)
    monkeypatch.setattr(gate_mod, "_watch", None)
    yield port, mport
    if gate_mod._watch is not None:
        gate_mod._watch.close()
        gate_mod._watch = None


def _mode_is(g: SidecarGate, ok: bool, mode: str) -> Callable[[], bool]:
    return lambda: g.watch is not None and g.watch.state.ok == ok \
        and g.watch.state.fail_mode == mode


def test_policy_fail_mode_closed_refuses_then_open_serves_and_counts(
        tmp_path: Path, gate_env: tuple[int, int]) -> None:
    port, mport = gate_env
    log = tmp_path / "sidecar.log"
    side = _sidecar(port, mport, log, _policy(tmp_path, "closed"))
    try:
        g = SidecarGate(lambda *a: None)  # type: ignore[arg-type]
        wait_until(_mode_is(g, True, "closed"))
        assert _call(g) == (200, b"served")
        refused0, unmon0 = g.refused._value.get(), g.unmonitored._value.get()
        stop(side, "the sidecar")
        wait_until(_mode_is(g, False, "closed"))  # the last plan's mode stays in force
        status, body = _call(g)
        assert status == 503
        msg = json.loads(body)["error"]["message"]
        assert "unreachable" in msg and "fail-closed" in msg, msg
        assert _call(g, "/v1/models") == (200, b"served")  # not a generation endpoint
        assert g.refused._value.get() == refused0 + 1
        # back on the same port with a fail-open policy: recovers, then serves when down
        side = _sidecar(port, mport, log, _policy(tmp_path, "open"))
        wait_until(_mode_is(g, True, "open"))
        assert _call(g) == (200, b"served")
        stop(side, "the sidecar")
        wait_until(_mode_is(g, False, "open"))
        assert _call(g) == (200, b"served")
        assert g.unmonitored._value.get() == unmon0 + 1
        assert g.refused._value.get() == refused0 + 1
    finally:
        stop(side, "the sidecar")


def test_behind_bound_and_env_override(tmp_path: Path, gate_env: tuple[int, int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    port, mport = gate_env
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"queued": 3}))
    side = _sidecar(port, mport, tmp_path / "sidecar.log", _policy(tmp_path, "closed", 10))
    try:
        g = SidecarGate(lambda *a: None)  # type: ignore[arg-type]
        wait_until(_mode_is(g, True, "closed"))
        assert g.watch is not None and g.watch.state.max_behind_frames == 10
        stats.write_text(json.dumps({"queued": 11}))  # the plugin's queue over the bound
        wait_until(_mode_is(g, False, "closed"))
        status, body = _call(g)
        assert status == 503
        assert "behind: 11 messages queued" in json.loads(body)["error"]["message"]
        stats.write_text(json.dumps({"queued": 10}))
        wait_until(_mode_is(g, True, "closed"))
        assert _call(g) == (200, b"served")
        # a worker that refused to install capture (e.g. CUDA graphs on): nothing is judged
        stats.write_text(json.dumps({"installed": False, "pid": 1,
                                     "not_installed": "CUDA graphs are on (...)"}))
        wait_until(_mode_is(g, False, "closed"))
        status, body = _call(g)
        msg = json.loads(body)["error"]["message"]
        assert status == 503 and "capture is not installed" in msg and "CUDA graphs" in msg
        stats.write_text(json.dumps({"installed": True, "queued": 0}))
        wait_until(_mode_is(g, True, "closed"))
        # env overrides the policy: fail-open whatever the plan says
        g.watch.close()
        monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "open")
        monkeypatch.setattr(gate_mod, "_watch", None)
        g2 = SidecarGate(lambda *a: None)  # type: ignore[arg-type]
        wait_until(_mode_is(g2, True, "open"))
        stats.write_text(json.dumps({"queued": 99}))
        wait_until(_mode_is(g2, False, "open"))
        assert _call(g2) == (200, b"served")
    finally:
        stop(side, "the sidecar")


def test_behind_check_reads_every_capturing_workers_stats_file(tmp_path: Path) -> None:
    """Pipeline parallelism: stage 0 writes the stats file, stage k writes `.pp<k>`; the
    gate sees the most queued of them (a torn or foreign file is skipped)."""
    from monitor.capture.gate import _queued

    path = tmp_path / "stats.json"
    assert _queued(str(path)) is None
    path.write_text(json.dumps({"queued": 3}))
    assert _queued(str(path)) == 3
    (tmp_path / "stats.json.pp1").write_text(json.dumps({"queued": 40}))
    (tmp_path / "stats.json.pp2").write_text("{torn")
    (tmp_path / "stats.json.tmp123").write_text(json.dumps({"queued": 999}))  # a write
    assert _queued(str(path)) == 40
    path.unlink()
    assert _queued(str(path)) == 40
