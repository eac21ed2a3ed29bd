"""Does work on the *other* core slow the model's forward pass on this host? (issue 9)

`bench/bench_vllm.py` found the model thread's own user CPU per decode step rising by
0-25 % from run to run when a monitor runs beside it, with the plugin's own work on that
thread ~1 % of a step (bench/RESULTS.md, session 8). This benchmark asks whether *any*
co-located work does that, with no monitor and no vLLM: the default model's forward pass
(transformers, SmolLM2-135M-Instruct, `--dtype` as vLLM-CPU serves it, one intra-op
thread) pinned to the lowest allowed CPU, timed while a co-runner process occupies the
other CPU(s) at niceness 10 (where the placed sidecar runs):

- `none`: nothing started;
- `spin`: a pure-Python busy loop (its working set stays in L1/L2: it competes for the
  core's share of the host only, e.g. an SMT sibling or the hypervisor's scheduling);
- `stream`: numpy copies between two `--stream-mib` MiB arrays (beyond the 32 MiB L3: it
  competes for the shared L3 and memory bandwidth, as decoding and scoring frames do);
- `sidecar-like`: both, alternating every 1 ms (a rough stand-in, not the sidecar);
- `monitor`: the real sidecar (`safety-monitor serve`, default bundle and policy) and a
  client process streaming it the frames the plugin would send for this forward's batch
  (one bf16 frame of `batch` rows per plan layer, 9 / 15 / 18, per step of `--step-ms`,
  each encoded when sent; requests finish and restart every 48 steps), both on the other
  CPU(s) at nice 10, as the placed sidecar and the plugin's threads run — but in separate
  processes, so the model's process holds no monitor thread and never waits for the GIL;
- `monitor-inproc`: the same sidecar, the same frames sent from a thread of the model's
  own process (on the other CPU, nice 10): the plugin's arrangement in vLLM's worker,
  where the sender shares the model thread's GIL;
- `plugin-thread` / `plugin-process`: the plugin's own sender (`monitor.capture`'s
  `Transport`, `SAFETY_MONITOR_SENDER=thread`, or `ProcessTransport`, `=process`) to the
  same sidecar, fed as the plugin's model thread feeds it: after every forward the model
  thread copies the step's rows (one bf16 `[batch, 576]` block per plan hook point) into a
  ring slot and submits one record (timed with the forward: the model thread pays it);
  requests finish and restart every 48 steps. The sender's threads (and the child) run
  on the other CPU(s) as `SAFETY_MONITOR_THREAD_CPUS=auto` places them, not niced (as in
  vLLM). The two arms differ only in where frames are encoded and sent.

One decode step is stood in for by `model(input_ids[batch, 1])` without a KV cache (each
forward reads every weight once, as a decode step of `batch` requests does). Rounds rotate
the conditions; each condition's cell is the median over rounds of the per-round median
forward time, with the forward's thread CPU time (`time.thread_time`) beside the wall
time: CPU time rising with wall time means the core did more work or stalled longer per
forward (what the vLLM benchmark saw), not that it waited to be scheduled.

    python bench/bench_corunner.py                 # ~2 minutes
    python bench/bench_corunner.py --rounds 8 --forwards 40 --batch 16
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from monitor.tools.launch import process_cpu_s  # noqa: E402
from monitor.v1 import monitor_pb2, monitor_pb2_grpc  # noqa: E402

CONDITIONS = ("none", "spin", "stream", "sidecar-like", "monitor", "monitor-inproc",
              "plugin-thread", "plugin-process")
PLUGIN_ARMS = ("plugin-thread", "plugin-process")
PLAN_LAYERS = (9, 15, 18)

_CORUNNER = """\
import os, sys, time
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})
os.nice(10)
kind, mib = sys.argv[2], int(sys.argv[3])
if kind in ('stream', 'sidecar-like'):
    import numpy as np
    a = np.ones(mib * 2**18, dtype=np.float32); b = np.empty_like(a)
