"""The capture custom op, the decoder-layer forward wrapper and the static buffers.

Why a custom op: vLLM compiles the model's forward with torch.compile (Dynamo + Inductor)
unless `enforce_eager=True`. A Python forward hook added after compilation is ignored and
one added before it breaks tracing ("Attempted to call function marked as skipped").
Instead, `wrap_decoder_layers` (called from the wrapped `load_model`, i.e. before any
compilation) replaces each decoder layer's `forward` by a thin wrapper that calls the
original forward and calls `torch.ops.safety_monitor.capture_resid(hidden, residual,
positions, meta, layer, site)` on the layer's input pair (`site` = `SITE_IN`, before the
original forward: the input pair is updated in place by the layer's fused add-RMSNorm)
and on its output pair (`SITE_OUT`). What the pairs mean per architecture is in
`monitor.capture.archs` (input sum = resid_pre; output = (mlp_out, resid_mid), sum =
resid_post). Dynamo traces the wrapper and keeps the op as an opaque node:
at run time the real implementation runs once per layer per forward, in both eager and
compiled mode. The op's schema marks a preallocated buffer as mutated (`Tensor(a!) meta`)
so the compiler can neither drop nor reorder it, and it has a fake (meta) impl for
tracing. It is a plain `torch.library.Library` op with one Python kernel, not a
`torch.library.custom_op` (whose per-call wrappers cost ~10x the kernel: `_define`).

What the implementation does:

- `meta[layer] += 1` (output site only): an op-written per-layer forward counter (int64
  `[n_layers]`), the graph-safe part (a device kernel on CUDA; it would replay inside a
  CUDA graph). It lets the host tell a stale buffer from a fresh one when
  `execute_model` ran no forward.
- CPU (this machine, no CUDA graphs): the Python impl runs eagerly on every call, so it
  hands the pair to the active `LayerSink` (the capture session), which copies the rows
  of the hook points it needs into a host ring slot at once — before the next layer's
  fused add-RMSNorm updates the tensors in place.
- CUDA: a Python impl does not run on CUDA-graph replay. The graph-safe design keeps the
  same op but passes static device buffers —
  `hidden_buf [n_plan_layers, max_num_tokens, d_model]` and `pos_buf [max_num_tokens]` —
  as mutated args, copies into them with device kernels only (no `.item()`, no host
  indexing, no sync), and does the row bookkeeping on the host after `execute_model`
  returns: `meta` tells whether this step's forward ran, `query_start_loc` /
  `input_batch` give the spans, and a side stream copies the kept rows into the pinned
  ring slot with an event the sender waits on. `StaticBuffers` carries those tensors and
  `capture_static` below is that op (`wrap_decoder_layers(..., static=buffers)`); the
  plugin's static capture path (`CaptureSession(static=True)`, `SAFETY_MONITOR_CAPTURE_PATH`)
  uses it. `bench/bench_gpu_capture.py` checks it on a GPU: rows under torch.compile and
  CUDA-graph replay equal eager (part `plugin`: the whole static path).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

log = logging.getLogger("monitor.capture")

OP_NAME = "safety_monitor::capture_resid"
SITE_IN = 0
"""Op site: the decoder layer's input `(hidden_states, residual)` (residual None at layer 0)."""
SITE_OUT = 1
"""Op site: the decoder layer's output `(hidden, residual)`."""


