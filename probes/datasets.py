"""Labelled chat examples for probe training and evaluation.

A :class:`ChatExample` is what the monitor would see: the request ``messages`` (rendered
with the model's chat template and ``add_generation_prompt=True``, exactly like vLLM's
chat endpoint) and optionally an assistant ``completion`` whose tokens play the part of
*generated* tokens (teacher forcing: the hidden state of generated token ``g_j`` is the
row at position ``prompt_len + j``, as in a vLLM decode step).

Sources:

- the shared datasets (``../shared/datasets`` next to the repository, or
  ``$SAFETY_PROBES_DATASETS``): read in place, never copied into the repository;
- ``probes/data/*.jsonl`` written for this project (see ``probes/data/README.md``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "ChatExample",
    "dataset_fingerprint",
    "load_jsonl",
    "load_refusal_json",
    "load_statements",
    "persona_examples",
    "shared_datasets_dir",
    "split",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Project-written example files (``probes/data``)."""

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ChatExample:
    """One labelled request.

    ``messages``: chat messages (``{"role", "content"}``) up to the last user turn.
    ``label``: 1 = positive class (harmful / dishonest), 0 = benign.
    ``completion``: assistant text scored as generated tokens (None: prompt only).
    ``category``: per-category breakdown key; ``source``: dataset name.
    """

    messages: tuple[tuple[tuple[str, str], ...], ...]
    label: int
    completion: str | None = None
    category: str | None = None
    source: str = ""
    meta: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @staticmethod
    def make(
        messages: Sequence[dict[str, str]],
        label: int,
        completion: str | None = None,
        category: str | None = None,
        source: str = "",
        **meta: str,
    ) -> ChatExample:
        """Build from plain dict messages (stored as hashable tuples)."""
        msgs = tuple(tuple(sorted(m.items())) for m in messages)
        return ChatExample(msgs, int(label), completion, category, source,
                           tuple(sorted(meta.items())))

    @property
    def chat(self) -> list[dict[str, str]]:
        """Messages as ``[{"role": ..., "content": ...}]`` for ``apply_chat_template``."""
        return [dict(m) for m in self.messages]

    @property
    def user_text(self) -> str:
        """Content of the last user message ("" if none)."""
        for m in reversed(self.chat):
            if m["role"] == "user":
                return m["content"]
        return ""

    def with_system(self, system: str | None) -> ChatExample:
        """The same example with a system message prepended (or replaced)."""
        chat = [m for m in self.chat if m["role"] != "system"]
        if system:
            chat = [{"role": "system", "content": system}, *chat]
        return ChatExample.make(chat, self.label, self.completion, self.category,
                                self.source, **dict(self.meta))


def shared_datasets_dir() -> Path | None:
    """``$SAFETY_PROBES_DATASETS`` or ``<repo>/../shared/datasets``; None when absent."""
    env = os.environ.get("SAFETY_PROBES_DATASETS")
    p = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets"
    return p if p.is_dir() else None


def _need_shared() -> Path:
    root = shared_datasets_dir()
    if root is None:
        raise FileNotFoundError(
            "shared datasets not found: set $SAFETY_PROBES_DATASETS or place them at "
            f"{REPO_ROOT.parent / 'shared' / 'datasets'}"
        )
    return root


def load_refusal_json(name: str, label: int, root: Path | None = None) -> list[ChatExample]:
    """A ``refusal_direction`` file (JSON list of ``{"instruction", "category"}``) as
    single-turn user requests. ``name`` is relative to the datasets root, e.g.
    ``harmful_intent/harmful_train.json``."""
    path = (root or _need_shared()) / name
    rows = json.loads(path.read_text(encoding="utf-8"))
    src = Path(name).stem
    return [
        ChatExample.make([{"role": "user", "content": r["instruction"]}], label,
                         category=r.get("category") or None, source=src)
        for r in rows
    ]


def load_jsonl(path: str | Path, source: str | None = None) -> list[ChatExample]:
    """Project JSONL: one object per line with ``prompt`` (or ``messages``), ``label``,
    optional ``category``, ``completion``."""
    path = Path(path)
    out: list[ChatExample] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        out.append(ChatExample.make(msgs, int(r["label"]), r.get("completion"),
                                    r.get("category"), source or path.stem))
    return out


def load_statements(name: str, root: Path | None = None,
                    only_label: int | None = None) -> list[tuple[str, int]]:
    """A ``statement,label`` CSV (1 = true) as ``(statement, label)`` pairs."""
    path = (root or _need_shared()) / name
    with path.open(encoding="utf-8", newline="") as f:
        rows = [(r["statement"].strip(), int(r["label"])) for r in csv.DictReader(f)]
    if only_label is not None:
        rows = [r for r in rows if r[1] == only_label]
    return rows


def persona_examples(
    statements: Iterable[str],
    honest: Sequence[str],
    dishonest: Sequence[str],
    *,
    placement: str = "mixed",
    user_request: Sequence[str] = ("",),
    source: str = "",
    seed: int = 0,
) -> list[ChatExample]:
    """Instructed-honesty pairs: for each statement, one honest (label 0) and one
    dishonest (label 1) persona instruction; the assistant states the (true) statement.

    ``placement``: ``user`` (instruction in the user turn), ``system`` (system turn, with
    a user request from ``user_request``), or ``mixed`` (alternating per statement).
    Both members of a pair share placement, phrasing index and user request, so the
    only difference is the honesty instruction.
    """
    rng = random.Random(seed)
    out: list[ChatExample] = []
    for i, st in enumerate(statements):
        place = placement if placement != "mixed" else ("user", "system")[i % 2]
        k = rng.randrange(min(len(honest), len(dishonest)))
        req = rng.choice(list(user_request)) or "Tell me a fact."
        for label, persona in ((0, honest[k]), (1, dishonest[k])):
            if place == "user":
                msgs = [{"role": "user", "content": persona}]
            else:
                msgs = [{"role": "system", "content": persona},
                        {"role": "user", "content": req}]
            out.append(ChatExample.make(msgs, label, completion=st, source=source,
                                        category=place, pair=str(i)))
    return out


def split(items: Sequence, fractions: Sequence[float], seed: int = 0) -> list[list]:
    """Deterministic shuffled split of ``items`` into parts of the given fractions
    (the last part takes the remainder)."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    parts: list[list] = []
    start = 0
    for i, fr in enumerate(fractions):
        end = len(idx) if i == len(fractions) - 1 else start + round(fr * len(idx))
        parts.append([items[j] for j in idx[start:end]])
        start = end
    return parts


def dataset_fingerprint(examples: Sequence[ChatExample]) -> str:
    """sha256 over the examples' content (order-sensitive): the dataset part of the
    activation cache key."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(asdict(ex), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
