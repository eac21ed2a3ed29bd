"""Fail-open / fail-closed gate (`monitor.capture.gate`) against a real sidecar process.

The sidecar (`safety-monitor serve`, gRPC on loopback) is started, killed and started
again on the same port; the gate's ASGI callable is driven directly (the HTTP server in
front of it is vLLM's, exercised by its `--middleware` flag, not here).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.capture import gate as gate_mod
from monitor.capture.gate import SidecarGate, fail_mode
from monitor.tools.demo import stop, wait_http
from monitor.tools.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def _sidecar(port: int, mport: int, log: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--bundle", str(ROOT / "bundles/default"),
         "--port", str(port), "--metrics-port", str(mport)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_http(f"http://127.0.0.1:{mport}/metrics", 90, p, "the sidecar")
    return p


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


def _until(pred: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.1)


def test_fail_mode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFETY_MONITOR_FAIL_MODE", raising=False)
    assert fail_mode() == "open"
    monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "Closed")
    assert fail_mode() == "closed"
    monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "shut")
    with pytest.raises(ValueError, match="SAFETY_MONITOR_FAIL_MODE: expected one of open, "
                                         "closed, found 'shut'"):
        fail_mode()


def test_gate_closed_refuses_while_down_and_recovers_open_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port, mport = free_port(), free_port()
    monkeypatch.setenv("SAFETY_MONITOR_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("SAFETY_MONITOR_GATE_PERIOD_S", "0.2")
    monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "closed")
    monkeypatch.setattr(gate_mod, "_watch", None)
    log = tmp_path / "sidecar.log"
    side = _sidecar(port, mport, log)
    try:
        g = SidecarGate(lambda *a: None)  # type: ignore[arg-type,return-value]
        assert g.watch is not None
        _until(lambda: g.watch is not None and g.watch.up)
        assert _call(g) == (200, b"served")
        refused0 = g.refused._value.get()
        stop(side, "the sidecar")
        _until(lambda: g.watch is not None and not g.watch.up)
        status, body = _call(g)
        assert status == 503
        assert "fail-closed" in json.loads(body)["error"]["message"]
        assert _call(g, "/v1/models") == (200, b"served")  # not a generation endpoint
        assert g.refused._value.get() == refused0 + 1
        monkeypatch.setenv("SAFETY_MONITOR_FAIL_MODE", "open")
        g_open = SidecarGate(lambda *a: None)  # type: ignore[arg-type,return-value]
        unmon0 = g_open.unmonitored._value.get()
        assert _call(g_open) == (200, b"served")
        assert g_open.unmonitored._value.get() == unmon0 + 1
        side = _sidecar(port, mport, log)  # back on the same port: recovers
        _until(lambda: g.watch is not None and g.watch.up)
        assert _call(g) == (200, b"served")
    finally:
        stop(side, "the sidecar")
        if gate_mod._watch is not None:
            gate_mod._watch.close()
            gate_mod._watch = None
