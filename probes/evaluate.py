"""Request-level metrics: AUROC, TPR at a false-positive rate, per-category breakdown.

- AUROC = P(S⁺ > S⁻) + ½ P(S⁺ = S⁻) (Mann–Whitney, ties count half).
- TPR@FPR α: threshold ``t = threshold_at_fpr(S⁻, α)`` (see calibrate.py), then
  ``TPR = mean(S⁺ ≥ t)``. Measured on the evaluated negatives themselves (the usual
  "TPR at 1% FPR"); the shipped-threshold rates use the calibration thresholds instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from probes.calibrate import threshold_at_fpr

__all__ = ["auroc", "evaluate_scores", "rate_at", "roc_curve", "tpr_at_fpr"]


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (NaN when a class is missing)."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(s, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold giving ``≤ fpr`` on the negatives."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    if not y.any() or y.all():
        return float("nan")
    t = threshold_at_fpr(s[~y], fpr)
    return float((s[y] >= t).mean())


def rate_at(s: np.ndarray, threshold: float) -> float:
    """Fraction of scores ``≥ threshold`` (alert rate)."""
    s = np.asarray(s)
    return float((s >= threshold).mean()) if s.size else float("nan")


def benign_rates(s: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    """``{"fpr@<severity>": rate}`` for scores of benign examples (all labels 0)."""
    return {f"fpr@{name}": rate_at(s, t) for name, t in thresholds.items()}


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) arrays over all thresholds (descending)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
    ys = y[order]
    tp = np.concatenate([[0], np.cumsum(ys)])
    fp = np.concatenate([[0], np.cumsum(~ys)])
    return fp / max(int((~y).sum()), 1), tp / max(int(y.sum()), 1)


def evaluate_scores(y: np.ndarray, s: np.ndarray, categories: Sequence[str | None] | None = None,
                    thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """AUROC, TPR@1%/0.1% FPR, per-category recall at the given thresholds (and AUROC of
    each positive category against all negatives)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    out: dict[str, Any] = {
        "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
        "auroc": auroc(y, s),
        "tpr@fpr0.01": tpr_at_fpr(y, s, 0.01),
        "tpr@fpr0.001": tpr_at_fpr(y, s, 0.001),
    }
    for name, t in (thresholds or {}).items():
        out[f"tpr@{name}"] = rate_at(s[y], t)
    out.update(benign_rates(s[~y], thresholds or {}))
    if categories is not None:
        cats = np.array([c or "uncategorised" for c in categories], dtype=object)
        per: dict[str, Any] = {}
        for c in sorted(set(cats[y])):
            m = y & (cats == c)
            row: dict[str, Any] = {"n": int(m.sum()),
                                   "auroc": auroc(np.concatenate([np.ones(m.sum()),
                                                                  np.zeros((~y).sum())]),
                                                  np.concatenate([s[m], s[~y]]))}
            for name, t in (thresholds or {}).items():
                row[f"tpr@{name}"] = rate_at(s[m], t)
            per[str(c)] = row
        out["per_category"] = per
    return out
