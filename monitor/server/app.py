"""The sidecar process: load bundle + policy, wire the pipeline, run the gRPC server.

`build_app(config)` loads everything (raising `StartupError` with a one-line message on
a broken bundle or policy) and `run_server(app)` serves until SIGTERM/SIGINT, then
drains: health goes NOT_SERVING, streams get `grace_s` to finish, the scoring queue is
drained (queued frames are scored, open requests get final verdicts) and the audit log
is flushed, fsynced and closed; alert sinks deliver or spool what is queued.

Exit code of `run_server`: 0 after a clean drain; 1 when the scoring queue did not drain
within the grace; 3 when the service stops after unrecoverable audit or alert-delivery
failures (audit lines not written, alert events lost other than by the configured
bounds: spool write errors, undelivered events without a spool directory).

gRPC message limit: `max_receive_message_length` is set deliberately above
`max_frame_bytes` (default: 2 x max_frame_bytes + 1 MiB). A frame between the two gets
an in-stream "oversized" StreamError and the stream stays open; a message above the
gRPC limit is refused by the transport, which ends that call with RESOURCE_EXHAUSTED
(the server and other streams are unaffected).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import monitor
from monitor.report.audit import AuditLog
from monitor.report.metrics import Metrics
from monitor.report.sinks import AlertContext, AlertDispatcher, AlertSinksConfig, make_dispatcher
from monitor.server.access import (
    AccessConfig,
    AccessError,
    TokenInterceptor,
    bind,
    load_token,
    server_credentials,
)
from monitor.server.handlers import RpcLimits, add_monitor_service
from monitor.server.pipeline import Pipeline
from monitor.server.service import AdminService, MonitorService, StreamHandle
from monitor.v1 import monitor_pb2, monitor_pb2_grpc

__all__ = ["HOOK_NAME_TEMPLATE", "MonitorApp", "ServerConfig", "StartupError", "build_app",
           "capture_plan", "run_server"]

log = logging.getLogger(__name__)

HOOK_NAME_TEMPLATE = "blocks.{layer}.hook_resid_post"
MONITOR_SERVICE = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name


class StartupError(Exception):
    """The server cannot start (broken bundle, policy, address...); one-line message."""


@dataclass
class ServerConfig:
    """Server settings (CLI flags of `safety-monitor serve`). Sizes in bytes / rows."""

    bundle: str
    policy: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # negative: no /metrics HTTP server
    audit_log: str | None = None
    audit_finals: bool = False
    queue_rows: int = 65536
    max_batch_rows: int = 4096
    max_frame_bytes: int = 64 << 20
    grpc_max_message_bytes: int | None = None  # default 2 * max_frame_bytes + 1 MiB
    compute_dtype: str = "fp32"
    max_requests: int = 100_000
    policy_watch_s: float = 1.0  # 0 disables the file watcher
    grace_s: float = 5.0
    torch_threads: int = 0  # torch intra-op threads for the scorer; 0: torch's default
    # scorer backend: "torch", "onnxruntime" (bundle's ONNX graphs; torch never imported)
    # or "auto" (start-up micro-benchmark on this CPU; see monitor/score/backend.py)
    backend: str = "torch"
    onnx_threads: int = 0  # onnxruntime intra-op threads per layer session; 0: its default
    orphan_grace_s: float = 30.0  # a broken stream's requests wait this long to be adopted
    access: AccessConfig = field(default_factory=AccessConfig)  # TLS, token, Admin address
    limits: RpcLimits = field(default_factory=RpcLimits)  # concurrent Stream / Score calls
    audit_stdout: bool = False  # also write audit lines to stdout (k8s log collectors)
    # alert delivery (monitor/report/sinks): see AlertSinksConfig for each setting
    alertmanager_urls: tuple[str, ...] = ()
    webhook_url: str | None = None
    webhook_secret_file: str | None = None  # else env SAFETY_MONITOR_WEBHOOK_SECRET
    alert_spool_dir: str | None = None  # durable spool; None: in memory (lost at exit)
    alert_spool_max_bytes: int = 64 << 20
    alert_timeout_s: float = 5.0
    alert_resend_s: float = 60.0
    alert_resolve_s: float = 300.0
    runbook_url: str = ""

    def alert_sinks(self) -> AlertSinksConfig:
        """The alert-delivery part of the settings."""
        return AlertSinksConfig(
            alertmanager_urls=tuple(self.alertmanager_urls), webhook_url=self.webhook_url,
            webhook_secret_file=self.webhook_secret_file, spool_dir=self.alert_spool_dir,
            spool_max_bytes=self.alert_spool_max_bytes, timeout_s=self.alert_timeout_s,
            resend_s=self.alert_resend_s, resolve_after_s=self.alert_resolve_s,
            runbook_url=self.runbook_url)

    @property
    def grpc_limit(self) -> int:
        """The gRPC max receive message length actually used, in bytes."""
        if self.grpc_max_message_bytes is not None:
            return int(self.grpc_max_message_bytes)
        return min(2 * self.max_frame_bytes + (1 << 20), 2**31 - 1)


def capture_plan(*, model: str, d_model: int, bundle_sha256: str, policy: Any, scorer: Any,
                 max_frame_bytes: int) -> monitor_pb2.CapturePlan:
    """The capture plan: layers with a detector the policy judges, token kinds from scopes.

    `plan_id` is a short hash of everything a client's capture depends on.
    """
    layers: list[int] = []
    kinds: set[int] = set()
    for layer in scorer.layers:
        judged = [d for d in scorer.detectors_on(layer) if d in policy.detectors]
        if not judged:
            continue
        layers.append(int(layer))
        for d in judged:
            scope = policy.detectors[d].scope
            if scope in ("prompt", "both"):
                kinds.add(monitor_pb2.TOKEN_KIND_PROMPT)
            if scope in ("generated", "both"):
                kinds.add(monitor_pb2.TOKEN_KIND_GENERATED)
    token_kinds = sorted(kinds)
    key = f"{model}|{d_model}|{layers}|{token_kinds}|{bundle_sha256}|{max_frame_bytes}"
    return monitor_pb2.CapturePlan(
        plan_id=hashlib.sha256(key.encode()).hexdigest()[:16], model=model, d_model=d_model,
        layers=layers, token_kinds=token_kinds, hook_name_template=HOOK_NAME_TEMPLATE,
        preferred_dtype=monitor_pb2.DTYPE_BFLOAT16, bundle_sha256=bundle_sha256,
        max_frame_bytes=max_frame_bytes,
    )


def _thresholds(policy: Any) -> list[float]:
    return [v for d in policy.detectors.values() for _, v in d.thresholds]


class MonitorApp:
    """Everything the servicers share: bundle, scorer, policy, pipeline, metrics, audit."""

    def __init__(self, config: ServerConfig, bundle: Any, scorer: Any, policy: Any,
                 holder: Any, metrics: Metrics, audit: AuditLog, pipeline: Pipeline,
                 alerts: AlertDispatcher) -> None:
        self.config = config
        self.alerts = alerts
        self.bundle = bundle
        self.scorer = scorer
        self.holder = holder
        self.metrics = metrics
        self.audit = audit
        self.pipeline = pipeline
        self.model_name: str = bundle.model_name
        self.d_model: int = int(bundle.d_model)
        self.layers: frozenset[int] = frozenset(int(x) for x in scorer.layers)
        self.streams: set[StreamHandle] = set()
        self.score_executor = concurrent.futures.ThreadPoolExecutor(1, "score-rpc")
        self._policy = policy
        self._plan_lock = threading.Lock()
        self._plan = self._make_plan(policy)
        self._reload_lock = threading.Lock()

    @property
    def policy(self) -> Any:
        """The active policy."""
        return self._policy

    def _make_plan(self, policy: Any) -> monitor_pb2.CapturePlan:
        return capture_plan(model=self.model_name, d_model=self.d_model,
                            bundle_sha256=self.bundle.sha256, policy=policy,
                            scorer=self.scorer, max_frame_bytes=self.config.max_frame_bytes)

    def plan(self) -> monitor_pb2.CapturePlan:
        """The current capture plan (changes with the policy)."""
        with self._plan_lock:
            return self._plan

    def apply_policy(self, policy: Any) -> None:
        """Install a validated policy: tracker (in queue order), plan, metrics."""
        self._policy = policy
        self.pipeline.set_policy(policy)
        with self._plan_lock:
            old = self._plan.plan_id
            self._plan = self._make_plan(policy)
            new = self._plan.plan_id
        self.metrics.set_policy(policy.version, policy.sha256, _thresholds(policy))
        self.metrics.init_alert_series(policy.detectors)
        log.info("policy %s active (%d detectors); plan %s%s", policy.version,
                 len(policy.detectors), new, "" if new == old else f" (was {old})")

    def reload_policy(self, trigger: str) -> tuple[bool, str]:
        """Reload the policy file (watcher, SIGHUP or Admin RPC); counted in metrics."""
        with self._reload_lock:
            if self.holder is None:
                msg = "no --policy file: the server judges with the bundle defaults"
                self.metrics.policy_reloads.labels(result="refused").inc()
                log.error("policy reload (%s) refused: %s", trigger, msg)
                return False, msg
            ok, msg = self.holder.reload()
            self._count_reload(trigger, ok, msg)
            return ok, msg

    def _count_reload(self, trigger: str, ok: bool, msg: str) -> None:
        self.metrics.policy_reloads.labels(result="ok" if ok else "refused").inc()
        (log.info if ok else log.error)("policy reload (%s): %s", trigger, msg)

    def watch_policy(self, stop: threading.Event) -> threading.Thread | None:
        """Poll the policy file every `policy_watch_s` seconds (content hash)."""
        if self.holder is None or self.config.policy_watch_s <= 0:
            return None

        def run() -> None:
            while not stop.wait(self.config.policy_watch_s):
                try:
                    with self._reload_lock:
                        result = self.holder.poll()
                        if result is not None:
                            self._count_reload("file_watch", *result)
                except Exception:
                    log.exception("policy watcher failed (continuing)")

        t = threading.Thread(target=run, name="policy-watch", daemon=True)
        t.start()
        return t


def _backend_version(backend: str) -> str:
    """The version of the scorer's library (already imported by the scorer)."""
    import importlib

    return str(importlib.import_module(backend).__version__)


