"""vLLM general plugin: capture the residual stream and stream it to the monitor sidecar.

Registered as the `vllm.general_plugins` entry point `safety_monitor_capture`. vLLM calls
`register()` in every process it starts (frontend, EngineCore, workers), possibly several
times; registration is idempotent and gated on `SAFETY_MONITOR_ADDR` (unset → nothing).

The one seam: `register()` wraps `load_model` of vLLM's V1 model runners
(`GPUModelRunner` and `CPUModelRunner`, whose `load_model` does not call `super()`).
After the original `load_model` has built the model — before torch.compile traces it —
the wrapper installs a `CaptureSession` on that runner: it checks that the model's
architecture is one whose decoder-layer output it can map to hook points
(`monitor.capture.archs`; any other is refused with an ERROR naming it), fetches the
capture plan, wraps the decoder layers' `forward` (see `monitor.capture.op`) and starts
the sender.
Nothing else in vLLM is patched.

Capture happens on one rank only: tensor-parallel rank 0 of each pipeline stage (the
hidden states after a decoder layer are all-reduced, so every TP rank holds the same
rows); other ranks log that they do not send.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from monitor.capture.archs import UnsupportedArchitecture, check_architecture
from monitor.capture.config import CaptureConfig
from monitor.capture.enforce import BlockBoard, BlockOrder, HoldSettings, install_all, is_block
from monitor.capture.gate import fail_mode
from monitor.capture.op import (
    PROF,
    PROFILE,
    SITE_IN,
    SITE_OUT,
    StaticBuffers,
    find_decoder_layers,
    set_sink,
    sink_errors,
    wrap_decoder_layers,
)
from monitor.capture.sender import ProcessTransport
from monitor.capture.steps import SpanTuple, StepLayout, StepTracker
from monitor.capture.threads import (
    Placement,
    apply_switch_interval,
    config_fallbacks,
    place_current_thread,
    run_placed,
)
from monitor.capture.transport import HostRing, Plan, StepRecord, Transport
from monitor.roles import ChatTemplateError, RoleSegmenter
from monitor.v1 import monitor_pb2
from monitor.wire.hooks import HookPoint

log = logging.getLogger("monitor.capture")

_registered = False
_MARK = "_safety_monitor_wrapped"


# What each hook kind reads from the op's pair at its site (see monitor.capture.archs):
# SITE_IN (hidden_states, residual) of layer L: resid_pre = hidden + residual;
# SITE_OUT (hidden, residual) of layer L: mlp_out = hidden, resid_mid = residual,
# resid_post = hidden + residual.
_SITE_OF_KIND = {"resid_pre": SITE_IN, "resid_mid": SITE_OUT, "mlp_out": SITE_OUT,
                 "resid_post": SITE_OUT}


def site_of(hp: HookPoint) -> tuple[int, int]:
    """`(layer, op site)` where hook point `hp` is read; orders as the forward pass runs."""
    return hp.layer, _SITE_OF_KIND[hp.kind]


def plan_sites(points: tuple[HookPoint, ...]) -> dict[int, frozenset[int]]:
    """Layer -> op sites the hook points `points` are read at (what to wrap)."""
    sites: dict[int, set[int]] = {}
    for hp in points:
        layer, site = site_of(hp)
        sites.setdefault(layer, set()).add(site)
    return {k: frozenset(v) for k, v in sites.items()}


#: One hook point read at an op site: (ring index k, first operand is the residual (else
#: hidden), add the residual to it). resid_pre / resid_post = hidden + residual,
#: mlp_out = hidden, resid_mid = residual.
_Read = tuple[int, bool, bool]
_READ_OF_KIND = {"resid_pre": (False, True), "resid_post": (False, True),
                 "mlp_out": (False, False), "resid_mid": (True, False)}


@dataclass
class _PlanState:
    """A plan as installed in the session: ring, and per op call the hook points read
    there (`_Read`)."""

    plan: Plan
    ring: HostRing
    at: dict[tuple[int, int], list[_Read]]
    last: tuple[int, int]
    static: _StaticPlan | None = None


@dataclass
class _StaticPlan:
    """What the static capture path needs per plan (see `CaptureSession.after_step`).

    Attributes:
        slots: per plan hook point k, its slot in `StaticBuffers.hidden`.
        ran_dev: int64 `[ring slots, n_layers]` on the model's device: per ring slot, how
            much `meta` grew during that step's `execute_model` (written on the side stream).
        ran_host: the same on the host (pinned on CUDA), read by the sender thread.
        pos_host: int64 `[ring slots, max_rows]` host copy of the kept rows' positions.
    """

    slots: list[int]
    ran_dev: torch.Tensor
    ran_host: torch.Tensor
    pos_host: torch.Tensor


@dataclass
class _OpenStep:
    """One step between its first wrapped site and its last plan hook point; what each op
    call needs is decided here once (every site of a forward has the same row count)."""

    state: _PlanState
    rec: StepRecord
    n: int  # kept rows
    index: torch.Tensor | None  # int64 [n] row indices when not rows [0, n)
    narrow: bool  # the forward has more rows than the kept prefix [0, n)
    dst: list[torch.Tensor]  # per hook point, the slot's [n, d_model] destination


def copy_rows(dst: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None) -> None:
    """`dst = first (+ second)`, the sum computed in `dst`'s dtype.

    Shapes: all `[n, d_model]`. One tensor call when every dtype equals `dst`'s
    (`torch.add(out=)`: the same rounded opmath sum as copy-then-add, bit for bit);
    otherwise copy then add in place, so that bf16 inputs summed into a float32 `dst`
    are widened exactly first and added in float32 (never rounded to bf16 on the way).
    """
    if second is None:
        dst.copy_(first)
    elif first.dtype == dst.dtype and second.dtype == dst.dtype:
        torch.add(first, second, out=dst)
    else:
        dst.copy_(first)
        dst.add_(second)


def _row_index(layout: StepLayout) -> torch.Tensor | None:
    """int64 `[n_rows]` indices of the kept rows of a forward, None when they are rows
    `[0, n_rows)` (`layout.contiguous`: a narrow, no gather)."""
    if layout.contiguous:
        return None
    return torch.from_numpy(
        np.concatenate([np.arange(a, b) for a, b in layout.ranges]).astype(np.int64))


def _static_check(ran: torch.Tensor, pos: torch.Tensor, spans: list[SpanTuple]) -> str | None:
    """Sender thread, static path, once the slot's copies are done: why the step must be
    dropped, or None. `ran`: int64 `[n_layers]` growth of `meta` during the step's
    `execute_model` (all zero: no forward ran, the buffers hold an older step's rows);
    `pos`: int64 positions of the kept rows, which must be each span's
    `start_position + [0, n_rows)` (else the rows are not this step's layout's)."""
    if not bool(ran.any()):
        return "no forward ran in the step"
    want = np.concatenate([np.arange(s[2], s[2] + s[1], dtype=np.int64) for s in spans])
    if not np.array_equal(pos[: want.size].numpy(), want):
        return "positions in the static buffer do not match the step layout"
    return None


def wrap_execute_model(runner: Any, session: CaptureSession) -> None:
    """Static path: wrap this runner's `execute_model` (an instance attribute over the
    class's, which `monitor.capture.enforce` may have wrapped: both run) so that
    `session.before_step` runs before it and `session.after_step` after it returns, on
    the model thread. An exception in either is logged (first, then every 1000th),
    counted (`hook_errors`) and swallowed: inference never fails for capture."""
    orig = runner.execute_model

    def _guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            session.hook_errors += 1
            if session.hook_errors == 1 or session.hook_errors % 1000 == 0:
                log.exception("safety monitor: static capture step hook failed (%d errors "
                              "so far); inference continues", session.hook_errors)

    @functools.wraps(orig)
    def execute_model(*args: Any, **kwargs: Any) -> Any:
        _guarded(session.before_step)
        out = orig(*args, **kwargs)
        _guarded(session.after_step)
        return out

    setattr(execute_model, _MARK, True)
    runner.execute_model = execute_model


class CaptureSession:
    """Capture state of one model runner (one worker process).

    Called by the op at every wrapped site of every forward (`on_layer`). A step opens at
    the first wrapped site (layout from `StepTracker`, ring slot acquired), each plan hook
    point copies its kept rows (cast to the plan dtype) into its block of the slot, and the
    step is submitted to the transport after the last plan hook point.

    Args:
        runner: the vLLM model runner.
        cfg: plugin configuration.
        model_name: model identity sent to the sidecar.
        d_model: hidden size; n_layers: decoder layers of the model.
        max_rows: `max_num_batched_tokens` (rows of one forward at most).
        wrapped: decoder layer → op sites its wrapped forward calls.
        segmenter: token roles of each request's prompt (`load_segmenter`); None labels
            every prompt token OTHER.
        placement: where the plugin's threads run (`monitor.capture.threads`); None:
            where they start.
        static: the static capture path (`SAFETY_MONITOR_CAPTURE_PATH`): the layers are
            wrapped with the graph-safe op `capture_static` (`wrap_layers`) and the rows
            are gathered after each `execute_model` (`before_step` / `after_step`, called by
            the wrapper `wrap_execute_model` installs) instead of by `on_layer`.

    Static path, per step (model thread, no host sync; CUDA: `side` stream):
    `before_step`: a plan the sender validated (`set_plan` off the model thread with new
    buffers to allocate) is installed; the current stream waits for the previous step's
    copies (they read the static buffers the forward overwrites); `meta_before = meta`.
    `after_step`: layout and ring slot as `on_layer`'s first site does; on the side
    stream, after the current stream's work: `ran_dev[slot] = meta - meta_before`, the
    kept rows of each plan point (`narrow` or `index_select` of `hidden[plan slot]`, cast
    to the plan dtype) and their positions copied (`non_blocking`) into the pinned ring
    slot, `ran_host[slot]`, `pos_host[slot]`; an event recorded in the `StepRecord`. The
    sender thread waits on it, then drops (counted) a step in which no forward ran (`ran`
    all zero) or whose positions are not the layout's (`_static_check`), else sends it as
    `on_layer` would.
    On CPU the copies are synchronous and the event is None.
    """

    def __init__(
        self,
        runner: Any,
        cfg: CaptureConfig,
        *,
        model_name: str,
        d_model: int,
        n_layers: int,
        max_rows: int,
        max_model_len: int | None = None,
        segmenter: RoleSegmenter | None = None,
        placement: Placement | None = None,
        static: bool = False,
    ) -> None:
        self.runner = runner
        self.static = static
        self.placement = placement
        self.cfg = cfg
        self.model_name = model_name
        self.d_model = d_model
        self.n_layers = n_layers
        self.max_rows = max_rows
        self.wrapped: dict[int, frozenset[int]] = {}
        self.first_site = (0, SITE_IN)
        self.segmenter = segmenter
        self.tracker = StepTracker(runner, max_model_len,
                                   segmenter.segment if segmenter is not None else None)
        kind: type[Transport] = Transport
        if cfg.sender in ("process", "auto") and not static:
            kind = ProcessTransport
        elif cfg.sender == "process":
            log.warning("safety monitor: SAFETY_MONITOR_SENDER=process supports the host "
                        "capture path only; the static path sends from a worker thread")
        self.sender = "process" if kind is ProcessTransport else "thread"
        self.transport = kind(cfg, model_name, on_plan=self.set_plan,
                              on_verdict=self.on_verdict,
                              on_judged_through=self.on_judged_through, placement=placement)
        self.blocks = BlockBoard()
        self.buffers = StaticBuffers(n_layers)
        self.device = torch.device("cpu")
        self._meta_before: torch.Tensor | None = None  # static path: meta at step entry
        self._side: torch.cuda.Stream | None = None  # static path on CUDA: copy stream
        self._last_copy: torch.cuda.Event | None = None  # its event of the last step
        self.hook_errors = 0  # static path: exceptions in before_step / after_step
        self._model_thread: int | None = None  # static path: `threading.get_ident()`
        self._pending_plan: Plan | None = None  # static path: validated, to install
        self._state: _PlanState | None = None
        self._open: _OpenStep | None = None
        self.step = 0
        self.steps_sent = 0
        self.steps_no_plan = 0
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self._stats_path = cfg.stats_file
        # model-thread clocks at the previous step's opening (profile: step_*)
        self._step_t = self._step_c = 0

    # ---------------------------------------------------------------- plan
    def set_plan(self, plan: Plan) -> None:
        """Validate and install a plan (called at start-up and on every (re)connect).

        Raises ValueError (logged once by the sender, counted in `plans_refused`, retried
        at every reconnect; vLLM keeps serving, unmonitored) when the plan is for another
        model identity, hidden size or depth (`Plan.n_layers`, when the server states it),
        or needs hook points whose layer / op site is not wrapped.
        """
        if plan.model != self.model_name:
            raise ValueError(
                f"capture plan is for model {plan.model!r} but vLLM serves {self.model_name!r}; "
                "set SAFETY_MONITOR_MODEL to the model identity the bundle was trained on")
        if plan.d_model != self.d_model:
            raise ValueError(f"capture plan d_model: expected {self.d_model} (hidden size of "
                             f"the served model), found {plan.d_model}")
        if plan.n_layers and plan.n_layers != self.n_layers:
            raise ValueError(f"capture plan model_n_layers: expected {self.n_layers} (decoder "
                             f"layers of the served model), found {plan.n_layers} (the bundle "
                             f"was trained on a model of another depth)")
        beyond = [hp.name for hp in plan.points if hp.layer >= self.n_layers]
        if beyond:
            raise ValueError(f"capture plan needs hook points {beyond} but the model has "
                             f"{self.n_layers} layers (0..{self.n_layers - 1})")
        missing = [hp.name for hp in plan.points
                   if site_of(hp)[1] not in self.wrapped.get(hp.layer, ())]
        if missing or not plan.points:
            raise ValueError(
                f"capture plan needs hook points {missing or '(none)'} that are not wrapped on "
                f"this worker (wrapped layers {sorted(self.wrapped)}, model has "
                f"{self.n_layers}); restart vLLM with the sidecar up (or "
                "SAFETY_MONITOR_WRAP=all) to capture them")
        if self.static:
            sums = [hp.name for hp in plan.points if hp.kind not in ("resid_pre", "resid_post")]
            if sums:
                raise ValueError(
                    f"capture plan needs hook points {sums} that the static capture path does "
                    "not capture (it keeps hidden + residual sums: resid_pre, resid_post); "
                    "set SAFETY_MONITOR_CAPTURE_PATH=host (with vLLM --enforce-eager on a "
                    "GPU) to capture them")
        cur = self._state
        reuse = cur is not None and cur.plan.points == plan.points \
            and cur.plan.dtype == plan.dtype
        if self.static and not reuse and threading.get_ident() != self._model_thread:
            # new pinned / device buffers: allocated by the model thread only (`before_step`),
            # never while vLLM may be recording CUDA graphs on it (an allocation from
            # another thread during a capture fails it)
            self._pending_plan = plan
            log.info("safety monitor: capture plan %s validated; installed by the model "
                     "thread at its next step", plan.plan_id)
            return
        if reuse and cur is not None:
            ring = cur.ring
        else:
            ring = self.transport.make_ring(slots=self.cfg.ring_slots, budget_mb=self.cfg.ring_mb,
                                  n_layers=len(plan.points), max_rows=self.max_rows,
                                  d_model=self.d_model, dtype=plan.dtype,
                                  pin=self.device.type == "cuda")
        at: dict[tuple[int, int], list[_Read]] = {}
        for k, hp in enumerate(plan.points):
            at.setdefault(site_of(hp), []).append((k, *_READ_OF_KIND[hp.kind]))
        static = None
        if self.static:
            if cur is not None and cur.ring is ring and cur.static is not None:
                static = cur.static
            else:
                pin = self.device.type == "cuda"
                static = _StaticPlan(
                    slots=[self.buffers.slots[site_of(hp)] for hp in plan.points],
                    ran_dev=torch.zeros((ring.n_slots, self.n_layers), dtype=torch.int64,
                                        device=self.device),
                    ran_host=torch.zeros((ring.n_slots, self.n_layers), dtype=torch.int64,
                                         pin_memory=pin),
                    pos_host=torch.zeros((ring.n_slots, self.max_rows), dtype=torch.int64,
                                         pin_memory=pin))
        self._state = _PlanState(plan, ring, at, max(at), static)
        try:
            mode = fail_mode() or plan.fail_mode
        except ValueError as e:
            log.error("safety monitor: %s; the plan's fail mode %s applies", e, plan.fail_mode)
            mode = plan.fail_mode
        self.blocks.set_hold(HoldSettings(
            hold_ms=plan.prompt_hold_ms or (plan.hold_bound_ms if plan.holdback >= 0 else 0),
            fail_mode=mode, prompt_hold=plan.prompt_hold_ms > 0, holdback=plan.holdback))
        log.info("safety monitor: capture plan installed: %s; ring %d slots x [%d hooks, %d "
                 "rows, %d] = %.1f MiB", plan.describe(), ring.n_slots, ring.n_layers,
                 ring.max_rows, ring.d_model, ring.nbytes / 2**20)

    # ---------------------------------------------------------------- enforcement
    def on_verdict(self, v: monitor_pb2.Verdict) -> None:
        """Sender thread: queue a block order for a block verdict (`monitor.capture.enforce`).

        The verdict's `request_id` is the engine request id (the key on the wire); one
        that is not a live request of this worker (finished, or never seen here) is
        counted (`blocks_unresolved`) and logged, never guessed. The correlation id is a
        label for logs only.
        """
        if not is_block(v):
            return
        with self.tracker._lock:
            live = v.request_id in self.tracker.requests
        if not live:
            self.blocks.count_unresolved()
            log.warning("safety monitor: block verdict for request %r (detector %s) names no "
                        "live request here; not applied", v.request_id, v.detector)
            return
        rid = v.request_id
        if self.blocks.put(BlockOrder(request_id=rid, label=v.correlation_id, detector=v.detector,
                                      score=float(v.score),
                                      crossed_at_position=int(v.crossed_at_position))):
            log.info("safety monitor: block ordered for request %s (detector %s, score %.3f, "
                     "crossed at %d)", rid, v.detector, v.score, v.crossed_at_position)

    def on_judged_through(self, m: monitor_pb2.JudgedThrough) -> None:
        """Sender thread: the sidecar judged request `m.request_id` through `m.position`
        (prompt-time blocking); carried to the engine core with the next step output."""
        self.blocks.judged(m.request_id, int(m.position))

    # ---------------------------------------------------------------- op callback
    def on_layer(
        self,
        layer: int,
        site: int,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> None:
        """Op callback (model thread). Shapes: `[num_tokens, d_model]`, positions `[num_tokens]`;
        `residual` is None only at the input of layer 0 (the stream is `hidden` then)."""
        where = (layer, site)
        if where == self.first_site:
            self._open_step(hidden.shape[0], positions)
        op = self._open
        if op is None:
            return
        todo = op.state.at.get(where)
        if todo is None:
            return
        # the kept rows with the fewest tensor calls (each costs µs on a cold cache): a
        # decode step keeps rows [0, n) of an unpadded forward, i.e. the tensors as they are
        n, index, narrow, dst = op.n, op.index, op.narrow, op.dst
        for k, from_residual, plus_residual in todo:
            first = residual if from_residual else hidden
            if first is None:  # resid_mid has a residual at every SITE_OUT; defensive
                continue
            second = residual if plus_residual else None
            if index is not None:
                first = first.index_select(0, index)
                second = second.index_select(0, index) if second is not None else None
            elif narrow:
                first = first.narrow(0, 0, n)
                second = second.narrow(0, 0, n) if second is not None else None
            copy_rows(dst[k], first, second)
        if where == op.state.last:
            self._open = None
            if self.transport.submit_step(op.rec):
                self.steps_sent += 1

    def _open_step(self, n_tokens: int, positions: torch.Tensor) -> None:
        if self._open is not None:  # previous forward never reached its last layer
            self.transport.drop_record(self._open.rec, "incomplete forward")
            self._open = None
        if PROFILE:  # the model thread's wall / CPU from one step's opening to the next
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            if self._step_t:
                PROF.step_calls += 1
                PROF.step_ns += t - self._step_t
                PROF.step_cpu_ns += c - self._step_c
            self._step_t, self._step_c = t, c
        pos = positions.numpy() if positions.is_cpu else None
        if pos is not None and pos.ndim != 1:
            pos = None
        got = self._begin_step(n_tokens, pos)
        if got is None:
            return
        st, layout, rec = got
        n = layout.n_rows
        index = _row_index(layout)
        views = st.ring.rows[rec.slot]
        self._open = _OpenStep(st, rec, n, index, index is None and n != n_tokens,
                               views if n == st.ring.max_rows
                               else [v.narrow(0, 0, n) for v in views])

    def _begin_step(self, n_tokens: int, pos: np.ndarray | None
                    ) -> tuple[_PlanState, StepLayout, StepRecord] | None:
        """Model thread, once per step: count it, report finished requests, lay out its
        rows and take a ring slot for them. None (counted when rows are lost) when there
        is nothing to capture: no plan yet, no kept rows, no free slot, not connected.

        Args:
            n_tokens: rows of the forward (padding included; static path: buffer rows).
            pos: int64 `[n_tokens]` positions the forward received (host), or None.
        """
        self.step += 1
        self._flush_finished()
        st = self._state
        if st is None:
            layout = self.tracker.layout(n_tokens, pos)
            if layout is not None and layout.n_rows:
                self.steps_no_plan += 1
                self.transport.count_drop(1, layout.n_rows, 0, "no capture plan yet")
            return None
        plan = st.plan
        layout = self.tracker.layout(n_tokens, pos, prompt=plan.prompt, generated=plan.generated,
                                     roles=plan.roles)
        if layout is None or layout.n_rows == 0:
            return None
        connected = self.transport.connected
        slot = st.ring.acquire() if connected else None
        if slot is None:
            n_l = len(plan.points)
            rows = layout.n_rows * n_l  # one frame per plan hook point
            self.transport.count_drop(n_l, rows, rows * self.d_model * st.ring.itemsize,
                                      "ring full (sidecar slow)" if connected
                                      else "sidecar not connected")
            return None
        rec = StepRecord(ring=st.ring, slot=slot, step=self.step, plan_id=plan.plan_id,
                         model=self.model_name, points=plan.points, n_rows=layout.n_rows,
                         spans=layout.spans, max_frame_bytes=plan.max_frame_bytes,
                         labels=layout.labels)
        return st, layout, rec

    # ---------------------------------------------------------------- static path
    def wrap_layers(self, layers: nn.ModuleList, wanted: dict[int, frozenset[int]] | None,
                    *, device: torch.device, dtype: torch.dtype) -> None:
        """Wrap the decoder layers (`wanted`: layer -> op sites, None: all) with this
        session's op: `capture_resid` (host path) or, when `static`, `capture_static`
        over new `StaticBuffers` on `device` (`[wrapped sites, max_rows, d_model]` of
        `dtype`, the model's). Static: a plan without any output site also wraps the
        output of its last layer (`meta` is bumped there: it tells that a forward ran)."""
        self.device = torch.device(device)
        self._model_thread = threading.get_ident()
        if not self.static:
            self.wrapped = wrap_decoder_layers(layers, wanted, self.buffers.meta)
        else:
            if wanted is not None and wanted and not any(SITE_OUT in v for v in wanted.values()):
                last = max(wanted)
                wanted = {**wanted, last: wanted[last] | {SITE_OUT}}
            n_sites = 2 * len(layers) if wanted is None else sum(len(v) for v in wanted.values())
            self.buffers = StaticBuffers(self.n_layers, device=self.device, n_plan_layers=n_sites,
                                         max_num_tokens=self.max_rows, d_model=self.d_model,
                                         dtype=dtype)
            self._meta_before = torch.zeros_like(self.buffers.meta)
            if self.device.type == "cuda":
                self._side = torch.cuda.Stream(self.device)
            self.wrapped = wrap_decoder_layers(layers, wanted, self.buffers.meta, self.buffers)
            hidden = self.buffers.hidden
            log.info("safety monitor: static capture buffers on %s: [%d sites, %d rows, %d] %s "
                     "= %.1f MiB", self.device, n_sites, self.max_rows, self.d_model, dtype,
                     0 if hidden is None else hidden.numel() * hidden.element_size() / 2**20)
        self.first_site = min((i, min(v)) for i, v in self.wrapped.items()) \
            if self.wrapped else (0, SITE_IN)

    def before_step(self) -> None:
        """Static path, model thread, before `execute_model`: the forward may overwrite
        the static buffers only once the previous step's copies read them (the current
        stream waits on their event: no host sync); `meta_before = meta`."""
        before = self._meta_before
        if before is None:
            return
        pending, self._pending_plan = self._pending_plan, None
        if pending is not None:
            self.set_plan(pending)
        if self._last_copy is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_copy)
        before.copy_(self.buffers.meta)

    def after_step(self) -> None:
        """Static path, model thread, after `execute_model` returned (the runner's step
        state — `input_batch`, `query_start_loc` — is still this step's): queue the copy
        of this step's kept rows into a ring slot and submit the step (class docstring)."""
        before, hidden, positions = self._meta_before, self.buffers.hidden, \
            self.buffers.positions
        if before is None or hidden is None or positions is None:
            return
        got = self._begin_step(self.max_rows, None)
        if got is None:
            return
        st, layout, rec = got
        sp = st.static
        if sp is None:  # set_plan gives every plan one on the static path
            self.transport.drop_record(rec, "no static plan state")
            return
        n, slot = layout.n_rows, rec.slot
        index = _row_index(layout)
        dst = st.ring.buf[slot]
        side = self._side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            idx = index.to(self.device, non_blocking=True) if index is not None else None
            torch.sub(self.buffers.meta, before, out=sp.ran_dev[slot])
            sp.ran_host[slot].copy_(sp.ran_dev[slot], non_blocking=True)
            for k, b in enumerate(sp.slots):
                rows = hidden[b].narrow(0, 0, n) if idx is None else hidden[b].index_select(0, idx)
                if rows.dtype != dst.dtype:
                    rows = rows.to(dst.dtype)
                dst[k, :n].copy_(rows, non_blocking=True)
            pos = positions.narrow(0, 0, n) if idx is None else positions.index_select(0, idx)
            sp.pos_host[slot, :n].copy_(pos, non_blocking=True)
            if side is not None:
                ev = torch.cuda.Event()
                ev.record(side)
                rec.ready = self._last_copy = ev
        rec.check = functools.partial(_static_check, sp.ran_host[slot], sp.pos_host[slot],
                                      layout.spans)
        if self.transport.submit_step(rec):
            self.steps_sent += 1

    # ---------------------------------------------------------------- lifecycle
    def _flush_finished(self) -> None:
        done = self.tracker.collect_finished()
        for msg in done:
            self.transport.submit_finished(msg)
        if done:
            with self.tracker._lock:
                live = set(self.tracker.requests)
            self.blocks.retain(live)

    def start(self) -> None:
        self.transport.start()
        self._janitor = threading.Thread(target=self._janitor_loop,
                                         name="safety-monitor-janitor", daemon=True)
        self._janitor.start()

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self.transport.stats())
        s.update(self.blocks.stats())
        s.update(installed=True, steps=self.step, steps_sent=self.steps_sent,
                 steps_no_plan=self.steps_no_plan,
                 unmapped_steps=self.tracker.unmapped_steps, op_errors=sink_errors(),
                 role_errors=self.tracker.role_errors,
                 generated_count_raised=self.tracker.generated_count_raised,
                 requests_no_chat_roles=self.tracker.requests_no_chat_roles,
                 roles_fallback=bool(self.segmenter is None or not self.segmenter.headers),
                 config_fallbacks=config_fallbacks(), pid=os.getpid(),
                 model_cpus=sorted(self.placement.model_cpus) if self.placement else [],
                 thread_cpus=sorted(self.transport.thread_cpus)
                 if self.transport.thread_cpus is not None else None,
                 capture_path="static" if self.static else "host", sender=self.sender,
                 hook_errors=self.hook_errors,
                 # a device counter is not read here (a sync every second): CPU only
                 layer_calls=self.buffers.meta.tolist() if self.buffers.meta.is_cpu else None)
        if PROFILE:
            s["profile"] = PROF.as_dict()
        return s

    def _janitor_loop(self) -> None:
        """Report requests that finished while no forward ran; dump stats if configured."""
        place_current_thread(self.placement, "safety-monitor-janitor")
        last_dump = 0.0
        while not self._stop.wait(0.25):
            try:
                self._flush_finished()
                now = time.monotonic()
                if self._stats_path and now - last_dump > 1.0:
                    last_dump = now
                    _write_stats(self._stats_path, self.stats())
            except Exception:
                log.exception("safety monitor: janitor error")


# -------------------------------------------------------------------- installation
def _mode(vllm_config: Any) -> str:
    mode = getattr(getattr(vllm_config, "compilation_config", None), "mode", None)
    eager = bool(getattr(vllm_config.model_config, "enforce_eager", False))
    name = getattr(mode, "name", str(mode))
    return "eager" if eager or name == "NONE" else f"compiled ({name})"


def load_segmenter(model_config: Any, chat_template_file: str | None) -> RoleSegmenter:
    """The token-role segmenter of the served model's chat template (never raises).

    Uses the tokenizer vLLM serves (`model_config.tokenizer`) and its own chat template,
    or `chat_template_file`. A template that cannot be analysed, or a tokenizer that
    cannot be loaded, gives a fallback segmenter (every prompt token OTHER) and one
    ERROR naming the template: detectors scoped to chat roles then see no prompt rows.
    """
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(
            model_config.tokenizer, revision=getattr(model_config, "tokenizer_revision", None),
            trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)))
        tpl = None
        if chat_template_file:
            with open(chat_template_file, encoding="utf-8") as f:
                tpl = f.read()
        seg = RoleSegmenter.from_tokenizer(tok, tpl)
    except ChatTemplateError as e:
        log.error("safety monitor: token roles unavailable, every prompt token is labelled "
                  "OTHER: %s", e)
        return RoleSegmenter.fallback(e.template, e.message)
    except Exception as e:
        log.error("safety monitor: token roles unavailable (tokenizer %r), every prompt "
                  "token is labelled OTHER: %s", getattr(model_config, "tokenizer", None), e)
        return RoleSegmenter.fallback("<unloaded>", f"{type(e).__name__}: {e}")
    log.info("safety monitor: token roles from chat template %s", seg.describe())
    return seg


