"""Project-written data of the default recipes: check sets stay disjoint from training."""

from __future__ import annotations

import re

from probes.datasets import DATA_DIR, load_jsonl


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
