"""Token labelling of the default recipes on synthetic activations (no model)."""

from __future__ import annotations

import numpy as np

from probes.collect import SEG_GENERATED, SEG_POST, SEG_PRE, SEG_USER, Activations
from probes.datasets import ChatExample
from probes.recipes import _long_examples, deception_labels, harmful_labels


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
