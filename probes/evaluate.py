"""Request-level metrics: AUROC, TPR at a false-positive rate, per-category breakdown.

- AUROC = P(S⁺ > S⁻) + ½ P(S⁺ = S⁻) (Mann–Whitney, ties count half).
- TPR@FPR α: threshold ``t = threshold_at_fpr(S⁻, α, clip=False)`` (see calibrate.py),
  then ``TPR = mean(S⁺ ≥ t)``; like AUROC it depends on the ranking only, so it is the
  same for ``S`` and any strictly increasing map of it (a logit or its sigmoid); ties
  are never split, so negatives tied at the top leave no positive above them. Measured
  on the evaluated negatives themselves (the usual "TPR at 1% FPR"); the
  shipped-threshold rates use the calibration thresholds instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from probes.calibrate import threshold_at_fpr

__all__ = ["auroc", "auroc_ci", "evaluate_scores", "rate_at", "roc_curve", "tpr_at_fpr",
           "wilson_ci"]


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (NaN when a class is missing)."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(s, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold giving ``≤ fpr`` on the negatives (any score
    scale: the threshold is not clipped to [0, 1])."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    if not y.any() or y.all():
        return float("nan")
    t = threshold_at_fpr(s[~y], fpr, clip=False)
    return float((s[y] >= t).mean())


def rate_at(s: np.ndarray, threshold: float) -> float:
    """Fraction of scores ``≥ threshold`` (alert rate)."""
    s = np.asarray(s)
    return float((s >= threshold).mean()) if s.size else float("nan")


def benign_rates(s: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    """``{"fpr@<severity>": rate}`` for scores of benign examples (all labels 0)."""
    return {f"fpr@{name}": rate_at(s, t) for name, t in thresholds.items()}


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) arrays over all distinct thresholds (descending), starting at (0, 0):
    one point per distinct score, so tied scores move FPR and TPR together (a diagonal
    step, the ½ that AUROC gives ties) whatever their input order."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    ys = y[order]
    last = np.r_[np.flatnonzero(np.diff(s[order]) != 0), ys.size - 1] if ys.size else []
    tp = np.concatenate([[0], np.cumsum(ys)[last]])
    fp = np.concatenate([[0], np.cumsum(~ys)[last]])
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


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate ``k / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, mid - half)), float(min(1.0, mid + half))


def auroc_ci(y: np.ndarray, s: np.ndarray, n_boot: int = 200,
             seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the AUROC, resampling positives and negatives
    separately (stratified). ``(nan, nan)`` when a class is missing."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    lab = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    vals = [auroc(lab, np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]))
            for _ in range(n_boot)]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)