class LayerSink(Protocol):
    """Receiver of the residual stream, called inside the forward pass (model thread)."""

    def on_layer(
        self,
        layer: int,
        site: int,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> None:
        """`hidden`, `residual`: `[num_tokens, d_model]` (residual None only at `SITE_IN` of
        layer 0); `site`: `SITE_IN` / `SITE_OUT`; `positions`: int64 `[num_tokens]`."""


PROFILE = os.environ.get("SAFETY_MONITOR_PROFILE", "").strip() not in ("", "0")
"""`SAFETY_MONITOR_PROFILE=1`: time each capture stage (two `perf_counter_ns` per timed
call, ~0.1 us) into `PROF`, reported in the plugin's stats (`profile`)."""


@dataclass
class Profile:
    """Cumulative host time per capture stage, in ns, with call counts (when `PROFILE`).

    Thread rule: each field has one writer — `op_*` and `layout_*` the model thread
    (inside the forward pass), `encode_*` and `server_*` the sender thread; readers may
    see a slightly stale value (ints under the GIL, never torn).

    Attributes:
        op_calls / op_ns: op implementation calls and wall time (meta bump + the sink's
            copies + opening the step, i.e. everything the capture adds on the model thread).
        op_cpu_ns: the same calls' CPU time of the model thread (`thread_time_ns`);
            `op_ns - op_cpu_ns` is time the model thread waited inside the op (for the GIL
            held by the sender / gRPC threads, or preempted by other processes).
        layout_calls / layout_ns: `StepTracker.layout` (row selection, once per step;
            included in op_ns).
        encode_steps / encode_frames / encode_ns: sender thread, ring slot -> protobuf.
        server_msgs / server_ns: sender thread, verdicts and errors coming back.
        step_calls / step_ns / step_cpu_ns: model thread, wall and CPU time from one
            step's opening (first wrapped site) to the next; `step_ns - step_cpu_ns` is
            all the time the model thread was not running in a step (GIL waits and
            preemption anywhere in the forward, not only in the op, plus vLLM's own
            waits between steps), the denominator of the op's share.
    """

    op_calls: int = 0
    op_ns: int = 0
    op_cpu_ns: int = 0
    layout_calls: int = 0
    layout_ns: int = 0
    encode_steps: int = 0
    encode_frames: int = 0
    encode_ns: int = 0
    server_msgs: int = 0
    server_ns: int = 0
    step_calls: int = 0
    step_ns: int = 0
    step_cpu_ns: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)


PROF = Profile()
"""The process-wide profile (written only when `PROFILE`)."""

_sink: LayerSink | None = None
_sink_errors = 0


def set_sink(sink: LayerSink | None) -> None:
    """Install the process-wide sink the op forwards to (None: op only bumps `meta`)."""
    global _sink
    _sink = sink


def sink_errors() -> int:
    """Exceptions raised by the sink and swallowed by the op (inference never fails)."""
    return _sink_errors


_meta_np: tuple[torch.Tensor, np.ndarray] | None = None
"""(meta, its numpy view) of the last CPU counter `_bump` saw."""


def _bump(meta: torch.Tensor, layer: int) -> None:
    """`meta[layer] += 1`. A CPU counter is bumped through a cached numpy view of its
    memory (~0.3 us; three tensor calls, ~5 us, otherwise); any other device (CUDA: a
    kernel, graph-safe) through the tensor. Model thread only."""
    global _meta_np
    cached = _meta_np
    if cached is not None and cached[0] is meta:
        cached[1][layer] += 1
    elif meta.device.type == "cpu" and meta.is_contiguous() and not meta.requires_grad:
        arr = meta.numpy()
        _meta_np = (meta, arr)
        arr[layer] += 1
    else:
        meta[layer] += 1


def _capture_resid_impl(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    meta: torch.Tensor,
    layer: int,
    site: int,
) -> None:
    global _sink_errors
    t0 = time.perf_counter_ns() if PROFILE else 0
    c0 = time.thread_time_ns() if PROFILE else 0
    if site == SITE_OUT:
        _bump(meta, layer)
    sink = _sink
    if sink is not None:
        try:
            sink.on_layer(layer, site, hidden, residual, positions)
        except Exception:  # capture must never fail inference
            _sink_errors += 1
            if _sink_errors == 1 or _sink_errors % 1000 == 0:
                log.exception("safety monitor: capture failed at layer %d (%d errors so far); "
                              "inference continues", layer, _sink_errors)
    if PROFILE:
        PROF.op_calls += 1
        PROF.op_cpu_ns += time.thread_time_ns() - c0
        PROF.op_ns += time.perf_counter_ns() - t0


def _registered(qualname: str) -> Any:
    """The op `ns::name` if this process registered it already, else None."""
    ns, name = qualname.split("::")
    existing = getattr(getattr(torch.ops, ns), name, None) if hasattr(torch.ops, ns) else None
    if existing is not None:
        try:
            existing.default  # noqa: B018 - resolves only when registered
            return existing
        except (AttributeError, RuntimeError):
            pass
    return None


_LIB: torch.library.Library | None = None
"""The `safety_monitor` op library; kept alive here (a dropped Library deregisters its ops)."""


def _no_output(*args: Any) -> None:
    """Fake (meta) implementation of both ops: they return nothing and only mutate."""
    return None


