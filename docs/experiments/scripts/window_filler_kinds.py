"""Session 11 measurement (docs/experiments/window_validation.md, "Session 11"): the filler
kinds of the window detector's calibration lists, and the pair's false alerts at the
SHIPPED thresholds on validation lists of one filler kind (reported-half fillers, never
used for a threshold), with the fillers most alerting lists share. Training sources only.

    PYTHONPATH=$PWD python docs/experiments/scripts/window_filler_kinds.py [bundle]
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from monitor.score.bundle import load_bundle
from monitor.tools.models import cache_dir as monitor_cache
from probes import harmful
from probes.cli import _model_path
from probes.collect import TransformersCollector
from probes.evaluate import wilson_ci
from probes.lists import filler_halves, long_requests, validation_lists
from probes.sources import HARMFUL_SOURCES, Source
from probes.train import LinearProbe


def main(bundle: str = "bundles/default") -> None:
    path, name = _model_path(None)
    cache = monitor_cache() / "probes"
    col = TransformersCollector(path, name)
    train = list(harmful.load_sources(col, cache, [s for s in HARMFUL_SOURCES
                                                   if s.role == "train"],
                                      "user", harmful.LAYERS, progress=False).values())
    _, cal_idx = harmful.split_calibration(train, 0)
    b = load_bundle(bundle)
    det = {d.name: d for d in b.detectors}
    t = {k: v.numpy() for k, v in b.components["harmful_intent_logreg_l15"].tensors.items()}
    probe = LinearProbe(15, t["weight"][:, 0], float(t["bias"][0]), t["mean"], t["std"])
    slope = float(det["harmful_intent"].calibration["length_slope"])
    th = {sev: (float(det["harmful_intent"].default_thresholds[sev]),
                float(det["harmful_intent_window"].default_thresholds[sev]))
          for sev in ("warn", "critical")}
    # the pooled (runs 1-5) calibration lists' filler kinds
    pooled = validation_lists(train, cal_idx, 0, 200, 1000, 0, calibration_mix="pooled")
    # the same filler halves validation_lists draws (same seeded permutations)
    halves = filler_halves(train, cal_idx, np.random.default_rng(0))
    for part, items in halves.items():
        c = collections.Counter(k for _, k, _ in items)
        print(f"{part} half: {dict(c)}; scary share {c['scary'] / len(items):.3f}")
    kinds = {d.name: d.source.kind for d in train}
    share = [np.mean([kinds[s] == "scary" for s in pooled.filler_sources[i]])
             for i in pooled.where("calibration")]
    print(f"pooled calibration lists: {len(share)}; mean share of scary SOURCES per list "
          f"{np.mean(share):.3f}")
    for kind in ("benign", "scary"):
        fill = [it for it in halves["reported"] if it[1] == kind]
        picked: list[list[int]] = []
        exs = long_requests([], [e for _, _, e in fill], 300, 7, f"val_{kind}", False,
                            picked)
        d = harmful.collect_source(Source(f"val_{kind}", "benign", "train", "derived",
                                          f"val_{kind}"), exs, col, cache, [15], "user", False)
        a = d.served(probe, {"kind": "mean_logit", "length_slope": slope}, 1, "span_end")
        w = d.served(probe, {"kind": "window_mean_logit", "window_tokens": 8}, 1,
                     "every_token")
        for sev, (ta, tb) in th.items():
            hit = np.flatnonzero((a >= ta) | (w >= tb))
            lo, hi = wilson_ci(int(hit.size), 300)
            print(f"{kind}-only validation lists, {sev}: {hit.size}/300 "
                  f"[{lo:.3f}, {hi:.3f}]")
            if sev == "warn" and hit.size:
                shared = collections.Counter(j for i in hit for j in set(picked[i]))
                for j, k in shared.most_common(3):
                    print(f"   in {k}/{hit.size} alerting lists: {fill[j][0]}: "
                          f"{fill[j][2].user_text[:80]!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
