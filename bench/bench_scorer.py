"""Fused scorer vs the naive path vs a bare GEMM of the same shape (CPU, fp32 and bf16).

    python bench/bench_scorer.py --rows 256 --d-model 4096 --probes 8 --latents 512
    python bench/bench_scorer.py ... --write bench/RESULTS.md   # replace its "## Scorer"
    python bench/bench_scorer.py --backends [--write bench/RESULTS.md]
        # torch vs onnxruntime vs bare GEMM, d_model 576 and 4096, rows 1..4096, plus the
        # default bundle's cost per token and per 384-token prompt ("## Scorer backends")
    python bench/bench_scorer.py --targets --threads 1 --baseline REV [--write bench/RESULTS.md]
        # Scorer.score vs a bare GEMM of its shape (and the scorer at git REV), d_model 576
        # (synthetic, the default bundle's layers, the default SAE's 512 latents) and 4096
        # ("## Scorer vs bare GEMM")

Paths, all on the same random activations ``x [rows, d_model]``:

* fused:  ``Scorer.score`` on a bundle with ``probes`` standardised linear probes (one
  detector each) and ``latents`` selected jumprelu SAE latents (one detector reading all).
* naive:  full SAE encode over ``d_sae`` latents (``(x − b_dec)·W_enc + b_enc``, jumprelu),
  select the monitored latents, then each probe's ``predict`` on its own, then the
  read-out and sigmoid: what a monitor without packing would do.
* GEMM:   ``torch.mm`` of ``[rows, d_model] × [d_model, probes + latents]``, the floor.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.score import Bundle, Scorer, load_bundle, write_bundle
from monitor.score.onnx_export import export_onnx
from monitor.score.onnx_scorer import OnnxScorer

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timeit(fns: dict[str, tuple[Callable[[], object], int]]) -> dict[str, float]:
    """Median wall time in ms of each ``name: (fn, repeats)``, after one warm-up call.

    Calls are interleaved round-robin so that load from other processes on a shared
    machine hits every path alike.
    """
    return {name: statistics.median(v) for name, v in samples(fns).items()}


def samples(fns: dict[str, tuple[Callable[[], object], int]]) -> dict[str, list[float]]:
    """Wall times in ms of each ``name: (fn, repeats)`` (as :func:`timeit`), all of them."""
    for fn, _ in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(n for _, n in fns.values())):
        for name, (fn, n) in fns.items():
            if r < n:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def timeit_blocks(fns: dict[str, Callable[[], object]], reps: int,
                  rounds: int = 3) -> dict[str, float]:
    """Median wall time in ms of each path: ``rounds`` rounds, each path ``reps`` calls in
    a row (after one warm-up call per round), path order rotated between rounds.

    Blocks, not call-by-call interleaving: torch's OpenMP pool and onnxruntime's pool
    both spin-wait after a call, so alternating them call by call makes each pay for the
    other's spinning threads (measured: 10-100× slower small calls), which no sidecar sees
    (it runs one backend).
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            fn()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--naive-repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--write", type=Path, help="write the table under '## Scorer' in this file")
    ap.add_argument("--backends", action="store_true",
                    help="torch vs onnxruntime sweep (d_model 576, 4096; rows 1..4096)")
    ap.add_argument("--sweep-rows", default="1,16,128,384,1024,4096")
    ap.add_argument("--sweep-d-models", default="576,4096")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads, and onnxruntime's with --backends "
                         "(0: torch's default)")
    ap.add_argument("--baseline", default="",
                    help="--targets: also time the scorer of this git revision (the 'before' "
                         "of an A/B, same run)")
    ap.add_argument("--budget-ms", type=float, default=300.0,
                    help="--targets: ~GEMM milliseconds per path and shape (small shapes get "
                         "more calls)")
    ap.add_argument("--no-real", action="store_true",
                    help="--targets: synthetic shapes only (no default bundle / SAE)")
    ap.add_argument("--targets", action="store_true",
                    help="fused Scorer.score vs bare GEMM of the same shape (issue 9 targets: "
                         ">= 0.85 at d_model 576, >= 0.90 at 4096), --sweep-rows x "
                         "--sweep-d-models, interleaved call by call, --repeats calls each")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.backends:
        return backends(args)
    if args.targets:
        return targets(args)
    d, n_p, n_l, d_sae = args.d_model, args.probes, args.latents, args.d_sae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, d, generator=g)
    W_full = torch.randn(d, d_sae, generator=g) / d**0.5
    b_full = 0.1 * torch.randn(d_sae, generator=g)
    th_full = 0.5 * torch.rand(d_sae, generator=g)
    b_dec = 0.1 * torch.randn(d, generator=g)
    ids = torch.randperm(d_sae, generator=g)[:n_l].sort().values
    probes = [(torch.randn(d, generator=g) / d**0.5, 0.1 * torch.randn(d, generator=g),
               0.5 + torch.rand(d, generator=g), float(torch.randn(1, generator=g)))
              for _ in range(n_p)]
    lw = torch.randn(n_l, generator=g) / n_l**0.5

    tensors = {"sae.W_enc": W_full[:, ids], "sae.b_enc": b_full[ids],
               "sae.threshold": th_full[ids], "sae.b_dec": b_dec}
    comps, dets = [], []
    for i, (w, m, s, b) in enumerate(probes):
        tensors |= {f"p{i}.weight": w, f"p{i}.bias": torch.tensor(b), f"p{i}.mean": m,
                    f"p{i}.std": s}
        comps.append({"name": f"p{i}", "kind": "linear_probe", "layer": 0,
                      "tensors": {r: f"p{i}.{r}" for r in ("weight", "bias", "mean", "std")}})
        dets.append({"name": f"p{i}", "inputs": [{"component": f"p{i}", "weight": 1.0}],
                     "token_scope": "both", "default_thresholds": {"critical": 0.9}})
    comps.append({"name": "sae", "kind": "sae_latents", "layer": 0, "activation": "jumprelu",
                  "latent_ids": ids.tolist(), "preprocessing": {"apply_b_dec_to_input": True},
                  "tensors": {r: f"sae.{r}" for r in ("W_enc", "b_enc", "threshold", "b_dec")}})
    dets.append({"name": "sae", "inputs": [{"component": "sae", "latent_weights": lw.tolist()}],
                 "token_scope": "both", "default_thresholds": {"critical": 0.9}})
    manifest = {"name": "bench", "model": {"name": "bench", "d_model": d, "n_layers": 1},
                "components": comps, "detectors": dets}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(tmp, manifest, tensors)

    rows = []
    for name in args.dtypes.split(","):
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        xd = x.to(dt)
        scorer = Scorer(bundle, compute_dtype=dt)
        # F.linear layout ([out, in], read transposed) for all three: fastest for bf16 on CPU
        Wd, b_decd = W_full.t().contiguous().to(dt), b_dec.to(dt)
        probes_d = [(w.to(dt), m.to(dt), s.to(dt), b) for w, m, s, b in probes]
        W_bare = torch.randn(n_p + n_l, d, generator=g).to(dt)

        def naive(xd=xd, Wd=Wd, b_decd=b_decd, probes_d=probes_d) -> torch.Tensor:
            pre = torch.mm(xd - b_decd, Wd.t()).float() + b_full   # [rows, d_sae]
            z = torch.relu(pre) * (pre > th_full)
            sel = z[:, ids]                                         # monitored latents
            logits = [((xd - m) / s).float() @ w.float() + b for w, m, s, b in probes_d]
            logits.append(sel @ lw)
            return torch.sigmoid(torch.stack(logits, dim=1))

        ms = timeit({
            "fused": (partial(scorer.score, 0, xd), args.repeats),
            "naive": (naive, args.naive_repeats),
            "bare": (partial(torch.mm, xd, W_bare.t()), args.repeats),
        })
        fused_ms, naive_ms, bare_ms = ms["fused"], ms["naive"], ms["bare"]
        diff = float((torch.from_numpy(scorer.score(0, xd)) - naive()).abs().max())
        for path, t in (("fused scorer", fused_ms), ("naive (full SAE + per-probe)", naive_ms),
                        ("bare GEMM (same shape)", bare_ms)):
            rows.append(f"| {path} | {name} | {t:.2f} | {args.rows / t * 1e3:,.0f} "
                        f"| {t / fused_ms:.2f}× |")
        rows.append(f"| (max abs score diff fused vs naive: {diff:.1e}) | {name} | | | |")
        del Wd

    header = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}.",
        f"Shape: rows={args.rows}, d_model={d}, probes={n_p}, latents={n_l} "
        f"(fused/bare columns {n_p + n_l}), naive d_sae={d_sae}. "
        f"Median of {args.repeats} interleaved runs ({args.naive_repeats} for naive); "
        f"load average at start {os.getloadavg()[0]:.1f} (shared machine).",
        f"Command: `python bench/bench_scorer.py --rows {args.rows} --d-model {d} "
        f"--probes {n_p} --latents {n_l} --d-sae {d_sae} --dtypes {args.dtypes}"
        f" --threads {args.threads} --repeats {args.repeats} "
        f"--naive-repeats {args.naive_repeats}`",
        "",
        "| path | dtype | ms / call | rows / s | time vs fused |",
        "|---|---|---:|---:|---:|",
    ]
    table = "\n".join(header + rows)
    print(table)
    if args.write:
        write_section(args.write, "## Scorer", table)
    return 0


