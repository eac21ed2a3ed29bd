"""Thresholds at target false-positive rates on benign traffic.

For benign request statistics ``S_1..S_n`` and a target rate ``α``, the threshold is
the smallest ``t`` with ``#{i : S_i ≥ t} ≤ ⌊α n⌋``, i.e. just above the
``(⌊α n⌋ + 1)``-th largest benign score (``np.nextafter`` of it), so the empirical
false-positive rate on the calibration set is ``≤ α`` (alerts fire on ``S ≥ t``).
With ``n`` benign requests the ``α = 0.1%`` threshold rests on ``⌊0.001 n⌋`` scores:
report ``n`` next to it (``n_benign``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["calibrate", "fpr_key", "policy_snippet", "threshold_at_fpr"]


def fpr_key(fpr: float) -> str:
    """``0.01 -> "fpr_0.01"`` (the bundle's calibration key)."""
    return f"fpr_{fpr:g}"


def threshold_at_fpr(benign: np.ndarray, fpr: float) -> float:
    """Smallest threshold whose empirical FPR on ``benign`` is ``≤ fpr`` (in [0, 1])."""
    s = np.sort(np.asarray(benign, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no benign scores to calibrate on")
    if not 0 <= fpr < 1:
        raise ValueError("fpr must be in [0, 1)")
    k = int(np.floor(fpr * s.size + 1e-9))
    t = float(np.nextafter(s[k], np.inf)) if k < s.size else float(s[-1])
    return float(min(max(t, 0.0), 1.0))


def calibrate(benign: np.ndarray, fprs: Sequence[float] = (0.01, 0.001),
              benign_set: str = "") -> dict[str, Any]:
    """``{"fpr_0.01": t1, "fpr_0.001": t2, "benign_set": ..., "n_benign": n}``."""
    out: dict[str, Any] = {fpr_key(a): threshold_at_fpr(benign, a) for a in fprs}
    out["benign_set"] = benign_set
    out["n_benign"] = int(np.asarray(benign).size)
    return out


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
                  f"      warn: {d['thresholds']['warn']:.6g}",
                  f"      critical: {d['thresholds']['critical']:.6g}"]
    return "\n".join(lines) + "\n"
