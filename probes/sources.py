"""Named data sources for the default detectors and their train / validation / test roles.

A *source* is one public dataset file (or one project-written file) loaded as a list of
:class:`~probes.datasets.ChatExample` in file order (``source`` = the source name, so
activations are cached per source and every split is by whole source). Roles:

- ``train``: rows the probe may be fit on; during selection each training source is in
  turn held out (leave-one-source-out) so every choice is made on a source the probe
  did not see;
- ``test``: never fit on, never used for a choice or a threshold; evaluated once at the
  end and named in the report.

Shared data is read in place from ``../shared/datasets`` and ``../shared/datasets-v2``
(or ``$SAFETY_PROBES_DATASETS`` / ``$SAFETY_PROBES_DATASETS_V2``), never copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from probes.datasets import DATA_DIR, REPO_ROOT, ChatExample, load_jsonl, load_refusal_json

__all__ = [
    "HARMFUL_SOURCES",
    "Source",
    "kept_rows",
    "load_source",
    "shared_v2_dir",
    "sources_available",
    "subsample",
]


@dataclass(frozen=True)
class Source:
    """One data source of the harmful-intent detector.

    ``kind``: ``harmful`` (label 1), ``benign`` (ordinary requests), ``scary`` (benign
    requests that sound dangerous), ``persona`` (benign requests under persona /
    scenario system prompts). ``role``: ``train`` or ``test`` (see module doc).
    ``where``: ``v2`` (datasets-v2 ``harmful_intent/<file>.jsonl``), ``v1`` (a
    refusal_direction JSON file in ``datasets``) or ``project`` (``probes/data``).
    ``limit``: keep the first ``limit`` rows of a seeded shuffle (large sources).
    """

    name: str
    kind: str
    role: str
    where: str
    file: str
    limit: int | None = None


HARMFUL_SOURCES: tuple[Source, ...] = (
    # harmful
    Source("harmbench", "harmful", "train", "v2", "harmbench_behaviors", 300),
    Source("catqa", "harmful", "train", "v2", "catqa_dangerousqa"),
    Source("stl_harmful", "harmful", "train", "v2", "safety_tuned_llamas_harmful"),
    Source("stl_redteam", "harmful", "train", "v2", "safety_tuned_llamas_hh_redteam", 250),
    Source("cyberseceval_malicious", "harmful", "train", "v2",
           "cyberseceval_interpreter_malicious", 120),
    Source("refusal_harmful", "harmful", "train", "v1", "harmful_intent/harmful_train.json"),
    Source("project_harmful", "harmful", "train", "project", "harmful_extra.jsonl"),
    Source("do_not_answer", "harmful", "test", "v2", "do_not_answer"),
    Source("coconot_harmful", "harmful", "test", "v2", "coconot_harmful"),
    Source("refusal_harmful_val", "harmful", "test", "v1", "harmful_intent/harmful_val.json"),
    # ordinary benign
    Source("alpaca", "benign", "train", "v1", "harmful_intent/harmless_train.json", 300),
    Source("self_instruct", "benign", "train", "v2", "self_instruct_user_oriented", 150),
    Source("mtbench", "benign", "train", "v2", "mtbench_vicuna_prompts"),
    Source("coconot_noncompliance", "benign", "train", "v2", "coconot_benign_noncompliance", 200),
    Source("oasst", "benign", "test", "v2", "oasst_prompts", 250),
    # benign but dangerous-sounding
    Source("cyberseceval_frr", "scary", "train", "v2", "cyberseceval_frr_benign", 150),
    Source("medquad", "scary", "train", "v2", "medquad_drug_questions", 200),
    Source("stl_physical_safe", "scary", "train", "v2", "safety_tuned_llamas_physical_safe"),
    Source("project_scary", "scary", "train", "project", "benign_dangerous_train.jsonl"),
    Source("project_benign", "benign", "train", "project", "benign_extra.jsonl"),
    Source("coconot_contrast", "scary", "test", "v2", "coconot_contrast"),
    Source("hard_negatives", "scary", "test", "project", "hard_negatives.jsonl"),
    # persona / scenario system prompts (project-written)
    Source("personas_train", "persona", "train", "project", "personas_train.jsonl"),
    Source("personas_test", "persona", "test", "project", "personas_test.jsonl"),
    # project-written, session 8: the styles the leave-one-source-out study found missing
    # (short direct harmful questions; the same topics asked benignly; long ordinary chat).
    # Appended LAST: split_calibration seeds each source's held-back split by its position,
    # so the other sources keep their split.
    Source("project_harmful_direct", "harmful", "train", "project", "harmful_direct.jsonl"),
    Source("project_benign_direct", "scary", "train", "project", "benign_direct.jsonl"),
    Source("project_benign_long", "benign", "train", "project", "benign_long.jsonl"),
)
"""Sources of ``harmful_intent``. Test sources cover each style: short direct harmful
questions (Do-Not-Answer), real-world safety-concern requests (CoCoNot), ordinary chat
(OpenAssistant), the CoCoNot benign-but-scary contrast set, the project's hard-negative
check set and held-out persona / scenario system prompts. The project-written training
files are described in ``probes/data/README.md``."""


def shared_v2_dir() -> Path | None:
    """``$SAFETY_PROBES_DATASETS_V2`` or ``<repo>/../shared/datasets-v2``; None if absent."""
    env = os.environ.get("SAFETY_PROBES_DATASETS_V2")
    p = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets-v2"
    return p if p.is_dir() else None


def sources_available() -> bool:
    """Both shared dataset folders are present (tests skip otherwise)."""
    from probes.datasets import shared_datasets_dir

    return shared_datasets_dir() is not None and shared_v2_dir() is not None


def _load_v2(file: str, name: str) -> list[ChatExample]:
    root = shared_v2_dir()
    if root is None:
        raise FileNotFoundError("datasets-v2 not found: set $SAFETY_PROBES_DATASETS_V2 or place "
                                f"it at {REPO_ROOT.parent / 'shared' / 'datasets-v2'}")
    out = []
    for line in (root / "harmful_intent" / f"{file}.jsonl").read_text("utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        out.append(ChatExample.make(msgs, int(r["label"]), category=r.get("category"),
                                    source=name, subset=str(r.get("subset", ""))))
    return out


def subsample(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """File indices (sorted) a source of ``n`` rows keeps: all of them when ``limit`` is
    None or ``n <= limit``, else the first ``limit`` picks of
    ``random.Random(seed).sample(range(n), limit)``. Raising ``limit`` keeps the smaller
    sample's rows only where :func:`random.sample` takes its set-selection path for both
    sizes (or the larger takes every row); :func:`kept_rows` callers check."""
    import random

    if limit is None or n <= limit:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _load_all(src: Source) -> list[ChatExample]:
    if src.where == "v2":
        rows = _load_v2(src.file, src.name)
    elif src.where == "v1":
        label = 1 if src.kind == "harmful" else 0
        rows = [ChatExample.make(e.chat, e.label, category=e.category, source=src.name)
                for e in load_refusal_json(src.file, label)]
    elif src.where == "project":
        rows = load_jsonl(DATA_DIR / src.file, source=src.name)
    else:
        raise ValueError(f"source {src.name}: where must be v1|v2|project, found {src.where!r}")
    want = 1 if src.kind == "harmful" else 0
    bad = [i for i, e in enumerate(rows) if e.label != want]
    if bad:
        raise ValueError(f"source {src.name}: expected label {want} on every row, found "
                         f"{len(bad)} rows with another label (first: row {bad[0]})")
    return rows


def kept_rows(src: Source, seed: int = 0) -> list[int]:
    """The file indices :func:`load_source` keeps, in its order (reads the file)."""
    return subsample(len(_load_all(src)), src.limit, seed)


def load_source(src: Source, seed: int = 0) -> list[ChatExample]:
    """The source's examples, in file order (after the seeded ``limit`` subsample)."""
    rows = _load_all(src)
    return [rows[i] for i in subsample(len(rows), src.limit, seed)]
