"""Linear probes on residual activations, and their request-level aggregate.

A probe is served per token as a bundle ``linear_probe`` component::

    z(x) = ((x − μ) / σ) · w + b,      s(x) = sigmoid(z(x)) ∈ [0, 1]

Methods:

- ``logreg``: standardise with the training rows' mean ``μ`` and std ``σ``, then
  L2-regularised logistic regression (scikit-learn, lbfgs, balanced class weights):
  ``min_w,b  ½‖w‖² + C Σ_i c_{y_i} log(1 + exp(−(2y_i − 1) z(x_i)))``.
- ``diffmean``: the direction ``u = (m₁ − m₀) / ‖m₁ − m₀‖`` between class means of the
  standardised rows, then a 1-D logistic fit of ``a·(x̃·u) + b`` sets scale and bias
  (so the score is a calibrated probability); ``w = a·u``.

Request level (what the monitor alerts on): the per-token scores ``s_1..s_T`` of the
tokens in the detector's scope, in position order, are aggregated with the policy's
aggregation (``max``, ``mean``, ``ema`` half-life ``h``, ``window_max`` N; the math is
``monitor.judge.aggregate``'s: the serving aggregators themselves) into ``a_t``; a severity
is reached when ``a_t ≥ threshold`` for some ``t ≥ min_tokens``. The request statistic
is therefore

    S = max_{t ≥ min_tokens} a_t          (0 when T < min_tokens)

and every metric and threshold in this toolkit is computed on ``S``. Pooled probes that
hold up on long inputs are the max-style ones (``max``, short-half-life ``ema``): a
harmful span inside a long benign context still drives ``S`` up, where ``mean`` dilutes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.judge.aggregate import Aggregation, make_aggregator

__all__ = [
    "LinearProbe",
    "aggregate_requests",
    "aggregation_name",
    "as_aggregation",
    "fit_diff_of_means",
    "fit_length_slope",
    "fit_logreg",
    "fit_probe",
    "log_tokens",
    "running_aggregate",
    "standardise",
]

STD_FLOOR = 1e-4


@dataclass
class LinearProbe:
    """``z = ((x − mean) / std) · weight + bias`` on one layer."""

    layer: int
    weight: np.ndarray  # float32 [d]
    bias: float
    mean: np.ndarray  # float32 [d]
    std: np.ndarray  # float32 [d]
    method: str = "logreg"
    C: float | None = None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``z`` per row (float32), computed in float32 chunks like the scorer."""
        out = np.empty(x.shape[0], dtype=np.float32)
        for s in range(0, x.shape[0], 65536):
            xs = x[s:s + 65536].astype(np.float32)
            out[s:s + 65536] = ((xs - self.mean) / self.std) @ self.weight + self.bias
        return out

    def scores(self, x: np.ndarray) -> np.ndarray:
        """``sigmoid(z)`` per row."""
        return _sigmoid(self.logits(x))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``((x − mean) / std, mean, std)`` float32, std floored at :data:`STD_FLOOR`."""
    xf = x.astype(np.float32)
    mean = xf.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = np.maximum(xf.std(axis=0, dtype=np.float64).astype(np.float32), STD_FLOOR)
    return (xf - mean) / std, mean, std


def fit_logreg(x: np.ndarray, y: np.ndarray, layer: int, C: float = 0.1,
               sample_weight: np.ndarray | None = None, max_iter: int = 300,
               project_out: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
               ) -> LinearProbe:
    """Standardise, then L2 logistic regression with balanced class weights.

    ``project_out(mean, std)`` (float64 ``[d]`` each) → orthonormal rows ``V`` (float64
    ``[r, d]``): the standardised rows are fit as ``z − (z Vᵀ) V`` and the weight returned
    is ``(I − VᵀV) w``, one linear probe on the raw features whose logit is the same
    function of the projected rows (``probes.pooled.fit_pooled`` ``style``)."""
    from sklearn.linear_model import LogisticRegression

    xs, mean, std = standardise(x)
    v = None if project_out is None else project_out(mean.astype(np.float64),
                                                     std.astype(np.float64))
    if v is not None:
        xs = (xs - (xs @ v.T) @ v).astype(np.float32)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, tol=1e-4)
    clf.fit(xs, y, sample_weight=sample_weight)
    coef = clf.coef_[0]
    if v is not None:
        coef = coef.astype(np.float64)
        coef -= v.T @ (v @ coef)
    return LinearProbe(layer, coef.astype(np.float32), float(clf.intercept_[0]),
                       mean, std, "logreg", C)


def fit_diff_of_means(x: np.ndarray, y: np.ndarray, layer: int,
                      sample_weight: np.ndarray | None = None) -> LinearProbe:
    """Difference of class means in standardised space, scale/bias by a 1-D logistic
    fit (balanced)."""
    from sklearn.linear_model import LogisticRegression

    xs, mean, std = standardise(x)
    y = np.asarray(y).astype(bool)
    u = xs[y].mean(axis=0) - xs[~y].mean(axis=0)
    u = (u / max(float(np.linalg.norm(u)), 1e-12)).astype(np.float32)
    proj = (xs @ u)[:, None]
    clf = LogisticRegression(C=1e4, class_weight="balanced", max_iter=500)
    clf.fit(proj, y, sample_weight=sample_weight)
    a = float(clf.coef_[0, 0])
    return LinearProbe(layer, (a * u).astype(np.float32), float(clf.intercept_[0]),
                       mean, std, "diffmean", None)


def fit_probe(method: str, x: np.ndarray, y: np.ndarray, layer: int, C: float = 0.1,
              sample_weight: np.ndarray | None = None) -> LinearProbe:
    """Dispatch on ``method`` (``logreg`` | ``diffmean``)."""
    if method == "logreg":
        return fit_logreg(x, y, layer, C, sample_weight)
    if method == "diffmean":
        return fit_diff_of_means(x, y, layer, sample_weight)
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------- aggregation
def as_aggregation(agg: dict[str, Any]) -> Aggregation:
    """The policy `Aggregation` of a candidate (``{"kind": ..., <its parameters>}``);
    raises ValueError naming the field for unknown kinds or parameters."""
    return Aggregation(agg["kind"], agg.get("half_life_tokens"), agg.get("window_tokens"),
                       agg.get("length_slope"), agg.get("temperature"),
                       agg.get("skip_tokens"))


def aggregation_name(agg: dict[str, Any]) -> str:
    """``max``, ``mean``, ``ema(h=4)``, ``window_max(N=16)`` (`Aggregation.describe`)."""
    return as_aggregation(agg).describe()


def running_aggregate(scores: np.ndarray, agg: dict[str, Any]) -> np.ndarray:
    """``a_t`` after every token: the serving aggregator (``monitor.judge.aggregate``)."""
    return make_aggregator(as_aggregation(agg)).update(np.asarray(scores, dtype=np.float64))


def aggregate_requests(scores: np.ndarray, example: np.ndarray, n_examples: int,
                       agg: dict[str, Any], min_tokens: int = 1,
                       in_scope: np.ndarray | None = None,
                       judge_at: str = "every_token") -> np.ndarray:
    """Request statistic per example: ``S = max a_t`` over the judged tokens ``t`` with
    ``t ≥ min_tokens`` (0 when there is none). Judged tokens, as the tracker's policy
    ``judge_at``: ``every_token``, every in-scope token; ``span_end``, the last token of
    each run of in-scope rows (``monitor.judge.aggregate.span_end_rows`` on the example's
    rows; the example is complete). Rows must be in position order within each example
    and hold every row of it (an out-of-scope row ends a span); ``in_scope`` masks rows
    out of the scope (None: all in scope)."""
    from monitor.judge.aggregate import span_end_rows

    if judge_at not in ("every_token", "span_end"):
        raise ValueError(f"judge_at: expected every_token or span_end; found {judge_at!r}")
    if in_scope is None:
        in_scope = np.ones(example.size, dtype=bool)
    out = np.zeros(n_examples, dtype=np.float64)
    if example.size == 0:
        return out
    order = np.argsort(example, kind="stable")
    ex, sc, m = example[order], scores[order], np.asarray(in_scope, dtype=bool)[order]
    bounds = np.flatnonzero(np.diff(ex)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [ex.size]])
    for s, e in zip(starts, ends, strict=True):
        mm = m[s:e]
        n = int(np.count_nonzero(mm))
        if n == 0 or n < min_tokens:
            continue
        a = running_aggregate(sc[s:e][mm], agg)
        judged = np.arange(1, n + 1) >= min_tokens
        if judge_at == "span_end":
            judged &= span_end_rows(mm)[mm]
        if judged.any():
            out[ex[s]] = float(a[judged].max())
    return out


def log_tokens(n_tokens: np.ndarray) -> np.ndarray:
    """``log(max(n, 1))`` (float64, same shape): the ``log t`` the served ``mean_logit``
    length term multiplies (``monitor.judge.aggregate``), a request with no in-scope
    token counting as one."""
    return np.log(np.maximum(np.asarray(n_tokens), 1).astype(np.float64))


def fit_length_slope(scores: np.ndarray, n_tokens: np.ndarray) -> float:
    """Least-squares slope ``a`` of request scores on ``log(max(n, 1))``: the length
    drift a length-debiased probe removes (``s' = s − a·log n``; served as the
    ``mean_logit`` aggregation's ``length_slope``, ``monitor.judge.aggregate``).

    ``scores``: float ``[n_requests]`` on the logit scale (the request's mean in-scope
    logit); ``n_tokens``: int ``[n_requests]``, the request's in-scope tokens (``t`` of
    the served aggregate at the request's last judged token; a request with none counts
    as 1). Fit it on BENIGN TRAINING requests only (never calibration or test rows): it
    says how fast ordinary requests drift up with length, not how harmful ones differ.
    Needs at least two distinct lengths."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = np.asarray(n_tokens).reshape(-1)
    if s.size != n.size:
        raise ValueError(f"fit_length_slope: scores and n_tokens must have the same length; "
                         f"found {s.size} and {n.size}")
    ln = log_tokens(n)
    if s.size < 2 or np.ptp(ln) == 0.0:
        raise ValueError("fit_length_slope: expected requests of at least two distinct "
                         f"lengths; found {np.unique(ln).size} over {s.size} requests")
    return float(np.polyfit(ln, s, 1)[0])