def _define(qualname: str, schema: str, impl: Callable[..., None]) -> Any:
    """Register `qualname` once per process (the module may be imported repeatedly).

    A plain `torch.library.Library` definition with one Python kernel under
    `CompositeExplicitAutograd` (every backend) and a fake impl for tracing, not
    `torch.library.custom_op`: the latter's per-call Python wrappers (autograd,
    ADInplaceOrView and backend kernels, each a Python frame plus a redispatch, and a
    `torch._dynamo.disable` frame) cost ~30 us per call on this CPU against ~4 us for this
    (`python bench/bench_capture_op.py --op-only`). The op stays an opaque node to Dynamo
    (an `OpOverload` with a fake impl), and the `(a!)` annotations in `schema` declare the
    mutated buffers as `mutates_args` did, so functionalization keeps and orders the call.
    No autograd kernel: the op returns nothing and runs under `no_grad` / `inference_mode`;
    the version counter of a mutated buffer is not bumped (nothing reads it).
    """
    existing = _registered(qualname)
    if existing is not None:
        return existing
    global _LIB
    ns, name = qualname.split("::")
    if _LIB is None:
        _LIB = torch.library.Library(ns, "FRAGMENT")
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, _no_output, lib=_LIB)
    return getattr(getattr(torch.ops, ns), name)


capture_resid = _define(
    OP_NAME, "(Tensor hidden, Tensor? residual, Tensor positions, Tensor(a!) meta, int layer, "
    "int site) -> ()", _capture_resid_impl)

STATIC_OP_NAME = "safety_monitor::capture_static"


def _capture_static_impl(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    buf: torch.Tensor,
    pos_buf: torch.Tensor,
    meta: torch.Tensor,
    layer: int,
    site: int,
    slot: int,
) -> None:
    """Graph-safe capture (the CUDA design): device kernels only, no host work, no sync.

    `buf[slot, :n] = hidden (+ residual)` (`n = hidden.shape[0]`, written in place with
    `torch.add(out=)`: no allocation), `pos_buf[:n] = positions`, `meta[layer] += 1` at
    `SITE_OUT` (as `capture_resid`).
    Shapes: `buf [n_slots, max_num_tokens, d_model]` (any float dtype; the sum is computed
    in the inputs' dtype), `pos_buf` int64 `[max_num_tokens]`, `meta` int64 `[n_layers]`.
    Because every effect is a kernel on tensors whose addresses never change, the op
    replays inside a CUDA graph; the host reads `buf`/`pos_buf` after the step (after
    `meta` says the forward ran) with an asynchronous copy into a pinned ring slot.
    """
    n = hidden.shape[0]
    if n > buf.shape[1]:  # static shapes: a graph never sees this; eager callers are told
        raise ValueError(f"capture_static: num_tokens {n} > buffer rows {buf.shape[1]}")
    if residual is None:
        buf[slot, :n].copy_(hidden)
    else:
        torch.add(hidden, residual, out=buf[slot, :n])
    pos_buf[:n].copy_(positions)
    if site == SITE_OUT:
        meta[layer] += 1


capture_static = _define(
    STATIC_OP_NAME, "(Tensor hidden, Tensor? residual, Tensor positions, Tensor(a!) buf, "
    "Tensor(b!) pos_buf, Tensor(c!) meta, int layer, int site, int slot) -> ()",
    _capture_static_impl)


