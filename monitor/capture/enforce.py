"""Enforcement: a `mode: block` verdict ends exactly that request inside vLLM.

Path of one block (three processes of `vllm serve`, one seam in each, nothing killed):

1. **Worker** (the process that captures; `monitor.capture.plugin`): the sender thread
   receives a `Verdict` with `mode == "block"` and severity CRITICAL and not final
   (`is_block`). `CaptureSession.on_verdict` checks that its `request_id` (the engine
   request id, the key on the wire) is a live request of this worker and queues a
   `BlockOrder` on the session's `BlockBoard` (thread-safe; the model thread never
   waits). The next `ModelRunnerOutput`
   the worker returns to the engine core (`GPUModelRunner.execute_model` /
   `sample_tokens`, wrapped) carries the queued orders as attribute `ORDERS_ATTR`: the
   output is pickled to the engine core (multiproc executor) or handed over in process
   (uniproc), so the orders travel on vLLM's own per-step channel, in step order.
2. **EngineCore** (scheduler thread): `Scheduler.update_from_output` (wrapped) files the
   orders of that output in `PendingBlocks`, then runs as usual; its per-token stop check
   (`vllm.v1.core.sched.scheduler.check_stop`, wrapped) ends a pending request after
   its next token exactly as vLLM ends any finished request: status `FINISHED_ABORTED`,
   `stop_reason = BLOCK_MARKER + " detector=<name>"`, KV blocks freed, the request's final
   `EngineCoreOutput` sent to the frontend. Other requests of the batch are untouched.
3. **Frontend** (API server): `RequestState._new_completion_output` (wrapped) turns a
   finished output whose `stop_reason` starts with `BLOCK_MARKER` into
   `finish_reason="content_filter"` and `stop_reason=<block message>`; vLLM's OpenAI
   server copies both into the non-streamed choice and into the final streamed chunk.
   Without the frontend hook the client still sees `finish_reason="abort"`, never "stop".

Bound: a block verdict queued while step k runs rides on step k's (or k+1's) output; the
request is stopped at its next sampled token. Tokens generated after the crossing
token = scoring lag (sidecar) + at most ~2 steps; `bench/bench_enforce.py` measures it.

Thread rules: `BlockBoard` is written by the sender thread and drained by the model
thread (lock). `PendingBlocks` is used by the scheduler thread only.
"""

from __future__ import annotations

import bisect
import collections
import copy
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.v1 import monitor_pb2

log = logging.getLogger("monitor.capture")

#: Prefix of `Request.stop_reason` of a blocked request (engine core → frontend).
BLOCK_MARKER = "safety_monitor:block"
#: Prefix of the `stop_reason` of a request blocked while its first token was held: the
#: frontend also blanks the text (vLLM's chat stream drops a final chunk with no token,
#: so the final output carries one placeholder token: the request's EOS id, never the
#: sampled token's id, text or logprob).
HELD_MARKER = BLOCK_MARKER + ":before_first_token"
#: Attribute of a `ModelRunnerOutput` carrying block orders (worker → engine core).
ORDERS_ATTR = "_safety_monitor_blocks"
#: ... carrying `{engine request id: position judged through}` (prompt-time blocking).
JUDGED_ATTR = "_safety_monitor_judged"
#: ... carrying the plan's `HoldSettings` when they changed.
HOLD_ATTR = "_safety_monitor_hold"
#: `BlockOrder.detector` of a request ended because its prompt hold expired (fail closed).
HOLD_TIMEOUT = "prompt_hold_timeout"
#: Logprob shown for the placeholder token of a request blocked before its first token
#: (vLLM's OpenAI server floors logprobs at this value: "no probability").
PLACEHOLDER_LOGPROB = -9999.0
#: The OpenAI finish reason of a blocked response.
CONTENT_FILTER = "content_filter"
#: Default `stop_reason` text shown to the client (SAFETY_MONITOR_BLOCK_MESSAGE).
DEFAULT_MESSAGE = "The response was stopped by the safety monitor."
_MARK = "_safety_monitor_enforce"
#: Upper bounds (s) of the first-token hold-time histogram (`safety_monitor_hold_seconds`).
HOLD_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def block_marker(prefix: str, detector: str, crossed_at: int = -1) -> str:
    """`stop_reason` of a blocked request: `prefix` (`BLOCK_MARKER` / `HELD_MARKER`), the
    detector and, when known (>= 0), the crossing position (`parse_marker` reads it)."""
    tail = f" crossed_at={crossed_at}" if crossed_at >= 0 else ""
    return f"{prefix} detector={detector}{tail}"


