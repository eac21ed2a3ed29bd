"""``safety-probes`` / ``python -m probes``: the probe toolkit's command line.

Commands::

    build-default --out bundles/default      the default bundle, one reproducible command
    collect  --data X.jsonl --layers 9,12 --scope prompt --out acts.npz
    train    --acts acts.npz --layer 9 --method logreg --C 0.01 --out probe.npz
    calibrate --probe probe.npz --acts benign.npz --scope prompt --aggregation max
    inspect  --bundle bundles/default          print detectors, calibration, suggested policy
    train-sae --out bundles/sae/smollm2-135m-l18   the default model's SAE (docs/SAE.md)
    sae-detector --sae bundles/sae/smollm2-135m-l18 --out bundles/sae-detector
    add-sae-detector --bundle bundles/default      merge it into a bundle (observe mode)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from probes.calibrate import WEIGHTINGS
from probes.collect import SELECTION_SCOPES

__all__ = ["main"]


def _layers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _agg(args: argparse.Namespace) -> dict:
    if args.aggregation == "ema":
        return {"kind": "ema", "half_life_tokens": float(args.half_life)}
    if args.aggregation == "window_max":
        return {"kind": "window_max", "window_tokens": int(args.window)}
    return {"kind": args.aggregation}


def _model_path(arg: str | None) -> tuple[Path, str]:
    from monitor.tools.models import DEFAULT_MODEL_NAME, prepare_default_model

    if arg:
        return Path(arg), str(arg)
    return prepare_default_model(), DEFAULT_MODEL_NAME


def cmd_build_default(args: argparse.Namespace) -> int:
    from probes.recipes import MIN_LIMIT, build_default

    if args.limit is not None and args.limit < MIN_LIMIT:
        print(f"build-default: --limit: expected >= {MIN_LIMIT} (with fewer a source's "
              f"calibration split is empty), found {args.limit}", file=sys.stderr)
        return 2

    results = build_default(Path(args.out), model_path=args.model, cache_dir=args.cache,
                            detectors=args.detectors.split(","), scope=args.scope,
                            progress=not args.quiet, model_name=args.model_name,
                            layers=_layers(args.layers) if args.layers else None,
                            judge_at=args.judge_at, limit=args.limit, device=args.device,
                            length_debias=args.length_debias, style=args.style_projection,
                            calibration=args.calibration_weighting, pooling=args.pooling,
                            temperature=args.temperature, skip_tokens=args.skip_tokens)
    from probes.calibrate import policy_snippet

    print(policy_snippet({r.name: {"scope": r.scope, "aggregation": r.aggregation,
                                   "min_tokens": r.min_tokens, "judge_at": r.judge_at,
                                   "thresholds": r.thresholds}
                          for r in results}))
    for r in results:
        print(f"{r.name}: layer {r.probe.layer} {r.probe.method}", json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk in ("auroc", "tpr@fpr0.01", "fpr@warn")}
             for k, v in r.metrics.items() if isinstance(v, dict) and "auroc" in v},
            default=float))
    print(f"wrote {args.out}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from probes.collect import TokenSelection, make_collector
    from probes.datasets import load_jsonl

    path, name = _model_path(args.model)
    collector = make_collector(args.backend, path, name)
    examples = [ex for f in args.data for ex in load_jsonl(f)]
    acts = collector.collect(examples, _layers(args.layers),
                             TokenSelection(args.scope, args.exclude_tail),
                             cache_dir=Path(args.cache) if args.cache else None,
                             progress=not args.quiet)
    np.savez(args.out, labels=acts.labels, example=acts.example, position=acts.position,
             generated=acts.generated, segment=acts.segment, from_end=acts.from_end,
             layers=np.array(acts.layers), allow_pickle=False,
             **{f"l{k}": v for k, v in acts.x.items()})
    print(f"{acts.n_rows} rows from {acts.n_examples} examples -> {args.out}")
    return 0


def _load_acts(path: str):
    from probes.collect import Activations

    z = np.load(path)
    layers = tuple(int(x) for x in z["layers"])
    return Activations(layers, {k: z[f"l{k}"] for k in layers}, z["example"], z["position"],
                       z["generated"].astype(bool), z["segment"], z["from_end"], z["labels"],
                       int(z["labels"].shape[0]))


def cmd_train(args: argparse.Namespace) -> int:
    from probes.train import fit_probe

    acts = _load_acts(args.acts)
    y = acts.labels[acts.example]
    probe = fit_probe(args.method, acts.x[args.layer], y, args.layer, args.C)
    np.savez(args.out, weight=probe.weight, bias=probe.bias, mean=probe.mean, std=probe.std,
             layer=probe.layer, method=probe.method)
    print(f"trained {args.method} on layer {args.layer} ({acts.n_rows} rows) -> {args.out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from probes.calibrate import calibrate, policy_snippet
    from probes.train import LinearProbe, aggregate_requests

    z = np.load(args.probe)
    probe = LinearProbe(int(z["layer"]), z["weight"], float(z["bias"]), z["mean"], z["std"],
                        str(z["method"]))
    acts = _load_acts(args.acts)
    scope = {"prompt": ~acts.generated, "generated": acts.generated, "both": None}[args.scope]
    agg = _agg(args)
    s = aggregate_requests(probe.scores(acts.x[probe.layer]), acts.example, acts.n_examples,
                           agg, args.min_tokens, scope)
    cal = calibrate(s[acts.labels == 0], benign_set=args.acts)
    print(json.dumps(cal, indent=2))
    print(policy_snippet({args.name: {"scope": args.scope, "aggregation": agg,
                                      "min_tokens": args.min_tokens,
                                      "thresholds": {"warn": cal["fpr_0.01"],
                                                     "critical": cal["fpr_0.001"]}}}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from monitor.score.bundle import load_bundle

    b = load_bundle(args.bundle)
    for d in b.detectors:
        print(f"{d.name}: layer {d.layer}, scope {d.token_scope}, thresholds "
              f"{d.default_thresholds}")
        print("  calibration:", json.dumps(d.calibration))
    pol = Path(args.bundle) / "policy.suggested.yaml"
    if pol.is_file():
        print(pol.read_text())
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    from probes.collect import TokenSelection, TransformersCollector
    from probes.sae_data import DEFAULT_CACHE, SAE_LAYER, sae_corpus
    from probes.sae_train import TrainConfig, train_default_sae

    path, name = _model_path(args.model)
    collector = TransformersCollector(path, name)
    corpus = sae_corpus(n_examples=args.n_examples, seed=args.seed)
    cache = Path(args.cache) if args.cache else DEFAULT_CACHE
    acts = collector.collect(corpus, [SAE_LAYER], TokenSelection("all"), cache_dir=cache,
                             progress=not args.quiet, desc="sae/corpus")
    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, epochs=args.epochs, seed=args.seed)
    metrics = train_default_sae(Path(args.out), collector, corpus, acts, SAE_LAYER, cfg,
                                n_heldout=args.n_heldout, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("heldout", "dead_fraction", "spliced")},
                     indent=2, default=float))
    print(f"wrote {args.out}")
    return 0


def cmd_sae_detector(args: argparse.Namespace) -> int:
    from monitor.score import Scorer, load_bundle, write_bundle
    from monitor.score.sae import load_saelens
    from probes.collect import TransformersCollector
    from probes.sae_data import DEFAULT_CACHE, SAE_LAYER, collect_sets
    from probes.sae_detector import (
        evaluate_beside_dense,
        fit_latent_detector,
        latent_labels,
        report_markdown,
        sae_detector_parts,
    )

    dense = load_bundle(args.dense)
    spec = dense.detector(args.dense_detector)
    if spec.hook_name != f"blocks.{SAE_LAYER}.hook_resid_post":
        print(f"sae-detector: --dense {args.dense} --dense-detector {args.dense_detector}: "
              f"expected a probe on blocks.{SAE_LAYER}.hook_resid_post (the SAE's hook "
              f"point, for the side-by-side evaluation), found {spec.hook_name}",
              file=sys.stderr)
        return 2
    path, name = _model_path(args.model)
    collector = TransformersCollector(path, name)
    sae = load_saelens(args.sae, d_model=collector.d_model)
    sets = collect_sets(collector, Path(args.cache) if args.cache else DEFAULT_CACHE,
                        progress=not args.quiet)
    corpus, acts = sets["corpus"]
    _test_ex, test = sets["test"]
    cal = spec.calibration
    det = fit_latent_detector(sae, acts, SAE_LAYER, args.n_heldout, args.n_latents,
                              agg=cal.get("aggregation"),
                              min_tokens=int(cal.get("min_tokens", 2)))
    scorer = Scorer(dense)
    col = scorer.detectors_on(SAE_LAYER).index(args.dense_detector)
    import torch

    dense_tok = scorer.score(SAE_LAYER, torch.from_numpy(test.x[SAE_LAYER].astype(
        np.float32)))[:, col]
    evaluation = evaluate_beside_dense(det, sae, test, SAE_LAYER, dense_tok)
    labels = latent_labels(sae, acts, corpus, collector, SAE_LAYER, det.latent_ids)
    metrics_path = Path(args.sae) / "metrics.json"
    sae_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    comp, detector, tensors = sae_detector_parts(
        sae, det, metrics={k: {kk: v[kk] for kk in ("auroc", "tpr@fpr0.01")}
                           for k, v in evaluation.items()}, labels=labels)
    out = Path(args.out)
    write_bundle(out, {"name": "smollm2-135m-sae-detector",
                       "description": "harmful_intent from 16 SAE latents (observe mode), "
                       "built by `python -m probes sae-detector`",
                       "model": {"name": dense.model_name, "d_model": dense.d_model,
                                 "n_layers": dense.n_layers},
                       "components": [comp], "detectors": [detector]}, tensors)
    (out / "REPORT.md").write_text(report_markdown(sae_metrics, det, evaluation, labels))
    (out / "labels.json").write_text(json.dumps({str(k): v for k, v in labels.items()},
                                                indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: {kk: v[kk] for kk in ("auroc", "tpr@fpr0.01")}
                      for k, v in evaluation.items()}, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_add_sae_detector(args: argparse.Namespace) -> int:
    from probes.sae_detector import add_sae_detector

    b = add_sae_detector(Path(args.bundle), Path(args.source))
    print(f"{args.bundle}: detectors {[d.name for d in b.detectors]}, hook points "
          f"{list(b.hook_names)}")
    return 0


def cmd_study_loso(args: argparse.Namespace) -> int:
    """Leave-one-source-out over every harmful_intent source (probes/study.py)."""
    from monitor.tools.models import cache_dir as monitor_cache
    from probes import harmful, pooled, study
    from probes.collect import TransformersCollector
    from probes.sources import HARMFUL_SOURCES

    model_path, name = _model_path(args.model)
    cache = Path(args.cache) if args.cache else monitor_cache() / "probes"
    collector = TransformersCollector(model_path, name)
    data = harmful.load_sources(collector, cache, HARMFUL_SOURCES, "user", harmful.LAYERS,
                                progress=not args.quiet)
    rows = []
    for readout in args.readouts.split(","):
        if readout == "user":
            sds = list(data.values())
        else:
            sds = []
            for d in data.values():
                roles = harmful.token_roles(d.acts, d.examples, collector)
                m = study.readout_mask(roles, d.acts.example, readout)
                sds.append(pooled.SourceData(d.source, d.examples, d.acts, m))
        for layer in _layers(args.layers):
            for c in (float(x) for x in args.C.split(",")):
                rows.append(study.study_table(sds, readout, layer, c))
                if not args.quiet:
                    print(study.markdown(rows[-1:]).splitlines()[2], flush=True)
    text = study.markdown(rows)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


def cmd_study_variants(args: argparse.Namespace) -> int:
    """Every-source LOSO of the detector variants beyond one linear probe (probes/study.py)."""
    import datetime
    import platform

    from monitor.tools.models import cache_dir as monitor_cache
    from probes import harmful, study
    from probes.collect import TransformersCollector
    from probes.sources import HARMFUL_SOURCES

    model_path, name = _model_path(args.model)
    cache = Path(args.cache) if args.cache else monitor_cache() / "probes"
    collector = TransformersCollector(model_path, name)
    sources = [s for s in HARMFUL_SOURCES if s.role == "train" or not args.validation]
    sizes = ([study.data_size(x, sources) for x in args.data_sizes.split(",")]
             if args.data_sizes else [])
    if sizes:  # load each source once, covering every arm; arms are subsets of it
        sources = study.loaded_sources(sources, sizes)
    # --validation: the bundle's test sources are neither fit on nor scored
    data = list(harmful.load_sources(collector, cache, sources, "user", harmful.LAYERS,
                                     progress=not args.quiet).values())
    arms = [study.Arm(sz, {d.name: study.arm_rows(d.source, sz) for d in data})
            for sz in sizes]
    all_vs = study.variants(harmful.LAYERS)
    vs = all_vs
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        if args.paired_to is not None:
            keep.add(args.paired_to)
        vs = [v for i, v in enumerate(all_vs) if i in keep or i == 0]
    weightings = [w for w in args.calibration_weighting.split(",") if w]
    bad = [w for w in weightings if w not in WEIGHTINGS]
    if bad or not weightings:
        print(f"study-variants: --calibration-weighting: expected a comma list of "
              f"{list(WEIGHTINGS)}; found {args.calibration_weighting!r}", file=sys.stderr)
        return 2
    rows = study.run_variants(data, vs, None if args.quiet else
                              lambda r: print(study.variant_line(r), flush=True), arms,
                              weightings)
    cmd = ("safety-probes study-variants" + (" --validation" if args.validation else "")
           + (f" --only {args.only}" if args.only else "")
           + (f" --data-sizes {args.data_sizes}" if args.data_sizes else "")
           + (f" --paired-to {args.paired_to}" if args.paired_to is not None else "")
           + (f" --calibration-weighting {args.calibration_weighting}"
              if weightings != ["row"] else "")
           + (f" --out {args.out}" if args.out else ""))
    over = ("every training source; validation: the bundle's test sources are neither fit "
            "on nor scored" if args.validation else "every source")
    head = (f"# harmful_intent: beyond one linear probe (leave one source out over {over})"
            f"\n\nGenerated by `{cmd}` (probes/study.py; default model, user-token "
            f"means of the activation cache of `make bundle`), "
            f"{datetime.date.today().isoformat()}, {platform.machine()} "
            f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; the s column is wall "
            "time per variant, all folds). Every source is scored by a detector fit without "
            "it; rates at each fold's warn threshold (1% FPR on the fold's held-back benign "
            "rows, weighted per row unless a row names its calibration weighting: "
            "probes/calibrate.py). CIs: AUROC 95% stratified bootstrap over requests "
            "(200), rates 95% Wilson. See docs/PROBES.md.\n\n")
    ref = all_vs[args.paired_to] if args.paired_to is not None else None
    text = head + study.variants_markdown(rows, ref)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


def cmd_study_split(args: argparse.Namespace) -> int:
    """Random split vs leave one source out, same requests and fitter (probes/split_study.py)."""
    import datetime
    import platform

    from monitor.tools.models import cache_dir as monitor_cache
    from probes import harmful, split_study, study
    from probes.collect import TransformersCollector
    from probes.sources import HARMFUL_SOURCES

    model_path, name = _model_path(args.model)
    cache = Path(args.cache) if args.cache else monitor_cache() / "probes"
    collector = TransformersCollector(model_path, name)
    pools = {"train": [s for s in HARMFUL_SOURCES if s.role == "train"],
             "test": [s for s in HARMFUL_SOURCES if s.role == "test"]}
    layer = int(harmful.PINNED["layers"][0])
    fit = study.recipe_fitter(layer, harmful.DEFAULT_SKIP_TOKENS)
    text = (f"# harmful_intent: a random split vs whole sources held out\n\n"
            f"Generated by `safety-probes study-split --folds {args.folds}` "
            f"(probes/split_study.py; default model, the shipped recipe's fitter: layer "
            f"{layer}, C 0.003, benign style out, length-debiased, the first "
            f"{harmful.DEFAULT_SKIP_TOKENS} user tokens left out), "
            f"{datetime.date.today().isoformat()}, {platform.machine()} "
            f"({os.cpu_count()} CPUs). Each pool of sources (the bundle's training "
            "sources; its test sources) on its own; nothing here is chosen or served. CIs: "
            "AUROC 95% stratified bootstrap (200). See docs/PROBES.md.\n")
    for role, srcs in pools.items():
        data = list(harmful.load_sources(collector, cache, srcs, "user", harmful.LAYERS,
                                         progress=not args.quiet).values())
        rows = split_study.split_rows(data, fit, study.ORDINARY, args.folds)
        ident = split_study.source_identity_accuracy(
            [d.skipping(harmful.DEFAULT_SKIP_TOKENS) for d in data], layer, args.folds)
        section = (f"\n## The bundle's {role} sources ({len(data)})\n\n"
                   + split_study.split_markdown(rows, ident, len(data), layer, args.folds))
        text += section
        print(section, flush=True)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def cmd_study_window(args: argparse.Namespace) -> int:
    """harmful_intent: a harmful request hidden in a long benign list; the mean read-out
    with and without a rolling-window read-out beside it (probes/window.py)."""
    import datetime
    import platform

    from monitor.tools.models import cache_dir as monitor_cache
    from probes import harmful, window
    from probes.collect import TransformersCollector
    from probes.lists import validation_lists
    from probes.sources import HARMFUL_SOURCES
    from probes.study import ORDINARY

    model_path, name = _model_path(args.model)
    cache = Path(args.cache) if args.cache else monitor_cache() / "probes"
    collector = TransformersCollector(model_path, name)
    # training sources only: the bundle's test sources are neither loaded nor scored
    train = list(harmful.load_sources(collector, cache, [s for s in HARMFUL_SOURCES
                                                         if s.role == "train"],
                                      "user", harmful.LAYERS,
                                      progress=not args.quiet).values())
    fit_idx, cal_idx = harmful.split_calibration(train)
    meta = validation_lists(train, cal_idx, args.per_harmful, args.benign_lists,
                            args.calibration_lists, args.seed,
                            calibration_mix=args.calibration_mix)
    layer = int(harmful.PINNED["layers"][0])
    lists = harmful.lists_source(meta, collector, cache, [layer], "user", not args.quiet)
    windows = [int(x) for x in args.windows.split(",")]
    skip = harmful.DEFAULT_SKIP_TOKENS if args.skip_tokens is None else args.skip_tokens
    rows = window.run_window_study(
        train, lists, meta, window.readouts(windows, args.fpr_a, args.split_calibration),
        fit_idx, cal_idx, functools.partial(harmful.recipe_fit, skip_tokens=skip),
        progress=None if args.quiet else print, ordinary=ORDINARY, skip_tokens=skip)
    cmd = (f"safety-probes study-window --windows {args.windows} --fpr-a {args.fpr_a:g} "
           f"--per-harmful {args.per_harmful} --benign-lists {args.benign_lists} "
           f"--calibration-lists {args.calibration_lists}"
           + (f" --seed {args.seed}" if args.seed else "")
           + (" --split-calibration" if args.split_calibration else "")
           + f" --calibration-mix {args.calibration_mix}"
           + (f" --skip-tokens {args.skip_tokens}" if args.skip_tokens is not None else ""))
    n_tok = lists.in_scope_tokens()
    head = (f"Generated by `{cmd}` (probes/window.py; default model, the shipped recipe's "
            f"probe per fold: layer {layer}, its own length slope, the first {skip} user "
            f"tokens left out of the mean read-out), "
            f"{datetime.date.today().isoformat()}, {platform.machine()} ({os.cpu_count()} "
            f"CPUs, load {os.getloadavg()[0]:.1f}). {len(meta.where('harmful'))} lists with "
            f"a hidden harmful row ({args.per_harmful} per harmful training source), "
            f"{len(meta.where('benign'))} reported benign lists, "
            f"{len(meta.where('calibration'))} calibration lists; user tokens per list: "
            f"median {int(np.median(n_tok))}, range {int(n_tok.min())}–{int(n_tok.max())}. "
            "Rates at warn with 95% Wilson intervals (alerts/requests); each source scored "
            "by the fold that holds it out.\n\n")
    text = head + window.window_markdown(rows)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


def cmd_calibrate_traffic(args: argparse.Namespace) -> int:
    """Thresholds from the deployment's own audit finals (probes/traffic.py)."""
    from monitor.judge.policy import PolicyError, load_policy
    from monitor.score.bundle import BundleError, load_bundle
    from probes import traffic

    def fail(e: Exception) -> int:
        print(f"safety-probes calibrate-traffic: error: {e}", file=sys.stderr)
        return 2

    def lines() -> Iterator[str]:  # streamed: an audit log may be gigabytes
        for path in args.audit_log:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f

    try:
        policy = load_policy(args.policy)
        text = Path(args.policy).read_text(encoding="utf-8")
        pairs = (traffic.union_pairs(load_bundle(args.bundle, load_tensors=False))
                 if args.bundle else [])
        finals = traffic.read_finals(lines(), None if args.all_versions else policy.version)
    except (PolicyError, BundleError, OSError) as e:
        return fail(e)
    rates = {"warn": args.warn_fpr, "critical": args.critical_fpr}
    try:
        results = traffic.calibrate_traffic(finals, policy, pairs, rates, args.holdout,
                                            args.detector or None)
    except ValueError as e:
        return fail(e)
    print(traffic.traffic_markdown(results, finals, policy, args.holdout), end="")
    if not any(not r.refused for r in results):
        print("safety-probes calibrate-traffic: no detector could be calibrated (no complete "
              "finals of this policy version? run the sidecar with --audit-finals)",
              file=sys.stderr)
        return 1
    if args.out:
        version = args.version or f"{policy.version}+traffic"
        try:  # e.g. a threshold only under defaults: edited in place or not at all
            new = traffic.new_policy_text(text, results, version, args.policy)
        except PolicyError as e:
            return fail(e)
        Path(args.out).write_text(new, encoding="utf-8")
        print(f"wrote {args.out} (version {version}; modes unchanged: check it with "
              f"`safety-monitor check`, then decide which detector to switch to alert)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safety-probes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build-default", help="build the default bundle (collect, train, "
                       "calibrate, evaluate, export, report)")
    b.add_argument("--out", default="bundles/default")
    b.add_argument("--model", default=None, help="HF folder (default: prepared SmolLM2)")
    b.add_argument("--model-name", default=None,
                   help="identity the bundle is for: the name vLLM serves the model as "
                        "(SAFETY_MONITOR_MODEL); default: the --model path")
    b.add_argument("--layers", default=None,
                   help="layers to collect, e.g. 8,12,16 (default with --model: the default "
                        "recipes' layers at the same relative depths)")
    b.add_argument("--cache", default=None, help="activation cache (default: "
                   "$SAFETY_MONITOR_CACHE/probes)")
    b.add_argument("--scope", default="user", choices=("user", "prompt"),
                   help="harmful_intent token scope (user: the user's message content)")
    b.add_argument("--judge-at", default="span_end", choices=("span_end", "every_token", "any"),
                   help="when harmful_intent is judged (policy judge_at): span_end (once, where "
                        "the user's text ends: the statistic the probe is trained on), "
                        "every_token (every prefix), any (searched on validation)")
    b.add_argument("--detectors", default="harmful_intent,deception")
    b.add_argument("--limit", type=int, default=None, metavar="N",
                   help="data budget: at most N (>= 2) examples per source / prompt set "
                        "(smoke runs and sizing; the bundle loads and serves, its numbers "
                        "mean nothing)")
    b.add_argument("--device", default="cpu", help="torch device of the collection forward "
                                                   "passes and generation (e.g. cuda)")
    b.add_argument("--style-projection", default="benign", choices=["benign", "both", ""],
                   help="harmful_intent: project the training sources' style directions "
                   "out before the fit (benign: the benign sources'; both: also the harmful "
                   "sources'; '': off, the session-6 recipe); with the length term only")
    b.add_argument("--calibration-weighting", default="row", choices=list(WEIGHTINGS),
                   help="harmful_intent's thresholds: every held-back benign row the same "
                   "weight (row), every benign source the same total weight (source), or "
                   "every source's own rate <= the target (worst); probes/calibrate.py")
    b.add_argument("--pooling", default=None, choices=["mean", "softmax"],
                   help="harmful_intent: how the probe pools the user's tokens in training; "
                   "mean (logistic regression on the mean activation, served mean_logit) or "
                   "softmax (the softmax probe of probes/token_pool.py at --temperature, "
                   "served softmax_logit); default: probes.harmful.DEFAULT_POOLING")
    b.add_argument("--temperature", type=float, default=None, metavar="TAU",
                   help="harmful_intent with --pooling softmax: tau of the softmax weights "
                   "(served as the softmax_logit temperature, in [0.25, 1e6]); default: "
                   "probes.harmful.DEFAULT_TEMPERATURE")
    b.add_argument("--skip-tokens", type=int, default=None, metavar="K",
                   help="harmful_intent: the first K user tokens of each request longer "
                   "than K left out of the probe's mean, fit and served (mean_logit "
                   "skip_tokens, 0..64); 0: every token (the session-13 recipe); default: "
                   "probes.harmful.DEFAULT_SKIP_TOKENS with mean pooling and the length term")
    b.add_argument("--no-length-debias", dest="length_debias", action="store_false",
                   help="harmful_intent without the length term (mean_logit length_slope "
                        "0): the session-5 recipe")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build_default)

    c = sub.add_parser("collect", help="collect activations for JSONL examples")
    c.add_argument("--data", nargs="+", required=True, help="JSONL files (prompt|messages, "
                   "label, [completion, category])")
    c.add_argument("--layers", required=True, help="comma-separated, e.g. 9,12")
    c.add_argument("--scope", default="prompt", choices=SELECTION_SCOPES)
    c.add_argument("--exclude-tail", type=int, default=0)
    c.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    c.add_argument("--model", default=None)
    c.add_argument("--cache", default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(fn=cmd_collect)

    t = sub.add_parser("train", help="train a per-token probe on collected activations "
                       "(row label = example label)")
    t.add_argument("--acts", required=True)
    t.add_argument("--layer", type=int, required=True)
    t.add_argument("--method", default="logreg", choices=["logreg", "diffmean"])
    t.add_argument("--C", type=float, default=0.01)
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_train)

    k = sub.add_parser("calibrate", help="thresholds at 1%%/0.1%% FPR on benign examples, "
                       "printed with a policy snippet")
    k.add_argument("--probe", required=True)
    k.add_argument("--acts", required=True)
    k.add_argument("--name", default="detector")
    k.add_argument("--scope", default="prompt", choices=["prompt", "generated", "both"])
    k.add_argument("--aggregation", default="max",
                   choices=["max", "mean", "ema", "window_max"])
    k.add_argument("--half-life", type=float, default=4.0)
    k.add_argument("--window", type=int, default=16)
    k.add_argument("--min-tokens", type=int, default=1)
    k.set_defaults(fn=cmd_calibrate)

    i = sub.add_parser("inspect", help="show a bundle's detectors and suggested policy")
    i.add_argument("--bundle", default="bundles/default")
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("train-sae", help="train the default model's SAE on this CPU "
                       "(BatchTopK -> JumpReLU, SAELens layout; docs/SAE.md)")
    s.add_argument("--out", default="bundles/sae/smollm2-135m-l18")
    s.add_argument("--model", default=None, help="HF folder (default: prepared SmolLM2)")
    s.add_argument("--cache", default=None, help="activation cache (default: "
                   "~/.cache/safety-monitor/sae)")
    s.add_argument("--n-examples", type=int, default=1024)
    s.add_argument("--n-heldout", type=int, default=128)
    s.add_argument("--d-sae", type=int, default=2048)
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_train_sae)

    sd = sub.add_parser("sae-detector", help="harmful-intent detector over SAE latents, "
                        "evaluated beside the dense probe, with latent labels")
    sd.add_argument("--sae", default="bundles/sae/smollm2-135m-l18")
    sd.add_argument("--out", default="bundles/sae-detector")
    sd.add_argument("--dense", default="bundles/default", help="bundle with the dense probe")
    sd.add_argument("--dense-detector", default="harmful_intent")
    sd.add_argument("--model", default=None)
    sd.add_argument("--cache", default=None)
    sd.add_argument("--n-heldout", type=int, default=128)
    sd.add_argument("--n-latents", type=int, default=16)
    sd.add_argument("--quiet", action="store_true")
    sd.set_defaults(fn=cmd_sae_detector)

    ad = sub.add_parser("add-sae-detector", help="merge the SAE detector bundle into a bundle "
                        "(observe mode; a step of `make bundle`)")
    ad.add_argument("--bundle", default="bundles/default")
    ad.add_argument("--source", default="bundles/sae-detector")
    ad.set_defaults(fn=cmd_add_sae_detector)

    st = sub.add_parser("study-loso", help="harmful_intent generalisation study: leave one "
                        "source out over EVERY source (train and test roles), per read-out, "
                        "layer and C (docs/PROBES.md)")
    st.add_argument("--readouts", default="user,post,prompt",
                    help="comma list of user | post | prompt (probes/study.py)")
    st.add_argument("--layers", default="15")
    st.add_argument("--C", default="0.001")
    st.add_argument("--model", default=None)
    st.add_argument("--cache", default=None)
    st.add_argument("--out", default=None, help="write the markdown tables here")
    st.add_argument("--quiet", action="store_true")
    st.set_defaults(fn=cmd_study_loso)

    sv = sub.add_parser("study-variants", help="harmful_intent: several layers, shrinkage, "
                        "non-linear heads, a cascade and hard negatives, each leave one "
                        "source out over every source (probes/study.py, docs/PROBES.md)")
    sv.add_argument("--only", default=None,
                    help="comma list of variant indices (study.variants(); 0, the "
                    "baseline, is always run)")
    sv.add_argument("--validation", action="store_true",
                    help="leave one source out over the TRAINING sources only (the bundle's "
                    "test sources neither fit on nor scored): the numbers a choice between "
                    "variants may be made on (probes/sources.py roles)")
    sv.add_argument("--data-sizes", default=None,
                    help="comma list of training-data arms, each variant run on each: "
                    "shipped (the caps in probes/sources.py), session6 (the session-6 caps), "
                    "N (every training source: all its rows up to N) or without:A+B (the "
                    "shipped caps minus sources A and B); every arm is scored on the same "
                    "requests (those all arms keep)")
    sv.add_argument("--paired-to", type=int, default=None,
                    help="variant index every other variant's AUROC is compared with, "
                    "paired on the same requests (default: the baseline, 0)")
    sv.add_argument("--calibration-weighting", default="row",
                    help="comma list of calibration weightings (probes/calibrate.py: row, "
                    "source, worst), each variant read out under each (the same fits; "
                    "only each fold's thresholds differ) and paired to the first")
    sv.add_argument("--model", default=None)
    sv.add_argument("--cache", default=None)
    sv.add_argument("--out", default=None, help="write the markdown tables here")
    sv.add_argument("--quiet", action="store_true")
    sv.set_defaults(fn=cmd_study_variants)

    sp = sub.add_parser("study-split", help="harmful_intent: a random split of the "
                        "requests vs leave one source out, same requests and fitter, and "
                        "how well the source can be read off the features "
                        "(probes/split_study.py, docs/PROBES.md)")
    sp.add_argument("--folds", type=int, default=5)
    sp.add_argument("--model", default=None)
    sp.add_argument("--cache", default=None)
    sp.add_argument("--out", default=None, help="write the markdown tables here")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_study_split)

    sw = sub.add_parser("study-window", help="harmful_intent: a harmful request hidden in a "
                        "long benign list; the mean read-out alone vs with a rolling-window "
                        "read-out beside it, leave one TRAINING source out "
                        "(probes/window.py, docs/experiments/window_validation.md)")
    sw.add_argument("--windows", default="8,16,32,64", help="comma list of window sizes N")
    sw.add_argument("--fpr-a", type=float, default=0.005,
                    help="share of the 1%% false-alert budget given to the mean read-out "
                    "(the window read-out gets the rest)")
    sw.add_argument("--per-harmful", type=int, default=30,
                    help="lists with a hidden row per harmful training source")
    sw.add_argument("--benign-lists", type=int, default=200)
    sw.add_argument("--calibration-lists", type=int, default=150)
    sw.add_argument("--split-calibration", action="store_true",
                    help="unions: T_a on the calibration rows only, T_b bounding the rows "
                         "and the calibration lists each (window.split_thresholds)")
    sw.add_argument("--calibration-mix", choices=["per_kind", "pooled"],
                    default="per_kind",
                    help="calibration lists: --calibration-lists per filler kind, each "
                    "list's fillers of one kind, bounded per kind (per_kind), or drawn "
                    "from all kinds pooled (pooled: runs 1-5)")
    sw.add_argument("--seed", type=int, default=0,
                    help="seed of the lists (filler halves, tasks, order); the folds and "
                    "their calibration rows do not depend on it")
    sw.add_argument("--skip-tokens", type=int, default=None, metavar="K",
                    help="the probe and the mean read-out without the first K user tokens "
                    "(default: probes.harmful.DEFAULT_SKIP_TOKENS, the shipped recipe; 0: "
                    "every token, the study's runs 1-5)")
    sw.add_argument("--model", default=None)
    sw.add_argument("--cache", default=None)
    sw.add_argument("--out", default=None, help="write the markdown tables here")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(fn=cmd_study_window)

    ct = sub.add_parser("calibrate-traffic", help="thresholds at target false-alert rates "
                        "on the deployment's own traffic (the sidecar's audit finals, "
                        "observe mode), written into a copy of the policy")
    ct.add_argument("--audit-log", action="append", required=True,
                    help="audit JSONL written with --audit-finals (repeatable: rotated files)")
    ct.add_argument("--policy", required=True,
                    help="the policy the finals were judged under (its version selects them)")
    ct.add_argument("--bundle", default=None,
                    help="the bundle: pairs served as a union (calibration.union) are "
                    "calibrated together, as the build does; without it every detector alone")
    ct.add_argument("--warn-fpr", type=float, default=0.01)
    ct.add_argument("--critical-fpr", type=float, default=0.001)
    ct.add_argument("--holdout", type=float, default=0.3,
                    help="later share of the requests (by time) the stability check holds out")
    ct.add_argument("--detector", action="append", default=None,
                    help="only this detector (repeatable; a detector served as a pair "
                    "brings its partner; default: every one with finals)")
    ct.add_argument("--all-versions", action="store_true",
                    help="use finals of every policy version (only if they judged alike)")
    ct.add_argument("--version", default=None,
                    help="version of the written policy (default: <old>+traffic)")
    ct.add_argument("--out", default=None, help="write the recalibrated policy here")
    ct.set_defaults(fn=cmd_calibrate_traffic)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``safety-probes``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
