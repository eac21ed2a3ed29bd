"""Fused scorer on real SAE subsets vs sae-lens's full encode + select + probe (CPU, fp32).

    python bench/bench_sae.py                                # default SAE + 4096 shapes
    python bench/bench_sae.py --write bench/RESULTS.md      # replace its "## SAE" section

Shapes (same run, same random rows ``x [rows, d_model]``, interleaved timing):

* d_model 576: the default model's SAE (``bundles/sae/smollm2-135m-l18``, 2048
  latents) — the 16-latent harmful_intent detector plus a dense probe — and a 512-latent
  subset of it;
* d_model 4096, synthetic Gemma-Scope-sized JumpReLU SAEs with 16384 and 65536 latents,
  512 selected, plus one dense probe.

Paths:

* fused: ``Scorer.score`` on a bundle with the selected latents (one jumprelu component)
  and the probe, one GEMM ``[rows, d] × [d, n_sel + 1]``;
* sae-lens: ``sae_lens`` ``JumpReLUSAE.encode`` over all latents, select the columns,
  the read-out, and the probe separately: what a monitor without subset packing runs;
* GEMM: ``torch.mm`` of the fused shape, the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scorer import cpu_model, samples, write_section
from monitor.score import Bundle, Scorer, write_bundle
from monitor.score.sae import SAE, load_saelens
from monitor.score.sae.model import gather

DEFAULT_SAE = Path(__file__).resolve().parents[1] / "bundles" / "sae" / "smollm2-135m-l18"


def synthetic_sae(d: int, m: int, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, m, generator=g) / d**0.5
    from monitor.score.kinds import Preprocessing

    return SAE(architecture="jumprelu", d_in=d, d_sae=m, d_out=d,
               hook_name="blocks.12.hook_resid_post", model_name="synthetic",
               params={"W_enc": W, "b_enc": torch.zeros(m), "W_dec": W.t().contiguous(),
                       "b_dec": torch.randn(d, generator=g) * 0.1,
                       "threshold": torch.full((m,), 0.05)},
               preprocessing=Preprocessing(apply_b_dec_to_input=True))


def subset_bundle(sae: SAE, ids: list[int], tmp: Path, seed: int = 1
                  ) -> tuple[Bundle, int, torch.Tensor, torch.Tensor]:
    """A bundle with ``sae``'s latents ``ids`` (one jumprelu component, one read-out
    detector) and one dense probe on the same layer: ``(bundle, layer, probe_w [d],
    lw [len(ids)])``."""
    d = sae.d_in
    g = torch.Generator().manual_seed(seed)
    comp = sae.component("sae", ids, d_model=d)
    tensors = sae.component_tensors(comp)
    probe_w = torch.randn(d, generator=g) / d**0.5
    tensors.update({"probe.weight": probe_w, "probe.bias": torch.zeros(())})
    lw = torch.randn(len(ids), generator=g) / len(ids)
    manifest = {
        "name": "bench", "model": {"name": "m", "d_model": d, "n_layers": 64},
        "components": [
            {"name": "probe", "kind": "linear_probe", "layer": comp.layer,
             "tensors": {"weight": "probe.weight", "bias": "probe.bias"}},
            {"name": "sae", "kind": "sae_latents", "layer": comp.layer,
             "activation": "jumprelu", "latent_ids": ids,
             "preprocessing": {"apply_b_dec_to_input": True},
             "tensors": {r: f"sae.{r}" for r in comp.tensors}}],
        "detectors": [
            {"name": "p", "inputs": [{"component": "probe", "weight": 1.0}],
             "token_scope": "both", "default_thresholds": {"warn": 0.5}},
            {"name": "s", "inputs": [{"component": "sae", "latent_weights": lw.tolist()}],
             "token_scope": "both", "default_thresholds": {"warn": 0.5}}],
    }
    return write_bundle(tmp, manifest, tensors), comp.layer, probe_w, lw


def case(sae: SAE, ids: list[int], rows: int, reps: int, tmp: Path) -> dict[str, float]:
    import sae_lens

    d = sae.d_in
    bundle, layer, probe_w, lw = subset_bundle(sae, ids, tmp)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(2))
    scorer = Scorer(bundle)
    theirs = sae_lens.SAE.from_dict({"architecture": "jumprelu", "d_in": d,
                                     "d_sae": sae.d_sae, "dtype": "float32",
                                     "apply_b_dec_to_input": True})
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            getattr(theirs, name).copy_(sae.params[name])
    idx = torch.tensor(ids)
    # the fused shape in the scorer's layout ([cols, d], read transposed)
    Wft = torch.cat([probe_w[:, None], gather(sae.params, ids, ["W_enc"])["W_enc"]],
                    1).t().contiguous()

    def naive() -> torch.Tensor:
        with torch.no_grad():
            z = theirs.encode(x)[:, idx]
        return torch.sigmoid(torch.stack([x @ probe_w, z @ lw], 1))

    # same answer first
    ref = naive().numpy()
    got = scorer.score(layer, x)
    assert abs(ref - got).max() < 1e-3, abs(ref - got).max()
    ms = samples({"fused": (lambda: scorer.score(layer, x), reps),
                  "sae_lens": (naive, max(2, reps // 4)),
                  "gemm": (lambda: torch.mm(x, Wft.t()), reps)})
    # rows/s from the median call, and ("<path>_best") from the fastest one
    return ({k: rows / (statistics.median(v) / 1e3) for k, v in ms.items()}
            | {f"{k}_best": rows / (min(v) / 1e3) for k, v in ms.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sae", type=Path, default=DEFAULT_SAE)
    ap.add_argument("--write", type=Path)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default; 1 on a loaded shared "
                         "CPU avoids a busy pool's spin-wait contention)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if (args.sae / "cfg.json").is_file():
            real = load_saelens(args.sae)
            det_ids = []
            det = args.sae.parent.parent / "sae-detector" / "manifest.json"
            if det.is_file():
                import json

                det_ids = json.loads(det.read_text())["components"][0]["latent_ids"]
            for ids in ([det_ids] if det_ids else []) + [list(range(0, real.d_sae, 4))]:
                results.append((576, real.d_sae, len(ids), "default SAE",
                                case(real, ids, args.rows, args.reps, Path(tmp) / "a")))
        for m in (16384, 65536):
            sae = synthetic_sae(4096, m, seed=m)
            ids = list(range(0, m, m // 512))[:512]
            results.append((4096, m, 512, "synthetic JumpReLU",
                            case(sae, ids, args.rows, max(4, args.reps // 2),
                                 Path(tmp) / f"s{m}")))
            del sae
    lines = [f"Run: `python bench/bench_sae.py --rows {args.rows} --reps {args.reps} "
             f"--threads {args.threads}` "
             f"(started {started}; {cpu_model()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads, load average at start "
             f"{load0:.1f}, shared machine). Throughput in rows/s, fp32, median of "
             "interleaved repeats ('fastest': the same ratio from each path's fastest call, "
             "the least disturbed by other processes); every case first checks fused == "
             "sae-lens path.", "",
             "| d_model | d_sae | selected | SAE | fused | sae-lens encode+select+probe | "
             "bare GEMM | fused / sae-lens | fused / GEMM | same, fastest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d, m, k, what, r in results:
        lines.append(f"| {d} | {m} | {k} | {what} | {r['fused']:.0f} | {r['sae_lens']:.0f} | "
                     f"{r['gemm']:.0f} | {r['fused'] / r['sae_lens']:.1f}× | "
                     f"{r['fused'] / r['gemm']:.2f} | "
                     f"{r['fused_best'] / r['sae_lens_best']:.1f}×, "
                     f"{r['fused_best'] / r['gemm_best']:.2f} |")
    lines.append(f"\nLoad average at end {os.getloadavg()[0]:.1f}.")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_section(args.write, "## SAE", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
