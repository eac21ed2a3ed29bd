"""Loopback gRPC ingest benchmark: frames/s, rows/s and MB/s through the real server.

Starts `safety-monitor serve` as a subprocess on loopback with a placeholder bundle,
streams `--frames` frames of `--rows` x `--d-model` activations (one layer, alternating
between the plan's layers, 8 requests per frame) on one Stream call, half-closes and
waits for the call to end — which the server does only after every queued frame has been
scored and the final verdicts were sent — so the time covers receive + decode +
validate + queue + score + judge. Baselines measured in the same run, same process:
`decode_frame` alone (validation + zero-copy view + finiteness check) and
`encode_frame` + `SerializeToString` (client-side cost).

`--transport grpc shm` adds the same-pod shared-memory ring arm against the same server
process (started with `--shm`), right after the gRPC arm: the client offers a ring in
`/dev/shm` (`monitor.wire.shm.ShmRingWriter`, 16 slots of one frame each), waits for the
server's accept, then per frame copies the rows into a free slot (waiting for the
server's slot acks when all 16 are in flight, as the plugin would drop instead) and sends
the frame's metadata with `ShmRef`; the time includes that copy (the gRPC arm's frames are
encoded before its clock starts).

Usage: python bench/bench_ingest.py [--rows 256 --d-model 576 --frames 400 --dtype bf16
                                     --transport grpc shm]
Results are printed and written under "## Ingest" in bench/RESULTS.md (other headings
are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monitor.score import build_placeholder_bundle  # noqa: E402
from monitor.tools.launch import (  # noqa: E402
    SidecarServer,
    process_cpu_s,
    start_sidecar,
    stop,
)
from monitor.tools.net import free_port  # noqa: E402
from monitor.v1 import monitor_pb2, monitor_pb2_grpc  # noqa: E402
from monitor.wire import Span, decode_frame, encode_frame  # noqa: E402
from monitor.wire.shm import ShmRingWriter  # noqa: E402

MODEL = "bench/model"
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _frames(n: int, rows: int, d: int, dtype: torch.dtype, layers: list[int],
            prefix: str = "r", shm: bool = False) -> list[monitor_pb2.ClientMessage]:
    """`n` frames of the same random rows; `shm`: metadata only (empty `data`, an `ShmRef`
    the sender fills in)."""
    base = torch.randn(rows, d).to(dtype)
    per = max(1, rows // 8)
    out = []
    for i in range(n):
        spans = [Span(f"{prefix}{(i // len(layers)) % 64}-{k}", min(per, rows - k * per),
                      (i // len(layers)) * per, 0)
                 for k in range((rows + per - 1) // per)]
        out.append(monitor_pb2.ClientMessage(frame=encode_frame(
            base, seq=i + 1, model=MODEL, layer=layers[i % len(layers)], spans=spans,
            shm=monitor_pb2.ShmRef() if shm else None)))
    return out


def _errors(arm: str, wall: float, out: list[monitor_pb2.ServerMessage]
            ) -> tuple[float, int, int]:
    """(wall, frames shed as queue_full, other stream errors) of one arm; errors printed."""
    errs = [m.error for m in out if m.HasField("error")]
    if errs:
        print(f"{arm} stream errors:", sorted({f"{e.reason}: {e.message}" for e in errs})[:5],
              file=sys.stderr)
    shed = sum(1 for e in errs if e.reason == "queue_full")
    return wall, shed, len(errs) - shed


def shm_stream(stub: monitor_pb2_grpc.MonitorStub, shm_dir: Path,
               msgs: list[monitor_pb2.ClientMessage], payload: torch.Tensor,
               n_slots: int = 16) -> tuple[float, list[monitor_pb2.ServerMessage]]:
    """One Stream whose frames' bytes go through a ring: (seconds from the accept to the
    end of the call, server messages). `payload` is every frame's rows."""
    data = payload.contiguous().view(torch.uint8).numpy().reshape(-1)
    ring = ShmRingWriter(shm_dir, n_slots, data.nbytes)
    accepted = threading.Event()
    freed = threading.Condition()
    t0 = [0.0]

    def outbound() -> Iterator[monitor_pb2.ClientMessage]:
        yield monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
            client_id="bench-shm", model=MODEL, wire_version=2, shm_ring=ring.hello()))
        if not accepted.wait(60):
            raise RuntimeError("the server did not accept the ring")
        t0[0] = time.perf_counter()
        for m in msgs:
            slot = ring.acquire()
            while slot is None:
                with freed:
                    freed.wait(0.01)
                slot = ring.acquire()
            seq = ring.write(slot, data)
            m.frame.shm.slot, m.frame.shm.sequence = slot, seq
            m.frame.shm.byte_length = data.nbytes
            yield m

    out = []
    try:
        for r in stub.Stream(outbound(), timeout=600):
            if r.HasField("shm_ack"):
                if r.shm_ack.HasField("ring"):
                    if not r.shm_ack.ring.accepted:
                        raise RuntimeError(f"ring refused: {r.shm_ack.ring.reason}")
                    accepted.set()
                for slot, seq in zip(r.shm_ack.slots, r.shm_ack.sequences, strict=True):
                    ring.release(slot, seq)
                with freed:
                    freed.notify()
                continue
            out.append(r)
        return time.perf_counter() - t0[0], out
    finally:
        ring.close()


