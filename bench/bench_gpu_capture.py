"""GPU checks of the capture design (issue 9, "GPU"): one command, < 3 minutes on an H100.

    python3 bench/bench_gpu_capture.py --device cuda --out DIR
    python3 bench/bench_gpu_capture.py --device cpu --out /tmp/g --small   # smoke test here

No vLLM (the synthetic decoder of `tests/synthetic_decoder.py`, vLLM's decoder-layer
calling convention). Five parts, each recorded in `DIR/results.json` and `DIR/results.md`:

1. graphs: graph count, FX nodes and graph breaks of `torch.compile` (counting backend)
   for the bare decoder, with the host-sink op `capture_resid` and with the graph-safe
   op `capture_static` wrapped around the plan layers.
2. rows: the rows each path captures equal an eager reference (resid_pre / resid_post
   computed layer by layer): eager and inductor with either op; on CUDA also inductor
   `mode="reduce-overhead"` (CUDA graphs via cudagraph trees) and a manual
   `torch.cuda.CUDAGraph` capture replayed on new inputs. For `capture_resid` under CUDA
   graphs it counts how often the host sink ran during replays (the reason the CUDA path
   needs the static op). Times one forward per path with and without the op.
3. projection: the in-worker projection GEMM `X · W` (`X [rows, d_model]`, `W` the
   default bundle's packed matrix at d_model 576, random `[4096, 520]` at 4096) on the
   device vs the CPU path: max error against a float64 reference and time per call.
4. d2h: copying captured rows from a static device buffer to the host: blocking
   `.cpu()` into pageable memory vs `copy_(non_blocking=True)` into a pinned buffer on a
   side stream with an event; host time the calling thread spends, end-to-end time, equality.
5. plugin: the plugin's static capture path end to end — `CaptureSession(static=True)`
   (layers wrapped with `capture_static`, `execute_model` wrapped: rows gathered after
   each step on a side stream into the pinned ring, the sender waiting on the event) over
   a stand-in runner (`fake_runner`: prefill, mixed, decode steps and one step without a
   forward), streaming over loopback gRPC to the recording sink of `tests/capture_sink.py`;
   on CUDA each forward is a replay of one `torch.cuda.CUDAGraph` captured at a fixed
   padded token count (as vLLM's). Checks that the sink received, per step and hook point,
   exactly the kept rows of an eager reference (positions, spans, values), and that the
   no-forward step was dropped and counted. Needs grpcio, not vLLM nor grpc_health.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from synthetic_decoder import SyntheticDecoder  # noqa: E402
from torch._dynamo.testing import CompileCounter  # noqa: E402

from monitor.capture.op import (  # noqa: E402
    SITE_IN,
    SITE_OUT,
    StaticBuffers,
    set_sink,
    wrap_decoder_layers,
)

Key = tuple[int, int]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    """Median ms per call (after 3 warm-up calls; synchronized on CUDA)."""
    for _ in range(3):
        fn()
    sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def reference(m: SyntheticDecoder, pos: torch.Tensor, x: torch.Tensor) -> dict[Key, torch.Tensor]:
    """resid_pre (SITE_IN) and resid_post (SITE_OUT) of every layer, eagerly, unwrapped."""
    out: dict[Key, torch.Tensor] = {}
    h, r = x, None
    for i, layer in enumerate(m.model.layers):
        out[(i, SITE_IN)] = (h if r is None else h + r).clone()
        h, r = layer(pos, h, r)
        out[(i, SITE_OUT)] = (h + r).clone()
    return out


class Rows:
    """Host sink for `capture_resid`: counts calls, keeps the last copy per (layer, site)."""

    def __init__(self) -> None:
        self.calls = 0
        self.got: dict[Key, torch.Tensor] = {}

    def on_layer(self, layer: int, site: int, hidden: torch.Tensor,
                 residual: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.calls += 1
        s = hidden if residual is None else hidden + residual
        self.got[(layer, site)] = s.detach().to("cpu")  # a host copy, as the plugin's ring


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def part_graphs(args: argparse.Namespace, dev: torch.device, wanted: dict[int, frozenset[int]]
                ) -> dict[str, Any]:
    res: dict[str, Any] = {}
    n = args.tokens
    for arm in ("bare", "capture_resid", "capture_static"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        m = SyntheticDecoder(args.d_model, args.d_ff, args.layers).to(dev)
        if arm == "capture_resid":
            wrap_decoder_layers(m.model.layers, wanted, StaticBuffers(args.layers, device=dev).meta)
        elif arm == "capture_static":
            b = StaticBuffers(args.layers, device=dev, n_plan_layers=n_sites(wanted),
                              max_num_tokens=n, d_model=args.d_model)
            wrap_decoder_layers(m.model.layers, wanted, b.meta, b)
        cnt = CompileCounter()
        f = torch.compile(m, backend=cnt)
        pos = torch.arange(n, device=dev)
        x = torch.randn(n, args.d_model, device=dev)
        with torch.no_grad():
            f(pos, x)
            f(pos, x)
        res[arm] = {"graphs": cnt.frame_count, "fx_nodes": cnt.op_count,
                    "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
    return res


def n_sites(wanted: dict[int, frozenset[int]]) -> int:
    return sum(len(s) for s in wanted.values())


def part_rows(args: argparse.Namespace, dev: torch.device, wanted: dict[int, frozenset[int]]
              ) -> dict[str, Any]:
    n, d = args.tokens, args.d_model
    keys = sorted((i, s) for i, ss in wanted.items() for s in ss)
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(n, device=dev)
    xs = [torch.randn(n, d, generator=g).to(dev) for _ in range(3)]
    base = SyntheticDecoder(d, args.d_ff, args.layers).to(dev)
    state = base.state_dict()
    with torch.no_grad():
        refs = [reference(base, pos, x) for x in xs]
    tol = 1e-3 if dev.type == "cuda" else 1e-4  # TF32 may be on for cuda matmuls
    out: dict[str, Any] = {"tokens": n, "keys": [list(k) for k in keys]}

    def fresh() -> SyntheticDecoder:
        m = SyntheticDecoder(d, args.d_ff, args.layers).to(dev)
        m.load_state_dict(state)
        return m

    def check_static(b: StaticBuffers, ref: dict[Key, torch.Tensor]) -> float:
        assert b.hidden is not None
        return max(max_err(b.hidden[b.slots[k], :n], ref[k]) for k in keys)

    def check_sink(s: Rows, ref: dict[Key, torch.Tensor]) -> float:
        if sorted(s.got) != keys:
            return float("inf")
        return max(max_err(s.got[k], ref[k]) for k in keys)

    modes: list[tuple[str, dict[str, Any]]] = [("eager", {}), ("inductor", {"backend": "inductor"})]
    if dev.type == "cuda":
        modes.append(("inductor_cudagraphs", {"backend": "inductor", "mode": "reduce-overhead"}))

    def one_path(mode: str, kw: dict[str, Any], arm: str) -> dict[str, Any]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        m = fresh()
        sink = Rows()
        b = StaticBuffers(args.layers, device=dev, n_plan_layers=n_sites(wanted),
                          max_num_tokens=n, d_model=d)
        if arm == "capture_resid":
            wrap_decoder_layers(m.model.layers, wanted, b.meta)
            set_sink(sink)
        elif arm == "capture_static":
            wrap_decoder_layers(m.model.layers, wanted, b.meta, b)
            for t in (b.hidden, b.positions, b.meta):  # fixed addresses: cudagraph-safe
                torch._dynamo.mark_static_address(t)
        f: Callable[..., torch.Tensor] = torch.compile(m, **kw) if kw else m
        errs: list[float] = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, x in enumerate(xs):  # 3 calls: compile/record, then replays
                calls0 = sink.calls
                f(pos, x)
                sync(dev)
                if arm == "capture_static":
                    errs.append(check_static(b, refs[i]))
                elif arm == "capture_resid":
                    errs.append(check_sink(sink, refs[i]) if sink.calls > calls0
                                else float("nan"))
            first_s = time.perf_counter() - t0
            xi = xs[0]
            ms = bench(partial(f, pos, xi), dev, args.reps)
        set_sink(None)
        row: dict[str, Any] = {"ms_per_forward": round(ms, 4),
                               "first_3_calls_s": round(first_s, 2),
                               "meta": b.meta.tolist()}
        if arm != "bare":
            row["max_err_per_call"] = errs
            row["rows_equal_eager"] = all(e <= tol for e in errs)
        if arm == "capture_resid":
            row["sink_calls"] = sink.calls
        skips = dict(torch._dynamo.utils.counters["inductor"])
        row["cudagraph_skips"] = {k: v for k, v in skips.items() if "cudagraph" in k}
        return row

    # first: a host sink failing under CUDA-graph capture (last below) must not disturb it
    if dev.type == "cuda":
        try:
            out["manual_cudagraph"] = manual_graph(args, dev, wanted, fresh, xs, refs,
                                                   check_static)
        except Exception as e:
            out["manual_cudagraph"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    for mode, kw in modes:
        for arm in ("bare", "capture_static", "capture_resid"):
            try:  # one path's failure (e.g. a host sink under CUDA graphs) is a result
                out[f"{mode}/{arm}"] = one_path(mode, kw, arm)
            except Exception as e:
                out[f"{mode}/{arm}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"rows {mode}/{arm}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            finally:
                set_sink(None)
                torch._dynamo.reset()
                if dev.type == "cuda":
                    from torch._inductor import cudagraph_trees
                    cudagraph_trees.reset_cudagraph_trees()
                    torch.cuda.synchronize(dev)

    torch._dynamo.reset()
    return out


def cuda_graph(m: SyntheticDecoder, pos: torch.Tensor, x: torch.Tensor, dev: torch.device
               ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`m(pos, x)` captured in a `torch.cuda.CUDAGraph` (after two warm-up calls on a side
    stream) and its static output; replaying it reads `pos` / `x` as they are then."""
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(2):
            m(pos, x)
    torch.cuda.current_stream(dev).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = m(pos, x)
    return graph, y