def default_aggregations(kinds: Sequence[str] = ("max", "mean", "ema")) -> list[dict[str, Any]]:
    """Candidate aggregations searched on validation data."""
    out: list[dict[str, Any]] = []
    if "max" in kinds:
        out.append({"kind": "max"})
    if "mean" in kinds:
        out.append({"kind": "mean"})
    if "ema" in kinds:
        out += [{"kind": "ema", "half_life_tokens": h} for h in (2.0, 4.0, 8.0, 16.0)]
    return out


# ----------------------------------------------------------------------- model selection
@dataclass
class Candidate:
    """One (layer, method, C, aggregation) point of the validation search."""

    layer: int
    method: str
    C: float | None
    aggregation: dict[str, Any]
    metrics: dict[str, float]
    criterion: float


def grid_search(
    fit_rows: dict[int, tuple[np.ndarray, ...]],
    val_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]],
    *,
    methods: Sequence[tuple[str, float | None]],
    aggregations: Sequence[dict[str, Any]],
    min_tokens: int,
    criterion: Any,
    progress: bool = True,
) -> tuple[list[Candidate], dict[tuple[int, str, float | None], LinearProbe]]:
    """Fit every (layer, method, C) on ``fit_rows[layer] = (x, y)`` or ``(x, y, w)``
    (``w``: per-row sample weights) and score every
    aggregation on each validation set ``name -> (x_by_layer_rows, example, labels,
    in_scope, n_examples)`` (``x`` there is a dict layer -> rows). ``criterion(metrics)``
    maps ``{f"{set}.auroc", f"{set}.tpr@fpr0.01", ...}`` to a number to maximise.
    Validation data only: test data never enters the search."""
    from tqdm.auto import tqdm

    from probes.evaluate import auroc, tpr_at_fpr

    probes: dict[tuple[int, str, float | None], LinearProbe] = {}
    out: list[Candidate] = []
    jobs = [(lay, m, c) for lay in sorted(fit_rows) for m, c in methods]
    for lay, m, c in tqdm(jobs, desc="fit", disable=not progress, leave=False):
        x, y, *rest = fit_rows[lay]
        w = rest[0] if rest else None
        probe = fit_probe(m, x, y, lay, c if c is not None else 1.0, w)
        probes[(lay, m, c)] = probe
        token_scores = {name: probe.scores(v[0][lay]) for name, v in val_sets.items()}
        for agg in aggregations:
            met: dict[str, float] = {}
            for name, (_, ex, labels, scope, n) in val_sets.items():
                s = aggregate_requests(token_scores[name], ex, n, agg, min_tokens, scope)
                met[f"{name}.auroc"] = auroc(labels, s)
                met[f"{name}.tpr@fpr0.01"] = tpr_at_fpr(labels, s, 0.01)
            out.append(Candidate(lay, m, c, agg, met, float(criterion(met))))
    out.sort(key=lambda cd: -cd.criterion)
    return out, probes
