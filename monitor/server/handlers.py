"""gRPC method handlers for `monitor.v1.Monitor`: tolerant decoding and per-RPC limits.

The generated `add_MonitorServicer_to_server` parses each request with `FromString`;
a message that does not parse then ends a Stream call with status OK and is counted
nowhere (issue 8). These handlers instead:

- **Stream**: parse each `ClientMessage` leniently. Bytes that do not parse become an
  `Undecodable` value in the request iterator; the servicer answers it in-stream
  (`undecodable`, counted) and the stream stays open, like any other bad message.
- **Score**: registered as a *request-streaming* handler. The wire format of a unary
  request is the same, so unary clients are unaffected, but the message is only read
  (and buffered) after the handler has taken one of `max_score_inflight` slots. A call
  beyond that is refused at once with `RESOURCE_EXHAUSTED` (`score_busy`, counted)
  before its payload is read, so N concurrent 64 MiB requests cannot exhaust memory.
- **Stream** calls beyond `max_streams` are refused the same way (`too_many_streams`).
- **GetCapturePlan** and, on the data port, **gRPC health** (`add_health_service`) are
  registered as request-streaming handlers too, for two reasons. A call refused by the
  token (`monitor.server.access`) is then refused before its request is read: a unary
  handler would first read (and parse) the whole request, up to the port's message limit
  (sized for frames, ~129 MiB), and unknown protobuf fields fit in any request type. And
  the request is read only inside one of `max_unary_inflight` slots (per client
  `max_unary_inflight_per_client`, one pool per method); a call beyond is refused before
  it is read (`unary_busy`, `client_unary_busy`, counted). The slot is held while the
  request is read and a unary answer made (health `Watch`: while its request is read).
- **Per client** as well: one client may hold at most `max_streams_per_client` Stream
  calls and `max_score_inflight_per_client` Score calls (`client_too_many_streams`,
  `client_score_busy`), so one client cannot take every slot of the server. A client is
  its TLS client certificate's identity (SAN, else CN) under mTLS, else the peer's IP
  address (`client_of`). The per-client table holds only clients with a call in flight
  (at most `max_streams + max_score_inflight` entries).

Thread rules: everything here runs on the server's event loop (grpc.aio); the counters
are plain ints touched only from that loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2

from monitor.constants import Reason
from monitor.v1 import monitor_pb2

__all__ = ["RpcLimits", "Undecodable", "add_health_service", "add_monitor_service",
           "client_of", "lenient"]

M = TypeVar("M", bound=Message)
MONITOR_SERVICE = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class Undecodable:
    """A client message whose bytes did not parse as the expected protobuf type."""

    nbytes: int  # size of the message on the wire
    error: str  # the parser's complaint (no payload bytes)


def lenient(cls: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A deserializer that returns `Undecodable` instead of raising on corrupt bytes."""

    def parse(data: bytes) -> M | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(len(data), str(e)[:200])

    return parse


@dataclass(frozen=True)
class RpcLimits:
    """Concurrency limits per server (all clients together) and per client."""

    max_streams: int = 1024
    """Concurrent `Stream` calls; one more is refused with RESOURCE_EXHAUSTED."""
    max_score_inflight: int = 2
    """Concurrent unary `Score` calls whose request is being read or scored; one more is
    refused with RESOURCE_EXHAUSTED before its payload is read."""
    max_streams_per_client: int = 64
    """Concurrent `Stream` calls of one client (`client_of`)."""
    max_score_inflight_per_client: int = 1
    """Concurrent `Score` calls of one client."""
    max_unary_inflight: int = 16
    """Per method, concurrent `GetCapturePlan` / data-port health calls whose request is
    being read or answered; one more is refused with RESOURCE_EXHAUSTED before it is read."""
    max_unary_inflight_per_client: int = 8
    """Per method, such calls of one client."""

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_score_inflight", "max_streams_per_client",
                     "max_score_inflight_per_client", "max_unary_inflight",
                     "max_unary_inflight_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, found {getattr(self, name)}")