def bench_bundle(path: Path, d: int, n_p: int, n_l: int, seed: int = 0) -> Path:
    """``n_p`` standardised probes + ``n_l`` jumprelu SAE latents on layer 0, exported."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"sae.W_enc": torch.randn(d, n_l, generator=g) / d**0.5,
               "sae.b_enc": 0.1 * torch.randn(n_l, generator=g),
               "sae.threshold": 0.5 * torch.rand(n_l, generator=g),
               "sae.b_dec": 0.1 * torch.randn(d, generator=g)}
    comps: list[dict] = []
    dets: list[dict] = []
    for i in range(n_p):
        tensors |= {f"p{i}.weight": torch.randn(d, generator=g) / d**0.5,
                    f"p{i}.bias": torch.randn(1, generator=g)[0],
                    f"p{i}.mean": 0.1 * torch.randn(d, generator=g),
                    f"p{i}.std": 0.5 + torch.rand(d, generator=g)}
        comps.append({"name": f"p{i}", "kind": "linear_probe", "layer": 0,
                      "tensors": {r: f"p{i}.{r}" for r in ("weight", "bias", "mean", "std")}})
        dets.append({"name": f"p{i}", "inputs": [{"component": f"p{i}", "weight": 1.0}],
                     "token_scope": "both", "default_thresholds": {"critical": 0.9}})
    comps.append({"name": "sae", "kind": "sae_latents", "layer": 0, "activation": "jumprelu",
                  "latent_ids": list(range(n_l)), "preprocessing": {"apply_b_dec_to_input": True},
                  "tensors": {r: f"sae.{r}" for r in ("W_enc", "b_enc", "threshold", "b_dec")}})
    dets.append({"name": "sae", "inputs": [{"component": "sae",
                                            "latent_weights": [1.0 / n_l] * n_l}],
                 "token_scope": "both", "default_thresholds": {"critical": 0.9}})
    write_bundle(path, {"name": "bench", "model": {"name": "bench", "d_model": d,
                                                   "n_layers": 1},
                        "components": comps, "detectors": dets}, tensors)
    export_onnx(path)
    return path


def baseline_scorer(rev: str) -> type[Scorer]:
    """The ``Scorer`` class of ``monitor/score/scorer.py`` at git revision ``rev``, imported
    beside today's (same package, same pack.py/bundle.py): the "before" of an A/B in one
    process."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:monitor/score/scorer.py"],
                         check=True, capture_output=True, text=True).stdout
    name = f"monitor.score._scorer_at_{rev.replace('~', '_').replace('^', '_')}"
    mod = types.ModuleType(name)
    mod.__package__ = "monitor.score"
    mod.__file__ = f"<{rev}:monitor/score/scorer.py>"
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    cls: type[Scorer] = mod.Scorer
    return cls


