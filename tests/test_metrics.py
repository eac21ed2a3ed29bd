"""Unit tests of monitor/report/metrics.py: naming rules, bounded labels, score buckets."""

from __future__ import annotations

import math
import random
import urllib.request
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from typing import cast

from prometheus_client import REGISTRY

from monitor.constants import MODES, SEVERITIES, FinishReason, Reason
from monitor.report.metrics import (
    PREFIX,
    SCORE_GRID,
    Metrics,
    parse_exposition,
    score_buckets,
    threshold_edge,
)

ALLOWED_LABELS = {"model_name", "layer", "detector", "severity", "mode", "reason", "result",
                  "bundle", "sha256", "version", "le", "torch", "grpc",
                  "role"}  # role: the 7 monitor.roles.ROLE_NAMES


def test_names_units_and_labels() -> None:
    m = Metrics("org/model", [0.5, 0.9])
    m.frames_received.labels(model_name="org/model").inc()
    m.observe_request_score("harmful_intent", 0.7)
    m.alerts.labels(detector="d", severity="warn", mode="observe").inc()
    m.build_info.info({"version": "x"})
    for fam in m.registry.collect():
        assert fam.name.startswith(PREFIX), fam.name
        assert ":" not in fam.name
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples)
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
    # own registry: none of its families leaks into the process-global default registry
    # (the plugin's fail-open gate registers its own counters there on purpose, for
    # vLLM's /metrics, so compare by name rather than by prefix)
    own = {f.name for f in m.registry.collect()}
    assert own and not own & {f.name for f in REGISTRY.collect()}


def test_score_buckets_at_thresholds() -> None:
    b = score_buckets([0.62, 0.9, 0.913, 1.5, -1])
    assert all(threshold_edge(t) in b for t in (0.62, 0.9, 0.913))
    assert threshold_edge(1.5) not in b and b == tuple(sorted(set(b)))
    assert set(SCORE_GRID) <= set(b) and b[-1] == 1.0


def _above(s: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], det: str,
           t: float) -> float:
    """Observations of ``det`` above the bucket edge of threshold ``t``, read from an
    exposition the way a dashboard does: ``count - bucket{le=<edge>}``. The edge must be
    the largest float below ``t`` (nothing else separates ``≥ t`` from ``< t``)."""
    name = "safety_monitor_request_score_bucket"
    les = {dict(k[1])["le"]: v for k, v in s.items()
           if k[0] == name and dict(k[1])["detector"] == det}
    below = [le for le in les if le != "+Inf" and float(le) < t]
    assert below, (t, sorted(les))
    le = max(below, key=float)
    assert float(le) == math.nextafter(t, 0.0), (t, le)
    return s[("safety_monitor_request_score_count", (("detector", det),))] - les[le]


def test_share_above_a_threshold_edge_is_the_share_that_reached_it() -> None:
    # the tracker's rule is ``peak >= t``; Prometheus buckets are ``le`` (≤ edge). Peaks
    # at t, one float either side of t, and thresholds below 0.1 written with 6
    # significant digits (probes.calibrate.policy_threshold), whose 6-decimal rounding
    # (0.0123457 -> 0.012346) once put a peak that reached warn below the edge
    from probes.calibrate import policy_threshold

    rng = random.Random(5)
    written = [policy_threshold(10 ** rng.uniform(-5, 0)) for _ in range(40)]
    thresholds = [0.0123457, 0.5, 0.62, 0.9, 1.0, *(float(w) for w in written)]
    peaks = [0.01234575, 0.0123456, 0.99, 0.0]
    for t in thresholds:
        peaks += [t, math.nextafter(t, 0.0), math.nextafter(t, 1.0), t - 1e-7, t + 1e-7]
    m = Metrics("m", thresholds)
    for p in peaks:
        m.observe_request_score("d", p)
    s = parse_exposition(m.exposition().decode())
    for t in thresholds:
        assert _above(s, "d", t) == sum(p >= t for p in peaks), t


