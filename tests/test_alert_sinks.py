"""Alert sinks against a real HTTP receiver on loopback: webhook signing, Alertmanager
payloads, re-send and resolve, spool bounds and order, restart recovery, and every drop
counted. (The end-to-end test with real Prometheus + Alertmanager: test_alerts_e2e.py.)"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from alert_receiver import Receiver
from conftest import wait_until
from prometheus_client import CollectorRegistry

from monitor.report.metrics import parse_exposition
from monitor.report.sinks import AlertContext, AlertEvent, SinkMetrics, SinkWorker
from monitor.report.sinks.alertmanager import AlertmanagerConfig, AlertmanagerSink
from monitor.report.sinks.config import AlertSinksConfig, make_dispatcher
from monitor.report.sinks.delivery import DROP_REASONS, DeliveryConfig
from monitor.report.sinks.events import alert_event
from monitor.report.sinks.spool import DiskSpool, MemorySpool
from monitor.report.sinks.webhook import (
    KEY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookConfig,
    WebhookSink,
    verify_signature,
)

CTX = AlertContext(model_name="m", bundle_name="b", bundle_sha256="ab" * 32, pod="pod-0",
                   namespace="ns", runbook_url="https://example.test/RUNBOOK.md")
FAST = DeliveryConfig(backoff_initial_s=0.05, backoff_max_s=0.2, tick_s=0.02,
                      stop_timeout_s=2.0)


@dataclass
class Update:
    request_id: str
    detector: str = "harmful_intent"
    score: float = 0.95
    severity: str = "critical"
    threshold: float = 0.9
    crossed_at_position: int = 7
    mode: str = "alert"
    policy_version: str = "v1"
    latents: tuple[object, ...] = ()


def ev(i: int, **kw: object) -> AlertEvent:
    return alert_event(Update(f"req-{i}", **kw), CTX, now=1_700_000_000.0 + i)  # type: ignore[arg-type]


def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    return dict(parse_exposition(generate_latest(reg).decode()))


def val(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(reg).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture()
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


# -- events and spools -----------------------------------------------------------------


def test_event_json_roundtrip_and_stable_key():
    a, b = ev(1), ev(1)
    assert a.key == b.key and len(a.key) == 32
    assert ev(2).key != a.key and ev(1, severity="warn").key != a.key
    assert AlertEvent.from_json(a.to_json()) == a
    bad = json.loads(a.to_json())
    bad["score"] = "high"
    with pytest.raises(ValueError, match="field score: expected float, found str"):
        AlertEvent.from_json(json.dumps(bad).encode())
    del bad["score"]
    with pytest.raises(ValueError, match=r"missing fields \['score'\]"):
        AlertEvent.from_json(json.dumps(bad).encode())


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_spool_order_and_byte_bound_evicts_oldest(tmp_path: Path, kind: str):
    size = len(ev(0).to_json())
    mk = (lambda: DiskSpool(tmp_path / "s", 3 * size + 5)) if kind == "disk" else (
        lambda: MemorySpool(3 * size + 5))
    sp = mk()
    for i in range(3):
        assert sp.append(ev(i)).stored
    res = sp.append(ev(3))  # over the bound: the oldest goes
    assert res.stored and res.dropped == [("spool_full", size)]
    assert sp.events == 3 and sp.bytes == 3 * size
    got, bad = sp.peek(10)
    assert [e.request_id for _, e in got] == ["req-1", "req-2", "req-3"] and not bad
    sp.remove([got[0][0]])
    assert [e.request_id for _, e in sp.peek(10)[0]] == ["req-2", "req-3"]
    too_big = MemorySpool(10).append(ev(9))
    assert not too_big.stored and too_big.dropped == [("spool_full", size)]


def test_disk_spool_survives_restart_and_cleans_up(tmp_path: Path):
    d = tmp_path / "spool"
    sp = DiskSpool(d, 1 << 20)
    for i in range(4):
        sp.append(ev(i))
    sp.remove([sp.peek(1)[0][0][0]])
    (d / "0000000000000099.json.tmp").write_bytes(b"half a rec")  # crash mid-write
    sp2 = DiskSpool(d, 1 << 20)
    assert not (d / "0000000000000099.json.tmp").exists()
    assert sp2.events == 3 and sp2.bytes == sp.bytes
    assert [e.request_id for _, e in sp2.peek(10)[0]] == ["req-1", "req-2", "req-3"]
    sp2.append(ev(4))  # the sequence continues after the survivors
    assert [e.request_id for _, e in sp2.peek(10)[0]][-1] == "req-4"
    # a corrupt record is dropped and reported, the rest still comes out in order
    first = sorted(os.listdir(d))[0]
    (d / first).write_bytes(b"{not json")
    got, bad = sp2.peek(10)
    assert [e.request_id for _, e in got] == ["req-2", "req-3", "req-4"]
    assert bad and bad[0][0] == "corrupt" and sp2.events == 3


# -- webhook -----------------------------------------------------------------------------


def worker(sink, spool, reg=None, cfg=FAST):
    reg = reg or CollectorRegistry()
    w = SinkWorker(sink, spool, SinkMetrics(reg, [sink.name]), cfg)
    return w, reg


def test_webhook_signed_post_and_metrics_from_zero(receiver: Receiver):
    secret = b"s3cret"
    w, reg = worker(WebhookSink(WebhookConfig(receiver.url + "/hook", secret=secret)),
                    MemorySpool(1 << 20))
    for reason in DROP_REASONS:  # every series exists before anything happened
        assert ("safety_monitor_alert_events_dropped_total",
                (("reason", reason), ("sink", "webhook"))) in samples(reg)
    assert val(reg, "safety_monitor_alert_spool_capacity_bytes", sink="webhook") == 1 << 20
    w.start()
    e = ev(1)
    assert w.submit(e)
    got = receiver.wait_for(lambda r: len(r) == 1, what="one webhook post")[0]
    assert got.path == "/hook"
    body = got.json()
    assert body["idempotency_key"] == e.key == got.headers[KEY_HEADER]
    assert body["event"]["request_id"] == "req-1" and body["event"]["score"] == 0.95
    assert body["runbook_url"].startswith("https://example.test/RUNBOOK.md#")
    ts, sig = got.headers[TIMESTAMP_HEADER], got.headers[SIGNATURE_HEADER]
    assert verify_signature(secret, ts, got.body, sig)
    assert not verify_signature(b"other", ts, got.body, sig)
    assert not verify_signature(secret, ts, got.body + b" ", sig)
    assert not verify_signature(secret, str(int(ts) - 3600), got.body, sig)
    assert w.stop()
    assert val(reg, "safety_monitor_alert_events_delivered_total", sink="webhook") == 1
    assert "s3cret" not in repr(w.sink.config)


def test_webhook_down_spools_in_order_then_delivers_once(receiver: Receiver, tmp_path: Path):
    receiver.stop()  # connection refused
    w, reg = worker(WebhookSink(WebhookConfig(receiver.url)), DiskSpool(tmp_path, 1 << 20))
    w.start()
    for i in range(5):
        w.submit(ev(i))
    wait_until(lambda: w.spool.events == 5, what="5 events spooled")
    assert val(reg, "safety_monitor_alert_sink_up", sink="webhook") == 0
    assert val(reg, "safety_monitor_alert_events_spooled_total", sink="webhook") == 5
    receiver.start()
    got = receiver.wait_for(lambda r: len(r) >= 5, what="5 posts after recovery")
    assert [r.json()["event"]["request_id"] for r in got] == [f"req-{i}" for i in range(5)]
    wait_until(lambda: w.spool.events == 0, what="spool empty")
    assert w.stop() and w.lost == 0
    assert val(reg, "safety_monitor_alert_sink_up", sink="webhook") == 1
    assert val(reg, "safety_monitor_alert_spool_bytes", sink="webhook") == 0


def test_restart_delivers_what_the_previous_process_spooled(receiver: Receiver,
                                                             tmp_path: Path):
    receiver.stop()
    url = receiver.url
    w1, _ = worker(WebhookSink(WebhookConfig(url)), DiskSpool(tmp_path, 1 << 20))
    w1.start()
    for i in range(3):
        w1.submit(ev(i))
    assert w1.stop()  # shutdown while the sink is down: events stay on disk
    assert w1.lost == 0 and len(os.listdir(tmp_path)) == 3
    receiver.start()
    w2, _ = worker(WebhookSink(WebhookConfig(url)), DiskSpool(tmp_path, 1 << 20))
    w2.start()
    w2.submit(ev(3))  # new events queue behind the old ones
    got = receiver.wait_for(lambda r: len(r) >= 4, what="4 posts")
    assert [r.json()["event"]["request_id"] for r in got] == [f"req-{i}" for i in range(4)]
    assert w2.stop() and os.listdir(tmp_path) == []


def test_rejected_4xx_is_dropped_and_counted_not_retried(receiver: Receiver):
    receiver.status = 400
    w, reg = worker(WebhookSink(WebhookConfig(receiver.url)), MemorySpool(1 << 20))
    w.start()
    w.submit(ev(1))
    wait_until(lambda: val(reg, "safety_monitor_alert_events_dropped_total", sink="webhook",
                     reason="rejected") == 1, what="rejected counted")
    receiver.status = 200
    w.submit(ev(2))  # the next one is not blocked behind the bad one
    got = receiver.wait_for(lambda r: len(r) == 1, what="next event")
    assert got[0].json()["event"]["request_id"] == "req-2"
    assert w.stop()
    assert val(reg, "safety_monitor_alert_delivery_attempts_total", sink="webhook",
               result="error") == 1


def test_queue_full_and_lost_on_exit_are_counted(receiver: Receiver):
    receiver.stop()
    cfg = DeliveryConfig(queue_events=2, backoff_initial_s=10, tick_s=0.02, stop_timeout_s=0.5)
    w, reg = worker(WebhookSink(WebhookConfig(receiver.url, timeout_s=0.5)),
                    MemorySpool(1 << 20), cfg=cfg)
    # not started: the queue holds 2, the third is refused and counted
    assert w.submit(ev(0)) and w.submit(ev(1)) and not w.submit(ev(2))
    assert val(reg, "safety_monitor_alert_events_dropped_total", sink="webhook",
               reason="queue_full") == 1
    w.start()
    assert w.stop()
    # no spool directory: what could not be delivered is lost at exit, counted, and `lost`
    assert w.lost == 2
    assert val(reg, "safety_monitor_alert_events_dropped_total", sink="webhook",
               reason="lost_on_exit") == 2


def test_unwritable_spool_counts_spool_error(receiver: Receiver, tmp_path: Path):
    """The spool directory turns into a file (works as root, unlike a chmod)."""
    receiver.stop()
    d = tmp_path / "s"
    sp = DiskSpool(d, 1 << 20)
    w, reg = worker(WebhookSink(WebhookConfig(receiver.url)), sp)
    os.rmdir(d)
    d.write_text("not a directory")
    w.start()
    w.submit(ev(1))
    wait_until(lambda: w.lost == 1, what="spool_error counted")
    assert val(reg, "safety_monitor_alert_events_dropped_total", sink="webhook",
               reason="spool_error") == 1
    w.stop()


def test_urls_are_redacted_in_errors_and_logs(receiver: Receiver):
    from monitor.report.sinks.http import DeliveryError, redact_url

    assert redact_url("https://hooks.example/services/T0/B0/tok3n") == "https://hooks.example/…"
    assert redact_url("http://user:pw@am:9093/") == "http://am:9093"
    assert redact_url("http://[::1]:80/x?key=tok3n") == "http://[::1]:80/…"
    receiver.status = 403
    sink = WebhookSink(WebhookConfig(receiver.url + "/services/tok3n?k=tok3n"))
    with pytest.raises(DeliveryError) as exc:
        sink.deliver([ev(1)])
    assert "403" in str(exc.value) and "tok3n" not in str(exc.value)
    assert not exc.value.retryable and "tok3n" not in sink.target
    with pytest.raises(ValueError, match="found scheme 'ftp'") as bad:
        WebhookConfig("ftp://tok3n@x/")
    assert "tok3n" not in str(bad.value)


# -- Alertmanager ------------------------------------------------------------------------


def test_alertmanager_payload_resend_and_resolve(receiver: Receiver):
    cfg = AlertmanagerConfig(receiver.url, resend_s=0.3, resolve_after_s=1.0)
    sink = AlertmanagerSink(cfg)
    w, _ = worker(sink, MemorySpool(1 << 20))
    w.start()
    e = alert_event(Update("req-1"), CTX, now=time.time())  # type: ignore[arg-type]
    w.submit(e)
    got = receiver.wait_for(lambda r: len(r) >= 1, what="first alert")
    assert got[0].path == "/api/v2/alerts"
    (a,) = got[0].json()
    assert a["labels"] == {
        "alertname": "SafetyMonitorVerdict", "detector": "harmful_intent",
        "severity": "critical", "mode": "alert", "model_name": "m", "pod": "pod-0",
        "namespace": "ns", "bundle": "b", "bundle_version": "ab" * 6,
        "policy_version": "v1", "source": "safety-monitor"}
    ann = a["annotations"]
    assert ann["request_id"] == "req-1" and ann["idempotency_key"] == e.key
    assert ann["score"] == "0.9500" and ann["threshold"] == "0.9000" and ann["position"] == "7"
    assert ann["runbook_url"].startswith("https://example.test/RUNBOOK.md#")
    assert "request_id" not in a["labels"]  # identities are annotations, never labels
    # re-sent while active, then sent once more with endsAt in the past (resolved)
    got = receiver.wait_for(lambda r: len(r) >= 3, what="re-sends")
    wait_until(lambda: sink.active == 0, timeout=10, what="resolved")
    last = receiver.snapshot()[-1].json()[0]
    assert last["endsAt"] == a["endsAt"]
    n = len(receiver.snapshot())
    time.sleep(0.8)
    assert len(receiver.snapshot()) == n  # nothing more once resolved
    assert w.stop()


def test_dispatcher_sends_alert_and_block_modes_only(receiver: Receiver, tmp_path: Path):
    reg = CollectorRegistry()
    d = make_dispatcher(AlertSinksConfig(webhook_url=receiver.url,
                                         spool_dir=str(tmp_path)), CTX, reg)
    d.start()
    d.escalation(Update("r-obs", mode="observe"))  # type: ignore[arg-type]
    d.escalation(Update("r-block", mode="block"))  # type: ignore[arg-type]
    d.escalation(Update("r-alert", mode="alert", severity="warn"), "ticket-42")  # type: ignore[arg-type]
    got = receiver.wait_for(lambda r: len(r) >= 2, what="two events")
    assert d.stop() and d.lost == 0
    evs = [r.json()["event"] for r in got]
    assert [(x["request_id"], x["mode"]) for x in evs] == [("r-block", "block"),
                                                           ("r-alert", "alert")]
    assert evs[1]["correlation_id"] == "ticket-42"


# -- the server: audit on stdout, exit status after lost alerts -----------------------------


def test_server_audit_stdout_and_exit_status_3_after_lost_alerts(start_server, tmp_path):
    """A webhook that never answers and no spool directory: the alerts are lost at exit,
    counted, and the process exits with status 3; audit lines also went to stdout."""
    from conftest import free_port

    from monitor.tools.replay import ReplayConfig, run_replay

    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    srv = start_server(extra=["--webhook-url", dead, "--audit-stdout", "--alert-timeout-s",
                              "0.5"], name="lost-alerts")
    res = run_replay(ReplayConfig(target=srv.target, n_requests=2, push_fraction=1.0,
                                  seed=5, prompt_len=8, gen_len=4), out=None)
    assert not res.errors
    audit = [x for x in srv.audit_lines() if x["event"] == "alert"]
    assert audit  # harmful_intent is mode alert in POLICY_V1
    wait_until(lambda: srv.metric("safety_monitor_alert_events_spooled_total", sink="webhook")
         >= len(audit), what="alerts spooled in memory")
    assert srv.stop() == 3
    stdout_json = [json.loads(line) for line in srv.log_path.read_text().splitlines()
                   if line.startswith('{"ts"')]
    assert [x["request_id"] for x in stdout_json if x["event"] == "alert"] == [
        x["request_id"] for x in audit]
    assert "lost at exit" in srv.log_path.read_text()


# -- audit records over OTLP (a real HTTP collector endpoint on loopback) ------------------


def test_audit_records_exported_as_otlp_logs(receiver: Receiver, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("opentelemetry.sdk", reason="the otlp extra is not installed")
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from monitor.report.audit import AuditLog
    from monitor.report.otlp import OtlpAudit, otlp_configured

    env = {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.url + "/v1/logs",
           "OTEL_SERVICE_NAME": "guard"}
    assert otlp_configured(env) and not otlp_configured({})
    for k, v in env.items():  # the exporter reads its endpoint from the environment
        monkeypatch.setenv(k, v)
    audit = AuditLog(tmp_path / "a.jsonl", otlp=OtlpAudit())
    rec = {"ts": "2026-01-01T00:00:00Z", "event": "alert", "request_id": "req-9",
           "detector": "harmful_intent", "severity": "critical", "score": 0.97,
           "position": 12, "threshold": None}
    assert audit.write(rec)
    audit.close()  # flushes the batch
    (post,) = receiver.wait_for(lambda r: len(r) >= 1, what="one OTLP export")
    assert post.path == "/v1/logs"
    req = ExportLogsServiceRequest.FromString(post.body)
    (rl,) = req.resource_logs
    res = {a.key: a.value.string_value for a in rl.resource.attributes}
    assert res["service.name"] == "guard"
    (lr,) = [r for sl in rl.scope_logs for r in sl.log_records]
    attrs = {a.key: a.value for a in lr.attributes}
    assert attrs["vllm.request_id"].string_value == "req-9"
    assert attrs["safety_monitor.detector"].string_value == "harmful_intent"
    assert attrs["safety_monitor.score"].double_value == pytest.approx(0.97)
    assert attrs["safety_monitor.position"].int_value == 12
    assert "safety_monitor.threshold" not in attrs  # None is left out
    assert lr.body.string_value == "alert" and lr.severity_text == "critical"
    assert lr.severity_number == 17  # ERROR
    assert json.loads((tmp_path / "a.jsonl").read_text())["request_id"] == "req-9"
