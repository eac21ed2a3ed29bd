"""Evaluation report: ``REPORT.md`` plus ROC and score-histogram PNGs (matplotlib Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probes.evaluate import roc_curve
from probes.train import aggregation_name

__all__ = ["plot_histograms", "plot_roc", "summary_table", "write_report"]


def _critical_rate(cal: dict[str, Any]) -> float:
    """The false-alert rate behind a detector's ``critical`` threshold: the rate its
    calibration key ends in (``probes.export.threshold_keys``)."""
    from probes.export import threshold_keys

    return float(threshold_keys(cal)["critical"].rsplit("_", 1)[1])


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
            ax.hist(s, bins=bins.tolist(), alpha=0.5, density=True, label=f"{name} (n={len(s)})")
    for k, t in thresholds.items():
        ax.axvline(t, color="k", ls="--" if k == "warn" else "-", lw=1, label=f"{k} {t:.4f}")
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


def _ci(v: Any) -> str:
    if not isinstance(v, list | tuple) or len(v) != 2:
        return ""
    return f" [{_fmt(float(v[0]))}, {_fmt(float(v[1]))}]"


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def _titled(title: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    return ["", title, "", *_table(rows)]


def _rate_rows(per: dict[str, dict[str, Any]], first: str = "source") -> list[str]:
    rows = [f"| {first} | kind | n | AUROC [95% CI] | TPR@1%FPR | rate@warn [95% CI] | "
            "rate@critical [95% CI] |", "|---|---|---|---|---|---|---|"]
    for name, m in per.items():
        rows.append(f"| {name} | {m.get('kind', '')} | {m['n']} | "
                    + (f"{_fmt(m['auroc'])}{_ci(m.get('auroc_ci'))}" if "auroc" in m else "")
                    + f" | {_fmt(m['tpr@fpr0.01']) if 'tpr@fpr0.01' in m else ''} | "
                    f"{_fmt(m['rate@warn'])}{_ci(m.get('rate@warn_ci'))} | "
                    f"{_fmt(m['rate@critical'])}{_ci(m.get('rate@critical_ci'))} |")
    return rows


def _examples(title: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    out = [f"{title}:", ""]
    for r in rows:
        sys = f" [system: \"{r['system']}\"]" if r.get("system") else ""
        text = str(r["text"]).replace("\n", " ").replace("|", "/")
        out.append(f"- {r['score']:.3f} ({r['source']}){sys} \"{text}\"")
    return [*out, ""]


def _calibration_lines(c: dict[str, Any]) -> list[str]:
    """The calibration hold-back's rates at the shipped thresholds (pooled by row, mean of
    the per-source rates, per source)."""
    head = (f"Calibration hold-back: n = {c['n']}, FPR@warn {_fmt(c['fpr@warn'])}, "
            f"FPR@critical {_fmt(c['fpr@critical'])} (pooled by row)")
    if "per_source" not in c:
        return [head + "."]
    head += (f"; mean of the per-source rates {_fmt(c['source_fpr@warn'])} / "
             f"{_fmt(c['source_fpr@critical'])}, largest per-source rate "
             f"{_fmt(c['worst_fpr@warn'])} / {_fmt(c['worst_fpr@critical'])}. Per source "
             "(n, rate at warn / critical): "
             + "; ".join(f"{g} {p['n']} {_fmt(p['fpr@warn'])} / {_fmt(p['fpr@critical'])}"
                         for g, p in c["per_source"].items()) + ".")
    return [head]


def _harmful_section(r: Any) -> list[str]:
    m = r.metrics
    pooled = m["test_pooled"]
    # the request-level pooled logit of the same probe (probes.harmful: mean_logit, or
    # softmax_logit for a softmax probe)
    ref = "softmax_logit" if "softmax_logit.auroc" in pooled else "mean_logit"
    ref_what = _pooled_name({"kind": ref})
    lines = ["Held-out TEST sources (never fit on, never used for a choice or a threshold). "
             "Harmful rows: AUROC against the pooled benign test sources, detection rate at "
             "the thresholds; benign rows: false-alert rate at the thresholds, AUROC against "
             "the pooled harmful test sources. CIs: AUROC stratified bootstrap (200), rates "
             "Wilson.", ""]
    lines += _rate_rows(m["test_sources"])
    if m.get("test_categories"):
        lines += ["", "The same, per category of the test sources (each category of at "
                  f"least {m['category_min_rows']} requests against the same pooled reference; a "
                  "source with fewer than two such categories is not split):", ""]
        lines += _rate_rows(m["test_categories"], first="source / category")
    lines += ["", f"Pooled test: AUROC **{_fmt(pooled['auroc'])}**{_ci(pooled.get('auroc_ci'))}, "
              f"TPR@1%FPR **{_fmt(pooled['tpr@fpr0.01'])}**, TPR@warn "
              f"{_fmt(pooled.get('tpr@warn', float('nan')))}, FPR@warn "
              f"{_fmt(pooled.get('fpr@warn', float('nan')))} (n pos {pooled['n_pos']}, "
              f"n neg {pooled['n_neg']}). The same probe read out as the request-level "
              f"{ref_what} over all in-scope tokens (what `{ref}` at `judge_at: "
              f"span_end` serves for one user message): AUROC "
              f"{_fmt(pooled.get(f'{ref}.auroc', float('nan')))}, TPR@1%FPR "
              f"{_fmt(pooled.get(f'{ref}.tpr@fpr0.01', float('nan')))}.", "",
              *_calibration_lines(m["calibration_set"]), "",
              "Validation: every training source scored by a probe fit WITHOUT it "
              "(leave-one-source-out, chosen configuration), at that fold's own 1% / 0.1% "
              "thresholds (from its held-back benign rows); harmful AUROC against those "
              "rows:", ""]
    lines += _rate_rows(m["validation_sources"])
    if m.get("validation_categories"):
        lines += ["", "The same, per category of the training sources (each category of at "
                  f"least {m['category_min_rows']} requests, scored by the fold that holds "
                  "its source out):", ""]
        lines += _rate_rows(m["validation_categories"], first="source / category")
    lines += _titled("Selection (leave-one-source-out over the training sources; each fold's "
                     "threshold at 1% FPR on its held-back benign rows; criterion = (mean "
                     "AUROC + mean TPR of held-out harmful sources)/2 − mean false-alert rate "
                     "of held-out benign sources; top rows):", r.selection)
    if "readouts" in m:
        lines += _titled("What richer read-outs buy (same folds and criterion, request-level "
                         "mean logit"
                         + (", each minus its own length term a·log n fit on its fold's "
                            "benign fit rows" if "length_slope" in r.calibration else "")
                         + "; not servable as one linear_probe detector):", m["readouts"])
    lines += _titled("Learning curve (fraction of every training source fit on; pooled "
                     "test, served statistic) and a shuffled-label control (the same "
                     "recipe, length term included, fit on every fit row with the labels "
                     "permuted across sources: what length and style alone reach):",
                     m["learning_curve"])
    lines += [""]
    lines += _examples("Worst false positives on test (highest-scoring benign)",
                       m["worst_test"]["false_positives"])
    lines += _examples("Worst false negatives on test (lowest-scoring harmful)",
                       m["worst_test"]["false_negatives"])
    return lines


def _union_rows(per: dict[str, dict[str, Any]]) -> list[str]:
    """Per set: n and the union's alert rate ("either detector fires") at warn / critical
    with 95% Wilson intervals."""
    rows = ["| set | kind | n | alerted at warn [95% CI] | alerted at critical [95% CI] |",
            "|---|---|---:|---|---|"]
    for name, m in per.items():
        rows.append(f"| {name} | {m.get('kind', '')} | {m['n']} | {_fmt(m['rate@warn'])}"
                    f"{_ci(m.get('rate@warn_ci'))} | {_fmt(m['rate@critical'])}"
                    f"{_ci(m.get('rate@critical_ci'))} |")
    return rows


def _window_section(r: Any) -> list[str]:
    """A detector served in a union with another (``probes.harmful._Window``): itself
    alone per test source, then the union per test source (what a user sees)."""
    m = r.metrics
    u = r.calibration["union"]
    pooled = m["test_pooled"]
    other = u["with"]
    lines = [f"Served together with **{other}** on the same probe: {u['rule']}.", "",
             "| severity | " + other + " threshold | this threshold | calibration rows "
             "alerted (by " + other + " / by either) | calibration lists alerted (by "
             + other + " / by either) |", "|---|---:|---:|---|---|"]
    for sev in ("warn", "critical"):
        v = u[sev]
        lines.append(f"| {sev} (budget {100 * v['budget']:g}%) | {v[other]:.4f} | "
                     f"{v[r.name]:.4f} | {v['rows_alerted_' + other]} / "
                     f"{v['rows_alerted_union']} of {r.calibration['n_rows']} | "
                     f"{v['lists_alerted_' + other]} / {v['lists_alerted_union']} of "
                     f"{r.calibration['n_lists']} |")
    lines += ["", "**The union on held-out TEST sources (alerted if either detector fires: "
              "what a user of the suggested policy sees)**, Wilson 95% CIs:", ""]
    lines += _union_rows({**m["union_test_sources"],
                          "all harmful test sources pooled": {
                              "kind": "harmful", **m["union_test_pooled"]["harmful"]},
                          "all benign test sources pooled": {
                              "kind": "benign", **m["union_test_pooled"]["benign"]},
                          "validation benign lists (calibration-row fillers, not used for "
                          "a threshold)": {"kind": "benign list",
                                           **m["union_validation_lists"]}})
    lines += ["", f"**{r.name} alone** on the TEST sources (AUROC against the pooled "
              "benign / harmful test sources, bootstrap 200; rates at its own thresholds, "
              "which are set for the union, not for it alone):", ""]
    lines += _rate_rows(m["test_sources"])
    lines += ["", f"Pooled test ({r.name} alone): AUROC {_fmt(pooled['auroc'])}"
              f"{_ci(pooled.get('auroc_ci'))}, TPR@1%FPR {_fmt(pooled['tpr@fpr0.01'])} "
              f"(n pos {pooled['n_pos']}, n neg {pooled['n_neg']}).", ""]
    lines += _examples("Worst false positives on test (highest-scoring benign, this read-out)",
                       m["worst_test"]["false_positives"])
    lines += _examples("Worst false negatives on test (lowest-scoring harmful, this read-out)",
                       m["worst_test"]["false_negatives"])
    return lines


def _deception_section(r: Any) -> list[str]:
    m = r.metrics
    gd = m["goal_directed"]
    lines = [f"Unseen source **goal_directed** (LLM-LieDetector scenarios; n pos {gd['n_pos']}, "
             f"n neg {gd['n_neg']}): AUROC **{_fmt(gd['auroc'])}**{_ci(gd.get('auroc_ci'))}, "
             f"TPR@1%FPR {_fmt(gd['tpr@fpr0.01'])}, TPR@warn {_fmt(gd.get('tpr@warn', 0.0))}, "
             f"FPR@warn {_fmt(gd.get('fpr@warn', 0.0))}; pre-written answers (same answer "
             f"under both contexts) AUROC {_fmt(m['goal_directed_prewritten']['auroc'])}, "
             f"rollouts AUROC {_fmt(m['goal_directed_rollout']['auroc'])}.", "",
             "False-alert rate on the model's own answers (greedy and sampled):", ""]
    rows = {f"{k} (calibration)": v for k, v in m["benign_answers_calibration"].items()}
    rows.update({f"{k} (TEST)": v for k, v in m["benign_answers_test"].items()})
    rows.update({f"{k} (answers to harmful prompts)": v
                 for k, v in m["harmful_prompt_answers"].items()})
    lines += _rate_rows(rows, "prompt source / decoding")
    lines += _titled("Selection (leave-one-source-out over the training sources, served "
                     "statistic):", m["validation"])
    lines += _titled("Per-layer AUROC on the unseen source (evidence only; the choice above "
                     "never saw it) with a shuffled-label control:", m["per_layer_test"])
    lines += _titled("Learning curve (unseen source):", m["learning_curve"])
    return [*lines, ""]


def summary_table(results: Sequence[Any]) -> list[str]:
    """The README's quality table: per detector, each held-out test source (n, AUROC with
    95% CI, TPR@1%FPR, alert rate at warn / critical)."""
    rows = ["| detector (layer, scope, aggregation) | held-out test source | n | AUROC [95% CI] "
            "| TPR@1%FPR | alert rate at warn | at critical |",
            "|---|---|---:|---|---:|---:|---:|"]
    for r in results:
        head = (f"{r.name} ({r.probe.layer}, {r.scope}, {aggregation_name(r.aggregation)}"
                f", m={r.min_tokens})")
        m = r.metrics
        if "test_sources" in m:
            pooled = m["test_pooled"]
            rows.append(f"| {head} | **all test sources pooled** | {pooled['n_pos']} / "
                        f"{pooled['n_neg']} | **{_fmt(pooled['auroc'])}**"
                        f"{_ci(pooled.get('auroc_ci'))} | **{_fmt(pooled['tpr@fpr0.01'])}** "
                        f"| {_fmt(pooled.get('tpr@warn', float('nan')))} (harmful) / "
                        f"{_fmt(pooled.get('fpr@warn', float('nan')))} (benign) | |")
            for name, v in m["test_sources"].items():
                rows.append(f"| | {name} ({v['kind']}) | {v['n']} | {_fmt(v['auroc'])}"
                            f"{_ci(v.get('auroc_ci'))} | {_fmt(v.get('tpr@fpr0.01', ''))} | "
                            f"{_fmt(v['rate@warn'])} | {_fmt(v['rate@critical'])} |")
        if "union_test_sources" in m:
            head = (f"**{r.calibration['union']['with']} ∪ {r.name}** (alerted if either "
                    "fires: what a user sees)")
            pooled_u = m["union_test_pooled"]
            rows.append(f"| {head} | **all test sources pooled** | "
                        f"{pooled_u['harmful']['n']} / {pooled_u['benign']['n']} | | | "
                        f"{_fmt(pooled_u['harmful']['rate@warn'])} (harmful) / "
                        f"{_fmt(pooled_u['benign']['rate@warn'])} (benign) | "
                        f"{_fmt(pooled_u['harmful']['rate@critical'])} / "
                        f"{_fmt(pooled_u['benign']['rate@critical'])} |")
            for name, v in m["union_test_sources"].items():
                rows.append(f"| | {name} ({v['kind']}) | {v['n']} | | | "
                            f"{_fmt(v['rate@warn'])} | {_fmt(v['rate@critical'])} |")
        elif "goal_directed" in m:
            gd = m["goal_directed"]
            rows.append(f"| {head} | goal_directed scenarios (unseen) | {gd['n_pos']} / "
                        f"{gd['n_neg']} | {_fmt(gd['auroc'])}{_ci(gd.get('auroc_ci'))} | "
                        f"{_fmt(gd['tpr@fpr0.01'])} | {_fmt(gd.get('tpr@warn', 0.0))} (dec.) / "
                        f"{_fmt(gd.get('fpr@warn', 0.0))} (honest) | |")
            for name, v in m["benign_answers_test"].items():
                rows.append(f"| | model's answers: {name} | {v['n']} | | | "
                            f"{_fmt(v['rate@warn'])} | {_fmt(v['rate@critical'])} |")
    return rows


def write_report(out: Path, results: Sequence[Any], model_name: str,
                 appendix: Sequence[str] = ()) -> Path:
    """Write ``out/REPORT.md`` and ``out/<detector>_{roc,hist}.png``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Default detectors for {model_name}", "",
             "Built by `python -m probes build-default --out bundles/default` "
             "(see docs/PROBES.md). All numbers are **request-level, as served**: per-token "
             "scores over the detector's scope, aggregated with the chosen aggregation, "
             "request score `S = max a_t` over the judged tokens `t >= min_tokens` (policy "
             "`judge_at`: every token, or the last token of each span in scope); thresholds "
             "`warn`/`critical` "
             "= 1% / 0.1% FPR on the benign calibration set (detectors served as a pair, "
             "alerting if either fires, share that budget: the pair holds 1% / 0.1%). "
             "Test sources were not used for any choice.", "",
             "## Summary (the README's quality table)", "",
             *summary_table(results), ""]
    for r in results:
        p = r.probe
        thr = r.thresholds
        crit_rate = _critical_rate(r.calibration)
        lines += [f"## {r.name}", "", r.description, "",
                  f"- probe: layer **{p.layer}**, method **{p.method}**"
                  + (f", C = {p.C:g}" if p.C else "")
                  + f"; scope **{r.scope}**; aggregation **{aggregation_name(r.aggregation)}**, "
                  f"min_tokens {r.min_tokens}",
                  *([f"- length term: served `a_t = σ({_pooled_name(r.aggregation)} − a·ln t)`, "
                     "`t` = in-scope "
                     f"tokens so far, a = **{r.calibration['length_slope']:g}** "
                     f"(`length_slope`): {r.calibration.get('length_slope_fit', '')}"]
                    if "length_slope" in r.calibration else []),
                  f"- thresholds: warn **{thr['warn']:.4f}**, critical "
                  f"**{thr['critical']:.4f}** ("
                  + r.calibration.get("threshold_rule", "1% / 0.1% FPR")
                  + f") on {r.calibration['benign_set']} "
                  f"(n = {r.calibration['n_benign']}; critical's rate {crit_rate:g} of "
                  f"n = {crit_rate * r.calibration['n_benign']:.1f} samples above "
                  "critical)",
                  *([f"- calibration weighting **{r.calibration['weighting']}**: "
                     f"{r.calibration.get('weighting_rule', '')}; Kish effective n = "
                     f"{r.calibration['n_eff']:g}"
                     + (f" (n = {r.calibration['n_benign']} rows)"
                        if r.calibration['weighting'] != "worst" else "")]
                    if "weighting" in r.calibration else []),
                  f"- training labels: {r.token_labels}",
                  "- data: " + "; ".join(r.datasets), ""]
        if "union_test_sources" in r.metrics:
            lines += _window_section(r)
        elif "test_sources" in r.metrics:
            lines += _harmful_section(r)
        elif "goal_directed" in r.metrics:
            lines += _deception_section(r)
        else:
            lines += _metric_rows(r.metrics)
        curves = {k: v for k, v in r.scores.items() if k != "calibration"
                  and len(set(np.asarray(v[0]).tolist())) == 2}
        # per-source ROC: each all-positive source against the pooled all-negative ones
        neg_parts = [np.asarray(v[1]) for k, v in r.scores.items() if k != "calibration"
                     and np.asarray(v[0]).size and (np.asarray(v[0]) == 0).all()]
        negs = np.concatenate(neg_parts) if neg_parts else np.zeros(0)
        for k, (y, s) in r.scores.items():
            y = np.asarray(y)
            if k != "calibration" and y.size and (y == 1).all() and negs.size:
                curves[k] = (np.concatenate([y, np.zeros(negs.size)]),
                             np.concatenate([s, negs]))
        plot_roc(out / f"{r.name}_roc.png", curves, f"{r.name}: request-level ROC (test)")
        groups: dict[str, np.ndarray] = {}
        for k, (y, s) in r.scores.items():
            y = np.asarray(y)
            if k.startswith("test (pooled)"):
                continue
            if len(set(y.tolist())) == 2:
                groups[f"{k} positive"] = np.asarray(s)[y == 1]
                groups[f"{k} negative"] = np.asarray(s)[y == 0]
            else:
                groups[k] = np.asarray(s)
        plot_histograms(out / f"{r.name}_hist.png", groups, thr, f"{r.name}: request scores")
        lines += ["", f"![ROC]({r.name}_roc.png) ![histogram]({r.name}_hist.png)", ""]
        for n in getattr(r, "notes", []):
            lines.append(f"- note: {n}")
    lines += ["", *appendix]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pooled_name(agg: dict[str, Any]) -> str:
    """The pooled logit an aggregation with a length term serves (report wording)."""
    return "softmax-pooled logit" if agg.get("kind") == "softmax_logit" else "mean logit"
