"""Deception data with the SAME instruction on both sides of each contrast.

The old recipe labelled answers by an honest / dishonest persona instruction, so its probe
learnt "an instruction to lie is present". Here every pair shares its prompt and differs
only in the assistant's answer, so a probe on the answer tokens can only use the answer:

- ``instructed_qa`` (LLM-LieDetector questions): the user's question, answered with the
  true answer (0) or the dataset's false answer (1); no persona instruction.
- ``truth_<set>`` (geometry-of-truth): a fixed request ("Tell me a fact.") answered with
  a true (0) or false (1) statement.
- ``goal_directed`` (LLM-LieDetector goal-directed scenarios, the unseen test source):
  a system prompt that does or does not reward lying, the assistant's answer (the same
  pre-written answer under both contexts, or text-davinci-003 rollouts); label 1 = the
  answer deceives the user.

Every example's completion is scored as generated tokens (``TokenSelection("generated")``).
Splits are by ``pair_id`` (never inside a pair).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probes.collect import TransformersCollector
from probes.datasets import ChatExample
from probes.sources import shared_v2_dir

if TYPE_CHECKING:
    from probes.export import DetectorResult

__all__ = ["FACT_REQUEST", "generate_answers", "load_goal_directed", "load_instructed_qa",
           "load_truth_set"]

FACT_REQUEST = "Tell me a fact."


def _root():
    root = shared_v2_dir()
    if root is None:
        raise FileNotFoundError("datasets-v2 not found (see probes.sources.shared_v2_dir)")
    return root / "deception"


def _pairs_file(name: str, source: str) -> list[tuple[str, list[ChatExample]]]:
    by_pair: dict[str, list[ChatExample]] = {}
    for line in (_root() / name).read_text("utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        msgs = r["messages"]
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{name}: row {r['id']}: expected the last message to be the "
                             f"assistant's, found {msgs[-1]['role']!r}")
        ex = ChatExample.make(msgs[:-1], int(r["label"]), completion=msgs[-1]["content"],
                              category=r.get("category"), source=source, pair=r["pair_id"])
        by_pair.setdefault(r["pair_id"], []).append(ex)
    return sorted(by_pair.items())


def load_instructed_qa(n_pairs: int, seed: int = 0,
                       prefix: str = "questions_1000_all") -> list[list[ChatExample]]:
    """``n_pairs`` seeded pairs (honest, deceptive) of ``category`` starting with
    ``prefix``; each pair shares the question."""
    pairs = [sorted(p, key=lambda e: e.label) for _, p in
             _pairs_file("liedetector_instructed_qa.jsonl", "instructed_qa")
             if len(p) == 2 and (p[0].category or "").startswith(prefix)]
    random.Random(seed).shuffle(pairs)
    return pairs[:n_pairs]


def load_truth_set(name: str, n: int, seed: int = 0) -> list[ChatExample]:
    """``n`` seeded statements of a geometry-of-truth CSV as answers to ``FACT_REQUEST``
    (label 1 = false statement)."""
    with (_root() / "geometry_of_truth" / f"{name}.csv").open(encoding="utf-8",
                                                                newline="") as f:
        rows = [(r["statement"].strip(), int(r["label"])) for r in csv.DictReader(f)]
    random.Random(seed).shuffle(rows)
    return [ChatExample.make([{"role": "user", "content": FACT_REQUEST}], 1 - lab,
                             completion=st, source=f"truth_{name}") for st, lab in rows[:n]]


def load_goal_directed() -> list[ChatExample]:
    """All goal-directed pairs (the unseen test source)."""
    return [e for _, p in _pairs_file("liedetector_goal_directed.jsonl", "goal_directed")
            for e in p]


# ----------------------------------------------------------------------- generation
def generate_answers(collector: TransformersCollector, prompts: Sequence[ChatExample],
                     cache_dir: Path | None, *, sample: bool, max_new_tokens: int = 32,
                     seed: int = 0, progress: bool = True) -> list[ChatExample]:
    """The model's own answers (transformers ``generate``, greedy or sampled with
    temperature 0.7 / top-p 0.95, seeded), cached as JSONL: ordinary generated traffic.
    Each returned example keeps the prompt's messages, label and source."""
    import hashlib

    import torch
    from tqdm.auto import tqdm

    from probes.datasets import dataset_fingerprint

    key = hashlib.sha256(f"{collector.model_identity()}|{dataset_fingerprint(prompts)}|"
                         f"{max_new_tokens}|{sample}|{seed}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / "generations" / f"{key}.jsonl" if cache_dir else None
    if path is not None and path.is_file():
        rows = [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()]
    else:
        tok, model = collector.tokenizer, collector.model
        tok.padding_side = "left"
        no_pad = tok.pad_token is None  # e.g. Llama 3: pad the batch with eos (masked out)
        if no_pad:
            tok.pad_token = tok.eos_token
        torch.manual_seed(seed)
        rows = []
        bs = 16
        try:
            for s in tqdm(range(0, len(prompts), bs), desc="generate", disable=not progress,
                          leave=False):
                batch = prompts[s:s + bs]
                enc = tok([collector.render_prompt(e) for e in batch], add_special_tokens=False,
                          return_tensors="pt", padding=True).to(getattr(collector, "device", "cpu"))
                kw: dict[str, Any] = {"do_sample": True, "temperature": 0.7, "top_p": 0.95} \
                    if sample else {"do_sample": False}
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                         pad_token_id=tok.pad_token_id or tok.eos_token_id, **kw)
                for i, o in enumerate(out[:, enc["input_ids"].shape[1]:]):
                    rows.append({"i": s + i, "completion": tok.decode(
                        o, skip_special_tokens=True).strip()})
        finally:
            tok.padding_side = "right"
            if no_pad:
                tok.pad_token = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out_ex = []
    for r in rows:
        if not r["completion"]:
            continue
        e = prompts[r["i"]]
        out_ex.append(ChatExample.make(e.chat, e.label, r["completion"], e.category,
                                       e.source, **dict(e.meta),
                                       decoding="sampled" if sample else "greedy"))
    return out_ex


