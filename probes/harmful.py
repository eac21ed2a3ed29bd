"""The ``harmful_intent`` recipe: diverse sources, user-token pooling, leave-one-source-out.

What is served and what is trained (they agree by construction):

- **Tokens in scope** = the user's message content as ``monitor.roles`` labels it
  (:func:`token_roles`, :func:`scope_mask`: the segmenter the capture plugin runs).
- **Per-token score** ``s_t = sigmoid(z_t)``, ``z_t = ((x_t − μ)/σ)·w + b`` at one layer
  (the bundle's ``linear_probe``).
- **Request statistic** ``S = max_{t ≥ m} a_t`` with the policy aggregation ``a_t``
  (``mean``: ``a_t = (1/t) Σ_{i≤t} s_i``; ``ema``) computed by ``monitor.judge.aggregate``
  via :func:`probes.train.aggregate_requests`: exactly the tracker's rule "a severity is
  reached at the first token ``t ≥ min_tokens`` where ``a_t ≥ threshold``".
- **Training** fits ``w, b`` by L2 logistic regression on the request-level mean of the
  user-token activations, ``x̄ = (1/T) Σ_t x_t``. Because ``z`` is affine,
  ``z(x̄) = (1/T) Σ_t z_t``: the trained logit is the mean of the served per-token logits;
  the served statistic averages ``sigmoid(z_t)`` instead and is what every number
  (selection, thresholds, report) is computed on.

Rows: float16 activations ``[n_rows, d_model]`` per layer, in position order within
each example (``probes.collect``). Pooled features: float32 ``[n_examples, d_model]``.
Sample weights: every source gets the same total weight within its class (so 400
red-team rewrites do not outvote 100 physical-safety contrasts), times a per-kind
multiplier for benign-but-scary and persona sources (chosen on validation).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.collect import Activations, _ChatEncoder
from probes.datasets import ChatExample
from probes.evaluate import auroc, tpr_at_fpr
from probes.sources import Source
from probes.train import LinearProbe, aggregate_requests, fit_logreg

log = logging.getLogger("probes.harmful")

__all__ = [
    "SourceData",
    "fit_pooled",
    "harmful_intent_recipe",
    "pooled_features",
    "scope_mask",
    "served_scores",
    "source_weights",
    "token_roles",
]


def token_roles(acts: Activations, examples: Sequence[ChatExample],
                encoder: _ChatEncoder) -> np.ndarray:
    """Role of every stored row (int8 ``[n_rows]``, ``monitor.roles.TokenRole`` values):
    the prompt's token ids (``encoder.encode``, the served tokenisation) segmented by the
    shared ``monitor.roles.RoleSegmenter`` (the one the capture plugin runs in vLLM);
    rows at or after the prompt are GENERATED."""
    from monitor.roles import RoleSegmenter, TokenRole

    seg = RoleSegmenter.from_tokenizer(encoder.tokenizer)
    out = np.full(acts.n_rows, int(TokenRole.GENERATED), dtype=np.int8)
    prompt = ~acts.generated.astype(bool)
    rows = np.flatnonzero(prompt)
    ex = acts.example[rows]
    if rows.size:
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(ex)) + 1, [rows.size]])
        for a, b in itertools.pairwise(bounds):
            ids, plen, _ = encoder.encode(examples[int(ex[a])])
            out[rows[a:b]] = seg.segment(ids[:plen])[acts.position[rows[a:b]]]
    return out


def scope_mask(roles: np.ndarray, scope: str) -> np.ndarray:
    """Rows in a policy ``scope`` (bool ``[n_rows]``): ``user`` (user message content) or
    ``prompt`` (every prompt token). The one switch point between training and serving
    scopes."""
    from monitor.roles import TokenRole

    if scope == "user":
        return roles == int(TokenRole.USER)
    if scope == "prompt":
        return roles != int(TokenRole.GENERATED)
    raise ValueError(f"scope: expected user|prompt, found {scope!r}")


def pooled_features(acts: Activations, layer: int, mask: np.ndarray) -> np.ndarray:
    """Mean of the masked rows per example: float32 ``[n_examples, d_model]`` (zeros for
    an example without masked rows). Rows must be grouped by example (collect order)."""
    x = acts.x[layer][mask].astype(np.float32)
    ex = acts.example[mask]
    d = acts.x[layer].shape[1]
    out = np.zeros((acts.n_examples, d), dtype=np.float32)
    if ex.size == 0:
        return out
    if np.any(np.diff(ex) < 0):
        raise ValueError("pooled_features: rows must be grouped by example in ascending order")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ex)) + 1])
    sums = np.add.reduceat(x, starts, axis=0)
    counts = np.diff(np.concatenate([starts, [ex.size]])).astype(np.float32)
    out[ex[starts]] = sums / counts[:, None]
    return out


def served_scores(probe: LinearProbe, acts: Activations, mask: np.ndarray,
                  agg: dict[str, Any], min_tokens: int) -> np.ndarray:
    """The request statistic the monitor alerts on (see module doc), per example."""
    scores = np.zeros(acts.n_rows, dtype=np.float32)
    scores[mask] = probe.scores(acts.x[probe.layer][mask])
    return aggregate_requests(scores, acts.example, acts.n_examples, agg, min_tokens, mask)


@dataclass
class SourceData:
    """One source's examples, activations and per-layer pooled user-token features."""

    source: Source
    examples: list[ChatExample]
    acts: Activations
    mask: np.ndarray
    feats: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def labels(self) -> np.ndarray:
        return self.acts.labels.astype(np.int8)

    def features(self, layer: int) -> np.ndarray:
        if layer not in self.feats:
            self.feats[layer] = pooled_features(self.acts, layer, self.mask)
        return self.feats[layer]


