"""Cost of building a bundle for your own model: collection time and memory per token.

    python bench/bench_collect.py --model ~/.cache/safety-monitor/models/smollm2-135m-instruct
    python bench/bench_collect.py --tiny qwen3          # a tiny random model (tests/tiny_models.py)

Collection (a transformers forward pass keeping the residual stream at the candidate
layers) dominates `probes build-default`: training and calibration are logistic
regressions on the collected rows. This times `TransformersCollector.hidden_states` on
batches of `--batch` sequences of `--seq-len` token ids (the recipes' batches are padded
chat conversations of similar size), after one warm-up batch, and reports:

- tokens/s and seconds per million tokens (forward + copy-out of the layers);
- peak RSS of the process (model + activations of one batch);
- stored activation bytes per million tokens: `n_layers_kept × d_model × 2` (float16).

The printed line also has the machine, the load average and the model's parameter count,
so a GPU or bigger-model figure can be extrapolated: forward cost ≈ 2 × params FLOPs per
token.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder")
    ap.add_argument("--tiny", help="tiny family from tests/tiny_models.py instead of --model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = ap.parse_args()

    import numpy as np
    import torch

    from probes.collect import TransformersCollector
    from probes.harmful import LAYERS
    from probes.recipes import scaled_layers

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tiny:
        from tiny_models import build_tiny_model

        path = build_tiny_model(a.tiny, Path("/tmp") / f"safety-monitor-tiny-{a.tiny}")
    elif a.model:
        path = Path(a.model).expanduser()
    else:
        ap.error("--model or --tiny")
    col = TransformersCollector(path, str(path))
    layers = scaled_layers(LAYERS, col.n_layers)
    params = sum(p.numel() for p in col.model.parameters())
    rng = np.random.default_rng(0)
    vocab = int(col.model.config.vocab_size)

    def batch() -> list[list[int]]:
        return [rng.integers(3, vocab, a.seq_len).tolist() for _ in range(a.batch)]

    col.hidden_states(batch(), layers)  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.batches):
        col.hidden_states(batch(), layers)
    dt = time.perf_counter() - t0
    tokens = a.batches * a.batch * a.seq_len
    tps = tokens / dt
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    store = len(layers) * col.d_model * 2 * 1e6 / 2**30
    load = os.getloadavg()[0]
    print(f"model={path.name} params={params / 1e6:.1f}M d_model={col.d_model} "
          f"layers={col.n_layers} kept={list(layers)} | {tps:,.0f} tokens/s, "
          f"{1e6 / tps / 60:.1f} min per 1M tokens, peak RSS {rss:,.0f} MiB, stored fp16 "
          f"activations {store:.2f} GiB per 1M tokens | {platform.machine()} "
          f"{os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load avg {load:.1f}, batch {a.batch}x{a.seq_len}")


if __name__ == "__main__":
    main()
