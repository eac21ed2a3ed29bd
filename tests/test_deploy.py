"""Deployment artefacts: Dockerfile (static), the Helm chart rendered by a real Helm engine
(helm-python-sdk, Helm v4 in-process), the Grafana dashboard and the Prometheus rules
(`promtool` when it is on PATH)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.judge.policy import parse_policy
from monitor.report.metrics import Metrics
from monitor.report.sinks import SinkMetrics

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "safety-monitor"
DASHBOARD = ROOT / "deploy" / "grafana" / "safety-monitor.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SUGGESTED_POLICY = ROOT / "bundles" / "default" / "policy.suggested.yaml"

# The metrics the dashboard may query (exposition names).
DASHBOARD_METRICS = frozenset({
    "safety_monitor_alerts_total", "safety_monitor_frames_rejected_total",
    "safety_monitor_rows_scored_total", "safety_monitor_client_dropped_frames_total",
    "safety_monitor_rows_unscored_total", "safety_monitor_policy_reloads_total",
    "safety_monitor_queue_depth_rows", "safety_monitor_queue_capacity_rows",
    "safety_monitor_bundle_info", "safety_monitor_alert_sink_up",
    "safety_monitor_alert_events_delivered_total", "safety_monitor_alert_events_spooled_total",
    "safety_monitor_alert_events_dropped_total", "safety_monitor_alert_spool_events",
    "safety_monitor_alert_queue_events", "safety_monitor_alert_spool_bytes",
    *(f"safety_monitor_{h}{s}" for h in ("scoring_latency_seconds", "request_score",
                                          "frame_latency_seconds")
      for s in ("_bucket", "_sum", "_count")),
})


def exposed_metric_names() -> set[str]:
    """Every series name the server's registry can expose."""
    names: set[str] = set()
    m = Metrics(thresholds=(0.5,))
    SinkMetrics(m.registry, ["webhook"])  # registered when an alert sink is configured
    for fam in m.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "info": ("_info",)}.get(fam.type, ("",))
        names.update(fam.name + s for s in suffixes)
    return names


# -- PromQL: metric names of an expression -------------------------------------------------

_PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right",
                           "and", "or", "unless", "bool", "offset", "inf", "nan"})


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords, labels, Grafana variables
    and durations removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    out = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # 1e3, 5m
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_WORDS:
            continue
        out.add(m.group(0))
    return out


def test_promql_metrics_helper():
    e = ('histogram_quantile(0.99, sum by (le, pod) (rate(x_bucket{a="b{c}", d=~"$pod"}'
         '[$__rate_interval]))) / on(pod) group_left y > bool 1e3')
    assert promql_metrics(e) == {"x_bucket", "y"}


# -- Dockerfile ----------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _stage(ins: list[tuple[str, str]], name: str | None = None) -> list[tuple[str, str]]:
    """The instructions of stage ``name`` (None: the last, docker's default target),
    preceded by those of the stages it is built FROM (``FROM runtime-base AS runtime``)."""
    starts = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    stages = {}
    for a, b in zip(starts, [*starts[1:], len(ins)], strict=True):
        words = ins[a][1].split()
        stages[words[-1] if len(words) == 3 and words[1].upper() == "AS" else str(a)] = \
            ins[a:b]
    body = stages[name] if name is not None else ins[starts[-1]:]
    base = body[0][1].split()[0]
    return (_stage(ins, base) if base in stages else []) + body


def _final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _stage(ins)


def _serve_flags() -> set[str]:
    flags = set()
    for argv in (["--help"], ["serve", "--help"]):
        out = subprocess.run([sys.executable, "-m", "monitor.cli", *argv], capture_output=True,
                             text=True, cwd=ROOT, check=True, timeout=60).stdout
        flags.update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))
    return flags


@pytest.fixture(scope="module")
def serve_flags() -> set[str]:
    return _serve_flags()