def manual_graph(args: argparse.Namespace, dev: torch.device, wanted: dict[int, frozenset[int]],
                 fresh: Callable[[], SyntheticDecoder], xs: list[torch.Tensor],
                 refs: list[dict[Key, torch.Tensor]],
                 check_static: Callable[[StaticBuffers, dict[Key, torch.Tensor]], float]
                 ) -> dict[str, Any]:
    """Capture one forward in a `torch.cuda.CUDAGraph` and replay it on each input
    (copied into the static input): the static op's rows must follow the new inputs."""
    n, d = args.tokens, args.d_model
    res: dict[str, Any] = {}
    for arm in ("bare", "capture_static"):
        m = fresh()
        b = StaticBuffers(args.layers, device=dev, n_plan_layers=n_sites(wanted),
                          max_num_tokens=n, d_model=d)
        if arm == "capture_static":
            wrap_decoder_layers(m.model.layers, wanted, b.meta, b)
        pos = torch.arange(n, device=dev)
        x_in = torch.zeros(n, d, device=dev)
        with torch.no_grad():
            graph, y = cuda_graph(m, pos, x_in, dev)
            meta0 = b.meta.clone()
            errs = []
            for i, x in enumerate(xs):
                x_in.copy_(x)
                graph.replay()
                sync(dev)
                if arm == "capture_static":
                    errs.append(check_static(b, refs[i]))
            ms = bench(graph.replay, dev, args.reps)
            y_err = max_err(y, refs[-1][(args.layers - 1, SITE_OUT)])  # y is from the last replay
        row: dict[str, Any] = {"ms_per_replay": round(ms, 4)}
        if arm == "capture_static":
            # replays bump meta on the device: the host can tell a fresh buffer from a stale one
            row["meta_bumps_over_replays"] = (b.meta - meta0).tolist()
            row["max_err_per_replay"] = errs
            row["rows_equal_eager"] = all(e <= 1e-3 for e in errs)
        row["output_max_err"] = y_err
        res[arm] = row
    return res


