"""Per-request, per-detector aggregation and severity crossings.

The tracker turns scored tokens into :class:`VerdictUpdate`\\ s. For one request and one
detector of the policy it keeps a streaming aggregate (``monitor.judge.aggregate``) of
the scores of tokens in the detector's scope and judges it against the thresholds:

- a severity is reached at the first judged token ``t`` (counting tokens in scope since
  the aggregator started, ``t >= min_tokens``) where ``a_t >= threshold``. Judged tokens
  (policy ``judge_at``): ``every_token``, every token in scope; ``span_end``, the last
  token of each run of in-scope rows (``monitor.judge.aggregate.span_end_rows``). A
  stream cannot know that an in-scope token ends its span until the next row arrives, so
  the last in-scope token seen is kept *pending* (its position, aggregate and count)
  until an out-of-scope row at a greater position arrives (in the same or a later
  frame), which judges it, or the request finishes: ``finish`` judges it and, when that
  reaches a severity, returns the escalation (``escalated=True``, not final) before the
  finals. A crossing's position is the judged (span-end) token's;
- severities are sticky: the verdict keeps the highest severity reached, with the
  position where it was first reached, even when the aggregate falls back later;
- ``observe`` returns an update only on escalation (a new, higher severity: an alert
  event, ``escalated=True``); ``finish`` returns one final update per policy detector.

Positions: for one (request, detector), a token whose position is not greater than the
last position already scored is a duplicate (vLLM recomputes tokens after preemption)
and is dropped and counted, never aggregated twice.

Memory: one state per live request key and detector. The tracker does not decide
which requests are alive: the server's request registry (``monitor.server.registry``)
does, and calls :meth:`RequestTracker.finish` for every request it closes (finished,
orphaned, idle or evicted), which releases the state.

Thread-safety: none. A tracker is owned by one thread (the server's scoring worker);
policy swaps from other threads must be handed to that thread, which calls
:meth:`RequestTracker.set_policy`.

Coverage gaps: a request's rows can go missing before they reach this tracker (rows sent
to a sidecar that died, frames the plugin's bounded queue dropped, a stream that broke).
Per (request, detector) the tracker counts the distinct positions that reached it
(scored, unscored or out of scope; ``seen_prompt`` / ``seen_generated``, by the row's
generated flag; a position not above the highest already counted is not counted again).
:meth:`finish` with an :class:`Expected` (from the client's ``RequestFinished``) adds
the positions that never arrived to ``n_tokens_unscored`` and reports them as
``n_tokens_missing``: generated positions when the detector's scope reads generated
tokens, prompt positions when its scope reads every prompt role (a scope of some prompt
roles only is captured role-filtered, so the server cannot know how many of the missing
prompt positions it would have read: those are not derived). The count comes from what
the server received, so a client cannot hide a gap; a client claiming more tokens than
it ran inflates only its own requests' unscored counts.

Enforcement (roadmap): ``VerdictUpdate.action`` already says what a verdict asks for;
``"block"`` is returned only for ``mode: block`` at ``critical``, on the observe call
of the frame where it was crossed, so an enforcer can stop the generation within the
frame's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from monitor.constants import SEVERITY_RANK, RequestKey
from monitor.judge.aggregate import Aggregator, make_aggregator
from monitor.judge.latents import LatentHit
from monitor.judge.policy import DetectorPolicy, Policy
from monitor.roles import TokenRole, derive_roles, scope_mask, scope_roles

__all__ = ["SEVERITY_RANK", "Expected", "RequestTracker", "TrackerCounters", "VerdictUpdate"]

#: the prompt roles; a scope reading all of them gets prompt-side gaps derived
_PROMPT_ROLES = scope_roles("both") - {TokenRole.GENERATED}


@dataclass(frozen=True)
class Expected:
    """How many rows of a finished request the client's capture should have produced.

    ``prompt``: prompt rows (``n_prompt_tokens - n_cached_prompt_tokens``: prefix-cached
    tokens run no forward pass); ``generated``: generated rows (``n_generated_tokens - 1``
    for a request that ended inside vLLM: its last sampled token is never fed back).
    Both >= 0.
    """

    prompt: int
    generated: int

    @classmethod
    def from_finished(cls, n_prompt: int, n_generated: int, n_cached: int, *,
                      ended_in_engine: bool) -> Expected:
        """From ``RequestFinished`` counts (clamped at 0)."""
        gen = n_generated - 1 if ended_in_engine else n_generated
        return cls(max(0, n_prompt - n_cached), max(0, gen))


@dataclass(frozen=True)
class VerdictUpdate:
    """One verdict for (request, detector), mirroring the proto ``Verdict``.

    ``score`` is the aggregate after the last scored token, ``peak_score`` the highest
    aggregate seen, ``severity`` the highest severity reached (sticky), ``threshold`` its
    threshold when it was reached (0.0 for none), ``crossed_at_position`` the token
    position where it was first reached (-1 for none). ``escalated`` is True when this
    update reports a newly reached severity (an alert event; never on final updates).
    ``key`` is the request's registry key; ``request_id`` its engine request id.
    """

    key: RequestKey
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
    #: positions of the request that never reached the server, in this detector's scope
    #: (already included in ``n_tokens_unscored``; finals only, see "Coverage gaps")
    n_tokens_missing: int = 0
    #: finals only: why the request's verdict is incomplete (a `monitor.constants.Incomplete`
    #: value; "" when complete or not decided yet: the pipeline fills it in at finish)
    incomplete_reason: str = ""
    #: the highest aggregate at a JUDGED token (``min_tokens`` reached; ``span_end``: span
    #: ends only): the request statistic ``S`` the thresholds are compared with, which
    #: ``peak_score`` (every scored token) can exceed; None: no token judged yet
    judged_peak: float | None = None
    #: SAE latents that fired (``monitor.judge.latents``; the pipeline fills them in)
    latents: tuple[LatentHit, ...] = ()
    #: the request's last in-scope (position, token score) pairs (``monitor.judge.trace``;
    #: the pipeline fills them in for audit lines)
    tokens: tuple[tuple[int, float], ...] = ()

    @property
    def request_id(self) -> str:
        """The engine request id (``key.request_id``)."""
        return self.key.request_id

    @property
    def incomplete(self) -> bool:
        """True when some in-scope positions may not have been judged (a reason is set, or
        positions are known missing)."""
        return bool(self.incomplete_reason) or self.n_tokens_missing > 0

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
    #: highest aggregate at a judged token (None: none judged yet)
    judged_peak: float | None = None
    #: span_end: the last in-scope token seen, not yet known to end its span (-1: none),
    #: with the aggregate and the aggregate's count after it.
    pending_pos: int = -1
    pending_value: float = 0.0
    pending_n: int = 0
    #: coverage: highest position counted, distinct prompt / generated positions seen
    cov_pos: int = -1
    seen_prompt: int = 0
    seen_generated: int = 0
    n_missing: int = 0


@dataclass
class _RequestState:
    detectors: dict[str, _DetectorState] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackerCounters:
    """Monotonic counters of a tracker (exported to /metrics by the server)."""

    duplicates_dropped: int
    nonfinite_scores: int
    unknown_finished: int


class RequestTracker:
    """Aggregates scores per (request, detector) and reports severity crossings.

    Counters (monotonic, for metrics): ``duplicates_dropped`` (tokens at already-scored
    positions), ``unknown_finished`` (``finish`` for a key with no state),
    ``nonfinite_scores`` (NaN/inf scores, counted as unscored).
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._live: dict[RequestKey, _RequestState] = {}
        self.duplicates_dropped = 0
        self.unknown_finished = 0
        self.nonfinite_scores = 0

    # ----------------------------------------------------------------- bookkeeping
    @property
    def n_live(self) -> int:
        """Number of requests with state."""
        return len(self._live)

    def is_live(self, key: RequestKey) -> bool:
        """True while ``key`` has state (observed or marked, not finished)."""
        return key in self._live

    def counters(self) -> TrackerCounters:
        """A snapshot of the counters."""
        return TrackerCounters(self.duplicates_dropped, self.nonfinite_scores,
                               self.unknown_finished)

    def _request(self, key: RequestKey) -> _RequestState:
        """State for ``key``, created if new."""
        req = self._live.get(key)
        if req is None:
            req = self._live[key] = _RequestState()
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
    def _roles(generated: np.ndarray, roles: np.ndarray | None) -> np.ndarray:
        """int8 roles of the rows: ``roles`` when given, else derived from ``generated``
        (OTHER / GENERATED, as for clients that send no roles)."""
        if roles is None:
            return derive_roles(generated)
        r = np.asarray(roles, dtype=np.int8).reshape(-1)
        if r.size != generated.size:
            raise ValueError(f"roles and generated differ in length: {r.size}, "
                             f"{generated.size}")
        return r

    @staticmethod
    def _in_scope(scope: str, roles: np.ndarray) -> np.ndarray | None:
        """Boolean mask of tokens in scope (``scope_mask(scope)[roles]``), or None for all."""
        if scope == "both":
            return None
        return scope_mask(scope)[roles]

    # --------------------------------------------------------------------- inputs
    def observe(
        self,
        key: RequestKey,
        detector: str,
        positions: np.ndarray,
        generated: np.ndarray,
        scores: np.ndarray,
        roles: np.ndarray | None = None,
        span_ends: np.ndarray | None = None,
    ) -> list[VerdictUpdate]:
        """Aggregate scored tokens of one request for one detector.

        ``positions`` int64 [n], ``generated`` bool [n], ``scores`` float [n], ``roles``
        int8 [n] (`monitor.roles.TokenRole`; None: derived from ``generated``), in row
        order. Tokens out of the detector's scope (its roles) are ignored; tokens at positions not
        greater than every earlier position of this (request, detector) are dropped as
        duplicates; non-finite scores count as unscored. Returns ``[]`` or a single
        update carrying the highest severity newly reached in this chunk (``escalated``).
        Detectors absent from the policy return ``[]``.

        ``span_ends`` (int64 positions; ``judge_at: span_end`` only): in-scope tokens at
        these positions end their span whatever follows, so they are judged now instead
        of when the next out-of-scope row or the finish arrives. The server passes the
        prompt's last token under a prompt hold (`monitor.server.pipeline`): a held
        request's prompt is judged before its first token is released, also for a
        scope that runs on into the generated tokens (``both``).
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
        st = self._state(self._request(key), detector)
        assert st is not None
        pol = st.policy
        rol = self._roles(gen, roles)
        self._cover(st, pos, gen)
        if pos.size == 1:  # decode: one token per request per step
            p0 = int(pos[0])
            return self._observe_one(key, detector, st, p0, int(rol[0]), float(sc[0]),
                                     span_ends is not None and bool(np.any(span_ends == p0)))

        mask = self._in_scope(pol.scope, rol)
        if pol.judge_at == "span_end":
            ends = np.sort(pos[~mask]) if mask is not None else np.empty(0, np.int64)
            if mask is not None:
                pos, sc = pos[mask], sc[mask]
            return self._observe_span_end(key, detector, st, pos, sc, ends, span_ends)
        if mask is not None:
            pos, sc = pos[mask], sc[mask]
        if pos.size == 0:
            return []
        pos, sc = self._fresh(st, pos, sc)
        if pos.size == 0:
            return []
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
        return self._judge(key, detector, st, pos[start:], values[start:])

    @staticmethod
    def _cover(st: _DetectorState, pos: np.ndarray, gen: np.ndarray) -> None:
        """Count the rows at positions above every earlier counted one (coverage)."""
        if pos.size == 1:
            p = int(pos[0])
            if p > st.cov_pos:
                st.cov_pos = p
                if gen[0]:
                    st.seen_generated += 1
                else:
                    st.seen_prompt += 1
            return
        if pos.size == 0:
            return
        prev_max = np.maximum.accumulate(np.concatenate(([st.cov_pos], pos[:-1])))
        fresh = pos > prev_max
        n_gen = int(np.count_nonzero(fresh & gen))
        st.seen_generated += n_gen
        st.seen_prompt += int(np.count_nonzero(fresh)) - n_gen
        st.cov_pos = max(st.cov_pos, int(pos.max()))

    def _fresh(self, st: _DetectorState, pos: np.ndarray, sc: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """Drop (and count) in-scope tokens at positions not above every earlier one."""
        if pos.size == 0:
            return pos, sc
        prev_max = np.maximum.accumulate(np.concatenate(([st.last_position], pos[:-1])))
        fresh = pos > prev_max
        n_dup = int(pos.size - np.count_nonzero(fresh))
        if n_dup:
            self.duplicates_dropped += n_dup
            pos, sc = pos[fresh], sc[fresh]
        if pos.size:
            st.last_position = int(pos[-1])
        return pos, sc

    def _observe_span_end(self, key: RequestKey, detector: str, st: _DetectorState,
                          pos: np.ndarray, sc: np.ndarray, out_pos: np.ndarray,
                          forced: np.ndarray | None = None) -> list[VerdictUpdate]:
        """:meth:`observe` for ``judge_at: span_end``. ``pos``/``sc``: the in-scope rows;
        ``out_pos``: sorted positions of the out-of-scope rows of the same chunk.

        Candidates are the pending token (if any) and the fresh in-scope tokens, in
        position order; candidate ``j`` ends its span when some out-of-scope position lies
        strictly between it and candidate ``j+1`` (or above it, for the last). Each
        candidate carries the aggregate after it (a non-finite score leaves the aggregate
        as it was) and the aggregate's count, judged when ``count >= max(1, min_tokens)``.
        A candidate at a ``forced`` position (``span_ends`` of :meth:`observe`) also ends
        its span.
        """
        pol = st.policy
        pos, sc = self._fresh(st, pos, sc)
        n_before, v_before = st.agg.n, st.agg.value
        finite = np.isfinite(sc)
        n_bad = int(sc.size - np.count_nonzero(finite))
        if n_bad:
            self.nonfinite_scores += n_bad
            st.n_unscored += n_bad
        values = st.agg.update(sc[finite])
        st.n_scored += int(values.size)
        if values.size:
            st.peak = max(st.peak, float(values.max()))
        idx = np.cumsum(finite) - 1  # per fresh token: its last finite score in `values`
        tok_val = np.concatenate(([v_before], values))[idx + 1]
        tok_n = n_before + idx + 1
        if st.pending_pos >= 0:
            c_pos = np.concatenate(([st.pending_pos], pos))
            c_val = np.concatenate(([st.pending_value], tok_val))
            c_n = np.concatenate(([st.pending_n], tok_n))
        else:
            c_pos, c_val, c_n = pos, tok_val, tok_n
        if c_pos.size == 0:
            return []
        nxt = np.concatenate((c_pos[1:], [np.iinfo(np.int64).max]))
        ended = (np.searchsorted(out_pos, nxt, "left")
                 - np.searchsorted(out_pos, c_pos, "right")) > 0
        if forced is not None and forced.size:
            ended |= np.isin(c_pos, forced)
        if ended[-1]:
            st.pending_pos = -1
        else:
            st.pending_pos = int(c_pos[-1])
            st.pending_value, st.pending_n = float(c_val[-1]), int(c_n[-1])
        judged = ended & (c_n >= max(1, pol.min_tokens))
        return self._judge(key, detector, st, c_pos[judged], c_val[judged])

    def _judge(self, key: RequestKey, detector: str, st: _DetectorState,
               pos: np.ndarray, values: np.ndarray) -> list[VerdictUpdate]:
        """Judge aggregates ``values`` at tokens ``pos`` (in order): ``[]`` or one update
        carrying the highest severity newly reached (at its first crossing)."""
        if values.size:
            top = float(values.max())
            st.judged_peak = top if st.judged_peak is None else max(st.judged_peak, top)
        new_sev = None
        rank = SEVERITY_RANK[st.severity]
        for sev, thr in st.policy.thresholds:  # ascending: the last hit is the highest
            if SEVERITY_RANK[sev] <= rank:
                continue
            hits = np.flatnonzero(values >= thr)
            if hits.size:
                new_sev = (sev, thr, int(pos[hits[0]]))
        if new_sev is None:
            return []
        st.severity, st.threshold, st.crossed_at = new_sev
        return [self._update(key, detector, st, final=False, escalated=True)]

    def _observe_one(
        self, key: RequestKey, detector: str, st: _DetectorState, pos: int, role: int,
        score: float, forced_end: bool = False,
    ) -> list[VerdictUpdate]:
        """:meth:`observe` for a single token, in plain Python (same semantics;
        ``forced_end``: the token is in ``span_ends``)."""
        pol = st.policy
        span_end = pol.judge_at == "span_end"
        if not scope_mask(pol.scope)[role]:
            if span_end and 0 <= st.pending_pos < pos:  # the pending span ended
                p, v, n = st.pending_pos, st.pending_value, st.pending_n
                st.pending_pos = -1
                if n >= max(1, pol.min_tokens):
                    return self._judge(key, detector, st, np.array([p]), np.array([v]))
            return []
        if pos <= st.last_position:
            self.duplicates_dropped += 1
            return []
        st.last_position = pos
        if not math.isfinite(score):
            self.nonfinite_scores += 1
            st.n_unscored += 1
            if span_end and forced_end:  # ends its span: judged now on the aggregate so far
                st.pending_pos = -1
                if st.agg.n >= max(1, pol.min_tokens):
                    return self._judge(key, detector, st, np.array([pos]),
                                       np.array([st.agg.value]))
            elif span_end:
                st.pending_pos, st.pending_value, st.pending_n = pos, st.agg.value, st.agg.n
            return []
        value = st.agg.push(score)
        st.n_scored += 1
        if value > st.peak:
            st.peak = value
        if span_end:
            if forced_end:  # ends its span here: judged now
                st.pending_pos = -1
                if st.agg.n >= max(1, pol.min_tokens):
                    return self._judge(key, detector, st, np.array([pos]), np.array([value]))
                return []
            st.pending_pos, st.pending_value, st.pending_n = pos, value, st.agg.n
            return []
        if st.agg.n < pol.min_tokens:
            return []
        if st.judged_peak is None or value > st.judged_peak:  # what _judge keeps, inline
            st.judged_peak = float(value)
        rank = SEVERITY_RANK[st.severity]
        new_sev = None
        for sev, thr in pol.thresholds:
            if SEVERITY_RANK[sev] > rank and value >= thr:
                new_sev = (sev, thr, pos)
        if new_sev is None:
            return []
        st.severity, st.threshold, st.crossed_at = new_sev
        return [self._update(key, detector, st, final=False, escalated=True)]

    def mark_unscored(
        self,
        key: RequestKey,
        detector: str | None,
        positions: np.ndarray,
        generated: np.ndarray,
        roles: np.ndarray | None = None,
    ) -> None:
        """Count tokens that arrived but could not be scored (dropped frame, scorer
        error) toward ``n_tokens_unscored`` of ``detector`` (None: every policy detector)
        when in its scope (``roles`` as in :meth:`observe`). Positions already scored are
        not counted; ``last_position`` does not move, so a later recompute of these tokens
        can still be scored."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        gen = np.asarray(generated, dtype=bool).reshape(-1)
        if pos.size != gen.size:
            raise ValueError("positions and generated differ in length")
        rol = self._roles(gen, roles)
        names = list(self.policy.detectors) if detector is None else [detector]
        names = [n for n in names if n in self.policy.detectors]
        if not names:
            return
        req = self._request(key)
        for name in names:
            st = self._state(req, name)
            assert st is not None
            mask = self._in_scope(st.policy.scope, rol)
            self._cover(st, pos, gen)
            p = pos if mask is None else pos[mask]
            st.n_unscored += int(np.count_nonzero(p > st.last_position))

    @staticmethod
    def _missing(st: _DetectorState, expected: Expected) -> int:
        """Positions of ``expected`` that never reached ``st``, in its scope (see
        "Coverage gaps")."""
        roles = scope_roles(st.policy.scope)
        n = 0
        if TokenRole.GENERATED in roles:
            n += max(0, expected.generated - st.seen_generated)
        if roles >= _PROMPT_ROLES:
            n += max(0, expected.prompt - st.seen_prompt)
        return n

    def finish(self, key: RequestKey, *, known: bool = False,
               expected: Expected | None = None) -> list[VerdictUpdate]:
        """Final verdicts, one per policy detector (zero-token ones with severity none),
        and release the request's state. A ``span_end`` detector's pending span is judged
        first; a severity it reaches comes as an escalation (``escalated=True``,
        ``final=False``) before the finals.

        A key without state returns ``[]`` and is counted in ``unknown_finished``,
        unless ``known`` (the caller vouches the request existed, e.g. it had rows only on
        layers the policy does not judge): then all-zero finals are returned.

        ``expected`` (the client's finished counts): positions that never arrived count as
        unscored (``n_tokens_missing``, see "Coverage gaps"); None: no gap is derived
        (a request closed by the server: orphaned, idle, evicted)."""
        req = self._live.pop(key, None)
        if req is None:
            if not known:
                self.unknown_finished += 1
                return []
            req = _RequestState()
        out = []
        for name, st in req.detectors.items():
            if st.pending_pos >= 0 and st.policy.judge_at == "span_end":
                p, v, n = st.pending_pos, st.pending_value, st.pending_n
                st.pending_pos = -1
                if n >= max(1, st.policy.min_tokens):
                    out += self._judge(key, name, st, np.array([p]), np.array([v]))
        for name, pol in self.policy.detectors.items():
            state = req.detectors.get(name)
            if state is None:
                state = _DetectorState(policy=pol, agg=make_aggregator(pol.aggregation))
            if expected is not None:
                state.n_missing = self._missing(state, expected)
                state.n_unscored += state.n_missing
            out.append(self._update(key, name, state, final=True, escalated=False))
        return out

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy (hot reload) for live and future requests.

        Per live (request, detector): a detector no longer in the policy loses its state;
        when its aggregation is unchanged the accumulated aggregate is kept; when it
        changed, the aggregator restarts empty (``min_tokens`` then counts from the
        restart, since the new aggregate has seen nothing, and a pending ``span_end`` token
        is dropped). Either way the counts,
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
                    st.pending_pos = -1  # its aggregate belongs to the old aggregation
                if pol.judge_at != "span_end":
                    st.pending_pos = -1
                st.policy = pol

    # -------------------------------------------------------------------- outputs
    def _update(
        self, key: RequestKey, detector: str, st: _DetectorState, *, final: bool, escalated: bool
    ) -> VerdictUpdate:
        return VerdictUpdate(
            key=key,
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
            n_tokens_missing=st.n_missing,
            judged_peak=st.judged_peak,
        )