def select_path(setting: str, model: Any, vllm_config: Any) -> tuple[str, str | None]:
    """`("static" | "host", why capture must not be installed or None)` for
    `SAFETY_MONITOR_CAPTURE_PATH=setting` (`auto` | `host` | `static`): `auto` is static on
    a CUDA model, host otherwise; the host path is refused under CUDA graphs
    (`graph_refusal`)."""
    if setting == "static" or (setting == "auto" and _model_device(model).type == "cuda"):
        return "static", None
    why = graph_refusal(model, vllm_config)
    return "host", None if why is None else f"{why} (SAFETY_MONITOR_CAPTURE_PATH={setting})"


def cuda_graphs(vllm_config: Any) -> str | None:
    """How vLLM will run the forward as CUDA graphs (e.g. "cudagraph_mode
    FULL_AND_PIECEWISE"), or None when it will not.

    vLLM 0.32: `model_config.enforce_eager` forces `compilation_config.cudagraph_mode` to
    `CUDAGraphMode.NONE` (`VllmConfig.__post_init__`); any other mode records and replays
    graphs on CUDA. A config without the field (or with it unset) counts as on: vLLM's
    default on CUDA. Only attributes are read (stand-in configs in tests)."""
    if bool(getattr(getattr(vllm_config, "model_config", None), "enforce_eager", False)):
        return None
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if mode is None:
        return "cudagraph_mode unset: vLLM's default on CUDA"
    name = str(getattr(mode, "name", mode)).upper()
    return None if name == "NONE" else f"cudagraph_mode {name}"