def source_weights(parts: Sequence[tuple[SourceData, np.ndarray]],
                   kind_weight: dict[str, float]) -> np.ndarray:
    """Per-example weights for the rows ``idx`` of each source: each source's rows sum to
    ``kind_weight.get(kind, 1)``, then each class is rescaled to total 1 (balanced)."""
    ws, ys = [], []
    for sd, idx in parts:
        n = max(len(idx), 1)
        ws.append(np.full(len(idx), kind_weight.get(sd.source.kind, 1.0) / n))
        ys.append(sd.labels[idx])
    w = np.concatenate(ws)
    y = np.concatenate(ys)
    for c in (0, 1):
        tot = w[y == c].sum()
        if tot > 0:
            w[y == c] *= 1.0 / tot
    return w * len(w) / 2.0


def fit_pooled(parts: Sequence[tuple[SourceData, np.ndarray]], layer: int, C: float,
               kind_weight: dict[str, float]) -> LinearProbe:
    """L2 logistic regression on pooled user-token features of the given rows."""
    x = np.concatenate([sd.features(layer)[idx] for sd, idx in parts])
    y = np.concatenate([sd.labels[idx] for sd, idx in parts])
    w = source_weights(parts, kind_weight)
    # class balance is already in w; fit_logreg's 'balanced' then only rescales slightly
    return fit_logreg(x, y, layer, C, w, max_iter=500)


def pooled_metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """AUROC and TPR@1%FPR of request scores."""
    return {"auroc": auroc(y, s), "tpr@fpr0.01": tpr_at_fpr(y, s, 0.01)}


# ----------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Config:
    """One point of the validation search."""

    layer: int
    C: float
    scary_weight: float
    aggregation: tuple[tuple[str, Any], ...]
    min_tokens: int

    @property
    def agg(self) -> dict[str, Any]:
        return dict(self.aggregation)

    def label(self) -> str:
        from probes.train import aggregation_name

        return (f"L{self.layer} C={self.C:g} scary×{self.scary_weight:g} "
                f"{aggregation_name(self.agg)} m={self.min_tokens}")


def kind_weights(scary_weight: float) -> dict[str, float]:
    """Per-kind source weight multipliers (benign-but-scary and persona sources)."""
    return {"scary": scary_weight, "persona": scary_weight}


