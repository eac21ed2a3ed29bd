"""A bounded per-request trace of token scores, for audit lines and `safety-monitor explain`.

Per (request, detector) :class:`TokenTrace` keeps the last ``max_tokens`` scored tokens
in the detector's scope as ``(position, token score)`` pairs, in position order (the raw
per-token detector score, before the policy's aggregation). Rows at positions not above
the last kept one (recomputes, duplicates) are skipped: a recompute carries the same
score. Non-finite scores are skipped (the tracker counts them as unscored).

Memory: at most ``max_tokens`` pairs per (request, detector), released by :meth:`drop`
with the request's finals; ``max_tokens = 0`` keeps nothing (no state at all).

Thread rules: used by the scoring worker only.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from monitor.constants import RequestKey
from monitor.roles import scope_mask

__all__ = ["MAX_TRACE_TOKENS", "TokenTrace"]

#: Largest accepted ``max_tokens`` (each pair is ~20 bytes of JSON on an audit line).
MAX_TRACE_TOKENS = 4096


class TokenTrace:
    """The last ``max_tokens`` in-scope ``(position, score)`` pairs per (request, detector)."""

    def __init__(self, max_tokens: int) -> None:
        if not 0 <= max_tokens <= MAX_TRACE_TOKENS:
            raise ValueError(f"max_tokens: expected an integer in [0, {MAX_TRACE_TOKENS}], "
                             f"found {max_tokens}")
        self.max_tokens = int(max_tokens)
        self._trace: dict[RequestKey, dict[str, deque[tuple[int, float]]]] = {}

    @property
    def n_live(self) -> int:
        """Requests with state."""
        return len(self._trace)

    def observe(self, key: RequestKey, detector: str, scope: str, positions: np.ndarray,
                scores: np.ndarray, roles: np.ndarray) -> None:
        """One span of ``key``: ``positions`` int64 ``[n]`` (ascending), token ``scores``
        ``[n]``, ``roles`` int8 ``[n]``; ``scope`` the policy scope of ``detector``."""
        if self.max_tokens == 0 or positions.size == 0:
            return
        pos = np.asarray(positions, dtype=np.int64)
        sc = np.asarray(scores, dtype=np.float64)
        keep = np.isfinite(sc)
        if scope != "both":
            keep &= scope_mask(scope)[np.asarray(roles, dtype=np.int8)]
        per = self._trace.setdefault(key, {})
        dq = per.get(detector)
        if dq is None:
            dq = per[detector] = deque(maxlen=self.max_tokens)
        last = dq[-1][0] if dq else -1
        keep &= pos > last
        idx = np.flatnonzero(keep)[-self.max_tokens:]
        dq.extend(zip(pos[idx].tolist(), sc[idx].tolist(), strict=True))

    def tokens(self, key: RequestKey, detector: str) -> tuple[tuple[int, float], ...]:
        """The kept pairs of (``key``, ``detector``), oldest first (``()`` if none)."""
        dq = self._trace.get(key, {}).get(detector)
        return tuple(dq) if dq else ()

    def drop(self, key: RequestKey) -> None:
        """Forget ``key`` (after its finals)."""
        self._trace.pop(key, None)
