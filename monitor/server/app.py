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
(the server and other streams are unaffected). grpcio has no per-method limit, so every
request of the data port is read by a request-streaming handler, after the token check
and inside a concurrency slot (`monitor.server.handlers`); the health (`--health-port`)
and Admin servers, whose requests hold at most a service name, run with
`SMALL_MESSAGE_BYTES` (gRPC refuses a bigger request from its length prefix, unread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import monitor
from monitor.constants import HOOK_NAME_TEMPLATE, Reason
from monitor.judge.latents import LatentTracker, latent_map
from monitor.judge.policy import Policy, effective_holdback, effective_prompt_hold_ms
from monitor.judge.reload import PolicyHolder
from monitor.judge.trace import TokenTrace
from monitor.judge.tracker import RequestTracker
from monitor.report.audit import AuditLog
from monitor.report.metrics import Metrics
from monitor.report.otlp import OtlpAudit, otlp_configured
from monitor.report.sinks import AlertContext, AlertDispatcher, make_dispatcher
from monitor.report.verdicts import Reporter
from monitor.roles import TokenRole, scope_roles
from monitor.score.backend import FrameScorer
from monitor.score.bundle import Bundle
from monitor.server.access import (
    AccessError,
    TokenInterceptor,
    bind,
    load_token,
    server_credentials,
)
from monitor.server.config import ServerConfig
from monitor.server.handlers import add_health_service, add_monitor_service
from monitor.server.pipeline import Pipeline
from monitor.server.registry import RequestRegistry
from monitor.server.service import AdminService, FrameLimits, MonitorService
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import ProjectionSpec
from monitor.wire.hooks import parse_hook_name

__all__ = ["MonitorApp", "ServerConfig", "StartupError", "build_app", "capture_plan",
           "run_server", "serve"]

log = logging.getLogger(__name__)

MONITOR_SERVICE = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name
#: Message limit of the health and Admin servers: their requests hold at most a service
#: name (HealthCheckRequest) or nothing (ReloadPolicyRequest).
SMALL_MESSAGE_BYTES = 4 << 10


class StartupError(Exception):
    """The server cannot start (broken bundle, policy, address...); one-line message."""


def worker_projections(scorer: FrameScorer, bundle_sha256: str
                       ) -> dict[str, monitor_pb2.HookProjection]:
    """In-worker projection (docs/CAPTURE.md): per hook point whose score is exact from
    ``x · W`` (``Scorer.projection``), the packed float32 ``W [d_model, n_cols]`` as a
    `HookProjection`, versioned by bundle sha256 and hook point. Hook points where it is
    not exact (a TopK component) and non-torch backends are left out and logged: their
    workers send raw rows."""
    mod = sys.modules.get("monitor.score.scorer")  # not loaded: not the torch backend
    if mod is None or not isinstance(scorer, mod.Scorer):
        log.warning("--worker-projection: backend %s cannot score projected rows; workers "
                    "send hidden states", type(scorer).__name__)
        return {}
    out: dict[str, monitor_pb2.HookProjection] = {}
    for hook in scorer.hooks:
        try:
            w, needs_var = scorer.projection(hook)
        except ValueError as e:
            log.warning("--worker-projection: %s stays raw rows (%s)", hook, e)
            continue
        d, k = (int(n) for n in w.shape)
        out[hook] = monitor_pb2.HookProjection(
            hook_name=hook, version=f"{bundle_sha256[:16]}:{hook}", d_model=d, n_cols=k,
            w=w.numpy().astype("<f4", copy=False).tobytes(), needs_var=needs_var)
    return out


def projection_specs(projections: dict[str, monitor_pb2.HookProjection]
                     ) -> dict[str, ProjectionSpec]:
    """What the codec checks projected frames against (per hook point)."""
    return {h: ProjectionSpec(p.version, int(p.n_cols), bool(p.needs_var))
            for h, p in projections.items()}


def capture_plan(*, model: str, d_model: int, n_layers: int, bundle_sha256: str,
                 policy: Policy, scorer: FrameScorer,
                 max_frame_bytes: int,
                 projections: dict[str, monitor_pb2.HookProjection] | None = None,
                 ) -> monitor_pb2.CapturePlan:
    """The capture plan: hook points with a detector the policy judges (`hook_names`, in
    forward order; `layers` their layers, for clients that predate hook points: they
    capture resid_post of each, and the server refuses such frames when the bundle reads
    another hook point); token kinds and roles from their scopes (`token_roles` empty
    when every role is read). `model`, `d_model` and `n_layers` (the bundle's
    `model.n_layers`) state the model the bundle was trained on: the plugin refuses a plan
    whose identity, hidden size or depth differ from what vLLM serves.

    `projections` (from `worker_projections`): those of the judged hook points go into the
    plan (in-worker projection).

    `enforcement.prompt_hold_ms` is the policy's bound when a detector holds the first
    token (`monitor.judge.policy.effective_prompt_hold_ms`), else 0; with a hold every
    prompt role is captured.

    `plan_id` is a short hash of everything a client's capture depends on (with the
    effective prompt hold; not the rest of the policy's `enforcement`, which the
    API-server gate reads from every plan it fetches).
    """
    hooks: list[str] = []
    roles: set[TokenRole] = set()
    for hook in scorer.hooks:
        judged = [d for d in scorer.detectors_on(hook) if d in policy.detectors]
        if not judged:
            continue
        hooks.append(hook)
        for d in judged:
            roles |= scope_roles(policy.detectors[d].scope)
    holdback = effective_holdback(policy)
    if effective_prompt_hold_ms(policy):
        # prompt-time blocking: the sidecar must see the prompt up to its last token to say
        # it is judged through (`JudgedThrough`), so every prompt role is captured
        roles |= scope_roles("prompt")
    kinds: set[monitor_pb2.TokenKind] = set()
    if roles - {TokenRole.GENERATED}:
        kinds.add(monitor_pb2.TOKEN_KIND_PROMPT)
    if TokenRole.GENERATED in roles:
        kinds.add(monitor_pb2.TOKEN_KIND_GENERATED)
    token_kinds = sorted(kinds)
    token_roles = [] if roles >= scope_roles("both") else sorted(int(r) for r in roles)
    layers = sorted({parse_hook_name(h).layer for h in hooks})
    projs = [projections[h] for h in hooks if projections and h in projections]
    key = (f"{model}|{d_model}|{n_layers}|{hooks}|{token_kinds}|{token_roles}|{bundle_sha256}|"
           f"{max_frame_bytes}|{[p.version for p in projs]}|"
           f"{effective_prompt_hold_ms(policy)}|{holdback}")
    return monitor_pb2.CapturePlan(
        plan_id=hashlib.sha256(key.encode()).hexdigest()[:16], model=model, d_model=d_model,
        layers=layers, token_kinds=token_kinds, hook_name_template=HOOK_NAME_TEMPLATE,
        preferred_dtype=monitor_pb2.DTYPE_BFLOAT16, bundle_sha256=bundle_sha256,
        max_frame_bytes=max_frame_bytes, hook_names=hooks,
        token_roles=token_roles,  # type: ignore[arg-type]
        model_n_layers=n_layers,
        enforcement=monitor_pb2.Enforcement(
            fail_mode=policy.enforcement.fail_mode,
            max_behind_frames=policy.enforcement.max_behind_frames,
            prompt_hold_ms=effective_prompt_hold_ms(policy),
            strict_streaming=holdback is not None, holdback_tokens=holdback or 0,
            hold_bound_ms=policy.enforcement.prompt_hold_ms if holdback is not None else 0),
        projections=projs,
    )


def _thresholds(policy: Policy) -> list[float]:
    return [v for d in policy.detectors.values() for _, v in d.thresholds]


class _DaemonExecutor:
    """A one-thread executor whose thread is a daemon: a task stuck forever (a reload
    reading a FIFO, a hung filesystem) never keeps the process from exiting."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._q = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, fut = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._q.put((fn, fut))
        return fut


class MonitorApp:
    """The process: bundle, scorer, policy, pipeline, metrics, audit, the Monitor service
    and the one policy-reload path.

    Policy reload (file watch, SIGHUP, `Admin.ReloadPolicy`) always goes through
    `reload_policy`, under one lock, on the `policy-reload` daemon thread: never on the
    frame-decoding pool or the event loop, and a reload that hangs cannot stop SIGTERM.
    """

    def __init__(self, config: ServerConfig, bundle: Bundle, scorer: FrameScorer,
                 policy: Policy, holder: PolicyHolder | None, metrics: Metrics,
                 audit: AuditLog, pipeline: Pipeline, alerts: AlertDispatcher) -> None:
        self.config = config
        self.alerts = alerts
        self.bundle = bundle
        self.scorer = scorer
        self.holder = holder
        self.metrics = metrics
        self.audit = audit
        self.pipeline = pipeline
        self.model_name: str = bundle.model_name
        self._policy = policy
        self._plan_lock = threading.Lock()
        self._projections = (worker_projections(scorer, bundle.sha256)
                             if config.worker_projection else {})
        self._plan = self._make_plan(policy)
        self._reload_lock = threading.Lock()
        self._reload_executor = _DaemonExecutor("policy-reload")
        self.service = MonitorService(
            pipeline=pipeline, scorer=scorer,
            limits=FrameLimits(model=bundle.model_name, d_model=int(bundle.d_model),
                               layers=frozenset(int(x) for x in scorer.layers),
                               max_frame_bytes=config.max_frame_bytes,
                               hook_names=frozenset(scorer.hooks),
                               projections=projection_specs(self._projections)),
            plan=self.plan, metrics=metrics, max_hello_id_bytes=config.max_request_id_bytes,
            max_outbound_bytes=config.stream_outbound_bytes,
            shm_dir=config.shm_dir if config.shm else None)

    @property
    def policy(self) -> Policy:
        """The active policy."""
        return self._policy

    def _make_plan(self, policy: Policy) -> monitor_pb2.CapturePlan:
        return capture_plan(model=self.model_name, d_model=int(self.bundle.d_model),
                            n_layers=int(self.bundle.n_layers),
                            bundle_sha256=self.bundle.sha256, policy=policy,
                            scorer=self.scorer, max_frame_bytes=self.config.max_frame_bytes,
                            projections=self._projections)

    def plan(self) -> monitor_pb2.CapturePlan:
        """The current capture plan (changes with the policy)."""
        with self._plan_lock:
            return self._plan

    def apply_policy(self, policy: Policy) -> None:
        """Install a validated policy: tracker (in queue order), plan, metrics."""
        self._policy = policy
        self.pipeline.set_policy(policy)
        with self._plan_lock:
            old = self._plan.plan_id
            self._plan = self._make_plan(policy)
            new = self._plan.plan_id
        self.metrics.set_policy(policy.version, policy.sha256, _thresholds(policy),
                                policy.detectors)
        log.info("policy %s active (%d detectors); plan %s%s", policy.version,
                 len(policy.detectors), new, "" if new == old else f" (was {old})")

    def reload_policy(self, trigger: str, *, only_if_changed: bool = False
                      ) -> tuple[bool, str] | None:
        """The one reload path (file watch, SIGHUP, Admin RPC); counted in metrics.

        `only_if_changed` (the watcher): do nothing and return None unless the file's
        content differs from the last one attempted. Call it through `submit_reload`
        from anywhere that must not block."""
        with self._reload_lock:
            if self.holder is None:
                if only_if_changed:
                    return None
                msg = "no --policy file: the server judges with the bundle defaults"
                self.metrics.policy_reloads.labels(result="refused").inc()
                log.error("policy reload (%s) refused: %s", trigger, msg)
                return False, msg
            result = self.holder.poll() if only_if_changed else self.holder.reload()
            if result is not None:
                ok, msg = result
                self.metrics.policy_reloads.labels(result="ok" if ok else "refused").inc()
                (log.info if ok else log.error)("policy reload (%s): %s", trigger, msg)
            return result

    def submit_reload(self, trigger: str, *, only_if_changed: bool = False
                      ) -> concurrent.futures.Future[tuple[bool, str] | None]:
        """Run `reload_policy` on the policy-reload thread; returns its future."""
        return self._reload_executor.submit(
            lambda: self.reload_policy(trigger, only_if_changed=only_if_changed))

    def on_sighup(self) -> None:
        """SIGHUP (logrotate's `postrotate`, an operator): reopen the audit file and
        reload the policy, on the policy-reload thread (never in the signal handler)."""
        def run() -> None:
            self.audit.reopen()
            self.reload_policy("sighup")
        self._reload_executor.submit(run)

    def watch_policy(self, stop: threading.Event) -> threading.Thread | None:
        """Poll the policy file every `policy_watch_s` seconds (content hash)."""
        if self.holder is None or self.config.policy_watch_s <= 0:
            return None

        def run() -> None:
            while not stop.wait(self.config.policy_watch_s):
                try:
                    self.submit_reload("file_watch", only_if_changed=True).result()
                except Exception:
                    log.exception("policy watcher failed (continuing)")

        t = threading.Thread(target=run, name="policy-watch", daemon=True)
        t.start()
        return t


def _backend_version(backend: str) -> str:
    """The version of the scorer's library (already imported by the scorer)."""
    import importlib

    return str(importlib.import_module(backend).__version__)


def _load_policy(config: ServerConfig, bundle: Bundle,
                 on_change: Callable[[Policy], None]) -> tuple[Policy, PolicyHolder | None]:
    from monitor.judge import PolicyError, check_policy, default_policy

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
    """Load bundle, scorer, policy; create metrics, audit log, registry and pipeline.

    Raises:
        StartupError: one-line reason (bundle / policy / audit path / settings).
    """
    from monitor.score import BundleError
    from monitor.score.backend import load_scorer

    if config.max_frame_bytes < 1 or config.queue_rows < 1:
        raise StartupError("--max-frame-bytes and --queue-rows must be >= 1")
    if config.grpc_limit <= config.max_frame_bytes:
        raise StartupError(f"--grpc-max-message-bytes ({config.grpc_limit}) must exceed "
                           f"--max-frame-bytes ({config.max_frame_bytes})")
    try:
        registry = RequestRegistry(
            max_requests=config.max_requests,
            max_request_id_bytes=config.max_request_id_bytes,
            closed_ids_bytes=config.closed_ids_bytes, orphan_grace_s=config.orphan_grace_s,
            idle_ttl_s=config.idle_ttl_s)
    except ValueError as e:
        raise StartupError(str(e)) from None
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
    if config.served_model:
        from monitor.tools.models import check_bundle_matches_model

        try:
            shape = check_bundle_matches_model(
                bundle_model=bundle.model_name, bundle_d_model=int(bundle.d_model),
                bundle_n_layers=int(bundle.n_layers), model_dir=config.served_model)
        except ValueError as e:
            raise StartupError(f"bundle refused for --served-model: {e}") from None
        log.info("bundle matches the served model %s (%s, d_model %d, %d layers)",
                 config.served_model, shape.architecture, shape.d_model, shape.n_layers)

    app_ref: list[MonitorApp] = []
    policy, holder = _load_policy(config, bundle, lambda p: app_ref[0].apply_policy(p))

    metrics = Metrics(bundle.model_name, _thresholds(policy))
    metrics.build_info.info({"version": monitor.__version__, "backend": loaded.backend,
                             "backend_version": _backend_version(loaded.backend),
                             "grpc": grpc.__version__})
    metrics.set_bundle(bundle.name, bundle.sha256, bundle.model_name)
    metrics.set_policy(policy.version, policy.sha256, _thresholds(policy), policy.detectors)
    metrics.init_layer_series(scorer.layers)
    try:
        otlp = OtlpAudit() if otlp_configured() else None
    except RuntimeError as e:
        raise StartupError(str(e)) from None
    try:
        audit = AuditLog(config.audit_log, on_failure=metrics.audit_write_failures.inc,
                         include_finals=config.audit_finals, stdout=config.audit_stdout,
                         otlp=otlp)
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
    tracker = RequestTracker(policy)
    reporter = Reporter(metrics, audit, bundle_name=bundle.name, bundle_sha256=bundle.sha256,
                        model_name=bundle.model_name, alerts=alerts)
    pipeline = Pipeline(scorer, tracker, registry, policy, metrics, reporter,
                        model_name=bundle.model_name, capacity_rows=config.queue_rows,
                        max_batch_rows=config.max_batch_rows,
                        sweep_interval_s=_sweep_interval(config),
                        latents=LatentTracker(latent_map(bundle)),
                        trace=TokenTrace(config.audit_token_trace))
    _export_counters(metrics, tracker, registry)
    app = MonitorApp(config, bundle, scorer, policy, holder, metrics, audit, pipeline, alerts)
    app_ref.append(app)
    log.info("bundle %s (%s, sha256 %s): model %s, d_model %d, layers %s, detectors %s",
             bundle.name, config.bundle, bundle.sha256[:12], bundle.model_name, bundle.d_model,
             list(scorer.layers), [d.name for d in bundle.detectors])
    return app


def _sweep_interval(config: ServerConfig) -> float:
    """Sweeper period: a quarter of the shortest timer, between 0.05 s and 1 s."""
    timers = [t for t in (config.orphan_grace_s, config.idle_ttl_s) if t > 0]
    return min(1.0, max(0.05, min(timers, default=4.0) / 4))


def _export_counters(metrics: Metrics, tracker: RequestTracker,
                     registry: RequestRegistry) -> None:
    """Tracker and registry counters on /metrics, read from their owners at scrape."""
    metrics.add_pull("counter", "tracker_duplicate_tokens",
                     "Tokens the tracker dropped at already-judged positions (per detector).",
                     lambda: tracker.duplicates_dropped)
    metrics.add_pull("counter", "nonfinite_scores",
                     "Scores that were NaN/inf (tokens counted as unscored).",
                     lambda: tracker.nonfinite_scores)
    metrics.add_pull("counter", "tracker_unknown_finished",
                     "Finishes for requests the tracker had no state for.",
                     lambda: tracker.unknown_finished)
    metrics.add_pull("counter", "requests_evicted",
                     "Live requests evicted to stay under --max-requests (finished with "
                     "reason evicted).", lambda: registry.stats().evicted)
    metrics.add_pull("gauge", "orphaned_requests",
                     "Requests whose stream broke, waiting for a reconnecting client.",
                     lambda: registry.stats().orphaned)
    metrics.add_pull("gauge", "closed_ids",
                     "Finished request ids remembered (late frames for them are refused).",
                     lambda: registry.stats().closed_ids)
    metrics.add_pull("gauge", "closed_ids_bytes",
                     "Memory charged to the remembered finished request ids.",
                     lambda: registry.stats().closed_ids_bytes)


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
    small = [("grpc.max_receive_message_length", SMALL_MESSAGE_BYTES), *options[1:]]
    try:
        access = cfg.access()
        token = load_token(access)
        creds = server_credentials(access)
        limits = cfg.rpc_limits()
    except (AccessError, ValueError) as e:
        raise StartupError(str(e)) from None

    def refused(reason: str) -> None:
        app.metrics.frames_rejected.labels(reason=reason).inc()

    interceptors = ([TokenInterceptor(token, lambda: refused(Reason.UNAUTHENTICATED.value))]
                    if token is not None else [])
    server = grpc.aio.server(options=options, interceptors=interceptors)
    svc = app.service
    add_monitor_service(server, stream=svc.Stream, score=svc.Score, plan=svc.GetCapturePlan,
                        limits=limits, on_refused=refused)
    health_servicer = health.aio.HealthServicer()  # one status, both servers
    add_health_service(server, health_servicer, limits=limits, on_refused=refused)
    reflection.enable_server_reflection(
        (MONITOR_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, cfg.host, cfg.port, creds, "")
    probes: grpc.aio.Server | None = None  # health for probes: no token, small messages
    health_port = -1
    if cfg.health_port >= 0:
        probes = grpc.aio.server(options=small)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        health_port = _bind(probes, cfg.host, cfg.health_port, creds, "health ")
    admin: grpc.aio.Server | None = None
    admin_port = -1
    if access.admin_enabled:  # Admin only on its own address, never on the data port
        admin = grpc.aio.server(options=small, interceptors=interceptors)
        monitor_pb2_grpc.add_AdminServicer_to_server(
            AdminService(app.submit_reload, lambda: app.policy.version), admin)
        admin_port = _bind(admin, access.admin_host, access.admin_port, creds, "admin ")
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
    for other in (probes, admin):
        if other is not None:
            await other.start()
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
            loop.add_signal_handler(signal.SIGHUP, app.on_sighup)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    for w in app.alerts.workers:
        log.info("alert sink %s: %s (spool %s)", w.name, w.sink.target,
                 "disk" if w.spool.durable else "memory")
    log.info("serving monitor.v1 on %s:%d (%s, %s; grpc limit %d bytes, max frame %d "
             "bytes); health port %s; admin %s; metrics on %s", cfg.host, port,
             ("mTLS" if access.client_ca else "TLS") if creds else "plaintext",
             "bearer token required" if token is not None else "no token",
             limit, cfg.max_frame_bytes,
             f"{cfg.host}:{health_port}" if probes is not None else "off",
             f"on {access.admin_host}:{admin_port}" if admin is not None else "off",
             f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics"
             if cfg.metrics_port >= 0 else "off")
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: draining (grace %.1f s)", cfg.grace_s)
    deadline = loop.time() + cfg.grace_s
    await health_servicer.enter_graceful_shutdown()
    stop_watch.set()
    # end open streams: their readers finish open requests into the queue
    app.service.end_streams()
    if admin is not None:
        await admin.stop(0)
    await server.stop(max(0.0, deadline - loop.time()) * 0.5)
    if probes is not None:  # NOT_SERVING until here
        await probes.stop(0)
    drained = await asyncio.to_thread(app.pipeline.stop, max(0.1, deadline - loop.time()))
    await asyncio.to_thread(app.alerts.stop)
    app.audit.close()
    app.service.shutdown()
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
