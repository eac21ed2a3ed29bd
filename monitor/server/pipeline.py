"""Bounded scoring queue and the single scoring worker thread.

Stream readers (asyncio, one per gRPC stream) validate frames and `submit_frame` them;
the worker thread takes a contiguous run of queued frames (up to `max_batch_rows`
rows), groups them by layer, makes ONE `Scorer.score` call per layer, splits the
scores back per request span and feeds the `RequestTracker`. VerdictUpdates go back
to the stream that owns the request through `StreamSink.post` (thread-safe), escalations
to the audit log and the alert counter, final scores to the score histogram.

Ordering: everything a stream sends goes through the same FIFO queue, so a
`RequestFinished` is processed after that request's frames, and a stream's end marker
after all of its items. The tracker is touched only by the worker thread (it is not
thread-safe): unscored-row accounting and policy swaps are queued as control items.

Bounds: frames occupy `capacity_rows` rows of the queue until scored; a frame that does
not fit is shed explicitly (`QueueFull`: the caller sends StreamError RESOURCE_EXHAUSTED
"queue_full", counts it and its rows are recorded as unscored). Memory held by queued
activations is at most `capacity_rows * d_model * itemsize` bytes (plus one frame).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from monitor.report.audit import AuditLog, audit_record
from monitor.report.metrics import Metrics
from monitor.report.sinks import AlertDispatcher
from monitor.v1 import monitor_pb2
from monitor.wire.codec import DecodedFrame

__all__ = ["Pipeline", "QueueFull", "StreamSink", "verdict_message"]

log = logging.getLogger(__name__)

_SEVERITY_ENUM = {
    "none": monitor_pb2.SEVERITY_NONE,
    "warn": monitor_pb2.SEVERITY_WARN,
    "critical": monitor_pb2.SEVERITY_CRITICAL,
}


class StreamSink(Protocol):
    """The outbound side of one stream; `post` must be callable from any thread."""

    name: str

    def post(self, msg: monitor_pb2.ServerMessage | None) -> None:
        """Queue a message for the client; None marks the end of the stream."""


class QueueFull(Exception):
    """The scoring queue has no room for the frame (RESOURCE_EXHAUSTED, queue_full)."""


def verdict_message(u: Any) -> monitor_pb2.ServerMessage:
    """Convert a `VerdictUpdate` into a `ServerMessage(verdict=...)`."""
    return monitor_pb2.ServerMessage(verdict=monitor_pb2.Verdict(
        request_id=u.request_id, detector=u.detector, score=float(u.score),
        severity=_SEVERITY_ENUM.get(u.severity, monitor_pb2.SEVERITY_NONE),
        threshold=float(u.threshold or 0.0),
        crossed_at_position=int(-1 if u.crossed_at_position is None else u.crossed_at_position),
        final=bool(u.final), mode=u.mode, policy_version=u.policy_version,
        n_tokens_scored=int(u.n_tokens_scored), n_tokens_unscored=int(u.n_tokens_unscored),
        peak_score=float(u.peak_score),
    ))


# ---------------------------------------------------------------------- queue items


@dataclass
class _FrameItem:
    sink: StreamSink
    frame: DecodedFrame
    t_recv: float  # time.perf_counter() at receive
    rows: int


@dataclass
class _FinishItem:
    sink: StreamSink | None  # None: the request's stream is gone (orphan), nobody to tell
    request_id: str
    reason: str


@dataclass
class _UnscoredItem:
    request_id: str
    layer: int | None  # None: every detector
    positions: np.ndarray
    generated: np.ndarray


@dataclass
class _PolicyItem:
    policy: Any
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _EndItem:
    sink: StreamSink


@dataclass
class _Req:
    owner: StreamSink | None  # None while orphaned (its stream broke; a new one may adopt it)
    orphaned_at: float | None = None  # time.monotonic() when orphaned
    closing: bool = False  # RequestFinished accepted; the worker has not finished it yet
    hwm: dict[int, int] = field(default_factory=dict)  # layer -> highest position scored


class Pipeline:
    """The scoring queue + worker.

    Args:
        scorer: `monitor.score.Scorer` (`.layers`, `.detectors_on(layer)`, `.score`).
        tracker: `monitor.judge.RequestTracker` (owned by the worker thread).
        policy: the initial `Policy`.
        metrics: the `Metrics` object.
        audit: the `AuditLog`.
        bundle_name, bundle_sha256, model_name: carried into audit lines.
        capacity_rows: queue capacity in rows (activation memory bound).
        max_batch_rows: most rows per scorer call.
        max_closed: how many finished request ids are remembered (late-frame detection).
        orphan_grace_s: how long the requests of a broken stream wait for a reconnecting
            client to carry them on before they are finished with reason "orphaned".
        alerts: alert delivery (Alertmanager / webhook); escalations are handed to it
            without blocking. None: no delivery.
    """

    def __init__(
        self,
        scorer: Any,
        tracker: Any,
        policy: Any,
        metrics: Metrics,
        audit: AuditLog,
        *,
        bundle_name: str,
        bundle_sha256: str,
        model_name: str,
        capacity_rows: int = 65536,
        max_batch_rows: int = 4096,
        max_closed: int = 100_000,
        orphan_grace_s: float = 30.0,
        alerts: AlertDispatcher | None = None,
    ) -> None:
        if capacity_rows < 1 or max_batch_rows < 1:
            raise ValueError("capacity_rows and max_batch_rows must be >= 1")
        self.scorer = scorer
        self.tracker = tracker
        self.metrics = metrics
        self.audit = audit
        self.alerts = alerts
        self.bundle_name = bundle_name
        self.bundle_sha256 = bundle_sha256
        self.model_name = model_name
        self.capacity_rows = int(capacity_rows)
        self.max_batch_rows = int(max_batch_rows)
        self.max_closed = int(max_closed)
        self.orphan_grace_s = float(orphan_grace_s)
        self._policy = policy
        self._judged = self._judged_map(policy)
        self._cond = threading.Condition()
        self._items: deque[Any] = deque()
        self._rows_queued = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        # request registry (reader threads + worker): owner stream, closed ids
        self._reg_lock = threading.Lock()
        self._requests: dict[str, _Req] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._tracker_evicted = 0
        metrics.queue_capacity.set(self.capacity_rows)
        metrics.queue_depth.set(0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the scoring worker thread."""
        self._thread = threading.Thread(target=self._run, name="scoring-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish orphans, drain the queue and stop the worker; True if it finished within
        `timeout` s."""
        with self._reg_lock:
            orphans = [rid for rid, r in self._requests.items()
                       if r.owner is None and not r.closing]
        for rid in orphans:  # shutting down: nobody will reconnect to this process
            self.submit_finish(None, rid, "orphaned")
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        if alive:
            log.error("scoring worker did not drain within %.1f s (%d rows queued)",
                      timeout, self._rows_queued)
        return not alive

    @property
    def rows_queued(self) -> int:
        """Rows currently waiting in the queue."""
        return self._rows_queued

    @property
    def policy(self) -> Any:
        """The policy the pipeline judges with (latest submitted)."""
        return self._policy

    # ------------------------------------------------------------------ registry

    def request_state(self, request_id: str) -> str:
        """'live', 'closed' (finished / evicted recently) or 'unknown'."""
        with self._reg_lock:
            r = self._requests.get(request_id)
            if r is not None and not r.closing:
                return "live"
            if r is not None or request_id in self._closed:
                return "closed"
            return "unknown"

    def register(self, request_id: str, sink: StreamSink) -> bool:
        """Record `sink` as owner of `request_id` if new or orphaned; False if it is closed."""
        with self._reg_lock:
            r = self._requests.get(request_id)
            if r is not None:
                if r.owner is None and not r.closing:  # a reconnected client carries on
                    r.owner, r.orphaned_at = sink, None
                    self.metrics.requests_reattached.inc()
                return not r.closing
            if request_id in self._closed:
                return False
            self._requests[request_id] = _Req(owner=sink)
            return True

    def owned_by(self, sink: StreamSink) -> list[str]:
        """Live request ids owned by `sink`."""
        with self._reg_lock:
            return [rid for rid, r in self._requests.items()
                    if r.owner is sink and not r.closing]

    def orphan(self, sink: StreamSink) -> int:
        """The stream of `sink` broke: keep its live requests for `orphan_grace_s` so a
        reconnecting client can carry them on (`register` adopts them); return how many."""
        now = time.monotonic()
        with self._reg_lock:
            owned = [r for r in self._requests.values() if r.owner is sink and not r.closing]
            for r in owned:
                r.owner, r.orphaned_at = None, now
        return len(owned)

    def _sweep_orphans(self) -> None:
        """Finish orphans nobody adopted within the grace period (reason "orphaned")."""
        cutoff = time.monotonic() - self.orphan_grace_s
        with self._reg_lock:
            expired = [rid for rid, r in self._requests.items() if r.owner is None
                       and r.orphaned_at is not None and r.orphaned_at <= cutoff]
        for rid in expired:
            self.submit_finish(None, rid, "orphaned")

    def _close_id(self, request_id: str, *, drop: bool = True) -> None:
        # caller holds _reg_lock
        if drop:
            self._requests.pop(request_id, None)
        self._closed[request_id] = None
        self._closed.move_to_end(request_id)
        while len(self._closed) > self.max_closed:
            self._closed.popitem(last=False)

    # ------------------------------------------------------------------ submission

    def _put(self, item: Any, rows: int = 0) -> None:
        with self._cond:
            if rows:
                if self._rows_queued + rows > self.capacity_rows:
                    raise QueueFull(
                        f"scoring queue full: {self._rows_queued} of {self.capacity_rows} rows "
                        f"queued, frame has {rows} rows"
                    )
                self._rows_queued += rows
                self.metrics.queue_depth.set(self._rows_queued)
            self._items.append(item)
            self._cond.notify()

    def submit_frame(self, sink: StreamSink, frame: DecodedFrame, t_recv: float) -> None:
        """Queue a validated frame; raises `QueueFull` when it does not fit."""
        self._put(_FrameItem(sink, frame, t_recv, frame.n_rows), rows=frame.n_rows)

    def submit_finish(self, sink: StreamSink | None, request_id: str, reason: str) -> bool:
        """Close `request_id` now (late frames are refused) and queue its final verdicts.

        Returns False (nothing queued) when the id is not live.
        """
        with self._reg_lock:
            r = self._requests.get(request_id)
            if r is None or r.closing:
                return False
            r.closing = True
            self._close_id(request_id, drop=False)
        self._put(_FinishItem(sink, request_id, reason))
        return True

    def submit_unscored(
        self, request_id: str, layer: int | None, positions: np.ndarray, generated: np.ndarray,
    ) -> None:
        """Record rows of a live request that arrived but will not be scored."""
        self._put(_UnscoredItem(request_id, layer, positions, generated))

    def submit_end(self, sink: StreamSink) -> None:
        """Queue the end marker of a stream: `sink.post(None)` after its last item."""
        self._put(_EndItem(sink))

    def set_policy(self, policy: Any, wait: float | None = None) -> None:
        """Swap the policy at this point of the queue (the worker applies it in order)."""
        item = _PolicyItem(policy)
        self._policy = policy
        self._put(item)
        if wait:
            item.done.wait(wait)

    # ------------------------------------------------------------------ worker

    @staticmethod
    def _judged_map(policy: Any) -> dict[str, Any]:
        return dict(policy.detectors)

    def _take(self) -> list[Any] | None:
        """Block for the next unit of work: a run of frames or one control item."""
        with self._cond:
            if not self._items:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
                if not self._items:
                    return []  # idle: the worker sweeps orphans
            head = self._items[0]
            if not isinstance(head, _FrameItem):
                return [self._items.popleft()]
            batch = [self._items.popleft()]
            rows = head.rows
            while self._items and isinstance(self._items[0], _FrameItem):
                nxt = self._items[0]
                if rows + nxt.rows > self.max_batch_rows:
                    break
                batch.append(self._items.popleft())
                rows += nxt.rows
            return batch

    def _release(self, rows: int) -> None:
        with self._cond:
            self._rows_queued -= rows
            self.metrics.queue_depth.set(self._rows_queued)

    def _run(self) -> None:
        log.info("scoring worker started (capacity %d rows, batch %d rows)",
                 self.capacity_rows, self.max_batch_rows)
        while True:
            work = self._take()
            if work is None:
                break
            try:
                if not work:
                    self._sweep_orphans()
                elif isinstance(work[0], _FrameItem):
                    try:
                        self._score_frames(work)
                    finally:
                        self._release(sum(it.rows for it in work))
                else:
                    self._control(work[0])
            except Exception:  # the worker must never die
                log.exception("scoring worker: unexpected error (continuing)")
            self._sync_tracker_state()
        log.info("scoring worker stopped")

    def _control(self, item: Any) -> None:
        if isinstance(item, _FinishItem):
            self._finish(item)
        elif isinstance(item, _UnscoredItem):
            dets: Sequence[str | None]
            if item.layer is None:
                dets = [None]
            else:
                dets = [d for d in self.scorer.detectors_on(item.layer) if d in self._judged]
            for d in dets:
                self.tracker.mark_unscored(item.request_id, d, item.positions, item.generated)
        elif isinstance(item, _PolicyItem):
            self.tracker.set_policy(item.policy)
            self._judged = self._judged_map(item.policy)
            item.done.set()
        elif isinstance(item, _EndItem):
            item.sink.post(None)

    def _finish(self, item: _FinishItem) -> None:
        owner = self._owner(item.request_id) or item.sink  # None: nobody left to tell
        with self._reg_lock:
            self._requests.pop(item.request_id, None)
        updates = self.tracker.finish(item.request_id)
        self.metrics.requests_finished.labels(
            model_name=self.model_name, reason=self.metrics.finish_reason(item.reason)).inc()
        for u in updates:
            self.metrics.observe_request_score(u.detector, u.score)
            if self.audit.include_finals:
                self.audit.write(audit_record(
                    u, event="final", bundle_name=self.bundle_name,
                    bundle_sha256=self.bundle_sha256, model_name=self.model_name))
            if owner is not None:
                owner.post(verdict_message(u))

    def _sync_tracker_state(self) -> None:
        """Mirror tracker evictions into the registry; update the active-requests gauge."""
        evicted = getattr(self.tracker, "evicted", 0)
        if evicted != self._tracker_evicted:
            self._tracker_evicted = evicted
            with self._reg_lock:
                for rid in [r for r in self._requests if not self.tracker.is_live(r)
                            and self.tracker.is_finished(r)]:
                    self._close_id(rid)
                    log.warning("request %s evicted from the tracker (max requests)", rid)
        self.metrics.active_requests.set(len(self._requests))

    def _score_frames(self, items: list[_FrameItem]) -> None:
        by_layer: dict[int, list[_FrameItem]] = {}
        for it in items:
            by_layer.setdefault(it.frame.layer, []).append(it)
        for layer, group in by_layer.items():
            self._score_layer(layer, group)

    def _score_layer(self, layer: int, group: list[_FrameItem]) -> None:
        dets = self.scorer.detectors_on(layer)
        cols = [(j, d) for j, d in enumerate(dets) if d in self._judged]
        if not cols:
            return  # layer not in the current plan: nothing judges it
        xs = [it.frame.x for it in group]
        # float16 and float32 frames together: numpy promotes to float32 (exact)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
        t0 = time.perf_counter()
        try:
            scores = np.asarray(self.scorer.score(layer, x), dtype=np.float32)
        except Exception as exc:
            log.exception("scorer failed on layer %d (%d rows)", layer, x.shape[0])
            for it in group:
                self._unscored_frame(it, "scorer_error", f"scorer failed: {exc}")
            return
        t1 = time.perf_counter()
        n = int(x.shape[0])
        self.metrics.scoring_latency.labels(layer=str(layer)).observe(t1 - t0)
        self.metrics.batch_rows.observe(n)
        self.metrics.rows_scored.labels(model_name=self.model_name, layer=str(layer)).inc(n)
        row0 = 0
        n_dup = 0
        for it in group:
            f = it.frame
            fs = scores[row0:row0 + f.n_rows]
            row0 += f.n_rows
            self.metrics.frame_latency.observe(t1 - it.t_recv)
            for (a, b), rid in zip(f.span_bounds, f.request_ids, strict=True):
                # rows at positions already scored on this layer are recomputes
                # (preemption): skip them, count them
                with self._reg_lock:
                    req = self._requests.get(rid)
                pos = f.positions[a:b]
                if req is not None:
                    hwm = req.hwm.get(layer, -1)
                    if pos.size and int(pos[0]) <= hwm:
                        # positions of a span are contiguous: the recomputed ones are a prefix
                        d = min(int(pos.size), hwm - int(pos[0]) + 1)
                        n_dup += d
                        a += d
                        if a >= b:
                            continue
                        pos = f.positions[a:b]
                    req.hwm[layer] = max(hwm, int(pos[-1]))
                for j, det in cols:
                    ups = self.tracker.observe(rid, det, pos, f.generated[a:b], fs[a:b, j])
                    for u in ups:
                        self._handle_update(u, it.sink)
        if n_dup:
            self.metrics.duplicate_rows.inc(n_dup)

    def _unscored_frame(self, it: _FrameItem, reason: str, message: str) -> None:
        f = it.frame
        self.metrics.rows_unscored.labels(reason=reason).inc(f.n_rows)
        for d in self.scorer.detectors_on(f.layer):
            if d not in self._judged:
                continue
            for (a, b), rid in zip(f.span_bounds, f.request_ids, strict=True):
                self.tracker.mark_unscored(rid, d, f.positions[a:b], f.generated[a:b])
        it.sink.post(monitor_pb2.ServerMessage(error=monitor_pb2.StreamError(
            code=13, reason=reason, message=message, seq=f.seq)))

    def _handle_update(self, u: Any, sink: StreamSink) -> None:
        if u.escalated and u.severity != "none":
            event = "would_alert" if u.mode == "observe" else "alert"
            self.metrics.alerts.labels(detector=u.detector, severity=u.severity,
                                       mode=u.mode).inc()
            self.audit.write(audit_record(
                u, event=event, bundle_name=self.bundle_name,
                bundle_sha256=self.bundle_sha256, model_name=self.model_name))
            if self.alerts is not None:
                self.alerts.escalation(u, getattr(u, "correlation_id", ""))
            log.info("%s: request=%s detector=%s severity=%s score=%.3f position=%d",
                    event, u.request_id, u.detector, u.severity, u.score,
                    u.crossed_at_position)
        owner = self._owner(u.request_id) or sink
        owner.post(verdict_message(u))

    def _owner(self, request_id: str) -> StreamSink | None:
        with self._reg_lock:
            r = self._requests.get(request_id)
            return None if r is None else r.owner
