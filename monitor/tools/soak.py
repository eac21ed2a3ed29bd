"""Soak a running sidecar: steady traffic with broken streams, abandoned requests and churn.

Each of `--clients` client threads loops until `--seconds` pass: it opens a Stream (hello
with its own client id), sends frames at `--rate` frames/s for a few requests, and ends
the stream one of three ways, in rotation: a clean half-close after finishing its
requests; a half-close leaving requests unfinished (abandoned: the server finishes them
with reason `stream_closed`); or a broken call (cancelled mid-stream: the requests are
orphaned and swept after `--orphan-grace-s` on the server). Every `--sample-s` the tool
scrapes `/metrics` and the server's RSS (when `--pid` is given) and prints one line:

    t_s  rss_mib  live_requests  active_streams  queue_rows  rejected  unscored  dropped

    python -m monitor.tools.soak --target 127.0.0.1:50051 --metrics 127.0.0.1:9464 \\
        --pid $(pgrep -f 'safety-monitor serve') --seconds 600

`run_soak` returns the samples; `tests/test_soak.py` runs it for 40 s against a sidecar
with short TTLs and asserts RSS and live requests flat after warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import grpc
import numpy as np

from monitor.report.metrics import parse_exposition
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import Span, encode_frame

__all__ = ["Sample", "SoakConfig", "main", "run_soak"]


@dataclass(frozen=True)
class SoakConfig:
    """What the soak sends (see the module docstring)."""

    target: str
    """gRPC address of the sidecar."""
    metrics: str
    """host:port of its /metrics."""
    seconds: float = 60.0
    """Wall-clock duration."""
    clients: int = 4
    """Concurrent client threads."""
    rate: float = 20.0
    """Frames per second per client."""
    rows: int = 4
    """Rows per frame."""
    requests_per_stream: int = 3
    """Requests a stream carries before it ends."""
    frames_per_stream: int = 12
    """Frames a stream sends before it ends."""
    pid: int | None = None
    """Server process id (RSS sampling); None: RSS not sampled."""
    sample_s: float = 1.0
    """Sampling period."""


@dataclass(frozen=True)
class Sample:
    """One observation of the server."""

    t_s: float
    rss_mib: float  # nan without a pid
    live_requests: float
    active_streams: float
    queue_rows: float
    rejected: float  # frames_rejected_total, all reasons
    unscored: float  # rows_unscored_total, all reasons
    dropped: float  # verdicts_dropped_total


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _sample(cfg: SoakConfig, t0: float) -> Sample:
    with urllib.request.urlopen(f"http://{cfg.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    tot: dict[str, float] = {}
    for (name, _labels), v in parse_exposition(text).items():
        tot[name] = tot.get(name, 0.0) + v
    p = "safety_monitor_"
    return Sample(time.monotonic() - t0, _rss_mib(cfg.pid), tot.get(p + "active_requests", 0),
                  tot.get(p + "active_streams", 0), tot.get(p + "queue_depth_rows", 0),
                  tot.get(p + "frames_rejected_total", 0),
                  tot.get(p + "rows_unscored_total", 0),
                  tot.get(p + "verdicts_dropped_total", 0))


def _client(cfg: SoakConfig, plan: monitor_pb2.CapturePlan, idx: int, stop: threading.Event,
            errors: list[str]) -> None:
    channel = grpc.insecure_channel(cfg.target)
    stub = monitor_pb2_grpc.MonitorStub(channel)
    rng = np.random.default_rng(idx)
    layer = int(plan.layers[0])
    x = rng.standard_normal((cfg.rows, int(plan.d_model))).astype(np.float32)
    client_id = f"soak-{idx}-{uuid.uuid4().hex[:6]}"
    for n_stream in itertools.count():
        if stop.is_set():
            break
        mode = n_stream % 3  # 0 clean, 1 abandoned (half-close, unfinished), 2 broken
        rids = [f"r{n_stream}-{k}" for k in range(cfg.requests_per_stream)]
        pos = dict.fromkeys(rids, 0)
        cut = threading.Event()

        def msgs(rids: list[str] = rids, pos: dict[str, int] = pos, mode: int = mode,
                 cut: threading.Event = cut) -> Iterator[monitor_pb2.ClientMessage]:
            yield monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
                client_id=client_id, model=plan.model))
            for seq in range(1, cfg.frames_per_stream + 1):
                if stop.is_set():
                    break
                rid = rids[seq % len(rids)]
                yield monitor_pb2.ClientMessage(frame=encode_frame(
                    x, seq=seq, model=plan.model, layer=layer,
                    spans=[Span(rid, cfg.rows, pos[rid], 10**6)]))
                pos[rid] += cfg.rows
                time.sleep(1.0 / cfg.rate)
            if mode == 0:
                for rid in rids:
                    yield monitor_pb2.ClientMessage(
                        finished=monitor_pb2.RequestFinished(request_id=rid, reason="stop"))
            elif mode == 2:
                cut.set()  # the call is cancelled while this stream is still open
                stop.wait(5.0)

        call = stub.Stream(msgs(), timeout=120)
        if mode == 2:
            threading.Thread(target=lambda c=call, e=cut: e.wait(120) and c.cancel(),
                             daemon=True).start()
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"client {idx}: {e.code().name}: {e.details()}")
    channel.close()


def run_soak(cfg: SoakConfig, out: TextIO | None = sys.stdout) -> list[Sample]:
    """Run the soak; print one line per sample to `out` (None: quiet). Returns samples."""
    with grpc.insecure_channel(cfg.target) as ch:
        plan = monitor_pb2_grpc.MonitorStub(ch).GetCapturePlan(
            monitor_pb2.GetCapturePlanRequest(), timeout=30)
    stop = threading.Event()
    errors: list[str] = []
    threads = [threading.Thread(target=_client, args=(cfg, plan, i, stop, errors),
                                daemon=True) for i in range(cfg.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples: list[Sample] = []
    if out is not None:
        print("t_s\trss_mib\tlive\tstreams\tqueue\trejected\tunscored\tdropped", file=out)
    while time.monotonic() - t0 < cfg.seconds:
        time.sleep(cfg.sample_s)
        s = _sample(cfg, t0)
        samples.append(s)
        if out is not None:
            print(f"{s.t_s:.0f}\t{s.rss_mib:.1f}\t{s.live_requests:.0f}\t{s.active_streams:.0f}"
                  f"\t{s.queue_rows:.0f}\t{s.rejected:.0f}\t{s.unscored:.0f}\t{s.dropped:.0f}",
                  file=out, flush=True)
    stop.set()
    for t in threads:
        t.join(30)
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitor.tools.soak", description=__doc__)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--metrics", default="127.0.0.1:9464")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rate", type=float, default=20.0)
    args = ap.parse_args(argv)
    run_soak(SoakConfig(target=args.target, metrics=args.metrics, pid=args.pid,
                        seconds=args.seconds, clients=args.clients, rate=args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
