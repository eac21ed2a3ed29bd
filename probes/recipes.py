"""The default bundle for SmolLM2-135M-Instruct: ``harmful_intent`` and ``deception``.

``build_default`` runs both recipes, measures cross-detector confusion, exports the
bundle (``probes.export``) and writes ``REPORT.md`` + PNGs (``probes.report``).

- ``harmful_intent`` (``probes.harmful``): diverse public sources + project-written
  data, request-level mean over the user's tokens, layer / C / weighting / aggregation
  chosen leave-one-source-out, thresholds on held-back benign rows, whole test sources
  (``probes.sources.HARMFUL_SOURCES`` role ``test``) evaluated once at the end.
- ``deception`` (``probes.deception``): same-prompt honest / false answer contrasts,
  tested on an unseen scenario source, calibrated on the model's own answers.
  Experimental: shipped in ``observe`` mode (see REPORT.md for why).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from probes.export import DetectorResult

__all__ = ["DetectorResult", "build_default", "confusion"]

log = logging.getLogger("probes.recipes")


def confusion(results: Sequence[DetectorResult], collector: Any, cache_dir: Path | None,
              scope: str, seed: int = 0, progress: bool = True) -> list[str]:
    """How often each detector fires on the other's positives and on persona /
    scenario system prompts, at its shipped thresholds (report lines)."""
    from probes.collect import TokenSelection
    from probes.deception import (
        CONFUSION_PROMPTS,
        TEST_PROMPTS,
        _prompt_set,
        generate_answers,
        load_goal_directed,
        load_instructed_qa,
    )
    from probes.evaluate import wilson_ci
    from probes.harmful import LAYERS, scope_mask, served_scores, token_roles

    by = {r.name: r for r in results}
    lines: list[str] = []

    def rate(s: np.ndarray, t: float) -> str:
        k = int((s >= t).sum())
        lo, hi = wilson_ci(k, int(s.size))
        return f"{k / max(s.size, 1):.3f} [{lo:.3f}, {hi:.3f}]"

    if "harmful_intent" in by:
        r = by["harmful_intent"]
        sets = {"deception pairs (instructed_qa, both labels)":
                [e for p in load_instructed_qa(100, seed) for e in p],
                "deception scenarios (goal_directed, system prompt with an incentive)":
                load_goal_directed()}
        for name, exs in sets.items():
            acts = collector.collect(exs, LAYERS, TokenSelection("generated"),
                                     cache_dir=cache_dir, progress=progress, desc=name[:20])
            mask = scope_mask(token_roles(acts, exs, collector), scope)
            if not mask.any():  # response-scope rows hold no prompt tokens: re-collect
                acts = collector.collect(exs, LAYERS, TokenSelection("prompt"),
                                         cache_dir=cache_dir, progress=progress,
                                         desc=name[:20])
                mask = scope_mask(token_roles(acts, exs, collector), scope)
            s = served_scores(r.probe, acts, mask, r.aggregation, r.min_tokens)
            lines.append(f"| harmful_intent | {name} | {s.size} | {rate(s, r.thresholds['warn'])}"
                         f" | {rate(s, r.thresholds['critical'])} |")
        ps = r.metrics["test_sources"].get("personas_test")
        if ps:
            lines.append(f"| harmful_intent | persona / scenario system prompts (personas_test) "
                         f"| {ps['n']} | {ps['rate@warn']:.3f} | {ps['rate@critical']:.3f} |")
    if "deception" in by:
        r = by["deception"]
        for spec, name in ((CONFUSION_PROMPTS, "answers to harmful prompts (do_not_answer)"),
                           (TEST_PROMPTS[1:2], "answers under persona / scenario system "
                                               "prompts (personas_test)")):
            prompts = _prompt_set(spec, seed)
            exs = (generate_answers(collector, prompts, cache_dir, sample=False,
                                    progress=progress)
                   + generate_answers(collector, prompts, cache_dir, sample=True, seed=seed,
                                      progress=progress))
            acts = collector.collect(exs, LAYERS, TokenSelection("generated"),
                                     cache_dir=cache_dir, progress=progress, desc="confusion")
            s = served_scores(r.probe, acts, acts.generated.astype(bool), r.aggregation,
                              r.min_tokens)
            lines.append(f"| deception | {name} | {s.size} | {rate(s, r.thresholds['warn'])} "
                         f"| {rate(s, r.thresholds['critical'])} |")
    head = ["## Cross-detector confusion", "",
            "Alert rate of each detector (at its shipped thresholds, Wilson 95% CI) on the "
            "other detector's positives and on persona / scenario system prompts.", "",
            "| detector | traffic | n | rate@warn | rate@critical |", "|---|---|---|---|---|"]
    return [*head, *lines, ""]


def build_default(out: Path, *, model_path: Path | None = None, cache_dir: Path | None = None,
                  detectors: Sequence[str] = ("harmful_intent", "deception"),
                  scope: str = "user", progress: bool = True, seed: int = 0
                  ) -> list[DetectorResult]:
    """Build the default bundle (+ its ONNX graphs, REPORT.md, PNGs,
    policy.suggested.yaml) into ``out``.

    ``scope``: the harmful-intent token scope, ``user`` (the user's message content, as
    ``monitor.roles`` labels it) or ``prompt`` (every prompt token)."""
    from monitor.score.onnx_export import export_onnx
    from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model
    from monitor.tools.models import cache_dir as monitor_cache
    from probes.collect import TransformersCollector
    from probes.deception import deception_recipe
    from probes.export import export_bundle
    from probes.harmful import harmful_intent_recipe
    from probes.report import write_report

    model_path = Path(model_path) if model_path else prepare_default_model()
    cache_dir = Path(cache_dir) if cache_dir else monitor_cache() / "probes"
    collector = TransformersCollector(model_path, DEFAULT_MODEL_NAME)
    results: list[DetectorResult] = []
    if "harmful_intent" in detectors:
        results.append(harmful_intent_recipe(collector, cache_dir, scope=scope, seed=seed,
                                             progress=progress))
    if "deception" in detectors:
        results.append(deception_recipe(collector, cache_dir, seed=seed, progress=progress))
    for stale in Path(out).glob("layer*.onnx"):  # graphs of an earlier build's layers
        stale.unlink()
    export_bundle(Path(out), results, model_name=DEFAULT_MODEL_NAME,
                  d_model=collector.d_model, n_layers=collector.n_layers,
                  name="smollm2-135m-default",
                  description="default detectors for SmolLM2-135M-Instruct, built by "
                              "`python -m probes build-default`")
    export_onnx(Path(out))  # the onnxruntime backend's graphs, pinned in the manifest
    extra = confusion(results, collector, cache_dir, scope, seed, progress)
    write_report(Path(out), results, model_name=DEFAULT_MODEL_NAME, appendix=extra)
    return results
