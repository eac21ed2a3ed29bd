"""Session 11 (docs/experiments/window_validation.md): what per-kind calibration lists
cost in hidden-item detection, on
leave-one-source-out folds over the harmful TRAINING sources (the run-5 folds): each fold's
probe (harmful.recipe_fit), thresholds by split_thresholds with (old) the 1,000 pooled
calibration lists of run 5 or (new) 1,000 lists per filler kind bounded per kind;
scored: the fold's hidden-item lists (run 5's 240, its own source's 30), its short harmful rows,
its round-robin share of the 200 reported benign lists (mixed) and of 300+300 validation
lists of one filler kind each (reported-half fillers).

    PYTHONPATH=$PWD python docs/experiments/scripts/window_kind_cost.py
"""
import time

import numpy as np

from monitor.tools.models import cache_dir as monitor_cache
from probes import harmful
from probes.cli import _model_path
from probes.collect import TransformersCollector
from probes.evaluate import wilson_ci
from probes.lists import filler_halves, long_requests, validation_lists
from probes.sources import HARMFUL_SOURCES, Source
from probes.window import _sigmoid, mean_logit, split_thresholds, window_max_logit

t0 = time.time()
path, name = _model_path(None)
cache = monitor_cache() / "probes"
col = TransformersCollector(path, name)
train = list(harmful.load_sources(col, cache, [s for s in HARMFUL_SOURCES if s.role == "train"],
                                  "user", harmful.LAYERS, progress=False).values())
fit_idx, cal_idx = harmful.split_calibration(train, 0)
m5 = validation_lists(train, cal_idx, 30, 200, 1000, 0, calibration_mix="pooled")
L5 = harmful.lists_source(m5, col, cache, [15], "user", False)
print(f"run-5 lists collected {time.time()-t0:.0f}s", flush=True)
mk = validation_lists(train, cal_idx, 0, 200, 1000, 0)
LK = harmful.lists_source(mk, col, cache, [15], "user", False)
print(f"per-kind lists collected {time.time()-t0:.0f}s", flush=True)
# validation lists of one filler kind (the measurement's, reported half)
pool = filler_halves(train, cal_idx, np.random.default_rng(0))["reported"]
V = {}
for kind in ("benign", "scary"):
    exs = long_requests([], [e for _, k, e in pool if k == kind], 300, 7, f"val_{kind}", False)
    V[kind] = harmful.collect_source(Source(f"val_{kind}", "benign", "train", "derived",
                                            f"val_{kind}"), exs, col, cache, [15], "user", False)
print(f"validation lists collected {time.time()-t0:.0f}s", flush=True)

def ab(d, logits, slope):
    z = logits(d)
    ex = d.acts.example[d.mask]
    n = d.acts.n_examples
    return _sigmoid(mean_logit(z, ex, n, slope)), _sigmoid(window_max_logit(z, ex, n, 8, 1))

harm = [d for d in train if d.source.kind == "harmful"]
kinds = np.array(mk.filler_kind)
c5, ck = m5.where("calibration"), mk.where("calibration")
ben = m5.where("benign")
acc: dict[tuple[str, str], list[int]] = {}
tbs: dict[str, list[float]] = {}
def add(rule, group, hits):
    c = acc.setdefault((rule, group), [0, 0])
    c[0] += int(hits.sum())
    c[1] += int(hits.size)
for fi, h in enumerate(harm):
    logits, slope = harmful.recipe_fit([(d, fit_idx[d.name]) for d in train if d.name != h.name])
    ra, rb = [], []
    for d in train:
        if d.name == h.name or not cal_idx[d.name].size:
            continue
        a, b = ab(d, logits, slope)
        ra.append(a[cal_idx[d.name]])
        rb.append(b[cal_idx[d.name]])
    ra, rb = np.concatenate(ra), np.concatenate(rb)
    a5, b5 = ab(L5, logits, slope)
    ak, bk = ab(LK, logits, slope)
    ha, hb = ab(h, logits, slope)
    va = {k: ab(V[k], logits, slope) for k in V}
    mine = np.array([i for i in m5.where("harmful") if m5.task_source[i] == h.name])
    for sev, fpr in (("warn", 0.01), ("critical", 0.001)):
        th = {"old (pooled lists)": split_thresholds(ra, rb, a5[c5], b5[c5], fpr, 0.8 * fpr),
              "new (per-kind lists)": split_thresholds(ra, rb, ak[ck], bk[ck], fpr, 0.8 * fpr,
                                                       kinds[ck])}
        for rule, (ta, tb) in th.items():
            r = f"{rule} {sev}"
            tbs.setdefault(r, []).append(tb)
            add(r, "hidden harmful (lists)", (a5[mine] >= ta) | (b5[mine] >= tb))
            add(r, "short harmful", (ha >= ta) | (hb >= tb))
            sel = ben[fi::len(harm)]
            add(r, "benign lists (mixed)", (a5[sel] >= ta) | (b5[sel] >= tb))
            for k, (xa, xb) in va.items():
                sel = np.arange(fi, 300, len(harm))
                add(r, f"validation lists, {k} fillers only", (xa[sel] >= ta) | (xb[sel] >= tb))
    print(f"fold {h.name} done {time.time()-t0:.0f}s", flush=True)
groups = ["hidden harmful (lists)", "short harmful", "benign lists (mixed)",
          "validation lists, benign fillers only", "validation lists, scary fillers only"]
print("| rule | severity | mean T_b | " + " | ".join(groups) + " |")
print("|---|---|---:|" + "---|" * len(groups))
for rule in ("old (pooled lists)", "new (per-kind lists)"):
    for sev in ("warn", "critical"):
        r = f"{rule} {sev}"
        cells = []
        for g in groups:
            hits, n = acc[(r, g)]
            lo, hi = wilson_ci(hits, n)
            cells.append(f"{hits/n:.3f} [{lo:.3f}, {hi:.3f}] ({hits}/{n})")
        print(f"| {rule} | {sev} | {np.mean(tbs[r]):.5f} | " + " | ".join(cells) + " |")
print(f"elapsed {time.time()-t0:.0f}s")
