"""Host ring, bounded send queue and the gRPC sender thread of the capture plugin.

Data path (one engine step):

1. The model thread (inside the forward pass) acquires one `HostRing` slot,
   `[n_plan_points, max_rows, d_model]` in the plan's dtype, preallocated from the plan and
   vLLM's `max_num_batched_tokens`, and copies the selected rows of every plan hook point
   (`monitor.wire.hooks`: resid_pre / resid_mid / mlp_out / resid_post of a layer) into it.
2. It hands a `StepRecord` to `Transport.submit_step`, a non-blocking `put_nowait` on a
   bounded queue. No free slot or a full queue → the step is dropped and counted; the
   model thread never waits on the network.
3. The sender thread owns the connection: GetCapturePlan, then one `Stream` call whose
   request iterator sends `ClientHello` first, then `ActivationFrame`s (one per hook point,
   split into chunks below the plan's `max_frame_bytes`), `RequestFinished` and periodic
   `ClientStats`. Sequence numbers start at 1 on every stream and strictly increase.
   The same thread reads the server's messages (verdicts at DEBUG, errors at WARNING).
4. When the sidecar is down or the stream breaks: the queue is drained, every step in it
   is dropped and counted (`dropped_frames`, `dropped_rows` — rows counted per hook-point
   frame —, `dropped_bytes`), and the thread reconnects with exponential backoff
   (`backoff_s` doubling up to `backoff_max_s`). After a reconnect the cumulative
   `ClientStats` is sent right after the hello.
5. Same-pod shared-memory ring (`SAFETY_MONITOR_SHM=1`, `monitor.wire.shm`): the hello
   offers the worker's ring file; once the server answers `ShmAck.ring.accepted`, the
   sender copies each frame's rows into a free ring slot (this thread, never the model
   thread) and the frame carries `ShmRef(slot, sequence, byte_length)` instead of the
   bytes. The server acknowledges every slot it is done with (`ShmAck.slots`); a frame
   finding no free slot is sent with its bytes in `data` instead (counted `shm_full`), so
   a full ring loses nothing: drops happen where they always did, at the bounded queue
   (counted `dropped_*`, per request through the finals). A new stream frees every slot.
   Refused (server without `--shm`, another host) or unanswered (old server): frames carry
   their bytes.
6. `RequestFinished` messages are not dropped with the steps: one that cannot be queued
   (disconnected, queue full) or is still queued when the stream breaks waits in a
   bounded backlog (`finished_backlog`, `SAFETY_MONITOR_FINISHED_BACKLOG`); a full backlog
   drops the new one and counts it (`dropped_finished`). The backlog is sent right after
   the hello of the next stream (the sidecar, even a restarted one, then writes those
   requests' finals with their missing positions counted), and while connected whenever
   the queue runs empty: every frame queued before a finish is sent before it.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from monitor.capture import op
from monitor.capture.config import CaptureConfig
from monitor.capture.projection import WorkerProjection
from monitor.capture.steps import SpanTuple
from monitor.capture.threads import Placement, place_current_thread
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import WIRE_VERSION, encode_frame
from monitor.wire.hooks import HookPoint, parse_hook_name, resid_post
from monitor.wire.shm import ShmRingWriter

log = logging.getLogger("monitor.capture")

_TORCH_DTYPE = {
    monitor_pb2.DTYPE_FLOAT32: torch.float32,
    monitor_pb2.DTYPE_FLOAT16: torch.float16,
    monitor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
}
_DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024
_FRAME_OVERHEAD_BYTES = 64 * 1024  # proto framing + spans headroom under max_frame_bytes
_GRPC_MAX_MSG = 256 * 1024 * 1024



#: Random per plugin process (`ClientHello.instance_id`): with the client id it names this
#: process's requests on the sidecar, so a reconnect of this process (and no other
#: client) carries on the requests of a broken stream.
INSTANCE_ID = uuid.uuid4().hex


@dataclass(frozen=True)
class Plan:
    """A validated `CapturePlan` as the plugin uses it.

    Attributes:
        plan_id: the sidecar's plan id (sent back in `ClientHello`).
        model: model identity the plan is for.
        d_model: hidden size.
        n_layers: decoder layers of the model the bundle was trained on (0: the server did
            not say, as before `CapturePlan.model_n_layers`).
        points: hook points to capture, in forward order (from `hook_names`, else
            resid_post of every entry of `layers`).
        layers: decoder layers the points read, sorted, unique.
        prompt / generated: which token kinds any detector reads.
        roles: which `TokenRole`s any detector reads (None: every role of the kinds).
        dtype: dtype of the rows on the wire (`preferred_dtype`, else float32).
        max_frame_bytes: frames are split by rows to stay below this (payload bytes).
        prompt_hold_ms: `Enforcement.prompt_hold_ms` (0: no first-token hold).
        holdback: `Enforcement.holdback_tokens` under strict streaming, else -1 (off).
        hold_bound_ms: `Enforcement.hold_bound_ms` (the bound under strict streaming).
        fail_mode: `Enforcement.fail_mode` ("open" when unset or unknown).
    """

    plan_id: str
    model: str
    d_model: int
    points: tuple[HookPoint, ...]
    layers: tuple[int, ...]
    prompt: bool
    generated: bool
    dtype: torch.dtype
    max_frame_bytes: int
    roles: frozenset[int] | None = None
    n_layers: int = 0
    prompt_hold_ms: int = 0
    fail_mode: str = "open"
    holdback: int = -1
    hold_bound_ms: int = 0
    #: in-worker projection per hook point name (`CapturePlan.projections`, each validated;
    #: one that fails validation or names a hook point outside `points` is left out and
    #: logged: its rows go raw)
    projections: dict[str, WorkerProjection] = field(default_factory=dict, compare=False)
    #: the `CapturePlan` as serialized by the server (the process sender hands it to the
    #: worker, `monitor.capture.sender`); b"" for a plan built in code
    proto: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def from_proto(cls, p: monitor_pb2.CapturePlan) -> Plan:
        """Raises ValueError naming the field when a hook name does not parse."""
        if p.hook_names:
            points = tuple(sorted({parse_hook_name(h, field=f"CapturePlan.hook_names[{i}]")
                                   for i, h in enumerate(p.hook_names)}))
        else:
            points = tuple(resid_post(int(i)) for i in sorted(set(p.layers)))
        kinds = set(p.token_kinds)
        if not kinds or monitor_pb2.TOKEN_KIND_UNSPECIFIED in kinds:
            kinds = {monitor_pb2.TOKEN_KIND_PROMPT, monitor_pb2.TOKEN_KIND_GENERATED}
        return cls(
            plan_id=p.plan_id,
            model=p.model,
            d_model=int(p.d_model),
            points=points,
            layers=tuple(sorted({hp.layer for hp in points})),
            prompt=monitor_pb2.TOKEN_KIND_PROMPT in kinds,
            generated=monitor_pb2.TOKEN_KIND_GENERATED in kinds,
            dtype=_TORCH_DTYPE.get(p.preferred_dtype, torch.float32),
            max_frame_bytes=int(p.max_frame_bytes) or _DEFAULT_MAX_FRAME_BYTES,
            roles=frozenset(int(r) for r in p.token_roles if r) or None,
            n_layers=max(0, int(p.model_n_layers)),
            prompt_hold_ms=int(p.enforcement.prompt_hold_ms),
            holdback=(int(p.enforcement.holdback_tokens) if p.enforcement.strict_streaming
                      else -1),
            hold_bound_ms=int(p.enforcement.hold_bound_ms),
            fail_mode="closed" if p.enforcement.fail_mode == "closed" else "open",
            projections=_projections(p, {hp.name for hp in points}),
            proto=p.SerializeToString(),
        )

    def describe(self) -> str:
        proj = (f" projected={sorted(self.projections)}" if self.projections else "")
        kinds = [k for k, on in (("prompt", self.prompt), ("generated", self.generated)) if on]
        roles = "all" if self.roles is None else sorted(
            monitor_pb2.TokenRole.Name(r).removeprefix("TOKEN_ROLE_").lower()
            for r in self.roles)
        return (
            f"plan {self.plan_id!r} model={self.model!r} "
            f"hooks={[hp.name for hp in self.points]} "
            f"kinds={kinds} roles={roles} dtype={str(self.dtype).removeprefix('torch.')}"
            f"{proj}"
        )


def _projections(p: monitor_pb2.CapturePlan, points: set[str]) -> dict[str, WorkerProjection]:
    """The plan's valid projections by hook point; invalid ones are logged and left out
    (those hook points are sent as hidden states, which the server always accepts)."""
    out: dict[str, WorkerProjection] = {}
    for i, hp in enumerate(p.projections):
        try:
            wp = WorkerProjection.from_proto(hp, int(p.d_model), f"CapturePlan.projections[{i}]")
            if wp.hook_name not in points:
                raise ValueError(f"CapturePlan.projections[{i}].hook_name: expected one of "
                                 f"{sorted(points)}, found {wp.hook_name!r}")
        except ValueError as e:
            log.warning("safety monitor: projection refused, sending hidden states: %s", e)
            continue
        out[wp.hook_name] = wp
    return out


class HostRing:
    """Preallocated host staging buffers, one slot per engine step.

    `buf` is `[n_slots, n_layers, max_rows, d_model]` (`dtype`, host memory; pinned when
    `pin` so a CUDA side stream can copy into it asynchronously). Slots are handed out by
    `acquire` (non-blocking) and returned by `release`; both are thread-safe.
    `rows[slot][k]` is the `[max_rows, d_model]` view of hook point `k` in `slot`, made
    once here so the model thread takes no view per copy.
    `buf`, when given, is that storage already allocated (a shared mapping:
    `monitor.capture.sender.SharedHostRing`); its shape and dtype are checked.
    """

    def __init__(
        self,
        n_slots: int,
        n_layers: int,
        max_rows: int,
        d_model: int,
        dtype: torch.dtype,
        *,
        pin: bool = False,
        buf: torch.Tensor | None = None,
    ) -> None:
        self.n_slots = n_slots
        self.n_layers = n_layers
        self.max_rows = max_rows
        self.d_model = d_model
        self.dtype = dtype
        shape = (n_slots, n_layers, max_rows, d_model)
        if buf is not None and (tuple(buf.shape) != shape or buf.dtype != dtype):
            raise ValueError(f"HostRing buf: expected {shape} {dtype}, found "
                             f"{tuple(buf.shape)} {buf.dtype}")
        self.buf = buf if buf is not None else torch.empty(shape, dtype=dtype, pin_memory=pin)
        self.itemsize = self.buf.element_size()
        self.rows: list[list[torch.Tensor]] = [list(self.buf[i].unbind(0))
                                               for i in range(n_slots)]
        self._free: collections.deque[int] = collections.deque(range(n_slots))
        self._lock = threading.Lock()

    @staticmethod
    def fit_slots(*, slots: int, budget_mb: int, n_layers: int, max_rows: int, d_model: int,
                  dtype: torch.dtype) -> int:
        """Up to `slots` slots of `[n_layers, max_rows, d_model]` `dtype`, fewer if they
        would exceed `budget_mb` (min 1)."""
        slot_bytes = n_layers * max_rows * d_model * torch.finfo(dtype).bits // 8
        return min(slots, max(1, (budget_mb * 1024 * 1024) // max(1, slot_bytes)))

    @classmethod
    def sized(
        cls,
        *,
        slots: int,
        budget_mb: int,
        n_layers: int,
        max_rows: int,
        d_model: int,
        dtype: torch.dtype,
        pin: bool = False,
    ) -> HostRing:
        """A ring of `fit_slots` slots."""
        n = cls.fit_slots(slots=slots, budget_mb=budget_mb, n_layers=n_layers,
                          max_rows=max_rows, d_model=d_model, dtype=dtype)
        return cls(n, n_layers, max_rows, d_model, dtype, pin=pin)

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def acquire(self) -> int | None:
        """A free slot index, or None when all slots are in flight (never blocks)."""
        with self._lock:
            return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def view(self, slot: int) -> torch.Tensor:
        """`[n_layers, max_rows, d_model]` view of one slot."""
        return self.buf[slot]


@dataclass
class StepRecord:
    """Rows captured in one engine step, waiting in a ring slot.

    `ring.view(slot)[k, :n_rows]` holds hook point `points[k]`; `spans` are
    `(request_id, n_rows, start_position, prompt_len)` in row order, summing to `n_rows`.
    """

    ring: HostRing
    slot: int
    step: int
    plan_id: str
    model: str
    points: tuple[HookPoint, ...]
    n_rows: int
    spans: list[SpanTuple]
    max_frame_bytes: int = _DEFAULT_MAX_FRAME_BYTES
    released: bool = field(default=False)
    labels: dict[str, str] = field(default_factory=dict)  # request id -> correlation id
    #: static capture path on CUDA: the side-stream event after which the slot holds the
    #: rows (None: the rows were copied synchronously, as on CPU)
    ready: torch.cuda.Event | None = None
    #: static capture path: run after `ready`, a reason to drop the step (e.g. no forward
    #: ran) or None; reads only the slot's host copies
    check: Callable[[], str | None] | None = None

    def settle(self) -> str | None:
        """Sender thread: wait until the slot holds this step's rows (`ready`), then a
        reason to drop the step (`check`), or None to send it."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.check() if self.check is not None else None

    @property
    def row_bytes(self) -> int:
        return self.ring.d_model * self.ring.buf.element_size()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ring.release(self.slot)


