"""Issue 8 regressions over a real socket: claimed sizes, undecodable messages, counter
poisoning and per-server call limits. Each sends the hostile message to a real
`safety-monitor serve` subprocess, checks the specific refusal and its counter, and
that the server and the stream keep working (a good request gets its finals).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import MODEL, MonitorServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_integration import (  # helpers shared with the integration suite
    EXHAUSTED,
    INVALID,
    assert_stream_usable,
    errors,
    frame_msg,
    good_tail,
    make_rows,
    rid,
    stream,
)

from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import MAX_SEQ_GAP, Span, encode_frame

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    return start_server(extra=["--policy-watch-s", "0", "--max-streams", "2",
                               "--max-score-inflight", "1",  # per-server caps (the
                               # per-client caps above them: tests/test_reliability.py)
                               "--max-streams-per-client", "4",
                               "--max-score-inflight-per-client", "2",
                               "--max-unary-inflight", "1"], name="limits")


def _rss_kib(srv: MonitorServer) -> int:
    with open(f"/proc/{srv.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _tiny_frame_claiming_many_rows(spans: list[Span]) -> monitor_pb2.ActivationFrame:
    f = encode_frame(torch.zeros(1, 1), seq=1, model=MODEL, layer=2, spans=spans)
    f.shape[:] = [1 << 26, 1]  # 2^26 rows claimed, 4 data bytes present
    return f


def test_tiny_frame_claiming_2_26_rows(server: MonitorServer, geometry: dict) -> None:
    # issue 8 item 2: < 90 bytes built 2^26-row arrays (OOM) and inflated rows_unscored
    r, ok = rid("liar"), rid("ok")
    frame = _tiny_frame_claiming_many_rows([Span(r, 1 << 26)])
    assert frame.ByteSize() < 90
    unscored = server.metric("safety_monitor_rows_unscored_total")
    rss = _rss_kib(server)
    out = stream(server, [monitor_pb2.ClientMessage(frame=frame), *good_tail(geometry, 2, ok)])
    assert [(e.code, e.reason, e.seq) for e in errors(out)] == [
        (INVALID, "byte_length_mismatch", 1)]
    assert_stream_usable(out, ok)
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="byte_length_mismatch") >= 1
    assert server.metric("safety_monitor_rows_unscored_total") == unscored  # nothing claimed
    assert _rss_kib(server) - rss < 200 * 1024  # 2^26 int64 rows alone would be 512 MiB


def test_score_with_60_bytes_claiming_many_rows(server: MonitorServer) -> None:
    frame = _tiny_frame_claiming_many_rows([])
    req = monitor_pb2.ScoreRequest(frame=frame)
    assert req.ByteSize() <= 60
    stub = monitor_pb2_grpc.MonitorStub(server.channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(req, timeout=20)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("byte_length_mismatch:")
    assert server.alive()


def _raw_stream(srv: MonitorServer, payloads: list[bytes]) -> list[monitor_pb2.ServerMessage]:
    call = srv.channel.stream_stream("/monitor.v1.Monitor/Stream",
                                     response_deserializer=monitor_pb2.ServerMessage.FromString)
    return list(call(iter(payloads), timeout=60))


def test_undecodable_message_is_answered_and_counted(server: MonitorServer,
                                                     geometry: dict) -> None:
    # issue 8 item 5: corrupt bytes ended the call with status OK, counted nowhere
    ok = rid("ok")
    corrupt = b"\x12\xff\xff\xff\xff\x0f"  # field 2 (frame), a length far past the end
    before = server.metric("safety_monitor_frames_rejected_total", reason="undecodable")
    out = _raw_stream(server, [corrupt, *(m.SerializeToString()
                                          for m in good_tail(geometry, 1, ok))])
    errs = errors(out)
    assert [(e.code, e.reason) for e in errs] == [(INVALID, "undecodable")]
    assert "6 bytes" in errs[0].message
    assert_stream_usable(out, ok)  # the stream stayed open
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="undecodable") == before + 1

    unary = server.channel.unary_unary("/monitor.v1.Monitor/Score")
    with pytest.raises(grpc.RpcError) as exc:
        unary(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("undecodable:")


def test_huge_seq_number_cannot_poison_frames_missing(server: MonitorServer,
                                                      geometry: dict) -> None:
    # issue 8 item 5: one seq of ~2^64 added ~1.8e19 to frames_missing_total
    r, ok = rid("seq"), rid("ok")
    missing = server.metric("safety_monitor_frames_missing_total")
    x = make_rows(geometry, "harmful_intent", 2)
    out = stream(server, [
        frame_msg(2**64 - 1, 2, x, [Span(r, 2, 0, 2)]),
        frame_msg(3, 2, x, [Span(r, 2, 0, 2)]),  # 1 frame missing (seq 2): counted
        *good_tail(geometry, 4, ok),
    ])
    assert [(e.reason, e.seq) for e in errors(out)] == [("seq_gap_too_large", 2**64 - 1)]
    assert str(MAX_SEQ_GAP) in errors(out)[0].message
    assert_stream_usable(out, ok)
    assert server.metric("safety_monitor_frames_missing_total") == missing + 2


def test_client_stats_cannot_poison_counters(server: MonitorServer, geometry: dict) -> None:
    ok = rid("ok")
    before = server.metric("safety_monitor_client_dropped_frames_total")
    out = stream(server, [
        monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats(dropped_frames=5)),
        monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats(dropped_frames=2**64 - 1)),
        *good_tail(geometry, 1, ok),
    ])
    assert [e.reason for e in errors(out)] == ["bad_stats"]
    assert_stream_usable(out, ok)
    assert server.metric("safety_monitor_client_dropped_frames_total") == before + 5



def test_client_stats_baseline_survives_reconnects(server: MonitorServer,
                                                   geometry: dict) -> None:
    """The plugin sends cumulative counters and re-sends them after each hello: the
    baseline is the client instance's, not the stream's (a per-stream baseline counted
    25 + 30 + 31 = 86 rows for 31 dropped). A long outage's cumulative total above the
    per-message cap is taken on a stream's first ClientStats (it was refused on every
    message of the stream, forever)."""
    me = monitor_pb2.ClientHello(client_id=rid("stats"), instance_id=rid("inst"), model=MODEL)
    hello = monitor_pb2.ClientMessage(hello=me)

    def st(**kw: int) -> monitor_pb2.ClientMessage:
        return monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats(**kw))

    def counted() -> tuple[float, float]:
        return (server.metric("safety_monitor_client_dropped_rows_total"),
                server.metric("safety_monitor_client_reconnects_total"))

    rows0, rec0 = counted()
    for out in (stream(server, [hello, st(dropped_frames=1, dropped_rows=25)]),
                stream(server, [hello, st(dropped_frames=2, dropped_rows=30, reconnects=1)]),
                stream(server, [hello, st(dropped_frames=3, dropped_rows=31, reconnects=2)])):
        assert errors(out) == []
    rows1, rec1 = counted()
    assert (rows1 - rows0, rec1 - rec0) == (31, 2)
    # another instance of the same client id (a restarted process) has its own baseline
    other = monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
        client_id=me.client_id, instance_id=rid("inst"), model=MODEL))
    assert errors(stream(server, [other, st(dropped_rows=7)])) == []
    # an outage of more than 2^32 dropped rows, reported after the reconnect, then more
    big = 2**32 + 100
    ok = rid("ok")
    out = stream(server, [hello, st(dropped_frames=5, dropped_rows=big, reconnects=3),
                          st(dropped_frames=5, dropped_rows=big + 8, reconnects=3),
                          *good_tail(geometry, 1, ok)])
    assert errors(out) == []
    assert_stream_usable(out, ok)
    rows2, rec2 = counted()
    assert (rows2 - rows1, rec2 - rec1) == (7 + big + 8 - 31, 1)
    # within a stream the per-message cap still holds
    out = stream(server, [hello, st(dropped_rows=big + 9, reconnects=3),
                          st(dropped_rows=big + 9 + 2**32 + 1, reconnects=3)])
    assert [e.reason for e in errors(out)] == ["bad_stats"]
    assert counted() == (rows2 + 1, rec2)

def test_request_id_and_span_limits(server: MonitorServer, geometry: dict) -> None:
    ok = rid("ok")
    x = make_rows(geometry, "harmful_intent", 2)
    many = make_rows(geometry, "harmful_intent", 4097)
    out = stream(server, [
        frame_msg(1, 2, x, [Span("r" * 20_000, 2, 0, 2)]),  # 20 KB ids kept 1.6 GB
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
            request_id="f" * 20_000)),
        frame_msg(2, 2, many, [Span(f"s{i}", 1, 0, 1) for i in range(4097)]),
        *good_tail(geometry, 3, ok),
    ])
    assert [e.reason for e in errors(out)] == ["request_id_too_long", "request_id_too_long",
                                               "too_many_spans"], errors(out)
    assert all(len(e.message) < 300 for e in errors(out))  # the id is not echoed back
    assert_stream_usable(out, ok)


def _hold_call(srv: MonitorServer, method: str) -> tuple[threading.Event, threading.Thread]:
    """Open a streaming-request call that sends nothing until the event is set."""
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        release.wait(120)
        return
        yield b""

    def run() -> None:
        if method in ("Score", "GetCapturePlan"):
            call = srv.channel.stream_unary(f"/monitor.v1.Monitor/{method}")
        else:
            call = srv.channel.stream_stream(f"/monitor.v1.Monitor/{method}")
        try:
            result = call(requests(), timeout=150)
            if method not in ("Score", "GetCapturePlan"):
                list(result)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return release, t


def _until_refused(fn: Callable[[], object], timeout: float = 60.0) -> grpc.RpcError:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fn()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return e
        time.sleep(0.05)
    raise AssertionError("never refused")


def test_concurrent_score_calls_are_capped(server: MonitorServer, geometry: dict) -> None:
    # issue 8 item 4: 16 concurrent 64 MiB Score calls OOM-killed a 2 GiB pod
    stub = monitor_pb2_grpc.MonitorStub(server.channel)
    req = monitor_pb2.ScoreRequest(frame=encode_frame(
        make_rows(geometry, "harmful_intent", 2), seq=1, model=MODEL, layer=2, spans=[]))
    before = server.metric("safety_monitor_frames_rejected_total", reason="score_busy")
    release, t = _hold_call(server, "Score")  # --max-score-inflight 1: holds the slot
    try:
        err = _until_refused(lambda: stub.Score(req, timeout=10))
        assert err.details().startswith("score_busy:")
    finally:
        release.set()
        t.join(30)
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="score_busy") > before
    assert stub.Score(req, timeout=10).detectors  # the slot is free again


def test_concurrent_plan_calls_are_capped(server: MonitorServer) -> None:
    # review: GetCapturePlan was a unary handler without a cap: each call read its request
    # (up to the ~129 MiB message limit) however many were in flight
    stub = monitor_pb2_grpc.MonitorStub(server.channel)
    before = server.metric("safety_monitor_frames_rejected_total", reason="unary_busy")
    release, t = _hold_call(server, "GetCapturePlan")  # --max-unary-inflight 1
    try:
        err = _until_refused(
            lambda: stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=10))
        assert err.details().startswith("unary_busy:"), err.details()
        # health on the data port has its own slots: probes are not refused meanwhile
        r = health_pb2_grpc.HealthStub(server.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        t.join(30)
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="unary_busy") > before
    assert stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=10).model == MODEL


def test_concurrent_streams_are_capped(server: MonitorServer, geometry: dict) -> None:
    holds = [_hold_call(server, "Stream") for _ in range(2)]  # --max-streams 2
    try:
        deadline = time.monotonic() + 90  # both held calls are open on the server
        while server.metric("safety_monitor_active_streams") < 2:
            assert time.monotonic() < deadline, "held streams never opened"
            time.sleep(0.2)
        err = _until_refused(lambda: stream(server, []))
        assert err.details().startswith("too_many_streams:")
    finally:
        for release, _ in holds:
            release.set()
        for _, t in holds:
            t.join(30)
    ok = rid("ok")
    deadline = time.monotonic() + 30
    while True:  # the held streams end a moment after their clients half-close
        try:
            out = stream(server, good_tail(geometry, 1, ok))
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)
    assert_stream_usable(out, ok)
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="too_many_streams") >= 1
    assert EXHAUSTED == 8


# ------------------------------------------------------------------ identity (issue 8 item 1)


def test_colliding_correlation_ids_are_judged_separately(server: MonitorServer,
                                                         geometry: dict) -> None:
    # issue 8 item 1: two requests with one correlation id merged and the harmful one's
    # rows were dropped as duplicates. Keys are engine ids; the correlation id is a label.
    harmful, benign, retry = rid("eng"), rid("eng"), rid("eng")
    label = rid("ticket")
    hi = make_rows(geometry, "harmful_intent", 4, pushed=[2])
    lo = make_rows(geometry, "harmful_intent", 4)
    spans_hi = [Span(harmful, 4, 0, 4, correlation_id=label)]
    out = stream(server, [
        frame_msg(1, 2, torch.cat([lo, hi]),
                  [Span(benign, 4, 0, 4, correlation_id=label), *spans_hi]),
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(request_id=harmful)),
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(request_id=benign)),
        # a retry that reuses the label: a new engine id, nothing refused
        frame_msg(2, 2, lo, [Span(retry, 4, 0, 4, correlation_id=label)]),
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(request_id=retry)),
    ])
    assert not errors(out), errors(out)
    fin = {v.request_id: v for v in out_verdicts(out) if v.final and
           v.detector == "harmful_intent"}
    assert fin[harmful].severity == monitor_pb2.SEVERITY_CRITICAL
    assert fin[benign].severity == monitor_pb2.SEVERITY_NONE
    assert fin[retry].severity == monitor_pb2.SEVERITY_NONE
    assert all(v.n_tokens_scored == 4 for v in fin.values())
    assert {v.correlation_id for v in out_verdicts(out)} == {label}
    audit = [a for a in server.audit_lines() if a["request_id"] == harmful]
    assert audit and all(a["correlation_id"] == label for a in audit)


def out_verdicts(out: list[monitor_pb2.ServerMessage]) -> list[monitor_pb2.Verdict]:
    return [m.verdict for m in out if m.HasField("verdict")]