def target_cases(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Bundle, str]]:
    """``(label, bundle, hook)`` per shape: at each ``--sweep-d-models``, ``--probes``
    probes + ``--latents`` synthetic latents; at 576 also the default bundle's hook points
    and the default SAE's 512-latent subset + one probe (``bench_sae.subset_bundle``)."""
    from bench.bench_sae import DEFAULT_SAE, subset_bundle
    from monitor.score.sae import load_saelens

    cases: list[tuple[str, Bundle, str]] = []
    for d in (int(v) for v in args.sweep_d_models.split(",")):
        b = load_bundle(bench_bundle(tmp / f"syn{d}", d, args.probes, args.latents))
        cases.append((f"synthetic {args.probes} probes + {args.latents} latents", b,
                      b.hook_names[0]))
        if d != 576 or args.no_real:
            continue
        default = load_bundle(REPO / "bundles/default")
        for hook in default.hook_names:
            kinds = sorted({c.kind for c in default.components_on(hook)})
            cases.append((f"default bundle {hook.split('.')[1]} ({', '.join(kinds)})",
                          default, hook))
        if (DEFAULT_SAE / "cfg.json").is_file():
            sae = load_saelens(DEFAULT_SAE)
            b, _, _, _ = subset_bundle(sae, list(range(0, sae.d_sae, 4))[:512],
                                           tmp / "sae512")
            cases.append(("default SAE 512 latents + 1 probe", b, b.hook_names[0]))
    return cases