class _Slots:
    """A counter of in-flight calls with a hard cap (event-loop thread only)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.cap:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class _ClientSlots:
    """In-flight calls per client with a cap each (event-loop thread only); a client's
    entry exists only while it has a call in flight."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used: dict[str, int] = {}

    def take(self, client: str) -> bool:
        n = self.used.get(client, 0)
        if n >= self.cap:
            return False
        self.used[client] = n + 1
        return True

    def give(self, client: str) -> None:
        n = self.used.pop(client) - 1
        if n:
            self.used[client] = n


def client_of(context: grpc.aio.ServicerContext) -> str:
    """The client a call counts against: its verified TLS client certificate (SAN, else
    CN) under mTLS, else the peer's IP address without the port ("ipv4:10.0.0.7")."""
    auth = context.auth_context()
    for prop in ("x509_subject_alternative_name", "x509_common_name"):
        values = auth.get(prop)
        if values:
            return "cert:" + values[0].decode("utf-8", "replace")
    peer = context.peer()  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class _Admission:
    """A per-client and a per-server cap on one kind of call (event-loop thread only)."""

    def __init__(self, what: str, per_client: int, per_server: int, client_reason: Reason,
                 server_reason: Reason, on_refused: Callable[[str], None]) -> None:
        self.what = what
        self.per_client = _ClientSlots(per_client)
        self.per_server = _Slots(per_server)
        self._reasons = (client_reason.value, server_reason.value)
        self._on_refused = on_refused

    async def admit(self, context: grpc.aio.ServicerContext) -> str:
        """Take a per-client then a per-server slot (returns the client), or refuse the
        call (RESOURCE_EXHAUSTED, counted) holding neither. Nothing of the request has
        been read when this runs (request-streaming handlers only)."""
        client = client_of(context)
        reason, detail = "", ""
        if not self.per_client.take(client):
            reason = self._reasons[0]
            detail = (f"expected at most {self.per_client.cap} concurrent {self.what} calls "
                      f"per client, found one more from {client}")
        elif not self.per_server.take():
            self.per_client.give(client)
            reason = self._reasons[1]
            detail = (f"expected at most {self.per_server.cap} concurrent {self.what} calls "
                      "on this server")
        if reason:
            self._on_refused(reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{reason}: {detail}; retry later")
        return client

    def release(self, client: str) -> None:
        self.per_server.give()
        self.per_client.give(client)


T = TypeVar("T")


async def _one_request(it: AsyncIterator[T], context: grpc.aio.ServicerContext,
                       what: str) -> T:
    """The single request of a unary call served by a request-streaming handler; a
    second one or none ends the call with INVALID_ARGUMENT."""
    request: T | None = None
    async for msg in it:
        if request is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{what}: expected one request message, found more")
        request = msg
    if request is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{what}: expected one request message, found none")
        raise AssertionError("unreachable")
    return request


Q = TypeVar("Q", bound=Message)
R = TypeVar("R", bound=Message)


def _unary(fn: Callable[[Q, grpc.aio.ServicerContext], Awaitable[R]], request: type[Q],
           response: type[R], gate: _Admission) -> grpc.RpcMethodHandler:
    """A unary method as a request-streaming handler: admitted by `gate` before its
    request is read; the slot is held until `fn` has answered."""

    async def handler(it: AsyncIterator[Q], context: grpc.aio.ServicerContext) -> R:
        client = await gate.admit(context)
        try:
            return await fn(await _one_request(it, context, gate.what), context)
        finally:
            gate.release(client)

    return grpc.stream_unary_rpc_method_handler(
        handler, request_deserializer=request.FromString,
        response_serializer=response.SerializeToString)


StreamFn = Callable[[AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
                     grpc.aio.ServicerContext], AsyncIterator[monitor_pb2.ServerMessage]]
ScoreFn = Callable[[monitor_pb2.ScoreRequest | Undecodable, grpc.aio.ServicerContext],
                   Awaitable[monitor_pb2.ScoreResponse]]
PlanFn = Callable[[monitor_pb2.GetCapturePlanRequest, grpc.aio.ServicerContext],
                  Awaitable[monitor_pb2.CapturePlan]]


def add_monitor_service(server: grpc.aio.Server, *, stream: StreamFn, score: ScoreFn,
                        plan: PlanFn, limits: RpcLimits,
                        on_refused: Callable[[str], None]) -> None:
    """Register `monitor.v1.Monitor` on `server` with lenient parsing and `limits`.

    Args:
        stream, score, plan: the servicer's methods; `stream` and `score` receive
            `Undecodable` for bytes that do not parse.
        limits: concurrency caps.
        on_refused: called with the reason (`too_many_streams`, `score_busy`,
            `unary_busy`, `client_too_many_streams`, `client_score_busy`,
            `client_unary_busy`) of each call refused by a cap (the caller counts it).
    """
    streams = _Admission("Stream", limits.max_streams_per_client, limits.max_streams,
                         Reason.CLIENT_TOO_MANY_STREAMS, Reason.TOO_MANY_STREAMS, on_refused)
    scores = _Admission("Score", limits.max_score_inflight_per_client,
                        limits.max_score_inflight, Reason.CLIENT_SCORE_BUSY,
                        Reason.SCORE_BUSY, on_refused)

    async def stream_handler(
        it: AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[monitor_pb2.ServerMessage]:
        client = await streams.admit(context)
        try:
            async for msg in stream(it, context):
                yield msg
        finally:
            streams.release(client)

    async def score_handler(
        it: AsyncIterator[monitor_pb2.ScoreRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.ScoreResponse:
        # refused before the request payload is read
        client = await scores.admit(context)
        try:
            return await score(await _one_request(it, context, "Score"), context)
        finally:
            scores.release(client)

    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            stream_handler, request_deserializer=lenient(monitor_pb2.ClientMessage),
            response_serializer=monitor_pb2.ServerMessage.SerializeToString),
        "GetCapturePlan": _unary(plan, monitor_pb2.GetCapturePlanRequest,
                                 monitor_pb2.CapturePlan, _unary_gate("GetCapturePlan",
                                                                      limits, on_refused)),
        "Score": grpc.stream_unary_rpc_method_handler(
            score_handler, request_deserializer=lenient(monitor_pb2.ScoreRequest),
            response_serializer=monitor_pb2.ScoreResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(MONITOR_SERVICE, handlers),))


def _unary_gate(what: str, limits: RpcLimits, on_refused: Callable[[str], None]
                ) -> _Admission:
    return _Admission(what, limits.max_unary_inflight_per_client, limits.max_unary_inflight,
                      Reason.CLIENT_UNARY_BUSY, Reason.UNARY_BUSY, on_refused)


def add_health_service(server: grpc.aio.Server, servicer: health.aio.HealthServicer, *,
                       limits: RpcLimits, on_refused: Callable[[str], None]) -> None:
    """Register `grpc.health.v1.Health` (`servicer`'s Check, List, Watch) on the data port
    with request-streaming handlers: like every call there it needs the token (when one
    is set; refused before its request is read) and its request is read inside a
    `max_unary_inflight` slot (per method). Probes without a token dial the health port
    (`monitor.server.app`, `--health-port`), whose 4 KiB message limit bounds a request."""
    check = _unary_gate("Health/Check", limits, on_refused)
    listing = _unary_gate("Health/List", limits, on_refused)
    watching = _unary_gate("Health/Watch", limits, on_refused)

    async def watch(it: AsyncIterator[health_pb2.HealthCheckRequest],
                    context: grpc.aio.ServicerContext) -> None:
        client = await watching.admit(context)
        try:  # the slot bounds reading; the watch itself then runs without one
            request = await _one_request(it, context, watching.what)
        finally:
            watching.release(client)
        await servicer.Watch(request, context)

    handlers = {
        "Check": _unary(servicer.Check, health_pb2.HealthCheckRequest,
                        health_pb2.HealthCheckResponse, check),
        "List": _unary(servicer.List, health_pb2.HealthListRequest,
                       health_pb2.HealthListResponse, listing),
        "Watch": grpc.stream_stream_rpc_method_handler(
            watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))
