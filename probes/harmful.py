"""The ``harmful_intent`` recipe: diverse sources, user-token pooling, leave-one-source-out.

What is served and what is trained (they agree by construction):

- **Tokens in scope** = the user's text (:func:`user_token_mask`; the single place the
  token-role convention enters training, so it can switch to the shared role segmenter).
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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.collect import SEG_USER, Activations
from probes.datasets import ChatExample
from probes.evaluate import auroc, tpr_at_fpr
from probes.sources import Source
from probes.train import LinearProbe, aggregate_requests, fit_logreg

__all__ = [
    "SourceData",
    "fit_pooled",
    "pooled_features",
    "served_scores",
    "source_weights",
    "user_token_mask",
]


def user_token_mask(acts: Activations) -> np.ndarray:
    """Rows that are the user's text (bool ``[n_rows]``): the detector's token scope.

    The one switch point between training and the serving role convention.
    """
    return acts.segment == SEG_USER


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