def targets(args: argparse.Namespace) -> int:
    """Fused scorer (``Scorer.score``: GEMM + bias + epilogue + read-out + sigmoid, numpy
    out) vs a bare ``torch.mm`` into a preallocated output of the same ``[rows, d] x [d,
    cols]`` in the scorer's weight layout, and (``--baseline REV``) the scorer as it was at
    ``REV``; same process, calls interleaved (load hits every path alike), median.
    Ratio = GEMM time / fused time."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    goal = {576: 0.85, 4096: 0.90}
    old = baseline_scorer(args.baseline) if args.baseline else None
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    base_cols = " before ms | GEMM / before | same, fastest |" if old else ""
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, Python {platform.python_version()}; "
        f"started {started}, load average at start {load0[0]:.1f} / {load0[1]:.1f} / "
        f"{load0[2]:.1f} (1 / 5 / 15 min). fp32; median of interleaved calls per path "
        f"(at least {args.repeats}, more for small shapes: ~{args.budget_ms:.0f} ms of GEMM "
        "per path and shape); 'fastest calls': the same ratio from each path's fastest "
        "call (the least disturbed by other processes).",
        f"Command: `python bench/bench_scorer.py --targets --threads {args.threads} "
        f"--repeats {args.repeats} --sweep-rows {args.sweep_rows} "
        f"--sweep-d-models {args.sweep_d_models}"
        + (f" --baseline {args.baseline}`" if old else "`")
        + (f" (baseline `{args.baseline}` = "
           f"{_rev(args.baseline)})" if old else ""), "",
        f"| d_model | shape | cols | rows | fused ms | bare GEMM ms | GEMM / fused | "
        f"same, fastest calls |{base_cols} target (on the median) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if old else "") + "---|"]
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        for label, bundle, hook in target_cases(args, Path(tmp)):
            scorer = Scorer(bundle)
            before = old(bundle) if old else None
            kern = scorer._kernel(hook)
            # the GEMM gets its own copy of the weights: sharing the scorer's would find them
            # in cache right after the fused call read them (a memory-bound GEMV at 1 row)
            Wt, cols, d = kern.Wt.clone(), kern.packed.n_cols, bundle.d_model
            for rows in (int(v) for v in args.sweep_rows.split(",")):
                x = torch.randn(rows, d, generator=g)
                out = torch.empty(rows, cols)
                fns: dict[str, tuple[Callable[[], object], int]] = {}
                # enough calls for a stable median on small shapes: ~budget_ms per path
                est_ms = 2 * rows * d * cols / 50e9 * 1e3 + 0.02  # ~50 GFLOP/s + fixed
                n = max(args.repeats, min(2000, int(args.budget_ms / est_ms)))
                fns["fused"] = (partial(scorer.score, hook, x), n)
                fns["gemm"] = (partial(torch.mm, x, Wt.t(), out=out), n)
                if before is not None:
                    np.testing.assert_allclose(before.score(hook, x), scorer.score(hook, x),
                                               rtol=1e-5, atol=1e-6)
                    fns["before"] = (partial(before.score, hook, x), n)
                all_ms = samples(fns)
                t = {k: statistics.median(v) for k, v in all_ms.items()}
                r = t["gemm"] / t["fused"]
                r_min = min(all_ms["gemm"]) / min(all_ms["fused"])
                tgt = goal.get(d)
                mark = "-" if tgt is None else (f">= {tgt}: {'met' if r >= tgt else 'not met'}")
                extra = (f" {t['before']:.3f} | {t['gemm'] / t['before']:.3f} | "
                         f"{min(all_ms['gemm']) / min(all_ms['before']):.3f} |"
                         if before is not None else "")
                lines.append(f"| {d} | {label} | {cols} | {rows} | {t['fused']:.3f} | "
                             f"{t['gemm']:.3f} | {r:.3f} | {r_min:.3f} |{extra} {mark} |")
                print(lines[-1], flush=True)
    load1 = os.getloadavg()
    lines.append(f"\nLoad average at end {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}.")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "## Scorer vs bare GEMM", table)
    return 0


def _rev(rev: str) -> str:
    """``rev`` as a short hash and subject line, for the record."""
    out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s", rev],
                         capture_output=True, text=True)
    return out.stdout.strip()[:100] or rev


def backends(args: argparse.Namespace) -> int:
    """torch Scorer vs OnnxScorer vs bare torch.mm, same run, interleaved; fp32 input."""
    import onnxruntime as ort

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # onnxruntime gets the same intra-op thread count
    rows_list = [int(v) for v in args.sweep_rows.split(",")]
    n_cols = args.probes + args.latents
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, {threads} intra-op threads each, Python "
        f"{platform.python_version()}; load average at start {os.getloadavg()[0]:.1f} "
        "(shared machine). fp32 activations; median of 3 rounds of back-to-back calls per "
        "path (torch fused scorer, onnxruntime, bare `torch.mm` of the same "
        "`[rows, d_model] × [d_model, cols]`).",
        f"Command: `python bench/bench_scorer.py --backends --threads {threads} "
        f"--probes {args.probes} "
        f"--latents {args.latents} --sweep-rows {args.sweep_rows} "
        f"--sweep-d-models {args.sweep_d_models}`",
        "",
        "| d_model | cols | rows | torch ms | onnxruntime ms | bare GEMM ms | "
        "ort / torch | winner |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in (int(v) for v in args.sweep_d_models.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            bundle = load_bundle(bench_bundle(Path(tmp), d, args.probes, args.latents))
            t_s, o_s = Scorer(bundle), OnnxScorer(bundle, threads)
        W = torch.randn(n_cols, d)
        for rows in rows_list:
            x = torch.randn(rows, d)
            xn = x.numpy()
            reps = max(3, min(100, int(1e9 / (rows * d * n_cols + 1e6))))
            ms = timeit_blocks({"torch": partial(t_s.score, 0, x),
                                "ort": partial(o_s.score, 0, xn),
                                "bare": partial(torch.mm, x, W.t())}, reps)
            diff = float(abs(t_s.score(0, x) - o_s.score(0, xn)).max())
            assert diff < 1e-4, f"backends disagree by {diff}"
            ratio = ms["ort"] / ms["torch"]
            win = "onnxruntime" if ratio < 1 else "torch"
            lines.append(f"| {d} | {n_cols} | {rows} | {ms['torch']:.3f} | {ms['ort']:.3f} | "
                         f"{ms['bare']:.3f} | {ratio:.2f} | {win} "
                         f"({max(ratio, 1 / ratio):.2f}×) |")
            print(lines[-1], flush=True)
    lines += ["", *default_bundle_cost(threads)]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "## Scorer backends (torch vs onnxruntime)", table)
    return 0


def default_bundle_cost(threads: int, prompt: int = 384) -> list[str]:
    """Per-request cost of bundles/default: a ``prompt``-token prompt on every layer."""
    bundle = load_bundle(REPO / "bundles/default")
    ts, os_ = Scorer(bundle), OnnxScorer(bundle, threads)
    xs = {layer: torch.randn(prompt, bundle.d_model) for layer in bundle.layers}

    def run_torch() -> None:
        for layer, x in xs.items():
            ts.score(layer, x)

    def run_ort() -> None:
        for layer, x in xs.items():
            os_.score(layer, x.numpy())

    ms = timeit_blocks({"torch": run_torch, "ort": run_ort}, 70)
    out = [f"Default bundle ({bundle.name}: layers {list(bundle.layers)}, "
           f"{len(bundle.detectors)} detectors, d_model {bundle.d_model}), one "
           f"{prompt}-token prompt scored on every layer (median of 3 × 70):", "",
           "| backend | ms / request | µs / token |", "|---|---:|---:|"]
    for name, key in (("torch", "torch"), ("onnxruntime", "ort")):
        out.append(f"| {name} | {ms[key]:.3f} | {ms[key] * 1e3 / prompt:.2f} |")
    return out


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the ``heading`` section of a Markdown file, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    section = [heading, "", *body.splitlines(), ""]
    if start is None:
        lines = [*lines, "", *section] if lines and lines[-1] else [*lines, *section]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines = lines[:start] + section + lines[end:]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
