"""`StepTracker.layout` against a plain per-row reference (decode fast path included)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from synthetic_decoder import fake_runner

from monitor.capture.steps import StepTracker
from monitor.roles import TokenRole

OTHER, GEN = int(TokenRole.OTHER), int(TokenRole.GENERATED)


def _reference(plens, computed, rows, prompt, generated, roles):
    """Kept rows one by one, then runs of (request, role) -> spans and row ranges."""
    kept = []  # (row, request, position, plen, role)
    row = 0
    for i, (p, c, n) in enumerate(zip(plens, computed, rows, strict=True)):
        for j in range(n):
            pos = c + j
            role = GEN if pos >= p else OTHER
            ok = (generated if pos >= p else prompt) and (roles is None or role in roles)
            if ok:
                kept.append((row, f"r{i}", pos, p, role))
            row += 1
    spans: list[tuple[str, int, int, int, int]] = []
    ranges: list[tuple[int, int]] = []
    for k, (r, rid, pos, p, role) in enumerate(kept):
        prev = kept[k - 1] if k else None
        if prev and prev[1] == rid and prev[4] == role and prev[0] == r - 1:
            s = spans[-1]
            spans[-1] = (s[0], s[1] + 1, s[2], s[3], s[4])
        else:
            spans.append((rid, 1, pos, p, role))
        if ranges and ranges[-1][1] == r:
            ranges[-1] = (ranges[-1][0], r + 1)
        else:
            ranges.append((r, r + 1))
    return spans, ranges


@pytest.mark.parametrize("seed", range(20))
def test_layout_matches_per_row_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    plens = [rng.randint(1, 12) for _ in range(n)]
    computed = [rng.choice([0, rng.randint(0, p), p + rng.randint(0, 5)]) for p in plens]
    rows = [rng.choice([1, 1, rng.randint(0, 6)]) for _ in range(n)]
    n_tokens = sum(rows) + rng.randint(0, 3)  # padding rows
    for prompt, generated, roles in itertools.product(
            (True, False), (True, False), (None, frozenset({GEN}), frozenset({OTHER}))):
        t = StepTracker(fake_runner(plens, computed, rows))
        pos = np.zeros(n_tokens, np.int64)
        row = 0
        for c, k in zip(computed, rows, strict=True):
            pos[row:row + k] = np.arange(c, c + k)
            row += k
        lay = t.layout(n_tokens, pos, prompt=prompt, generated=generated, roles=roles)
        spans, ranges = _reference(plens, computed, rows, prompt, generated, roles)
        if sum(rows) == 0:
            assert lay is None
            continue
        assert lay is not None
        assert lay.spans == spans, (prompt, generated, roles)
        assert lay.ranges == ranges
        assert lay.n_rows == sum(s[1] for s in spans)