def _load_policy(config: ServerConfig, bundle: Any, on_change: Any) -> tuple[Any, Any]:
    from monitor.judge import PolicyError, PolicyHolder, check_policy, default_policy

    if config.policy is None:
        policy = default_policy(bundle.detectors)
        log.warning("no --policy given: judging with the bundle's default thresholds "
                    "(version %s)", policy.version)
        return policy, None
    try:
        holder = PolicyHolder(config.policy, on_change=on_change, bundle=bundle)
    except PolicyError as e:
        raise StartupError(f"policy refused: {e}") from None
    for line in check_policy(holder.policy, bundle):
        log.warning("policy check: %s", line)
    return holder.policy, holder


def build_app(config: ServerConfig) -> MonitorApp:
    """Load bundle, scorer, policy; create metrics, audit log and pipeline.

    Raises:
        StartupError: one-line reason (bundle / policy / audit path / settings).
    """
    from monitor.judge import RequestTracker
    from monitor.score import BundleError
    from monitor.score.backend import load_scorer

    if config.max_frame_bytes < 1 or config.queue_rows < 1:
        raise StartupError("--max-frame-bytes and --queue-rows must be >= 1")
    if config.grpc_limit <= config.max_frame_bytes:
        raise StartupError(f"--grpc-max-message-bytes ({config.grpc_limit}) must exceed "
                           f"--max-frame-bytes ({config.max_frame_bytes})")
    try:
        loaded = load_scorer(config.bundle, config.backend,
                             compute_dtype=config.compute_dtype, threads=config.torch_threads,
                             onnx_threads=config.onnx_threads)
    except BundleError as e:
        raise StartupError(f"bundle refused: {e}") from None
    except OSError as e:
        raise StartupError(f"bundle {config.bundle}: {e}") from None
    except (ValueError, KeyError) as e:
        raise StartupError(f"bundle {config.bundle}: cannot build scorer: {e}") from None
    bundle, scorer = loaded.bundle, loaded.scorer
    log.info("scorer backend %s (%s)", loaded.backend, loaded.reason)

    app_ref: list[MonitorApp] = []
    policy, holder = _load_policy(config, bundle, lambda p: app_ref[0].apply_policy(p))

    metrics = Metrics(bundle.model_name, _thresholds(policy))
    metrics.build_info.info({"version": monitor.__version__, "backend": loaded.backend,
                             "backend_version": _backend_version(loaded.backend),
                             "grpc": grpc.__version__})
    metrics.set_bundle(bundle.name, bundle.sha256, bundle.model_name)
    metrics.set_policy(policy.version, policy.sha256, _thresholds(policy))
    metrics.init_alert_series(policy.detectors)
    try:
        audit = AuditLog(config.audit_log, on_failure=metrics.audit_write_failures.inc,
                         include_finals=config.audit_finals, stdout=config.audit_stdout)
    except OSError as e:
        raise StartupError(f"--audit-log {config.audit_log}: {e.strerror or e}") from None
    ctx = AlertContext.from_env(model_name=bundle.model_name, bundle_name=bundle.name,
                                bundle_sha256=bundle.sha256, runbook_url=config.runbook_url)
    try:
        alerts = make_dispatcher(config.alert_sinks(), ctx, metrics.registry)
    except ValueError as e:
        raise StartupError(f"alert delivery: {e}") from None
    except OSError as e:
        raise StartupError(f"alert delivery: {e.filename}: {e.strerror or e}") from None
    tracker = RequestTracker(policy, max_requests=config.max_requests)
    pipeline = Pipeline(scorer, tracker, policy, metrics, audit, bundle_name=bundle.name,
                        bundle_sha256=bundle.sha256, model_name=bundle.model_name,
                        capacity_rows=config.queue_rows, max_batch_rows=config.max_batch_rows,
                        orphan_grace_s=config.orphan_grace_s, alerts=alerts)
    app = MonitorApp(config, bundle, scorer, policy, holder, metrics, audit, pipeline, alerts)
    app_ref.append(app)
    log.info("bundle %s (%s, sha256 %s): model %s, d_model %d, layers %s, detectors %s",
             bundle.name, config.bundle, bundle.sha256[:12], bundle.model_name, bundle.d_model,
             list(scorer.layers), [d.name for d in bundle.detectors])
    return app


