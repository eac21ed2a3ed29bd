"""Evaluation report: ``REPORT.md`` plus ROC and score-histogram PNGs (matplotlib Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probes.evaluate import roc_curve
from probes.train import aggregation_name

__all__ = ["plot_histograms", "plot_roc", "write_report"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """ROC curves (log-x FPR axis) of ``{label: (y, scores)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    for name, (y, s) in curves.items():
        if len(set(np.asarray(y).tolist())) < 2:
            continue
        fpr, tpr = roc_curve(y, s)
        ax.plot(np.maximum(fpr, 1e-4), tpr, label=name)
    ax.axvline(0.01, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false-positive rate (log)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(path: Path, groups: dict[str, np.ndarray], thresholds: dict[str, float],
                    title: str) -> None:
    """Overlaid request-score histograms with threshold lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
    bins = np.linspace(0, 1, 41)
    for name, s in groups.items():
        if len(s):
            ax.hist(s, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(s)})")
    for k, t in thresholds.items():
        ax.axvline(t, color="k", ls="--" if k == "warn" else "-", lw=1, label=f"{k} {t:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("request score S (aggregated as served)")
    ax.set_ylabel("density (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = ["| set | n pos | n neg | AUROC | TPR@1%FPR | TPR@0.1%FPR | TPR@warn | FPR@warn "
            "| FPR@critical |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        if not isinstance(m, dict) or "auroc" not in m:
            continue
        rows.append(f"| {name} | {m['n_pos']} | {m['n_neg']} | {_fmt(m['auroc'])} | "
                    f"{_fmt(m['tpr@fpr0.01'])} | {_fmt(m['tpr@fpr0.001'])} | "
                    f"{_fmt(m.get('tpr@warn', float('nan')))} | "
                    f"{_fmt(m.get('fpr@warn', float('nan')))} | "
                    f"{_fmt(m.get('fpr@critical', float('nan')))} |")
    return rows


def write_report(out: Path, results: Sequence[Any], model_name: str) -> Path:
    """Write ``out/REPORT.md`` and ``out/<detector>_{roc,hist}.png``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Default detectors for {model_name}", "",
             "Built by `python -m probes build-default --out bundles/default` "
             "(see docs/PROBES.md). All numbers are **request-level, as served**: per-token "
             "scores over the detector's scope, aggregated with the chosen aggregation, "
             "request score `S = max_{t >= min_tokens} a_t`; thresholds `warn`/`critical` "
             "= 1% / 0.1% FPR on the benign calibration set. Test sets were not used for "
             "any choice.", ""]
    for r in results:
        p = r.probe
        thr = r.thresholds
        lines += [f"## {r.name}", "", r.description, "",
                  f"- probe: layer **{p.layer}**, method **{p.method}**"
                  + (f", C = {p.C:g}" if p.C else "")
                  + f"; scope **{r.scope}**; aggregation **{aggregation_name(r.aggregation)}**, "
                  f"min_tokens {r.min_tokens}",
                  f"- thresholds: warn **{thr['warn']:.4f}** (1% FPR), critical "
                  f"**{thr['critical']:.4f}** (0.1% FPR) on {r.calibration['benign_set']} "
                  f"(n = {r.calibration['n_benign']})",
                  f"- token labels: {r.token_labels}",
                  "- data: " + "; ".join(r.datasets), ""]
        lines += _metric_rows(r.metrics)
        lines.append("")
        for k in ("hard_negatives", "calibration_set", "calibration_dangerous_benign"):
            if k in r.metrics:
                m = r.metrics[k]
                lines.append(f"- {k}: FPR@warn {_fmt(m['fpr@warn'])}, FPR@critical "
                             f"{_fmt(m['fpr@critical'])}" + (f" (n = {m['n']})" if "n" in m
                                                              else ""))
        flagged = r.metrics.get("hard_negatives", {}).get("flagged_at_warn", [])
        if flagged:
            lines.append("- hard negatives flagged at warn: "
                         + "; ".join(f"\"{t}\"" for t in flagged[:12]))
        per = r.metrics.get("test", {}).get("per_category")
        if per:
            lines += ["", "Per category (test positives vs all test negatives):", "",
                      "| category | n | AUROC | TPR@warn |", "|---|---|---|---|"]
            lines += [f"| {c} | {v['n']} | {_fmt(v['auroc'])} | "
                      f"{_fmt(v.get('tpr@warn', float('nan')))} |" for c, v in per.items()]
        lines += ["", "Validation search (top candidates; criterion = mean over validation "
                  "sets of (AUROC + TPR@1%FPR)/2):", ""]
        if r.selection:
            keys = list(r.selection[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(row[k]) for k in keys) + " |"
                      for row in r.selection]
        curves = {k: v for k, v in r.scores.items() if k != "calibration"
                  and len(set(np.asarray(v[0]).tolist())) == 2}
        plot_roc(out / f"{r.name}_roc.png", curves, f"{r.name}: request-level ROC")
        groups: dict[str, np.ndarray] = {}
        main = "test" if "test" in r.scores else "test_all_am"
        y, s = r.scores[main]
        groups[f"{main} positive"] = s[np.asarray(y) == 1]
        groups[f"{main} negative"] = s[np.asarray(y) == 0]
        for k in ("hard_negatives", "calibration"):
            if k in r.scores:
                groups[k] = r.scores[k][1]
        plot_histograms(out / f"{r.name}_hist.png", groups, thr, f"{r.name}: request scores")
        lines += ["", f"![ROC]({r.name}_roc.png) ![histogram]({r.name}_hist.png)", ""]
        for n in getattr(r, "notes", []):
            lines.append(f"- note: {n}")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
