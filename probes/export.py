"""Export trained detectors as a bundle the sidecar loads unchanged (docs/BUNDLE.md).

Each detector is one ``linear_probe`` component (``weight [d]``, ``bias []``, ``mean``,
``std``; float32) read out with weight 1 and bias 0, so the served per-token score is

    s(x) = sigmoid(((x − mean) / std) · w + b)

exactly as :meth:`probes.train.LinearProbe.scores` computes it. The manifest is written
by ``monitor.score.bundle.write_bundle`` (sha256 of the weights file, validated by
``load_bundle``). Next to it: ``policy.suggested.yaml`` (policies/ format) with the
chosen scope, aggregation, ``min_tokens`` and calibrated thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.constants import hook_name
from probes.calibrate import fpr_key, policy_snippet
from probes.train import LinearProbe, aggregation_name

__all__ = ["DetectorResult", "bundle_scope", "component_name", "export_bundle", "probe_tensors",
           "threshold_keys", "threshold_ladder"]

SUGGESTED_POLICY = "policy.suggested.yaml"


@dataclass
class DetectorResult:
    """Everything export and report need about one trained detector."""

    name: str
    description: str
    probe: LinearProbe
    scope: str
    aggregation: dict[str, Any]
    min_tokens: int
    calibration: dict[str, Any]
    metrics: dict[str, Any]
    selection: list[dict[str, Any]]
    datasets: list[str]
    token_labels: str
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the policy ``judge_at`` the statistic was computed (and calibrated) with
    judge_at: str = "every_token"
    #: another detector (exported before this one) whose probe this one reads: the
    #: bundle holds that probe's component once and both detectors read its column
    #: (``monitor.score.pack``: one column, two read-out weights); "" = its own component
    component_of: str = ""

    @property
    def thresholds(self) -> dict[str, float]:
        """``warn`` = 1% FPR threshold, ``critical`` = 0.1% FPR threshold, made a valid
        policy ladder (``0 < warn < critical < 1``): when the benign set is too small to
        resolve 0.1% (``n < 1000``, both land above the benign maximum), ``critical`` is
        put half way between ``warn`` and 1."""
        return threshold_ladder(self.calibration)


def threshold_keys(cal: dict[str, Any]) -> dict[str, str]:
    """Severity -> the calibration key its threshold is read from: ``cal["thresholds_from"]``
    when present (a detector served in a union takes a share of the budget,
    ``probes.window``: e.g. ``fpr_0.0008``, ``union_fpr_0.001``), else ``fpr_0.01`` /
    ``fpr_0.001``. Every key ends in ``_<rate>``."""
    return dict(cal.get("thresholds_from")
                or {"warn": fpr_key(0.01), "critical": fpr_key(0.001)})


def threshold_ladder(cal: dict[str, Any]) -> dict[str, float]:
    """Policy thresholds from a calibration dict (see ``DetectorResult.thresholds``): the
    values under :func:`threshold_keys`."""
    keys = threshold_keys(cal)
    # clipped into (0, 1) with room for critical above warn; 0.9999 / 0.99999 stay below
    # the window detector's calibrated values (~0.9991 / 0.9997: a clip there would serve
    # a lower threshold than the one calibrated) and survive the policy's 6 digits
    warn = float(min(max(cal[keys["warn"]], 1e-6), 0.9999))
    crit = float(min(cal[keys["critical"]], 0.99999))
    if crit <= warn:
        crit = warn + 0.5 * (1.0 - warn)
    return {"warn": warn, "critical": crit}


def bundle_scope(scope: str) -> str:
    """The bundle's ``token_scope`` for a policy scope: the scope itself where the bundle
    format knows it (``prompt``, ``generated``, ``both``, role words such as ``user``),
    else ``prompt`` (a probe of prompt tokens)."""
    from monitor.score.bundle import TOKEN_SCOPES

    return scope if scope in TOKEN_SCOPES else "prompt"


def component_name(detector: str, probe: LinearProbe) -> str:
    """E.g. ``harmful_intent_logreg_l9``."""
    return f"{detector}_{probe.method}_l{probe.layer}"


def probe_tensors(cname: str, probe: LinearProbe) -> dict[str, Any]:
    """Tensors of one ``linear_probe`` component, named ``<component>.<role>``."""
    import torch

    return {
        f"{cname}.weight": torch.from_numpy(np.ascontiguousarray(probe.weight, np.float32)),
        f"{cname}.bias": torch.tensor(float(probe.bias), dtype=torch.float32),
        f"{cname}.mean": torch.from_numpy(np.ascontiguousarray(probe.mean, np.float32)),
        f"{cname}.std": torch.from_numpy(np.ascontiguousarray(probe.std, np.float32)),
    }


def _clean(obj: Any) -> Any:
    """JSON-safe copy (NaN -> None, numpy scalars -> Python)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _slim_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for the manifest: headline numbers, no long lists."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = {kk: vv for kk, vv in v.items()
                      if not isinstance(vv, list) and kk != "per_category"}
        else:
            out[k] = v
    return out