def split_spans(
    spans: list[SpanTuple], chunk_rows: int
) -> list[tuple[int, int, list[SpanTuple]]]:
    """Cut row-ordered spans into chunks of at most `chunk_rows` rows.

    Returns `(row_start, row_end, spans_of_chunk)` per chunk; a span crossing a chunk
    boundary is split and its second part's `start_position` advanced accordingly.
    """
    out: list[tuple[int, int, list[SpanTuple]]] = []
    cur: list[SpanTuple] = []
    row = start = 0
    for rid, n, pos, plen, role in spans:
        off = 0
        while off < n:
            room = chunk_rows - (row - start)
            take = min(room, n - off)
            cur.append((rid, take, pos + off, plen, role))
            off += take
            row += take
            if row - start == chunk_rows:
                out.append((start, row, cur))
                cur, start = [], row
    if cur:
        out.append((start, row, cur))
    return out


def build_frame(
    x: torch.Tensor,
    *,
    seq: int,
    model: str,
    layer: int,
    spans: list[SpanTuple],
    step: int,
    hook_name: str = "",
    labels: dict[str, str] | None = None,
    projection: str = "",
    shm: monitor_pb2.ShmRef | None = None,
) -> monitor_pb2.ActivationFrame:
    """One `ActivationFrame` from `x` `[n_rows, d_model]` (host tensor) and its spans
    (`monitor.wire.codec.encode_frame`, the one encoder); `labels` maps a request id to the
    caller's correlation id (`RowSpan.correlation_id`); `projection` names the projection
    version when `x` holds projected rows; `shm`: `x`'s bytes are in that ring slot (the
    frame carries no data)."""
    lab = labels or {}
    pb_spans = [monitor_pb2.RowSpan(request_id=r, n_rows=n, start_position=p, prompt_len=pl,
                                    role=role,  # type: ignore[arg-type]
                                    correlation_id=lab.get(r, ""))
                for r, n, p, pl, role in spans]
    return encode_frame(x, seq=seq, model=model, layer=layer, spans=pb_spans, step=step,
                        hook_name=hook_name, projection=projection, shm=shm)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (TLS or plaintext channels)."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = [*(details.metadata or ()), self._md]
        return _CallDetails(details.method, details.timeout, md, details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_stream(self, continuation, client_call_details,
                                request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


def open_channel(cfg: CaptureConfig,
                 options: list[tuple[str, int | str]] | None = None) -> grpc.Channel:
    """A channel to `cfg.addr`: TLS when `cfg.tls_ca` (client certificate when
    `cfg.tls_cert`), plaintext otherwise; the bearer token on every call when set."""
    opts: list[tuple[str, int | str]] = list(options or [])
    if cfg.tls_ca is not None:
        with open(cfg.tls_ca, "rb") as f:
            ca = f.read()
        key = chain = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            with open(cfg.tls_cert, "rb") as f:
                chain = f.read()
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
        if cfg.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=chain)
        channel = grpc.secure_channel(cfg.addr, creds, options=opts)
    else:
        channel = grpc.insecure_channel(cfg.addr, options=opts)
    if cfg.token:
        channel = grpc.intercept_channel(channel, _BearerToken(cfg.token))
    return channel


class Transport:
    """Bounded queue + sender thread + reconnecting gRPC stream to the sidecar.

    Thread-safety: `submit_step`, `submit_finished`, `count_drop` and `stats` may be
    called from any thread; they never block on the network.

    Args:
        cfg: plugin configuration (address, queue size, backoff).
        model: model identity for `ClientHello` (frames carry the record's own `model`).
        on_plan: called in the sender thread with every plan fetched (at each connect),
            before the stream starts; it may raise to refuse the plan (no stream then).
        on_verdict: called in the sender thread with every verdict received (must not
            block; errors are logged, the stream goes on).
        on_judged_through: likewise with every `JudgedThrough` progress message.
        on_state: called in the sender thread with True when a stream starts and False
            when it ends (the process sender tells the worker, `monitor.capture.sender`).
        placement: where the sender thread (and the gRPC threads it starts) runs
            (`monitor.capture.threads`); None: where it starts.
    """

    def __init__(
        self,
        cfg: CaptureConfig,
        model: str,
        *,
        on_plan: Callable[[Plan], None] | None = None,
        on_verdict: Callable[[monitor_pb2.Verdict], None] | None = None,
        on_judged_through: Callable[[monitor_pb2.JudgedThrough], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_state = on_state
        #: `ClientHello.instance_id` (a process sender carries its worker's across restarts)
        self.instance_id = INSTANCE_ID
        self.model = model
        self.on_plan = on_plan
        self.on_verdict = on_verdict
        self.on_judged_through = on_judged_through
        self.placement = placement
        #: the sender thread's CPUs once it moved (`placement`); None: not moved
        self.thread_cpus: frozenset[int] | None = None
        self.plan: Plan | None = None
        #: steps and finishes for the sender, at most cfg.queue_size (`_put`): a C-level
        #: SimpleQueue, one call per put on the model thread (queue.Queue's put runs ~30
        #: lines of Python under a Condition)
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._put_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._ever_connected = False
        self._last_gap_log = 0.0
        #: RequestFinished not sent yet (oldest first, at most cfg.finished_backlog); lock
        self._backlog: collections.deque[monitor_pb2.RequestFinished] = collections.deque()
        # cumulative counters (monotonic)
        self.dropped_frames = 0
        self.dropped_rows = 0
        self.dropped_bytes = 0
        self.dropped_finished = 0
        self.reconnects = 0
        self.sent_frames = 0
        self.sent_rows = 0
        self.sent_bytes = 0
        self.verdicts = 0
        self.stream_errors = 0
        self.plans_refused = 0  # plans refused (`refuse_plan`; each fetch counts once)
        self._last_refusal = ""
        #: the shared-memory ring (cfg.shm; created at the first plan, None when off or
        #: when it could not be created)
        self.shm: ShmRingWriter | None = None
        self._shm_failed = False
        #: set while the current stream's server accepted the ring
        self._shm_on = threading.Event()
        self.shm_frames = 0  # frames sent through the ring
        self.shm_full = 0  # frames sent as bytes for want of a free slot
        self.shm_refused = 0  # ring offers the server refused (reason logged)
        #: drops counted by the worker of a process sender (`add_worker_drops`): reported
        #: to the sidecar in `ClientStats`, kept out of `stats()` (the worker counts them)
        self._worker_drops = (0, 0, 0)

    # ---------------------------------------------------------------- producer side
    def start(self) -> None:
        """Start the sender thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="safety-monitor-sender", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.shm is not None:
            self.shm.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def count_drop(self, frames: int, rows: int, nbytes: int, why: str = "") -> None:
        """Account for data that will never be sent (thread-safe)."""
        with self._lock:
            self.dropped_frames += frames
            self.dropped_rows += rows
            self.dropped_bytes += nbytes
        now = time.monotonic()
        if now - self._last_gap_log > 10.0:
            self._last_gap_log = now
            log.warning(
                "safety monitor: capture gap (%s): dropped so far frames=%d rows=%d bytes=%d "
                "(sidecar %s at %s)",
                why or "dropped", self.dropped_frames, self.dropped_rows, self.dropped_bytes,
                "connected" if self.connected else "NOT connected", self.cfg.addr,
            )

    def drop_record(self, rec: StepRecord, why: str) -> None:
        n_points = len(rec.points)
        self.count_drop(n_points, rec.n_rows * n_points, rec.n_rows * n_points * rec.row_bytes,
                        why)
        rec.release()

    def submit_step(self, rec: StepRecord) -> bool:
        """Queue a step for sending; False (and counted as dropped) when it cannot be."""
        if not self.connected:
            self.drop_record(rec, "sidecar not connected")
            return False
        if self._put(rec):
            return True
        self.drop_record(rec, "send queue full")
        return False

    def _put(self, item: object) -> bool:
        """Queue `item` unless `cfg.queue_size` items wait already; never blocks."""
        with self._put_lock:
            if self._q.qsize() >= self.cfg.queue_size:
                return False
            self._q.put(item)
            return True

    def submit_finished(self, msg: monitor_pb2.RequestFinished) -> bool:
        """Queue a RequestFinished, or keep it in the backlog when disconnected or the
        queue is full (sent later, see the module docstring). False only when the
        backlog is full too: dropped and counted (`dropped_finished`). Thread-safe."""
        if self.connected:
            with self._lock:
                # behind a backlog, a finish waits its turn (finishes stay in order)
                direct = not self._backlog
            if direct and self._put(msg):
                return True
        return self._keep_finished(msg)

    def _keep_finished(self, msg: monitor_pb2.RequestFinished) -> bool:
        with self._lock:
            if len(self._backlog) >= self.cfg.finished_backlog:
                self.dropped_finished += 1
                return False
            self._backlog.append(msg)
            return True

    def _take_backlog(self) -> list[monitor_pb2.RequestFinished]:
        with self._lock:
            out = list(self._backlog)
            self._backlog.clear()
            return out

    def stats(self) -> dict[str, int | bool]:
        with self._lock:
            return {
                "connected": self.connected,
                "dropped_frames": self.dropped_frames,
                "dropped_rows": self.dropped_rows,
                "dropped_bytes": self.dropped_bytes,
                "dropped_finished": self.dropped_finished,
                "finished_backlog": len(self._backlog),
                "reconnects": self.reconnects,
                "sent_frames": self.sent_frames,
                "sent_rows": self.sent_rows,
                "sent_bytes": self.sent_bytes,
                "verdicts": self.verdicts,
                "stream_errors": self.stream_errors,
                "plans_refused": self.plans_refused,
                "shm_frames": self.shm_frames,
                "shm_full": self.shm_full,
                "shm_refused": self.shm_refused,
                "queued": self._q.qsize(),  # read by the API-server gate (behind bound)
            }

    def refuse_plan(self, e: ValueError) -> None:
        """Count a refused capture plan and log why (ERROR; once per distinct reason, as
        the sender refetches it at every reconnect). Thread-safe."""
        with self._lock:
            self.plans_refused += 1
            if str(e) == self._last_refusal:
                return
            self._last_refusal = str(e)
        log.error("safety monitor: capture plan refused, NOTHING is captured (vLLM keeps "
                  "serving, unmonitored): %s", e)

    def add_worker_drops(self, frames: int, rows: int, nbytes: int) -> None:
        """Process sender, child side: drops the worker counted (ring full, socket full,
        sender down), added to the `ClientStats` sent to the sidecar. Thread-safe."""
        with self._lock:
            f, r, b = self._worker_drops
            self._worker_drops = (f + frames, r + rows, b + nbytes)

    def make_ring(self, *, slots: int, budget_mb: int, n_layers: int, max_rows: int,
                  d_model: int, dtype: torch.dtype, pin: bool = False) -> HostRing:
        """The host ring for a plan (`HostRing.sized`); the process sender's lives in
        memory its child maps (`monitor.capture.sender`)."""
        return HostRing.sized(slots=slots, budget_mb=budget_mb, n_layers=n_layers,
                              max_rows=max_rows, d_model=d_model, dtype=dtype, pin=pin)

    def _client_stats(self) -> monitor_pb2.ClientStats:
        with self._lock:
            wf, wr, wb = self._worker_drops
            return monitor_pb2.ClientStats(
                dropped_frames=self.dropped_frames + wf, dropped_rows=self.dropped_rows + wr,
                dropped_bytes=self.dropped_bytes + wb, reconnects=self.reconnects,
            )

    # ---------------------------------------------------------------- plan
    def fetch_plan(self, timeout: float) -> Plan | None:
        """GetCapturePlan once, waiting up to `timeout` s for the sidecar; None if down."""
        channel = self._channel()
        try:
            grpc.channel_ready_future(channel).result(timeout=max(0.01, timeout))
            stub = monitor_pb2_grpc.MonitorStub(channel)
            p = stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=max(1.0, timeout))
            return Plan.from_proto(p)
        except (grpc.RpcError, grpc.FutureTimeoutError):
            return None
        except ValueError as e:
            self.refuse_plan(e)
            return None
        finally:
            channel.close()

    def _channel(self) -> grpc.Channel:
        return open_channel(self.cfg, [
            ("grpc.max_send_message_length", _GRPC_MAX_MSG),
            ("grpc.max_receive_message_length", _GRPC_MAX_MSG),
            ("grpc.enable_retries", 0),
        ])

    # ---------------------------------------------------------------- sender thread
    def _drain_dropping(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, StepRecord):
                self.drop_record(item, "sidecar not connected")
            elif isinstance(item, monitor_pb2.RequestFinished):
                self._keep_finished(item)  # sent after the reconnect

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self._drain_dropping()
            self._stop.wait(min(0.05, max(0.0, end - time.monotonic())))

    def _run(self) -> None:
        self.thread_cpus = place_current_thread(self.placement, "safety-monitor-sender")
        backoff = self.cfg.backoff_s
        failures = 0
        while not self._stop.is_set():
            channel = self._channel()
            dead = threading.Event()
            try:
                grpc.channel_ready_future(channel).result(timeout=max(0.5, backoff))
                stub = monitor_pb2_grpc.MonitorStub(channel)
                plan = Plan.from_proto(
                    stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=5.0)
                )
                if self.on_plan is not None:
                    self.on_plan(plan)
                self.plan = plan
                self._ensure_shm(plan)
                with self._lock:
                    self._last_refusal = ""
                if self._ever_connected:
                    with self._lock:
                        self.reconnects += 1
                self._ever_connected = True
                self._connected.set()
                if self.on_state is not None:
                    self.on_state(True)
                log.info("safety monitor: connected to sidecar %s (%s)", self.cfg.addr,
                         plan.describe())
                failures, backoff = 0, self.cfg.backoff_s
                self._shm_on.clear()
                if self.shm is not None:
                    self.shm.reset()  # the old stream's frames are gone: every slot free
                responses = stub.Stream(self._outbound(plan, dead))
                for msg in responses:
                    self._on_server_message(msg)
                log.warning("safety monitor: sidecar %s closed the stream", self.cfg.addr)
            except grpc.FutureTimeoutError:
                failures += 1
            except ValueError as e:  # plan refused by on_plan: say why, retry later
                failures += 1
                self.refuse_plan(e)
            except grpc.RpcError as e:
                failures += 1
                if self.connected:
                    log.warning("safety monitor: stream to %s broke: %s", self.cfg.addr,
                                e.code() if hasattr(e, "code") else e)
            except Exception:  # never let the sender die: log and retry
                failures += 1
                log.exception("safety monitor: sender error")
            finally:
                was = self.connected
                self._connected.clear()
                if was and self.on_state is not None:
                    self.on_state(False)
                self._shm_on.clear()
                dead.set()
                channel.close()
                if was:
                    log.warning("safety monitor: disconnected from %s; capture dropped and "
                                "counted until reconnect", self.cfg.addr)
            if failures == 1 or failures % 20 == 0:
                log.warning("safety monitor: sidecar %s unreachable (attempt %d); retrying "
                            "with backoff %.2fs", self.cfg.addr, failures, backoff)
            self._sleep(backoff)
            backoff = min(backoff * 2, self.cfg.backoff_max_s)

    def _ensure_shm(self, plan: Plan) -> None:
        """Create the ring once (cfg.shm), with slots of at most the plan's frame size; a
        plan with a smaller `max_frame_bytes` gets a new ring. Failure: logged once, bytes
        in frames."""
        if not self.cfg.shm or self._shm_failed:
            return
        slot_bytes = min(self.cfg.shm_slot_mb << 20, plan.max_frame_bytes)
        if self.shm is not None:
            if self.shm.slot_bytes <= slot_bytes:
                return
            self.shm.close()
        try:
            self.shm = ShmRingWriter(self.cfg.shm_dir, self.cfg.shm_slots, slot_bytes,
                                     mode=self.cfg.shm_mode)
        except OSError as e:
            self._shm_failed = True
            self.shm = None
            log.warning("safety monitor: shared-memory ring not created in %s (%s); frames "
                        "carry their bytes", self.cfg.shm_dir, e)
            return
        atexit.register(self.shm.close)
        log.info("safety monitor: shared-memory ring %s (%d slots x %d bytes)",
                 self.shm.path, self.shm.n_slots, self.shm.slot_bytes)

    def _on_shm_ack(self, ack: monitor_pb2.ShmAck) -> None:
        ring = self.shm
        if ack.HasField("ring"):
            if ack.ring.accepted and ring is not None:
                self._shm_on.set()
                log.info("safety monitor: sidecar reads frames from the shared-memory ring")
            else:
                with self._lock:
                    self.shm_refused += 1
                log.warning("safety monitor: sidecar refused the shared-memory ring, frames "
                            "carry their bytes: %s", ack.ring.reason)
        if ring is not None:
            for slot, sequence in zip(ack.slots, ack.sequences, strict=False):
                ring.release(int(slot), int(sequence))

    def _on_server_message(self, msg: monitor_pb2.ServerMessage) -> None:
        if not op.PROFILE:
            self._handle_server_message(msg)
            return
        t0 = time.perf_counter_ns()
        self._handle_server_message(msg)
        op.PROF.server_msgs += 1
        op.PROF.server_ns += time.perf_counter_ns() - t0

    def _handle_server_message(self, msg: monitor_pb2.ServerMessage) -> None:
        which = msg.WhichOneof("body")
        if which == "verdict":
            with self._lock:
                self.verdicts += 1
            v = msg.verdict
            log.debug("safety monitor verdict: request=%s detector=%s score=%.3f severity=%d "
                      "final=%s", v.request_id, v.detector, v.score, v.severity, v.final)
            self.deliver(msg)
        elif which == "shm_ack":
            self._on_shm_ack(msg.shm_ack)
        elif which == "judged_through":
            self.deliver(msg)
        elif which == "error":
            with self._lock:
                self.stream_errors += 1
            e = msg.error
            log.warning("safety monitor: sidecar refused a message: reason=%s seq=%d %s",
                        e.reason, e.seq, e.message)

    def deliver(self, msg: monitor_pb2.ServerMessage) -> None:
        """Hand a verdict to `on_verdict` or a `JudgedThrough` to `on_judged_through`
        (nothing is counted here; an error in the handler is logged, never raised)."""
        which = msg.WhichOneof("body")
        try:
            if which == "verdict" and self.on_verdict is not None:
                self.on_verdict(msg.verdict)
            elif which == "judged_through" and self.on_judged_through is not None:
                self.on_judged_through(msg.judged_through)
        except Exception:
            log.exception("safety monitor: %s handler error", which)

    def _to_ring(self, ring: ShmRingWriter, rows: torch.Tensor) -> monitor_pb2.ShmRef | None:
        """Copy `rows` (host, `[n, width]`, at most `slot_bytes`) into a free ring slot; None
        (counted `shm_full`; the frame then carries its bytes) when every slot awaits its
        ack."""
        n_bytes = rows.shape[0] * rows.shape[1] * rows.element_size()
        slot = ring.acquire()
        if slot is None:
            with self._lock:
                self.shm_full += 1
            return None
        payload = rows.contiguous().view(torch.uint8).numpy()
        seq = ring.write(slot, payload)
        return monitor_pb2.ShmRef(slot=slot, sequence=seq, byte_length=n_bytes)

    def _outbound(self, plan: Plan, dead: threading.Event) -> Iterator[monitor_pb2.ClientMessage]:
        """Request iterator of one stream: hello, stats, then frames / finished / stats."""
        seq = 0
        ring = self.shm
        yield monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
            client_id=self.cfg.client_id, model=self.model, plan_id=plan.plan_id,
            wire_version=WIRE_VERSION, instance_id=self.instance_id,
            shm_ring=ring.hello() if ring is not None else None))
        last_stats = self._client_stats()
        if last_stats.dropped_frames or last_stats.reconnects:
            yield monitor_pb2.ClientMessage(stats=last_stats)
        # finishes kept while disconnected: their frames were dropped, nothing precedes them
        for fin in self._take_backlog():
            yield monitor_pb2.ClientMessage(finished=fin)
        next_stats = time.monotonic() + self.cfg.stats_period_s
        while not self._stop.is_set() and not dead.is_set():
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                # the queue ran empty: every frame queued before a kept finish is sent
                for fin in self._take_backlog():
                    yield monitor_pb2.ClientMessage(finished=fin)
                try:
                    item = self._q.get(timeout=0.05)
                except queue.Empty:
                    item = None
            if isinstance(item, StepRecord):
                if item.plan_id != plan.plan_id:
                    self.drop_record(item, "plan changed")
                    continue
                why = item.settle()
                if why is not None:
                    self.drop_record(item, why)
                    continue
                msgs = []
                nbytes = 0  # payload bytes sent (projected frames are smaller)
                sent_rows = n_shm = 0
                t0 = time.perf_counter_ns() if op.PROFILE else 0
                try:
                    chunk_rows = max(1, (item.max_frame_bytes - _FRAME_OVERHEAD_BYTES)
                                     // item.row_bytes)
                    view = item.ring.view(item.slot)
                    for k, hp in enumerate(item.points):
                        wp = plan.projections.get(hp.name)
                        rows = view[k, :item.n_rows]
                        n_chunk = chunk_rows
                        if wp is not None:  # float32 [n_rows, width]: its own chunking
                            rows = wp.project(rows)
                            n_chunk = max(1, (item.max_frame_bytes - _FRAME_OVERHEAD_BYTES)
                                          // (4 * wp.width))
                        row_bytes = rows.shape[1] * rows.element_size()
                        shm = (ring if ring is not None and self._shm_on.is_set()
                               and row_bytes <= ring.slot_bytes else None)
                        if shm is not None:
                            n_chunk = min(n_chunk, shm.slot_bytes // row_bytes)
                        for r0, r1, spans in split_spans(item.spans, n_chunk):
                            ref = None
                            if shm is not None:
                                ref = self._to_ring(shm, rows[r0:r1])
                                n_shm += ref is not None  # None: ring full, bytes in data
                            seq += 1
                            f = build_frame(rows[r0:r1], seq=seq, model=item.model,
                                            layer=hp.layer, spans=spans, step=item.step,
                                            hook_name=hp.name, labels=item.labels,
                                            projection="" if wp is None else wp.version,
                                            shm=ref)
                            nbytes += len(f.data) if ref is None else int(ref.byte_length)
                            sent_rows += r1 - r0
                            msgs.append(monitor_pb2.ClientMessage(frame=f))
                finally:
                    item.release()  # bytes are copied out: the slot is free again
                if op.PROFILE:
                    op.PROF.encode_steps += 1
                    op.PROF.encode_frames += len(msgs)
                    op.PROF.encode_ns += time.perf_counter_ns() - t0
                with self._lock:
                    self.sent_frames += len(msgs)
                    self.sent_rows += sent_rows
                    self.sent_bytes += nbytes
                    self.shm_frames += n_shm
                yield from msgs
            elif isinstance(item, monitor_pb2.RequestFinished):
                yield monitor_pb2.ClientMessage(finished=item)
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + self.cfg.stats_period_s
                cur = self._client_stats()
                if cur != last_stats:
                    last_stats = cur
                    yield monitor_pb2.ClientMessage(stats=cur)
