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

Size limits: frames whose payload exceeds `max_frame_bytes` get an in-stream
"oversized" error; messages above the gRPC `max_receive_message_length` (set above
`max_frame_bytes`) are refused by the transport, which ends the whole call with
RESOURCE_EXHAUSTED (gRPC's own behaviour, it cannot be answered in-stream).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from monitor.server.handlers import Undecodable
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import FrameError, check_request_id, check_seq, decode_frame

if TYPE_CHECKING:
    from monitor.server.app import MonitorApp

__all__ = ["AdminService", "MonitorService", "StreamHandle"]

log = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]  # 3
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # 8
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]  # 9
#: Frames with a payload above this are decoded off the event loop (a worker thread).
_OFFLOAD_BYTES = 1 << 20
_stream_ids = itertools.count(1)
#: Largest increase of a ClientStats counter accepted in one message: far above what a
#: client drops between two stats messages (sent every few seconds), far below what
#: would poison a Prometheus counter (2^64 - 1 in one message).
_MAX_STATS_FRAMES = 1 << 24
_MAX_STATS_ROWS = 1 << 32
_MAX_STATS_BYTES = 1 << 44
#: How long the end of a request stream waits for a racing cancellation (seconds).
_CANCEL_SETTLE_S = 0.2


class StreamHandle:
    """Outbound side of one Stream call; `post` is safe from any thread.

    The outbound queue is bounded (`max_pending` messages): a client that does not read
    its verdicts loses messages (counted in `verdicts_dropped_total`) rather than
    growing server memory.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Any, peer: str,
                 max_pending: int = 65536) -> None:
        self.name = f"stream-{next(_stream_ids)}({peer})"
        self.loop = loop
        self.metrics = metrics
        self.queue: asyncio.Queue[monitor_pb2.ServerMessage | None] = asyncio.Queue(max_pending)
        self.closed = False
        self.last_seq = 0
        self.client_id = ""
        self.stats: dict[str, int] = {}

    def post(self, msg: monitor_pb2.ServerMessage | None) -> None:
        """Queue `msg` for the client (None ends the call); drops if the stream is gone."""
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self._put, msg)
        except RuntimeError:  # loop closed at shutdown
            pass

    def _put(self, msg: monitor_pb2.ServerMessage | None) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            if msg is None:  # the end marker must get through: make room
                self.queue.get_nowait()
                self.queue.put_nowait(None)
            self.metrics.verdicts_dropped.inc()

    def error(self, code: int, reason: str, message: str, *, seq: int = 0,
              request_id: str = "") -> None:
        """Queue an in-stream StreamError."""
        self.post(monitor_pb2.ServerMessage(error=monitor_pb2.StreamError(
            code=code, reason=reason, message=message, seq=seq, request_id=request_id)))


class MonitorService(monitor_pb2_grpc.MonitorServicer):
    """The `monitor.v1.Monitor` service over a `MonitorApp`."""

    def __init__(self, app: MonitorApp) -> None:
        self.app = app

    # -------------------------------------------------------------------- Stream

    async def Stream(
        self, request_iterator: AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[monitor_pb2.ServerMessage]:
        app = self.app
        handle = StreamHandle(asyncio.get_running_loop(), app.metrics, context.peer())
        app.metrics.active_streams.inc()
        app.streams.add(handle)
        log.info("%s: opened", handle.name)
        reader = asyncio.create_task(self._read(request_iterator, handle, context),
                                     name=handle.name)
        try:
            while True:
                msg = await handle.queue.get()
                if msg is None:
                    break
                yield msg
        finally:
            handle.closed = True
            if not reader.done():
                reader.cancel()
                try:
                    await reader
                except (asyncio.CancelledError, Exception):
                    pass
            self._orphan(handle)  # no-op after a clean half-close (all released)
            app.streams.discard(handle)
            app.metrics.active_streams.dec()
            log.info("%s: closed", handle.name)

    def _orphan(self, handle: StreamHandle) -> None:
        """The stream broke: keep its open requests for a reconnecting client."""
        n = self.app.pipeline.orphan(handle)
        if n:
            log.info("%s: broke with %d open requests; kept %.0f s for a reconnecting client",
                     handle.name, n, self.app.pipeline.orphan_grace_s)

    def _release(self, handle: StreamHandle, reason: str) -> None:
        """Finish every live request the stream owns (final verdicts to audit/metrics)."""
        owned = self.app.pipeline.owned_by(handle)
        for rid in owned:
            self.app.pipeline.submit_finish(handle, rid, reason)
        if owned:
            log.info("%s: finished %d open requests (%s)", handle.name, len(owned), reason)

    async def _read(self, it: AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
                    handle: StreamHandle, context: grpc.aio.ServicerContext) -> None:
        try:
            async for msg in it:
                if isinstance(msg, Undecodable):
                    self.app.metrics.frames_rejected.labels(reason="undecodable").inc()
                    handle.error(_INVALID, "undecodable",
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
                    self.app.metrics.frames_rejected.labels(reason="empty_message").inc()
                    handle.error(_INVALID, "empty_message",
                                 "ClientMessage.body: expected hello, frame, finished or "
                                 "stats, found none")
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
                self._release(handle, "stream_closed")
        self.app.pipeline.submit_end(handle)

    def _reject(self, handle: StreamHandle, err: FrameError, seq: int,
                request_id: str = "") -> None:
        self.app.metrics.frames_rejected.labels(reason=err.reason).inc()
        handle.error(err.code.value[0], err.reason, err.message, seq=seq, request_id=request_id)
        log.debug("%s: seq %d refused: %s: %s", handle.name, seq, err.reason, err.message)

    async def _on_frame(self, frame: monitor_pb2.ActivationFrame, handle: StreamHandle) -> None:
        app = self.app
        t_recv = time.perf_counter()
        m = app.metrics
        m.frames_received.labels(model_name=app.model_name).inc()
        seq = int(frame.seq)
        try:
            missing = check_seq(handle.last_seq, seq)
        except FrameError as err:  # out of order, or a gap no honest client produces
            self._reject(handle, err, seq)
            return
        if missing:
            m.frames_missing.inc(missing)
        handle.last_seq = seq
        kwargs = dict(model=app.model_name, d_model=app.d_model, layers=app.layers,
                      max_frame_bytes=app.config.max_frame_bytes)
        try:
            if len(frame.data) > _OFFLOAD_BYTES:
                f = await asyncio.to_thread(decode_frame, frame, **kwargs)
            else:
                f = decode_frame(frame, **kwargs)
        except FrameError as err:
            self._reject(handle, err, seq)
            if err.rows is not None:
                self._unscored_rows(handle, frame.layer, err.rows.request_ids,
                                    err.rows.span_bounds, err.rows.positions,
                                    err.rows.generated, err.reason)
            return
        m.bytes_received.labels(model_name=app.model_name).inc(f.nbytes)
        # late frames: any span of a finished request refuses the whole frame
        late = [rid for rid in dict.fromkeys(f.request_ids)
                if app.pipeline.request_state(rid) == "closed"]
        if late:
            err = FrameError(grpc.StatusCode.INVALID_ARGUMENT, "unknown_request",
                             f"spans.request_id: {late[0]!r} already finished "
                             f"({len(late)} finished request(s) in the frame)")
            self._reject(handle, err, seq, request_id=late[0])
            m.rows_unscored.labels(reason="unknown_request").inc(f.n_rows)
            return
        for rid in dict.fromkeys(f.request_ids):
            app.pipeline.register(rid, handle)
        try:
            app.pipeline.submit_frame(handle, f, t_recv)
        except Exception as exc:  # QueueFull
            err = FrameError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full", str(exc))
            self._reject(handle, err, seq)
            self._unscored_rows(handle, f.layer, f.request_ids, f.span_bounds, f.positions,
                                f.generated, "queue_full")

    def _unscored_rows(self, handle: StreamHandle, layer: int, request_ids: tuple[str, ...],
                       bounds: tuple[tuple[int, int], ...], positions: np.ndarray,
                       generated: np.ndarray, reason: str) -> None:
        """Account rows that arrived but will not be scored (metric + tracker coverage)."""
        self.app.metrics.rows_unscored.labels(reason=reason).inc(int(positions.size))
        lay = layer if layer in self.app.layers else None
        if lay is None:
            return  # no detector reads this layer: nothing lost
        for (a, b), rid in zip(bounds, request_ids, strict=True):
            if self.app.pipeline.register(rid, handle):
                self.app.pipeline.submit_unscored(rid, lay, positions[a:b], generated[a:b])

    def _on_finished(self, fin: monitor_pb2.RequestFinished, handle: StreamHandle) -> None:
        rid = fin.request_id
        try:
            check_request_id(rid, "finished.request_id")
        except FrameError as err:
            self._reject(handle, err, 0)
            return
        if not self.app.pipeline.submit_finish(handle, rid, fin.reason):
            state = self.app.pipeline.request_state(rid)
            what = "already finished" if state == "closed" else "never seen on this server"
            self.app.metrics.frames_rejected.labels(reason="unknown_request").inc()
            handle.error(_INVALID, "unknown_request",
                         f"finished.request_id: {rid!r} is {what}", request_id=rid)
            return
        if fin.n_cached_prompt_tokens:
            # prefix-cached prompt tokens ran no forward pass: explicit coverage gap
            self.app.metrics.rows_unscored.labels(reason="prefix_cached").inc(
                fin.n_cached_prompt_tokens)

    def _on_stats(self, st: monitor_pb2.ClientStats, handle: StreamHandle) -> None:
        m = self.app.metrics
        fields = (
            ("dropped_frames", st.dropped_frames, m.client_dropped_frames, _MAX_STATS_FRAMES),
            ("dropped_rows", st.dropped_rows, m.client_dropped_rows, _MAX_STATS_ROWS),
            ("dropped_bytes", st.dropped_bytes, m.client_dropped_bytes, _MAX_STATS_BYTES),
            ("reconnects", st.reconnects, m.client_reconnects, _MAX_STATS_FRAMES),
        )
        deltas = []
        for name, value, _, cap in fields:
            prev = handle.stats.get(name, 0)
            delta = value - prev if value >= prev else value  # a smaller value: client reset
            if delta > cap:  # one message must not poison a 64-bit counter
                self.app.metrics.frames_rejected.labels(reason="bad_stats").inc()
                handle.error(_INVALID, "bad_stats",
                             f"stats.{name}: expected an increase of at most {cap} per "
                             f"message, found {delta} (from {prev} to {value})")
                return
            deltas.append(delta)
        for (name, value, counter, _), delta in zip(fields, deltas, strict=True):
            if delta > 0:
                counter.inc(delta)
            handle.stats[name] = value

    def _on_hello(self, hello: monitor_pb2.ClientHello, handle: StreamHandle) -> None:
        handle.client_id = hello.client_id
        log.info("%s: hello from %r (model %r, plan %r)", handle.name, hello.client_id,
                 hello.model, hello.plan_id)
        if hello.model and hello.model != self.app.model_name:
            self.app.metrics.frames_rejected.labels(reason="model_mismatch").inc()
            handle.error(_INVALID, "model_mismatch",
                         f"hello.model: expected {self.app.model_name!r}, found {hello.model!r}")
        elif hello.plan_id and hello.plan_id != self.app.plan().plan_id:
            handle.error(_FAILED_PRECONDITION, "plan_changed",
                         f"hello.plan_id: current plan is {self.app.plan().plan_id!r}, "
                         f"found {hello.plan_id!r}; call GetCapturePlan")

    # -------------------------------------------------------------------- unary

    async def GetCapturePlan(
        self, request: monitor_pb2.GetCapturePlanRequest, context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.CapturePlan:
        return self.app.plan()

    async def Score(
        self, request: monitor_pb2.ScoreRequest | Undecodable,
        context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.ScoreResponse:
        app = self.app
        if isinstance(request, Undecodable):
            app.metrics.frames_rejected.labels(reason="undecodable").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"undecodable: ScoreRequest: {request.nbytes} bytes that do "
                                f"not parse ({request.error})")
            raise AssertionError("unreachable")
        try:
            f = decode_frame(request.frame, model=app.model_name, d_model=app.d_model,
                             layers=app.layers, max_frame_bytes=app.config.max_frame_bytes,
                             require_spans=False)
        except FrameError as err:
            app.metrics.frames_rejected.labels(reason=err.reason).inc()
            await context.abort(err.code, f"{err.reason}: {err.message}")
            raise AssertionError("unreachable") from None
        scores = await asyncio.get_running_loop().run_in_executor(
            app.score_executor, app.scorer.score, f.layer, f.x)
        dets = app.scorer.detectors_on(f.layer)
        return monitor_pb2.ScoreResponse(detectors=[
            monitor_pb2.TokenScores(detector=d, scores=scores[:, j].tolist())
            for j, d in enumerate(dets)
        ])


class AdminService(monitor_pb2_grpc.AdminServicer):
    """`monitor.v1.Admin`: policy reload on demand."""

    def __init__(self, reload: Callable[[str], tuple[bool, str]], version: Callable[[], str]):
        self._reload = reload
        self._version = version

    async def ReloadPolicy(
        self, request: monitor_pb2.ReloadPolicyRequest, context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.ReloadPolicyResponse:
        ok, message = await asyncio.to_thread(self._reload, "admin_rpc")
        return monitor_pb2.ReloadPolicyResponse(ok=ok, policy_version=self._version(),
                                                message=message)
