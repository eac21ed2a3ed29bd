"""End to end on loopback with real processes: the sidecar, a real Prometheus (Debian
`prometheus`) scraping it with deploy/prometheus/rules.yaml, a real Alertmanager (Debian
`prometheus-alertmanager`) and local webhook receivers; harmful traffic from the replay
client, malformed frames over gRPC.

Asserts: the paging rule fires for the first critical on a fresh sidecar; the sidecar's
own alert reaches Alertmanager (read back from its v2 API) and the webhook (signed);
with the webhook down for a while and the sidecar restarted in between, every alert
arrives exactly once after dedupe by idempotency key, in order per run; the sidecar's
alert resolves in Alertmanager and the resolved notification reaches Alertmanager's
webhook receiver. Skips with the reason when the binaries are missing
(scripts/setup_env.sh installs them with apt as root).

Scrape / evaluation interval 1 s, Alertmanager group_wait/interval 1 s, alert resolve 6 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from alert_receiver import Receiver
from conftest import D_MODEL, MODEL, POLICY_V1, REPO, MonitorServer, free_port

from monitor.report.sinks.events import idempotency_key
from monitor.report.sinks.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from monitor.tools.launch import start_process, stop, wait_http
from monitor.tools.replay import ReplayConfig, run_replay
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import encode_frame

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
SECRET = "e2e-webhook-secret"
POD, NS = "guard-0", "llm"

# harmful_intent pages in mode alert, deception in mode block
POLICY = POLICY_V1.replace('"test-v1"', '"e2e-v1"').replace("mode: observe", "mode: block")


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # endpoints not up yet
            last_exc = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: "
                         f"{last_exc})")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop(self.proc, str(self.log.stem), timeout_s=10)


def start(args: list[str], log: Path, ready_url: str) -> Proc:
    """`args` with its output in `log`, once `ready_url` answers 200 (monitor.tools.launch)."""
    return Proc(start_process(args, log, lambda p: wait_http(ready_url, 60, p, args[0]),
                              args[0]), log)


@dataclass
class Stack:
    tmp: Path
    bundle: Path
    hook: Receiver  # the sidecar's webhook target (goes down in the test)
    am_hook: Receiver  # Alertmanager's webhook receiver (stays up)
    am_url: str
    prom_url: str
    targets: Path
    procs: list[Proc]

    def set_target(self, srv: MonitorServer) -> None:
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [f"127.0.0.1:{srv.metrics_port}"],
                                    "labels": {"namespace": NS, "pod": POD}}]))
        tmp.replace(self.targets)

    def sidecar(self, name: str) -> MonitorServer:
        extra = ["--alertmanager-url", self.am_url, "--webhook-url", self.hook.url + "/hook",
                 "--alert-spool-dir", str(self.tmp / "spool"), "--alert-resend-s", "1",
                 "--alert-resolve-s", "6", "--alert-timeout-s", "2",
                 "--runbook-url", "https://runbooks.example/RUNBOOK.md"]
        srv = MonitorServer(self.tmp / name, self.bundle, POLICY, extra)
        self.set_target(srv)
        return srv

    def prom_query(self, q: str) -> list[dict[str, Any]]:
        url = self.prom_url + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
        return get_json(url)["data"]["result"]

    def prom_alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in get_json(self.prom_url + "/api/v1/alerts")["data"]["alerts"]
                if a["labels"]["alertname"] == name]

    def am_alerts(self, name: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"filter": f'alertname="{name}"'})
        return get_json(f"{self.am_url}/api/v2/alerts?{q}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path,
          monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Stack]:
    if PROMETHEUS is None or ALERTMANAGER is None:
        pytest.skip("needs Debian's prometheus and prometheus-alertmanager on PATH "
                    "(scripts/setup_env.sh installs them with apt as root): "
                    f"prometheus={PROMETHEUS}, alertmanager={ALERTMANAGER}")
    tmp = tmp_path_factory.mktemp("alerts-e2e")
    monkeypatch_module.setenv("POD_NAME", POD)
    monkeypatch_module.setenv("POD_NAMESPACE", NS)
    monkeypatch_module.setenv("SAFETY_MONITOR_WEBHOOK_SECRET", SECRET)
    hook, am_hook = Receiver().start(), Receiver().start()
    procs: list[Proc] = []
    try:
        am_port = free_port()
        am_url = f"http://127.0.0.1:{am_port}"
        (tmp / "am.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "hook", "group_by": ["alertname", "detector", "pod"],
                      "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "hook", "webhook_configs": [
                {"url": am_hook.url + "/am", "send_resolved": True}]}],
        }))
        procs.append(start([ALERTMANAGER, f"--config.file={tmp / 'am.yml'}",
                            f"--storage.path={tmp / 'am-data'}",
                            f"--web.listen-address=127.0.0.1:{am_port}",
                            "--cluster.listen-address="], tmp / "am.log", am_url + "/-/ready"))
        rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yaml").read_text())["spec"]
        (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        targets = tmp / "targets.json"
        targets.write_text("[]")
        (tmp / "prom.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [
                {"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "safety-monitor", "file_sd_configs": [
                {"files": [str(targets)], "refresh_interval": "1s"}]}],
        }))
        prom_port = free_port()
        prom_url = f"http://127.0.0.1:{prom_port}"
        procs.append(start([PROMETHEUS, f"--config.file={tmp / 'prom.yml'}",
                            f"--storage.tsdb.path={tmp / 'prom-data'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}"],
                           tmp / "prom.log", prom_url + "/-/ready"))
        yield Stack(tmp, bundle_dir, hook, am_hook, am_url, prom_url, targets, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        hook.stop()
        am_hook.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def replay(srv: MonitorServer, seed: int, n: int = 4) -> None:
    res = run_replay(ReplayConfig(target=srv.target, n_requests=n, push_fraction=1.0,
                                  seed=seed, prompt_len=12, gen_len=8), out=None)
    assert not res.errors, res.errors
    assert len(res.pushed) == n


def malformed(srv: MonitorServer) -> None:
    x = torch.zeros(4, D_MODEL)
    x[1, 3] = float("nan")
    stub = monitor_pb2_grpc.MonitorStub(srv.channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(monitor_pb2.ScoreRequest(frame=encode_frame(x, seq=1, model=MODEL, layer=2,
                                                               spans=[])), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def expected_keys(srv: MonitorServer) -> list[str]:
    """Idempotency keys of the delivered escalations the audit log recorded, in order
    (`alert` in alert mode; a block-mode critical is audited as `block` and delivered too)."""
    return [idempotency_key(x["bundle_sha256"], x["policy_version"], x["request_id"],
                            x["detector"], x["severity"])
            for x in srv.audit_lines() if x["event"] in ("alert", "block")]


def settled_keys(srv: MonitorServer) -> list[str]:
    """`expected_keys` once the sidecar has judged everything sent so far: no live request,
    an empty scoring queue, and the same keys on two reads 0.5 s apart. (The replay client
    returns when its stream is closed; the server finishes those requests, and writes any
    alert that `judge_at: span_end` raises at the finish, a moment later.)"""
    def stable() -> list[list[str]] | None:
        if (srv.metric("safety_monitor_active_requests")
                or srv.metric("safety_monitor_queue_depth_rows")):
            return None
        a = expected_keys(srv)
        time.sleep(0.5)
        return [a] if a == expected_keys(srv) else None

    return wait_for(stable, 30, "the sidecar judged all traffic")[0]


def dashboard_empty_panels(stack: Stack) -> list[tuple[str, str]]:
    """Dashboard queries (variables filled in for this pod) that return nothing."""
    dash = json.loads((REPO / "deploy/grafana/safety-monitor.json").read_text())
    out = []
    for p in dash["panels"]:
        for panel in [p, *(p.get("panels") or [])]:
            for t in panel.get("targets") or []:
                # a wide rate window: scrapes of a loaded CI machine are slower than 1 s
                e = (t["expr"].replace("$__rate_interval", "1m").replace("$__range", "2m")
                     .replace("$namespace", NS).replace("$pod", POD)
                     .replace("$detector", ".*").replace("$model_name", ".*"))
                if not stack.prom_query(e):
                    out.append((panel["title"], t["refId"]))
    return out


def check_dashboard_has_data(stack: Stack, when: str) -> None:
    try:
        wait_for(lambda: not dashboard_empty_panels(stack), 30, "data behind every panel")
    except AssertionError:
        raise AssertionError(f"dashboard queries without data on a healthy pod ({when}): "
                             f"{dashboard_empty_panels(stack)}") from None


def test_alerts_end_to_end(stack: Stack) -> None:
    t0 = time.monotonic()
    srv1 = stack.sidecar("sidecar-1")
    crit = ('safety_monitor_alerts_total{detector="harmful_intent",severity="critical",'
            f'mode="alert",pod="{POD}"}}')
    # a fresh sidecar: the critical counter is scraped at 0 before anything happened
    wait_for(lambda: [r for r in stack.prom_query(crit) if r["value"][1] == "0"], 30,
             "the critical counter scraped at 0")
    assert not stack.prom_alerts("SafetyMonitorCriticalVerdict")
    # no "No data" panel on a fresh, idle, healthy pod (every series exists at 0)
    check_dashboard_has_data(stack, "idle")

    # -- harmful + malformed traffic; the webhook and Alertmanager are up ---------------
    replay(srv1, seed=1)
    malformed(srv1)
    keys1 = settled_keys(srv1)
    assert keys1, srv1.log()
    # the Prometheus rule fires for the first criticals of a fresh sidecar
    fired = wait_for(lambda: [a for a in stack.prom_alerts("SafetyMonitorCriticalVerdict")
                              if a["state"] == "firing"], 30, "rule firing")
    assert {(a["labels"]["pod"], a["labels"]["namespace"]) for a in fired} == {(POD, NS)}
    assert {a["labels"]["detector"] for a in fired} == {"harmful_intent", "deception"}
    assert all(a["annotations"]["runbook_url"].endswith("#safetymonitorcriticalverdict")
               for a in fired)
    # ... and reaches Alertmanager from Prometheus
    wait_for(lambda: stack.am_alerts("SafetyMonitorCriticalVerdict"), 30, "rule alert in AM")
    # malformed frames are visible to Prometheus
    wait_for(lambda: [r for r in stack.prom_query(
        'safety_monitor_frames_rejected_total{reason="non_finite"}') if
        float(r["value"][1]) >= 1], 30, "frames_rejected scraped")

    # the sidecar's own alert, read back from Alertmanager's API
    own = wait_for(lambda: [a for a in stack.am_alerts("SafetyMonitorVerdict")
                            if a["labels"].get("severity") == "critical"], 30,
                   "sidecar alert in Alertmanager")
    labels = {(a["labels"]["detector"], a["labels"]["mode"]) for a in own}
    assert labels == {("harmful_intent", "alert"), ("deception", "block")}
    for a in own:
        assert a["labels"]["pod"] == POD and a["labels"]["namespace"] == NS
        assert a["labels"]["policy_version"] == "e2e-v1" and a["labels"]["bundle_version"]
        assert a["annotations"]["request_id"].startswith("replay-1-")
        assert a["annotations"]["runbook_url"].startswith("https://runbooks.example/")
        assert a["status"]["state"] == "active"
    # ... and the webhook, signed
    got = stack.hook.wait_for(lambda r: len(r) >= len(keys1), 30, "webhook events, run 1")
    for r in got:
        assert verify_signature(SECRET.encode(), r.headers[TIMESTAMP_HEADER], r.body,
                                r.headers[SIGNATURE_HEADER])
    assert [r.json()["idempotency_key"] for r in got] == keys1

    check_dashboard_has_data(stack, "after traffic")

    # -- webhook down; traffic; sidecar restarted; traffic; webhook back --------------
    stack.hook.stop()
    replay(srv1, seed=2)
    keys2 = settled_keys(srv1)[len(keys1):]
    assert keys2
    wait_for(lambda: srv1.metric("safety_monitor_alert_spool_events", sink="webhook")
             >= len(keys2), 30, "events spooled while the webhook is down")
    assert srv1.metric("safety_monitor_alert_sink_up", sink="webhook") == 0
    assert srv1.stop() == 0  # spooled on disk: nothing lost, clean exit
    srv2 = stack.sidecar("sidecar-2")
    replay(srv2, seed=3)
    keys3 = settled_keys(srv2)
    assert keys3
    time.sleep(2)  # "a while" down, across the restart
    stack.hook.start()
    want = keys1 + keys2 + keys3
    got = stack.hook.wait_for(
        lambda r: {json.loads(x.body)["idempotency_key"] for x in r} >= set(want), 60,
        "every webhook event after recovery")
    got_keys = [json.loads(r.body)["idempotency_key"] for r in got]
    assert set(got_keys) == set(want)  # exactly once after dedupe: nothing lost, nothing extra
    first = list(dict.fromkeys(got_keys))
    assert first == want  # in order: run 1, the spooled run 2, then run 3
    wait_for(lambda: srv2.metric("safety_monitor_alert_spool_events", sink="webhook") == 0,
             30, "spool drained")
    assert srv2.metric("safety_monitor_alert_events_dropped_total") == 0

    # -- resolution: the sidecar's alert resolves, Alertmanager notifies resolved ---------
    def resolved() -> bool:
        for r in stack.am_hook.snapshot():
            body = json.loads(r.body)
            if body["status"] == "resolved" and any(
                    a["labels"]["alertname"] == "SafetyMonitorVerdict"
                    for a in body["alerts"]):
                return True
        return False

    wait_for(lambda: not [a for a in stack.am_alerts("SafetyMonitorVerdict")
                          if a["status"]["state"] == "active"], 40,
             "the sidecar's alerts resolved in Alertmanager")
    wait_for(resolved, 20, "resolved notification from Alertmanager")
    assert srv2.stop() == 0
    elapsed = time.monotonic() - t0
    print(f"alerts e2e: {elapsed:.1f} s; webhook posts {len(got_keys)} for {len(want)} "
          f"events ({len(got_keys) - len(set(got_keys))} duplicates)")