def _bind(server: grpc.aio.Server, host: str, port: int, creds: grpc.ServerCredentials | None,
          what: str) -> int:
    """Bind `server` to host:port (TLS when `creds`); the port bound. Raises StartupError."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = bind(server, address, creds)
    except RuntimeError as e:
        raise StartupError(f"cannot bind {what}{address}: {e}") from None
    if bound == 0:
        raise StartupError(f"cannot bind {what}{address}")
    return bound


async def run_server(app: MonitorApp, *, ready: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM / SIGINT (or `app.stop_event`); then drain. Returns exit code."""
    cfg = app.config
    limit = cfg.grpc_limit
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", 16 << 20),
        ("grpc.so_reuseport", 0),
    ]
    try:
        token = load_token(cfg.access)
        creds = server_credentials(cfg.access)
    except AccessError as e:
        raise StartupError(str(e)) from None

    def refused(reason: str) -> None:
        app.metrics.frames_rejected.labels(reason=reason).inc()

    interceptors = ([TokenInterceptor(token, lambda: refused("unauthenticated"))]
                    if token is not None else [])
    server = grpc.aio.server(options=options, interceptors=interceptors)
    svc = MonitorService(app)
    add_monitor_service(server, stream=svc.Stream, score=svc.Score, plan=svc.GetCapturePlan,
                        limits=cfg.limits, on_refused=refused)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (MONITOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg.host, cfg.port, creds, "")
    admin: grpc.aio.Server | None = None
    admin_port = -1
    if cfg.access.admin_enabled:  # Admin only on its own address, never on the data port
        admin = grpc.aio.server(options=options, interceptors=interceptors)
        monitor_pb2_grpc.add_AdminServicer_to_server(
            AdminService(app.reload_policy, lambda: app.policy.version), admin)
        admin_port = _bind(admin, cfg.access.admin_host, cfg.access.admin_port, creds, "admin ")
    if cfg.metrics_port >= 0:
        try:
            app.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        except OSError as e:
            raise StartupError(f"cannot bind metrics {cfg.metrics_host}:{cfg.metrics_port}: "
                               f"{e.strerror or e}") from None
    app.alerts.start()
    app.pipeline.start()
    stop_watch = threading.Event()
    app.watch_policy(stop_watch)
    await server.start()
    if admin is not None:
        await admin.start()
    for name in ("", MONITOR_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not main thread
            pass
    if hasattr(signal, "SIGHUP"):
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(
                None, app.reload_policy, "sighup"))
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    for w in app.alerts.workers:
        log.info("alert sink %s: %s (spool %s)", w.name, w.sink.target,
                 "disk" if w.spool.durable else "memory")
    log.info("serving monitor.v1 on %s:%d (%s, %s; grpc limit %d bytes, max frame %d "
             "bytes); admin %s; metrics on %s", cfg.host, port,
             ("mTLS" if cfg.access.client_ca else "TLS") if creds else "plaintext",
             "bearer token required" if token is not None else "no token",
             limit, cfg.max_frame_bytes,
             f"on {cfg.access.admin_host}:{admin_port}" if admin is not None else "off",
             f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics"
             if cfg.metrics_port >= 0 else "off")
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: draining (grace %.1f s)", cfg.grace_s)
    await health_servicer.enter_graceful_shutdown()
    stop_watch.set()
    # end open streams: their readers finish open requests into the queue
    for h in list(app.streams):
        h.post(None)
    if admin is not None:
        await admin.stop(0)
    await server.stop(cfg.grace_s)
    drained = await asyncio.to_thread(app.pipeline.stop, max(cfg.grace_s, 30.0))
    await asyncio.to_thread(app.alerts.stop)
    app.audit.close()
    app.score_executor.shutdown(wait=False)
    log.info("stopped (%s)", "queue drained" if drained else "queue NOT drained")
    if app.audit.failures or app.alerts.lost:
        log.error("exiting with status 3: %d audit lines not written, %d alert events lost",
                  app.audit.failures, app.alerts.lost)
        return 3
    return 0 if drained else 1


def serve(config: ServerConfig) -> int:
    """Build and run the server (blocking). Raises `StartupError` before serving."""
    app = build_app(config)
    return asyncio.run(run_server(app))