def loso_scores(train: Sequence[SourceData], fit_idx: dict[str, np.ndarray], layer: int,
                C: float, scary_weight: float,
                served: Sequence[tuple[dict[str, Any], int]]) -> dict[str, list[np.ndarray]]:
    """Leave-one-source-out scores: for each training source, a probe fit on the other
    sources' ``fit_idx`` rows scores ALL of that source's rows. Returns, per served
    ``(aggregation, min_tokens)`` key ``"<i>"`` and ``"pooled"`` (sigmoid of the pooled
    logit), a list of per-source score arrays in ``train`` order."""
    out: dict[str, list[np.ndarray]] = {"pooled": [], **{str(i): [] for i in range(len(served))}}
    kw = kind_weights(scary_weight)
    for held in train:
        parts = [(d, fit_idx[d.name]) for d in train if d.name != held.name]
        p = fit_pooled(parts, layer, C, kw)
        z = ((held.features(layer) - p.mean) / p.std) @ p.weight + p.bias
        out["pooled"].append(1.0 / (1.0 + np.exp(-z)))
        for i, (agg, m) in enumerate(served):
            out[str(i)].append(served_scores(p, held.acts, held.mask, agg, m))
    return out


# ----------------------------------------------------------------------- reporting helpers
def source_rows(scores: dict[str, tuple[SourceData, np.ndarray]], thr: dict[str, float],
                ref_pos: np.ndarray, ref_neg: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per-source metrics at the shipped thresholds ``thr``.

    Harmful source: AUROC (bootstrap 95% CI) and TPR@1%FPR against ``ref_neg`` (the
    pooled benign test sources), detection rate at warn / critical (Wilson 95% CI).
    Benign source: alert rate at warn / critical (Wilson CI), AUROC against ``ref_pos``
    (the pooled harmful test sources)."""
    from probes.evaluate import auroc_ci, wilson_ci

    out: dict[str, dict[str, Any]] = {}
    for name, (sd, s) in scores.items():
        harmful = sd.source.kind == "harmful"
        other = ref_neg if harmful else ref_pos
        y = np.concatenate([np.full(s.size, harmful), np.full(other.size, not harmful)])
        both = np.concatenate([s, other])
        row: dict[str, Any] = {"kind": sd.source.kind, "role": sd.source.role, "n": int(s.size),
                               "auroc": auroc(y, both), "auroc_ci": auroc_ci(y, both)}
        if harmful:
            row["tpr@fpr0.01"] = tpr_at_fpr(y, both, 0.01)
        for sev, t in thr.items():
            k = int((s >= t).sum())
            row[f"rate@{sev}"] = k / max(s.size, 1)
            row[f"rate@{sev}_ci"] = wilson_ci(k, int(s.size))
        out[name] = row
    return out


def worst_examples(scores: dict[str, tuple[SourceData, np.ndarray]], k: int = 8
                   ) -> dict[str, list[dict[str, Any]]]:
    """Highest-scoring benign and lowest-scoring harmful requests (with text)."""
    rows = []
    for name, (sd, s) in scores.items():
        for i, v in enumerate(s):
            ex = sd.examples[i]
            sys = next((m["content"] for m in ex.chat if m["role"] == "system"), "")
            rows.append((float(v), name, sd.source.kind == "harmful", ex.user_text, sys))
    fp = sorted([r for r in rows if not r[2]], key=lambda r: -r[0])[:k]
    fn = sorted([r for r in rows if r[2]], key=lambda r: r[0])[:k]

    def fmt(r: tuple[float, str, bool, str, str]) -> dict[str, Any]:
        return {"score": round(r[0], 4), "source": r[1], "text": r[3][:300],
                "system": r[4][:200]}

    return {"false_positives": [fmt(r) for r in fp], "false_negatives": [fmt(r) for r in fn]}


# ----------------------------------------------------------------------- the recipe
LAYERS = (9, 12, 15, 18)
"""Layers collected and searched (of 30)."""
CS = (1e-4, 1e-3, 1e-2)
SCARY_WEIGHTS = (1.0, 3.0)
SERVED: tuple[tuple[dict[str, Any], int], ...] = (
    ({"kind": "mean"}, 2),
    ({"kind": "mean"}, 4),
    ({"kind": "ema", "half_life_tokens": 8.0}, 4),
    ({"kind": "ema", "half_life_tokens": 16.0}, 4),
)
"""Served aggregations searched: running mean and EMA (a rolling mean whose maximum over
the request is taken), with ``min_tokens``."""
CALIB_FRAC = 0.3
"""Share of every benign training source held back from fitting, for the thresholds."""


def load_sources(collector: Any, cache_dir: Any, sources: Sequence[Source], scope: str,
                 layers: Sequence[int] = LAYERS, progress: bool = True,
                 limit: int | None = None) -> dict[str, SourceData]:
    """Collect (cached per source) and segment every source that is available."""
    from probes.collect import TokenSelection
    from probes.sources import load_source

    out: dict[str, SourceData] = {}
    for src in sources:
        ex = load_source(src)
        if limit is not None:
            ex = ex[:limit]
        acts = collector.collect(ex, layers, TokenSelection("prompt"), cache_dir=cache_dir,
                                 progress=progress, desc=f"harmful_intent/{src.name}")
        roles = token_roles(acts, ex, collector)
        out[src.name] = SourceData(src, ex, acts, scope_mask(roles, scope))
    return out


def long_requests(tasks: Sequence[ChatExample], fillers: Sequence[ChatExample], n: int,
                  seed: int, source: str, with_task: bool) -> list[ChatExample]:
    """``n`` long requests: a numbered list of 4–7 requests from ``fillers``, with one of
    ``tasks`` at a random place when ``with_task`` (label = the task's, else 0)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(4, 7)
        items = [rng.choice(fillers).user_text for _ in range(k)]
        label = 0
        if with_task:
            t = tasks[i % len(tasks)]
            items.insert(rng.randint(0, k), t.user_text)
            label = t.label
        body = "I have a few things I need help with today:\n" + "\n".join(
            f"{j + 1}. {x}" for j, x in enumerate(items)) + "\nThanks!"
        out.append(ChatExample.make([{"role": "user", "content": body}], label, source=source))
    return out


def long_sources(data: dict[str, SourceData], collector: Any, cache_dir: Any, scope: str,
                 layers: Sequence[int], progress: bool, seed: int = 0,
                 n: int = 60) -> dict[str, SourceData]:
    """Test-only long requests built from TEST sources: lists of ordinary-chat and
    benign-but-scary requests (``long_benign``) and the same with one Do-Not-Answer
    question inside (``long_with_harmful``)."""
    from probes.collect import TokenSelection

    fill = [e for k in ("oasst", "coconot_contrast") if k in data for e in data[k].examples
            if len(e.user_text) < 400]
    tasks = data["do_not_answer"].examples if "do_not_answer" in data else []
    if not fill or not tasks:
        return {}
    out = {}
    for name, kind, with_task in (("long_benign", "benign", False),
                                  ("long_with_harmful", "harmful", True)):
        exs = long_requests(tasks, fill, n, seed + (7 if with_task else 3), name, with_task)
        acts = collector.collect(exs, layers, TokenSelection("prompt"), cache_dir=cache_dir,
                                 progress=progress, desc=f"harmful_intent/{name}")
        out[name] = SourceData(Source(name, kind, "test", "derived", name), exs, acts,
                               scope_mask(token_roles(acts, exs, collector), scope))
    return out


def split_calibration(train: Sequence[SourceData], seed: int = 0
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per training source: rows to fit on, rows held back for calibration (benign only)."""
    fit_idx, cal_idx = {}, {}
    for i, d in enumerate(train):
        n = len(d.examples)
        if d.source.kind == "harmful":
            fit_idx[d.name], cal_idx[d.name] = np.arange(n), np.arange(0)
            continue
        perm = np.random.default_rng(seed + 101 * i).permutation(n)
        k = round(CALIB_FRAC * n)
        cal_idx[d.name], fit_idx[d.name] = np.sort(perm[:k]), np.sort(perm[k:])
    return fit_idx, cal_idx


def select(train: Sequence[SourceData], fit_idx: dict[str, np.ndarray],
           layers: Sequence[int] = LAYERS, Cs: Sequence[float] = CS,
           scary_weights: Sequence[float] = SCARY_WEIGHTS,
           served: Sequence[tuple[dict[str, Any], int]] = SERVED,
           progress: bool = True) -> tuple[Config, list[dict[str, Any]]]:
    """Leave-one-source-out search; criterion = (AUROC + TPR@1%FPR) / 2 of the pooled
    out-of-source scores of every training source (harmful vs benign rows). Returns the
    best *servable* config and the whole table (``pooled`` rows are the request-level
    sigmoid of the mean logit, a reference that the monitor cannot serve)."""
    from tqdm.auto import tqdm

    from probes.train import aggregation_name

    y = np.concatenate([d.labels for d in train])
    table: list[dict[str, Any]] = []
    best: tuple[float, Config] | None = None
    jobs = [(lay, c, sw) for lay in layers for c in Cs for sw in scary_weights]
    for lay, c, sw in tqdm(jobs, desc="harmful_intent/select", disable=not progress,
                           leave=False):
        oof = loso_scores(train, fit_idx, lay, c, sw, served)
        for key, arrs in oof.items():
            s = np.concatenate(arrs)
            met = pooled_metrics(y, s)
            crit = (met["auroc"] + met["tpr@fpr0.01"]) / 2
            if key == "pooled":
                agg_name, m = "pooled logit (not servable)", 0
            else:
                agg, m = served[int(key)]
                agg_name = aggregation_name(agg)
                cfg = Config(lay, c, sw, tuple(sorted(agg.items())), m)
                if best is None or crit > best[0]:
                    best = (crit, cfg)
            table.append({"layer": lay, "C": c, "scary_weight": sw, "aggregation": agg_name,
                          "min_tokens": m, "criterion": round(crit, 4),
                          "loso.auroc": round(met["auroc"], 4),
                          "loso.tpr@fpr0.01": round(met["tpr@fpr0.01"], 4)})
    assert best is not None
    table.sort(key=lambda r: -r["criterion"])
    return best[1], table


def explore(train: Sequence[SourceData], fit_idx: dict[str, np.ndarray], cfg: Config,
            layers: Sequence[int] = LAYERS) -> list[dict[str, Any]]:
    """What richer read-outs buy, leave-one-source-out on the request-level pooled
    statistic (none of these is servable as one ``linear_probe`` detector today):
    the chosen single layer, all layers concatenated, an ensemble (mean logit of one
    probe per layer) and a small MLP head on the chosen layer."""
    from sklearn.neural_network import MLPClassifier

    y = np.concatenate([d.labels for d in train])
    kw = kind_weights(cfg.scary_weight)

    def run(fit: Any) -> dict[str, float]:
        s = np.concatenate([fit([(d, fit_idx[d.name]) for d in train if d.name != h.name], h)
                            for h in train])
        return pooled_metrics(y, s)

    def single(lay: int) -> Any:
        def f(parts: Sequence[tuple[SourceData, np.ndarray]], h: SourceData) -> np.ndarray:
            p = fit_pooled(parts, lay, cfg.C, kw)
            return ((h.features(lay) - p.mean) / p.std) @ p.weight + p.bias
        return f

    def concat(parts: Sequence[tuple[SourceData, np.ndarray]], h: SourceData) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        x = np.concatenate([np.concatenate([d.features(lay)[i] for lay in layers], 1)
                            for d, i in parts])
        yy = np.concatenate([d.labels[i] for d, i in parts])
        mu, sd = x.mean(0), x.std(0) + 1e-4
        clf = LogisticRegression(C=cfg.C / len(layers), max_iter=500)
        clf.fit((x - mu) / sd, yy, sample_weight=source_weights(parts, kw))
        xh = np.concatenate([h.features(lay) for lay in layers], 1)
        return clf.decision_function((xh - mu) / sd)

    def ensemble(parts: Sequence[tuple[SourceData, np.ndarray]], h: SourceData) -> np.ndarray:
        return np.mean([single(lay)(parts, h) for lay in layers], axis=0)

    def mlp(parts: Sequence[tuple[SourceData, np.ndarray]], h: SourceData) -> np.ndarray:
        x = np.concatenate([d.features(cfg.layer)[i] for d, i in parts])
        yy = np.concatenate([d.labels[i] for d, i in parts])
        mu, sd = x.mean(0), x.std(0) + 1e-4
        clf = MLPClassifier((64,), alpha=1.0, max_iter=200, early_stopping=True,
                            random_state=0)
        clf.fit((x - mu) / sd, yy)
        return clf.predict_proba((h.features(cfg.layer) - mu) / sd)[:, 1]

    rows = []
    for name, f in ((f"linear, layer {cfg.layer} (chosen)", single(cfg.layer)),
                    (f"linear, layers {'+'.join(map(str, layers))} concatenated", concat),
                    (f"ensemble: mean logit of per-layer probes {layers}", ensemble),
                    (f"MLP head (64 hidden, alpha=1), layer {cfg.layer}", mlp)):
        m = run(f)
        rows.append({"read-out": name, "loso.auroc": round(m["auroc"], 4),
                     "loso.tpr@fpr0.01": round(m["tpr@fpr0.01"], 4)})
    return rows


def learning_curve(train: Sequence[SourceData], test: Sequence[SourceData],
                   fit_idx: dict[str, np.ndarray], cfg: Config,
                   fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0),
                   seed: int = 0) -> list[dict[str, Any]]:
    """Pooled test AUROC / TPR@1%FPR (served statistic) vs the fraction of every training
    source's rows fit on, plus a control: all rows with shuffled labels."""
    y = np.concatenate([d.labels for d in test])
    kw = kind_weights(cfg.scary_weight)
    rows = []
    rng = np.random.default_rng(seed)
    for fr in (*fractions, "shuffled"):
        parts = []
        for d in train:
            idx = fit_idx[d.name]
            if fr != "shuffled":
                k = max(1, round(float(fr) * idx.size))
                idx = np.sort(rng.permutation(idx)[:k])
            parts.append((d, idx))
        if fr == "shuffled":
            x = np.concatenate([d.features(cfg.layer)[i] for d, i in parts])
            yy = rng.permutation(np.concatenate([d.labels[i] for d, i in parts]))
            p = fit_logreg(x, yy, cfg.layer, cfg.C, max_iter=500)
        else:
            p = fit_pooled(parts, cfg.layer, cfg.C, kw)
        s = np.concatenate([served_scores(p, d.acts, d.mask, cfg.agg, cfg.min_tokens)
                            for d in test])
        m = pooled_metrics(y, s)
        rows.append({"train_fraction": fr if fr == "shuffled" else float(fr),
                     "n_train": int(sum(i.size for _, i in parts)),
                     "test.auroc": round(m["auroc"], 4),
                     "test.tpr@fpr0.01": round(m["tpr@fpr0.01"], 4)})
    return rows


def harmful_intent_recipe(collector: Any, cache_dir: Any, *, scope: str = "user",
                          sources: Sequence[Source] | None = None,
                          layers: Sequence[int] = LAYERS, Cs: Sequence[float] = CS,
                          scary_weights: Sequence[float] = SCARY_WEIGHTS,
                          served: Sequence[tuple[dict[str, Any], int]] = SERVED,
                          limit: int | None = None, explore_readouts: bool = True,
                          seed: int = 0, progress: bool = True) -> Any:
    """Collect → leave-one-source-out selection → fit on all training sources (minus the
    calibration hold-back) → thresholds on the hold-back → evaluate the test sources."""
    from probes.calibrate import calibrate
    from probes.export import DetectorResult, threshold_ladder
    from probes.sources import HARMFUL_SOURCES

    sources = HARMFUL_SOURCES if sources is None else sources
    data = load_sources(collector, cache_dir, sources, scope, layers, progress, limit)
    train = [d for d in data.values() if d.source.role == "train"]
    test = [d for d in data.values() if d.source.role == "test"]
    test += list(long_sources(data, collector, cache_dir, scope, layers, progress, seed).values())
    fit_idx, cal_idx = split_calibration(train, seed)
    cfg, table = select(train, fit_idx, layers, Cs, scary_weights, served, progress)
    log.info("harmful_intent: chose %s", cfg.label())

    probe = fit_pooled([(d, fit_idx[d.name]) for d in train], cfg.layer, cfg.C,
                       kind_weights(cfg.scary_weight))

    def served_of(d: SourceData) -> np.ndarray:
        return served_scores(probe, d.acts, d.mask, cfg.agg, cfg.min_tokens)

    cal_parts = [(d, served_of(d)[cal_idx[d.name]]) for d in train if cal_idx[d.name].size]
    s_cal = np.concatenate([s for _, s in cal_parts])
    cal_desc = ("held-back 30% of every benign training source ("
                + ", ".join(f"{d.name} {s.size}" for d, s in cal_parts) + "), never fit on")
    cal = calibrate(s_cal, benign_set=cal_desc)
    thr = threshold_ladder(cal)

    test_scores = {d.name: (d, served_of(d)) for d in test}
    ref_pos = np.concatenate([s for d, s in test_scores.values() if d.source.kind == "harmful"])
    ref_neg = np.concatenate([s for d, s in test_scores.values() if d.source.kind != "harmful"])
    # out-of-source scores of the training sources under the chosen config (validation)
    oof = loso_scores(train, fit_idx, cfg.layer, cfg.C, cfg.scary_weight,
                      [(cfg.agg, cfg.min_tokens)])["0"]
    val_scores = {d.name: (d, s) for d, s in zip(train, oof, strict=True)}
    y_test = np.concatenate([np.full(s.size, d.source.kind == "harmful")
                             for d, s in test_scores.values()]).astype(np.int8)
    s_test = np.concatenate([s for _, s in test_scores.values()])
    from probes.evaluate import auroc_ci, evaluate_scores

    pooled = evaluate_scores(y_test, s_test, None, thr)
    pooled["auroc_ci"] = auroc_ci(y_test, s_test)
    metrics: dict[str, Any] = {
        "test_sources": source_rows(test_scores, thr, ref_pos, ref_neg),
        "validation_sources": source_rows(val_scores, thr, ref_pos, ref_neg),
        "test_pooled": pooled,
        "calibration_set": {"n": int(s_cal.size),
                            **{f"fpr@{k}": float((s_cal >= t).mean()) for k, t in thr.items()}},
        "worst_test": worst_examples(test_scores),
        "learning_curve": learning_curve(train, test, fit_idx, cfg, seed=seed),
    }
    if explore_readouts:
        metrics["readouts"] = explore(train, fit_idx, cfg, layers)
    cal.update({"aggregation": cfg.agg, "min_tokens": cfg.min_tokens, "scope": scope})
    scores = {"test (pooled)": (y_test, s_test)}
    for d, s in test_scores.values():
        scores[d.name] = (np.full(s.size, int(d.source.kind == "harmful")), s)
    scores["calibration"] = (np.zeros(s_cal.size), s_cal)
    return DetectorResult(
        name="harmful_intent",
        description=f"the user asks for help causing serious harm ({scope} tokens)",
        probe=probe, scope=scope, aggregation=cfg.agg, min_tokens=cfg.min_tokens,
        calibration=cal, metrics=metrics, selection=table[:16],
        datasets=[f"{d.name} ({d.source.kind}, {len(d.examples)}: "
                  f"{fit_idx[d.name].size} fit, {cal_idx[d.name].size} calibration)"
                  for d in train] +
                 [f"TEST {d.name} ({d.source.kind}, {len(d.examples)})" for d in test],
        token_labels=f"request label on the mean of the {scope}-token activations "
                     "(each source the same total weight within its class)",
        scores=scores,
    )
