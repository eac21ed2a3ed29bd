"""Prometheus metrics of the monitor sidecar.

All metrics live in the `Metrics` object's own `CollectorRegistry` (never the global
default one), share the prefix `safety_monitor_`, use base units (`_seconds`, `_bytes`)
and end counters in `_total`. Labels are bounded: `model_name`, `layer`, `detector`,
`severity`, `mode`, `reason`, `result` — never request ids or other unbounded values.

The per-detector request-score histogram has a bucket edge at each policy threshold ``t``
(``threshold_edge``: the largest float below ``t``, so the requests above the edge are
exactly those with ``judged_peak >= t``, the ones that reached that severity) plus a
coarse grid; it is recreated when a policy reload changes the thresholds.

Every labelled counter exists from start-up at 0 for every label value it can take:
each `Reason` (`frames_rejected`, `rows_unscored`), each `FinishReason`
(`requests_finished`), each `Incomplete` (`requests_incomplete`), and each detector x
severity x mode of the loaded policy (`alerts`, re-created on reload), so `rate()` /
`increase()` see the first event.

Values other stages own (tracker and registry counters) are pulled at scrape time
through `add_pull` callbacks, never copied: the callback reads the owner's counter.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor.constants import MODES, SEVERITIES, FinishReason, Incomplete, Reason
from monitor.roles import ROLE_NAMES

__all__ = ["PREFIX", "SCORE_GRID", "Metrics", "score_buckets", "threshold_edge"]

log = logging.getLogger(__name__)

PREFIX = "safety_monitor_"

#: Coarse grid of the request-score histogram (scores are probabilities in [0, 1]).
SCORE_GRID: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)



class _PullCollector(Collector):
    """Unlabelled counters and gauges whose values are read from callbacks at scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, str, str, Callable[[], float]]] = []

    def add(self, kind: str, name: str, doc: str, fn: Callable[[], float]) -> None:
        with self._lock:
            self._items.append((kind, name, doc, fn))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            items = list(self._items)
        for kind, name, doc, fn in items:
            try:
                value = float(fn())
            except Exception:  # a broken source must not break the whole scrape
                log.exception("metrics: pull source %s failed", name)
                continue
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


def threshold_edge(t: float) -> float:
    """The request-score bucket edge of threshold ``t``: the largest float below ``t``.

    The tracker alerts on ``peak >= t``; a Prometheus bucket counts ``score <= le``. With
    ``le = nextafter(t, 0)``, ``score > le`` holds exactly when ``score >= t`` (no float lies
    between), so ``count - bucket{le}`` is the number of requests that reached ``t``. The
    edge is never rounded: a 6-significant-digit threshold such as 0.0123457
    (``probes.calibrate.policy_threshold``) keeps its own edge. Its ``le`` label is
    Python's shortest repr (prometheus_client), e.g. ``0.49999999999999994`` for 0.5."""
    return math.nextafter(float(t), 0.0)


def score_buckets(thresholds: Iterable[float]) -> tuple[float, ...]:
    """Bucket upper bounds, sorted, unique: the coarse grid (edges at the grid values:
    ``le="0.5"`` counts scores ≤ 0.5), :func:`threshold_edge` of every threshold in
    (0, 1], and 1.0."""
    edges = {float(v) for v in SCORE_GRID}
    edges.update(threshold_edge(t) for t in thresholds if 0.0 < float(t) <= 1.0)
    edges.add(1.0)
    return tuple(sorted(edges))