def bench_decode(msgs: list[monitor_pb2.ClientMessage], d: int, layers: list[int]) -> float:
    """Seconds per frame of decode_frame alone (after a parse from bytes, as gRPC does)."""
    wire = [m.SerializeToString() for m in msgs[:50]]
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 1.0:
        for w in wire:
            m = monitor_pb2.ClientMessage.FromString(w)
            decode_frame(m.frame, model=MODEL, d_model=d, layers=frozenset(layers),
                         max_frame_bytes=1 << 30)
            reps += 1
    return (time.perf_counter() - t0) / reps


def bench_encode(rows: int, d: int, dtype: torch.dtype) -> float:
    """Seconds per frame of encode_frame + SerializeToString on the client side."""
    x = torch.randn(rows, d).to(dtype)
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 1.0:
        encode_frame(x, seq=1, model=MODEL, layer=0, spans=[Span("a", rows)]).SerializeToString()
        reps += 1
    return (time.perf_counter() - t0) / reps


def run(args: argparse.Namespace) -> dict[str, float | str]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    layers = [args.n_layers // 3, args.n_layers // 2]
    build_placeholder_bundle(tmp / "bundle", model_name=MODEL, d_model=args.d_model,
                             n_layers=args.n_layers, layers=layers)
    dtype = DT[args.dtype]
    msgs = _frames(args.frames, args.rows, args.d_model, dtype, layers)
    frame_bytes = len(msgs[0].frame.data)
    shm_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-shm-",
                                    dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    use_shm = "shm" in args.transport
    cfg = SidecarServer(
        bundle=tmp / "bundle", port=free_port(), metrics_port=-1, log=tmp / "sidecar.log",
        log_level="warning", cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        ready_timeout_s=120.0,
        extra_args=("--queue-rows", str(args.queue_rows), "--compute-dtype",
                    args.compute_dtype, "--torch-threads", str(args.torch_threads),
                    *(["--shm", "--shm-dir", str(shm_dir)] if use_shm else [])))
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_sidecar(cfg)  # gRPC health SERVING
        ch = grpc.insecure_channel(cfg.target,
                                   options=[("grpc.max_send_message_length", 1 << 30)])
        stub = monitor_pb2_grpc.MonitorStub(ch)
        warm = _frames(8, args.rows, args.d_model, dtype, layers, prefix="warm")
        list(stub.Stream(iter(warm), timeout=120))  # warm the scorer

        def grpc_arm() -> tuple[float, list[monitor_pb2.ServerMessage]]:
            t0 = time.perf_counter()
            out = list(stub.Stream(iter(msgs), timeout=600))
            return time.perf_counter() - t0, out

        def shm_arm() -> tuple[float, list[monitor_pb2.ServerMessage]]:
            shm_msgs = _frames(args.frames, args.rows, args.d_model, dtype, layers,
                               prefix="s", shm=True)
            payload = torch.randn(args.rows, args.d_model).to(dtype)
            return shm_stream(stub, shm_dir, shm_msgs, payload)

        # the arms run in the order --transport names them (gRPC always runs); CPU seconds
        # of the server process and of this client process (all threads) per arm
        order = list(dict.fromkeys([*args.transport, "grpc"]))
        res = {}
        cpu: dict[str, tuple[float, float]] = {}
        for arm in order:
            s0, c0 = process_cpu_s(proc.pid), time.process_time()
            res[arm] = _errors(arm, *(grpc_arm if arm == "grpc" else shm_arm)())
            cpu[arm] = (process_cpu_s(proc.pid) - s0, time.process_time() - c0)
        wall, shed, other = res["grpc"]
        shm_wall, shm_shed, shm_other = res.get("shm", (0.0, 0, 0))
        ch.close()
    finally:
        stop(proc, "the sidecar")
        for f in shm_dir.iterdir():
            f.unlink()
        shm_dir.rmdir()
    dec = bench_decode(msgs, args.d_model, layers)
    enc = bench_encode(args.rows, args.d_model, dtype)
    n_ok = args.frames - shed
    mb = frame_bytes / 1e6
    shm: dict[str, float | str] = {}
    if use_shm:
        n_shm = args.frames - shm_shed
        shm = {"shm_shed": shm_shed, "shm_errors": shm_other, "shm_wall_s": shm_wall,
               "shm_mb_s": n_shm * mb / shm_wall, "shm_rows_s": n_shm * args.rows / shm_wall,
               "shm_frames_s": n_shm / shm_wall,
               "shm_server_cpu_s": cpu["shm"][0], "shm_client_cpu_s": cpu["shm"][1]}
    return {
        "frame": f"{args.rows} x {args.d_model} {args.dtype} ({frame_bytes / 1024:.0f} KiB)",
        "frames": args.frames, "shed": shed, "errors": other, "wall_s": wall,
        "grpc_mb_s": n_ok * mb / wall, "grpc_rows_s": n_ok * args.rows / wall,
        "grpc_frames_s": n_ok / wall,
        "decode_us": dec * 1e6, "decode_mb_s": mb / dec, "decode_rows_s": args.rows / dec,
        "encode_us": enc * 1e6, "encode_mb_s": mb / enc,
        "compute_dtype": args.compute_dtype,
        "threads": str(args.torch_threads or "default"),
        "grpc_server_cpu_s": cpu["grpc"][0], "grpc_client_cpu_s": cpu["grpc"][1],
        **shm,
    }


def write_results(rows: list[dict[str, float | str]], path: Path) -> None:
    lines = [
        "## Ingest",
        "",
        f"`python bench/bench_ingest.py` on {platform.machine()} / {os.cpu_count()} cores, "
        f"torch {torch.__version__}, grpcio {grpc.__version__}, {time.strftime('%Y-%m-%d')}.",
        "Loopback gRPC: one Stream, client and server on the same host; time ends when "
        "the server has scored every frame and closed the call. Decode / encode: same "
        "run, in-process baselines (decode = parse + `decode_frame`, incl. finiteness "
        "check). The host was shared with other jobs (load average ~6 on 2 cores), so "
        "absolute numbers are pessimistic; one scorer thread (`--torch-threads 1`) avoids "
        "torch thread-pool contention with the gRPC threads on small hosts.",
        "",
        "| frame | scorer (torch threads) | gRPC MB/s | gRPC rows/s | frames/s | shed "
        "| decode µs/frame | decode MB/s | encode MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frame']} | {r['compute_dtype']} ({r['threads']}) | {r['grpc_mb_s']:.0f} | "
            f"{r['grpc_rows_s']:.0f} | {r['grpc_frames_s']:.0f} | {r['shed']} | "
            f"{r['decode_us']:.0f} | {r['decode_mb_s']:.0f} | {r['encode_mb_s']:.0f} |")
    replace_section(path, r"^## Ingest\n", "\n".join(lines) + "\n")


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the `## ...` section of `path` whose heading matches regex `heading` (up
    to the next `## `) with `section`, or append it; other sections are kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pat = re.compile(heading + r".*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 256, 2048])
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--n-layers", type=int, default=30)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--dtype", choices=sorted(DT), default="bf16")
    p.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 0],
                   help="server scorer torch threads to try (0: torch default)")
    p.add_argument("--queue-rows", type=int, default=1 << 20)
    p.add_argument("--transport", nargs="+", choices=("grpc", "shm"), default=["grpc"],
                   help="arms: grpc (bytes in frames) always; shm adds the shared-memory "
                        "ring arm on the same server")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    results = []
    for rows, threads in [(r, t) for t in args.torch_threads for r in args.rows]:
        a = argparse.Namespace(**{**vars(args), "rows": rows, "torch_threads": threads})
        r = run(a)
        print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()), flush=True)
        results.append(r)
    if not args.no_write:
        write_results(results, args.results)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
