"""gRPC servicers: `monitor.v1.Monitor` (Stream, GetCapturePlan, Score) and `Admin`.

Stream: one reader task per call decodes and validates client messages and queues
frames into the `Pipeline`; the handler itself is the writer, yielding verdicts
(escalations and finals) and `StreamError`s from the stream's outbound queue. A bad
message gets an in-stream error and the stream stays open. When the client half-closes,
its unfinished requests are finished ("stream_closed"), their final verdicts are sent,
then the call ends with OK. When the stream breaks instead (client gone, transport
error), its unfinished requests are orphaned, not finished: a reconnecting client that
sends frames for them on a new stream carries them on (nothing scored so far is lost);
requests nobody adopts within `orphan_grace_s` are finished with reason "orphaned"
(final verdicts to the audit log and metrics).

Shared-memory ring (`--shm`, `monitor.wire.shm`): a hello offering a ring is answered with
`ShmAck.ring` (accepted: the stream's `StreamHandle.shm` reader; refused: the reason, counted
`shm_ring_refused`, the client keeps sending bytes). A frame naming a ring slot is decoded
like any other with its payload copied from the ring (`decode_frame(shm=...)`, on the decode
pool above `_OFFLOAD_BYTES` claimed), and its slot is acknowledged (`ShmAck.slots`) as soon
as the copy is done or the frame refused, before scoring. The reader is closed when the call
ends.

Size limits: frames whose payload exceeds `max_frame_bytes` get an in-stream
"oversized" error; messages above the gRPC `max_receive_message_length` (set above
`max_frame_bytes`) are refused by the transport, which ends the whole call with
RESOURCE_EXHAUSTED (gRPC's own behaviour, it cannot be answered in-stream).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from monitor.constants import ENGINE_REASONS, FinishReason, Reason, RequestKey
from monitor.judge.tracker import Expected
from monitor.report.metrics import Metrics
from monitor.roles import TokenRole
from monitor.score.backend import FrameScorer
from monitor.server.handlers import Undecodable
from monitor.server.pipeline import Pipeline, QueueFull
from monitor.server.registry import Admission
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import (
    MAX_CORRELATION_ID_BYTES,
    DecodedFrame,
    FrameError,
    ProjectionSpec,
    check_seq,
    decode_frame,
)
from monitor.wire.hooks import hook_key, parse_hook_name
from monitor.wire.shm import ShmRingReader

__all__ = ["AdminService", "FrameLimits", "MonitorService", "StreamHandle", "client_identity"]

log = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]  # 3
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # 8
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]  # 9
#: Frames with a payload above this are decoded off the event loop (the decode pool).
_OFFLOAD_BYTES = 1 << 20
_stream_ids = itertools.count(1)
#: Per ClientStats field (cumulative counters of one client instance): the largest increase
#: accepted in one message, then the largest in a stream's first message, all far below
#: what would poison a Prometheus counter (2^64 - 1 in one message). Within a stream the
#: client sends stats every few seconds: the first bound is far above what it drops
#: between two. A stream's first message covers the time the client was disconnected
#: (a long sidecar outage, everything dropped meanwhile) or, with no baseline for the
#: client (this server's first report of it), the client's whole life: the second bound
#: is a year of dropping ~35k frames, ~9M rows and ~2 GB a second, or ~140 reconnects a
#: second.
_STATS_CAPS: dict[str, tuple[int, int]] = {
    "dropped_frames": (1 << 24, 1 << 40),
    "dropped_rows": (1 << 32, 1 << 48),
    "dropped_bytes": (1 << 44, 1 << 56),
    "reconnects": (1 << 24, 1 << 32),
}
#: Client instances whose ClientStats baseline is kept (least recently reporting dropped
#: first, counted in `client_stats_evicted_total`): far above the workers one sidecar
#: serves, each under 2 KiB.
_MAX_STATS_CLIENTS = 4096
#: How long the end of a request stream waits for a racing cancellation (seconds).
_CANCEL_SETTLE_S = 0.2

#: Why a span was refused, per admission outcome.
_REFUSED: dict[Admission, tuple[Reason, str]] = {
    Admission.CLOSED: (Reason.UNKNOWN_REQUEST, "already finished"),
    Admission.NOT_OWNER: (Reason.NOT_OWNER, "live on another stream of this client"),
    Admission.TOO_LONG: (Reason.REQUEST_ID_TOO_LONG, "longer than the request id limit"),
}


@dataclass(frozen=True)
class FrameLimits:
    """What every frame is validated against (`decode_frame` arguments)."""

    model: str  # the served model name frames must carry
    d_model: int  # row width
    layers: frozenset[int]  # layers the bundle reads
    max_frame_bytes: int  # largest payload answered in-stream ("oversized" above)
    #: hook points the bundle reads (`monitor.wire.hooks` names); None: resid_post of
    #: `layers` only (a frame naming another hook point is refused as unknown_hook)
    hook_names: frozenset[str] | None = None
    #: in-worker projection: per hook point, what a projected frame must name and its width
    #: (empty: projected frames are refused as stale_projection)
    projections: Mapping[str, ProjectionSpec] = field(default_factory=dict)


def client_identity(client_id: str, instance_id: str) -> str:
    """The client half of request keys (and the key of its ClientStats baseline): the
    hello's client_id with its random per-process instance_id, so only the same plugin
    process (not another client that copies its readable client_id) can carry a broken
    stream's requests on. The client id's length comes first, so no pair spells another
    (joined by '#' alone, client "w0#abc" without an instance id was instance "abc" of
    "w0"); a stream with no hello is "" (never a hello's)."""
    return f"{len(client_id)}:{client_id}#{instance_id}"


class StreamHandle:
    """Outbound side of one Stream call; `post` is safe from any thread.

    Flow control, not dropping: the outbound queue holds every message posted while the
    stream lives (finals are never dropped). Its size in bytes (`pending_bytes`, the
    serialized size of the queued messages) is bounded by back-pressure instead: when it
    exceeds `max_pending_bytes` the stream's reader stops taking client messages
    (`paused`, counted in `stream_read_pauses_total`) until the writer has drained it to
    half the bound. A client that does not read its verdicts thus fills the HTTP/2
    window of its own requests: its sends block and the plugin's bounded sender drops
    and counts on its side. What the queue can hold beyond the bound is what was already
    admitted: the scoring queue's rows of this stream and the finals of its live
    requests (both bounded). Messages posted after the stream ended are counted in
    `verdicts_dropped_total` (the audit log and metrics have them).

    Thread rules: `post` from any thread; everything else on the event loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, peer: str,
                 max_pending_bytes: int = 1 << 20) -> None:
        if max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes: expected >= 1, found {max_pending_bytes}")
        self.name = f"stream-{next(_stream_ids)}({peer})"
        self.loop = loop
        self.metrics = metrics
        #: (message, its serialized size); None ends the call
        self.queue: asyncio.Queue[tuple[monitor_pb2.ServerMessage | None, int]] = (
            asyncio.Queue())
        self.max_pending_bytes = int(max_pending_bytes)
        self.pending_bytes = 0
        self.writable = asyncio.Event()  # clear = reads paused until the writer drains
        self.writable.set()
        self.closed = False
        self.last_seq = 0
        self.client_id = ""  # `client_identity` of the hello: the client half of request keys
        self.instance_id = ""  # ClientHello.instance_id ("" with no hello, or none in it)
        self.admitted = False  # a request was admitted: the client id is fixed
        #: ClientStats baseline of a client without an instance id (per stream: see
        #: `MonitorService._stats_baseline`)
        self.stats: dict[str, int] = {}
        self.stats_counted = False  # a ClientStats message of this stream was counted
        #: the client's shared-memory ring, when its hello offered one and it was accepted
        self.shm: ShmRingReader | None = None

    def key(self, request_id: str) -> RequestKey:
        """The registry key of `request_id` sent on this stream."""
        return RequestKey(self.client_id, request_id)

    def post(self, msg: monitor_pb2.ServerMessage | None) -> None:
        """Queue `msg` for the client (None ends the call); counted as dropped if the
        stream is gone."""
        if self.closed:
            if msg is not None:
                self.metrics.verdicts_dropped.inc()
            return
        try:
            self.loop.call_soon_threadsafe(self._put, msg)
        except RuntimeError:  # loop closed at shutdown
            pass

    def _put(self, msg: monitor_pb2.ServerMessage | None) -> None:
        if self.closed:
            if msg is not None:
                self.metrics.verdicts_dropped.inc()
            return
        n = msg.ByteSize() if msg is not None else 0
        self.queue.put_nowait((msg, n))
        self.pending_bytes += n
        if self.pending_bytes > self.max_pending_bytes and self.writable.is_set():
            self.writable.clear()  # the reader stops taking client messages
            self.metrics.stream_read_pauses.inc()
            log.debug("%s: %d bytes of verdicts unread by the client; reads paused",
                      self.name, self.pending_bytes)

    async def next(self) -> monitor_pb2.ServerMessage | None:
        """The next message to send (None: end the call); resumes paused reads once the
        queue has drained to half its bound."""
        msg, n = await self.queue.get()
        self.pending_bytes -= n
        if not self.writable.is_set() and self.pending_bytes <= self.max_pending_bytes // 2:
            self.writable.set()
        return msg

    def close(self) -> None:
        """The call ended: count what was queued and never sent."""
        self.closed = True
        lost = 0
        while not self.queue.empty():
            lost += self.queue.get_nowait()[0] is not None
        if lost:
            self.metrics.verdicts_dropped.inc(lost)
        self.writable.set()  # never leave the reader waiting

    def error(self, code: int, reason: str, message: str, *, seq: int = 0,
              request_id: str = "") -> None:
        """Queue an in-stream StreamError."""
        self.post(monitor_pb2.ServerMessage(error=monitor_pb2.StreamError(
            code=code, reason=reason, message=message, seq=seq, request_id=request_id)))


class MonitorService(monitor_pb2_grpc.MonitorServicer):
    """The `monitor.v1.Monitor` service.

    Args:
        pipeline: where admitted frames, finishes and coverage gaps go.
        scorer: the bundle's scorer (the unary `Score` RPC).
        limits: what frames are validated against.
        plan: returns the current capture plan.
        metrics: the server's metrics.
        max_hello_id_bytes: longest `ClientHello.client_id` accepted.
        max_outbound_bytes: per stream, unread verdict bytes above which the stream's
            reads pause (`StreamHandle`).
        shm_dir: where workers' shared-memory rings are (`--shm-dir`); None: rings offered
            in a hello are refused (`shm_ring_refused`) and the client sends bytes.
        max_stats_clients: client instances whose ClientStats baseline is kept.
    """

    def __init__(self, *, pipeline: Pipeline, scorer: FrameScorer, limits: FrameLimits,
                 plan: Callable[[], monitor_pb2.CapturePlan], metrics: Metrics,
                 max_hello_id_bytes: int = 256, max_outbound_bytes: int = 1 << 20,
                 shm_dir: str | None = None,
                 max_stats_clients: int = _MAX_STATS_CLIENTS) -> None:
        if max_stats_clients < 1:
            raise ValueError(f"max_stats_clients: expected >= 1, found {max_stats_clients}")
        self.pipeline = pipeline
        self.scorer = scorer
        self.limits = limits
        self.plan = plan
        self.metrics = metrics
        self.max_hello_id_bytes = int(max_hello_id_bytes)
        self.max_outbound_bytes = int(max_outbound_bytes)
        self.shm_dir = shm_dir
        self.streams: set[StreamHandle] = set()
        #: ClientStats baseline (last counted value per field) per client instance
        #: (`client_identity` with an instance id), least recently reporting first; event
        #: loop only
        self._stats: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.max_stats_clients = int(max_stats_clients)
        #: decodes frames over `_OFFLOAD_BYTES`; nothing else runs here (issue 8 item 6)
        self.decode_executor = concurrent.futures.ThreadPoolExecutor(2, "frame-decode")
        self.score_executor = concurrent.futures.ThreadPoolExecutor(1, "score-rpc")

    def end_streams(self) -> None:
        """Shutdown: end every open stream (their readers finish open requests first)."""
        for h in list(self.streams):
            h.post(None)

    def shutdown(self) -> None:
        """Stop the executors (after the server stopped)."""
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        self.score_executor.shutdown(wait=False, cancel_futures=True)

    def _refuse(self, handle: StreamHandle, code: int, reason: Reason, message: str, *,
                seq: int = 0, request_id: str = "") -> None:
        """Count a refusal and tell the client in-stream."""
        self.metrics.frames_rejected.labels(reason=reason.value).inc()
        handle.error(code, reason.value, message, seq=seq, request_id=request_id)
        log.debug("%s: seq %d refused: %s: %s", handle.name, seq, reason.value, message)

    # -------------------------------------------------------------------- Stream

    async def Stream(
        self, request_iterator: AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[monitor_pb2.ServerMessage]:
        handle = StreamHandle(asyncio.get_running_loop(), self.metrics, context.peer(),
                              self.max_outbound_bytes)
        self.metrics.active_streams.inc()
        self.streams.add(handle)
        log.info("%s: opened", handle.name)
        reader = asyncio.create_task(self._read(request_iterator, handle, context),
                                     name=handle.name)
        try:
            while True:
                msg = await handle.next()
                if msg is None:
                    break
                yield msg
        finally:
            handle.close()
            if handle.shm is not None:
                handle.shm.close()
            if not reader.done():
                reader.cancel()
                try:
                    await reader
                except (asyncio.CancelledError, Exception):
                    pass
            self._orphan(handle)  # no-op after a clean half-close (all released)
            self.streams.discard(handle)
            self.metrics.active_streams.dec()
            log.info("%s: closed", handle.name)

    def _orphan(self, handle: StreamHandle) -> None:
        """The stream broke: keep its open requests for a reconnecting client."""
        n = self.pipeline.orphan(handle)
        if n:
            log.info("%s: broke with %d open requests; kept %.0f s for a reconnecting client",
                     handle.name, n, self.pipeline.registry.orphan_grace_s)

    async def _read(self, it: AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
                    handle: StreamHandle, context: grpc.aio.ServicerContext) -> None:
        try:
            async for msg in it:
                if isinstance(msg, Undecodable):
                    self._refuse(handle, _INVALID, Reason.UNDECODABLE,
                                 f"ClientMessage: expected a monitor.v1.ClientMessage, found "
                                 f"{msg.nbytes} bytes that do not parse ({msg.error})")
                    continue
                kind = msg.WhichOneof("body")
                if kind == "frame":
                    await self._on_frame(msg.frame, handle)
                elif kind == "finished":
                    self._on_finished(msg.finished, handle)
                elif kind == "stats":
                    self._on_stats(msg.stats, handle)
                elif kind == "hello":
                    self._on_hello(msg.hello, handle)
                else:
                    self._refuse(handle, _INVALID, Reason.EMPTY_MESSAGE,
                                 "ClientMessage.body: expected hello, frame, finished or "
                                 "stats, found none")
                if not handle.writable.is_set():  # flow control: the client is not reading
                    await handle.writable.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # transport error (e.g. message over the gRPC limit)
            log.warning("%s: read failed: %s", handle.name, exc)
            self._orphan(handle)
        else:
            # End of the request stream: a half-close, or the first sign of a call the
            # client cancelled or lost (grpc.aio ends the iterator, then cancels this
            # handler a moment later). Give that cancellation time to arrive: if it does,
            # this task is cancelled here and the handler orphans the requests instead.
            await asyncio.sleep(_CANCEL_SETTLE_S)
            if context.cancelled():  # the client vanished: its requests may come back
                self._orphan(handle)
            else:  # the client half-closed: finish what it left open
                n = self.pipeline.release(handle, FinishReason.STREAM_CLOSED)
                if n:
                    log.info("%s: finished %d open requests (stream_closed)", handle.name, n)
        self.pipeline.submit_end(handle)

    def _reject(self, handle: StreamHandle, err: FrameError, seq: int) -> None:
        self._refuse(handle, err.code.value[0], Reason(err.reason), err.message, seq=seq)

    async def _on_frame(self, frame: monitor_pb2.ActivationFrame, handle: StreamHandle) -> None:
        t_recv = time.perf_counter()
        m = self.metrics
        lim = self.limits
        m.frames_received.labels(model_name=lim.model).inc()
        seq = int(frame.seq)
        try:
            missing = check_seq(handle.last_seq, seq)
        except FrameError as err:  # out of order, or a gap no honest client produces
            self._reject(handle, err, seq)
            return
        if missing:
            m.frames_missing.inc(missing)
        handle.last_seq = seq
        ring = handle.shm if frame.HasField("shm") else None
        try:
            nbytes = frame.shm.byte_length if ring is not None else len(frame.data)
            if nbytes > _OFFLOAD_BYTES:
                f = await asyncio.get_running_loop().run_in_executor(
                    self.decode_executor, self._decode, frame, ring)
            else:
                f = self._decode(frame, ring)
        except FrameError as err:
            if ring is not None:
                self._ack_slot(handle, frame.shm)
            self._reject(handle, err, seq)
            if err.rows is not None:
                # rows are parsed after the hook check: the frame's hook name is valid
                rows = err.rows
                self.metrics.rows_unscored.labels(reason=err.reason).inc(
                    int(rows.positions.size))
                self._mark_unscored(handle, hook_key(frame.hook_name or frame.layer),
                                    rows.request_ids, rows.span_bounds, rows.positions,
                                    rows.generated, rows.roles)
            return
        if ring is not None:
            self._ack_slot(handle, frame.shm)  # copied out: the worker may reuse the slot
        m.bytes_received.labels(model_name=lim.model).inc(f.nbytes)
        for role, n in enumerate(np.bincount(f.roles, minlength=len(TokenRole)).tolist()):
            if n and role:
                m.rows_received.labels(model_name=lim.model, role=TokenRole(role).name.lower()
                                       ).inc(n)
        refused = self._refuse_spans(handle, f, seq) if f.refused else frozenset()
        keys = self._admit_spans(handle, f, seq, refused)
        unscored = refused  # spans whose rows are marked in their requests' finals
        if any(k is not None for k in keys):
            try:
                self.pipeline.submit_frame(handle, f, keys, t_recv)
            except QueueFull as exc:
                self._reject(handle, FrameError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                Reason.QUEUE_FULL.value, str(exc)), seq)
                # the rows of the spans admitted (refused ones were counted with their
                # reason)
                shed = frozenset(i for i, key in enumerate(keys) if key is not None)
                m.rows_unscored.labels(reason=Reason.QUEUE_FULL.value).inc(
                    sum(b - a for i, (a, b) in enumerate(f.span_bounds) if i in shed))
                unscored = refused | shed
        # after the frame: a request's positions reach its tracker in order (its coverage
        # counts positions above the highest seen, see `RequestTracker`)
        spans = sorted(unscored)
        self._mark_unscored(handle, f.hook_name, tuple(f.request_ids[i] for i in spans),
                            tuple(f.span_bounds[i] for i in spans), f.positions,
                            f.generated, f.roles)

    def _decode(self, frame: monitor_pb2.ActivationFrame,
                ring: ShmRingReader | None = None) -> DecodedFrame:
        lim = self.limits
        return decode_frame(frame, model=lim.model, d_model=lim.d_model, layers=lim.layers,
                            max_frame_bytes=lim.max_frame_bytes, hook_names=lim.hook_names,
                            projections=lim.projections, shm=ring)

    @staticmethod
    def _ack_slot(handle: StreamHandle, ref: monitor_pb2.ShmRef) -> None:
        """Tell the worker the server is done with the slot (read, or refused): it may
        write it again. Sent for every frame naming a slot of an accepted ring; a client
        frees a slot only when the acknowledged sequence is the one in flight there."""
        handle.post(monitor_pb2.ServerMessage(shm_ack=monitor_pb2.ShmAck(
            slots=[ref.slot], sequences=[ref.sequence])))

    def _on_shm_ring(self, offer: monitor_pb2.ShmRing, handle: StreamHandle) -> None:
        """Answer a hello's ring offer: open it (read-only, checked against the offer) or
        refuse it (counted `shm_ring_refused`; the client keeps sending bytes)."""
        if handle.shm is not None:  # a second hello: the new offer replaces the ring
            handle.shm.close()
            handle.shm = None
        if self.shm_dir is None:
            why = "shm_ring: expected no ring (this server runs without --shm), found one"
        else:
            try:
                handle.shm = ShmRingReader.open(self.shm_dir, offer,
                                                max_slot_bytes=self.limits.max_frame_bytes)
                why = ""
            except ValueError as e:
                why = str(e)
        if why:
            self.metrics.frames_rejected.labels(reason=Reason.SHM_RING_REFUSED.value).inc()
            log.info("%s: shared-memory ring refused (frames carry bytes): %s",
                     handle.name, why)
        else:
            log.info("%s: shared-memory ring %s accepted (%d slots x %d bytes)", handle.name,
                     offer.name, offer.n_slots, offer.slot_bytes)
        handle.post(monitor_pb2.ServerMessage(shm_ack=monitor_pb2.ShmAck(
            ring=monitor_pb2.ShmRingAnswer(accepted=not why, reason=why))))

    def _scored_hook(self, hook: str) -> bool:
        """True if some detector reads hook point `hook` (a canonical name)."""
        lim = self.limits
        if lim.hook_names is not None:
            return hook in lim.hook_names
        hp = parse_hook_name(hook)
        return hp.kind == "resid_post" and hp.layer in lim.layers

    def _refuse_spans(self, handle: StreamHandle, f: DecodedFrame, seq: int
                      ) -> frozenset[int]:
        """Answer the spans the codec refused on their own: one in-stream error per
        reason per frame (naming the first such span and how many), each refused span
        counted in `frames_rejected_total{reason}`, its rows in `rows_unscored_total`.
        Returns the refused span indices (their rows are not judged; the caller marks
        them in their requests' finals, `n_tokens_unscored`)."""
        first: dict[str, str] = {}
        n_spans: dict[str, int] = {}
        for r in f.refused:
            first.setdefault(r.reason, r.message)
            n_spans[r.reason] = n_spans.get(r.reason, 0) + r.n_spans
            a, b = f.span_bounds[r.span]
            self.metrics.rows_unscored.labels(reason=r.reason).inc(b - a)
        for reason, message in first.items():
            self.metrics.frames_rejected.labels(reason=reason).inc(n_spans[reason])
            more = (f" ({n_spans[reason]} spans refused for this reason, the frame's other "
                    "spans judged)")
            handle.error(_INVALID, reason, message + more, seq=seq)
            log.debug("%s: seq %d: %s", handle.name, seq, message)
        return frozenset(r.span for r in f.refused)

    def _admit_spans(self, handle: StreamHandle, f: DecodedFrame, seq: int,
                     skip: frozenset[int] = frozenset()) -> tuple[RequestKey | None, ...]:
        """Admit each span's request (except the spans in `skip`, already refused); a
        refused span is answered and counted on its own (its rows unscored), the other
        spans of the frame are still judged."""
        admitted: dict[str, RequestKey | None] = {}
        refused: dict[str, Reason] = {}
        labels: dict[str, str] = {}
        for i, (rid, label) in enumerate(zip(f.request_ids, f.correlation_ids, strict=True)):
            if label and i not in skip:
                labels.setdefault(rid, label)
        for rid in dict.fromkeys(rid for i, rid in enumerate(f.request_ids) if i not in skip):
            key = handle.key(rid)
            adm = self.pipeline.admit(key, handle, labels.get(rid, ""))
            if adm.accepted:
                handle.admitted = True
                admitted[rid] = key
                continue
            admitted[rid] = None
            reason, what = _REFUSED[adm]
            refused[rid] = reason
            shown = rid if adm is not Admission.TOO_LONG else rid[:64] + "..."
            self._refuse(handle, _INVALID, reason,
                         f"spans.request_id: {shown!r} is {what}", seq=seq,
                         request_id=shown)
        if refused:
            for i, ((a, b), rid) in enumerate(zip(f.span_bounds, f.request_ids, strict=True)):
                if rid in refused and i not in skip:
                    self.metrics.rows_unscored.labels(reason=refused[rid].value).inc(b - a)
        return tuple(None if i in skip else admitted[rid]
                     for i, rid in enumerate(f.request_ids))

    def _mark_unscored(self, handle: StreamHandle, hook: str, request_ids: Sequence[str],
                       bounds: Sequence[tuple[int, int]], positions: np.ndarray,
                       generated: np.ndarray, roles: np.ndarray) -> None:
        """Mark rows on hook point `hook` that arrived but will not be scored in their
        requests' finals (`n_tokens_unscored`; the caller counted them in
        `rows_unscored_total`): the spans `bounds` of `request_ids`, rows of the frame's
        `positions` / `generated` / `roles`. One bounded queue item for all of them
        (`Pipeline.submit_unscored`: over its bound, dropped and counted, and the finals
        count the rows as missing). Spans of no request (id "": an empty id, or the rows
        beyond the frame's span limit) or of no rows are skipped; nothing is lost when no
        detector reads `hook`."""
        if not self._scored_hook(hook):
            return
        spans = [(handle.key(rid), (a, b))
                 for rid, (a, b) in zip(request_ids, bounds, strict=True) if rid and b > a]
        if spans and self.pipeline.submit_unscored(handle, hook, spans, positions, generated,
                                                   roles):
            handle.admitted = True

    def _on_finished(self, fin: monitor_pb2.RequestFinished, handle: StreamHandle) -> None:
        rid = fin.request_id
        limit = self.pipeline.registry.max_request_id_bytes
        if len(rid.encode("utf-8", "surrogatepass")) > limit:  # never echo a huge id back
            self._refuse(handle, _INVALID, Reason.REQUEST_ID_TOO_LONG,
                         f"finished.request_id: expected at most {limit} UTF-8 bytes, found "
                         f"{len(rid.encode('utf-8', 'surrogatepass'))} ({rid[:64]!r}...)")
            return
        label = fin.correlation_id
        if len(label.encode("utf-8", "surrogatepass")) > MAX_CORRELATION_ID_BYTES:
            self._refuse(handle, _INVALID, Reason.CORRELATION_ID_TOO_LONG,
                         f"finished.correlation_id: expected at most "
                         f"{MAX_CORRELATION_ID_BYTES} UTF-8 bytes, found "
                         f"{len(label.encode('utf-8', 'surrogatepass'))}", request_id=rid)
            return
        key = handle.key(rid)
        why = FinishReason.from_client(fin.reason)
        expected = Expected.from_finished(
            fin.n_prompt_tokens, fin.n_generated_tokens, fin.n_cached_prompt_tokens,
            ended_in_engine=why in ENGINE_REASONS)
        if not self.pipeline.finish(key, handle, why, expected, label):
            # never seen from this client instance (the key carries its identity): no row
            # of it reached this server, e.g. it ran while the sidecar restarted. Its final
            # counts every in-scope position as missing, never a silent refusal.
            if not (self.pipeline.registry.state(key) == "unknown"
                    and self.pipeline.finish_unseen(key, handle, why, expected, label)):
                self._refuse_finish(handle, rid, key)
                return
            handle.admitted = True  # the client id is fixed from here (as for a frame)
        if fin.n_cached_prompt_tokens:
            # prefix-cached prompt tokens ran no forward pass: explicit coverage gap
            self.metrics.rows_unscored.labels(reason=Reason.PREFIX_CACHED.value).inc(
                fin.n_cached_prompt_tokens)

    def _refuse_finish(self, handle: StreamHandle, rid: str, key: RequestKey) -> None:
        """Answer a RequestFinished that closed nothing: the request lives on another
        open stream (``not_owner``), is already finished (``unknown_request``), or was
        never seen and too many finals wait to be written (``queue_full``)."""
        registry = self.pipeline.registry
        state = registry.state(key)
        what = {"closed": "already finished",
                "live": "live on another stream of this client"}.get(
                    state, f"never seen on this server and {registry.max_requests} finals "
                    "are waiting to be written")
        reason = {"live": Reason.NOT_OWNER, "closed": Reason.UNKNOWN_REQUEST}.get(
            state, Reason.QUEUE_FULL)
        self._refuse(handle, _EXHAUSTED if reason is Reason.QUEUE_FULL else _INVALID, reason,
                     f"finished.request_id: {rid!r} is {what}", request_id=rid)

    def _stats_baseline(self, handle: StreamHandle) -> dict[str, int]:
        """The last counted ClientStats values of `handle`'s client. The plugin's counters
        are cumulative over its process and re-sent after each hello, so the baseline
        belongs to the client instance (`client_identity` with an instance id: random
        per process), kept across its reconnects in a bounded LRU. A client without an
        instance id (or without a hello) cannot be told from another one using the same
        client id: its baseline is its stream's."""
        if not handle.instance_id:
            return handle.stats
        base = self._stats.get(handle.client_id)
        if base is not None:
            self._stats.move_to_end(handle.client_id)
            return base
        if len(self._stats) >= self.max_stats_clients:
            self._stats.popitem(last=False)
            self.metrics.client_stats_evicted.inc()
        base = self._stats[handle.client_id] = {}
        return base

    def _on_stats(self, st: monitor_pb2.ClientStats, handle: StreamHandle) -> None:
        m = self.metrics
        fields = (
            ("dropped_frames", st.dropped_frames, m.client_dropped_frames),
            ("dropped_rows", st.dropped_rows, m.client_dropped_rows),
            ("dropped_bytes", st.dropped_bytes, m.client_dropped_bytes),
            ("reconnects", st.reconnects, m.client_reconnects),
        )
        base = self._stats_baseline(handle)
        first = not handle.stats_counted  # covers the time the client was disconnected
        deltas = []
        for name, value, _ in fields:
            prev = base.get(name, 0)
            delta = value - prev if value >= prev else value  # a smaller value: client reset
            per_message, first_message = _STATS_CAPS[name]
            cap = first_message if first else per_message
            if delta > cap:  # one message must not poison a 64-bit counter
                when = "in a stream's first message" if first else "per message"
                self._refuse(handle, _INVALID, Reason.BAD_STATS,
                             f"stats.{name}: expected an increase of at most {cap} {when}, "
                             f"found {delta} (from {prev} to {value})")
                return
            deltas.append(delta)
        for (name, value, counter), delta in zip(fields, deltas, strict=True):
            if delta > 0:
                counter.inc(delta)
            base[name] = value
        handle.stats_counted = True

    def _on_hello(self, hello: monitor_pb2.ClientHello, handle: StreamHandle) -> None:
        log.info("%s: hello from %r (model %r, plan %r, wire_version %d)", handle.name,
                 hello.client_id[:64], hello.model[:64], hello.plan_id[:64], hello.wire_version)
        identity = client_identity(hello.client_id, hello.instance_id)
        if len(hello.client_id.encode()) > self.max_hello_id_bytes or \
                len(hello.instance_id.encode()) > self.max_hello_id_bytes:
            self._refuse(handle, _INVALID, Reason.BAD_HELLO,
                         f"hello.client_id/instance_id: expected at most "
                         f"{self.max_hello_id_bytes} bytes each, found "
                         f"{len(hello.client_id.encode())}/{len(hello.instance_id.encode())}")
        elif handle.admitted and identity != handle.client_id:
            self._refuse(handle, _INVALID, Reason.BAD_HELLO,
                         "hello.client_id: expected the hello before any frame (the client "
                         "id names this stream's requests), found it after")
        else:
            handle.client_id = identity
            handle.instance_id = hello.instance_id
        if hello.model and hello.model != self.limits.model:
            self._refuse(handle, _INVALID, Reason.MODEL_MISMATCH,
                         f"hello.model: expected {self.limits.model!r}, found "
                         f"{hello.model!r}")
        elif hello.plan_id and hello.plan_id != self.plan().plan_id:
            self._refuse(handle, _FAILED_PRECONDITION, Reason.PLAN_CHANGED,
                         f"hello.plan_id: current plan is {self.plan().plan_id!r}, "
                         f"found {hello.plan_id!r}; call GetCapturePlan")
        if hello.HasField("shm_ring"):
            self._on_shm_ring(hello.shm_ring, handle)

    # -------------------------------------------------------------------- unary

    async def GetCapturePlan(
        self, request: monitor_pb2.GetCapturePlanRequest, context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.CapturePlan:
        return self.plan()

    async def Score(
        self, request: monitor_pb2.ScoreRequest | Undecodable,
        context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.ScoreResponse:
        lim = self.limits
        if isinstance(request, Undecodable):
            self.metrics.frames_rejected.labels(reason=Reason.UNDECODABLE.value).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"undecodable: ScoreRequest: {request.nbytes} bytes that do "
                                f"not parse ({request.error})")
            raise AssertionError("unreachable")
        try:
            f = decode_frame(request.frame, model=lim.model, d_model=lim.d_model,
                             layers=lim.layers, max_frame_bytes=lim.max_frame_bytes,
                             require_spans=False, hook_names=lim.hook_names)
        except FrameError as err:
            self.metrics.frames_rejected.labels(reason=err.reason).inc()
            await context.abort(err.code, f"{err.reason}: {err.message}")
            raise AssertionError("unreachable") from None
        if f.refused:  # one caller, one answer: any bad span refuses the call
            r = f.refused[0]
            self.metrics.frames_rejected.labels(reason=r.reason).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{r.reason}: {r.message}")
            raise AssertionError("unreachable")
        scores = await asyncio.get_running_loop().run_in_executor(
            self.score_executor, self.scorer.score, f.hook_name, f.x)
        dets = self.scorer.detectors_on(f.hook_name)
        return monitor_pb2.ScoreResponse(detectors=[
            monitor_pb2.TokenScores(detector=d, scores=scores[:, j].tolist())
            for j, d in enumerate(dets)
        ])


class AdminService(monitor_pb2_grpc.AdminServicer):
    """`monitor.v1.Admin`: policy reload on demand.

    Args:
        reload: submits a reload (trigger name) to the app's reload thread; its future
            yields `(ok, message)`.
        version: returns the active policy version.
    """

    def __init__(self, reload: Callable[[str], concurrent.futures.Future[tuple[bool, str] | None]],
                 version: Callable[[], str]) -> None:
        self._reload = reload
        self._version = version

    async def ReloadPolicy(
        self, request: monitor_pb2.ReloadPolicyRequest, context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.ReloadPolicyResponse:
        result = await asyncio.wrap_future(self._reload("admin_rpc"))
        ok, message = result if result is not None else (True, "unchanged")
        return monitor_pb2.ReloadPolicyResponse(ok=ok, policy_version=self._version(),
                                                message=message)
