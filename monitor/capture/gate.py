"""Fail-open / fail-closed: what vLLM's OpenAI server does while the sidecar is unreachable.

An ASGI middleware for vLLM's own `--middleware` flag (no vLLM file or function patched)::

    SAFETY_MONITOR_ADDR=127.0.0.1:50051 SAFETY_MONITOR_FAIL_MODE=closed \\
      vllm serve MODEL --middleware monitor.capture.gate.SidecarGate

A watcher thread (one per API-server process) keeps a gRPC channel to
`SAFETY_MONITOR_ADDR` and checks every `SAFETY_MONITOR_GATE_PERIOD_S` (default 1 s)
that the sidecar answers `GetCapturePlan` (same TLS / token settings as the plugin).
For each new generation request (POST to a path in `GATED_PATHS`) while it does not:

- ``open`` (default): the request is served, unmonitored; counted in
  `safety_monitor_gate_unmonitored_total` and logged (WARNING, once per outage);
- ``closed``: refused with HTTP 503 and an OpenAI-style error body naming the reason;
  counted in `safety_monitor_gate_refused_total`.

The counters live in prometheus_client's default registry, which vLLM's `/metrics`
serves. Requests already running are not touched (their capture is dropped and counted by
the plugin, `monitor.capture.transport`). The mode is a deployment setting of the plugin
(the policy file lives in the sidecar, which is exactly what is unreachable here).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc

from monitor.capture.config import CaptureConfig

log = logging.getLogger("monitor.capture")

GATED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
FAIL_MODES = ("open", "closed")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def fail_mode() -> str:
    """`SAFETY_MONITOR_FAIL_MODE` (open | closed; default open). Raises ValueError."""
    raw = os.environ.get("SAFETY_MONITOR_FAIL_MODE", "").strip().lower() or "open"
    if raw not in FAIL_MODES:
        raise ValueError(f"SAFETY_MONITOR_FAIL_MODE: expected one of open, closed, found "
                         f"{raw!r}")
    return raw


class SidecarWatch:
    """Background reachability check of the sidecar (thread-safe `up`)."""

    def __init__(self, cfg: CaptureConfig, period_s: float) -> None:
        self.cfg = cfg
        self.period_s = period_s
        self._up = threading.Event()
        self._checked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safety-monitor-gate",
                                        daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def wait_first(self, timeout: float) -> None:
        self._checked.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        from monitor.capture.transport import open_channel
        from monitor.v1 import monitor_pb2, monitor_pb2_grpc

        channel = open_channel(self.cfg)
        stub = monitor_pb2_grpc.MonitorStub(channel)
        try:
            while not self._stop.is_set():
                try:
                    stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(),
                                        timeout=max(0.5, self.period_s))
                    ok = True
                except grpc.RpcError:
                    ok = False
                if ok != self.up or not self._checked.is_set():
                    if ok:
                        log.info("safety monitor gate: sidecar %s reachable", self.cfg.addr)
                    else:
                        log.warning("safety monitor gate: sidecar %s UNREACHABLE (fail mode "
                                    "%s)", self.cfg.addr, fail_mode())
                (self._up.set if ok else self._up.clear)()
                self._checked.set()
                self._stop.wait(self.period_s)
        finally:
            channel.close()


_watch: SidecarWatch | None = None
_lock = threading.Lock()


def _get_watch(cfg: CaptureConfig) -> SidecarWatch:
    global _watch
    with _lock:
        if _watch is None:
            period = float(os.environ.get("SAFETY_MONITOR_GATE_PERIOD_S", "") or 1.0)
            _watch = SidecarWatch(cfg, max(0.05, period))
            _watch.wait_first(5.0)
        return _watch


def _counters() -> tuple[Any, Any]:
    from prometheus_client import REGISTRY, Counter

    names = ("safety_monitor_gate_refused", "safety_monitor_gate_unmonitored")
    existing = getattr(REGISTRY, "_names_to_collectors", {})
    if names[0] in existing:
        return existing[names[0]], existing[names[1]]
    return (Counter(names[0], "Generation requests refused with 503 because the safety "
                    "monitor sidecar was unreachable (fail-closed)."),
            Counter(names[1], "Generation requests served unmonitored because the safety "
                    "monitor sidecar was unreachable (fail-open)."))


class SidecarGate:
    """ASGI middleware: fail-open or fail-closed while the sidecar is unreachable.

    Disabled (passes everything) when `SAFETY_MONITOR_ADDR` is unset.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        cfg = CaptureConfig.from_env()
        self.mode = fail_mode()
        self.watch = _get_watch(cfg) if cfg is not None else None
        self.refused, self.unmonitored = _counters()
        self._outage_logged = False
        log.info("safety monitor gate: fail mode %s for %s (sidecar %s)", self.mode,
                 sorted(GATED_PATHS), cfg.addr if cfg else "unset: gate off")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        w = self.watch
        if (w is None or scope.get("type") != "http" or scope.get("method") != "POST"
                or scope.get("path") not in GATED_PATHS):
            await self.app(scope, receive, send)
            return
        if w.up:
            self._outage_logged = False
            await self.app(scope, receive, send)
            return
        if self.mode == "open":
            self.unmonitored.inc()
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("safety monitor gate: sidecar unreachable, serving requests "
                            "UNMONITORED (fail-open; counted in "
                            "safety_monitor_gate_unmonitored_total)")
            await self.app(scope, receive, send)
            return
        self.refused.inc()
        body = json.dumps({"error": {
            "message": "the safety monitor is unreachable and the policy is fail-closed: "
                       "request refused, retry later",
            "type": "ServiceUnavailable", "code": 503}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})
