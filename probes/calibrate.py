"""Thresholds at target false-positive rates on benign traffic.

For benign request statistics ``S_1..S_n`` with calibration weights ``w_i ≥ 0``,
``Σ w_i = 1``, and a target rate ``α``, the threshold is the smallest ``t`` with

    W(t) = Σ_{i : S_i ≥ t} w_i  ≤  α + RATE_TOL        (alerts fire on ``S ≥ t``)

i.e. ``np.nextafter(v, +inf)`` of the smallest distinct score ``v`` whose strictly
higher scores weigh ``≤ α`` (tied scores fall on the same side, so a tie is never split);
the weighted empirical false-positive rate on the calibration set is then ``≤ α``.
``RATE_TOL`` (1e-9) absorbs float rounding of the weight sums: a rate within 1e-9 of
``α`` counts as ``α``. Thresholds are clipped to ``[0, 1]`` (served statistics are
probabilities). The calibration **weighting** (:data:`WEIGHTINGS`) fixes ``w``:

- ``row`` (the default): ``w_i = 1/n``, i.e. ``#{i : S_i ≥ t} ≤ ⌊α n⌋`` — just above the
  ``(⌊α n⌋ + 1)``-th largest score. The biggest benign source dominates.
- ``source``: the rows carry a source label ``g`` (``G`` sources, ``n_g`` rows each);
  ``w_i = 1 / (G · n_{g(i)})``: every source the same total weight ``1/G``, so ``W(t)``
  is the mean over sources of each source's own false-positive rate.
- ``worst``: not a weighting of rows but the smallest ``t`` at which EVERY source's own
  rate ``#{i ∈ g : S_i ≥ t} / n_g ≤ α`` (+ RATE_TOL): the maximum over sources of each
  source's ``row`` threshold. Source ``g``'s quantile rests on its own ``n_g`` rows
  (``⌊α n_g⌋`` of them may lie above it): with ``n_g < 1/α`` the threshold is just
  above that source's highest score.

How much data a threshold rests on: Kish's effective sample size
``n_eff = (Σ w)² / Σ w² = 1 / Σ w²`` (``row``: ``n``; ``source``: ``G² / Σ_g 1/n_g``).
:func:`calibrate` records the weighting, the rows per source and ``n_eff``.

The study scale (:func:`ecdf_scores`, ``u``) uses the same weights and tolerance:
``u ≥ 1 − α − RATE_TOL`` ⇔ ``S ≥ threshold_at_fpr(…, α)`` up to the clip.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["POLICY_DIGITS", "RATE_TOL", "WEIGHTINGS", "calibrate", "calibration_weights",
           "ecdf_scores", "fpr_key", "kish_n", "policy_snippet", "policy_threshold",
           "threshold_at_fpr"]

WEIGHTINGS: tuple[str, ...] = ("row", "source", "worst")
"""Calibration weightings (module doc)."""

RATE_TOL = 1e-9
"""A weighted rate within this of ``α`` counts as ``α`` (float rounding of weight sums)."""


def fpr_key(fpr: float) -> str:
    """``0.01 -> "fpr_0.01"`` (the bundle's calibration key)."""
    return f"fpr_{fpr:g}"


def _groups(n: int, groups: np.ndarray | Sequence[Any] | None
            ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Source labels (sorted, ``[G]``), source code per row (int64 ``[n]``, ``0..G-1``
    indexing the labels) and rows per source (int64 ``[G]``); ``None``: one source
    (labelled ``all``)."""
    if groups is None:
        return ["all"], np.zeros(n, dtype=np.int64), np.array([n], dtype=np.int64)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups: expected one source label per score ({n}); found shape "
                         f"{g.shape}")
    labels, code, counts = np.unique(g, return_inverse=True, return_counts=True)
    return [str(x) for x in labels], code.astype(np.int64), counts.astype(np.int64)


def _check(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"calibration weighting: expected one of {list(WEIGHTINGS)}; "
                         f"found {weighting!r}")


def calibration_weights(n: int, groups: np.ndarray | Sequence[Any] | None = None,
                        weighting: str = "row") -> np.ndarray:
    """Per-row weights (float64 ``[n]``, sum 1) of ``row`` or ``source`` weighting (module
    doc); ``worst`` weighs each source's rows on their own (``1/n_g`` within source ``g``,
    summing to 1 per source)."""
    _check(weighting)
    if n == 0:
        raise ValueError("no benign scores to calibrate on")
    _, code, counts = _groups(n, groups)
    if weighting == "row":
        return np.full(n, 1.0 / n)
    per = 1.0 / counts if weighting == "worst" else 1.0 / (counts.size * counts)
    return per[code]


def kish_n(weights: np.ndarray) -> float:
    """Kish's effective sample size ``(Σ w)² / Σ w²`` of calibration weights."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / np.sum(w * w))


def _weighted_threshold(s: np.ndarray, w: np.ndarray, fpr: float) -> float:
    """The module rule, unclipped: ``nextafter`` of the smallest distinct score ``v``
    with ``Σ_{S_i > v} w_i ≤ fpr + RATE_TOL``."""
    order = np.argsort(-s, kind="stable")
    sd, wd = s[order], w[order]
    last = np.r_[sd[1:] != sd[:-1], True]            # last row of each run of ties
    vals = sd[last]                                  # distinct scores, descending
    above = np.r_[0.0, np.cumsum(wd)[last][:-1]]     # weight strictly above each
    j = int(np.flatnonzero(above <= fpr + RATE_TOL)[-1])  # above[0] = 0: never empty
    return float(np.nextafter(vals[j], np.inf))


def _source_thresholds(s: np.ndarray, code: np.ndarray, counts: np.ndarray,
                       fpr: float) -> list[float]:
    """Each source's own ``row`` threshold (unclipped, ``[G]``; ``code`` / ``counts`` as
    :func:`_groups` gives them): the ``worst`` rule is their maximum."""
    return [_weighted_threshold(s[code == g], np.full(int(n), 1.0 / n), fpr)
            for g, n in enumerate(counts)]


def threshold_at_fpr(benign: np.ndarray, fpr: float,
                     groups: np.ndarray | Sequence[Any] | None = None,
                     weighting: str = "row", *, clip: bool = True) -> float:
    """Smallest threshold whose weighted empirical FPR on ``benign`` is ``≤ fpr`` (module
    doc), clipped to [0, 1] (``clip``: a served statistic is a probability; pass
    ``clip=False`` for scores on any other scale, e.g. logits, where the clip would
    move the threshold). ``groups``: one source label per score (``source`` /
    ``worst``; ``None`` = one source, where every weighting equals ``row``)."""
    s = np.asarray(benign, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no benign scores to calibrate on")
    if not 0 <= fpr < 1:
        raise ValueError("fpr must be in [0, 1)")
    if weighting == "worst":
        _, code, counts = _groups(s.size, groups)
        t = max(_source_thresholds(s, code, counts, fpr))
    else:
        t = _weighted_threshold(s, calibration_weights(s.size, groups, weighting), fpr)
    return _unit(t) if clip else float(t)


def _unit(t: float) -> float:
    """``t`` clipped to [0, 1] (the served statistics' scale)."""
    return float(min(max(t, 0.0), 1.0))


def ecdf_scores(cal: np.ndarray, s: np.ndarray,
                groups: np.ndarray | Sequence[Any] | None = None,
                weighting: str = "row") -> np.ndarray:
    """Scores ``s`` on the scale of the calibration rows ``cal`` (float64 ``[len(s)]``):
    ``row``: ``u_i = |{c ∈ cal : c < s_i}| / |cal|`` (the empirical CDF); ``source``: the
    mean over sources of each source's own such CDF (the weighted CDF,
    :func:`calibration_weights`); ``worst``: the minimum over sources. So
    ``u ≥ 1 − α − RATE_TOL`` ⇔ ``s ≥`` the unclipped :func:`threshold_at_fpr` at ``α``."""
    c = np.asarray(cal, dtype=np.float64)
    if c.size == 0:
        raise ValueError("ecdf_scores: cal must not be empty (a fold without calibration rows)")
    _check(weighting)
    x = np.asarray(s, dtype=np.float64)
    if weighting == "row" or groups is None:
        return np.searchsorted(np.sort(c), x, side="left") / c.size
    _, code, counts = _groups(c.size, groups)
    per = [np.searchsorted(np.sort(c[code == g]), x, side="left") / counts[g]
           for g in range(counts.size)]
    return np.mean(per, axis=0) if weighting == "source" else np.min(per, axis=0)


def calibrate(benign: np.ndarray, fprs: Sequence[float] = (0.01, 0.001),
              benign_set: str = "", groups: np.ndarray | Sequence[Any] | None = None,
              weighting: str = "row") -> dict[str, Any]:
    """``{"fpr_0.01": t1, "fpr_0.001": t2, "benign_set": ..., "n_benign": n, "weighting":
    ..., "weighting_rule": ..., "n_per_source": {label: n_g}, "n_eff": Kish n}`` (module
    doc; ``n_per_source`` only with ``groups``). ``worst`` adds ``binding_source``: per
    rate, the source whose own threshold is the maximum (its ``n_g`` rows carry it)."""
    s = np.asarray(benign, dtype=np.float64)
    raw = {a: threshold_at_fpr(s, a, groups, weighting, clip=False) for a in fprs}
    out: dict[str, Any] = {fpr_key(a): _unit(t) for a, t in raw.items()}
    # a threshold the [0, 1] clip pulled down (benign statistics saturated at 1.0: no
    # served threshold holds the rate) is recorded with the rate it does hold, and logged
    over = {a: _rate_at(s, _unit(t), groups, weighting) for a, t in raw.items() if t > 1.0}
    if over:
        out["unattainable"] = {fpr_key(a): r for a, r in over.items()}
        log.warning("calibrate: %s: benign scores saturate at 1.0; no threshold in [0, 1] "
                    "holds %s (the clipped threshold alerts on %s of the calibration set)",
                    benign_set or "benign set", [fpr_key(a) for a in over],
                    [f"{r:.4f}" for r in over.values()])
    out["benign_set"] = benign_set
    out["n_benign"] = int(s.size)
    out["weighting"] = weighting
    out["weighting_rule"] = _RULES[weighting]
    names, code, counts = _groups(s.size, groups)
    if groups is not None:
        out["n_per_source"] = {k: int(c) for k, c in zip(names, counts, strict=True)}
    if weighting == "worst":
        out["n_eff"] = int(counts.min())
        out["binding_source"] = {
            fpr_key(a): names[int(np.argmax(_source_thresholds(s, code, counts, a)))]
            for a in fprs}
    else:
        out["n_eff"] = round(kish_n(calibration_weights(s.size, groups, weighting)), 1)
    return out


def _rate_at(s: np.ndarray, t: float, groups: np.ndarray | Sequence[Any] | None,
             weighting: str) -> float:
    """The calibration set's false-alert rate at ``t`` under ``weighting`` (``worst``: the
    largest per-source rate)."""
    hit = s >= t
    if weighting == "worst":
        _, code, counts = _groups(s.size, groups)
        return float(np.max(np.bincount(code, weights=hit, minlength=counts.size) / counts))
    return float(np.sum(calibration_weights(s.size, groups, weighting)[hit]))


POLICY_DIGITS = 6
"""Significant digits of a threshold written into a policy (:func:`policy_threshold`)."""


def policy_threshold(t: float, digits: int = POLICY_DIGITS) -> str:
    """``t`` as a policy number with ``digits`` significant digits, rounded UP, so the
    written value is never below ``t``: a threshold sits just above a calibration score
    (``nextafter``), and rounding it down would alert on that score."""
    # the float's shortest repr: it parses back to ``t``, so any decimal at or above it
    # parses to a float at or above ``t`` (rounding to the nearest float is monotone)
    d = Decimal(repr(float(t)))
    if d == 0:
        return "0"
    q = Decimal(1).scaleb(d.adjusted() - digits + 1)
    out = format(d.quantize(q, rounding=ROUND_CEILING).normalize(), "f")
    if float(out) < t:      # cannot happen (the argument above): a guard, not a branch
        raise AssertionError(f"policy_threshold: {out} < {t!r}")
    return out


_RULES = {
    "row": "every calibration row the same weight 1/n; threshold = smallest t with "
           "#{S >= t} <= floor(alpha n) (ties never split)",
    "source": "every benign calibration source the same total weight (row weight "
              "1/(G n_g)); threshold = smallest t with sum of weights of rows with S >= t "
              "<= alpha, i.e. the mean over sources of each source's own rate <= alpha "
              "(ties never split)",
    "worst": "threshold = smallest t at which every calibration source's own rate "
             "#{S >= t in g}/n_g <= alpha (the maximum of the per-source row thresholds); "
             "n_eff = the smallest source's rows",
}


def policy_snippet(detectors: dict[str, dict[str, Any]], version: str = "probes-suggested",
                   mode: str = "observe") -> str:
    """A policy YAML (policies/ format) for detectors given as
    ``{name: {scope, aggregation, min_tokens, judge_at (optional), thresholds: {warn,
    critical}, note}}``."""
    lines = [f'version: "{version}"',
             "description: suggested by probes from the bundle's calibration "
             "(warn = 1% FPR, critical = 0.1% FPR on benign traffic)",
             "defaults:", f"  mode: {mode}", "detectors:"]
    for name, d in detectors.items():
        agg = d["aggregation"]
        params = "".join(f", {k}: {v:g}" if isinstance(v, float) else f", {k}: {v}"
                         for k, v in agg.items() if k != "kind")
        if d.get("note"):
            lines.append(f"  # {name}: {d['note']}")
        lines += [f"  {name}:", f"    scope: {d['scope']}",
                  f"    aggregation: {{kind: {agg['kind']}{params}}}",
                  f"    min_tokens: {int(d['min_tokens'])}",
                  *([f"    judge_at: {d['judge_at']}"] if d.get("judge_at") else []),
                  "    thresholds:",
                  f"      warn: {policy_threshold(d['thresholds']['warn'])}",
                  f"      critical: {policy_threshold(d['thresholds']['critical'])}"]
    return "\n".join(lines) + "\n"
