"""Fail-open / fail-closed: what vLLM's OpenAI server does while the sidecar cannot judge.

An ASGI middleware for vLLM's own `--middleware` flag (no vLLM file or function patched)::

    SAFETY_MONITOR_ADDR=127.0.0.1:50051 \\
      vllm serve MODEL --middleware monitor.capture.gate.SidecarGate

A watcher thread (one per API-server process) keeps a gRPC channel to
`SAFETY_MONITOR_ADDR` and every `SAFETY_MONITOR_GATE_PERIOD_S` (default 1 s) fetches
the capture plan (`GetCapturePlan`, same TLS / token settings as the plugin). The plan
carries the policy's `enforcement:` block (`CapturePlan.enforcement`, policy
`monitor.judge.policy.EnforcementPolicy`); the last one fetched stays in force while the
sidecar is gone. Env vars override it: `SAFETY_MONITOR_FAIL_MODE` (open | closed) and
`SAFETY_MONITOR_MAX_BEHIND_FRAMES` (int >= 0). With neither: fail-open, no behind bound.

The sidecar *cannot judge* when

- it does not answer `GetCapturePlan` (unreachable), or
- the capture plugin refused to install in a worker (its stats file says
  `"installed": false` with the reason, e.g. CUDA graphs on without the static capture
  path, or speculative decoding; needs `SAFETY_MONITOR_STATS_FILE`), or
- it is *behind*: `max_behind_frames > 0` and the capture plugin's send queue (the
  worker's stats file, `SAFETY_MONITOR_STATS_FILE`, rewritten every second; field
  `queued`) holds more messages than that. Without a stats file this check is off
  (logged once at start).

For each new generation request (POST to a path in `GATED_PATHS`) while it cannot:

- ``open``: the request is served, unmonitored; counted in
  `safety_monitor_gate_unmonitored_total` and logged (WARNING, once per outage);
- ``closed``: refused with HTTP 503, `Retry-After: 1` and an OpenAI-style error body
  naming the reason (unreachable / behind by N messages); counted in
  `safety_monitor_gate_refused_total`.

The counters live in prometheus_client's default registry, which vLLM's `/metrics`
serves. Requests already running are not touched (their capture is dropped and counted by
the plugin, `monitor.capture.transport`).

Thread rules: the watcher thread writes `SidecarWatch.state` (one tuple, replaced
whole); the event loop reads it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, replace
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


def fail_mode() -> str | None:
    """`SAFETY_MONITOR_FAIL_MODE` (open | closed), None when unset. Raises ValueError."""
    raw = os.environ.get("SAFETY_MONITOR_FAIL_MODE", "").strip().lower()
    if not raw:
        return None
    if raw not in FAIL_MODES:
        raise ValueError(f"SAFETY_MONITOR_FAIL_MODE: expected one of open, closed, found "
                         f"{raw!r}")
    return raw


def max_behind_frames() -> int | None:
    """`SAFETY_MONITOR_MAX_BEHIND_FRAMES` (int >= 0), None when unset. Raises ValueError."""
    raw = os.environ.get("SAFETY_MONITOR_MAX_BEHIND_FRAMES", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"SAFETY_MONITOR_MAX_BEHIND_FRAMES: expected an integer >= 0, "
                         f"found {raw!r}")
    return n


@dataclass(frozen=True)
class GateState:
    """One check's outcome.

    Attributes:
        ok: the sidecar can judge (reachable and not behind).
        reason: why not ("" when ok), shown to refused clients and in the log.
        fail_mode: mode in force (env override, else the last plan's, else "open").
        max_behind_frames: behind bound in force (0: off).
        checked: False until the first check finished.
    """

    ok: bool = False
    reason: str = "not checked yet"
    fail_mode: str = "open"
    max_behind_frames: int = 0
    checked: bool = False


def _worker_stats(stats_file: str | None) -> tuple[int | None, list[str]]:
    """(most `queued`, reasons capture is not installed) over the capturing workers'
    stats files (`queued` None when no file is readable).

    Only TP rank 0 of each pipeline stage captures (and writes a stats file): stage 0
    writes `stats_file`, stage k > 0 writes `stats_file.pp<k>` (`monitor.capture.plugin`),
    so the sidecar is behind when any stage's send queue is. A worker that refused to
    install capture (e.g. CUDA graphs on, speculative decoding) writes
    `{"installed": false, "not_installed": why}` instead: nothing it serves is judged."""
    if not stats_file:
        return None, []
    out: int | None = None
    refused: list[str] = []
    for path in [stats_file, *sorted(glob.glob(glob.escape(stats_file) + ".pp[0-9]*"))]:
        try:
            with open(path) as f:
                st = json.load(f)
            q = st.get("queued")
            if st.get("installed") is False:
                refused.append(str(st.get("not_installed") or "reason not stated")[:300])
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(q, int) and not isinstance(q, bool):
            out = q if out is None else max(out, q)
    return out, refused


def _queued(stats_file: str | None) -> int | None:
    """Most `queued` over the capturing workers' stats files (`_worker_stats`)."""
    return _worker_stats(stats_file)[0]


class SidecarWatch:
    """Background check of the sidecar: reachable, enforcement settings, behind."""

    def __init__(self, cfg: CaptureConfig, period_s: float) -> None:
        self.cfg = cfg
        self.period_s = period_s
        self.env_mode = fail_mode()
        self.env_behind = max_behind_frames()
        self.state = GateState(fail_mode=self.env_mode or "open",
                               max_behind_frames=self.env_behind or 0)
        self._checked = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safety-monitor-gate",
                                        daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return self.state.ok

    def wait_first(self, timeout: float) -> None:
        self._checked.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _check(self, stub: Any) -> GateState:
        from monitor.v1 import monitor_pb2

        prev = self.state
        try:
            plan = stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(),
                                       timeout=max(0.5, self.period_s))
        except grpc.RpcError:
            return replace(prev, ok=False, checked=True,
                           reason=f"the safety monitor at {self.cfg.addr} is unreachable")
        e = plan.enforcement
        mode = self.env_mode or (e.fail_mode if e.fail_mode in FAIL_MODES else "open")
        bound = self.env_behind if self.env_behind is not None else int(e.max_behind_frames)
        st = GateState(ok=True, reason="", fail_mode=mode, max_behind_frames=bound,
                       checked=True)
        q, refused = _worker_stats(self.cfg.stats_file)
        if refused:
            return replace(st, ok=False, reason="the safety monitor's capture is not "
                           f"installed in the vLLM worker: {refused[0]}")
        if bound > 0:
            if q is not None and q > bound:
                return replace(st, ok=False, reason=f"the safety monitor is behind: {q} "
                               f"messages queued in the capture plugin (bound {bound})")
        return st

    def _run(self) -> None:
        from monitor.capture.transport import open_channel
        from monitor.v1 import monitor_pb2_grpc

        channel = open_channel(self.cfg)
        stub = monitor_pb2_grpc.MonitorStub(channel)
        try:
            while not self._stop.is_set():
                st = self._check(stub)
                prev, self.state = self.state, st
                if (st.ok, st.reason, st.fail_mode) != (prev.ok, prev.reason, prev.fail_mode) \
                        or not prev.checked:
                    if st.ok:
                        log.info("safety monitor gate: sidecar %s can judge (fail mode %s, "
                                 "max behind %d)", self.cfg.addr, st.fail_mode,
                                 st.max_behind_frames)
                    else:
                        log.warning("safety monitor gate: %s (fail mode %s)", st.reason,
                                    st.fail_mode)
                if st.max_behind_frames > 0 and not self.cfg.stats_file \
                        and prev.max_behind_frames != st.max_behind_frames:
                    log.warning("safety monitor gate: max_behind_frames %d is set but "
                                "SAFETY_MONITOR_STATS_FILE is not: the behind check is OFF",
                                st.max_behind_frames)
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
    """ASGI middleware: fail-open or fail-closed while the sidecar cannot judge.

    Disabled (passes everything) when `SAFETY_MONITOR_ADDR` is unset.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        cfg = CaptureConfig.from_env()
        self.watch = _get_watch(cfg) if cfg is not None else None
        self.refused, self.unmonitored = _counters()
        self._outage_logged = False
        log.info("safety monitor gate on %s (sidecar %s; fail mode %s)", sorted(GATED_PATHS),
                 cfg.addr if cfg else "unset: gate off",
                 self.watch.state.fail_mode if self.watch else "-")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        w = self.watch
        if (w is None or scope.get("type") != "http" or scope.get("method") != "POST"
                or scope.get("path") not in GATED_PATHS):
            await self.app(scope, receive, send)
            return
        st = w.state
        if st.ok:
            self._outage_logged = False
            await self.app(scope, receive, send)
            return
        if st.fail_mode == "open":
            self.unmonitored.inc()
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("safety monitor gate: %s; serving requests UNMONITORED "
                            "(fail-open; counted in safety_monitor_gate_unmonitored_total)",
                            st.reason)
            await self.app(scope, receive, send)
            return
        self.refused.inc()
        body = json.dumps({"error": {
            "message": f"{st.reason} and the policy is fail-closed: request refused, "
                       "retry later",
            "type": "ServiceUnavailable", "code": 503}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})