def parse_marker(stop_reason: str) -> tuple[str, int]:
    """(detector, crossing position or -1) of a `block_marker` string."""
    rest = stop_reason.split("detector=", 1)[-1] if "detector=" in stop_reason else ""
    det, _, pos = rest.partition(" crossed_at=")
    try:
        return det, int(pos) if pos else -1
    except ValueError:
        return det, -1


def block_message() -> str:
    """The client-facing message (env SAFETY_MONITOR_BLOCK_MESSAGE, else the default)."""
    return os.environ.get("SAFETY_MONITOR_BLOCK_MESSAGE", "").strip() or DEFAULT_MESSAGE


def is_block(v: monitor_pb2.Verdict) -> bool:
    """True for a verdict that orders a block: mode block, severity critical, not final."""
    return v.mode == "block" and v.severity == monitor_pb2.SEVERITY_CRITICAL and not v.final


@dataclass(frozen=True)
class BlockOrder:
    """One block, as it travels from the worker to the scheduler (picklable).

    Attributes:
        request_id: vLLM's engine request id (the key).
        label: the caller's correlation id (a label for logs only; "" if none).
        detector, score: the verdict's detector and aggregated score.
        crossed_at_position: token position where critical was first reached.
    """

    request_id: str
    label: str
    detector: str
    score: float
    crossed_at_position: int


@dataclass(frozen=True)
class HoldSettings:
    """Prompt-time blocking settings, from the plan (picklable, worker → engine core).

    Attributes:
        hold_ms: how long any output may be withheld (`Enforcement.prompt_hold_ms`, else
            `hold_bound_ms` with strict streaming; 0: no hold).
        fail_mode: on expiry, "open" releases the token, "closed" ends the request with
            finish_reason content_filter (env SAFETY_MONITOR_FAIL_MODE overrides the plan).
        prompt_hold: the first token waits until the whole prompt is judged.
        holdback: strict streaming window N (`Enforcement.holdback_tokens`; -1: off).
    """

    hold_ms: int = 0
    fail_mode: str = "open"
    prompt_hold: bool = True
    holdback: int = -1

    @property
    def active(self) -> bool:
        return self.hold_ms > 0 and (self.prompt_hold or self.holdback >= 0)


@dataclass
class StepNotes:
    """What one step output carries from the worker to the engine core."""

    orders: list[BlockOrder]
    judged: dict[str, int]
    hold: HoldSettings | None


