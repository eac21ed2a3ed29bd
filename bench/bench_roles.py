"""Cost of token roles in the capture plugin: segmentation (once per request) and the
per-step span split (every step), against the same steps without roles (baseline).

    python bench/bench_roles.py [--repeats 50]

- ``segment``: `RoleSegmenter.segment` on chat prompts of the default model's template
  (alternating user/assistant turns), per prompt length.
- ``layout``: `StepTracker.layout` on a fake V1 runner (the attributes the plugin reads),
  for a chunked-prefill step (``n_reqs`` requests x ``chunk`` rows) and a decode step
  (``n_reqs`` x 1 row), with roles (spans split at role boundaries) and without (one
  span per request: the baseline, timed interleaved in the same run).

Prints a Markdown table with machine, load average and command (for bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_decoder import fake_runner

from monitor.capture.steps import StepTracker
from monitor.roles import RoleSegmenter
from monitor.tools.models import prepare_default_model


def chat_ids(tok, n_tokens: int) -> list[int]:
    """Token ids of a chat (default template, generation prompt) of about n_tokens."""
    msgs = [{"role": "system", "content": "You are a careful assistant."}]
    body = "Please explain how tides work and why there are two a day. " * 4
    while True:
        msgs.append({"role": "user" if len(msgs) % 2 else "assistant", "content": body})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return list(ids)


def runner(prompts: list[list[int]], computed: list[int], rows: list[int]) -> SimpleNamespace:
    return fake_runner([len(p) for p in prompts], computed, rows, prompts)


def median_us(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--n-reqs", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepare_default_model())
    seg = RoleSegmenter.from_tokenizer(tok)
    load = os.getloadavg()[0]
    print(f"Machine: {platform.machine()} / {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; load average at start {load:.1f}.")
    print(f"Command: `python bench/bench_roles.py --repeats {args.repeats} --n-reqs "
          f"{args.n_reqs} --chunk {args.chunk}`\n")
    print("| what | prompt tokens | role runs | µs (median) | baseline µs (no roles) |")
    print("|---|---:|---:|---:|---:|")
    for n in (256, 2048, 8192):
        ids = chat_ids(tok, n)
        runs = int(np.count_nonzero(np.diff(seg.segment(ids))) + 1)
        us = median_us(lambda ids=ids: seg.segment(ids), args.repeats)
        print(f"| segment (once per request) | {len(ids)} | {runs} | {us:.0f} | – |")
    for n in (2048, 8192):
        ids = chat_ids(tok, n)
        k = args.n_reqs
        for what, computed, rows in (
            (f"layout, prefill step ({k} x {args.chunk} rows)", [len(ids) // 2] * k,
             [args.chunk] * k),
            (f"layout, decode step ({k} x 1 row)", [len(ids)] * k, [1] * k),
        ):
            r = runner([ids] * k, computed, rows)
            n_tok = int(sum(rows))
            pos = np.concatenate([np.arange(c, c + m) for c, m in zip(computed, rows,
                                                                       strict=True)])
            with_roles = StepTracker(r, segment=seg.segment)
            without = StepTracker(r)
            with_roles.layout(n_tok, pos)  # first sight: segmentation happens here
            without.layout(n_tok, pos)
            t_roles, t_base = [], []
            for _ in range(args.repeats):  # interleaved
                t = time.perf_counter()
                with_roles.layout(n_tok, pos)
                t_roles.append(time.perf_counter() - t)
                t = time.perf_counter()
                without.layout(n_tok, pos)
                t_base.append(time.perf_counter() - t)
            print(f"| {what} | {len(ids)} | – | {statistics.median(t_roles) * 1e6:.0f} | "
                  f"{statistics.median(t_base) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
