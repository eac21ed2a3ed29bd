"""Project-written data of the default recipes: check sets stay disjoint from training."""

from __future__ import annotations

import re

from probes.datasets import DATA_DIR, ChatExample, load_jsonl


def _grams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    t = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def test_training_data_does_not_overlap_the_hard_negative_check_set() -> None:
    """benign_dangerous_train.jsonl shares no 5-word sequence with the check set
    hard_negatives.jsonl; no training file repeats a check-set prompt."""
    hard_rows = load_jsonl(DATA_DIR / "hard_negatives.jsonl")
    hard = set().union(*(_grams(e.user_text) for e in hard_rows))
    dang = load_jsonl(DATA_DIR / "benign_dangerous_train.jsonl")
    shared = [e.user_text for e in dang if _grams(e.user_text) & hard]
    assert not shared, shared[:3]
    texts = {e.user_text.strip().lower() for e in hard_rows}
    for name in ("benign_dangerous_train", "benign_extra", "harmful_extra"):
        rows = load_jsonl(DATA_DIR / f"{name}.jsonl")
        assert rows and not [e for e in rows if e.user_text.strip().lower() in texts]
    dang = load_jsonl(DATA_DIR / "benign_dangerous_train.jsonl")
    assert len(dang) >= 200 and all(e.label == 0 for e in dang)


def test_persona_test_set_shares_no_system_prompt_or_request_with_training() -> None:
    """personas_test.jsonl (a TEST source) uses system prompts and user requests that
    personas_train.jsonl never has, and every row is benign."""
    tr = load_jsonl(DATA_DIR / "personas_train.jsonl")
    te = load_jsonl(DATA_DIR / "personas_test.jsonl")

    def parts(rows):  # (system prompts, user requests)
        sys = {m["content"] for e in rows for m in e.chat if m["role"] == "system"}
        return sys, {e.user_text for e in rows}

    (s_tr, u_tr), (s_te, u_te) = parts(tr), parts(te)
    assert len(tr) >= 100 and len(te) >= 100 and all(e.label == 0 for e in tr + te)
    assert len(s_te) >= 20 and not s_tr & s_te and not u_tr & u_te


# project-written training files added in session 8 (probes/data/README.md)
NEW_TRAINING = {"harmful_direct": (1, 150, 4, 40), "benign_direct": (0, 150, 4, 40),
                "benign_long": (0, 120, 80, 400)}
"""file -> (label, at least this many rows, fewest / most words per row)."""


def _text(e: ChatExample) -> str:
    """Every message of a row (system prompts included) and its completion."""
    return "\n".join([m["content"] for m in e.chat] + [e.completion or ""])


def _key(e: ChatExample) -> str:
    return " ".join(_text(e).lower().split())


def test_new_training_files_have_their_shape() -> None:
    """Labels, row counts, word counts and a category on every row; no row repeated."""
    for name, (label, n_min, w_lo, w_hi) in NEW_TRAINING.items():
        rows = load_jsonl(DATA_DIR / f"{name}.jsonl")
        assert len(rows) >= n_min, (name, len(rows))
        assert all(e.label == label and e.category for e in rows), name
        words = [len(_text(e).split()) for e in rows]
        assert w_lo <= min(words) and max(words) <= w_hi, (name, min(words), max(words))
        assert len({_key(e) for e in rows}) == len(rows), name
    assert any(len(e.chat) > 1 for e in load_jsonl(DATA_DIR / "benign_long.jsonl"))


def test_new_training_files_share_nothing_with_the_test_sources() -> None:
    """No 5-word sequence in common with any TEST source (every row of its file, system
    prompts included), and no row equal to a row of any other source, train or test.
    The shared sources are checked where ../shared is present."""
    from dataclasses import replace

    from probes.sources import HARMFUL_SOURCES, load_source, sources_available

    shared = sources_available()
    others = [replace(s, limit=None) for s in HARMFUL_SOURCES
              if (shared or s.where == "project")
              and s.file.removesuffix(".jsonl") not in NEW_TRAINING]
    assert {s.name for s in HARMFUL_SOURCES} >= {f"project_{n}" for n in NEW_TRAINING}
    test_grams: set[tuple[str, ...]] = set()
    seen: set[str] = set()
    for s in others:
        for e in load_source(s):
            seen.add(_key(e))
            if s.role == "test":
                test_grams |= _grams(_text(e))
    assert len(test_grams) > 1000
    new = {name: load_jsonl(DATA_DIR / f"{name}.jsonl") for name in NEW_TRAINING}
    for name, rows in new.items():
        hits = [(name, i, sorted(_grams(_text(e)) & test_grams)[:2])
                for i, e in enumerate(rows) if _grams(_text(e)) & test_grams]
        assert not hits, hits[:5]
        dup = [(name, i) for i, e in enumerate(rows) if _key(e) in seen]
        assert not dup, dup[:5]
    keys = [_key(e) for rows in new.values() for e in rows]
    assert len(set(keys)) == len(keys)
