"""Token labelling of the default recipes on synthetic activations (no model)."""

from __future__ import annotations

import re

import numpy as np

from probes.collect import SEG_GENERATED, SEG_POST, SEG_PRE, SEG_USER, Activations
from probes.datasets import DATA_DIR, ChatExample, load_jsonl
from probes.recipes import (
    _long_examples,
    benign_weights,
    deception_labels,
    harmful_labels,
    is_dangerous_benign,
)


def _acts(segments: list[list[int]], labels: list[int]) -> Activations:
    ex, pos, seg, gen, fe = [], [], [], [], []
    for i, s in enumerate(segments):
        n = len(s)
        ex += [i] * n
        pos += list(range(n))
        seg += s
        gen += [x == SEG_GENERATED for x in s]
        fe += list(range(n - 1, -1, -1))
    n = len(ex)
    return Activations((0,), {0: np.zeros((n, 2), np.float16)}, np.array(ex, np.int32),
                       np.array(pos, np.int32), np.array(gen), np.array(seg, np.int8),
                       np.array(fe, np.int32), np.array(labels, np.int8), len(labels))


def test_harmful_labels() -> None:
    P, U, Q = SEG_PRE, SEG_USER, SEG_POST
    segs = [[P] * 4 + [U] * 6 + [Q] * 3, [P] * 4 + [U] * 6 + [Q] * 3]
    acts = _acts(segs, [1, 0])
    keep, y = harmful_labels(acts, keep_pre=1.0, start_frac=0.4)
    # harmful: pre kept as 0, first user tokens (rel. index < 0.4) dropped, rest 1
    np.testing.assert_array_equal(keep[:13], [1] * 4 + [0, 0] + [1] * 7)
    np.testing.assert_array_equal(y[:13][keep[:13]], [0] * 4 + [1] * 7)
    # benign: every token kept, all 0
    assert keep[13:].all() and not y[13:].any()
    keep0, _ = harmful_labels(acts, keep_pre=0.0)
    assert not keep0[acts.segment == SEG_PRE].any()


def test_deception_labels_exclude_tail() -> None:
    G = SEG_GENERATED
    acts = _acts([[SEG_PRE] * 3 + [G] * 8, [SEG_PRE] * 3 + [G] * 4], [1, 0])
    keep, y = deception_labels(acts, exclude_tail=5)
    assert keep.sum() == 3 and (y[keep] == 1).all()  # only example 0 has > 5 tokens


def test_long_examples_embed_the_task() -> None:
    task = [ChatExample.make([{"role": "user", "content": "TASK"}], 1)]
    fill = [ChatExample.make([{"role": "user", "content": f"f{i}"}], 0) for i in range(5)]
    out = _long_examples(task, fill, 3, seed=0, source="s")
    assert all(e.label == 1 and "TASK" in e.user_text and e.user_text.count("\n") >= 5
               for e in out)


def test_benign_weights_upweight_dangerous_sounding_negatives() -> None:
    U = SEG_USER
    mk = ChatExample.make
    exs = [mk([{"role": "user", "content": "a"}], 1),
           mk([{"role": "user", "content": "b"}], 0, source="harmless_train"),
           mk([{"role": "user", "content": "c"}], 0, source="benign_dangerous_train")]
    acts = _acts([[U] * 4, [U] * 40, [U] * 4], [1, 0, 0])
    keep = np.ones(acts.n_rows, bool)
    w = benign_weights(acts, exs, keep, ratio=0.5)
    assert (w[:44] == 1).all()
    assert w[44:].sum() == 0.5 * 40  # the group weighs half the ordinary benign rows
    assert not is_dangerous_benign(exs[0]) and is_dangerous_benign(exs[2])


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