class Metrics:
    """All monitor metrics on one private registry.

    Args:
        model_name: the served model (the `model_name` label, joins with vLLM metrics).
        thresholds: policy threshold values (bucket edges of `request_score`).
    """

    def __init__(self, model_name: str = "", thresholds: Iterable[float] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r = self.registry
        p = PREFIX
        self.frames_received = Counter(p + "frames_received", "Activation frames received "
                                       "(before validation).", ["model_name"], registry=r)
        self.bytes_received = Counter(p + "received_bytes", "Activation payload bytes "
                                      "received.", ["model_name"], registry=r)
        self.rows_scored = Counter(p + "rows_scored", "Rows (tokens) scored.",
                                   ["model_name", "layer"], registry=r)
        self.rows_received = Counter(p + "rows_received", "Valid rows received, by token "
                                     "role (monitor.roles; clients without roles: other / "
                                     "generated).", ["model_name", "role"], registry=r)
        self.requests_finished = Counter(p + "requests_finished", "Requests finished "
                                         "(final verdicts emitted).", ["model_name", "reason"],
                                         registry=r)
        self.requests_incomplete = Counter(p + "requests_incomplete", "Requests whose final "
                                           "verdict is incomplete (some in-scope positions "
                                           "may not have been judged), by why "
                                           "(monitor.constants.Incomplete).",
                                           ["model_name", "reason"], registry=r)
        self.requests_reattached = Counter(p + "requests_reattached", "Requests whose stream "
                                           "broke and that a new stream carried on "
                                           "(reconnecting client).", registry=r)
        self.frames_rejected = Counter(p + "frames_rejected", "Client messages refused "
                                       "with an in-stream error or RPC error.", ["reason"],
                                       registry=r)
        self.rows_unscored = Counter(p + "rows_unscored", "Rows that arrived but could "
                                     "not be scored; reason=missing: in-scope positions of a "
                                     "finished request that never arrived.", ["reason"], registry=r)
        self.frames_missing = Counter(p + "frames_missing", "Frames missing according to "
                                      "gaps in stream sequence numbers.", registry=r)
        self.client_dropped_frames = Counter(p + "client_dropped_frames", "Frames the "
                                             "client reports it dropped.", registry=r)
        self.client_dropped_rows = Counter(p + "client_dropped_rows", "Rows the client "
                                           "reports it dropped.", registry=r)
        self.client_dropped_bytes = Counter(p + "client_dropped_bytes", "Bytes the client "
                                            "reports it dropped.", registry=r)
        self.client_reconnects = Counter(p + "client_reconnects", "Reconnects the client "
                                         "reports.", registry=r)
        self.client_stats_evicted = Counter(p + "client_stats_evicted", "Client instances "
                                            "whose ClientStats baseline was dropped, least "
                                            "recently reporting first, to keep a bounded "
                                            "number (a later report of one counts its totals "
                                            "again).", registry=r)
        self.unscored_marks_dropped = Counter(p + "unscored_marks_dropped", "Unscored rows "
                                              "(already in rows_unscored) not marked in "
                                              "their requests because the queue of such marks "
                                              "was full; the finals count them as missing.",
                                              registry=r)
        self.duplicate_rows = Counter(p + "duplicate_rows", "Rows skipped because their "
                                      "(request, layer, position) was already scored.",
                                      registry=r)
        self.alerts = Counter(p + "alerts", "Severity escalations (mode=observe: would-alert).",
                              ["detector", "severity", "mode"], registry=r)
        self.blocks = Counter(p + "blocks", "Block orders sent to the capture plugin (mode "
                              "block at critical); the plugin stops that request.",
                              ["detector"], registry=r)
        self.judged_through_sent = Counter(
            p + "judged_through", "JudgedThrough progress messages sent (prompt-time "
            "blocking: the plugin releases a request's first token once its prompt is "
            "judged).", registry=r)
        self.block_tokens_after = Histogram(
            p + "block_tokens_after_crossing", "Tokens a blocked request generated after "
            "its crossing token, counted by the sidecar when the request finished "
            "(`monitor.report.verdicts.tokens_after_crossing`).", ["detector"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.scoring_latency = Histogram(p + "scoring_latency_seconds", "Time of one scorer "
                                         "call (one batch of one layer).", ["layer"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.frame_latency = Histogram(p + "frame_latency_seconds", "Frame receive to its "
                                       "rows scored and judged (verdicts posted, escalations "
                                       "handed to audit and alert sinks).",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(p + "batch_rows", "Rows per scorer call.",
                                    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536),
                                    registry=r)
        self.queue_depth = Gauge(p + "queue_depth_rows", "Rows waiting in the scoring queue.",
                                 registry=r)
        self.queue_capacity = Gauge(p + "queue_capacity_rows", "Capacity of the scoring "
                                    "queue in rows.", registry=r)
        self.active_requests = Gauge(p + "active_requests", "Requests with live state.",
                                     registry=r)
        self.active_streams = Gauge(p + "active_streams", "Open Stream RPCs.", registry=r)
        self.bundle_info = Gauge(p + "bundle_info", "Loaded detector bundle (value 1).",
                                 ["bundle", "sha256", "model_name"], registry=r)
        self.policy_info = Gauge(p + "policy_info", "Active policy (value 1).",
                                 ["version", "sha256"], registry=r)
        self.policy_reloads = Counter(p + "policy_reloads", "Policy reload attempts.",
                                      ["result"], registry=r)
        self.audit_write_failures = Counter(p + "audit_write_failures", "Audit log lines "
                                            "that could not be written.", registry=r)
        self.verdicts_dropped = Counter(p + "verdicts_dropped", "Server messages not "
                                        "delivered because their stream had ended (the audit "
                                        "log has them).", registry=r)
        self.stream_read_pauses = Counter(p + "stream_read_pauses", "Times a stream's reads "
                                          "paused because its client left more than "
                                          "--stream-outbound-bytes of verdicts unread.",
                                          registry=r)
        self.build_info = Info(p + "build", "Monitor build.", registry=r)
        for result in ("ok", "refused"):
            self.policy_reloads.labels(result=result)
        for reason in Reason:
            self.frames_rejected.labels(reason=reason.value)
            self.rows_unscored.labels(reason=reason.value)
        for role in ROLE_NAMES:
            self.rows_received.labels(model_name=model_name, role=role)
        for fin in FinishReason:
            self.requests_finished.labels(model_name=model_name, reason=fin.value)
        for why in Incomplete:
            self.requests_incomplete.labels(model_name=model_name, reason=why.value)
        self._pull = _PullCollector()
        r.register(self._pull)
        self._lock = threading.Lock()
        self._score_buckets: tuple[float, ...] = ()
        self.request_score: Histogram | None = None
        self.set_score_thresholds(thresholds)

    # -- request score histogram -------------------------------------------------------

    def set_score_thresholds(self, thresholds: Iterable[float]) -> bool:
        """(Re)create `request_score` when the bucket edges change; True if recreated."""
        buckets = score_buckets(thresholds)
        with self._lock:
            if buckets == self._score_buckets and self.request_score is not None:
                return False
            if self.request_score is not None:
                self.registry.unregister(self.request_score)
            self.request_score = Histogram(
                PREFIX + "request_score", "Per finished request and detector, the highest "
                "aggregate at a judged token: the statistic compared with the thresholds "
                "(a bucket edge just below each policy threshold: above it = reached it).",
                ["detector"], buckets=buckets,
                registry=self.registry,
            )
            self._score_buckets = buckets
        log.info("request_score buckets: %s", ", ".join(repr(b) for b in buckets))
        return True

    def observe_request_score(self, detector: str, score: float) -> None:
        """Record a finished request's score in [0, 1] (``Reporter.final``: its
        ``judged_peak``)."""
        with self._lock:
            hist = self.request_score
        if hist is not None:
            hist.labels(detector=detector).observe(float(score))

    # -- info gauges -------------------------------------------------------------------

    def set_bundle(self, name: str, sha256: str, model_name: str) -> None:
        """Publish the loaded bundle as `bundle_info` (one series, value 1)."""
        self.bundle_info.clear()
        self.bundle_info.labels(bundle=name, sha256=sha256, model_name=model_name).set(1)

    def set_policy(self, version: str, sha256: str, thresholds: Iterable[float],
                   detectors: Iterable[str] = ()) -> None:
        """Publish the active policy, update the score-histogram bucket edges and
        pre-create the alert series of its detectors."""
        self.policy_info.clear()
        self.policy_info.labels(version=version, sha256=sha256).set(1)
        self.set_score_thresholds(thresholds)
        self.init_alert_series(detectors)
        with self._lock:  # request_score at 0 per judged detector (the dashboard's heatmap)
            if self.request_score is not None:
                for det in detectors:
                    self.request_score.labels(detector=det)

    def init_layer_series(self, layers: Iterable[int]) -> None:
        """Create `rows_scored{model_name, layer}` and `scoring_latency_seconds{layer}` at 0
        for every bundle layer (dashboards show 0 rows/s, not "No data", on an idle pod)."""
        for layer in layers:
            self.rows_scored.labels(model_name=self.model_name, layer=str(layer))
            self.scoring_latency.labels(layer=str(layer))

    def init_alert_series(self, detectors: Iterable[str]) -> None:
        """Create `alerts{detector, severity, mode}` at 0 for every detector of the loaded
        policy (call again on reload: series of new detectors appear at 0, existing
        ones keep their counts)."""
        for det in detectors:
            for sev in SEVERITIES:
                for mode in MODES:
                    self.alerts.labels(detector=det, severity=sev, mode=mode)

    def add_pull(self, kind: str, name: str, doc: str, fn: Callable[[], float]) -> None:
        """Export a value another stage owns, read at scrape time.

        `kind` is "counter" (`name` without `_total`; monotonic) or "gauge"; `name`
        gets the `safety_monitor_` prefix. `fn` must be cheap and thread-safe to call
        from the HTTP thread (reading an int attribute is).
        """
        if kind not in ("counter", "gauge"):
            raise ValueError(f"kind: expected counter or gauge, found {kind!r}")
        self._pull.add(kind, PREFIX + name, doc, fn)

    def exposition(self) -> bytes:
        """Text exposition of the registry (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[object, object] | None:
        """Start the /metrics HTTP server on host:port (a negative port disables it).

        Returns (server, thread) from `prometheus_client.start_http_server`.
        """
        if port < 0:
            return None
        return start_http_server(port, addr=host, registry=self.registry)


def parse_exposition(text: str) -> Mapping[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text exposition into {(name, sorted labels): value} (tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out