def graph_refusal(model: Any, vllm_config: Any) -> str | None:
    """Why the host-sink capture must not be installed on this model, or None.

    On a CUDA device with CUDA graphs on (`cuda_graphs`), `capture_resid`'s Python kernel
    runs only while vLLM records a graph, never when it replays one: decode steps would
    silently not be captured (measured, bench/RESULTS.md "GPU rerun at session 9")."""
    graphs = cuda_graphs(vllm_config)
    if graphs is None or _model_device(model).type != "cuda":
        return None
    return (f"CUDA graphs are on ({graphs}): the host-sink capture op runs only while a "
            "graph is recorded, never on replay, so decode steps would not be captured; "
            "restart vLLM with --enforce-eager, or use the graph-safe static capture path "
            "(SAFETY_MONITOR_CAPTURE_PATH=auto or static)")


def _model_dtype(model: Any) -> torch.dtype:
    """Floating dtype of the model's first parameter (float32 when it has none)."""
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32


def _model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    p = next(params, None)
    return p.device if p is not None else torch.device("cpu")


def _stats_path(cfg: CaptureConfig) -> str | None:
    """This worker's stats file: `cfg.stats_file` on pipeline stage 0, `.pp<k>` on stage k
    (one per capturing worker; the gate reads them all)."""
    if not cfg.stats_file:
        return None
    try:
        from vllm.distributed import get_pp_group

        pp_rank = int(get_pp_group().rank_in_group)
    except Exception:
        pp_rank = 0
    return f"{cfg.stats_file}.pp{pp_rank}" if pp_rank else cfg.stats_file


