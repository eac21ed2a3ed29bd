"""Fused SAE-subset scoring vs the naive full encode, on CPU or CUDA (issue 11's speed item).

    python3 bench/bench_sae_speed.py --device cuda --out DIR     # the GPU run (< 3 min)
    python3 bench/bench_sae_speed.py --device cpu --out DIR --rows 256 --reps 5
    TRITON_INTERPRET=1 python3 bench/bench_sae_speed.py --device cpu --out DIR --rows 1,17 \
        --d-models 64 --latents 1024 --reps 1          # a dry run of the triton path on CPU

Cases: d_model 576 and 4096, synthetic JumpReLU SAEs with 16384 and 65536 latents, 512
latents selected (every m/512-th), one sparse read-out over them plus one dense linear
probe (two detectors, the shape of a bundle with one SAE detector and one probe). Rows
``x [rows, d]`` are random; every case first checks that all paths agree.

Paths (same run, same device, same rows, interleaved repeats, median):

* ``fused``: the packed matrix the sidecar's scorer runs (``monitor.score.pack``:
  ``pack_layer`` of a real bundle written with ``write_bundle``), on the device:
  ``P = x · W + b`` with ``W [d, 512 + 1]``, ``Z = P · [P > θ]``,
  ``S = sigmoid(Z · R + c)``. On CPU this is exactly ``Scorer.score`` minus its numpy
  conversion; the script asserts it equals ``Scorer.score`` (CPU, fp32) on every case.
* ``naive``: the full encoder in plain torch — ``z = jumprelu((x − b_dec) · W_enc + b_enc)``
  over all ``m`` latents — then select the 512 columns, the read-out, and the probe as a
  separate GEMV: what a monitor without subset packing runs.
* ``sae_lens`` (only where ``sae_lens`` is importable): ``JumpReLUSAE.encode`` + select
  + read-out + probe.
* ``triton``: the same packed layer through the one fused Triton kernel
  (``monitor/score/triton_fused.py``: GEMM, mask epilogue, read-out, sigmoid in one launch,
  ``P`` never stored; IEEE fp32 unless torch allows TF32, bf16 with fp32 accumulation), at
  its default blocks and column split (``pick_split``: a second tiny launch sums the
  partials when few rows would leave SMs idle); ``triton[split1]``: the same, forced to one
  launch; ``--triton-blocks`` adds more block shapes as ``triton[BMxBNxBK]``.
  Only where triton imports and runs (CUDA, or CPU with ``TRITON_INTERPRET=1``); the
  reason is printed otherwise.
* ``gemm``: a bare ``torch.mm`` of the fused shape ``[rows, d] × [d, 513]``, the floor.

Targets from the issue: fused ≥ 100× the naive throughput at d 4096, and ≥ 80 % of the
bare GEMM. Output: ``DIR/sae_speed.json`` and ``DIR/sae_speed.md``; a summary on stdout.
Needs torch, numpy, safetensors (no vllm, no grpc, no network, nothing under ~/.cache);
triton for the ``triton`` path. ``--rows`` takes a list (default 1,64,4096 on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.score import Scorer, write_bundle
from monitor.score.pack import PackedLayer, pack_layer

N_SELECTED = 512
HOOK = "blocks.12.hook_resid_post"


def make_case(d: int, m: int, seed: int, tmp: Path) -> dict[str, Any]:
    """A synthetic JumpReLU SAE ``[d, m]``, the 512-latent bundle over it, its packing."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, m, generator=g) / d**0.5
    b_enc = 0.01 * torch.randn(m, generator=g)
    b_dec = 0.1 * torch.randn(d, generator=g)
    theta = torch.full((m,), 0.05)
    ids = list(range(0, m, m // N_SELECTED))[:N_SELECTED]
    idx = torch.tensor(ids)
    lw = torch.randn(len(ids), generator=g) / len(ids) ** 0.5
    probe_w = torch.randn(d, generator=g) / d**0.5
    tensors = {"sae.W_enc": W_enc[:, idx].contiguous(), "sae.b_enc": b_enc[idx].clone(),
               "sae.threshold": theta[idx].clone(), "sae.b_dec": b_dec.clone(),
               "probe.weight": probe_w.clone(), "probe.bias": torch.zeros(())}
    manifest = {
        "name": "bench-sae", "model": {"name": "m", "d_model": d, "n_layers": 64},
        "components": [
            {"name": "probe", "kind": "linear_probe", "layer": 12,
             "tensors": {"weight": "probe.weight", "bias": "probe.bias"}},
            {"name": "sae", "kind": "sae_latents", "layer": 12, "activation": "jumprelu",
             "latent_ids": ids, "preprocessing": {"apply_b_dec_to_input": True},
             "tensors": {r: f"sae.{r}" for r in ("W_enc", "b_enc", "threshold", "b_dec")}}],
        "detectors": [
            {"name": "p", "inputs": [{"component": "probe", "weight": 1.0}],
             "token_scope": "both", "default_thresholds": {"warn": 0.5}},
            {"name": "s", "inputs": [{"component": "sae", "latent_weights": lw.tolist()}],
             "token_scope": "both", "default_thresholds": {"warn": 0.5}}],
    }
    bundle = write_bundle(tmp, manifest, tensors)
    return {"bundle": bundle, "packed": pack_layer(bundle, HOOK), "W_enc": W_enc,
            "b_enc": b_enc, "b_dec": b_dec, "theta": theta, "idx": idx, "lw": lw,
            "probe_w": probe_w, "ids": ids}


class Fused:
    """``PackedLayer`` on a device: ``sigmoid((x·W + b) · [· > θ] · R + c)``.

    Only the column kinds of this bench (identity and jumprelu, no layer_norm, no gated
    columns): it refuses a packing that needs more, rather than compute something else.
    """

    def __init__(self, p: PackedLayer, device: torch.device, dtype: torch.dtype) -> None:
        if p.ln_cols is not None or p.mag_scale is not None:
            raise ValueError("bench fused path: layer_norm / gated columns not supported")
        self.Wt = p.W.t().contiguous().to(device, dtype)  # [n_cols, d]: F.linear layout
        self.b = p.b.to(device)
        self.theta = p.theta.to(device)
        self.R = p.R.to(device)
        self.c = p.c.to(device)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the scorer's "mask" epilogue (monitor/score/scorer.py): in place on the GEMM
        # output, the comparison written straight into a float buffer
        p = torch.mm(x.to(self.dtype), self.Wt.t()).float().add_(self.b)
        p.mul_(torch.gt(p, self.theta, out=torch.empty_like(p)))
        return torch.addmm(self.c, p, self.R).sigmoid_()


def triton_fns(p: PackedLayer, device: torch.device, dtype: torch.dtype,
               extra_blocks: list[tuple[int, int, int]]
               ) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], str]:
    """``{name: x -> scores}`` for the fused Triton kernel on ``p`` (default blocks, then
    each of ``extra_blocks``), or ``({}, why not)``."""
    try:
        from monitor.score import triton_fused as tf
    except ImportError as e:
        return {}, f"triton not importable ({e})"
    if device.type != "cuda" and not tf.interpreting():
        return {}, "triton runs on CUDA (or on CPU with TRITON_INTERPRET=1)"
    if p.ln_cols is not None or p.mag_scale is not None:
        return {}, "layer_norm / gated columns (not in the triton kernel)"
    Wt = p.W.t().contiguous().to(device, dtype)  # [n_cols, d]: the scorer's layout
    b, theta, c = p.b.to(device), p.theta.to(device), p.c.to(device)
    R = p.R.to(device)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "triton": partial(tf.fused_score, Wt=Wt, b=b, theta=theta, R=R, c=c,
                          epilogue="mask"),
        "triton[split1]": partial(tf.fused_score, Wt=Wt, b=b, theta=theta, R=R, c=c,
                                  epilogue="mask", split=1)}
    for bl in extra_blocks:
        fns["triton[{}x{}x{}]".format(*bl)] = partial(
            tf.fused_score, Wt=Wt, b=b, theta=theta, R=R, c=c, epilogue="mask", blocks=bl)
    return fns, ""