print('ready', flush=True)
while True:
    if kind == 'spin':
        for _ in range(100000):
            pass
    elif kind == 'stream':
        np.copyto(b, a); np.copyto(a, b)
    else:
        t = time.perf_counter() + 0.001
        while time.perf_counter() < t:
            pass
        np.copyto(b[: len(b) // 16], a[: len(a) // 16])
"""


def plugin_frames(batch: int, step_ms: float, gate: threading.Event | None = None
                  ) -> Iterator[monitor_pb2.ClientMessage]:
    """What the plugin sends for a decode batch of `batch` requests, paced at one step per
    `step_ms`: per step one bf16 frame of `batch` rows per plan layer (a fresh tensor
    encoded per frame: the sender's copy + encode), requests finished and restarted every
    48 steps. `gate`: while cleared, wait (no frames); the pace restarts when it is set."""
    import torch

    from monitor.wire import Span, encode_frame

    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    d_model, prompt, life = 576, 16, 48
    seq, step, gen = 0, 0, 0
    t_next = time.perf_counter()
    while True:
        if gate is not None and not gate.is_set():
            gate.wait()
            t_next = time.perf_counter()
        if step and step % life == 0:
            for k in range(batch):
                yield monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
                    request_id=f"g{gen}-{k}", reason="stop"))
            gen += 1
        pos = prompt + step % life
        spans = [Span(f"g{gen}-{k}", 1, pos, prompt) for k in range(batch)]
        for layer in PLAN_LAYERS:
            x = torch.randn(batch, d_model).to(torch.bfloat16)
            seq += 1
            yield monitor_pb2.ClientMessage(frame=encode_frame(
                x, seq=seq, model=model, layer=layer, spans=spans))
        step += 1
        # paced; after a pause (SIGSTOP or the gate) it resumes the pace, never catches up
        t_next = max(t_next + step_ms / 1e3, time.perf_counter())
        time.sleep(max(0.0, t_next - time.perf_counter()))


def stream_to(target: str, frames: Iterator[monitor_pb2.ClientMessage]) -> None:
    stub = monitor_pb2_grpc.MonitorStub(grpc.insecure_channel(target))
    for _ in stub.Stream(frames):
        pass


def client_main(target: str, batch: int, step_ms: float) -> int:
    """`--client`: stream plugin-like frames to the sidecar at `target` until killed."""
    print("ready", flush=True)
    stream_to(target, plugin_frames(batch, step_ms))
    return 0


def start_inproc_client(target: str, batch: int, step_ms: float, cpus: list[int]
                        ) -> threading.Event:
    """The `monitor-inproc` client: the same frames from a thread of THIS process (as the
    plugin's sender thread runs in vLLM's worker, sharing its GIL), on `cpus` at nice 10
    (gRPC's threads it starts inherit both). Returns its gate (cleared: paused)."""
    gate = threading.Event()

    def run() -> None:
        os.sched_setaffinity(0, set(cpus))  # this thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        stream_to(target, plugin_frames(batch, step_ms, gate))

    threading.Thread(target=run, name="inproc-client", daemon=True).start()
    return gate


class PluginFeed:
    """One plugin sender (`Transport` or `ProcessTransport`) connected to `target`, and the
    model thread's per-step work that feeds it (`step`)."""

    def __init__(self, target: str, sender: str, batch: int) -> None:
        import torch

        from monitor.capture.config import CaptureConfig
        from monitor.capture.sender import ProcessTransport
        from monitor.capture.threads import Placement
        from monitor.capture.transport import Transport
        from monitor.roles import TokenRole
        from monitor.tools.launch import eventually

        self.model = "HuggingFaceTB/SmolLM2-135M-Instruct"
        cfg = CaptureConfig(addr=target, model=self.model, sender=sender, ring_slots=8,
                            client_id=f"corunner-{sender}")
        kind = ProcessTransport if sender == "process" else Transport
        self.t = kind(cfg, self.model, placement=Placement.plan("auto"))
        plan = self.t.fetch_plan(60.0)
        if plan is None:
            raise RuntimeError(f"plugin-{sender}: no capture plan from {target}")
        self.plan = plan
        self.ring = self.t.make_ring(slots=8, budget_mb=256, n_layers=len(plan.points),
                                     max_rows=batch, d_model=plan.d_model, dtype=plan.dtype)
        self.t.start()
        if not eventually(lambda: self.t.connected, 60.0):
            raise RuntimeError(f"plugin-{sender}: not connected to {target}")
        self.batch, self.n, self.gen = batch, 0, 0
        self.x = torch.randn(batch, plan.d_model).to(plan.dtype)
        self.role = int(TokenRole.GENERATED)

    def step(self) -> None:
        """Model thread, once per forward: the plugin's per-step work (rows into a ring
        slot, one record submitted; every 48 steps the batch's requests finish)."""
        from monitor.capture.transport import StepRecord
        from monitor.v1 import monitor_pb2

        prompt, life = 16, 48
        if self.n and self.n % life == 0:
            for k in range(self.batch):
                self.t.submit_finished(monitor_pb2.RequestFinished(
                    request_id=f"g{self.gen}-{k}", reason="stop"))
            self.gen += 1
        pos = prompt + self.n % life
        self.n += 1
        slot = self.ring.acquire()
        if slot is None:
            n_p = len(self.plan.points)
            self.t.count_drop(n_p, n_p * self.batch, 0, "ring full")
            return
        for dst in self.ring.rows[slot]:
            dst[: self.batch].copy_(self.x)
        spans = [(f"g{self.gen}-{k}", 1, pos, prompt, self.role) for k in range(self.batch)]
        self.t.submit_step(StepRecord(
            ring=self.ring, slot=slot, step=self.n, plan_id=self.plan.plan_id,
            model=self.model, points=self.plan.points, n_rows=self.batch, spans=spans,
            max_frame_bytes=self.plan.max_frame_bytes))


class Monitor:
    """The `monitor` / `monitor-inproc` co-runners: one sidecar (started once for the run,
    its start-up not timed) and two paced clients, a separate process and a thread of this
    process, all on `cpus` at nice 10. `resume(kind)` lets the sidecar and that client run
    (SIGCONT, the thread's gate); `pause()` stops all (SIGSTOP), so the other conditions
    run without them."""

    def __init__(self, cpus: list[int], batch: int, step_ms: float, tmp: Path,
                 plugin_arms: tuple[str, ...] = ()) -> None:
        from monitor.tools.launch import SidecarServer, start_sidecar
        from monitor.tools.net import free_port

        keep = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(cpus))  # children inherit the CPUs and the niceness
        os.setpriority(os.PRIO_PROCESS, 0, 10)
        self.client: subprocess.Popen[str] | None = None
        try:
            self.metrics_port = free_port()
            cfg = SidecarServer(bundle=ROOT / "bundles" / "default", port=free_port(),
                                metrics_port=self.metrics_port, log=tmp / "sidecar.log",
                                log_level="warning", policy=ROOT / "policies" / "default.yaml",
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                ready_timeout_s=120.0)
            self.sidecar = start_sidecar(cfg)
            self.client = subprocess.Popen(
                [sys.executable, __file__, "--client", cfg.target, "--batch", str(batch),
                 "--step-ms", f"{step_ms:g}"], stdout=subprocess.PIPE, text=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)))
            assert self.client.stdout is not None
            line = self.client.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"monitor client: expected 'ready', found {line!r}")
        finally:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            os.sched_setaffinity(0, keep)
        self.gate = start_inproc_client(cfg.target, batch, step_ms, cpus)
        #: the plugin arms' senders (started here, on this thread = the model thread)
        self.feeds = {arm: PluginFeed(cfg.target, arm.removeprefix("plugin-"), batch)
                      for arm in plugin_arms}
        self.sidecar_cpu0 = process_cpu_s(self.sidecar.pid)
        self.pause()

    def resume(self, kind: str) -> None:
        os.kill(self.sidecar.pid, signal.SIGCONT)
        if kind == "monitor":
            assert self.client is not None
            os.kill(self.client.pid, signal.SIGCONT)
        elif kind == "monitor-inproc":
            self.gate.set()
        time.sleep(0.5)  # the client resumes its pace

    def pause(self) -> None:
        self.gate.clear()
        assert self.client is not None
        os.kill(self.client.pid, signal.SIGSTOP)
        time.sleep(0.2)  # the thread finishes the step it was sending
        os.kill(self.sidecar.pid, signal.SIGSTOP)

    def rows_scored(self) -> float:
        """The sidecar's `safety_monitor_rows_scored_total` (all detectors' layers)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("safety_monitor_rows_scored_total"))

    def close(self) -> tuple[float, float]:
        """Stop everything; (the sidecar's CPU seconds while it ran, rows it scored)."""
        os.kill(self.sidecar.pid, signal.SIGCONT)
        time.sleep(1.0)
        rows = self.rows_scored()
        for feed in self.feeds.values():
            feed.t.close()
        cpu = process_cpu_s(self.sidecar.pid) - self.sidecar_cpu0
        for p in (self.client, self.sidecar):
            assert p is not None
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait(timeout=10)
        return cpu, rows


def start_corunner(kind: str, cpus: list[int], mib: int) -> subprocess.Popen[str] | None:
    if kind in ("none", "monitor", "monitor-inproc", *PLUGIN_ARMS):
        return None
    p = subprocess.Popen([sys.executable, "-c", _CORUNNER, ",".join(map(str, cpus)), kind,
                          str(mib)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise RuntimeError(f"co-runner {kind}: expected 'ready', found {line!r}")
    time.sleep(0.3)  # let it reach its steady state
    return p


def stop_corunner(p: subprocess.Popen[str] | None) -> None:
    if p is not None:
        p.kill()
        p.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--forwards", type=int, default=25, help="timed forwards per cell")
    ap.add_argument("--batch", type=int, default=16, help="rows per forward (requests)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--stream-mib", type=int, default=128)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="monitor: one step's frames every this many ms (0: the median "
                         "forward time of a first `none` cell)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--client", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client_main(args.client, args.batch, args.step_ms)
    conds = [c for c in args.conditions.split(",") if c]
    if "none" not in conds or any(c not in CONDITIONS for c in conds):
        ap.error(f"--conditions: expected names from {CONDITIONS} including 'none', "
                 f"found {conds}")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        ap.error(f"needs >= 2 allowed CPUs, found {allowed}")
    model_cpu, other = allowed[0], allowed[1:]

    import torch
    from transformers import AutoModelForCausalLM

    from monitor.tools.models import prepare_default_model

    os.sched_setaffinity(0, {model_cpu})
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(
        str(prepare_default_model()), torch_dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, 1))

    def schedstat() -> tuple[int, int]:
        """This thread's (CPU ns, ns runnable but waiting for a CPU) from the scheduler."""
        cpu_ns, wait_ns = Path("/proc/thread-self/schedstat").read_text().split()[:2]
        return int(cpu_ns), int(wait_ns)

    def cell(per_step: Callable[[], None] | None = None) -> tuple[float, float, float, float]:
        """(median wall ms, median thread-CPU ms, mean run-queue wait ms, mean blocked ms)
        per forward (+ `per_step` after it, timed with it: the plugin arms' model-thread
        work); blocked = wall - CPU - run-queue wait (the GIL, other waits)."""
        wall, cpu = [], []
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)  # warm caches after the switch
            s0, t_all = schedstat(), time.perf_counter()
            for _ in range(args.forwards):
                t0, c0 = time.perf_counter(), time.thread_time()
                model(input_ids=ids, use_cache=False)
                if per_step is not None:
                    per_step()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
            t_all = time.perf_counter() - t_all
            s1 = schedstat()
        n = args.forwards
        wait_ms = (s1[1] - s0[1]) / 1e6 / n
        blocked_ms = max(0.0, t_all * 1e3 / n - (s1[0] - s0[0]) / 1e6 / n - wait_ms)
        return (statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3, wait_ms,
                blocked_ms)

    cell()  # warm-up
    step_ms = args.step_ms or cell()[0]
    arms = tuple(c for c in conds if c in PLUGIN_ARMS)
    mon = Monitor(other, args.batch, step_ms, Path(tempfile.mkdtemp(prefix="corunner-")),
                  arms) if {"monitor", "monitor-inproc", *PLUGIN_ARMS} & set(conds) else None
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res: dict[str, list[tuple[float, float, float, float]]] = {c: [] for c in conds}
    sidecar_cpu, rows = 0.0, 0.0
    try:
        for r in range(args.rounds):
            k = r % len(conds)
            for c in conds[k:] + conds[:k]:
                p = start_corunner(c, other, args.stream_mib)
                if c.startswith(("monitor", "plugin")):
                    assert mon is not None
                    mon.resume(c)
                try:
                    res[c].append(cell(mon.feeds[c].step if mon is not None
                                       and c in mon.feeds else None))
                finally:
                    stop_corunner(p)
                    if c.startswith(("monitor", "plugin")):
                        assert mon is not None
                        mon.pause()
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{c} {res[c][-1][0]:.2f} ms" for c in conds), flush=True)
    finally:
        sent = {}
        if mon is not None:
            sent = {arm: f.t.stats() for arm, f in mon.feeds.items()}
            sidecar_cpu, rows = mon.close()
    load1 = os.getloadavg()

    med = statistics.median
    base_w = med(r[0] for r in res["none"])
    base_c = med(r[1] for r in res["none"])
    lines = [
        f"`python bench/bench_corunner.py --rounds {args.rounds} --forwards {args.forwards} "
        f"--batch {args.batch} --dtype {args.dtype} --stream-mib {args.stream_mib}`; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, model thread on CPU {model_cpu}, "
        f"co-runner on {other} at nice 10; torch {torch.__version__}; started {started}, "
        f"load average {load0[0]:.1f} -> {load1[0]:.1f}. Cells: median over rounds of the "
        "per-round median forward (wall, thread CPU) or per-round mean (run-queue wait, "
        "blocked = wall - CPU - run-queue wait)."
        + (f" monitor: 3 frames of {args.batch} rows every {step_ms:.1f} ms; the sidecar "
           f"used {sidecar_cpu:.1f} CPU-s and scored {rows:.0f} rows in all."
           if mon is not None else "")
        + "".join(f" {arm}: {st['sent_frames']} frames sent, {st['dropped_frames']} dropped."
                  for arm, st in sent.items()), "",
        "| co-runner | forward wall ms | forward CPU ms | run-queue wait ms | blocked ms | "
        "wall / none | CPU / none | per-round wall / none (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in conds:
        w, cp = med(r[0] for r in res[c]), med(r[1] for r in res[c])
        wq, bl = med(r[2] for r in res[c]), med(r[3] for r in res[c])
        per = [x[0] / b[0] for x, b in zip(res[c], res["none"], strict=True)]
        lines.append(f"| {c} | {w:.2f} | {cp:.2f} | {wq:.2f} | {bl:.2f} | {w / base_w:.3f} | "
                     f"{cp / base_c:.3f} | {min(per):.3f}-{max(per):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