class BlockBoard:
    """Block orders and judged-through positions waiting in the worker for the next
    step output (thread-safe).

    Args:
        max_pending: orders held at most; more are refused and counted (`refused_full`).
    """

    def __init__(self, max_pending: int = 4096) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._orders: dict[str, BlockOrder] = {}
        self._done: set[str] = set()  # engine ids already ordered (one order per request)
        self.ordered = 0
        self.refused_full = 0
        self.unresolved = 0
        self.duplicates = 0
        self.last_order_t = 0.0
        self._judged: dict[str, int] = {}  # engine id -> highest position judged through
        self._hold: HoldSettings | None = None  # to send (changed since last sent)
        self._hold_sent = HoldSettings()

    def set_hold(self, hold: HoldSettings) -> None:
        """Settings of a new plan; sent with the next step output when they changed."""
        with self._lock:
            self._hold = hold if hold != self._hold_sent else None

    def judged(self, request_id: str, position: int) -> None:
        """The sidecar judged `request_id` through `position` (sender thread)."""
        with self._lock:
            if len(self._judged) < self.max_pending or request_id in self._judged:
                self._judged[request_id] = max(position, self._judged.get(request_id, -1))
            else:
                self.refused_full += 1

    def put(self, order: BlockOrder) -> bool:
        with self._lock:
            if order.request_id in self._done:
                self.duplicates += 1
                return False
            if len(self._orders) >= self.max_pending:
                self.refused_full += 1
                return False
            self._orders[order.request_id] = order
            self._done.add(order.request_id)
            self.ordered += 1
            self.last_order_t = time.monotonic()
            return True

    def count_unresolved(self) -> None:
        with self._lock:
            self.unresolved += 1

    def retain(self, live: set[str]) -> None:
        """Forget requests not in `live` (finished): bounded memory."""
        with self._lock:
            self._done &= live
            for rid in [r for r in self._judged if r not in live]:
                del self._judged[rid]
            for rid in [r for r in self._orders if r not in live]:
                del self._orders[rid]

    def take(self) -> StepNotes | None:
        """All queued orders, judged positions and changed settings (None fast when none)."""
        if not self._orders and not self._judged and self._hold is None:
            return None
        with self._lock:
            notes = StepNotes(list(self._orders.values()), self._judged, self._hold)
            self._orders.clear()
            self._judged = {}
            if self._hold is not None:
                self._hold_sent = self._hold
                self._hold = None
            return notes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"blocks_ordered": self.ordered, "blocks_refused_full": self.refused_full,
                    "blocks_unresolved": self.unresolved,
                    "blocks_duplicate": self.duplicates}