def naive_fn(c: dict[str, Any], device: torch.device, dtype: torch.dtype
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    W = c["W_enc"].to(device, dtype)
    b_enc, b_dec, theta = (c[k].to(device) for k in ("b_enc", "b_dec", "theta"))
    idx, lw, pw = c["idx"].to(device), c["lw"].to(device), c["probe_w"].to(device, dtype)

    def naive(x: torch.Tensor) -> torch.Tensor:
        h = torch.mm((x - b_dec).to(dtype), W).float() + b_enc  # [rows, m]: every latent
        z = torch.relu(h) * (h > theta)
        zs = z[:, idx]
        return torch.sigmoid(torch.stack([(x.to(dtype) @ pw).float(), zs @ lw], 1))

    return naive


def sae_lens_fn(c: dict[str, Any], device: torch.device
                ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import sae_lens
    except ImportError:
        return None
    d, m = c["W_enc"].shape
    theirs = sae_lens.SAE.from_dict({"architecture": "jumprelu", "d_in": d, "d_sae": m,
                                     "dtype": "float32", "device": str(device),
                                     "apply_b_dec_to_input": True})
    with torch.no_grad():
        theirs.W_enc.copy_(c["W_enc"])
        theirs.b_enc.copy_(c["b_enc"])
        theirs.b_dec.copy_(c["b_dec"])
        theirs.threshold.copy_(c["theta"])
        theirs.W_dec.copy_(c["W_enc"].t())
    idx, lw, pw = c["idx"].to(device), c["lw"].to(device), c["probe_w"].to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        z = theirs.encode(x)[:, idx]
        return torch.sigmoid(torch.stack([x @ pw, z @ lw], 1))

    return run


def timed(fns: Mapping[str, Callable[[], object]], reps: int, device: torch.device
          ) -> dict[str, float]:
    """Median milliseconds per call, repeats interleaved across ``fns``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for f in fns.values():  # warm-up (allocator, cuBLAS / oneDNN kernel choice)
        f()
        f()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON + table")
    ap.add_argument("--rows", default="",
                    help="rows per call, a comma list (default: 1,64,4096 on cuda, 256 on cpu)")
    ap.add_argument("--reps", type=int, default=0, help="default: 50 on cuda, 5 on cpu")
    ap.add_argument("--d-models", default="576,4096")
    ap.add_argument("--latents", default="16384,65536")
    ap.add_argument("--dtypes", default="", help="default: fp32,bf16 on cuda, fp32 on cpu")
    ap.add_argument("--triton-blocks", default="",
                    help="extra triton block shapes BMxBNxBK,... (powers of two >= 16)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; on a loaded shared CPU, 1 "
                         "avoids the spin-wait contention of a busy thread pool)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    row_counts = [int(v) for v in (args.rows or ("1,64,4096" if cuda else "256")).split(",")]
    extra_blocks: list[tuple[int, int, int]] = []
    for bl in filter(None, args.triton_blocks.split(",")):
        v = bl.split("x")
        if len(v) != 3 or not all(t.isdigit() for t in v):
            ap.error(f"--triton-blocks: expected BMxBNxBK,..., found {bl!r}")
        extra_blocks.append((int(v[0]), int(v[1]), int(v[2])))
    reps = args.reps or (50 if cuda else 5)
    dtypes = (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    load0 = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    skipped: list[str] = []  # why the triton path did not run, once each
    with tempfile.TemporaryDirectory() as tmp:
        for d in (int(v) for v in args.d_models.split(",")):
            for m in (int(v) for v in args.latents.split(",")):
                c = make_case(d, m, seed=d + m, tmp=Path(tmp) / f"b{d}_{m}")
                x_all = torch.randn(max(row_counts), d,
                                    generator=torch.Generator().manual_seed(1))
                # the bench's device path is the scorer's math: check on CPU, fp32
                want = Scorer(c["bundle"]).score(HOOK, x_all[:64])
                got = Fused(c["packed"], torch.device("cpu"), torch.float32)(x_all[:64])
                assert float(abs(got.numpy() - want).max()) < 1e-5
                for dt, rows in ((dt, r) for dt in dtypes for r in row_counts):
                    x = x_all[:rows].to(device)
                    fused = Fused(c["packed"], device, torch_dtype[dt])
                    naive = naive_fn(c, device, torch_dtype[dt])
                    Wt = fused.Wt
                    xd = x.to(torch_dtype[dt])
                    fns: dict[str, Callable[[], torch.Tensor]] = {
                        "fused": partial(fused, x), "naive": partial(naive, x),
                        "gemm": partial(torch.mm, xd, Wt.t())}
                    tri, why_not = triton_fns(c["packed"], device, torch_dtype[dt],
                                              extra_blocks)
                    fns.update({k: partial(f, xd) for k, f in tri.items()})
                    if why_not and why_not not in skipped:
                        skipped.append(why_not)
                        print(f"triton path skipped: {why_not}", flush=True)
                    sl = sae_lens_fn(c, device) if dt == "fp32" else None
                    if sl is not None:
                        fns["sae_lens"] = partial(sl, x)
                    with torch.no_grad():
                        outs = {k: f() for k, f in fns.items() if k != "gemm"}
                        tol = 2e-3 if dt == "fp32" else 3e-2
                        for k, o in outs.items():
                            err = float((o.float() - outs["naive"].float()).abs().max())
                            assert err < tol, f"{k} vs naive: {err} (d {d}, m {m}, {dt})"
                        ms = timed(fns, reps, device)
                    r = {"d_model": d, "d_sae": m, "selected": N_SELECTED, "dtype": dt,
                         "rows": rows, "ms": ms,
                         "rows_per_s": {k: rows / (v / 1e3) for k, v in ms.items()}}
                    r["fused_over_naive"] = ms["naive"] / ms["fused"]
                    r["fused_over_gemm"] = ms["gemm"] / ms["fused"]
                    for k in tri:
                        r[f"{k}_over_gemm"] = ms["gemm"] / ms[k]
                    if "sae_lens" in ms:
                        r["fused_over_sae_lens"] = ms["sae_lens"] / ms["fused"]
                    results.append(r)
                    print(f"d {d:5d} m {m:6d} {dt} rows {rows:5d}: fused {ms['fused']:.3f} "
                          f"ms, naive {ms['naive']:.3f} ms ({r['fused_over_naive']:.1f}x), "
                          f"gemm {ms['gemm']:.3f} ms (fused at {r['fused_over_gemm']:.2f} "
                          "of it)"
                          + "".join(f", {k} {ms[k]:.3f} ms ({r[f'{k}_over_gemm']:.2f} of "
                                    "gemm)" for k in tri)
                          + (f", sae-lens {ms['sae_lens']:.3f} ms" if "sae_lens" in ms else ""),
                          flush=True)
                del c
                if cuda:
                    torch.cuda.empty_cache()
    meta = {"command": "python3 bench/bench_sae_speed.py " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv),
            "started": started, "device": str(device), "machine": machine(device),
            "torch": torch.__version__, "triton": _triton_version(),
            "load_average_at_start": load0, "rows": row_counts, "reps": reps,
            "triton_skipped": skipped, "wall_s": round(time.perf_counter() - t_start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sae_speed.json").write_text(json.dumps({"meta": meta, "results": results},
                                                        indent=1) + "\n")
    tri_keys = sorted({k for r in results for k in r["ms"] if k.startswith("triton")},
                      key=lambda k: (k != "triton", k))
    lines = [f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, started {started}, load average {load0:.1f}; rows per call "
             f"{row_counts}, median of {reps} interleaved repeats; all paths agree before "
             "timing." + (f" Triton path skipped: {'; '.join(skipped)}." if skipped else ""),
             "",
             "| d_model | d_sae | selected | dtype | rows | fused ms | naive ms | sae-lens ms | "
             "GEMM ms | " + "".join(f"{k} ms | " for k in tri_keys)
             + "fused / naive | fused / GEMM | "
             + "".join(f"{k} / GEMM | " for k in tri_keys),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * (2 + 2 * len(tri_keys))]
    for r in results:
        ms = r["ms"]
        sl_ms = f"{ms['sae_lens']:.3f}" if "sae_lens" in ms else "—"
        lines.append(f"| {r['d_model']} | {r['d_sae']} | {r['selected']} | {r['dtype']} | "
                     f"{r['rows']} | {ms['fused']:.3f} | {ms['naive']:.3f} | {sl_ms} | "
                     f"{ms['gemm']:.3f} | "
                     + "".join(f"{ms[k]:.3f} | " if k in ms else "— | " for k in tri_keys)
                     + f"{r['fused_over_naive']:.1f}× | {r['fused_over_gemm']:.2f} | "
                     + "".join(f"{r[k + '_over_gemm']:.2f} | " if k in ms else "— | "
                               for k in tri_keys))
    lines = [ln.rstrip() for ln in lines]
    (args.out / "sae_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
