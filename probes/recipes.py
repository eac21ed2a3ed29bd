"""The default bundle for SmolLM2-135M-Instruct: ``harmful_intent`` and ``deception``.

``build_default`` runs both recipes, measures cross-detector confusion, exports the
bundle (``probes.export``) and writes ``REPORT.md`` + PNGs (``probes.report``).

- ``harmful_intent`` (``probes.harmful``): diverse public sources + project-written
  data, request-level mean over the user's tokens, layer / C / weighting / aggregation
  chosen leave-one-source-out, a length term ``− a·log n`` fit on the benign training
  rows (``length_debias``), thresholds on held-back benign rows, whole test sources
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

from probes.collect import TransformersCollector
from probes.export import DetectorResult

__all__ = ["DetectorResult", "build_default", "confusion"]

log = logging.getLogger("probes.recipes")


def confusion(results: Sequence[DetectorResult], collector: TransformersCollector,
              cache_dir: Path | None, scope: str, seed: int = 0, progress: bool = True,
              limit: int | None = None, layers: Sequence[int] | None = None) -> list[str]:
    """How often each detector fires on the other's positives and on persona /
    scenario system prompts, at its shipped thresholds (report lines). Rows are collected
    at ``layers`` (the recipes' layers, default ``harmful.LAYERS``; they hold each
    detector's layer); ``limit`` caps every set (see `build_default`)."""
    from probes.collect import TokenSelection
    from probes.deception import (
        CONFUSION_PROMPTS,
        TEST_PROMPTS,
        _prompt_set,
        budget,
        generate_answers,
        load_goal_directed,
        load_instructed_qa,
    )
    from probes.evaluate import wilson_ci
    from probes.harmful import LAYERS, scope_mask, served_scores, token_roles

    layers = tuple(LAYERS if layers is None else layers)

    by = {r.name: r for r in results}
    lines: list[str] = []

    def rate(s: np.ndarray, t: float) -> str:
        k = int((s >= t).sum())
        lo, hi = wilson_ci(k, int(s.size))
        return f"{k / max(s.size, 1):.3f} [{lo:.3f}, {hi:.3f}]"

    if "harmful_intent" in by:
        r = by["harmful_intent"]
        sets = {"deception pairs (instructed_qa, both labels)":
                [e for p in load_instructed_qa(100 if limit is None else min(100, limit), seed)
                 for e in p],
                "deception scenarios (goal_directed, system prompt with an incentive)":
                load_goal_directed()[:None if limit is None else 2 * limit]}
        for name, exs in sets.items():
            acts = collector.collect(exs, layers, TokenSelection("generated"),
                                     cache_dir=cache_dir, progress=progress, desc=name[:20])
            mask = scope_mask(token_roles(acts, exs, collector), scope)
            if not mask.any():  # response-scope rows hold no prompt tokens: re-collect
                acts = collector.collect(exs, layers, TokenSelection("prompt"),
                                         cache_dir=cache_dir, progress=progress,
                                         desc=name[:20])
                mask = scope_mask(token_roles(acts, exs, collector), scope)
            s = served_scores(r.probe, acts, mask, r.aggregation, r.min_tokens,
                              judge_at=r.judge_at)
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
            prompts = _prompt_set(budget(spec, limit), seed)
            exs = (generate_answers(collector, prompts, cache_dir, sample=False,
                                    progress=progress)
                   + generate_answers(collector, prompts, cache_dir, sample=True, seed=seed,
                                      progress=progress))
            acts = collector.collect(exs, layers, TokenSelection("generated"),
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


def scaled_layers(layers: Sequence[int], n_layers: int, of: int = 30) -> tuple[int, ...]:
    """``layers`` chosen for a model with ``of`` decoder layers, moved to the same relative
    depths of a model with ``n_layers`` (rounded, unique, in ``[0, n_layers)``)."""
    return tuple(sorted({min(n_layers - 1, max(0, round(x * n_layers / of))) for x in layers}))


#: Smallest ``limit`` (data budget) `build_default` accepts: one example per source
#: leaves the calibration split empty.
MIN_LIMIT = 2


def build_default(out: Path, *, model_path: Path | None = None, cache_dir: Path | None = None,
                  detectors: Sequence[str] = ("harmful_intent", "deception"),
                  scope: str = "user", progress: bool = True, seed: int = 0,
                  model_name: str | None = None, layers: Sequence[int] | None = None,
                  judge_at: str = "span_end", limit: int | None = None,
                  device: str = "cpu", length_debias: bool = True,
                  style: str = "benign", calibration: str = "row",
                  pooling: str | None = None, temperature: float | None = None,
                  skip_tokens: int | None = None) -> list[DetectorResult]:
    """Build the default bundle (+ its ONNX graphs, REPORT.md, PNGs,
    policy.suggested.yaml) into ``out``.

    ``scope``: the harmful-intent token scope, ``user`` (the user's message content, as
    ``monitor.roles`` labels it) or ``prompt`` (every prompt token). ``judge_at``: when
    harmful_intent's aggregate is judged (policy ``judge_at``; ``any``: searched on
    validation with the rest), see ``probes.harmful.search_space``.

    With ``model_path`` (a user's HF folder) the same recipes run on that model: the bundle
    is for ``model_name`` (the identity vLLM serves it as, ``SAFETY_MONITOR_MODEL``;
    default: the folder path), and each recipe collects ``layers`` or, when None, its own
    layers moved to the same relative depths (``scaled_layers``). Without it: the default
    model and the recipes' own layers.

    ``limit``: a data budget — at most that many examples per source, prompt set and test
    set (None: the full recipes). For smoke runs and sizing only: the bundle is complete
    and loads, its numbers are not meaningful. ``device``: where the model's forward and
    generation run (``cuda`` on a GPU; the bundle is the same). ``length_debias``:
    harmful_intent's ``mean_logit`` carries a length term fit on its benign training
    rows (``probes.harmful`` module doc); False reproduces the session-5 recipe. ``style``:
    harmful_intent's probe is fit with the training sources' style directions projected
    out (``harmful_intent_recipe``); "" reproduces the session-6 recipe. ``calibration``:
    how harmful_intent's held-back benign rows are weighted for its thresholds
    (``probes.calibrate``: ``row``, ``source`` or ``worst``). ``pooling`` / ``temperature``
    (None: ``probes.harmful.DEFAULT_POOLING`` / ``DEFAULT_TEMPERATURE``): harmful_intent's
    probe pools the user's tokens by their mean (served ``mean_logit``) or by a softmax at
    ``τ`` (the softmax probe, served ``softmax_logit``; ``harmful_intent_recipe``).
    ``skip_tokens`` (None: ``probes.harmful.DEFAULT_SKIP_TOKENS`` for a mean-pooled,
    length-debiased probe, else 0): the first ``k`` user tokens of each request are left
    out of the probe's mean, in training and as served (``mean_logit`` ``skip_tokens``)."""
    if limit is not None and limit < MIN_LIMIT:
        raise ValueError(f"limit: expected None or >= {MIN_LIMIT} examples per source (with "
                         f"fewer a source's calibration split is empty), found {limit}")
    from monitor.score.onnx_export import export_onnx
    from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model
    from monitor.tools.models import cache_dir as monitor_cache
    from probes import deception, harmful
    from probes.export import export_bundle
    from probes.report import write_report

    own = model_path is not None
    model_path = Path(model_path) if model_path is not None else prepare_default_model()
    name = (model_name or str(model_path)) if own else DEFAULT_MODEL_NAME
    cache_dir = Path(cache_dir) if cache_dir else monitor_cache() / "probes"
    collector = TransformersCollector(model_path, name, device=device)

    def lay(recipe_layers: Sequence[int]) -> dict[str, Any]:
        if layers is not None:
            return {"layers": tuple(layers)}
        return {"layers": scaled_layers(recipe_layers, collector.n_layers)} if own else {}

    results: list[DetectorResult] = []
    if "harmful_intent" in detectors:
        pool = harmful.recipe_pooling(pooling)
        if temperature is not None and pool != "softmax":
            raise ValueError(f"temperature: only the softmax pooling has one; found "
                             f"temperature={temperature:g} with pooling {pool!r}")
        tau = harmful.DEFAULT_TEMPERATURE if temperature is None else float(temperature)
        served, prefixes = harmful.search_space(judge_at, pool, tau)
        results.extend(harmful.harmful_intent_recipe(collector, cache_dir, scope=scope,
                                                     seed=seed, progress=progress,
                                                     served=served, prefixes=prefixes,
                                                     limit=limit, length_debias=length_debias,
                                                     style=style, calibration=calibration,
                                                     pooling=pool, temperature=tau,
                                                     skip_tokens=skip_tokens,
                                                     **lay(harmful.LAYERS)))
    if "deception" in detectors:
        results.append(deception.deception_recipe(collector, cache_dir, seed=seed,
                                                  progress=progress, limit=limit,
                                                  **lay(deception.LAYERS)))
    for stale in Path(out).glob("layer*.onnx"):  # graphs of an earlier build's layers
        stale.unlink()
    slug = "".join(c if c.isalnum() else "-" for c in name.rsplit("/", 1)[-1].lower())
    export_bundle(Path(out), results, model_name=name,
                  d_model=collector.d_model, n_layers=collector.n_layers,
                  name=f"{slug}-default" if own else "smollm2-135m-default",
                  description=f"default detectors for {name}, built by "
                              "`python -m probes build-default`")
    export_onnx(Path(out))  # the onnxruntime backend's graphs, pinned in the manifest
    extra = confusion(results, collector, cache_dir, scope, seed, progress, limit,
                      lay(harmful.LAYERS).get("layers", harmful.LAYERS))
    write_report(Path(out), results, model_name=name, appendix=extra)
    return results
