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

Every example's completion is scored as generated tokens (``TokenSelection("response")``).
Splits are by ``pair_id`` (never inside a pair).
"""

from __future__ import annotations

import csv
import json
import random

from probes.datasets import ChatExample
from probes.sources import shared_v2_dir

__all__ = ["FACT_REQUEST", "load_goal_directed", "load_instructed_qa", "load_truth_set"]

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
