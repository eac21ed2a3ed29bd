"""Per-request, per-detector aggregation and severity crossings.

The tracker turns scored tokens into :class:`VerdictUpdate`\\ s. For one request and one
detector of the policy it keeps a streaming aggregate (``monitor.judge.aggregate``) of
the scores of tokens in the detector's scope and judges it against the thresholds:

- a severity is reached at the first token ``t`` (counting tokens in scope since the
  aggregator started, ``t >= min_tokens``) where ``a_t >= threshold``;
- severities are sticky: the verdict keeps the highest severity reached, with the
  position where it was first reached, even when the aggregate falls back later;
- ``observe`` returns an update only on escalation (a new, higher severity: an alert
  event, ``escalated=True``); ``finish`` returns one final update per policy detector.

Positions: for one (request, detector), a token whose position is not greater than the
last position already scored is a duplicate (vLLM recomputes tokens after preemption)
and is dropped and counted, never aggregated twice.

Memory is bounded: at most ``max_requests`` live requests (least recently active ones
are evicted and counted in ``evicted``), plus a bounded memory of recently closed ids.

Thread-safety: none. A tracker is owned by one thread (the server's scoring worker);
policy swaps from other threads must be handed to that thread, which calls
:meth:`RequestTracker.set_policy`.

Enforcement (roadmap): ``VerdictUpdate.action`` already says what a verdict asks for;
``"block"`` is returned only for ``mode: block`` at ``critical``, on the observe call
of the frame where it was crossed, so an enforcer can stop the generation within the
frame's tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from monitor.judge.aggregate import Aggregator, make_aggregator
from monitor.judge.policy import DetectorPolicy, Policy

__all__ = ["SEVERITY_RANK", "RequestTracker", "VerdictUpdate"]

#: Severity order (matches the proto enum values).
SEVERITY_RANK: dict[str, int] = {"none": 0, "warn": 1, "critical": 2}


@dataclass(frozen=True)
class VerdictUpdate:
    """One verdict for (request, detector), mirroring the proto ``Verdict``.

    ``score`` is the aggregate after the last scored token, ``peak_score`` the highest
    aggregate seen, ``severity`` the highest severity reached (sticky), ``threshold`` its
    threshold when it was reached (0.0 for none), ``crossed_at_position`` the token
    position where it was first reached (-1 for none). ``escalated`` is True when this
    update reports a newly reached severity (an alert event; never on final updates).
    """

    request_id: str
    detector: str
    score: float
    peak_score: float
    severity: str
    threshold: float
    crossed_at_position: int
    final: bool
    mode: str
    policy_version: str
    n_tokens_scored: int
    n_tokens_unscored: int
    escalated: bool

    @property
    def action(self) -> str:
        """What the verdict asks for: ``none``; ``record`` (observe mode: would-alert);
        ``alert``; ``block`` (mode block at critical; at warn it alerts)."""
        if self.severity == "none":
            return "none"
        if self.mode == "observe":
            return "record"
        if self.mode == "block" and self.severity == "critical":
            return "block"
        return "alert"


@dataclass
class _DetectorState:
    policy: DetectorPolicy
    agg: Aggregator
    last_position: int = -1
    n_scored: int = 0
    n_unscored: int = 0
    severity: str = "none"
    threshold: float = 0.0
    crossed_at: int = -1
    peak: float = 0.0


@dataclass
class _RequestState:
    detectors: dict[str, _DetectorState] = field(default_factory=dict)


class RequestTracker:
    """Aggregates scores per (request, detector) and reports severity crossings.

    Counters (monotonic, for metrics): ``duplicates_dropped`` (tokens at already-scored
    positions), ``evicted`` (live requests dropped to stay under ``max_requests``),
    ``unknown_finished`` (``finish`` for an id with no state), ``late_dropped`` (tokens
    for a request already finished or evicted), ``nonfinite_scores`` (NaN/inf scores,
    counted as unscored).
    """

    def __init__(
        self, policy: Policy, max_requests: int = 100_000, max_finished: int | None = None
    ) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        self.policy = policy
        self.max_requests = int(max_requests)
        self.max_finished = int(max_finished if max_finished is not None else max_requests)
        self._live: OrderedDict[str, _RequestState] = OrderedDict()
        self._closed: OrderedDict[str, None] = OrderedDict()
        self.duplicates_dropped = 0
        self.evicted = 0
        self.unknown_finished = 0
        self.late_dropped = 0
        self.nonfinite_scores = 0

    # ----------------------------------------------------------------- bookkeeping
    @property
    def n_live(self) -> int:
        """Number of live (unfinished, not evicted) requests."""
        return len(self._live)

    def is_finished(self, request_id: str) -> bool:
        """True for an id finished or evicted recently (bounded memory of the last
        ``max_finished`` such ids): frames for it are late and should be refused."""
        return request_id in self._closed

    def is_live(self, request_id: str) -> bool:
        return request_id in self._live

    def _close(self, request_id: str) -> None:
        self._closed[request_id] = None
        self._closed.move_to_end(request_id)
        while len(self._closed) > self.max_finished:
            self._closed.popitem(last=False)

    def _request(self, request_id: str) -> _RequestState | None:
        """Live state for ``request_id`` (created if new), marked most recently used;
        None when the id was already closed."""
        req = self._live.get(request_id)
        if req is not None:
            self._live.move_to_end(request_id)
            return req
        if request_id in self._closed:
            return None
        req = _RequestState()
        self._live[request_id] = req
        while len(self._live) > self.max_requests:
            old_id, _ = self._live.popitem(last=False)
            self.evicted += 1
            self._close(old_id)
        return req

    def _state(self, req: _RequestState, detector: str) -> _DetectorState | None:
        pol = self.policy.detectors.get(detector)
        if pol is None:
            return None
        st = req.detectors.get(detector)
        if st is None:
            st = _DetectorState(policy=pol, agg=make_aggregator(pol.aggregation))
            req.detectors[detector] = st
        return st

    @staticmethod
    def _in_scope(scope: str, generated: np.ndarray) -> np.ndarray | None:
        """Boolean mask of tokens in scope, or None for all of them."""
        if scope == "both":
            return None
        return generated if scope == "generated" else ~generated

    # --------------------------------------------------------------------- inputs
    def observe(
        self,
        request_id: str,
        detector: str,
        positions: np.ndarray,
        generated: np.ndarray,
        scores: np.ndarray,
    ) -> list[VerdictUpdate]:
        """Aggregate scored tokens of one request for one detector.

        ``positions`` int64 [n], ``generated`` bool [n], ``scores`` float [n], in row
        order. Tokens out of the detector's scope are ignored; tokens at positions not
        greater than every earlier position of this (request, detector) are dropped as
        duplicates; non-finite scores count as unscored. Returns ``[]`` or a single
        update carrying the highest severity newly reached in this chunk (``escalated``).
        Detectors absent from the policy and requests already closed return ``[]``.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        gen = np.asarray(generated, dtype=bool).reshape(-1)
        sc = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not pos.size == gen.size == sc.size:
            raise ValueError(
                f"positions, generated, scores differ in length: {pos.size}, {gen.size}, "
                f"{sc.size}"
            )
        if detector not in self.policy.detectors:
            return []
        req = self._request(request_id)
        if req is None:
            self.late_dropped += int(pos.size)
            return []
        st = self._state(req, detector)
        assert st is not None
        pol = st.policy
        if pos.size == 1:  # decode: one token per request per step
            return self._observe_one(request_id, detector, st, int(pos[0]), bool(gen[0]),
                                     float(sc[0]))

        mask = self._in_scope(pol.scope, gen)
        if mask is not None:
            pos, sc = pos[mask], sc[mask]
        if pos.size == 0:
            return []
        # Keep a token only when its position exceeds every position before it.
        prev_max = np.maximum.accumulate(np.concatenate(([st.last_position], pos[:-1])))
        fresh = pos > prev_max
        n_dup = int(pos.size - np.count_nonzero(fresh))
        if n_dup:
            self.duplicates_dropped += n_dup
            pos, sc = pos[fresh], sc[fresh]
        if pos.size == 0:
            return []
        st.last_position = int(pos[-1])
        finite = np.isfinite(sc)
        if not finite.all():
            n_bad = int(sc.size - np.count_nonzero(finite))
            self.nonfinite_scores += n_bad
            st.n_unscored += n_bad
            pos, sc = pos[finite], sc[finite]
            if pos.size == 0:
                return []

        n_before = st.agg.n
        values = st.agg.update(sc)
        st.n_scored += int(sc.size)
        st.peak = max(st.peak, float(values.max()))

        # First token index eligible for judging (1-based count t >= min_tokens).
        start = max(0, pol.min_tokens - 1 - n_before)
        new_sev = None
        rank = SEVERITY_RANK[st.severity]
        if start < values.size:
            eligible = values[start:]
            for sev, thr in pol.thresholds:  # ascending: the last hit is the highest
                if SEVERITY_RANK[sev] <= rank:
                    continue
                hits = np.flatnonzero(eligible >= thr)
                if hits.size:
                    new_sev = (sev, thr, int(pos[start + hits[0]]))
        if new_sev is None:
            return []
        st.severity, st.threshold, st.crossed_at = new_sev
        return [self._update(request_id, detector, st, final=False, escalated=True)]

    def _observe_one(
        self, request_id: str, detector: str, st: _DetectorState, pos: int, gen: bool,
        score: float,
    ) -> list[VerdictUpdate]:
        """:meth:`observe` for a single token, in plain Python (same semantics)."""
        pol = st.policy
        if (pol.scope == "prompt" and gen) or (pol.scope == "generated" and not gen):
            return []
        if pos <= st.last_position:
            self.duplicates_dropped += 1
            return []
        st.last_position = pos
        if not math.isfinite(score):
            self.nonfinite_scores += 1
            st.n_unscored += 1
            return []
        value = st.agg.push(score)
        st.n_scored += 1
        if value > st.peak:
            st.peak = value
        if st.agg.n < pol.min_tokens:
            return []
        rank = SEVERITY_RANK[st.severity]
        new_sev = None
        for sev, thr in pol.thresholds:
            if SEVERITY_RANK[sev] > rank and value >= thr:
                new_sev = (sev, thr, pos)
        if new_sev is None:
            return []
        st.severity, st.threshold, st.crossed_at = new_sev
        return [self._update(request_id, detector, st, final=False, escalated=True)]

    def mark_unscored(
        self,
        request_id: str,
        detector: str | None,
        positions: np.ndarray,
        generated: np.ndarray,
    ) -> None:
        """Count tokens that arrived but could not be scored (dropped frame, scorer
        error) toward ``n_tokens_unscored`` of ``detector`` (None: every policy detector)
        when in its scope. Positions already scored are not counted; ``last_position``
        does not move, so a later recompute of these tokens can still be scored."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        gen = np.asarray(generated, dtype=bool).reshape(-1)
        if pos.size != gen.size:
            raise ValueError("positions and generated differ in length")
        names = list(self.policy.detectors) if detector is None else [detector]
        names = [n for n in names if n in self.policy.detectors]
        if not names:
            return
        req = self._request(request_id)
        if req is None:
            self.late_dropped += int(pos.size)
            return
        for name in names:
            st = self._state(req, name)
            assert st is not None
            mask = self._in_scope(st.policy.scope, gen)
            p = pos if mask is None else pos[mask]
            st.n_unscored += int(np.count_nonzero(p > st.last_position))

    def finish(self, request_id: str) -> list[VerdictUpdate]:
        """Final verdicts, one per policy detector (zero-token ones with severity none),
        and release the request's state. Unknown ids return ``[]`` and are counted."""
        req = self._live.pop(request_id, None)
        if req is None:
            self.unknown_finished += 1
            return []
        self._close(request_id)
        out = []
        for name, pol in self.policy.detectors.items():
            st = req.detectors.get(name)
            if st is None:
                st = _DetectorState(policy=pol, agg=make_aggregator(pol.aggregation))
            out.append(self._update(request_id, name, st, final=True, escalated=False))
        return out

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy (hot reload) for live and future requests.

        Per live (request, detector): a detector no longer in the policy loses its state;
        when its aggregation is unchanged the accumulated aggregate is kept; when it
        changed, the aggregator restarts empty (``min_tokens`` then counts from the
        restart, since the new aggregate has seen nothing). Either way the counts,
        peak, last position and the sticky severity already reached (with its
        threshold and position) are kept — alerts already sent are not taken back. New
        thresholds, scope, mode and ``min_tokens`` apply from the next token.
        """
        self.policy = policy
        for req in self._live.values():
            for name in list(req.detectors):
                st = req.detectors[name]
                pol = policy.detectors.get(name)
                if pol is None:
                    del req.detectors[name]
                    continue
                if pol.aggregation != st.policy.aggregation:
                    st.agg = make_aggregator(pol.aggregation)
                st.policy = pol

    # -------------------------------------------------------------------- outputs
    def _update(
        self, request_id: str, detector: str, st: _DetectorState, *, final: bool, escalated: bool
    ) -> VerdictUpdate:
        return VerdictUpdate(
            request_id=request_id,
            detector=detector,
            score=st.agg.value,
            peak_score=st.peak,
            severity=st.severity,
            threshold=st.threshold,
            crossed_at_position=st.crossed_at,
            final=final,
            mode=st.policy.mode,
            policy_version=self.policy.version,
            n_tokens_scored=st.n_scored,
            n_tokens_unscored=st.n_unscored,
            escalated=escalated,
        )
