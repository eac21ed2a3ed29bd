"""`ServerConfig`: every setting of `safety-monitor serve`, one definition.

Each field carries its CLI help (and, where needed, a parser) in its metadata;
`add_arguments` generates the `serve` flags from the fields and `from_args` builds the
config back, so a default is written once, here. Sizes are in bytes (flags accept
`64MiB` style), times in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.judge.trace import MAX_TRACE_TOKENS
from monitor.report.sinks import AlertSinksConfig
from monitor.server.access import AccessConfig
from monitor.server.handlers import RpcLimits

__all__ = ["LOG_LEVELS", "ServerConfig", "add_arguments", "from_args", "parse_size"]

#: Accepted values of `--log-level`.
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


def parse_size(text: str) -> int:
    """Parse a byte size: 1048576, 64KiB, 64MiB, 1GiB (also k/M/G as powers of 1024)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte size like 65536 or 64MiB, "
                                         f"found {text!r}") from None


_ALERTS = "alert delivery (escalations of mode alert|block detectors)"
_ACCESS = "access (TLS, token, Admin, call limits; see monitor/server/access.py)"


def _trace_tokens(text: str) -> int:
    """`--audit-token-trace`: an integer in [0, MAX_TRACE_TOKENS]."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_TRACE_TOKENS:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_TRACE_TOKENS}], "
                                         f"found {text!r}")
    return n


def _opt(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
         choices: tuple[str, ...] | None = None, required: bool = False,
         flag: str | None = None, append: bool = False, group: str | None = None,
         metavar: str | None = None) -> Any:
    """A config field: its default and how its flag reads (help, parser, choices; `flag`
    overrides the name derived from the field; `append`: repeatable flag -> tuple)."""
    meta: dict[str, Any] = {"help": help}
    if parse is not None:
        meta["parse"] = parse
    if choices is not None:
        meta["choices"] = choices
    if flag is not None:
        meta["flag"] = flag
    if append:
        meta["append"] = True
    if group is not None:
        meta["group"] = group
    if metavar is not None:
        meta["metavar"] = metavar
    if required:
        return field(metadata={**meta, "required": True})
    return field(default=default, metadata=meta)


@dataclass
class ServerConfig:
    """Settings of the sidecar (the flags of `safety-monitor serve`)."""

    bundle: str = _opt(None, "detector bundle directory", required=True)
    policy: str | None = _opt(None, "policy YAML (default: the bundle's thresholds)")
    host: str = _opt("127.0.0.1", "gRPC bind address")
    port: int = _opt(50051, "gRPC port")
    metrics_host: str = _opt("127.0.0.1", "/metrics bind address")
    metrics_port: int = _opt(9464, "/metrics port (-1: no /metrics HTTP server)")
    audit_log: str | None = _opt(None, "JSONL audit log path (append)")
    audit_finals: bool = _opt(False, "also write one audit line per final verdict")
    audit_token_trace: int = _opt(
        64, "per audit line, the detector's last N in-scope [position, token score] pairs "
        f"(for `safety-monitor explain`; 0: none; at most {MAX_TRACE_TOKENS})",
        parse=_trace_tokens, metavar="N")
    queue_rows: int = _opt(65536, "scoring queue capacity, rows (bounds activation memory)")
    max_batch_rows: int = _opt(4096, "most rows per scorer call")
    stream_outbound_bytes: int = _opt(
        1 << 20, "per stream: unread verdict bytes above which the server stops reading that "
        "stream's frames until its client catches up (flow control; verdicts are never "
        "dropped while the stream lives)", parse=parse_size)
    max_frame_bytes: int = _opt(64 << 20, "largest frame payload accepted (e.g. 64MiB); "
                                "larger frames get an in-stream 'oversized' error",
                                parse=parse_size)
    grpc_max_message_bytes: int | None = _opt(
        None, "gRPC receive limit (default 2 x max-frame-bytes + 1MiB)", parse=parse_size)
    compute_dtype: str = _opt("fp32", "scorer compute dtype", choices=("fp32", "bf16"))
    max_requests: int = _opt(100_000, "most live requests (every request counts, orphans "
                             "too); one more evicts the least recently active, which is "
                             "finished with reason 'evicted'")
    max_request_id_bytes: int = _opt(256, "longest request id (and client id) accepted, "
                                     "UTF-8 bytes")
    closed_ids_bytes: int = _opt(32 << 20, "memory budget for remembering finished "
                                 "request ids (late frames for them are refused)",
                                 parse=parse_size)
    orphan_grace_s: float = _opt(30.0, "seconds a broken stream's open requests wait for "
                                 "a reconnecting client before they are finished")
    idle_ttl_s: float = _opt(600.0, "seconds a request of an open stream may go without a "
                             "frame before it is finished with reason 'idle' (0: never)")
    policy_watch_s: float = _opt(1.0, "policy file poll interval in seconds (0: off)")
    grace_s: float = _opt(5.0, "shutdown grace in seconds: SIGTERM exits within it "
                          "(plus the time to drain the scoring queue, at most 30 s)")
    served_model: str | None = _opt(None, "model folder vLLM serves (its config.json): refuse "
                                    "to start when the bundle's d_model or layer count "
                                    "differs")
    worker_projection: bool = _opt(
        False, "in-worker projection: the capture plan carries each judged hook point's packed "
        "first-GEMM weights and workers send k pre-activations per row instead of d_model "
        "values (docs/CAPTURE.md; torch backend only; hook points where it is not exact, "
        "e.g. TopK, stay raw rows, logged)")
    shm: bool = _opt(
        False, "accept a same-pod shared-memory ring from workers that offer one "
        "(SAFETY_MONITOR_SHM=1): frame bytes are read from the worker's ring file in "
        "--shm-dir, gRPC carries only metadata (docs/CAPTURE.md; off: every frame carries "
        "its bytes)")
    shm_dir: str = _opt("/dev/shm", "directory the workers' ring files are in (shared with "
                        "the vLLM container; with --shm)")
    torch_threads: int = _opt(0, "torch intra-op threads for scoring (0: torch default)")
    backend: str = _opt("torch", "scorer: torch, onnxruntime (the bundle's ONNX graphs; torch "
                        "is not imported) or auto (start-up micro-benchmark on this CPU)",
                        choices=("torch", "onnxruntime", "auto"))
    onnx_threads: int = _opt(0, "onnxruntime intra-op threads per layer (0: its default)")
    audit_stdout: bool = _opt(False, "also write audit lines to stdout as JSON lines (k8s log "
                              "collectors)")
    alertmanager_urls: tuple[str, ...] = _opt(
        (), "Alertmanager base URL, e.g. http://alertmanager:9093 (repeatable: every "
        "instance of an HA pair gets every alert)", flag="--alertmanager-url", append=True,
        group=_ALERTS, metavar="URL")
    webhook_url: str | None = _opt(None, "generic JSON webhook (signed when a secret is set)",
                                   group=_ALERTS)
    webhook_secret_file: str | None = _opt(
        None, "file with the webhook HMAC key (a mounted Secret); default: env "
        "SAFETY_MONITOR_WEBHOOK_SECRET", group=_ALERTS)
    alert_spool_dir: str | None = _opt(
        None, "durable spool of undelivered alerts (survives restarts); default: in memory, "
        "lost at exit", group=_ALERTS)
    alert_spool_max_bytes: int = _opt(64 << 20, "spool bound per sink (oldest evicted and "
                                      "counted when full)", parse=parse_size, group=_ALERTS)
    alert_timeout_s: float = _opt(5.0, "HTTP timeout", group=_ALERTS)
    alert_resend_s: float = _opt(60.0, "re-send active Alertmanager alerts this often",
                                 group=_ALERTS)
    alert_resolve_s: float = _opt(300.0, "an Alertmanager alert resolves this long after its "
                                  "last escalation", group=_ALERTS)
    runbook_url: str = _opt("", "base URL of docs/RUNBOOK.md, put on every delivered alert",
                            group=_ALERTS)

    tls_cert: str | None = _opt(None, "PEM server certificate chain (with --tls-key: the gRPC "
                                "ports speak TLS only)", group=_ACCESS)
    tls_key: str | None = _opt(None, "PEM private key of --tls-cert", group=_ACCESS)
    tls_client_ca: str | None = _opt(None, "PEM CA bundle: require client certificates it "
                                     "signed (mutual TLS)", group=_ACCESS)
    token_file: str | None = _opt(None, "file with the bearer token every call (health "
                                  "on the data port too) must carry", group=_ACCESS)
    token_env: str | None = _opt(None, "environment variable with the bearer token",
                                 group=_ACCESS)
    health_port: int = _opt(-1, "also serve gRPC health on this port (--host, same TLS, "
                            "no token, 4 KiB messages): the port for probes; -1: off, "
                            "0: any free port", group=_ACCESS)
    admin_host: str = _opt("127.0.0.1", "Admin service (policy reload RPC) bind address",
                           group=_ACCESS)
    admin_port: int = _opt(-1, "Admin service port; -1: Admin off. Never served on the data "
                           "port", group=_ACCESS)
    max_streams: int = _opt(1024, "concurrent Stream calls; more are refused "
                            "(RESOURCE_EXHAUSTED too_many_streams)", group=_ACCESS)
    max_score_inflight: int = _opt(2, "concurrent unary Score calls; more are refused "
                                   "before their payload is read (score_busy)", group=_ACCESS)
    max_streams_per_client: int = _opt(64, "concurrent Stream calls of one client (mTLS "
                                       "certificate identity, else peer IP); more are refused "
                                       "(client_too_many_streams)", group=_ACCESS)
    max_score_inflight_per_client: int = _opt(1, "concurrent Score calls of one client; more "
                                              "are refused (client_score_busy)", group=_ACCESS)
    max_unary_inflight: int = _opt(16, "per method, concurrent GetCapturePlan / data-port "
                                   "health calls; more are refused before their request is "
                                   "read (unary_busy)", group=_ACCESS)
    max_unary_inflight_per_client: int = _opt(8, "per method, such calls of one client; more "
                                              "are refused (client_unary_busy)", group=_ACCESS)

    def access(self) -> AccessConfig:
        """The access part of the settings (raises `AccessError` when inconsistent)."""
        return AccessConfig(tls_cert=self.tls_cert, tls_key=self.tls_key,
                            client_ca=self.tls_client_ca, token_file=self.token_file,
                            token_env=self.token_env, admin_host=self.admin_host,
                            admin_port=self.admin_port)

    def rpc_limits(self) -> RpcLimits:
        """Per-server and per-client call limits (raises `ValueError` when out of
        range)."""
        return RpcLimits(max_streams=self.max_streams,
                         max_score_inflight=self.max_score_inflight,
                         max_streams_per_client=self.max_streams_per_client,
                         max_score_inflight_per_client=self.max_score_inflight_per_client,
                         max_unary_inflight=self.max_unary_inflight,
                         max_unary_inflight_per_client=self.max_unary_inflight_per_client)

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per `ServerConfig` field (help, type, default from the field)."""
    hints = typing.get_type_hints(ServerConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if "group" in meta:
            target = groups.get(meta["group"]) or groups.setdefault(
                meta["group"], parser.add_argument_group(meta["group"]))
        kw: dict[str, Any] = {"help": meta["help"], "dest": f.name}
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        typ = hints[f.name]
        if typ is bool:
            target.add_argument(flag, action="store_true", **kw)
            continue
        if meta.get("append"):
            target.add_argument(flag, action="append", default=None, **kw)
            continue
        base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
        kw["type"] = meta.get("parse", base)
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if meta.get("required"):
            kw["required"] = True
        else:
            kw["default"] = f.default
            if f.default not in (None, ""):
                kw["help"] += f" (default: {f.default})"
        target.add_argument(flag, **kw)


def from_args(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` of parsed `serve` arguments."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    for f in dataclasses.fields(ServerConfig):
        if f.metadata.get("append"):
            values[f.name] = tuple(values[f.name] or ())
    return ServerConfig(**values)
