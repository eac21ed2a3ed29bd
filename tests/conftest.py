"""Shared fixtures: free ports, a placeholder bundle, and the real server as a subprocess.

`MonitorServer` runs `python -m monitor.cli serve ...` on free loopback ports through
`monitor.tools.launch.start_sidecar` (ready once gRPC health reports SERVING); tests talk
to it over real sockets and scrape its /metrics over HTTP.
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from monitor.tools.launch import FAST_RECONNECT, SidecarServer, eventually, start_sidecar, stop
from monitor.tools.net import free_port

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = "test/placeholder-model"
D_MODEL = 64
N_LAYERS = 6
LAYERS = (2, 3)  # harmful_intent + sae_demo on 2, deception on 3

POLICY_V1 = """\
version: "test-v1"
defaults:
  aggregation: {kind: max}
  min_tokens: 1
detectors:
  harmful_intent:
    mode: alert
    scope: prompt
    thresholds: {warn: 0.5, critical: 0.9}
  deception:
    mode: observe
    scope: generated
    thresholds: {warn: 0.6, critical: 0.85}
"""


def submit_rows(t: Any, rows: dict[int, torch.Tensor], request_id: str, step: int = 1, *,
                spans: list[tuple[str, int, int, int, int]] | None = None,
                labels: dict[str, str] | None = None) -> Any:
    """Hand the plugin's `Transport` `t` one engine step of 8 rows of `request_id` (4 prompt
    rows, then 4 generated; `rows[layer]` per plan hook point, `[8, D_MODEL]`), written into
    a one-slot host ring as the capture op would; returns that `HostRing`. `spans`
    (`(request_id, n_rows, start_position, prompt_len, role)`, at most 16 rows in all;
    `rows[layer]` has that many) replace those 8 rows; `labels`: request id -> correlation
    id."""
    import torch

    from monitor.capture.transport import HostRing, StepRecord
    from monitor.roles import TokenRole
    from monitor.wire.hooks import parse_hook_name

    plan = t.plan
    assert plan is not None
    ring = HostRing(1, len(plan.points), 16, D_MODEL, torch.float32)
    slot = ring.acquire()
    assert slot is not None
    if spans is None:
        spans = [(request_id, 4, 0, 4, int(TokenRole.OTHER)),
                 (request_id, 4, 4, 4, int(TokenRole.GENERATED))]
    n = sum(s[1] for s in spans)
    v = ring.view(slot)
    for k, hp in enumerate(plan.points):
        v[k, :n] = rows[parse_hook_name(hp.name).layer]
    assert t.submit_step(StepRecord(ring=ring, slot=slot, step=step, plan_id=plan.plan_id,
                                    model=plan.model, points=plan.points, n_rows=n,
                                    spans=spans, max_frame_bytes=plan.max_frame_bytes,
                                    labels=labels or {}))
    return ring


def wait_until(pred: Callable[[], object], timeout: float = 60.0, what: str = "condition",
               poll_s: float = 0.05) -> None:
    """`eventually`, or AssertionError naming ``what`` and the time waited."""
    if not eventually(pred, timeout, poll_s):
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def plain_channel(target: str) -> grpc.Channel:
    """An insecure channel to `target` that reconnects at least once a second."""
    return grpc.insecure_channel(target, options=FAST_RECONNECT)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A placeholder bundle (d_model 64, layers 2 and 3) in a session tmp dir."""
    from monitor.score import build_placeholder_bundle

    out = tmp_path_factory.mktemp("bundle") / "placeholder"
    build_placeholder_bundle(out, model_name=MODEL, d_model=D_MODEL, n_layers=N_LAYERS,
                             layers=LAYERS, seed=0)
    return out


@pytest.fixture(scope="session")
def geometry(bundle_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per probe detector: (mean, u) with score(mean + a*u/|u|^2) = sigmoid(a - 3)."""
    from safetensors.torch import load_file

    w = load_file(str(bundle_dir / "weights.safetensors"))
    out = {}
    for det in ("harmful_intent", "deception"):
        u = w[f"{det}.weight"] / w[f"{det}.std"]
        out[det] = (w[f"{det}.mean"].float(), u.float())
    return out


class MonitorServer:
    """A `safety-monitor serve` subprocess on free ports.

    By default it runs this checkout's code with the test interpreter; ``python`` runs
    another interpreter's *installed* package instead (cwd = ``workdir``, no PYTHONPATH).
    """

    def __init__(self, workdir: Path, bundle: Path, policy_text: str | None = POLICY_V1,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 python: str | None = None,
                 channel: Callable[[str], grpc.Channel] = plain_channel,
                 health_port: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        # --health-port: readiness asks there (the data port may require a token)
        self.health_port = free_port() if health_port else -1
        self.audit_path = workdir / "audit.jsonl"
        self.log_path = workdir / "server.log"
        self.policy_path: Path | None = None
        if policy_text is not None:
            self.policy_path = workdir / "policy.yaml"
            self.policy_path.write_text(policy_text)
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
        if python is not None:
            full_env.pop("PYTHONPATH")
        cfg = SidecarServer(bundle=bundle, port=self.port, metrics_port=self.metrics_port,
                            log=self.log_path, policy=self.policy_path,
                            audit_log=self.audit_path, extra_args=tuple(extra or []),
                            env=full_env, cwd=workdir if python else REPO, python=python,
                            ready_timeout_s=90.0, health_port=self.health_port)
        self.channel = channel(self.target)  # e.g. a TLS channel (tests/test_access.py)
        self.health_channel = (channel(cfg.health_target) if health_port else self.channel)
        self.proc = start_sidecar(cfg, channel=self.health_channel)  # gRPC health SERVING

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scraped samples: {(name, sorted label items): value}."""
        from monitor.report.metrics import parse_exposition

        return dict(parse_exposition(self.metrics_text()))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for (n, lab), v in self.metrics().items():
            d = dict(lab)
            if n == name and all(d.get(k) == val for k, val in labels.items()):
                total += v
        return total

    def audit_lines(self) -> list[dict[str, Any]]:
        import json

        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, ``timeout`` s, then SIGKILL; the exit code."""
        self.channel.close()
        self.health_channel.close()
        stop(self.proc, "the sidecar", timeout_s=timeout)
        return int(self.proc.returncode)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path
                 ) -> Iterator[Callable[..., MonitorServer]]:
    """Factory: `start_server(policy_text=..., extra=[...])` -> a running MonitorServer.

    Every server started is stopped (SIGTERM) at the end of the session.
    """
    started: list[MonitorServer] = []

    def start(policy_text: str | None = POLICY_V1, extra: list[str] | None = None,
              name: str = "server",
              channel: Callable[[str], grpc.Channel] = plain_channel,
              health_port: bool = False) -> MonitorServer:
        srv = MonitorServer(tmp_path_factory.mktemp(name), bundle_dir, policy_text, extra,
                            channel=channel, health_port=health_port)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def thread_masks(pid: int) -> dict[int, tuple[str, frozenset[int]]]:
    """Thread id -> (name, allowed CPUs) of every thread of process `pid` (Linux: the
    `comm` and `Cpus_allowed_list` of /proc/PID/task/*)."""
    from monitor.capture.threads import parse_cpus

    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        m = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
        assert m is not None, f"no Cpus_allowed_list in {task}/status"
        out[int(task.name)] = (comm, parse_cpus(m.group(1)).cpus)
    return out