class StaticBuffers:
    """Preallocated, address-stable buffers the op mutates.

    Attributes:
        meta: int64 `[n_layers]` per-layer forward counter written by the op.
        (CUDA design, allocated when `n_plan_layers` and `max_num_tokens` are given —
        on CUDA, or on CPU for tests and benchmarks of the graph-safe op:)
        hidden: `[n_plan_layers, max_num_tokens, d_model]` static copy target, one slot
            per captured (layer, site) (`slots`, filled by `wrap_decoder_layers`).
        positions: int64 `[max_num_tokens]` static copy of the positions.
        slots: (layer, site) → slot index in `hidden`.
    """

    def __init__(
        self,
        n_layers: int,
        *,
        device: torch.device | str = "cpu",
        n_plan_layers: int = 0,
        max_num_tokens: int = 0,
        d_model: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        device = torch.device(device)
        self.meta = torch.zeros(n_layers, dtype=torch.int64, device=device)
        self.hidden: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.slots: dict[tuple[int, int], int] = {}
        if n_plan_layers and max_num_tokens:
            self.hidden = torch.empty((n_plan_layers, max_num_tokens, d_model), dtype=dtype,
                                      device=device)
            self.positions = torch.empty(max_num_tokens, dtype=torch.int64, device=device)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layer list of a vLLM text model (`model.model.layers` and variants)."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers",
                 "transformer.h", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    return None


_WRAPPED = "_safety_monitor_layer"


ALL_SITES = frozenset({SITE_IN, SITE_OUT})


def wrap_decoder_layers(
    layers: nn.ModuleList,
    wanted: dict[int, frozenset[int]] | None,
    meta: torch.Tensor,
    static: StaticBuffers | None = None,
) -> dict[int, frozenset[int]]:
    """Wrap the forward of the wanted decoder layers; idempotent.

    Args:
        layers: the model's decoder layers (an architecture `monitor.capture.archs` knows).
        wanted: layer index → op sites to call (`SITE_IN`, `SITE_OUT`); None: every layer,
            both sites.
        meta: the op's int64 `[n_layers]` counter.
        static: None: call `capture_resid` (the host sink copies the rows; the CPU path).
            Given (with `hidden` allocated): call the graph-safe `capture_static` instead,
            which copies each (layer, site) into its own slot of `static.hidden` (slots
            assigned in (layer, site) order, recorded in `static.slots`); raises
            ValueError when the wanted sites need more slots than `static.hidden` has.

    The wrapper calls the op on the input pair (`SITE_IN`), then the original
    `forward(positions, hidden_states, residual, ...)`, then the op on the returned
    `(hidden, residual)` (`SITE_OUT`). A layer is wrapped once: a later call with other
    sites keeps the first wrapping. Layers that are absent on this pipeline stage
    (`PPMissingLayer`, no parameters) are skipped.

    Returns:
        Layer index (model-global) → sites, for the layers wrapped by this or an earlier call.
    """
    done: dict[int, frozenset[int]] = {}
    hbuf: torch.Tensor | None = None
    pbuf: torch.Tensor | None = None
    slots: dict[tuple[int, int], int] = {}
    if static is not None:
        if static.hidden is None or static.positions is None:
            raise ValueError("wrap_decoder_layers: static buffers have no hidden/positions "
                             "(give n_plan_layers and max_num_tokens)")
        want_sites = sorted((i, s) for i in range(len(layers))
                            for s in (ALL_SITES if wanted is None else wanted.get(i, ())))
        need = len(set(want_sites) | set(static.slots))
        if need > static.hidden.shape[0]:
            raise ValueError(f"wrap_decoder_layers: static slots: expected >= {need}, "
                             f"found {static.hidden.shape[0]}")
        for key in want_sites:
            static.slots.setdefault(key, len(static.slots))
        hbuf, pbuf, slots = static.hidden, static.positions, static.slots
    def _call(h: torch.Tensor, r: torch.Tensor | None, pos: torch.Tensor, i: int,
              site: int) -> None:
        if static is None:
            torch.ops.safety_monitor.capture_resid(h, r, pos, meta, i, site)
        else:
            torch.ops.safety_monitor.capture_static(h, r, pos, hbuf, pbuf, meta, i, site,
                                                    slots[(i, site)])

    for i, layer in enumerate(layers):
        sites = ALL_SITES if wanted is None else wanted.get(i)
        if not sites:
            continue
        if type(layer).__name__ == "PPMissingLayer":
            continue
        prev = getattr(layer, _WRAPPED, None)
        if prev is not None:
            done[i] = prev
            continue
        orig = layer.forward
        pre, post = SITE_IN in sites, SITE_OUT in sites

        def forward(
            positions: torch.Tensor,
            hidden_states: torch.Tensor,
            residual: torch.Tensor | None,
            *args: Any,
            _orig: Any = orig,
            _i: int = i,
            _pre: bool = pre,
            _post: bool = post,
            **kwargs: Any,
        ) -> Any:
            if _pre:
                _call(hidden_states, residual, positions, _i, SITE_IN)
            out = _orig(positions, hidden_states, residual, *args, **kwargs)
            if _post:
                _call(out[0], out[1], positions, _i, SITE_OUT)
            return out

        layer.forward = forward
        setattr(layer, _WRAPPED, frozenset(sites))
        done[i] = frozenset(sites)
    return done
