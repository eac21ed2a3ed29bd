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

import collections
import copy
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.v1 import monitor_pb2

log = logging.getLogger("monitor.capture")

#: Prefix of `Request.stop_reason` of a blocked request (engine core → frontend).
BLOCK_MARKER = "safety_monitor:block"
#: Attribute of a `ModelRunnerOutput` carrying block orders (worker → engine core).
ORDERS_ATTR = "_safety_monitor_blocks"
#: The OpenAI finish reason of a blocked response.
CONTENT_FILTER = "content_filter"
#: Default `stop_reason` text shown to the client (SAFETY_MONITOR_BLOCK_MESSAGE).
DEFAULT_MESSAGE = "The response was stopped by the safety monitor."
_MARK = "_safety_monitor_enforce"


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


class BlockBoard:
    """Block orders waiting in the worker for the next step output (thread-safe).

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
            for rid in [r for r in self._orders if r not in live]:
                del self._orders[rid]

    def take(self) -> list[BlockOrder]:
        """All queued orders (empty list fast when none)."""
        if not self._orders:
            return []
        with self._lock:
            out = list(self._orders.values())
            self._orders.clear()
            return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"blocks_ordered": self.ordered, "blocks_refused_full": self.refused_full,
                    "blocks_unresolved": self.unresolved,
                    "blocks_duplicate": self.duplicates}


def attach(output: Any, orders: list[BlockOrder]) -> Any:
    """`output` carrying `orders` (a copy when it is vLLM's shared empty output)."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy.copy(output)
    prior = getattr(output, ORDERS_ATTR, None) or []
    setattr(output, ORDERS_ATTR, [*prior, *orders])
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
        request.stop_reason = f"{BLOCK_MARKER} detector={o.detector}"
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
        return orig_update(self, scheduler_output, model_runner_output)

    setattr(update_from_output, _MARK, True)
    cls.update_from_output = update_from_output  # type: ignore[method-assign]  # the patch


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
                orders = session.blocks.take()
                return attach(out, orders) if orders else out

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

    @functools.wraps(orig)
    def _new_completion_output(self: Any, token_ids: list[int], finish_reason: Any,
                               stop_reason: int | str | None) -> Any:
        out = orig(self, token_ids, finish_reason, stop_reason)
        if (finish_reason is not None and isinstance(stop_reason, str)
                and stop_reason.startswith(BLOCK_MARKER)):
            out.finish_reason = CONTENT_FILTER
            out.stop_reason = message
        return out

    setattr(_new_completion_output, _MARK, True)
    RequestState._new_completion_output = _new_completion_output  # type: ignore[method-assign]


def install_all() -> None:
    """Install the three seams in this process (each is inert where it does not run)."""
    for fn in (install_worker_hooks, install_engine_core_hooks, install_frontend_hooks):
        try:
            fn()
        except Exception:
            log.exception("safety monitor: enforcement hook %s NOT installed; blocks do not "
                          "take effect through it", fn.__name__)
