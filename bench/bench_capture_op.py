"""Benchmark: what the capture plugin costs per decode step, eager and torch.compile.

No vLLM: the synthetic decoder of `tests/synthetic_decoder.py` (vLLM's decoder-layer
calling convention, SmolLM2-135M's widths) runs decode steps of `--batch` requests (one
row each) in three arms, interleaved rep by rep in one process:

- base: the decoder as is;
- op: plan layers wrapped with the capture op, no sink (the op's dispatch + `meta` bump);
- capture: the real `CaptureSession` (StepTracker layout over a stand-in runner that
  carries vLLM's per-step fields, ring copies, `Transport` sender thread) streaming over
  real loopback gRPC to the recording sink of `tests/capture_sink.py` in this process
  (its decode competes for the GIL, as the sink arm of `bench_vllm.py` does).

Each arm is run eagerly and under `torch.compile` (inductor). With
`SAFETY_MONITOR_PROFILE=1` (set here) the capture arm also reports where the host time
goes (`monitor.capture.op.PROF`): op time on the model thread, of which row selection
(`layout`), and the sender thread's encoding. Results: `bench/RESULTS.md`, "## Capture op".

    python bench/bench_capture_op.py                 # eager + compiled
    python bench/bench_capture_op.py --modes eager --batch 1 16 64
    python bench/bench_capture_op.py --layout-only   # row selection alone, CPU us/step
    python bench/bench_capture_op.py --op-only       # the op's own call, CPU us/call
    python bench/bench_capture_op.py --step-record   # process sender's STEP record, CPU us/step
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("SAFETY_MONITOR_PROFILE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from capture_sink import CaptureSink  # noqa: E402
from synthetic_decoder import SyntheticDecoder, fake_runner  # noqa: E402

from monitor.capture import op  # noqa: E402
from monitor.capture.config import CaptureConfig  # noqa: E402
from monitor.capture.plugin import CaptureSession, plan_sites  # noqa: E402
from monitor.capture.transport import Plan  # noqa: E402

MODEL = "synthetic"
PROMPT = 16


def runner(batch: int) -> SimpleNamespace:
    """A decode-ready stand-in runner: `batch` requests at the end of a PROMPT-token prompt."""
    return fake_runner([PROMPT] * batch, [PROMPT] * batch, [1] * batch)


def make_session(m: SyntheticDecoder, sink: CaptureSink, batch: int, d: int
                 ) -> tuple[CaptureSession, SimpleNamespace]:
    r = runner(batch)
    layers = m.model.layers
    cfg = CaptureConfig(addr=sink.addr, model=MODEL, ring_slots=8, queue_size=256)
    s = CaptureSession(r, cfg, model_name=MODEL, d_model=d, n_layers=len(layers),
                       max_rows=max(64, batch))
    plan = s.transport.fetch_plan(30.0)
    assert plan is not None, "sink unreachable"
    s.wrapped = op.wrap_decoder_layers(layers, plan_sites(plan.points), s.buffers.meta)
    s.first_site = min((i, min(v)) for i, v in s.wrapped.items())
    s.set_plan(plan)
    s.start()
    t = time.monotonic()
    while not s.transport.connected and time.monotonic() - t < 60:
        time.sleep(0.05)
    return s, r


def bench_layout(batches: list[int], n: int = 2000) -> None:
    """CPU time of `StepTracker.layout` for a decode step of `batch` requests (model thread)."""
    from monitor.capture.steps import StepTracker

    for batch in batches:
        r = runner(batch)
        r.input_batch.num_computed_tokens_cpu += 4  # past the prompt: decode rows
        tracker = StepTracker(r)
        pos = r.input_batch.num_computed_tokens_cpu.copy()
        for _ in range(50):
            out = tracker.layout(batch, pos)
        assert out is not None and out.n_rows == batch
        c = time.thread_time()
        for _ in range(n):
            tracker.layout(batch, pos)
        print(f"layout decode batch={batch:3d}: {(time.thread_time() - c) / n * 1e6:.1f} us CPU "
              f"per step (load {os.getloadavg()[0]:.1f})", flush=True)


def bench_step_record(batches: list[int], n: int = 5000, rounds: int = 5) -> None:
    """Model-thread CPU of the process sender's `encode_step` (`SAFETY_MONITOR_SENDER=
    process`: one `STEP` record per decode step) for `batch` requests, each with a
    vLLM-shaped engine id and a correlation id; min over `rounds` of `n` calls."""
    from monitor.capture.sender import encode_step
    from monitor.capture.transport import HostRing, StepRecord

    ring = HostRing(2, 2, 8, 4, torch.float32)
    for batch in batches:
        rids = [f"chatcmpl-{i:032x}-{i:08x}" for i in range(batch)]
        rec = StepRecord(ring=ring, slot=0, step=1, plan_id="plan-0123456789abcdef",
                         model="m", points=(), n_rows=batch,
                         spans=[(r, 1, 100 + i, 90, 5) for i, r in enumerate(rids)],
                         max_frame_bytes=1 << 20,
                         labels={r: f"ticket-{i}" for i, r in enumerate(rids)})
        best = float("inf")
        for _ in range(rounds):
            c = time.thread_time()
            for _ in range(n):
                encode_step(1, rec)
            best = min(best, (time.thread_time() - c) / n)
        print(f"encode_step decode batch={batch:3d}: {best * 1e6:.1f} us CPU per step "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)


def _noop(hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
          meta: torch.Tensor, layer: int, site: int) -> None:
    """A plain Python function with the op's arguments (the floor of any Python kernel)."""


def bench_op_call(n: int = 20000, rounds: int = 5) -> None:
    """Model-thread CPU per call of the op itself, no sink, against a plain Python call and
    against nothing (eager dispatch, as the compiled graph's wrapper code calls it too)."""
    h, r = torch.randn(16, 576), torch.randn(16, 576)
    pos = torch.arange(16)
    meta = op.StaticBuffers(30).meta
    op.set_sink(None)
    arms = {
        "nothing": lambda: None,
        "python function call": lambda: _noop(h, r, pos, meta, 3, op.SITE_OUT),
        "op implementation, direct": lambda: op._capture_resid_impl(h, r, pos, meta, 3,
                                                                    op.SITE_OUT),
        "op via torch.ops (dispatcher)": lambda: torch.ops.safety_monitor.capture_resid.default(
            h, r, pos, meta, 3, op.SITE_OUT),
    }
    best = dict.fromkeys(arms, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):  # interleaved; the minimum over rounds is the least disturbed
            for name, fn in arms.items():
                for _ in range(200):
                    fn()
                c = time.thread_time()
                for _ in range(n):
                    fn()
                best[name] = min(best[name], (time.thread_time() - c) / n)
    for name, v in best.items():
        print(f"op call: {name:32s} {v * 1e6:6.2f} us CPU per call (min of {rounds} rounds of "
              f"{n}; load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--plan-layers", type=int, nargs="+", default=[3, 15])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=50, help="decode steps per rep")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--layout-only", action="store_true",
                    help="time StepTracker.layout alone (decode, batch 1/16/64)")
    ap.add_argument("--op-only", action="store_true",
                    help="CPU per call of the op alone (no sink) vs a Python call vs nothing")
    ap.add_argument("--step-record", action="store_true",
                    help="CPU of the process sender's STEP record (decode, batch 1/16/64/256)")
    args = ap.parse_args()
    if args.step_record:
        bench_step_record([1, 16, 64, 256])
        return
    if args.layout_only:
        bench_layout([1, 16, 64])
        return
    if args.op_only:
        torch.set_num_threads(args.threads)
        bench_op_call()
        return
    torch.set_num_threads(args.threads)
    d = args.d_model
    sink = CaptureSink(model=MODEL, d_model=d, layers=tuple(args.plan_layers)).start()
    Plan.from_proto(sink.plan)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, threads={args.threads}, "
          f"load {os.getloadavg()[0]:.1f} at start")
    rows_out = []
    for mode in args.modes:
        for batch in args.batch:
            torch._dynamo.reset()
            base = SyntheticDecoder(d, args.d_ff, args.layers)
            wrapped = SyntheticDecoder(d, args.d_ff, args.layers)
            captured = SyntheticDecoder(d, args.d_ff, args.layers)
            meta = op.StaticBuffers(args.layers).meta
            op.wrap_decoder_layers(wrapped.model.layers,
                                   {k: frozenset({op.SITE_OUT}) for k in args.plan_layers}, meta)
            sess, r = make_session(captured, sink, batch, d)
            fns = {"base": base, "op": wrapped, "capture": captured}
            if mode == "compiled":
                fns = {k: torch.compile(v) for k, v in fns.items()}
            x = torch.randn(batch, d)
            ib = r.input_batch

            def step(arm: str, fns: dict = fns, sess: CaptureSession = sess,
                     ib: SimpleNamespace = ib, x: torch.Tensor = x) -> None:
                pos = torch.from_numpy(ib.num_computed_tokens_cpu.copy())
                op.set_sink(sess if arm == "capture" else None)
                fns[arm](pos, x)
                op.set_sink(None)
                if arm == "capture":
                    ib.num_computed_tokens_cpu += 1

            t_c = time.perf_counter()
            with torch.no_grad():
                for arm in fns:  # warm-up (and compile)
                    for _ in range(3):
                        step(arm)
            compile_s = time.perf_counter() - t_c
            per: dict[str, list[float]] = {k: [] for k in fns}
            cpu: dict[str, list[float]] = {k: [] for k in fns}  # model thread CPU s/step
            pcpu: dict[str, list[float]] = {k: [] for k in fns}  # process CPU s/step
            prof = {k: 0 for k in op.PROF.as_dict()}  # capture arm only
            sent0 = sess.transport.sent_rows
            with torch.no_grad():
                for _ in range(args.reps):
                    for arm in fns:
                        op.PROF.reset()
                        t, c, pc = time.perf_counter(), time.thread_time(), time.process_time()
                        for _ in range(args.steps):
                            step(arm)
                        per[arm].append((time.perf_counter() - t) / args.steps)
                        cpu[arm].append((time.thread_time() - c) / args.steps)
                        pcpu[arm].append((time.process_time() - pc) / args.steps)
                        if arm == "capture":
                            for k, v in op.PROF.as_dict().items():
                                prof[k] += v
            t = time.monotonic()
            want = args.reps * args.steps * batch * len(args.plan_layers)
            while sess.transport.sent_rows - sent0 < want and time.monotonic() - t < 60:
                time.sleep(0.05)
            p = prof  # encode_* of the sender may trail: waited for all rows above
            for k in ("encode_steps", "encode_frames", "encode_ns"):
                p[k] = max(p[k], getattr(op.PROF, k))
            st = sess.transport.stats()
            sess._stop.set()
            sess.transport.close()
            sink.reset()
            med = {k: statistics.median(v) for k, v in per.items()}
            mcpu = {k: statistics.median(v) for k, v in cpu.items()}
            mpcpu = {k: statistics.median(v) for k, v in pcpu.items()}
            n_steps = args.reps * args.steps
            row = dict(
                mode=mode, batch=batch, compile_s=compile_s,
                base_ms=med["base"] * 1e3, op_ms=med["op"] * 1e3, cap_ms=med["capture"] * 1e3,
                base_cpu_ms=mcpu["base"] * 1e3, op_cpu_ms=mcpu["op"] * 1e3,
                cap_cpu_ms=mcpu["capture"] * 1e3, base_pcpu_ms=mpcpu["base"] * 1e3,
                cap_pcpu_ms=mpcpu["capture"] * 1e3,
                op_us_step=p["op_ns"] / 1e3 / max(1, n_steps),
                op_cpu_us_step=p["op_cpu_ns"] / 1e3 / max(1, n_steps),
                layout_us_step=p["layout_ns"] / 1e3 / max(1, p["layout_calls"]),
                encode_us_step=p["encode_ns"] / 1e3 / max(1, p["encode_steps"]),
                sent_rows=st["sent_rows"] - sent0, want_rows=want, dropped=st["dropped_rows"],
                load=os.getloadavg()[0])
            rows_out.append(row)
            print(f"{mode:8s} batch={batch:3d}: base {row['base_ms']:.2f} ms/step, op "
                  f"{row['op_ms']:.2f} ({row['op_ms'] / row['base_ms']:.3f}x), capture "
                  f"{row['cap_ms']:.2f} ({row['cap_ms'] / row['base_ms']:.3f}x); model-thread CPU"
                  f" ms/step base {row['base_cpu_ms']:.2f}, op {row['op_cpu_ms']:.2f} "
                  f"({row['op_cpu_ms'] / row['base_cpu_ms']:.3f}x), capture "
                  f"{row['cap_cpu_ms']:.2f} ({row['cap_cpu_ms'] / row['base_cpu_ms']:.3f}x); "
                  f"process CPU base {row['base_pcpu_ms']:.2f}, capture "
                  f"{row['cap_pcpu_ms']:.2f} ({row['cap_pcpu_ms'] / row['base_pcpu_ms']:.3f}x)"
                  f"; capture host "
                  f"time on the model thread {row['op_us_step']:.0f} us/step (CPU "
                  f"{row['op_cpu_us_step']:.0f}, layout "
                  f"{row['layout_us_step']:.0f}), sender encode {row['encode_us_step']:.0f} "
                  f"us/step; rows sent {row['sent_rows']}/{want}, dropped {row['dropped']}; "
                  f"load {row['load']:.1f}; warm-up+compile {compile_s:.0f}s", flush=True)
    sink.stop()


if __name__ == "__main__":
    main()