def _write_stats(path: str, doc: dict[str, Any]) -> None:
    """Replace the stats file `path` with `doc` as JSON atomically (a temporary file of this
    process, then `os.replace`): the gate never reads a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def _refuse(cfg: CaptureConfig, why: str) -> None:
    """Capture is NOT installed on this worker: one ERROR naming `why`, and the stats file
    (when configured) says so — `{"installed": false, "not_installed": why, "pid": ...}` —
    so the API-server gate (`monitor.capture.gate`) reports the worker as unmonitored.
    vLLM keeps serving."""
    log.error("safety monitor: capture is NOT installed (no hidden states will be sent; vLLM "
              "keeps serving, unmonitored): %s", why)
    path = _stats_path(cfg)
    if not path:
        return
    try:
        _write_stats(path, {"installed": False, "not_installed": why, "pid": os.getpid()})
    except OSError as e:
        log.error("safety monitor: cannot write the stats file %s: %s", path, e)


def _install(runner: Any, cfg: CaptureConfig) -> CaptureSession | None:
    """Install capture on a runner whose model was just loaded. Returns the session."""
    if getattr(runner, "_safety_monitor_session", None) is not None:
        return runner._safety_monitor_session
    vc = runner.vllm_config
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        tp_rank = get_tensor_model_parallel_rank()
    except Exception:
        tp_rank = 0
    if tp_rank != 0:
        log.info("safety monitor: TP rank %d does not send (capture runs on TP rank 0)",
                 tp_rank)
        return None
    if getattr(runner, "speculative_config", None) is not None:
        _refuse(cfg, "speculative decoding is on: rejected draft tokens would be reported as "
                "real tokens")
        return None
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    layers = find_decoder_layers(model)
    if layers is None:
        _refuse(cfg, f"cannot find the decoder layers of {type(model).__name__}")
        return None
    try:
        arch = check_architecture(model, layers)
    except UnsupportedArchitecture as e:
        _refuse(cfg, f"unsupported architecture: {e}")
        return None
    device = _model_device(model)
    path, refusal = select_path(cfg.capture_path, model, vc)
    if refusal is not None:
        _refuse(cfg, refusal)
        return None
    static = path == "static"
    mc = vc.model_config
    # on the model thread, after vLLM bound it: where the plugin's threads go, and the
    # interpreter's switch interval (monitor.capture.threads; bad values fall back, counted)
    placement = Placement.plan(cfg.thread_cpus)
    switch_s = apply_switch_interval(cfg.switch_interval_ms)
    name = cfg.model or (mc.served_model_name if isinstance(mc.served_model_name, str)
                         else mc.served_model_name[0])
    session = CaptureSession(
        runner, cfg, model_name=name, d_model=int(mc.get_hidden_size()),
        n_layers=len(layers), max_rows=int(runner.max_num_tokens),
        max_model_len=int(mc.max_model_len),
        segmenter=load_segmenter(mc, cfg.chat_template), placement=placement, static=static,
    )
    session._stats_path = _stats_path(cfg)
    # the first gRPC channel starts gRPC's C-core threads: open it from a placed thread so
    # that they inherit the placed mask, not the model thread's
    plan = run_placed(placement, "safety-monitor-plan",
                      lambda: session.transport.fetch_plan(cfg.plan_timeout_s))
    wrap_all = cfg.wrap_all
    wanted: dict[int, frozenset[int]] | None = None
    if plan is not None and not wrap_all:
        wanted = plan_sites(plan.points)
    session.wrap_layers(layers, wanted, device=device, dtype=_model_dtype(model))
    mode = _mode(vc)
    if plan is None:
        log.warning(
            "safety monitor: sidecar %s unreachable at start-up (waited %.0fs): all %d layers "
            "wrapped, NOTHING is captured until a plan is fetched; every step until then is "
            "dropped and counted. mode=%s", cfg.addr, cfg.plan_timeout_s, len(layers), mode)
    else:
        try:
            session.set_plan(plan)
        except ValueError as e:
            session.transport.refuse_plan(e)
    runner._safety_monitor_session = session
    if static:
        wrap_execute_model(runner, session)
    else:
        set_sink(session)
    session.start()
    st = session._state
    log.info(
        "safety monitor: capture installed (model=%r, arch=%s/%s, mode=%s, path=%s, "
        "wrapped layers=%s, "
        "captured hooks=%s, kinds=%s, max rows/step=%d, sidecar=%s, model thread cpus=%s, "
        "plugin thread placement=%s, switch interval=%s)",
        name, arch.family, arch.model_class, mode, "static" if static else "host",
        sorted(session.wrapped) if len(session.wrapped) < len(layers) else "all",
        [hp.name for hp in st.plan.points] if st else "none yet",
        [k for k, on in (("prompt", st.plan.prompt), ("generated", st.plan.generated)) if on]
        if st else "none yet", session.max_rows, cfg.addr, sorted(placement.model_cpus),
        placement.spec,
        f"{switch_s * 1e3:g} ms" if switch_s is not None else "Python's default")
    return session


def _wrap_load_model(cls: type, cfg: CaptureConfig) -> None:
    orig = cls.__dict__.get("load_model")
    if orig is None or getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        try:
            _install(self, cfg)
        except Exception:
            log.exception("safety monitor: capture NOT installed (inference is unaffected)")
        return out

    setattr(load_model, _MARK, True)
    setattr(cls, "load_model", load_model)  # noqa: B010  (cls is any model-runner class)


def _refuse_v2(cls: type | None) -> None:
    if cls is None:
        return
    orig = cls.__dict__.get("load_model")
    if orig is None or getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        log.error("safety monitor: Model Runner V2 is not supported yet: NOTHING is captured. "
                  "Set VLLM_USE_V2_MODEL_RUNNER=0 to capture.")
        return orig(self, *args, **kwargs)

    setattr(load_model, _MARK, True)
    setattr(cls, "load_model", load_model)  # noqa: B010  (cls is any model-runner class)


def register() -> None:
    """vLLM general-plugin entry point (idempotent, gated on `SAFETY_MONITOR_ADDR`)."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        cfg = CaptureConfig.from_env()
    except ValueError as e:
        log.error("safety monitor: bad configuration, capture disabled: %s", e)
        return
    if cfg is None:
        return
    if not logging.getLogger("monitor").handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        logging.getLogger("monitor").addHandler(h)
    if logging.getLogger("monitor").level == logging.NOTSET:
        logging.getLogger("monitor").setLevel(cfg.log_level.upper())
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap_load_model(GPUModelRunner, cfg)
    try:  # before vLLM starts the EngineCore: it inherits the directory's env var
        from monitor.capture.engine_metrics import register_collector

        register_collector()
    except Exception:
        log.exception("safety monitor: hold/block outcomes will NOT be on /metrics")
    install_all()
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap_load_model(CPUModelRunner, cfg)
    except ImportError:
        pass
    for mod in ("vllm.v1.worker.gpu.model_runner", "vllm.v1.worker.cpu.model_runner"):
        try:
            _refuse_v2(__import__(mod, fromlist=["GPUModelRunner"]).__dict__.get(
                "CPUModelRunner" if "cpu" in mod else "GPUModelRunner"))
        except Exception:
            pass
    log.debug("safety monitor: plugin registered in pid %d (sidecar %s)", os.getpid(), cfg.addr)