def export_bundle(out: Path, results: Sequence[DetectorResult], *, model_name: str, d_model: int,
                  n_layers: int, name: str, description: str = "",
                  policy_mode: str = "observe") -> Any:
    """Write ``manifest.json`` + ``weights.safetensors`` (via ``write_bundle``) and
    ``policy.suggested.yaml``; return the loaded :class:`monitor.score.bundle.Bundle`."""
    from monitor.score.bundle import write_bundle

    components: list[dict[str, Any]] = []
    detectors: list[dict[str, Any]] = []
    tensors: dict[str, Any] = {}
    policy: dict[str, dict[str, Any]] = {}
    written: dict[str, tuple[str, LinearProbe]] = {}   # detector -> its component, probe
    for r in results:
        p = r.probe
        if r.component_of:
            if r.component_of not in written or written[r.component_of][1] is not p:
                raise ValueError(f"{r.name}.component_of: expected a detector exported "
                                 f"before it with the same probe; found "
                                 f"{r.component_of!r} (exported: {sorted(written)})")
            cname = written[r.component_of][0]
        else:
            cname = component_name(r.name, p)
            tensors.update(probe_tensors(cname, p))
            components.append({
                "name": cname, "kind": "linear_probe", "layer": int(p.layer),
                "hook_name": hook_name(p.layer),
                "tensors": {role: f"{cname}.{role}"
                            for role in ("weight", "bias", "mean", "std")},
            })
        written[r.name] = (cname, p)
        thr = r.thresholds
        detectors.append({
            "name": r.name,
            "description": r.description,
            "inputs": [{"component": cname, "weight": 1.0}],
            "bias": 0.0,
            "token_scope": bundle_scope(r.scope),
            "default_thresholds": {"warn": float(thr["warn"]), "critical": float(thr["critical"])},
            "calibration": _clean(r.calibration),
            "provenance": _clean({
                "method": p.method, "C": p.C, "layer": int(p.layer),
                "aggregation": r.aggregation, "min_tokens": r.min_tokens,
                "judge_at": r.judge_at, "token_labels": r.token_labels,
                "datasets": r.datasets,
                "metrics": _slim_metrics(r.metrics),
                "selection": "chosen on validation data only (leave-one-source-out for "
                             "harmful_intent; top candidates in REPORT.md); test sources "
                             "never used for a choice or a threshold",
                "request_statistic": "max over judged t >= min_tokens of the running "
                                     "aggregate (monitor.judge.aggregate; judged: "
                                     + ("every token" if r.judge_at == "every_token" else
                                        "the last token of each span in scope") + ")",
                "toolkit": "probes (safety-probes)",
            }),
        })
        rule = r.calibration.get("threshold_rule",
                                 "warn = 1% FPR, critical = 0.1% FPR on benign traffic")
        policy[r.name] = {"scope": r.scope, "aggregation": r.aggregation,
                          "min_tokens": r.min_tokens,
                          **({"judge_at": r.judge_at}
                             if r.judge_at != "every_token" or r.component_of else {}),
                          "thresholds": thr,
                          "note": f"layer {p.layer} {p.method}"
                                  + (f" (the {r.component_of} probe)" if r.component_of
                                     else "")
                                  + f", {aggregation_name(r.aggregation)}; {rule}"}
    manifest = {
        "name": name, "description": description,
        "model": {"name": model_name, "d_model": int(d_model), "n_layers": int(n_layers)},
        "components": components, "detectors": detectors,
    }
    out.mkdir(parents=True, exist_ok=True)
    bundle = write_bundle(out, manifest, tensors)
    (out / SUGGESTED_POLICY).write_text(
        "# Suggested by probes from this bundle's calibration; review before mode: alert.\n"
        + policy_snippet(policy, version=f"{name}-suggested", mode=policy_mode),
        encoding="utf-8")
    return bundle
