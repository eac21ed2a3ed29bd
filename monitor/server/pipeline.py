"""Bounded scoring queue, the single scoring worker thread and the registry sweeper.

Stream readers (asyncio, one per gRPC stream) validate frames, admit their requests in
the `RequestRegistry` and `submit_frame` them; the worker thread takes a contiguous
run of queued frames (up to `max_batch_rows` rows), groups them by layer, makes ONE
`Scorer.score` call per layer, splits the scores back per request span and feeds the
`RequestTracker`. VerdictUpdates go back to the stream that owns the request through
`StreamSink.post` (thread-safe); the `Reporter` counts and audits them.

Ordering: everything a stream sends goes through the same FIFO queue, so a request's
finish is processed after its frames, and a stream's end marker after all of its items.

Thread rules: the tracker is touched only by the worker thread (it is not
thread-safe): unscored-row accounting, finals and policy swaps are queued as control
items. The registry has its own lock (see `monitor.server.registry` for who calls
what). The sweeper thread wakes every `sweep_interval_s`, independent of traffic, and
queues the finals of orphans past their grace and of idle requests.

Bounds: frames occupy `capacity_rows` rows of the queue until scored; a frame that does
not fit is shed explicitly (`QueueFull`: the caller sends StreamError RESOURCE_EXHAUSTED
"queue_full", counts it and its rows are recorded as unscored). Memory held by queued
activations is at most `capacity_rows * d_model * itemsize` bytes (plus one frame).
Control items are small and bounded by the registry (one finish per request), except the
unscored-row marks (rows that arrived but will not be scored, to be counted in their
requests' finals): one item per frame, holding its marked spans' positions and roles (10
bytes a row), at most `capacity_rows` such rows queued (or one frame's, when no other
marks are); a mark that does not fit is dropped, counted in
`unscored_marks_dropped_total` (its rows are already in `rows_unscored_total`), and
opens no request; the request's final counts those positions as missing when its client
reports them (`RequestFinished` counts, which the plugin always sends).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.constants import (
    ENGINE_REASONS,
    SERVER_REASONS,
    FinishReason,
    Incomplete,
    Reason,
    RequestKey,
)
from monitor.judge.latents import LatentTracker
from monitor.judge.policy import DetectorPolicy, Policy, effective_holdback, holding_detectors
from monitor.judge.trace import TokenTrace
from monitor.judge.tracker import Expected, RequestTracker, VerdictUpdate
from monitor.report.metrics import Metrics
from monitor.report.verdicts import Reporter, tokens_after_crossing, verdict_message
from monitor.roles import TokenRole, scope_roles
from monitor.score.backend import FrameScorer
from monitor.server.registry import Admission, Closing, RequestRegistry, StreamSink
from monitor.v1 import monitor_pb2
from monitor.wire.codec import DecodedFrame

__all__ = ["Pipeline", "QueueFull", "StreamSink"]

log = logging.getLogger(__name__)

_INTERNAL = 13  # grpc.StatusCode.INTERNAL


class QueueFull(Exception):
    """The scoring queue has no room for the frame (RESOURCE_EXHAUSTED, queue_full)."""


def _incomplete(reason: FinishReason, expected: Expected | None, missing: int,
                unseen: bool) -> Incomplete | None:
    """Why a closing request's final is incomplete, None when it is complete.

    Without the client's counts (`expected` None) the server closed the request itself
    (`SERVER_REASONS`) and cannot know what it never received: always incomplete, with
    that reason, on every final. With them the gap is known: incomplete when positions
    are `missing` (``no_rows`` when none of its rows reached this server), on the finals
    of the detectors missing some (`VerdictUpdate.n_tokens_missing`)."""
    if expected is None:
        return Incomplete(reason.value) if reason in SERVER_REASONS else Incomplete.MISSING
    if missing:
        return Incomplete.NO_ROWS if unseen else Incomplete.MISSING
    return None


# ---------------------------------------------------------------------- queue items


@dataclass
class _FrameItem:
    sink: StreamSink
    frame: DecodedFrame
    keys: tuple[RequestKey | None, ...]  # one per span; None: span refused, not judged
    t_recv: float  # time.perf_counter() at receive
    rows: int


@dataclass
class _FinishItem:
    closing: Closing
    expected: Expected | None = None  # the client's finished counts (gap derivation)
    unseen: bool = False  # no row of the request reached this server (`finish_unseen`)


@dataclass
class _UnscoredItem:
    """Rows of one frame that arrived but will not be scored, marked per request."""

    hook: str  # canonical hook point of the rows
    keys: tuple[RequestKey, ...]  # one admitted request per marked span
    bounds: tuple[tuple[int, int], ...]  # each span's rows in the arrays below
    positions: np.ndarray  # int64 [rows]: only the marked spans' rows, in span order
    generated: np.ndarray  # bool [rows]
    roles: np.ndarray  # int8 TokenRole [rows]

    @property
    def rows(self) -> int:
        return int(self.positions.size)


@dataclass
class _PolicyItem:
    policy: Policy
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _EndItem:
    sink: StreamSink


_Item = _FrameItem | _FinishItem | _UnscoredItem | _PolicyItem | _EndItem


class Pipeline:
    """The scoring queue + worker + registry sweeper.

    Args:
        scorer: the bundle's scorer (torch or onnxruntime backend).
        tracker: the `RequestTracker` (owned by the worker thread).
        registry: the `RequestRegistry` (request lifecycle).
        policy: the initial `Policy`.
        metrics: the `Metrics` object.
        reporter: the `Reporter` (alert counter, audit lines, score histogram).
        model_name: the `model_name` label.
        capacity_rows: queue capacity in rows (activation memory bound).
        max_batch_rows: most rows per scorer call.
        sweep_interval_s: how often the sweeper closes expired orphans / idle requests.
    """

    def __init__(
        self,
        scorer: FrameScorer,
        tracker: RequestTracker,
        registry: RequestRegistry,
        policy: Policy,
        metrics: Metrics,
        reporter: Reporter,
        *,
        model_name: str,
        capacity_rows: int = 65536,
        max_batch_rows: int = 4096,
        sweep_interval_s: float = 0.5,
        latents: LatentTracker | None = None,
        trace: TokenTrace | None = None,
    ) -> None:
        if capacity_rows < 1 or max_batch_rows < 1:
            raise ValueError("capacity_rows and max_batch_rows must be >= 1")
        self.scorer = scorer
        self.tracker = tracker
        self.registry = registry
        self.metrics = metrics
        self.reporter = reporter
        self.model_name = model_name
        self.capacity_rows = int(capacity_rows)
        self.max_batch_rows = int(max_batch_rows)
        self.sweep_interval_s = float(sweep_interval_s)
        self._policy = policy
        self._judged: dict[str, DetectorPolicy] = dict(policy.detectors)  # worker only
        #: prompt-time blocking (worker only): hook points of the detectors that hold the
        #: first token, and per open request the highest position judged on each of them
        self._hold_generated = False
        #: holding detectors judged at `span_end`: the prompt's last token ends their span
        self._prompt_span_end: frozenset[str] = frozenset()
        self._hold_hooks = self._holding_hooks(policy)
        self._judged_at: dict[RequestKey, dict[str, int]] = {}
        #: fired SAE latents per (request, detector); worker only
        self.latents = latents if latents is not None else LatentTracker({})
        #: per-token score trace per (request, detector) for audit lines; worker only
        self.trace = trace if trace is not None else TokenTrace(0)
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._rows_queued = 0
        self._unscored_queued = 0  # rows held by queued `_UnscoredItem`s (under _cond)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None
        self._stop_sweeper = threading.Event()
        metrics.queue_capacity.set(self.capacity_rows)
        metrics.queue_depth.set(0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the scoring worker and the sweeper threads."""
        self._thread = threading.Thread(target=self._run, name="scoring-worker", daemon=True)
        self._thread.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="registry-sweeper",
                                         daemon=True)
        self._sweeper.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Finish orphans, drain the queue and stop the worker; True if it finished within
        `timeout` s."""
        self._stop_sweeper.set()
        # shutting down: nobody will reconnect to this process
        self._queue_finals(self.registry.close_orphans())
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        if alive:
            log.error("scoring worker did not drain within %.1f s (%d rows queued)",
                      timeout, self._rows_queued)
        return not alive

    @property
    def rows_queued(self) -> int:
        """Rows currently waiting in the queue."""
        return self._rows_queued

    @property
    def unscored_rows_queued(self) -> int:
        """Rows of unscored-row marks waiting in the queue (at most `capacity_rows`, or
        one frame's rows)."""
        return self._unscored_queued

    @property
    def policy(self) -> Policy:
        """The policy the pipeline judges with (latest submitted)."""
        return self._policy

    # ------------------------------------------------------------------ requests

    def admit(self, key: RequestKey, sink: StreamSink, label: str = "") -> Admission:
        """Rows of `key` arrived on `sink`'s stream (see `RequestRegistry.admit`; `label`
        is the caller's correlation id); requests evicted to make room get their finals
        queued here."""
        adm, evicted = self.registry.admit(key, sink, label)
        if adm is Admission.ADOPTED:
            self.metrics.requests_reattached.inc()
        if evicted:
            log.warning("%d request(s) evicted to stay under --max-requests %d",
                        len(evicted), self.registry.max_requests)
            self._queue_finals(evicted)
        return adm

    def finish(self, key: RequestKey, sink: StreamSink | None, reason: FinishReason,
               expected: Expected | None = None, label: str = "") -> bool:
        """Close `key` (owned by `sink`, or orphaned: `RequestRegistry.finish`) now and
        queue its finals; False if it is not live or lives on another stream (nothing
        queued). `expected`: the rows the client says its capture produced (positions
        that never arrived count as unscored, see `RequestTracker.finish`); None: the
        server closes it on its own (the final is incomplete, reason `reason`).
        `label`: the caller's correlation id, if the request has none yet."""
        closing = self.registry.finish(key, sink, reason, label)
        if closing is None:
            return False
        if closing.adopted:
            self.metrics.requests_reattached.inc()
        self._put(_FinishItem(closing, expected))
        return True

    def finish_unseen(self, key: RequestKey, sink: StreamSink, reason: FinishReason,
                      expected: Expected, label: str = "") -> bool:
        """`sink`'s client finished `key`, of which no row reached this server: queue its
        finals with every in-scope position of `expected` missing (incomplete,
        ``no_rows``). False (nothing queued) when `key` is known or the registry's bound
        on waiting finals is reached (`RequestRegistry.close_unseen`)."""
        closing = self.registry.close_unseen(key, sink, reason, label)
        if closing is None:
            return False
        self._put(_FinishItem(closing, expected, unseen=True))
        return True

    def release(self, sink: StreamSink, reason: FinishReason) -> int:
        """Finish every live request `sink` owns; returns how many."""
        keys = self.registry.owned_by(sink)
        return sum(self.finish(k, sink, reason) for k in keys)

    def orphan(self, sink: StreamSink) -> int:
        """`sink`'s stream broke: keep its requests for adoption (`RequestRegistry.orphan`)."""
        return self.registry.orphan(sink)

    def _queue_finals(self, closings: Sequence[Closing]) -> None:
        for c in closings:
            self._put(_FinishItem(c))

    def _sweep_loop(self) -> None:
        while not self._stop_sweeper.wait(self.sweep_interval_s):
            try:
                closings = self.registry.sweep()
                if closings:
                    self._queue_finals(closings)
                self._publish_registry()
            except Exception:  # the sweeper must never die
                log.exception("registry sweeper: unexpected error (continuing)")

    def _publish_registry(self) -> None:
        st = self.registry.stats()
        self.metrics.active_requests.set(st.live)

    # ------------------------------------------------------------------ submission

    def _put(self, item: _Item, rows: int = 0) -> None:
        with self._cond:
            if rows:
                if self._rows_queued + rows > self.capacity_rows:
                    raise QueueFull(
                        f"scoring queue full: {self._rows_queued} of {self.capacity_rows} rows "
                        f"queued, frame has {rows} rows"
                    )
                self._rows_queued += rows
                self.metrics.queue_depth.set(self._rows_queued)
            self._items.append(item)
            self._cond.notify()

    def submit_frame(self, sink: StreamSink, frame: DecodedFrame,
                     keys: tuple[RequestKey | None, ...], t_recv: float) -> None:
        """Queue a validated frame; `keys` holds one admitted request key per span (None
        for a refused span, whose rows are not judged). Raises `QueueFull` when it does
        not fit."""
        if len(keys) != len(frame.request_ids):
            raise ValueError(f"keys: expected {len(frame.request_ids)} (one per span), "
                             f"found {len(keys)}")
        self._put(_FrameItem(sink, frame, keys, t_recv, frame.n_rows), rows=frame.n_rows)

    def submit_unscored(
        self, sink: StreamSink, hook: str,
        spans: Sequence[tuple[RequestKey, tuple[int, int]]], positions: np.ndarray,
        generated: np.ndarray, roles: np.ndarray,
    ) -> int:
        """Mark rows that arrived on `sink`'s stream but will not be scored, so their
        requests' finals count them (`n_tokens_unscored`): `spans` are (request, row
        bounds in the frame's `positions`/`generated`/`roles` arrays). One queue item for
        all of them; when their rows do not fit the bound on queued marks (see the module
        docstring) nothing is queued or admitted and the rows are counted in
        `unscored_marks_dropped_total`. Otherwise each request is admitted (refused ones
        are skipped: closed, foreign or too long, counted by the caller's refusal).
        Returns how many spans were marked."""
        rows = sum(b - a for _, (a, b) in spans)
        with self._cond:
            # one frame's marks always fit an empty queue of marks (a frame shed for
            # being larger than the queue is still marked)
            fits = (self._unscored_queued == 0
                    or self._unscored_queued + rows <= self.capacity_rows)
            if fits:
                self._unscored_queued += rows  # reserved while admitting
        if not fits:
            self.metrics.unscored_marks_dropped.inc(rows)
            log.debug("unscored marks of %d rows dropped: %d of %d rows queued", rows,
                      self._unscored_queued, self.capacity_rows)
            return 0
        kept = [(k, ab) for k, ab in spans if self.admit(k, sink).accepted]
        idx = np.concatenate([np.arange(a, b) for _, (a, b) in kept]) if kept else None
        held = 0 if idx is None else int(idx.size)
        if rows > held:
            self._release_unscored(rows - held)
        if idx is None:
            return 0
        ends = np.cumsum([b - a for _, (a, b) in kept]).tolist()
        bounds = tuple(zip([0, *ends[:-1]], ends, strict=True))
        self._put(_UnscoredItem(hook, tuple(k for k, _ in kept), bounds, positions[idx],
                                generated[idx], roles[idx]))
        return len(kept)

    def submit_end(self, sink: StreamSink) -> None:
        """Queue the end marker of a stream: `sink.post(None)` after its last item."""
        self._put(_EndItem(sink))

    def set_policy(self, policy: Policy, wait: float | None = None) -> None:
        """Swap the policy at this point of the queue (the worker applies it in order)."""
        item = _PolicyItem(policy)
        self._policy = policy
        self._put(item)
        if wait:
            item.done.wait(wait)

    # ------------------------------------------------------------------ worker

    def _take(self) -> list[_Item] | None:
        """Block for the next unit of work: a run of frames or one control item."""
        with self._cond:
            while not self._items:
                if self._stopping:
                    return None
                self._cond.wait()
            head = self._items[0]
            if not isinstance(head, _FrameItem):
                return [self._items.popleft()]
            batch: list[_Item] = [self._items.popleft()]
            rows = head.rows
            while self._items:
                nxt = self._items[0]
                if not isinstance(nxt, _FrameItem) or rows + nxt.rows > self.max_batch_rows:
                    break
                batch.append(self._items.popleft())
                rows += nxt.rows
            return batch

    def _release(self, rows: int) -> None:
        with self._cond:
            self._rows_queued -= rows
            self.metrics.queue_depth.set(self._rows_queued)

    def _release_unscored(self, rows: int) -> None:
        with self._cond:
            self._unscored_queued -= rows

    def _run(self) -> None:
        log.info("scoring worker started (capacity %d rows, batch %d rows)",
                 self.capacity_rows, self.max_batch_rows)
        while True:
            work = self._take()
            if work is None:
                break
            frames = [it for it in work if isinstance(it, _FrameItem)]
            try:
                if frames:
                    try:
                        self._score_frames(frames)
                    finally:
                        self._release(sum(it.rows for it in frames))
                else:
                    self._control(work[0])
            except Exception:  # the worker must never die
                log.exception("scoring worker: unexpected error (continuing)")
        log.info("scoring worker stopped")

    def _control(self, item: _Item) -> None:
        if isinstance(item, _FinishItem):
            self._finish(item.closing, item.expected, item.unseen)
        elif isinstance(item, _UnscoredItem):
            try:
                dets = [d for d in self.scorer.detectors_on(item.hook) if d in self._judged]
                for key, (a, b) in zip(item.keys, item.bounds, strict=True):
                    if not self.registry.is_open(key):
                        continue  # closed before its unscored rows came up: final sent
                    for d in dets:
                        self.tracker.mark_unscored(key, d, item.positions[a:b],
                                                   item.generated[a:b], item.roles[a:b])
            finally:
                self._release_unscored(item.rows)
        elif isinstance(item, _PolicyItem):
            self.tracker.set_policy(item.policy)
            self._judged = dict(item.policy.detectors)
            self._hold_hooks = self._holding_hooks(item.policy)
            self._judged_at.clear()
            item.done.set()
        elif isinstance(item, _EndItem):
            item.sink.post(None)

    def _holding_hooks(self, policy: Policy) -> frozenset[str]:
        """Hook points read by a detector that holds output (empty: no hold): block-mode
        on prompt tokens (first-token hold), and under strict streaming every block-mode
        detector reading generated tokens. Sets `_hold_generated` (progress for
        generated rows too) and `_prompt_span_end`."""
        dets = set(holding_detectors(policy))
        # judged at the prompt's end, not when the span would end (for scope `both` only
        # at the finish): the first token is released once the prompt is judged
        self._prompt_span_end = frozenset(d for d in dets
                                          if policy.detectors[d].judge_at == "span_end")
        self._hold_generated = effective_holdback(policy) is not None
        if self._hold_generated:
            dets |= {n for n, d in policy.detectors.items()
                     if d.mode == "block" and TokenRole.GENERATED in scope_roles(d.scope)}
        return frozenset(h for h in self.scorer.hooks if set(self.scorer.detectors_on(h)) & dets)

    def _judged_through(self, hook: str, key: RequestKey, sink: StreamSink,
                        positions: np.ndarray, generated: np.ndarray) -> None:
        """After the rows of ``key`` on ``hook`` were judged: when they held prompt rows
        (or any rows under strict streaming), post `JudgedThrough` with the highest
        position judged on every holding hook point (once all of them have judged some),
        so the plugin can release the output held for it."""
        prompt = positions if self._hold_generated else positions[~generated.astype(bool)]
        if prompt.size == 0:
            return
        at = self._judged_at.setdefault(key, {})
        at[hook] = max(at.get(hook, -1), int(prompt.max()))
        if len(at) < len(self._hold_hooks):
            return
        self.metrics.judged_through_sent.inc()
        sink.post(monitor_pb2.ServerMessage(judged_through=monitor_pb2.JudgedThrough(
            request_id=key.request_id, position=min(at.values()))))

    def _finish(self, c: Closing, expected: Expected | None = None,
                unseen: bool = False) -> None:
        self._judged_at.pop(c.key, None)
        updates = [self._annotate(u)
                   for u in self.tracker.finish(c.key, known=True, expected=expected)]
        missing = max((u.n_tokens_missing for u in updates if u.final), default=0)
        if missing:  # rows that never arrived (most of any detector): visible, per request
            self.metrics.rows_unscored.labels(reason=Reason.MISSING.value).inc(missing)
            log.info("request %s finished with %d position(s) never received%s",
                     c.key.request_id, missing, " (no row of it reached this sidecar)"
                     if unseen else "")
        why = _incomplete(c.reason, expected, missing, unseen)
        if why is not None:  # counted once per request; marked on each final it concerns
            self.metrics.requests_incomplete.labels(model_name=self.model_name,
                                                    reason=why.value).inc()
            updates = [dataclasses.replace(u, incomplete_reason=why.value)
                       if u.final and (expected is None or u.n_tokens_missing) else u
                       for u in updates]
        self.latents.drop(c.key)
        self.trace.drop(c.key)
        label = self.registry.label(c.key)
        first_gen, highest = self.registry.extent(c.key)
        self.registry.retire(c.key)
        self.metrics.requests_finished.labels(model_name=self.model_name,
                                              reason=c.reason.value).inc()
        for u in updates:  # a span_end escalation judged at finish, then the finals
            if u.final:
                self.reporter.final(u, label)
                if u.action == "block":
                    # generated rows reach the sidecar only when a judged scope reads them
                    seen = any(TokenRole.GENERATED in scope_roles(d.scope)
                               for d in self._judged.values())
                    after = tokens_after_crossing(
                        u.crossed_at_position, first_gen, highest,
                        ended_in_engine=c.reason in ENGINE_REASONS) if seen else None
                    self.reporter.block_end(u, label, after, c.reason.value)
            else:
                self.reporter.escalation(u, label)
            if c.owner is not None:
                c.owner.post(verdict_message(u, label))
        self._publish_registry()

    def _score_frames(self, items: list[_FrameItem]) -> None:
        # hidden-state and projected frames of one hook point are scored apart
        by_hook: dict[tuple[str, str], list[_FrameItem]] = {}
        for it in items:
            by_hook.setdefault((it.frame.hook_name, it.frame.projection), []).append(it)
        for (hook, _), group in by_hook.items():
            self._score_layer(hook, group)

    def _scores(self, hook: str, x: np.ndarray, projected: bool, columns: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 scores ``[n_rows, n_detectors]`` and (``columns``) column values of
        ``x``: hidden states ``[n_rows, d_model]``, or (``projected``) a worker's
        ``x · W`` ``[n_rows, n_cols]`` with var(x) as one more last column when the hook
        point's projection needs it (the codec checked the width)."""
        if not projected:
            if columns:
                return self.scorer.score_and_columns(hook, x)
            return np.asarray(self.scorer.score(hook, x), dtype=np.float32), None
        import torch  # projections are offered by the torch backend only

        from monitor.score.scorer import Scorer

        if not isinstance(self.scorer, Scorer):
            raise TypeError(f"{type(self.scorer).__name__} cannot score projected rows")
        w, needs_var = self.scorer.projection(hook)
        k = int(w.shape[1])
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        var = xt[:, k].contiguous() if needs_var else None
        scores, z = self.scorer.projected_and_columns(hook, xt[:, :k], var)
        return scores, (z if columns else None)

    def _score_layer(self, hook: str, group: list[_FrameItem]) -> None:
        """Score the frames of one hook point (`DecodedFrame.hook_name`, canonical), all
        hidden states or all projected (`DecodedFrame.projection`)."""
        layer = group[0].frame.layer
        dets = self.scorer.detectors_on(hook)
        cols = [(j, d) for j, d in enumerate(dets) if d in self._judged]
        if not cols:
            return  # layer not in the current plan: nothing judges it
        xs = [it.frame.x for it in group]
        # float16 and float32 frames together: numpy promotes to float32 (exact)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
        t0 = time.perf_counter()
        try:
            lat = [d for _, d in cols if d in self.latents]
            # column values too when a detector reports fired latents (one GEMM)
            scores, z = self._scores(hook, x, bool(group[0].frame.projection), bool(lat))
        except Exception as exc:
            log.exception("scorer failed on %s (%d rows)", hook, x.shape[0])
            for it in group:
                self._unscored_frame(it, cols, f"scorer failed: {exc}")
            return
        t1 = time.perf_counter()
        n = int(x.shape[0])
        self.metrics.scoring_latency.labels(layer=str(layer)).observe(t1 - t0)
        self.metrics.batch_rows.observe(n)
        self.metrics.rows_scored.labels(model_name=self.model_name, layer=str(layer)).inc(n)
        row0 = 0
        n_dup = 0
        n_late = 0
        for it in group:
            f = it.frame
            fs = scores[row0:row0 + f.n_rows]
            fz = z[row0:row0 + f.n_rows] if z is not None else None
            row0 += f.n_rows
            for (a, b), key in zip(f.span_bounds, it.keys, strict=True):
                if key is None:
                    continue  # refused at admission (counted there)
                if not self.registry.is_open(key):
                    n_late += b - a  # evicted between admission and scoring
                    continue
                # rows at positions already scored on this layer are recomputes
                # (preemption): skip them, count them
                d = self.registry.trim_recomputed(key, hook, f.positions[a:b],
                                                  f.generated[a:b])
                n_dup += d
                a += d
                if a >= b:
                    continue
                if fz is not None:
                    for det in lat:
                        self.latents.observe(key, det, self._judged[det].scope, fz[a:b],
                                             f.roles[a:b])
                ends = None  # the prompt's last token, when a holding span_end reads it
                if self._prompt_span_end and f.prompt_end.size == f.n_rows:
                    pe = f.prompt_end[a:b]
                    ends = f.positions[a:b][pe] if pe.any() else None
                for j, det in cols:
                    self.trace.observe(key, det, self._judged[det].scope, f.positions[a:b],
                                       fs[a:b, j], f.roles[a:b])
                    ups = self.tracker.observe(
                        key, det, f.positions[a:b], f.generated[a:b], fs[a:b, j], f.roles[a:b],
                        ends if det in self._prompt_span_end else None)
                    for u in ups:
                        self._handle_update(u, it.sink)
                if hook in self._hold_hooks:
                    self._judged_through(hook, key, it.sink, f.positions[a:b], f.generated[a:b])
            # arrival -> scored, judged, verdicts posted and escalations handed to the sinks
            self.metrics.frame_latency.observe(time.perf_counter() - it.t_recv)
        if n_dup:
            self.metrics.duplicate_rows.inc(n_dup)
        if n_late:
            self.metrics.rows_unscored.labels(reason=Reason.UNKNOWN_REQUEST.value).inc(n_late)

    def _unscored_frame(self, it: _FrameItem, cols: list[tuple[int, str]],
                        message: str) -> None:
        f = it.frame
        self.metrics.rows_unscored.labels(reason=Reason.SCORER_ERROR.value).inc(f.n_rows)
        for (a, b), key in zip(f.span_bounds, it.keys, strict=True):
            if key is None or not self.registry.is_open(key):
                continue
            for _, d in cols:
                self.tracker.mark_unscored(key, d, f.positions[a:b], f.generated[a:b],
                                           f.roles[a:b])
        it.sink.post(monitor_pb2.ServerMessage(error=monitor_pb2.StreamError(
            code=_INTERNAL, reason=Reason.SCORER_ERROR.value, message=message, seq=f.seq)))

    def _annotate(self, u: VerdictUpdate) -> VerdictUpdate:
        """``u`` with the SAE latents that fired for it so far and its token trace
        (unchanged if it has neither)."""
        hits = self.latents.hits(u.key, u.detector)
        tokens = self.trace.tokens(u.key, u.detector)
        return dataclasses.replace(u, latents=hits, tokens=tokens) if hits or tokens else u

    def _handle_update(self, u: VerdictUpdate, sink: StreamSink) -> None:
        u = self._annotate(u)
        label = self.registry.label(u.key)
        self.reporter.escalation(u, label)
        sink.post(verdict_message(u, label))