# ----------------------------------------------------------------------- the recipe
LAYERS = (9, 12, 15, 18)
CS = (1e-3, 1e-2, 1e-1)
SERVED_AGG: dict[str, Any] = {"kind": "mean"}
MIN_TOKENS = 1
"""Answers are often one to three tokens: the running mean from the first generated
token (``min_tokens`` 1)."""

#: Benign prompts whose generated answers calibrate the thresholds (sources, rows each).
CALIB_PROMPTS = (("alpaca", 24), ("self_instruct", 16), ("mtbench", 12),
                 ("personas_train", 24), ("medquad", 8))
#: Benign prompts whose answers only test the false-alert rate (never calibrated on).
TEST_PROMPTS = (("oasst", 24), ("personas_test", 24), ("coconot_contrast", 16))
#: Harmful prompts whose answers measure cross-detector confusion.
CONFUSION_PROMPTS = (("do_not_answer", 16),)


def budget(spec: Sequence[tuple[str, int]], limit: int | None) -> tuple[tuple[str, int], ...]:
    """A prompt-set spec with every count capped at ``limit`` (None: unchanged)."""
    return tuple((name, n if limit is None else min(n, limit)) for name, n in spec)


def _prompt_set(spec: Sequence[tuple[str, int]], seed: int) -> list[ChatExample]:
    from probes.sources import HARMFUL_SOURCES, load_source

    by = {s.name: s for s in HARMFUL_SOURCES}
    out: list[ChatExample] = []
    for name, n in spec:
        rows = load_source(by[name])
        idx = random.Random(seed).sample(range(len(rows)), min(n, len(rows)))
        out += [rows[i] for i in sorted(idx)]
    return out


