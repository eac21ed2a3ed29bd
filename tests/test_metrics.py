"""Unit tests of monitor/report/metrics.py: naming rules, bounded labels, score buckets."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY

from monitor.report.metrics import PREFIX, SCORE_GRID, Metrics, parse_exposition, score_buckets

ALLOWED_LABELS = {"model_name", "layer", "detector", "severity", "mode", "reason", "result",
                  "bundle", "sha256", "version", "le", "torch", "grpc"}


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
    # own registry: nothing leaks into the process-global default registry
    assert not any(f.name.startswith(PREFIX) for f in REGISTRY.collect())


def test_score_buckets_at_thresholds() -> None:
    b = score_buckets([0.62, 0.9, 0.913, 1.5, -1])
    assert 0.62 in b and 0.913 in b and 0.9 in b
    assert 1.5 not in b and b == tuple(sorted(set(b)))
    assert set(SCORE_GRID) <= set(b) and b[-1] == 1.0


def test_request_score_recreated_on_threshold_change() -> None:
    m = Metrics("m", [0.5, 0.62])
    m.observe_request_score("d", 0.55)
    text = m.exposition().decode()
    assert 'safety_monitor_request_score_bucket{detector="d",le="0.5"} 0.0' in text
    assert m.set_score_thresholds([0.5, 0.62]) is False  # unchanged: same histogram
    assert m.set_policy("v2", "abc", [0.42, 0.77]) is None
    m.observe_request_score("d", 0.6)
    s = parse_exposition(m.exposition().decode())
    assert s[("safety_monitor_request_score_bucket", (("detector", "d"), ("le", "0.42")))] == 0
    assert s[("safety_monitor_request_score_bucket", (("detector", "d"), ("le", "0.77")))] == 1
    assert ("safety_monitor_request_score_bucket", (("detector", "d"), ("le", "0.62"))) not in s
    assert s[("safety_monitor_policy_info", (("sha256", "abc"), ("version", "v2")))] == 1
    m.set_policy("v3", "def", [0.42, 0.77])
    s = parse_exposition(m.exposition().decode())
    assert ("safety_monitor_policy_info", (("sha256", "abc"), ("version", "v2"))) not in s


def test_reload_counters_present_from_start_and_finish_reason_bounded() -> None:
    m = Metrics("m")
    s = parse_exposition(m.exposition().decode())
    assert s[("safety_monitor_policy_reloads_total", (("result", "ok"),))] == 0
    assert s[("safety_monitor_policy_reloads_total", (("result", "refused"),))] == 0
    assert m.finish_reason("stop") == "stop"
    assert m.finish_reason("anything-else-123") == "other"


def test_http_endpoint_serves_own_registry() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    m = Metrics("m")
    m.queue_capacity.set(123)
    server, _thread = m.serve("127.0.0.1", port)  # type: ignore[misc]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "safety_monitor_queue_capacity_rows 123.0" in text
        assert "python_gc_objects_collected_total" not in text  # not the default registry
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    assert m.serve("127.0.0.1", -1) is None