def test_dockerfile_base_images_pinned():
    ins = _instructions(DOCKERFILE)
    args = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    froms = [rest.split()[0] for op, rest in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    stages = {rest.split()[-1] for op, rest in ins if op == "FROM" and " AS " in rest.upper()}
    for image in froms:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in stages:
            continue
        assert ":" in image and not image.endswith(":latest"), image
    assert "python:3.11-slim" in args.get("PYTHON_IMAGE", "")
    assert "latest" not in DOCKERFILE.read_text().replace("# ", "")


def test_dockerfile_runtime_stage(serve_flags):
    ins = _final_stage(_instructions(DOCKERFILE))
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    exposed = {p for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert {"50051", "9464"} <= exposed
    copies = [rest for op, rest in ins if op == "COPY" and "--from" not in rest]
    assert any(c.split()[0].rstrip("/") == "bundles/default" for c in copies)
    assert any(c.split()[0].rstrip("/") == "policies" for c in copies)
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    assert entry[:2] == ["safety-monitor", "serve"]
    flags = {a.split("=")[0] for a in entry if a.startswith("--")}
    assert {"--bundle", "--policy", "--audit-log"} <= flags
    assert flags <= serve_flags, flags - serve_flags
    opts = dict(zip(entry[2::2], entry[3::2], strict=False))
    assert opts["--audit-log"].startswith("/var/lib/safety-monitor/")
    dests = [c.split()[-1].rstrip("/") for c in copies]
    assert opts["--bundle"].rstrip("/") in dests
    assert any(opts["--policy"].startswith(d + "/") for d in dests)
    text = DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/cpu" in text and "[probes" not in text
    assert "/var/lib/safety-monitor" in text


def test_dockerfile_slim_stage_has_no_torch():
    """sidecar-slim: the runtime stage's user, ports and defaults, the torch-free venv."""
    ins = _instructions(DOCKERFILE)
    slim = _stage(ins, "sidecar-slim")
    assert ("COPY", "--from=build-slim /opt/venv /opt/venv") in slim
    assert not any("--from=build " in rest for _, rest in slim)
    assert [rest for op, rest in slim if op == "USER"][-1].split(":")[0] == "10001"
    entry = json.loads(next(rest for op, rest in reversed(slim) if op == "ENTRYPOINT"))
    # auto takes the one backend installed: onnxruntime here, torch in `runtime`
    assert entry[entry.index("--backend") + 1] == "auto"
    build = " ".join(rest for op, rest in _stage(ins, "build-slim") if op == "RUN")
    assert "torch" not in build.replace("'torch' not in sys.modules", "").replace(
        '! python -c "import torch"', "")
    assert "[onnx]" in build and "'torch' not in sys.modules" in build
    runtime = _final_stage(ins)
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in deps, "torch in the base dependencies would enter the slim image"


def test_dockerignore_keeps_build_inputs():
    pats = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
            if p.strip() and not p.startswith("#")]
    for needed in (".venv", ".git", "runs", ".pytest_cache", ".ruff_cache"):
        assert needed in pats, needed
    ins = _instructions(DOCKERFILE)
    sources = [s for op, rest in ins if op == "COPY" and "--from" not in rest
               for s in rest.split()[:-1]]
    for src in sources:
        top = src.rstrip("/").split("/")[0]
        assert top not in pats and src.rstrip("/") not in pats, f"{src} is dockerignored"


# -- Grafana dashboard and Prometheus rules (static) ----------------------------------------

def dashboard_queries(dash: dict) -> list[str]:
    exprs: list[str] = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets") or [] if t.get("expr"))
            walk(p.get("panels") or [])

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def check_dashboard(dash: dict) -> None:
    exprs = dashboard_queries(dash)
    assert len(exprs) >= 10
    exposed = exposed_metric_names()
    for e in exprs:
        names = promql_metrics(e)
        assert names, e
        for n in names:
            assert n.startswith("safety_monitor_"), (n, e)
            assert n in DASHBOARD_METRICS, (n, e)
            assert n in exposed, (n, e)


def test_dashboard_file():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    check_dashboard(dash)


def _panels(dash: dict) -> list[dict]:
    out: list[dict] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])
    return out


def test_dashboard_variables_and_panels():
    dash = json.loads(DASHBOARD.read_text())
    var = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "model_name", "pod", "detector"} <= set(var)
    # pods of the chosen model(s); "All" expands to those pods, not to ".*"
    assert "$model_name" in var["pod"]["definition"] and "allValue" not in var["pod"]
    panels = _panels(dash)
    for p in panels:
        for t in p.get("targets") or []:
            e = t["expr"]
            assert 'pod=~"$pod"' in e, (p["title"], e)
            if {"safety_monitor_alerts_total", "safety_monitor_request_score_bucket",
                    "safety_monitor_request_score_count"} & promql_metrics(e):
                assert 'detector=~"$detector"' in e, (p["title"], e)  # $detector everywhere
            if p["type"] == "stat" and "sink_up" not in e:  # a number, never "No data"
                assert re.search(r"or vector\([01]\)$", e), (p["title"], e)
    titles = {p["title"] for p in panels}
    assert {"Frame to verdict latency", "Alert sinks up", "Alert events / s by sink",
            "Alert spool backlog"} <= titles


def _rules_doc() -> dict:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    return doc


RUNBOOK = ("https://github.com/vllm-safety-monitor/vllm-safety-monitor/blob/main/docs/"
           "RUNBOOK.md#")
#: Metrics of other exporters the rules may use: scrape health and kube-state-metrics.
RULES_EXTERNAL_METRICS = frozenset({"up", "kube_pod_info"})


