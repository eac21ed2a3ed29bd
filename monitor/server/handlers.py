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

from monitor.v1 import monitor_pb2

__all__ = ["RpcLimits", "Undecodable", "add_monitor_service", "client_of", "lenient"]

M = TypeVar("M", bound=Message)
MONITOR_SERVICE = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name


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

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_score_inflight", "max_streams_per_client",
                     "max_score_inflight_per_client"):
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
            `client_too_many_streams`, `client_score_busy`) of each call refused by a cap
            (the caller counts it).
    """
    streams = _Slots(limits.max_streams)
    scores = _Slots(limits.max_score_inflight)
    client_streams = _ClientSlots(limits.max_streams_per_client)
    client_scores = _ClientSlots(limits.max_score_inflight_per_client)

    async def admit(context: grpc.aio.ServicerContext, per_client: _ClientSlots,
                    per_server: _Slots, what: str) -> str:
        """Take a per-client then a per-server slot for a `what` call (returns the
        client), or refuse the call (RESOURCE_EXHAUSTED, counted) holding neither."""
        client = client_of(context)
        reason, detail = "", ""
        if not per_client.take(client):
            reason = "client_too_many_streams" if what == "Stream" else "client_score_busy"
            detail = (f"expected at most {per_client.cap} concurrent {what} calls per "
                      f"client, found one more from {client}")
        elif not per_server.take():
            per_client.give(client)
            reason = "too_many_streams" if what == "Stream" else "score_busy"
            detail = f"expected at most {per_server.cap} concurrent {what} calls on this server"
        if reason:
            on_refused(reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{reason}: {detail}; retry later")
        return client

    async def stream_handler(
        it: AsyncIterator[monitor_pb2.ClientMessage | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[monitor_pb2.ServerMessage]:
        client = await admit(context, client_streams, streams, "Stream")
        try:
            async for msg in stream(it, context):
                yield msg
        finally:
            streams.give()
            client_streams.give(client)

    async def score_handler(
        it: AsyncIterator[monitor_pb2.ScoreRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> monitor_pb2.ScoreResponse:
        # refused before the request payload is read
        client = await admit(context, client_scores, scores, "Score")
        try:
            request: monitor_pb2.ScoreRequest | Undecodable | None = None
            async for msg in it:
                if request is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "Score: expected one ScoreRequest, found more")
                request = msg
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "Score: expected one ScoreRequest, found none")
                raise AssertionError("unreachable")
            return await score(request, context)
        finally:
            scores.give()
            client_scores.give(client)

    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            stream_handler, request_deserializer=lenient(monitor_pb2.ClientMessage),
            response_serializer=monitor_pb2.ServerMessage.SerializeToString),
        "GetCapturePlan": grpc.unary_unary_rpc_method_handler(
            plan, request_deserializer=monitor_pb2.GetCapturePlanRequest.FromString,
            response_serializer=monitor_pb2.CapturePlan.SerializeToString),
        "Score": grpc.stream_unary_rpc_method_handler(
            score_handler, request_deserializer=lenient(monitor_pb2.ScoreRequest),
            response_serializer=monitor_pb2.ScoreResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(MONITOR_SERVICE, handlers),))