def test_request_score_recreated_on_threshold_change() -> None:
    m = Metrics("m", [0.5, 0.62])
    m.observe_request_score("d", 0.55)
    text = m.exposition().decode()
    assert 'safety_monitor_request_score_bucket{detector="d",le="0.5"} 0.0' in text
    assert m.set_score_thresholds([0.5, 0.62]) is False  # unchanged: same histogram
    m.set_policy("v2", "abc", [0.42, 0.77])
    m.observe_request_score("d", 0.6)
    s = parse_exposition(m.exposition().decode())
    def le(t: float) -> tuple[tuple[str, str], ...]:
        return (("detector", "d"), ("le", repr(threshold_edge(t))))

    assert s[("safety_monitor_request_score_bucket", le(0.42))] == 0
    assert s[("safety_monitor_request_score_bucket", le(0.77))] == 1
    assert ("safety_monitor_request_score_bucket", le(0.62)) not in s
    assert s[("safety_monitor_policy_info", (("sha256", "abc"), ("version", "v2")))] == 1
    m.set_policy("v3", "def", [0.42, 0.77])
    s = parse_exposition(m.exposition().decode())
    assert ("safety_monitor_policy_info", (("sha256", "abc"), ("version", "v2"))) not in s


def test_labelled_counters_exist_from_start_at_zero() -> None:
    m = Metrics("m")
    m.set_policy("v1", "abc", [0.5], ["harmful_intent", "deception"])
    s = parse_exposition(m.exposition().decode())
    assert s[("safety_monitor_policy_reloads_total", (("result", "ok"),))] == 0
    assert s[("safety_monitor_policy_reloads_total", (("result", "refused"),))] == 0
    for r in Reason:
        assert s[("safety_monitor_frames_rejected_total", (("reason", r.value),))] == 0
        assert s[("safety_monitor_rows_unscored_total", (("reason", r.value),))] == 0
    for f in FinishReason:
        labels = (("model_name", "m"), ("reason", f.value))
        assert s[("safety_monitor_requests_finished_total", labels)] == 0
    for det in ("harmful_intent", "deception"):
        for sev in SEVERITIES:
            for mode in MODES:
                key = (("detector", det), ("mode", mode), ("severity", sev))
                assert s[("safety_monitor_alerts_total", key)] == 0
    # a reload adding a detector adds its series at 0 and keeps the others' counts
    m.alerts.labels(detector="deception", severity="warn", mode="observe").inc()
    m.set_policy("v2", "def", [0.5], ["deception", "new_one"])
    s = parse_exposition(m.exposition().decode())
    assert s[("safety_monitor_alerts_total", (("detector", "new_one"), ("mode", "block"),
                                              ("severity", "critical")))] == 0
    assert s[("safety_monitor_alerts_total", (("detector", "deception"), ("mode", "observe"),
                                              ("severity", "warn")))] == 1


def test_finish_reason_label_is_bounded() -> None:
    assert FinishReason.label("stop") is FinishReason.STOP
    assert FinishReason.label("anything-else-123") is FinishReason.OTHER


def test_pull_sources_read_at_scrape() -> None:
    m = Metrics("m")
    box = {"n": 3}
    m.add_pull("counter", "things", "Things.", lambda: box["n"])
    m.add_pull("gauge", "level", "Level.", lambda: 1 / 0)  # broken source: skipped
    s = parse_exposition(m.exposition().decode())
    assert s[("safety_monitor_things_total", ())] == 3
    box["n"] = 7
    s = parse_exposition(m.exposition().decode())
    assert s[("safety_monitor_things_total", ())] == 7
    assert ("safety_monitor_level", ()) not in s


def test_http_endpoint_serves_own_registry() -> None:
    from monitor.tools.net import free_port

    port = free_port()
    m = Metrics("m")
    m.queue_capacity.set(123)
    served = m.serve("127.0.0.1", port)
    assert served is not None
    server = cast(ThreadingHTTPServer, served[0])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "safety_monitor_queue_capacity_rows 123.0" in text
        assert "python_gc_objects_collected_total" not in text  # not the default registry
    finally:
        server.shutdown()
    assert m.serve("127.0.0.1", -1) is None