def attach(output: Any, notes: StepNotes) -> Any:
    """`output` carrying `notes` (a copy when it is vLLM's shared empty output)."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy.copy(output)
    if notes.orders:
        prior = getattr(output, ORDERS_ATTR, None) or []
        setattr(output, ORDERS_ATTR, [*prior, *notes.orders])
    if notes.judged:
        judged = dict(getattr(output, JUDGED_ATTR, None) or {})
        for rid, pos in notes.judged.items():
            judged[rid] = max(pos, judged.get(rid, -1))
        setattr(output, JUDGED_ATTR, judged)
    if notes.hold is not None:
        setattr(output, HOLD_ATTR, notes.hold)
    return output


# -------------------------------------------------------------------- engine core side
class PendingBlocks:
    """Orders filed in the engine core, applied at the request's next token.

    Scheduler thread only. `applied` keeps the last `keep` (tokens after crossing) values
    for logs / the stats file; counters are monotonic.
    """

    def __init__(self, keep: int = 4096) -> None:
        self.orders: dict[str, BlockOrder] = {}
        self.applied = 0
        self.gone = 0  # request finished before its block applied
        self.after: collections.deque[int] = collections.deque(maxlen=keep)

    def file(self, orders: list[BlockOrder], live: Callable[[str], bool]) -> None:
        for o in orders:
            if live(o.request_id):
                self.orders[o.request_id] = o
            else:
                self.gone += 1
                log.info("safety monitor: block for request %s (detector %s) arrived after it "
                         "finished", o.request_id, o.detector)
        for rid in [r for r in self.orders if not live(r)]:
            del self.orders[rid]
            self.gone += 1

    def apply(self, request: Any) -> bool:
        """Stop `request` if a block is pending for it (status, stop_reason); True if so."""
        o = self.orders.pop(request.request_id, None)
        if o is None:
            return False
        from vllm.v1.request import RequestStatus

        request.status = RequestStatus.FINISHED_ABORTED
        request.stop_reason = block_marker(BLOCK_MARKER, o.detector, o.crossed_at_position)
        n_out = int(request.num_output_tokens)
        last = int(request.num_tokens) - 1
        after = max(0, min(n_out, last - o.crossed_at_position))
        self.applied += 1
        self.after.append(after)
        log.warning("safety monitor: BLOCKED request %s (label %s) detector=%s score=%.3f "
                    "crossed_at=%d tokens_generated=%d tokens_after_crossing=%d "
                    "blocks_applied=%d", o.request_id, o.label, o.detector, o.score,
                    o.crossed_at_position, n_out, after, self.applied)
        return True


PENDING = PendingBlocks()


@dataclass
class _Held:
    """Outputs of one request withheld from the frontend (`FirstTokenHolds`)."""

    last_prompt_pos: int  # position of its last prompt token
    client: int  # EngineCoreOutputs client index
    #: withheld (monotonic time withheld, position of its last token, EngineCoreOutput)
    queue: list[tuple[float, int, Any]] = field(default_factory=list)
    n_seen: int = 0  # generated tokens in its outputs so far (withheld or delivered)
    n_delivered: int = 0  # of them delivered to the frontend
    t_first: float = 0.0  # when its first output was withheld
    released_open: bool = False  # an output of it went out unjudged (fail open)
    placeholder: int = 0  # token id an ended request shows instead of its first token


class FirstTokenHolds:
    """Prompt-time blocking and strict streaming in the engine core.

    A request's outputs are withheld from the frontend until the sidecar has judged far
    enough (`JudgedThrough` positions, carried on the step outputs like block orders),
    each at most `HoldSettings.hold_ms`. Generated token k (0-based) of a request with
    P prompt tokens is at position P + k. An output whose last token is at position q is
    released once the judged position j satisfies

    - prompt hold (`HoldSettings.prompt_hold`): j >= P - 1 (the whole prompt judged); the
      request then passes freely unless strict streaming is on;
    - strict streaming (`HoldSettings.holdback` = N >= 0): also q - N <= j, or
      q - 1 - N <= j for the final output (its last token is never fed back through the
      model, so it is never judged): delivered text never runs more than N tokens
      ahead of the judged position (N + 1 for the last token of a finished response).

    Per request: a block pending (or applied) → it ends at once, its withheld outputs
    dropped (`finish_reason` content_filter at the frontend; no generated text when none
    was delivered yet); an output withheld longer than `hold_ms` → fail open releases it
    (`released_open`, WARNING), fail closed ends the request like a block (`ended_closed`,
    detector `prompt_hold_timeout`). Requests keep decoding while held (the batch never
    waits); the busy loop keeps stepping while anything is held
    (`Scheduler.has_requests`, wrapped) so a request that finished while held is still
    released or ended within the bound.

    Scheduler thread only. Counters are monotonic, one count per request:
    `n_held` (requests whose output was withheld), `released_judged` (first output released
    because judged), `released_open` (an output released unjudged under fail open),
    `ended_blocked` (blocked while held), `ended_closed` (hold expired under fail closed).
    `hold_ms` keeps the last `keep` first-token hold durations (ms) of requests released
    because judged; `hold_buckets` / `hold_sum_s` count all of them (upper bounds
    `HOLD_BUCKETS_S`, not cumulative; the last slot is +Inf). They reach vLLM's `/metrics`
    through `EngineStats` (module docstring of `monitor.capture.engine_metrics`).
    """

    def __init__(self, keep: int = 4096) -> None:
        self.settings = HoldSettings()
        self.judged: dict[str, int] = {}
        self.held: dict[str, _Held] = {}
        self.passed: set[str] = set()  # released, not finished yet: their outputs pass
        self.n_held = 0
        self.released_judged = 0
        self.released_open = 0
        self.ended_blocked = 0
        self.ended_closed = 0
        self.hold_ms: collections.deque[float] = collections.deque(maxlen=keep)
        self.hold_buckets = [0] * (len(HOLD_BUCKETS_S) + 1)
        self.hold_sum_s = 0.0

    def note(self, judged: dict[str, int] | None, hold: HoldSettings | None) -> None:
        if hold is not None and hold != self.settings:
            self.settings = hold
            log.info("safety monitor: prompt hold %d ms (fail %s, prompt %s, holdback %d)",
                     hold.hold_ms, hold.fail_mode, hold.prompt_hold, hold.holdback)
        if judged and self.settings.active:
            for rid, pos in judged.items():
                self.judged[rid] = max(pos, self.judged.get(rid, -1))

    def process(self, sched: Any, outs: dict[int, Any]) -> dict[int, Any]:
        """Withhold / release outputs of `outs` (`update_from_output`'s result)."""
        if not self.settings.active and not self.held and not self.passed:
            return outs
        now = time.monotonic()
        for ci, eco in outs.items():
            keep = []
            for o in eco.outputs:
                rid = o.request_id
                if rid in self.passed:
                    keep.append(o)
                    if o.finish_reason is not None:
                        self.passed.discard(rid)
                    continue
                h = self.held.get(rid)
                if h is None:
                    if not self.settings.active:
                        keep.append(o)
                        continue
                    req = sched.requests.get(rid)
                    n_prompt = int(req.num_prompt_tokens) if req is not None else 0
                    eos = getattr(req, "eos_token_id", None)
                    h = self.held[rid] = _Held(n_prompt - 1, ci, t_first=now, placeholder=(
                        int(eos) if isinstance(eos, int) else 0))
                    self.n_held += 1
                h.n_seen += len(o.new_token_ids)
                h.queue.append((now, h.last_prompt_pos + h.n_seen, o))
            eco.outputs = keep
        for rid, h in list(self.held.items()):
            self._decide(sched, outs, rid, h, now)
        if len(self.judged) > 1024 or len(self.passed) > 1024:
            self.judged = {r: p for r, p in self.judged.items() if r in sched.requests}
            self.passed &= set(sched.requests)
        return outs

    def _releasable(self, h: _Held, last_pos: int, finished: bool, judged: int) -> bool:
        st = self.settings
        if st.prompt_hold and judged < h.last_prompt_pos:
            return False
        return st.holdback < 0 or last_pos - int(finished) - st.holdback <= judged

    def _decide(self, sched: Any, outs: dict[int, Any], rid: str, h: _Held, now: float) -> None:
        last: Any = h.queue[-1][2] if h.queue else None
        finished = last is not None and last.finish_reason is not None
        if not finished and rid not in sched.requests:
            del self.held[rid]  # aborted by its client meanwhile: nothing to deliver
            self.judged.pop(rid, None)
            return
        detector, crossed = None, -1
        if finished and isinstance(last.stop_reason, str) and \
                last.stop_reason.startswith(BLOCK_MARKER):
            detector, crossed = parse_marker(last.stop_reason)
        elif rid in PENDING.orders:
            o = PENDING.orders.pop(rid)
            detector, crossed = o.detector, o.crossed_at_position
        if detector is not None:
            self.ended_blocked += 1
            self._end(sched, outs, rid, h, detector, "blocked while held", crossed)
            return
        judged = self.judged.get(rid, -1)
        out = self._outputs(outs, h.client) if h.queue else []
        force = False  # fail open under a prompt hold only: everything goes
        while h.queue:
            t, last_pos, o = h.queue[0]
            done = o.finish_reason is not None
            ok = self._releasable(h, last_pos, done, judged)
            if not ok and not force:
                if now - t < self.settings.hold_ms / 1e3:
                    return
                if self.settings.fail_mode == "closed":
                    self.ended_closed += 1
                    self._end(sched, outs, rid, h, HOLD_TIMEOUT,
                              f"not judged within {self.settings.hold_ms} ms (judged through "
                              f"{judged}, needed for position {last_pos}), fail closed")
                    return
                if not h.released_open:
                    h.released_open = True
                    self.released_open += 1
                log.warning("safety monitor: request %s output released UNJUDGED: not judged "
                            "within %d ms (judged through %d, needed for position %d), fail "
                            "open; released_open=%d", rid, self.settings.hold_ms, judged,
                            last_pos, self.released_open)
                force = self.settings.holdback < 0
            if h.n_delivered == 0 and ok:
                self.released_judged += 1
                waited = now - h.t_first
                self.hold_ms.append(waited * 1e3)
                self.hold_buckets[bisect.bisect_left(HOLD_BUCKETS_S, waited)] += 1
                self.hold_sum_s += waited
            h.queue.pop(0)
            h.n_delivered += len(o.new_token_ids)
            out.append(o)
            if done:
                del self.held[rid]
                self.judged.pop(rid, None)
                return
        if self.settings.holdback < 0:  # prompt hold only: judged, passes from now on
            del self.held[rid]
            self.judged.pop(rid, None)
            self.passed.add(rid)

    def _end(self, sched: Any, outs: dict[int, Any], rid: str, h: _Held, detector: str,
             why: str, crossed: int = -1) -> None:
        """End `rid`, its withheld outputs dropped. With nothing delivered yet no generated
        text is shown: the final output carries one placeholder token id (see
        `HELD_MARKER`)."""
        from vllm.v1.engine import EngineCoreOutput, FinishReason
        from vllm.v1.request import RequestStatus

        del self.held[rid]
        self.judged.pop(rid, None)
        req = sched.requests.get(rid)
        if req is not None and not req.is_finished():
            sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
        n = sum(len(o.new_token_ids) for _, _, o in h.queue)
        if h.n_delivered == 0:
            # a placeholder id (the request's EOS, else 0), never the sampled token: its
            # id would reach clients asking for token ids or logprobs
            tokens = [h.placeholder]
            marker = block_marker(HELD_MARKER, detector, crossed)
            where = "before its first token"
        else:
            tokens, marker = [], block_marker(BLOCK_MARKER, detector, crossed)
            where = "while its output was held back"
        log.warning("safety monitor: BLOCKED request %s %s (detector=%s; %s); tokens "
                    "withheld=%d tokens_delivered=%d ended_blocked=%d ended_closed=%d",
                    rid, where, detector, why, n, h.n_delivered, self.ended_blocked,
                    self.ended_closed)
        self._outputs(outs, h.client).append(EngineCoreOutput(
            request_id=rid, new_token_ids=tokens, finish_reason=FinishReason.ABORT,
            stop_reason=marker))

    @staticmethod
    def _outputs(outs: dict[int, Any], client: int) -> list[Any]:
        from vllm.v1.engine import EngineCoreOutputs

        eco = outs.get(client)
        if eco is None:
            eco = outs[client] = EngineCoreOutputs()
        return eco.outputs

    def stats(self) -> dict[str, int]:
        return {"held": self.n_held, "holding": len(self.held),
                "released_judged": self.released_judged, "released_open": self.released_open,
                "ended_blocked": self.ended_blocked, "ended_closed": self.ended_closed}

    def histogram(self) -> tuple[list[int], float]:
        """Per-bucket counts (`HOLD_BUCKETS_S`, then +Inf) and the sum (s) of the first-token
        hold times of requests released because judged."""
        return list(self.hold_buckets), self.hold_sum_s


HOLDS = FirstTokenHolds()

#: Env var naming the directory where each EngineCore process writes its counters
#: (`EngineStatsFile`); set by the first process that loads the plugin
#: (`monitor.capture.engine_metrics.ensure_stats_dir`), inherited by the EngineCore.
ENGINE_STATS_ENV = "SAFETY_MONITOR_ENGINE_STATS_DIR"


class EngineStatsFile:
    """The EngineCore's enforcement counters (`HOLDS`, `PENDING`), written as JSON to
    `$SAFETY_MONITOR_ENGINE_STATS_DIR/engine-<pid>.json` for the API server's `/metrics`
    (`monitor.capture.engine_metrics.EngineCollector` reads and sums the files).

    Written (atomically: temp file + rename) after a step that changed a counter, at most
    every `min_interval_s` while anything is held (the busy loop keeps stepping then, so
    the last change is written once nothing is held), at once otherwise. Without the env
    var nothing is written. Scheduler thread only.
    """

    def __init__(self, holds: FirstTokenHolds, pending: PendingBlocks,
                 min_interval_s: float = 0.25) -> None:
        self.holds, self.pending = holds, pending
        self.min_interval_s = min_interval_s
        self._last: tuple[int, ...] = ()
        self._t = 0.0
        self._path: str | None = None
        self._failed = False

    def _key(self) -> tuple[int, ...]:
        h, p = self.holds, self.pending
        return (h.n_held, len(h.held), h.released_judged, h.released_open, h.ended_blocked,
                h.ended_closed, p.applied, p.gone)

    def snapshot(self) -> dict[str, Any]:
        """The counters as written (keys read by `engine_metrics.read_totals`)."""
        buckets, total = self.holds.histogram()
        return {**self.holds.stats(), "blocks_applied": self.pending.applied,
                "blocks_late": self.pending.gone, "hold_buckets": buckets,
                "hold_sum_s": total}

    def publish(self, now: float) -> None:
        """Write the counters if they changed (see the class docstring)."""
        key = self._key()
        if key == self._last or self._failed:
            return
        if self.holds.held and now - self._t < self.min_interval_s:
            return
        if self._path is None:
            d = os.environ.get(ENGINE_STATS_ENV, "")
            if not d:
                self._failed = True
                return
            self._path = os.path.join(d, f"engine-{os.getpid()}.json")
        tmp = f"{self._path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.snapshot(), f)
            os.replace(tmp, self._path)
        except OSError as e:
            self._failed = True  # one ERROR, not one per step
            log.error("safety monitor: cannot write the engine counters to %s (%s): hold "
                      "and block outcomes are NOT on /metrics", self._path, e)
            return
        self._last, self._t = key, now


ENGINE_STATS = EngineStatsFile(HOLDS, PENDING)


def install_engine_core_hooks() -> None:
    """Wrap `Scheduler.update_from_output` and the scheduler's `check_stop` (idempotent)."""
    import vllm.v1.core.sched.scheduler as sched_mod

    orig_check = sched_mod.check_stop
    if not getattr(orig_check, _MARK, False):
        @functools.wraps(orig_check)
        def check_stop(request: Any, max_model_len: int) -> bool:
            if orig_check(request, max_model_len):
                return True
            return bool(PENDING.orders) and PENDING.apply(request)

        setattr(check_stop, _MARK, True)
        sched_mod.check_stop = check_stop

    cls = sched_mod.Scheduler
    orig_update = cls.__dict__.get("update_from_output")
    if orig_update is None or getattr(orig_update, _MARK, False):
        return

    @functools.wraps(orig_update)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        orders = getattr(model_runner_output, ORDERS_ATTR, None)
        if orders:
            reqs = self.requests

            def live(rid: str) -> bool:
                r = reqs.get(rid)
                return r is not None and not r.is_finished()

            PENDING.file(orders, live)
        HOLDS.note(getattr(model_runner_output, JUDGED_ATTR, None),
                   getattr(model_runner_output, HOLD_ATTR, None))
        outs = HOLDS.process(self, orig_update(self, scheduler_output, model_runner_output))
        ENGINE_STATS.publish(time.monotonic())
        return outs

    setattr(update_from_output, _MARK, True)
    cls.update_from_output = update_from_output  # type: ignore[method-assign]  # the patch

    orig_has = cls.__dict__.get("has_requests")
    if orig_has is not None and not getattr(orig_has, _MARK, False):
        @functools.wraps(orig_has)
        def has_requests(self: Any) -> bool:
            # keep stepping while outputs are held, so they are released within the bound
            return bool(orig_has(self)) or bool(HOLDS.held)

        setattr(has_requests, _MARK, True)
        cls.has_requests = has_requests  # type: ignore[method-assign]  # the patch


# -------------------------------------------------------------------- worker side
def install_worker_hooks() -> None:
    """Wrap `GPUModelRunner.execute_model` / `sample_tokens` (inherited by the CPU runner)
    so the outputs carry the session's queued block orders (idempotent)."""
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name in ("execute_model", "sample_tokens"):
        orig = GPUModelRunner.__dict__.get(name)
        if orig is None or getattr(orig, _MARK, False):
            continue

        def make(orig: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(orig)
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                out = orig(self, *args, **kwargs)
                session = getattr(self, "_safety_monitor_session", None)
                if session is None or not isinstance(out, ModelRunnerOutput):
                    return out
                notes = session.blocks.take()
                return attach(out, notes) if notes is not None else out

            setattr(wrapper, _MARK, True)
            return wrapper

        setattr(GPUModelRunner, name, make(orig))


# -------------------------------------------------------------------- frontend side
def install_frontend_hooks() -> None:
    """Wrap the output processor's `RequestState._new_completion_output` (idempotent)."""
    from vllm.v1.engine.output_processor import RequestState

    orig = RequestState.__dict__.get("_new_completion_output")
    if orig is None or getattr(orig, _MARK, False):
        return
    message = block_message()
    delivered_hist = _delivered_histogram()

    @functools.wraps(orig)
    def _new_completion_output(self: Any, token_ids: list[int], finish_reason: Any,
                               stop_reason: int | str | None) -> Any:
        out = orig(self, token_ids, finish_reason, stop_reason)
        if (finish_reason is not None and isinstance(stop_reason, str)
                and stop_reason.startswith(BLOCK_MARKER)):
            out.finish_reason = CONTENT_FILTER
            out.stop_reason = message
            held = stop_reason.startswith(HELD_MARKER)
            _count_delivered(self, stop_reason, held, delivered_hist)
            if held:
                # blocked before its first token: nothing generated is shown. Its one
                # token is `FirstTokenHolds._end`'s placeholder, which has no logprob: give
                # it an empty one (vLLM's OpenAI server indexes one entry per token)
                out.text = ""
                if out.logprobs is not None:
                    from vllm.logprobs import Logprob

                    out.logprobs = [{t: Logprob(logprob=PLACEHOLDER_LOGPROB, decoded_token="")}
                                    for t in out.token_ids]
        return out

    setattr(_new_completion_output, _MARK, True)
    RequestState._new_completion_output = _new_completion_output  # type: ignore[method-assign]


def delivered_after_crossing(prompt_len: int, n_delivered: int, crossed_at: int) -> int:
    """Generated tokens the client received at positions after the crossing one: the
    last delivered token is at position prompt_len + n_delivered - 1; a crossing in the
    prompt counts every delivered token."""
    return min(n_delivered, max(0, prompt_len + n_delivered - 1 - crossed_at))


def _delivered_histogram() -> Any:
    """`safety_monitor_block_tokens_delivered_after_crossing{detector}` in the default
    registry (vLLM's `/metrics` in the API server), created once."""
    from prometheus_client import REGISTRY, Histogram

    name = "safety_monitor_block_tokens_delivered_after_crossing"
    existing = getattr(REGISTRY, "_names_to_collectors", {})
    if name in existing:
        return existing[name]
    return Histogram(name, "Generated tokens a blocked request's client RECEIVED after the "
                     "crossing token (vLLM's frontend; the sidecar's "
                     "safety_monitor_block_tokens_after_crossing counts generated ones).",
                     ["detector"], buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64))


def _count_delivered(state: Any, stop_reason: str, held: bool, hist: Any) -> None:
    """Log and observe what the client of a blocked request received after the crossing
    (frontend: `state` is vLLM's `RequestState`; nothing when the crossing is unknown, e.g.
    a hold that expired under fail closed)."""
    detector, crossed = parse_marker(stop_reason)
    if crossed < 0:
        return
    try:
        n = 0 if held else int(state.detokenizer.num_output_tokens())
        after = delivered_after_crossing(int(state.prompt_len), n, crossed)
    except (AttributeError, TypeError, ValueError):
        return  # another vLLM's RequestState: the finish reason still applies
    hist.labels(detector=detector).observe(after)
    log.info("safety monitor: request %s ended content_filter (detector=%s crossed_at=%d): "
             "tokens_delivered=%d tokens_delivered_after_crossing=%d", state.request_id,
             detector, crossed, n, after)


def install_all() -> None:
    """Install the three seams in this process (each is inert where it does not run)."""
    for fn in (install_worker_hooks, install_engine_core_hooks, install_frontend_hooks):
        try:
            fn()
        except Exception:
            log.exception("safety monitor: enforcement hook %s NOT installed; blocks do not "
                          "take effect through it", fn.__name__)