def test_rules_reference_only_monitor_metrics():
    exposed = exposed_metric_names()
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    rules = [r for g in _rules_doc()["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    names = set()
    for r in rules:
        assert r["alert"].startswith("SafetyMonitor")
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"]
        assert r["annotations"]["runbook_url"] == RUNBOOK + r["alert"].lower()
        assert f"## {r['alert']}" in runbook, f"docs/RUNBOOK.md has no section {r['alert']}"
        used = promql_metrics(r["expr"])
        assert used, r["alert"]
        for n in used - RULES_EXTERNAL_METRICS:
            assert n.startswith("safety_monitor_") and n in exposed, (r["alert"], n)
        names.add(r["alert"])
        if "safety_monitor_alerts_total" in used:  # paging covers block mode too
            assert 'mode=~"alert|block"' in r["expr"], r["alert"]
    assert len(names) == len(rules), "duplicate alert names"


_CRIT_ALERT = """\
          - exp_labels: {severity: critical, category: safety, namespace: llm, pod: POD_NAME,
                         detector: harmful_intent}
            exp_annotations:
              summary: 'harmful_intent: critical verdicts on llm/POD_NAME'
              description: >-
                N requests reached severity critical for detector harmful_intent in
                the last 5 minutes. Request ids, scores and thresholds are in the
                monitor's audit log (JSONL) of that pod.
              runbook_url: RUNBOOKsafetymonitorcriticalverdict"""

_PROMTOOL_TEST = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # pre-created at 0 on a fresh sidecar, the first critical at 3m
      - series: 'safety_monitor_alerts_total{POD,detector="harmful_intent",CRIT,mode="alert"}'
        values: '0 0 0 1 1 1 1 1 1 1 1 1 1 1 1'
      # a counter that first appears at 1 (an old sidecar without pre-created series): the
      # case a plain increase() misses; block mode pages like alert mode
      - series: 'safety_monitor_alerts_total{POD2,detector="harmful_intent",CRIT,mode="block"}'
        values: '_ _ 2 2 2 2 2 2 2 2 2 2 2 2 2'
      - series: 'safety_monitor_alerts_total{POD,detector="deception",CRIT,mode="observe"}'
        values: '0 5 10 15 20 25 30 35 40 45 50 55 60 65 70'
      - series: 'safety_monitor_queue_capacity_rows{POD}'
        values: '100x14'
      - series: 'safety_monitor_queue_depth_rows{POD}'
        values: '0 0 0 90 90 90 90 90 90 90 90 0 0 0 0'
      # pod p2's sidecar: scraped, then its scrape fails from 4m on
      - series: 'safety_monitor_queue_capacity_rows{POD2}'
        values: '100x3 _x11'
      - series: 'up{job="llm/guard-safety-monitor",POD2}'
        values: '1 1 1 1 0 0 0 0 0 0 0 0 0 0 0'
      - series: 'up{job="llm/guard-safety-monitor",POD}'
        values: '1x14'
      # two pods on different bundles / policies
      - series: 'safety_monitor_bundle_info{POD,model_name="m",sha256="aaa",bundle="b"}'
        values: '1x40'
      - series: 'safety_monitor_bundle_info{POD2,model_name="m",sha256="bbb",bundle="b"}'
        values: '1x40'
      - series: 'safety_monitor_policy_info{POD,version="v1",sha256="p1"}'
        values: '1x40'
      - series: 'safety_monitor_policy_info{POD2,version="v1",sha256="p1"}'
        values: '1x40'
      # alert delivery: the webhook sink fails from 2m on
      - series: 'safety_monitor_alert_sink_up{POD,sink="webhook"}'
        values: '1 1 0x20'
      - series: 'safety_monitor_alert_events_dropped_total{POD,sink="webhook",reason="spool_full"}'
        values: '0 0 0 0 3 3 3 3 3 3 3 3 3 3 3'
      - series: 'safety_monitor_alert_spool_bytes{POD,sink="webhook"}'
        values: '0 0 100 300 600 700 800 900 1000 1000 1000 1000 1000 1000 1000'
      - series: 'safety_monitor_alert_spool_capacity_bytes{POD,sink="webhook"}'
        values: '1000x14'
    alert_rule_test:
      - eval_time: 2m
        alertname: SafetyMonitorCriticalVerdict
        exp_alerts:
CRIT_P2
      - eval_time: 4m
        alertname: SafetyMonitorCriticalVerdict
        exp_alerts:
CRIT_P1
CRIT_P2
      - eval_time: 14m
        alertname: SafetyMonitorCriticalVerdict
        exp_alerts: []
      - eval_time: 5m
        alertname: SafetyMonitorQueueSaturated
        exp_alerts: []
      - eval_time: 9m
        alertname: SafetyMonitorQueueSaturated
        exp_alerts:
          - exp_labels: {severity: warning, category: capacity, namespace: llm, pod: p}
            exp_annotations:
              summary: 'Safety monitor scoring queue above 80% on llm/p'
              description: >-
                The scoring queue is 90% full; when full, rows are dropped (unscored,
                reason queue_full).
              runbook_url: RUNBOOKsafetymonitorqueuesaturated
      - eval_time: 9m
        alertname: SafetyMonitorAbsent
        exp_alerts: []
      - eval_time: 5m
        alertname: SafetyMonitorSidecarDown
        exp_alerts: []
      - eval_time: 7m
        alertname: SafetyMonitorSidecarDown
        exp_alerts:
          - exp_labels: {severity: critical, category: availability, namespace: llm, pod: p2}
            exp_annotations:
              summary: 'Safety monitor sidecar down or not scraped on llm/p2'
              description: >-
                The sidecar's /metrics scrape fails, or the pod still exists but its
                safety_monitor_* series stopped: that pod's traffic is not being monitored
                (or its monitoring is not visible).
              runbook_url: RUNBOOKsafetymonitorsidecardown
      - eval_time: 10m
        alertname: SafetyMonitorPolicyVersionMismatch
        exp_alerts: []
      - eval_time: 20m
        alertname: SafetyMonitorBundleVersionMismatch
        exp_alerts:
          - exp_labels: {severity: warning, category: config, model_name: m}
            exp_annotations:
              summary: 'Pods serving m run 2 different detector bundles'
              description: >-
                Sidecars of the same model report different bundle sha256 for 15 minutes (a
                stuck rollout?). Compare `safety_monitor_bundle_info` by pod.
              runbook_url: RUNBOOKsafetymonitorbundleversionmismatch
      - eval_time: 6m
        alertname: SafetyMonitorAlertDeliveryFailing
        exp_alerts: []
      - eval_time: 13m
        alertname: SafetyMonitorAlertDeliveryFailing
        exp_alerts:
          - exp_labels: {severity: warning, category: delivery, namespace: llm, pod: p,
                         sink: webhook}
            exp_annotations:
              summary: 'Safety monitor cannot deliver alerts to webhook from llm/p'
              description: >-
                Every delivery to sink webhook failed for 10 minutes. Alerts are
                spooled (safety_monitor_alert_spool_events) and delivered in order when the
                sink answers again; the spool is bounded, so fix the sink before it fills.
              runbook_url: RUNBOOKsafetymonitoralertdeliveryfailing
      - eval_time: 8m
        alertname: SafetyMonitorAlertSpoolFilling
        exp_alerts: []
      - eval_time: 9m
        alertname: SafetyMonitorAlertSpoolFilling
        exp_alerts:
          - exp_labels: {severity: warning, category: delivery, namespace: llm, pod: p,
                         sink: webhook}
            exp_annotations:
              summary: 'Alert spool of webhook over half full on llm/p'
              description: >-
                The spool of undelivered alerts is 100% full;
                when full, the oldest alerts are evicted (SafetyMonitorAlertsDropped).
              runbook_url: RUNBOOKsafetymonitoralertspoolfilling
      - eval_time: 5m
        alertname: SafetyMonitorAlertsDropped
        exp_alerts:
          - exp_labels: {severity: critical, category: delivery, namespace: llm, pod: p,
                         sink: webhook, reason: spool_full}
            exp_annotations:
              summary: 'Safety monitor dropped alert events (spool_full) on llm/p'
              description: >-
                3 alert events for sink webhook will never be
                delivered (reason spool_full). The audit log still has them.
              runbook_url: RUNBOOKsafetymonitoralertsdropped
""".replace("CRIT_P2", _CRIT_ALERT.replace("POD_NAME", "p2").replace("N ", "2 ")).replace(
    "CRIT_P1", _CRIT_ALERT.replace("POD_NAME", "p").replace("N ", "1 ")).replace(
    "POD2", 'namespace="llm",pod="p2"').replace("POD", 'namespace="llm",pod="p"').replace(
    "CRIT", 'severity="critical"').replace("RUNBOOK", RUNBOOK)


@pytest.fixture
def promtool(tmp_path):
    exe = shutil.which("promtool")
    if not exe:
        pytest.skip("promtool not on PATH")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(_rules_doc()["spec"], sort_keys=False))
    return exe


def test_promtool_check_rules(promtool, tmp_path):
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests(promtool, tmp_path):
    (tmp_path / "tests.yml").write_text(_PROMTOOL_TEST)
    r = subprocess.run([promtool, "test", "rules", "tests.yml"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# -- Helm chart (rendered by a real Helm engine) ---------------------------------------------

@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip("helm_python", reason="helm-python-sdk not installed")


@pytest.fixture(scope="module")
def chart(helm):
    helm.disable_logging()
    return helm.Chart.load(str(CHART))


def render(chart, values: dict | None = None) -> list[dict]:
    out = chart.render(values or {}, name="guard", namespace="llm")
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = kinds(docs, kind)
    assert len(found) == 1, (kind, len(found))
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(spec: dict, name: str, native: bool) -> dict:
    where = spec.get("initContainers" if native else "containers") or []
    found = [c for c in where if c["name"] == name]
    assert len(found) == 1, (name, native)
    return found[0]


def test_chart_lint(helm):
    rep = helm.lint(str(CHART), strict=True)
    assert not rep["errors"], rep
    assert not [m for m in rep["messages"] if m["severity"] >= 2], rep["messages"]


def check_monitor_container(c: dict, serve_flags: set[str], port: int = 50051,
                            health_port: int = 50052) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # no token there
        assert c[probe]["grpc"]["port"] == health_port, probe
    assert f"--health-port={health_port}" in c["command"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc-health"] == health_port
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["command"][0] == "safety-monitor" and "serve" in c["command"]
    flags = {a.split("=")[0] for a in c["command"] if a.startswith("--")}
    assert flags <= serve_flags, flags - serve_flags
    assert f"--port={port}" in c["command"] and "--host=0.0.0.0" in c["command"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port
    assert c["resources"]["requests"] and c["resources"]["limits"]


def _writable_mounts_ok(spec: dict, c: dict) -> None:
    vols = {v["name"]: v for v in spec["volumes"]}
    audit = next(a for a in c["command"] if a.startswith("--audit-log="))
    audit_dir = str(Path(audit.split("=", 1)[1]).parent)
    m = next(m for m in c["volumeMounts"] if m["mountPath"] == audit_dir)
    assert "emptyDir" in vols[m["name"]]
    pol = next(m for m in c["volumeMounts"] if m["name"] == "policy")
    assert "subPath" not in pol, "subPath mounts never receive ConfigMap updates"
    assert "configMap" in vols["policy"]
    policy_arg = next(a for a in c["command"] if a.startswith("--policy="))
    assert policy_arg.split("=", 1)[1].startswith(pol["mountPath"] + "/")


def test_default_render_native_sidecar(chart, serve_flags):
    docs = render(chart)
    spec = pod_spec(docs)
    mon = container(spec, "safety-monitor", native=True)
    assert mon["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["vllm"]
    check_monitor_container(mon, serve_flags)
    _writable_mounts_ok(spec, mon)
    vllm = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["SAFETY_MONITOR_ADDR"] == "127.0.0.1:50051"
    assert vllm["command"][:2] == ["vllm", "serve"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    # default: no prometheus-operator CRDs needed; dashboard ConfigMap on
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule"):
        assert not kinds(docs, kind)
    assert one(docs, "Service")["spec"]["ports"]


def test_plain_sidecar(chart, serve_flags):
    spec = pod_spec(render(chart, {"sidecar": {"native": False}}))
    assert not spec.get("initContainers")
    mon = container(spec, "safety-monitor", native=False)
    assert "restartPolicy" not in mon
    check_monitor_container(mon, serve_flags)
    _writable_mounts_ok(spec, mon)
    vllm = container(spec, "vllm", native=False)
    assert {"name": "SAFETY_MONITOR_ADDR", "value": "127.0.0.1:50051"} in vllm["env"]


def test_slim_image_and_backend(chart, serve_flags):
    default = container(pod_spec(render(chart)), "safety-monitor", True)
    assert "--backend=auto" in default["command"]
    spec = pod_spec(render(chart, {"sidecar": {"backend": "onnxruntime",
                                               "image": {"tag": "0.1.0-slim"}}}))
    mon = container(spec, "safety-monitor", True)
    assert mon["image"] == "safety-monitor:0.1.0-slim"
    assert "--backend=onnxruntime" in mon["command"]
    check_monitor_container(mon, serve_flags)


def test_scorer_thread_budget(chart, helm):
    default = container(pod_spec(render(chart)), "safety-monitor", True)["command"]
    assert "--torch-threads=1" in default and "--onnx-threads=1" in default
    mon = container(pod_spec(render(chart, {"sidecar": {"scorerThreads": 3}})),
                    "safety-monitor", True)["command"]
    assert "--torch-threads=3" in mon and "--onnx-threads=3" in mon
    with pytest.raises(helm.HelmValuesError, match="scorerThreads"):
        render(chart, {"sidecar": {"scorerThreads": -1}})


def test_shm_ring_toggle(chart, serve_flags, helm):
    """shm.enabled: the plugin offers its ring (mode 640 for the pod's fsGroup), the sidecar
    accepts it and reads the same memory-backed /dev/shm (read-only); off by default."""
    spec = pod_spec(render(chart))
    mon = container(spec, "safety-monitor", True)
    assert "--shm" not in mon["command"]
    assert "/dev/shm" not in [m["mountPath"] for m in mon["volumeMounts"]]
    assert "SAFETY_MONITOR_SHM" not in {e["name"] for e in container(spec, "vllm", False)["env"]}
    spec = pod_spec(render(chart, {"shm": {"enabled": True, "slots": 8}}))
    mon = container(spec, "safety-monitor", True)
    check_monitor_container(mon, serve_flags)
    assert "--shm" in mon["command"] and "--shm-dir=/dev/shm" in mon["command"]
    assert {"name": "dshm", "mountPath": "/dev/shm", "readOnly": True} in mon["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container(spec, "vllm", False)["env"]}
    assert (env["SAFETY_MONITOR_SHM"], env["SAFETY_MONITOR_SHM_MODE"],
            env["SAFETY_MONITOR_SHM_SLOTS"], env["SAFETY_MONITOR_SHM_SLOT_MB"]) == (
        "1", "640", "8", "4")
    dshm = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert dshm[0]["emptyDir"]["medium"] == "Memory"
    assert spec["securityContext"]["fsGroup"] == 10001  # the ring file's group
    with pytest.raises(helm.HelmValuesError, match="shm"):
        render(chart, {"shm": {"enable": True}})


def test_grpc_port_is_one_setting(chart, serve_flags):
    docs = render(chart, {"sidecar": {"grpcPort": 6000}})
    spec = pod_spec(docs)
    check_monitor_container(container(spec, "safety-monitor", True), serve_flags, port=6000)
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert env["SAFETY_MONITOR_ADDR"] == "127.0.0.1:6000"


def test_networkpolicy_keeps_grpc_port_closed(chart):
    np_ = one(render(chart), "NetworkPolicy")
    ports = {p["port"] for rule in np_["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8000, 9464}


def test_policy_configmap(chart):
    cm = next(d for d in kinds(render(chart), "ConfigMap") if d["metadata"]["name"].endswith(
        "-policy"))
    text = cm["data"]["policy.yaml"]
    pol = parse_policy(text, "configmap")
    assert pol.detectors
    # the bundle's calibrated policy, not the placeholder
    assert text.strip() == SUGGESTED_POLICY.read_text().strip()
    custom = "version: custom-1\ndetectors:\n  x:\n    thresholds: {warn: 0.5, critical: 0.8}\n"
    cm = next(d for d in kinds(render(chart, {"policy": {"content": custom}}), "ConfigMap")
              if d["metadata"]["name"].endswith("-policy"))
    parse_policy(cm["data"]["policy.yaml"], "configmap")
    assert "custom-1" in cm["data"]["policy.yaml"]
    docs = render(chart, {"policy": {"existingConfigMap": "mine"}})
    assert not [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].endswith("-policy")]
    vols = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert vols["policy"]["configMap"]["name"] == "mine"


def test_monitors_toggle_and_labels(chart):
    vals = {"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "kps"}},
                        "serviceMonitor": {"enabled": True, "labels": {"release": "kps2"}}},
            "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}
    docs = render(chart, vals)
    pm, sm, pr = one(docs, "PodMonitor"), one(docs, "ServiceMonitor"), one(docs, "PrometheusRule")
    assert pm["metadata"]["labels"]["release"] == "kps"
    assert sm["metadata"]["labels"]["release"] == "kps2"
    assert pr["metadata"]["labels"]["release"] == "kps"
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = pod_spec(docs)
    ports = {p["name"] for c in spec["containers"] + spec.get("initContainers", [])
             for p in c.get("ports", [])}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    docs = render(chart, {"metrics": {"podMonitor": {"enabled": False}}})
    assert not kinds(docs, "PodMonitor")


def test_prometheus_rule_from_rules_file(chart):
    src = _rules_doc()["spec"]["groups"]
    docs = render(chart, {"prometheusRule": {"enabled": True}})
    assert one(docs, "PrometheusRule")["spec"]["groups"] == src
    docs = render(chart, {"prometheusRule": {
        "enabled": True, "additionalRuleLabels": {"team": "safety"},
        "disabledAlerts": ["SafetyMonitorAbsent"]}})
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert "SafetyMonitorAbsent" not in {r["alert"] for r in rules}
    assert len(rules) == sum(len(g["rules"]) for g in src) - 1
    assert all(r["labels"]["team"] == "safety" and r["labels"]["severity"] for r in rules)


def test_dashboard_configmap(chart):
    docs = render(chart)
    cm = next(d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["safety-monitor.json"])
    assert dash == json.loads(DASHBOARD.read_text())
    check_dashboard(dash)
    docs = render(chart, {"dashboard": {"enabled": False}})
    assert not [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].endswith(
        "-dashboard")]


def test_vllm_chart_mode(chart):
    sel = {"environment": "test", "release": "test"}
    docs = render(chart, {"vllm": {"enabled": False}, "podSelector": sel,
                          "metrics": {"podMonitor": {"enabled": True}}})
    assert not kinds(docs, "Deployment") and not kinds(docs, "NetworkPolicy")
    assert one(docs, "Service")["spec"]["selector"] == sel
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == sel
    # vLLM's chart names its container port "container-port": scrape that, not "http"
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["monitor-metrics",
                                                                      "container-port"]
    docs = render(chart, {"metrics": {"podMonitor": {"enabled": True}}})
    assert [e["port"] for e in one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]] == [
        "monitor-metrics", "http"]


def test_values_schema_rejects_typos_and_wrong_types(chart, helm):
    chart.validate_schema({})  # the defaults
    for bad, where in (({"sidecar": {"nativ": True}}, "'nativ' not allowed"),
                       ({"sidecar": {"grpcPort": "50051"}}, "want integer"),
                       ({"alerts": {"alertmanager": {"urls": ["am:9093"]}}}, "pattern"),
                       ({"alerts": {"resendSeconds": 0}}, "/alerts/resendSeconds"),
                       ({"bundle": {"source": "s3"}}, "must be one of"),
                       ({"prometheusRule": {"disabledAlert": []}}, "not allowed")):
        with pytest.raises(helm.HelmValuesError, match=where):
            chart.validate_schema(bad)
        with pytest.raises(helm.HelmValuesError):
            render(chart, bad)  # install / template refuse them too


def render_on(chart, kube_version: str, values: dict | None = None) -> dict[str, str]:
    """Render against a given cluster version (the SDK's native render takes
    `kube_version`; its Python wrapper does not expose it yet)."""
    from helm_python import _native

    return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}),
                                          json.dumps({"kube_version": kube_version})))


def test_kube_version(chart, helm):
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["kubeVersion"] == ">=1.25.0-0"
    with pytest.raises(helm.HelmRenderError, match=r"needs Kubernetes >= 1.29"):
        render_on(chart, "v1.28.0")  # native sidecars need 1.29
    assert render_on(chart, "v1.28.0", {"sidecar": {"native": False}})  # the fallback mode
    assert render_on(chart, "v1.29.0")
    # (Chart.yaml's kubeVersion itself is enforced by `helm install`, not by rendering)


def test_alert_delivery_settings_and_secrets(chart):
    values = {"alerts": {"alertmanager": {"urls": ["http://am-0:9093", "http://am-1:9093"]},
                         "webhook": {"urlSecret": {"name": "hook-url", "key": "url"},
                                     "secret": {"existingSecret": "hook-hmac"}}}}
    docs = render(chart, values)
    spec = pod_spec(docs)
    c = spec["initContainers"][0]
    args = c["command"]
    assert args.count("--alertmanager-url=http://am-0:9093") == 1
    assert "--alertmanager-url=http://am-1:9093" in args
    # the URL comes from the Secret through an env var; the HMAC key as a mounted file
    assert "--webhook-url=$(SAFETY_MONITOR_WEBHOOK_URL)" in args
    assert "--webhook-secret-file=/etc/safety-monitor/webhook/webhook-secret" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["SAFETY_MONITOR_WEBHOOK_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "hook-url", "key": "url"}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert not any("value" in e and "hook" in str(e["value"]) for e in c["env"])
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["webhook-secret"]["secret"]["secretName"] == "hook-hmac"
    assert "emptyDir" in vols["alert-spool"]
    spool = next(a for a in args if a.startswith("--alert-spool-dir="))
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {spool.split("=", 1)[1]}
    assert "--alert-spool-max-bytes=67108864" in args
    assert not kinds(docs, "Secret")  # the chart never holds the secrets itself
    # no sink configured: no alert flags, no spool volume
    plain = pod_spec(render(chart))
    assert not [a for a in plain["initContainers"][0]["command"] if "alert" in a]
    assert "alert-spool" not in {v["name"] for v in plain["volumes"]}


def test_helm_test_hook(chart):
    docs = render(chart, {"alerts": {"webhook": {"url": "http://relay:8080/hook"}}})
    (pod,) = [d for d in kinds(docs, "Pod")
              if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    svc = one(docs, "Service")["metadata"]["name"]
    assert env["METRICS_URL"] == f"http://{svc}:9464/metrics"
    assert env["EXPECT_SINKS"] == "true"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    compile(c["command"][2], "helm-test", "exec")  # the script is valid Python


def test_rule_runbook_base_url(chart):
    docs = render(chart, {"prometheusRule": {"enabled": True,
                                             "runbookBaseUrl": "https://wiki.example/rb"}})
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert all(r["annotations"]["runbook_url"] == "https://wiki.example/rb#"
               + r["alert"].lower() for r in rules)


def test_bundle_sources(chart, helm, tmp_path):
    spec = pod_spec(render(chart, {"bundle": {"source": "pvc", "pvc": {"claimName": "b"}}}))
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["bundle"]["persistentVolumeClaim"] == {"claimName": "b", "readOnly": True}
    mon = container(spec, "safety-monitor", True)
    assert "--bundle=/etc/safety-monitor/bundle" in mon["command"]
    spec = pod_spec(render(chart, {"bundle": {"source": "configMap",
                                              "configMap": {"name": "my-bundle"}}}))
    assert {v["name"]: v for v in spec["volumes"]}["bundle"]["configMap"]["name"] == "my-bundle"
    with pytest.raises(helm.HelmError):
        render(chart, {"bundle": {"source": "configMap"}})
    with pytest.raises(helm.HelmError):
        render(chart, {"bundle": {"source": "s3"}})
    # a bundle shipped inside the chart becomes a binaryData ConfigMap
    copy = tmp_path / "chart"
    shutil.copytree(CHART, copy, symlinks=False)
    (copy / "files" / "bundle" / "manifest.json").write_text('{"format": "x"}')
    (copy / "files" / "bundle" / "weights.safetensors").write_bytes(b"\x00\x01\xff")
    docs = render(helm.Chart.load(str(copy)), {"bundle": {"source": "configMap"}})
    cm = next(d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].endswith("-bundle"))
    assert set(cm["binaryData"]) == {"manifest.json", "weights.safetensors"}


def test_chart_files_are_the_deploy_files():
    for name, src in (("dashboard.json", DASHBOARD), ("rules.yaml", RULES),
                      ("policy.yaml", SUGGESTED_POLICY)):
        assert (CHART / "files" / name).read_bytes() == src.read_bytes(), name


def test_tls_and_token_from_secrets(chart, serve_flags):
    vals: dict[str, Any] = {
        "sidecar": {"tls": {"enabled": True, "secretName": "monitor-server-tls",
                            "clientSecretName": "monitor-client-tls",
                            "serverName": "safety-monitor.local"},
                    "auth": {"tokenSecret": "monitor-token"}}}
    spec = pod_spec(render(chart, vals))
    mon = container(spec, "safety-monitor", native=True)
    cmd = mon["command"]
    flags = {a.split("=")[0] for a in cmd if a.startswith("--")}
    assert flags <= serve_flags, flags - serve_flags
    mounts = {m["name"]: m["mountPath"] for m in mon["volumeMounts"]}
    assert f"--tls-cert={mounts['monitor-tls']}/tls.crt" in cmd
    assert f"--tls-key={mounts['monitor-tls']}/tls.key" in cmd
    assert f"--tls-client-ca={mounts['monitor-tls']}/ca.crt" in cmd  # mTLS by default
    assert f"--token-file={mounts['monitor-token']}/token" in cmd
    assert not [a for a in cmd if a.startswith("--admin-port")]  # Admin off by default
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["monitor-tls"]["secret"]["secretName"] == "monitor-server-tls"
    assert vols["plugin-tls"]["secret"]["secretName"] == "monitor-client-tls"
    assert vols["monitor-token"]["secret"]["secretName"] == "monitor-token"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet: no TLS gRPC
        assert mon[probe]["tcpSocket"]["port"] == 50052 and "grpc" not in mon[probe]
    vllm = spec["containers"][0]
    env = {e["name"]: e for e in vllm["env"]}
    vmounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
    assert env["SAFETY_MONITOR_TLS_CA"]["value"] == f"{vmounts['plugin-tls']}/ca.crt"
    assert env["SAFETY_MONITOR_TLS_CERT"]["value"] == f"{vmounts['plugin-tls']}/tls.crt"
    assert env["SAFETY_MONITOR_TLS_KEY"]["value"] == f"{vmounts['plugin-tls']}/tls.key"
    assert env["SAFETY_MONITOR_TLS_SERVER_NAME"]["value"] == "safety-monitor.local"
    assert env["SAFETY_MONITOR_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "monitor-token", "key": "token"}
    # the env names the plugin reads are the ones CaptureConfig documents
    from monitor.capture.config import env_table

    for name in env:
        assert f"`{name}`" in env_table(), name
    # TLS without mTLS: no client CA flag, no client cert env
    vals["sidecar"]["tls"]["mtls"] = False
    spec = pod_spec(render(chart, vals))
    cmd = container(spec, "safety-monitor", native=True)["command"]
    assert not [a for a in cmd if a.startswith("--tls-client-ca")]
    assert "SAFETY_MONITOR_TLS_CERT" not in {e["name"] for e in spec["containers"][0]["env"]}
    # admin on loopback when asked for
    cmd = container(pod_spec(render(chart, {"sidecar": {"adminPort": 50052}})),
                    "safety-monitor", native=True)["command"]
    assert "--admin-port=50052" in cmd and "--admin-host=127.0.0.1" in cmd