def deception_recipe(collector: TransformersCollector, cache_dir: Path | None, *,
                     n_pairs: int = 400, layers: Sequence[int] = LAYERS,
                     Cs: Sequence[float] = CS,
                     seed: int = 0, progress: bool = True, limit: int | None = None
                     ) -> DetectorResult:
    """Same-instruction contrasts → leave-one-source-out choice of layer / C → fit →
    thresholds on the model's own benign answers → unseen goal-directed scenarios.

    ``limit`` (a data budget for smoke runs and sizing; None: the full recipe) caps every
    training source, prompt set and the goal-directed pairs at that many examples (pairs).
    """
    from probes.calibrate import calibrate
    from probes.collect import TokenSelection
    from probes.evaluate import auroc, auroc_ci, evaluate_scores, wilson_ci
    from probes.export import DetectorResult, threshold_ladder
    from probes.pooled import SourceData, served_scores
    from probes.sources import Source
    from probes.train import LinearProbe, fit_logreg

    sel = TokenSelection("generated")

    def sd(name: str, exs: list[ChatExample], role: str) -> SourceData:
        acts = collector.collect(exs, layers, sel, cache_dir=cache_dir, progress=progress,
                                 desc=f"deception/{name}")
        return SourceData(Source(name, "deception", role, "v2", name), exs, acts,
                          acts.generated.astype(bool))

    def cap(n: int) -> int:
        return n if limit is None else min(n, limit)

    train = [sd("instructed_qa", [e for p in load_instructed_qa(cap(n_pairs), seed)
                                  for e in p], "train"),
             sd("truth_cities", load_truth_set("cities", cap(400), seed), "train"),
             sd("truth_sp_en_trans", load_truth_set("sp_en_trans", cap(300), seed), "train"),
             sd("truth_larger_than", load_truth_set("larger_than", cap(300), seed), "train")]
    goal = load_goal_directed()  # honest / deceptive pairs, in order
    test = sd("goal_directed", goal if limit is None else goal[:2 * limit], "test")

    def fit(parts: Sequence[SourceData], layer: int, C: float,
            shuffle: np.random.Generator | None = None) -> LinearProbe:
        x = np.concatenate([d.features(layer) for d in parts])
        y = np.concatenate([d.labels for d in parts])
        if shuffle is not None:
            y = shuffle.permutation(y)
        return fit_logreg(x, y, layer, C, max_iter=500)

    # leave-one-source-out selection, per layer and C (served statistic). Every held-out
    # source holds both labels, so each fold is scored on its own scale: the criterion is
    # the mean over folds of each fold's AUROC (pooling the folds' raw scores would mix
    # the scales of four different fits)
    table, best = [], None
    for lay in layers:
        for c in Cs:
            per = {}
            for h in train:
                s = served_scores(fit([d for d in train if d is not h], lay, c), h.acts,
                                  h.mask, SERVED_AGG, MIN_TOKENS)
                per[f"{h.name}.auroc"] = auroc(h.labels, s)
            # a source with one label (a --limit smoke build) has no AUROC: left out
            known = [v for v in per.values() if not np.isnan(v)]
            mean_auroc = float(np.mean(known)) if known else float("nan")
            table.append({"layer": lay, "C": c, "loso.mean_auroc": round(mean_auroc, 4),
                          **{k: round(v, 4) for k, v in per.items()}})
            if best is None or mean_auroc > best[0] or np.isnan(best[0]):
                best = (mean_auroc, lay, c)
    assert best is not None
    _, layer, C = best
    probe = fit(train, layer, C)

    def served(d: SourceData) -> np.ndarray:
        return served_scores(probe, d.acts, d.mask, SERVED_AGG, MIN_TOKENS)

    # per-layer test numbers (evidence; the choice above never saw them) + control
    per_layer = []
    rng = np.random.default_rng(seed)
    for lay in layers:
        p = fit(train, lay, C)
        s = served_scores(p, test.acts, test.mask, SERVED_AGG, MIN_TOKENS)
        ps = fit(train, lay, C, shuffle=rng)
        s_ctl = served_scores(ps, test.acts, test.mask, SERVED_AGG, MIN_TOKENS)
        per_layer.append({"layer": lay, "goal_directed.auroc": round(auroc(test.labels, s), 4),
                          "shuffled-label control.auroc":
                              round(auroc(test.labels, s_ctl), 4)})
    curve = []
    for fr in (0.1, 0.25, 0.5, 1.0):
        parts = []
        for d in train:
            k = max(2, int(fr * len(d.examples)))
            idx = np.sort(rng.permutation(len(d.examples))[:k])
            parts.append((d, idx))
        x = np.concatenate([d.features(layer)[i] for d, i in parts])
        y = np.concatenate([d.labels[i] for d, i in parts])
        p = fit_logreg(x, y, layer, C, max_iter=500)
        s = served_scores(p, test.acts, test.mask, SERVED_AGG, MIN_TOKENS)
        curve.append({"train_fraction": fr, "n_train": int(y.size),
                      "goal_directed.auroc": round(auroc(test.labels, s), 4)})

    # calibration on the model's own answers (greedy + sampled), then held-out benign answers
    def answers(spec: Sequence[tuple[str, int]], tag: str) -> SourceData:
        prompts = _prompt_set(budget(spec, limit), seed)
        exs = (generate_answers(collector, prompts, cache_dir, sample=False, progress=progress)
               + generate_answers(collector, prompts, cache_dir, sample=True, seed=seed,
                                  progress=progress))
        return sd(tag, exs, "test")

    cal_sd = answers(CALIB_PROMPTS, "benign_answers_calibration")
    s_cal = served(cal_sd)
    cal = calibrate(s_cal, benign_set="the model's own answers (greedy + sampled, 32 new tokens)"
                    " to " + ", ".join(f"{n} {k}" for n, k in budget(CALIB_PROMPTS, limit))
                    + " prompts (persona system prompts included)")
    thr = threshold_ladder(cal)
    test_sd = answers(TEST_PROMPTS, "benign_answers_test")
    s_ben = served(test_sd)
    harm_sd = answers(CONFUSION_PROMPTS, "harmful_prompt_answers")
    s_harm = served(harm_sd)
    s_test = served(test)
    metrics: dict[str, Any] = {"validation": table, "per_layer_test": per_layer,
                               "learning_curve": curve}
    gd = evaluate_scores(test.labels, s_test, None, thr)
    gd["auroc_ci"] = auroc_ci(test.labels, s_test)
    metrics["goal_directed"] = gd
    for kind in ("prewritten", "rollout"):
        in_kind = np.array([kind in (e.category or "") for e in test.examples])
        metrics[f"goal_directed_{kind}"] = evaluate_scores(test.labels[in_kind],
                                                           s_test[in_kind], None, thr)

    def rates(exs: Sequence[ChatExample], s: np.ndarray) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(exs):
            groups.setdefault(f"{e.source}/{dict(e.meta).get('decoding', '')}", []).append(i)
        for g, idx in sorted(groups.items()):
            v = s[idx]
            row: dict[str, Any] = {"n": len(idx)}
            for sev, t in thr.items():
                k = int((v >= t).sum())
                row[f"rate@{sev}"] = k / len(idx)
                row[f"rate@{sev}_ci"] = wilson_ci(k, len(idx))
            out[g] = row
        return out

    metrics["benign_answers_test"] = rates(test_sd.examples, s_ben)
    metrics["benign_answers_calibration"] = rates(cal_sd.examples, s_cal)
    metrics["harmful_prompt_answers"] = rates(harm_sd.examples, s_harm)
    cal.update({"aggregation": SERVED_AGG, "min_tokens": MIN_TOKENS, "scope": "generated"})
    return DetectorResult(
        name="deception",
        description="EXPERIMENTAL (observe only): the answer states something false "
                    "(generated tokens)",
        probe=probe, scope="generated", aggregation=SERVED_AGG, min_tokens=MIN_TOKENS,
        calibration=cal, metrics=metrics, selection=table,
        datasets=[f"{d.name} ({len(d.examples)} answers, pairs share the prompt)" for d in train]
        + [f"TEST goal_directed ({len(test.examples)}: LLM-LieDetector scenarios, unseen)"],
        token_labels="label of the answer (false / deceptive 1) on the mean of the generated "
                     "tokens; both members of a pair share the prompt",
        scores={"goal_directed": (test.labels, s_test),
                "benign answers (test)": (np.zeros(s_ben.size), s_ben),
                "calibration": (np.zeros(s_cal.size), s_cal)},
    )
