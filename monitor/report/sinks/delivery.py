"""Delivery: one worker thread per sink, a bounded in-memory queue, a spool, backoff.

Data flow for one sink::

    scoring worker ──submit()──► queue (bounded, non-blocking; full: drop + count)
                                   │ sink worker thread
                                   ▼
               spool empty and sink up? ── yes ─► sink.deliver([event]) ── ok ─► delivered
                     │ no                                   │ retryable failure
                     ▼                                      ▼
                   spool.append(event)  ◄───────────────────┘
                     │ (when the retry time has come: oldest first, `max_batch` per try)
                     ▼
               sink.deliver(batch) ── ok ─► spool.remove ; sink up, backoff reset
                                   └─ retryable failure ─► backoff x2 (cap), sink down

Order: once anything is spooled, new events queue behind it, so a sink receives events
in the order they were judged. At-least-once: an event leaves the spool only after the
receiver answered 2xx; a crash between that answer and the removal re-sends it (the
idempotency key makes that harmless). A non-retryable answer (4xx) drops the batch and
counts it (reason `rejected`).

Shutdown (`stop`): queued events are delivered if the sink is up, otherwise spooled; one
last drain of the spool is tried within the deadline. What a non-durable spool still holds
then is counted as dropped (reason `lost_on_exit`). `lost` counts every event that will
never be delivered for a reason other than the configured bounds (spool write errors,
`lost_on_exit`): a non-zero value makes the server exit non-zero.

Thread rules: `submit` from any thread (never blocks); everything else of the sink and its
spool runs on the worker thread; metrics are thread-safe.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitor.report.sinks.events import (
    DELIVERED_MODES,
    AlertContext,
    AlertEvent,
    EscalationLike,
    alert_event,
)
from monitor.report.sinks.http import DeliveryError
from monitor.report.sinks.spool import Spool, SpoolResult

__all__ = ["DROP_REASONS", "AlertDispatcher", "DeliveryConfig", "Sink", "SinkMetrics",
           "SinkWorker"]

log = logging.getLogger(__name__)

#: Every reason an alert event is dropped (label `reason`; all pre-created at 0).
DROP_REASONS = ("queue_full", "spool_full", "spool_error", "corrupt", "rejected",
                "lost_on_exit")

_PREFIX = "safety_monitor_alert_"


class Sink(Protocol):
    """A delivery target. Called only from its worker thread."""

    name: str
    target: str  # the URL posted to, redacted for logs (`http.redact_url`)
    max_batch: int  # most events per `deliver` call
    timeout_s: float  # HTTP timeout of one request (bounds how long a call may take)

    def deliver(self, events: Sequence[AlertEvent]) -> None:
        """Deliver in order, all or nothing; raise `DeliveryError` on failure."""

    def tick(self, now: float) -> None:
        """Periodic work (re-sends, resolutions); may raise `DeliveryError`."""


@dataclass(frozen=True)
class DeliveryConfig:
    """Queue and retry settings shared by every sink.

    Attributes:
        queue_events: in-memory queue per sink (events); full: drop + count (`queue_full`).
        backoff_initial_s: first retry delay after a failure; doubles per failure.
        backoff_max_s: cap of the retry delay.
        tick_s: how often the worker wakes to retry and to call `sink.tick`.
        stop_timeout_s: longest `stop` waits for the final delivery attempt.
    """

    queue_events: int = 10_000
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    tick_s: float = 0.25
    stop_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("queue_events", "backoff_initial_s", "backoff_max_s", "tick_s",
                     "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"delivery {name}: expected > 0, found {getattr(self, name)}")


class SinkMetrics:
    """Delivery and spool metrics on the server's registry, every series created at 0
    for every configured sink (label `sink`) and drop reason."""

    def __init__(self, registry: CollectorRegistry, sinks: Sequence[str]) -> None:
        r = registry
        p = _PREFIX
        self.delivered = Counter(p + "events_delivered", "Alert events a sink accepted "
                                 "(2xx).", ["sink"], registry=r)
        self.attempts = Counter(p + "delivery_attempts", "Delivery requests by result "
                                "(ok | error).", ["sink", "result"], registry=r)
        self.spooled = Counter(p + "events_spooled", "Alert events written to the spool "
                               "(sink down or behind).", ["sink"], registry=r)
        self.spooled_bytes = Counter(p + "spooled_bytes", "Bytes written to the spool.",
                                     ["sink"], registry=r)
        self.dropped = Counter(p + "events_dropped", "Alert events that will never be "
                               "delivered, by reason.", ["sink", "reason"], registry=r)
        self.dropped_bytes = Counter(p + "dropped_bytes", "Bytes of dropped alert events "
                                     "(spool evictions and refusals).", ["sink", "reason"],
                                     registry=r)
        self.spool_events = Gauge(p + "spool_events", "Alert events in the spool now.",
                                  ["sink"], registry=r)
        self.spool_bytes = Gauge(p + "spool_bytes", "Bytes in the spool now.", ["sink"],
                                 registry=r)
        self.spool_capacity = Gauge(p + "spool_capacity_bytes", "Bound of the spool "
                                    "(beyond it the oldest events are evicted).", ["sink"],
                                    registry=r)
        self.queue_events = Gauge(p + "queue_events", "Alert events waiting in memory.",
                                  ["sink"], registry=r)
        self.up = Gauge(p + "sink_up", "1 when the last delivery attempt succeeded (or none "
                        "was needed), 0 while failing.", ["sink"], registry=r)
        for s in sinks:
            for c in (self.delivered, self.spooled, self.spooled_bytes):
                c.labels(sink=s)
            for res in ("ok", "error"):
                self.attempts.labels(sink=s, result=res)
            for reason in DROP_REASONS:
                self.dropped.labels(sink=s, reason=reason)
                self.dropped_bytes.labels(sink=s, reason=reason)
            for g in (self.spool_events, self.spool_bytes, self.queue_events):
                g.labels(sink=s).set(0)
            self.up.labels(sink=s).set(1)


_STOP = object()


class SinkWorker:
    """Owns one sink, its queue and its spool; runs the delivery thread."""

    def __init__(self, sink: Sink, spool: Spool, metrics: SinkMetrics,
                 config: DeliveryConfig | None = None) -> None:
        self.sink = sink
        self.spool = spool
        self.metrics = metrics
        self.config = config or DeliveryConfig()
        self.name = sink.name
        self._q: queue.Queue[AlertEvent | object] = queue.Queue(self.config.queue_events)
        self._thread: threading.Thread | None = None
        self._up = True
        self._backoff = self.config.backoff_initial_s
        self._retry_at = 0.0
        self._last_error_log = 0.0
        self.lost = 0  # events lost for reasons other than the configured bounds
        self.delivered = 0
        metrics.spool_capacity.labels(sink=self.name).set(spool.max_bytes)
        self._sync_gauges()
        if spool.events:
            log.info("alert sink %s: %d events (%d bytes) left in the spool by an earlier "
                     "run; delivering them first", self.name, spool.events, spool.bytes)

    # -- any thread --------------------------------------------------------------------

    def submit(self, event: AlertEvent) -> bool:
        """Queue an event; never blocks. False (counted `queue_full`) when the queue is full
        or the worker has stopped."""
        try:
            self._q.put_nowait(event)
        except queue.Full:
            self._count_drop("queue_full", len(event.to_json()))
            return False
        self.metrics.queue_events.labels(sink=self.name).set(self._q.qsize())
        return True

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name=f"alert-sink-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Deliver or spool what is queued, try a last drain; True if the thread ended."""
        if self._thread is None:
            return True
        self._q.put(_STOP)
        self._thread.join(self.config.stop_timeout_s + 2 * self.sink.timeout_s + 1.0)
        return not self._thread.is_alive()

    # -- worker thread -----------------------------------------------------------------

    def _sync_gauges(self) -> None:
        m, s = self.metrics, self.name
        m.spool_events.labels(sink=s).set(self.spool.events)
        m.spool_bytes.labels(sink=s).set(self.spool.bytes)
        m.queue_events.labels(sink=s).set(self._q.qsize())
        m.up.labels(sink=s).set(1 if self._up else 0)

    def _count_drop(self, reason: str, nbytes: int, n: int = 1) -> None:
        self.metrics.dropped.labels(sink=self.name, reason=reason).inc(n)
        self.metrics.dropped_bytes.labels(sink=self.name, reason=reason).inc(nbytes)
        if reason in ("spool_error", "lost_on_exit"):
            self.lost += n

    def _log_error(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 10.0:
            self._last_error_log = now
            log.error("alert sink %s: %s", self.name, msg)

    def _note(self, res: SpoolResult) -> None:
        for reason, nbytes in res.dropped:
            self._count_drop(reason, nbytes)
            self._log_error(f"spool over {self.spool.max_bytes} bytes: dropped an event "
                            f"({reason})")

    def _to_spool(self, ev: AlertEvent) -> None:
        try:
            res = self.spool.append(ev)
        except OSError as e:
            self._count_drop("spool_error", len(ev.to_json()))
            self._log_error(f"cannot spool event {ev.key}: {e}")
            return
        self._note(res)
        if res.stored:
            self.metrics.spooled.labels(sink=self.name).inc()
            self.metrics.spooled_bytes.labels(sink=self.name).inc(len(ev.to_json()))

    def _attempt(self, events: Sequence[AlertEvent]) -> str:
        """Deliver; returns "ok", "retry" or "rejected" (and updates up / backoff)."""
        try:
            self.sink.deliver(events)
        except DeliveryError as e:
            self.metrics.attempts.labels(sink=self.name, result="error").inc()
            if not e.retryable:
                self._log_error(f"{e}: not retryable, dropping {len(events)} event(s)")
                self._count_drop("rejected", sum(len(ev.to_json()) for ev in events),
                                 len(events))
                return "rejected"
            self._log_error(f"{e}: retrying in {self._backoff:.1f} s (events spooled)")
            self._up = False
            self._retry_at = time.monotonic() + self._backoff * (0.8 + 0.4 * random.random())
            self._backoff = min(self._backoff * 2, self.config.backoff_max_s)
            return "retry"
        self.metrics.attempts.labels(sink=self.name, result="ok").inc()
        self.metrics.delivered.labels(sink=self.name).inc(len(events))
        self.delivered += len(events)
        if not self._up:
            log.info("alert sink %s: delivering again", self.name)
        self._up = True
        self._backoff = self.config.backoff_initial_s
        return "ok"

    def _handle(self, ev: AlertEvent) -> None:
        if self.spool.events or not self._up:
            self._to_spool(ev)
        elif self._attempt([ev]) == "retry":
            self._to_spool(ev)

    def _drain_once(self) -> bool:
        """Deliver one batch from the spool if due; True if the spool may have more."""
        if not self.spool.events or (not self._up and time.monotonic() < self._retry_at):
            return False
        batch, bad = self.spool.peek(max(1, self.sink.max_batch))
        self._note(SpoolResult(True, bad))
        if not batch:
            return bool(self.spool.events)
        result = self._attempt([ev for _, ev in batch])
        if result != "retry":
            self.spool.remove([i for i, _ in batch])
            return True
        return False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            busy = self._drain_once()
            try:
                item = self._q.get(timeout=0 if busy else self.config.tick_s)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, AlertEvent)
                self._handle(item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = None
            try:
                self.sink.tick(time.time())
            except DeliveryError as e:
                self._log_error(f"periodic send failed: {e}")
            self._sync_gauges()
        self._final_drain()

    def _final_drain(self) -> None:
        deadline = time.monotonic() + self.config.stop_timeout_s
        self._retry_at = 0.0  # one more try now, whatever the backoff says
        while self.spool.events and time.monotonic() < deadline:
            if not self._drain_once():
                break
        if self.spool.events and not self.spool.durable:
            n, b = self.spool.events, self.spool.bytes
            self._count_drop("lost_on_exit", b, n)
            log.error("alert sink %s: %d undelivered events lost at exit (no spool "
                      "directory configured)", self.name, n)
        elif self.spool.events:
            log.warning("alert sink %s: %d undelivered events stay in the spool for the "
                        "next start", self.name, self.spool.events)
        self._sync_gauges()


class AlertDispatcher:
    """Fan-out of escalations to every sink worker (the scoring worker's seam).

    Args:
        context: process-wide labels (model, bundle, pod, namespace, runbook).
        workers: one per configured sink (may be empty: then nothing is delivered).
    """

    def __init__(self, context: AlertContext, workers: Sequence[SinkWorker]) -> None:
        self.context = context
        self.workers = list(workers)

    @property
    def enabled(self) -> bool:
        """True when at least one sink is configured."""
        return bool(self.workers)

    @property
    def lost(self) -> int:
        """Events lost for reasons other than the configured bounds (all sinks)."""
        return sum(w.lost for w in self.workers)

    def escalation(self, update: EscalationLike, correlation_id: str = "") -> None:
        """Hand one escalation to every sink if its mode is delivered; never blocks."""
        if not self.workers or update.mode not in DELIVERED_MODES:
            return
        if update.severity not in ("warn", "critical"):
            return
        ev = alert_event(update, self.context, now=time.time(), correlation_id=correlation_id)
        for w in self.workers:
            w.submit(ev)

    def start(self) -> None:
        """Start every worker thread."""
        for w in self.workers:
            w.start()

    def stop(self) -> bool:
        """Stop every worker (deliver / spool what is queued); True if all ended."""
        return all([w.stop() for w in self.workers])