def part_projection(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    from monitor.score import load_bundle
    from monitor.score.pack import pack_bundle

    shapes: list[tuple[str, torch.Tensor]] = []
    for name in ("default", "sae-detector"):
        try:
            packed = pack_bundle(load_bundle(ROOT / "bundles" / name))
            for layer, p in sorted(packed.items()):
                shapes.append((f"{name} bundle layer {layer}", p.W))
        except Exception as e:  # the bundles are in the repo; report rather than crash
            print(f"projection: bundle {name} not used ({e})")
    g = torch.Generator().manual_seed(2)
    shapes.append(("random", torch.randn(args.big_d, args.big_k, generator=g) / 64))
    res: dict[str, Any] = {}
    for name, w in shapes:
        d, k = w.shape
        for rows in args.rows:
            x = torch.randn(rows, d, generator=g)
            ref = x.double() @ w.double()
            cpu_ms = bench(partial(torch.matmul, x, w), torch.device("cpu"), args.reps)
            row: dict[str, Any] = {"d_model": d, "k": k, "rows": rows,
                                   "cpu_fp32_ms": round(cpu_ms, 4),
                                   "cpu_fp32_max_err": max_err(x @ w, ref)}
            if dev.type == "cuda":
                for dt, name_dt in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                    xd, wd = x.to(dev, dt), w.to(dev, dt)
                    out = torch.empty(rows, k, device=dev, dtype=dt)  # preallocated output
                    ms = bench(partial(torch.mm, xd, wd, out=out), dev, args.reps)
                    torch.mm(xd, wd, out=out)
                    row[f"cuda_{name_dt}_ms"] = round(ms, 4)
                    # error relative to the output scale (bf16 inputs are rounded first)
                    row[f"cuda_{name_dt}_rel_err"] = max_err(out, ref) / float(ref.abs().max())
                    row[f"cuda_{name_dt}_bytes_out_per_row"] = k * out.element_size()
                row["bytes_in_per_row_bf16"] = d * 2
            res[f"{name} rows={rows}"] = row
    return res


def part_d2h(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if dev.type != "cuda":
        return {"skipped": "no CUDA device"}
    side = torch.cuda.Stream(dev)
    for d in (args.d_model, args.big_d):
        for rows in args.rows:
            buf = torch.randn(2, rows, d, device=dev).to(torch.bfloat16)  # 2 plan slots
            pinned = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            done = torch.cuda.Event()

            def blocking(buf: torch.Tensor = buf) -> torch.Tensor:
                return buf.cpu()

            def async_copy(buf: torch.Tensor = buf, pinned: torch.Tensor = pinned,
                           done: torch.cuda.Event = done) -> None:
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    pinned.copy_(buf, non_blocking=True)
                    done.record(side)

            def host_ms(fn: Callable[[], object]) -> float:
                ts = []
                for _ in range(args.reps):
                    sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                    sync(dev)
                return statistics.median(ts)

            def async_then_wait(async_copy: Callable[[], None] = async_copy,
                                done: torch.cuda.Event = done) -> None:
                async_copy()
                done.synchronize()

            blocking()
            async_then_wait()
            equal = bool(torch.equal(pinned, buf.cpu()))
            nbytes = buf.numel() * buf.element_size()
            e2e_async = bench(async_then_wait, dev, args.reps)
            res[f"d_model={d} rows={rows}"] = {
                "bytes": nbytes,
                "blocking_pageable_ms": round(bench(blocking, dev, args.reps), 4),
                "async_pinned_host_ms": round(host_ms(async_copy), 4),
                "async_pinned_e2e_ms": round(e2e_async, 4),
                "async_pinned_GBps": round(nbytes / e2e_async / 1e6, 2),
                "equal": equal,
            }
    return res


def part_plugin(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    from capture_sink import CaptureSink
    from synthetic_decoder import fake_runner

    from monitor.capture.config import CaptureConfig
    from monitor.capture.plugin import CaptureSession, plan_sites, wrap_execute_model
    from monitor.tools.launch import eventually

    n_pad, d, n_layers = args.tokens, args.d_model, args.layers
    mid, late = n_layers // 3, (2 * n_layers) // 3
    hooks = (f"blocks.{mid}.hook_resid_pre", f"blocks.{late}.hook_resid_post")
    plens = [5, 3, 4]
    # per step: (computed, rows) of r0..r2 (None: not scheduled), whether a forward runs
    steps: list[tuple[list[tuple[int, int] | None], bool]] = [
        ([(0, 3), (0, 3), None], True),     # prefill (r0 chunked)
        ([(3, 2), (3, 1), (0, 4)], True),   # mixed
        ([(5, 1), (4, 1), (4, 1)], False),  # no forward: dropped, counted
        ([(5, 1), (4, 1), (4, 1)], True),   # decode of three
        ([(6, 1), None, (5, 1)], True),     # r1 finished
    ]
    assert all(sum(cr[1] for cr in s if cr) <= n_pad for s, _ in steps), "--tokens too small"
    base = SyntheticDecoder(d, args.d_ff, n_layers).to(dev)
    m = SyntheticDecoder(d, args.d_ff, n_layers).to(dev)
    m.load_state_dict(base.state_dict())
    sink = CaptureSink(port=0, model="synthetic", d_model=d, hook_names=hooks).start()
    runner: Any = fake_runner([1], [0], [1])
    states: dict[str, Any] = {}
    cfg = CaptureConfig(addr=sink.addr, model="synthetic", ring_slots=len(steps),
                        queue_size=64, capture_path="static")
    s = CaptureSession(runner, cfg, model_name="synthetic", d_model=d, n_layers=n_layers,
                       max_rows=n_pad, static=True)
    g = torch.Generator().manual_seed(5)
    out: dict[str, Any] = {"hooks": list(hooks), "padded_tokens": n_pad}
    try:
        plan = s.transport.fetch_plan(20.0)
        assert plan is not None, "sink unreachable"
        s.wrap_layers(m.model.layers, plan_sites(plan.points), device=dev, dtype=torch.float32)
        s.start()  # the sender validates the plan, the model thread's first step installs it
        assert eventually(lambda: s.transport.connected, 30.0), "not connected"
        out["plan_deferred_to_model_thread"] = s._state is None and s._pending_plan is not None
        pos_in = torch.zeros(n_pad, dtype=torch.int64, device=dev)
        x_in = torch.zeros(n_pad, d, device=dev)
        graph = None
        if dev.type == "cuda":  # capture one padded forward, replayed at every step
            with torch.no_grad():
                graph = cuda_graph(m, pos_in, x_in, dev)[0]
        runs = [False]

        def execute_model() -> None:  # the runner's forward for this step (or none)
            if not runs[0]:
                return
            if graph is not None:
                graph.replay()
            else:
                with torch.no_grad():
                    m(pos_in, x_in)

        runner.execute_model = execute_model
        wrap_execute_model(runner, s)
        expect: dict[tuple[str, int, str, int], torch.Tensor] = {}  # (rid, pos, kind, layer)
        t0 = time.perf_counter()
        for sched, ok in steps:
            live = [(i, cr) for i, cr in enumerate(sched) if cr is not None]
            st = fake_runner([plens[i] for i, _ in live], [c for _, (c, _) in live],
                             [n for _, (_, n) in live])
            ids = [f"r{i}" for i, _ in live]
            st.input_batch.req_ids = ids
            runner.input_batch, runner.query_start_loc = st.input_batch, st.query_start_loc
            runner.requests = {rid: states.setdefault(rid, v)
                               for rid, v in zip(ids, st.requests.values(), strict=True)}
            pos = torch.cat([torch.arange(c, c + n) for _, (c, n) in live])
            n = int(pos.numel())
            x = torch.randn(n_pad, d, generator=g)
            pos_p = torch.cat([pos, torch.zeros(n_pad - n, dtype=torch.int64)])
            runs[0] = ok
            if ok:
                with torch.no_grad():
                    ref = reference(base, pos_p.to(dev), x.to(dev))
                row = 0
                for rid, (_, (c, k)) in zip(ids, live, strict=True):
                    for j in range(k):
                        expect[(rid, c + j, "resid_pre", mid)] = ref[(mid, SITE_IN)][row + j]
                        expect[(rid, c + j, "resid_post", late)] = ref[(late, SITE_OUT)][row + j]
                    row += k
            pos_in.copy_(pos_p)
            x_in.copy_(x)
            runner.execute_model()
        want = len(expect)
        got_all = eventually(lambda: sink.rows_received() >= want, 30.0)
        eventually(lambda: s.transport.stats()["dropped_frames"] >= len(hooks), 10.0)
        out["steps_s"] = round(time.perf_counter() - t0, 3)
        recv: dict[tuple[str, int, str, int], Any] = {}
        for layer, kind in ((mid, "resid_pre"), (late, "resid_post")):
            for rid, rows in sink.rows_by_request(layer, kind).items():
                for p, v in rows.items():
                    recv[(rid, p, kind, layer)] = v
        errs = [max_err(torch.from_numpy(recv[k]), v) for k, v in expect.items() if k in recv]
        st_ = s.stats()
        tol = 1e-3 if dev.type == "cuda" else 1e-5  # TF32 may be on for cuda matmuls
        out.update(
            rows_expected=want, rows_received=sink.rows_received(), all_arrived=got_all,
            missing=len(set(expect) - set(recv)), unexpected=len(set(recv) - set(expect)),
            max_err=max(errs) if errs else None,
            dropped_frames=st_["dropped_frames"], dropped_rows=st_["dropped_rows"],
            hook_errors=st_["hook_errors"], op_errors=st_["op_errors"],
            graph_replays=dev.type == "cuda")
        out["rows_equal_eager"] = bool(
            got_all and not out["missing"] and not out["unexpected"] and errs
            and max(errs) <= tol and st_["dropped_frames"] == len(hooks)
            and st_["dropped_rows"] == 3 * len(hooks) and not st_["hook_errors"])
    finally:
        s._stop.set()
        s.transport.close()
        sink.stop()
    return out


def to_markdown(r: dict[str, Any]) -> str:
    lines = [f"# bench_gpu_capture on {r['device_name']}", "",
             f"torch {r['torch']}, d_model {r['args']['d_model']}, layers {r['args']['layers']}, "
             f"tokens {r['args']['tokens']}, wall {r['wall_s']} s", "",
             "## Graphs (torch.compile, counting backend)", "",
             "| arm | graphs | FX nodes | breaks |", "|---|---|---|---|"]
    for arm, g in r.get("graphs", {}).items():
        lines.append(f"| {arm} | {g['graphs']} | {g['fx_nodes']} | {g['graph_breaks']} |")
    lines += ["", "## Rows captured vs eager reference", "",
              "| path | ms/forward | rows equal | max err | sink calls | cudagraph skips |",
              "|---|---|---|---|---|---|"]
    for k, v in r.get("rows", {}).items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"| {k} | failed: {v['error'][:160]} | | | | |")
            continue
        if not isinstance(v, dict) or "ms_per_forward" not in v:
            continue
        errs = v.get("max_err_per_call", [])
        lines.append(f"| {k} | {v['ms_per_forward']} | {v.get('rows_equal_eager', '-')} | "
                     f"{max(errs) if errs else '-'} | {v.get('sink_calls', '-')} | "
                     f"{v.get('cudagraph_skips') or '-'} |")
    for arm, v in r.get("rows", {}).get("manual_cudagraph", {}).items():
        if not isinstance(v, dict):
            lines.append(f"| manual CUDAGraph | failed: {str(v)[:160]} | | | | |")
            continue
        errs = v.get("max_err_per_replay", [])
        lines.append(f"| manual CUDAGraph/{arm} | {v['ms_per_replay']} | "
                     f"{v.get('rows_equal_eager', '-')} | {max(errs) if errs else '-'} | - | - |")
    lines += ["", "## Projection GEMM X·W", "",
              "| shape | CPU fp32 ms | CUDA fp32 ms | CUDA bf16 ms | CUDA bf16 rel err |",
              "|---|---|---|---|---|"]
    for k, v in r.get("projection", {}).items():
        lines.append(f"| {k} ({v['d_model']}x{v['k']}) | {v['cpu_fp32_ms']} | "
                     f"{v.get('cuda_fp32_ms', '-')} | {v.get('cuda_bf16_ms', '-')} | "
                     f"{v.get('cuda_bf16_rel_err', '-')} |")
    lines += ["", "## Device-to-host copy of captured rows (bf16, 2 slots)", ""]
    d2h = r.get("d2h", {"skipped": "not run"})
    if "skipped" in d2h:
        lines.append(f"skipped: {d2h['skipped']}")
    else:
        lines += ["| size | bytes | blocking .cpu() ms | async host ms | async e2e ms | GB/s "
                  "| equal |", "|---|---|---|---|---|---|---|"]
        for k, v in d2h.items():
            lines.append(f"| {k} | {v['bytes']} | {v['blocking_pageable_ms']} | "
                         f"{v['async_pinned_host_ms']} | {v['async_pinned_e2e_ms']} | "
                         f"{v['async_pinned_GBps']} | {v['equal']} |")
    p = r.get("plugin", {})
    lines += ["", "## Plugin static capture path (CaptureSession, fake runner, loopback gRPC)",
              ""]
    lines.append(", ".join(f"{k} {v}" for k, v in p.items()))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--big-d", type=int, default=4096)
    ap.add_argument("--big-k", type=int, default=520)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 4096])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--parts", nargs="+", default=["graphs", "rows", "projection", "d2h",
                                                   "plugin"])
    args = ap.parse_args()
    if args.small:
        args.d_model, args.d_ff, args.layers, args.tokens = 64, 128, 4, 8
        args.big_d, args.big_k, args.rows, args.reps = 256, 32, [1, 16], 5
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    # plan layers as the default bundle's (a middle and a late layer), input and output sites
    mid, late = args.layers // 3, (2 * args.layers) // 3
    wanted = {mid: frozenset({SITE_IN}), late: frozenset({SITE_IN, SITE_OUT})}
    t0 = time.perf_counter()
    r: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "host": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg(),
        "plan": {str(k): sorted(v) for k, v in wanted.items()},
    }
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("graphs", lambda: part_graphs(args, dev, wanted)),
        ("rows", lambda: part_rows(args, dev, wanted)),
        ("projection", lambda: part_projection(args, dev)),
        ("d2h", lambda: part_d2h(args, dev)),
        ("plugin", lambda: part_plugin(args, dev)),
    ]
    parts = [(name, fn) for name, fn in parts if name in args.parts]
    for name, fn in parts:
        t = time.perf_counter()
        try:
            r[name] = fn()
        except Exception as e:  # one failing part must not lose the others' results
            import traceback
            traceback.print_exc()
            r[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{name}] {time.perf_counter() - t:.1f} s", flush=True)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(r, indent=1, default=str))
    md = to_markdown(r) if all("error" not in r[p] for p, _ in parts) else json.dumps(
        r, indent=1, default=str)
    (args.out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
