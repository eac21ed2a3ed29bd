"""Cost of alert delivery on the scoring thread: `AlertDispatcher.escalation()` per call.

Three arms, interleaved in one run (same machine, same load):
- `none`: no sink configured (the baseline: building nothing, returning at once);
- `up`: a webhook on a loopback receiver answering 200, durable spool;
- `down`: a webhook on a closed port (connection refused), durable spool: every event is
  spooled (fsynced) by the sink's thread.

The number that matters is the caller's (scoring worker's) time per escalation: it must
not include HTTP or fsync. Also reported: events delivered / spooled at the end, so the
arms are seen doing their work.

    python bench/bench_alerts.py [--n 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry

from monitor.constants import RequestKey
from monitor.judge.tracker import VerdictUpdate
from monitor.report.sinks import AlertContext, AlertSinksConfig, make_dispatcher


def escalation(request_id: str) -> VerdictUpdate:
    """A critical escalation of a mode-alert detector, as the tracker makes it."""
    return VerdictUpdate(key=RequestKey("bench", request_id), detector="harmful_intent",
                         score=0.95, peak_score=0.95, severity="critical", threshold=0.9,
                         crossed_at_position=7, final=False, mode="alert",
                         policy_version="v1", n_tokens_scored=8, n_tokens_unscored=0,
                         escalated=True)


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="escalations per arm")
    args = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    ctx = AlertContext(model_name="m", bundle_name="b", bundle_sha256="0" * 64)
    tmp = tempfile.mkdtemp(prefix="bench-alerts-")
    arms = {
        "none": AlertSinksConfig(),
        "up": AlertSinksConfig(webhook_url=f"http://127.0.0.1:{srv.server_address[1]}/h",
                               spool_dir=os.path.join(tmp, "up")),
        "down": AlertSinksConfig(webhook_url=f"http://127.0.0.1:{closed_port()}/h",
                                 spool_dir=os.path.join(tmp, "down"), timeout_s=1.0),
    }
    disp = {k: make_dispatcher(c, ctx, CollectorRegistry()) for k, c in arms.items()}
    for d in disp.values():
        d.start()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(args.n):
        for k, d in disp.items():  # interleaved
            u = escalation(f"{k}-{i}")
            t0 = time.perf_counter()
            d.escalation(u)
            times[k].append(time.perf_counter() - t0)
    time.sleep(2.0)
    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()} / {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {load:.1f}; n={args.n} per arm")
    print("| arm | p50 µs / escalation | p99 µs | max µs | delivered | spooled now |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, d in disp.items():
        ts = sorted(times[k])
        p50 = statistics.median(ts) * 1e6
        p99 = ts[int(0.99 * (len(ts) - 1))] * 1e6
        delivered = sum(w.delivered for w in d.workers)
        spooled = sum(w.spool.events for w in d.workers)
        print(f"| {k} | {p50:.1f} | {p99:.1f} | {ts[-1] * 1e6:.0f} | {delivered} | "
              f"{spooled} |")
    for d in disp.values():
        d.stop()
    srv.shutdown()


if __name__ == "__main__":
    main()
