"""In-worker projection vs hidden-state frames (issue 9): bytes per token and end-to-end cost.

One `safety-monitor serve --worker-projection` subprocess on loopback per bundle; both arms
on the same server, same rows, same spans, alternated (raw, projected, raw, projected; the
better of the two runs per arm is reported):

* raw: the plugin's frames today: `rows x d_model` bf16 hidden states per plan hook point;
* projected: what the plugin's sender thread sends with the plan's projections:
  `WorkerProjection.project(x)` float32 `rows x (n_cols [+1 var])` per hook point.

Reported per arm: payload bytes per token (all plan hook points), the client's cost per
frame on the sender thread (raw: encode + serialize; projected: project + encode +
serialize), and the sidecar's end-to-end ingest time (one Stream call: receive, decode,
queue, score, judge; ends when the server closed the call after the finals).

Usage: python bench/bench_projection.py [--rows 256 --frames 200]
Results are printed and written under "## In-worker projection" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_ingest import replace_section  # noqa: E402
from monitor.capture.projection import WorkerProjection  # noqa: E402
from monitor.score import build_placeholder_bundle  # noqa: E402
from monitor.tools.launch import SidecarServer, start_sidecar, stop  # noqa: E402
from monitor.tools.net import free_port  # noqa: E402
from monitor.v1 import monitor_pb2, monitor_pb2_grpc  # noqa: E402
from monitor.wire import Span, encode_frame  # noqa: E402
from monitor.wire.hooks import parse_hook_name  # noqa: E402


def _msgs(plan: monitor_pb2.CapturePlan, x: torch.Tensor, n: int, prefix: str,
          proj: dict[str, WorkerProjection] | None) -> list[monitor_pb2.ClientMessage]:
    """`n` frames alternating over the plan's hook points, 8 requests per frame."""
    hooks = list(plan.hook_names)
    rows = int(x.shape[0])
    per = max(1, rows // 8)
    data = {h: (x, "") if proj is None else (proj[h].project(x), proj[h].version)
            for h in hooks}
    out = []
    for i in range(n):
        h = hooks[i % len(hooks)]
        step = i // len(hooks)
        spans = [Span(f"{prefix}{step % 64}-{k}", min(per, rows - k * per), step * per, 0)
                 for k in range((rows + per - 1) // per)]
        d, version = data[h]
        out.append(monitor_pb2.ClientMessage(frame=encode_frame(
            d, seq=i + 1, model=plan.model, layer=parse_hook_name(h).layer, spans=spans,
            hook_name=h, projection=version)))
    return out


def _client_us(x: torch.Tensor, plan: monitor_pb2.CapturePlan,
               wp: WorkerProjection | None) -> float:
    """µs per frame on the sender thread: (project +) encode + serialize."""
    h = plan.hook_names[0]
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 1.0:
        d = x if wp is None else wp.project(x)
        encode_frame(d, seq=1, model=plan.model, layer=parse_hook_name(h).layer,
                     spans=[Span("a", int(x.shape[0]))], hook_name=h,
                     projection="" if wp is None else wp.version).SerializeToString()
        reps += 1
    return (time.perf_counter() - t0) / reps * 1e6


def run(bundle: Path, policy: Path | None, label: str, args: argparse.Namespace, work: Path
        ) -> list[dict[str, float | str]]:
    """Both arms against one sidecar on ``bundle`` (its log appended to work/sidecar.log)."""
    cfg = SidecarServer(
        bundle=bundle, port=free_port(), metrics_port=-1, log=work / "sidecar.log",
        append_log=True, log_level="warning", policy=policy, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), ready_timeout_s=120.0,
        extra_args=("--queue-rows", str(1 << 22), "--torch-threads", str(args.torch_threads),
                    "--worker-projection"))
    proc = start_sidecar(cfg)  # gRPC health SERVING
    try:
        ch = grpc.insecure_channel(cfg.target,
                                   options=[("grpc.max_send_message_length", 1 << 30),
                                            ("grpc.max_receive_message_length", 1 << 30)])
        stub = monitor_pb2_grpc.MonitorStub(ch)
        plan = stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=30)
        proj = {p.hook_name: WorkerProjection.from_proto(p, plan.d_model, "plan")
                for p in plan.projections}
        missing = set(plan.hook_names) - set(proj)
        if missing:
            raise SystemExit(f"{label}: hook points without projection: {sorted(missing)}")
        torch.manual_seed(0)
        x = torch.randn(args.rows, plan.d_model).to(torch.bfloat16)
        best: dict[str, float] = {}
        nbytes: dict[str, int] = {}
        for rep in range(2):
            for arm in ("raw", "projected"):
                msgs = _msgs(plan, x, args.frames, f"{arm}{rep}-",
                             None if arm == "raw" else proj)
                nbytes[arm] = sum(len(m.frame.data) for m in msgs)
                warm = _msgs(plan, x, len(plan.hook_names) * 2, f"warm-{arm}{rep}-",
                             None if arm == "raw" else proj)
                list(stub.Stream(iter(warm), timeout=120))
                t0 = time.perf_counter()
                out = list(stub.Stream(iter(msgs), timeout=600))
                wall = time.perf_counter() - t0
                errs = [m.error.reason for m in out if m.HasField("error")]
                if errs:
                    raise SystemExit(f"{label} {arm}: stream errors {sorted(set(errs))}")
                best[arm] = min(best.get(arm, float("inf")), wall)
        ch.close()
    finally:
        stop(proc, "the sidecar")
    n_hooks = len(plan.hook_names)
    n_tokens = args.frames * args.rows / n_hooks  # tokens: one row per plan hook point
    widths = {h: wp.width for h, wp in proj.items()}
    res = []
    for arm in ("raw", "projected"):
        res.append({
            "bundle": label, "d_model": plan.d_model, "hooks": len(plan.hook_names),
            "cols": "+".join(str(widths[h]) for h in plan.hook_names),
            "arm": arm, "bytes_per_token": nbytes[arm] / n_tokens,  # all hook points
            "client_us": _client_us(x, plan, None if arm == "raw"
                                    else proj[plan.hook_names[0]]),
            "wall_s": best[arm], "tokens_s": n_tokens / best[arm],
        })
    return res


def write_results(rows: list[dict[str, float | str]], args: argparse.Namespace,
                  path: Path) -> None:
    load = os.getloadavg()
    lines = [
        "## In-worker projection (`bench/bench_projection.py`, issue 9 session 4)",
        "",
        f"`nice -n 10 python bench/bench_projection.py --rows {args.rows} --frames "
        f"{args.frames}` on {platform.machine()} / {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
        f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end (host shared "
        "with other jobs). Both arms on one `serve --worker-projection --torch-threads 1` "
        "process, same rows (random bf16), alternated twice, the faster run per arm. "
        "`cols`: values per projected row per hook point (n_cols + var column). "
        "Bytes/token: payload over all plan hook points. Client µs/frame: the sender "
        f"thread's (projection +) encode + serialize of one {args.rows}-row frame of the "
        "first hook point, one torch thread. "
        "Tokens/s: end to end through the sidecar (receive, decode, score, judge).",
        "",
        "| bundle | d_model | hook points | cols | arm | bytes/token | client µs/frame "
        "| sidecar tokens/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bundle']} | {r['d_model']} | {r['hooks']} | {r['cols']} | {r['arm']} | "
            f"{r['bytes_per_token']:.0f} | {r['client_us']:.0f} | {r['tokens_s']:.0f} | "
            f"{r['wall_s']:.2f} |")
    replace_section(path, r"^## In-worker projection", "\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--d-model-synthetic", type=int, default=4096)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    # the client side stands for the plugin's sender thread: one torch thread (on this
    # shared 2-core host torch's 2-thread pool measured 10-100x slower per small GEMM)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-projection-"))
    d = args.d_model_synthetic
    build_placeholder_bundle(tmp / "synthetic", model_name="bench/synthetic", d_model=d,
                             n_layers=32, layers=[10, 16])
    default = REPO / "bundles" / "default"
    runs = [(default, default / "policy.suggested.yaml", "default (SmolLM2-135M)"),
            (tmp / "synthetic", None, f"synthetic placeholder d={d}")]
    results: list[dict[str, float | str]] = []
    for bundle, policy, label in runs:
        for r in run(bundle, policy if policy and policy.exists() else None, label, args, tmp):
            print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items()), flush=True)
            results.append(r)
    if not args.no_write:
        write_results(results, args, args.results)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
