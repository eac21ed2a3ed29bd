"""Request lifecycle over real sockets: identity, ownership, bounds, timers, counters.

One sidecar subprocess with small limits (4 live requests, 64-byte ids, 1.5 s idle TTL,
1 s orphan grace) and a policy that judges only `harmful_intent` (layer 2), so layer 3
is captured but judged by nothing. Each test is a regression test for a defect of
issue 8 (keys by client identity, bounded memory, everything finished is counted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import MODEL, POLICY_V1, MonitorServer, eventually
from test_server_integration import (
    errors,
    fin,
    frame_msg,
    make_rows,
    rid,
    verdicts,
)

from monitor.constants import MODES, SEVERITIES, FinishReason, Reason
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span

pytestmark = pytest.mark.timeout(120)

#: POLICY_V1 without its deception detector: layer 3 is captured, nothing judges it.
POLICY = POLICY_V1[:POLICY_V1.index("  deception:")].replace("test-v1", "lifecycle")
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def srv(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    return start_server(policy_text=POLICY, name="lifecycle", extra=[
        "--max-requests", "4", "--max-request-id-bytes", "64", "--idle-ttl-s", "1.5",
        "--orphan-grace-s", "1", "--policy-watch-s", "0"])


def hello(client_id: str) -> monitor_pb2.ClientMessage:
    return monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(client_id=client_id,
                                                                   model=MODEL))


def stream(s: MonitorServer, msgs: list[monitor_pb2.ClientMessage]
           ) -> list[monitor_pb2.ServerMessage]:
    return list(monitor_pb2_grpc.MonitorStub(s.channel).Stream(iter(msgs), timeout=60))


def finals(out: list[monitor_pb2.ServerMessage], request_id: str
           ) -> dict[str, monitor_pb2.Verdict]:
    return {v.detector: v for v in verdicts(out, request_id, final=True)}


class Held:
    """A stream kept open: messages are sent from a queue, replies collected."""

    def __init__(self, s: MonitorServer, first: list[monitor_pb2.ClientMessage]) -> None:
        self._msgs: list[monitor_pb2.ClientMessage] = list(first)
        self._cv = threading.Condition()
        self._done = False
        self.out: list[monitor_pb2.ServerMessage] = []
        self._call = monitor_pb2_grpc.MonitorStub(s.channel).Stream(self._gen(), timeout=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _gen(self) -> Iterator[monitor_pb2.ClientMessage]:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._msgs or self._done)
                if not self._msgs and self._done:
                    return
                msg = self._msgs.pop(0)
            yield msg

    def _read(self) -> None:
        try:
            for m in self._call:
                self.out.append(m)
        except grpc.RpcError:
            pass

    def send(self, *msgs: monitor_pb2.ClientMessage) -> None:
        with self._cv:
            self._msgs.extend(msgs)
            self._cv.notify_all()

    def close(self) -> list[monitor_pb2.ServerMessage]:
        with self._cv:
            self._done = True
            self._cv.notify_all()
        self._reader.join(30)
        return self.out

    def cancel(self) -> None:
        self._call.cancel()
        self._reader.join(30)


def test_counters_exist_from_start_up(srv: MonitorServer) -> None:
    """Every labelled series exists before its first event (first in this module: the
    server has seen no traffic yet), so rate()/increase() see the first event."""
    samples = srv.metrics()
    for mode in MODES:
        for sev in SEVERITIES:
            key = ("safety_monitor_alerts_total", (("detector", "harmful_intent"),
                                                   ("mode", mode), ("severity", sev)))
            assert key in samples, key
            if mode != "alert":  # the policy's mode: no other mode ever fires here
                assert samples[key] == 0
    for r in Reason:
        assert ("safety_monitor_frames_rejected_total", (("reason", r.value),)) in samples
        assert ("safety_monitor_rows_unscored_total", (("reason", r.value),)) in samples
    for f in FinishReason:
        labels = (("model_name", MODEL), ("reason", f.value))
        assert ("safety_monitor_requests_finished_total", labels) in samples
    for name in ("safety_monitor_nonfinite_scores_total", "safety_monitor_requests_evicted_total",
                 "safety_monitor_tracker_duplicate_tokens_total",
                 "safety_monitor_orphaned_requests", "safety_monitor_closed_ids"):
        assert (name, ()) in samples, name


def test_same_request_id_from_two_clients_is_judged_separately(srv: MonitorServer,
                                                               geometry: dict) -> None:
    shared = rid("corr")
    harmful = make_rows(geometry, "harmful_intent", 4, [1])
    benign = make_rows(geometry, "harmful_intent", 4)
    a = Held(srv, [hello("tenant-a"), frame_msg(1, 2, harmful, [Span(shared, 4, 0, 4)])])
    out_b = stream(srv, [hello("tenant-b"), frame_msg(1, 2, benign, [Span(shared, 4, 0, 4)]),
                         fin(shared)])
    a.send(fin(shared))
    out_a = a.close()
    assert errors(out_a) == [] and errors(out_b) == []
    fa, fb = finals(out_a, shared), finals(out_b, shared)
    assert fa["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL
    assert fb["harmful_intent"].severity == monitor_pb2.SEVERITY_NONE  # nothing merged
    assert fa["harmful_intent"].n_tokens_scored == fb["harmful_intent"].n_tokens_scored == 4


def test_another_stream_cannot_add_to_or_finish_a_live_request(srv: MonitorServer,
                                                               geometry: dict) -> None:
    r = rid("owned")
    before = srv.metric("safety_monitor_frames_rejected_total", reason="not_owner")
    a = Held(srv, [hello("tenant-a"), frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4,
                                                                [0]), [Span(r, 4, 0, 4)])])
    assert eventually(lambda: len(verdicts(a.out, r)) >= 1)  # the escalation arrived: r is live
    # same client id on a second stream (e.g. a forged one): may neither blind nor finish r
    out = stream(srv, [hello("tenant-a"),
                       frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                 [Span(r, 4, 4, 4)]), fin(r)])
    assert [(e.code, e.reason, e.request_id) for e in errors(out)] == [
        (INVALID, "not_owner", r), (INVALID, "not_owner", r)]
    assert verdicts(out, r) == []
    # another client finishing the same id only names its own request (never seen: its
    # final, empty and complete, goes to that client; r is untouched)
    out = stream(srv, [hello("tenant-z"), fin(r)])
    assert errors(out) == []
    assert {(v.n_tokens_scored, v.severity) for v in finals(out, r).values()} == {
        (0, monitor_pb2.SEVERITY_NONE)}
    a.send(fin(r))
    f = finals(a.close(), r)["harmful_intent"]
    assert f.n_tokens_scored == 4 and f.severity == monitor_pb2.SEVERITY_CRITICAL
    assert srv.metric("safety_monitor_frames_rejected_total", reason="not_owner") - before == 2



def test_client_identity_cannot_be_spelled_by_another_client(srv: MonitorServer,
                                                             geometry: dict) -> None:
    """The identity joined client_id and instance_id with '#': a client named
    "tenant-x#i1" without an instance id was the instance "i1" of "tenant-x" (it could
    blind, finish or adopt that instance's requests)."""
    r = rid("spelled")
    a = Held(srv, [monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
        client_id="tenant-x", instance_id="i1", model=MODEL)),
        frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4, [0]), [Span(r, 4, 0, 4)])])
    assert eventually(lambda: len(verdicts(a.out, r)) >= 1)  # r is live
    out = stream(srv, [hello("tenant-x#i1"),
                       frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                 [Span(r, 4, 4, 4)]), fin(r)])
    assert errors(out) == []  # its own request r, not tenant-x/i1's
    assert finals(out, r)["harmful_intent"].severity == monitor_pb2.SEVERITY_NONE
    a.send(fin(r))
    f = finals(a.close(), r)["harmful_intent"]
    assert f.n_tokens_scored == 4 and f.severity == monitor_pb2.SEVERITY_CRITICAL

def test_max_requests_holds_for_unjudged_layers_and_evicted_requests_get_finals(
        srv: MonitorServer, geometry: dict) -> None:
    ev0 = srv.metric("safety_monitor_requests_evicted_total")
    fin0 = srv.metric("safety_monitor_requests_finished_total", reason="evicted")
    inc0 = {why: srv.metric("safety_monitor_requests_incomplete_total", model_name=MODEL,
                            reason=why) for why in ("evicted", "stream_closed")}
    ids = [rid(f"ev{i}") for i in range(7)]
    x = make_rows(geometry, "harmful_intent", 2)
    held = Held(srv, [hello("tenant-ev")])
    # layer 3 is captured but judged by no detector of the policy: still bounded
    held.send(*[frame_msg(i + 1, 3, x, [Span(r, 2, 0, 2)]) for i, r in enumerate(ids)])
    assert eventually(lambda: srv.metric("safety_monitor_requests_evicted_total") - ev0 == 3)
    assert eventually(lambda: srv.metric("safety_monitor_requests_finished_total",
                                    reason="evicted") - fin0 == 3)
    assert srv.metric("safety_monitor_active_requests") <= 4
    # the evicted ones were told: one final per policy detector, on their own stream
    assert eventually(lambda: all(finals(held.out, r) for r in ids[:3]))
    late = held.out[:]
    held.send(frame_msg(100, 3, x, [Span(ids[0], 2, 2, 4)]))  # late for an evicted id
    out = held.close()
    assert [(e.reason, e.request_id) for e in errors(out)] == [("unknown_request", ids[0])]
    assert all(finals(out, r) for r in ids[3:])  # the rest finished at half-close
    assert len(late) >= 3
    # closed by the server without the client's counts: incomplete, with the reason
    assert {why: srv.metric("safety_monitor_requests_incomplete_total", model_name=MODEL,
                            reason=why) - n for why, n in inc0.items()} == {
        "evicted": 3, "stream_closed": 4}


def open_one(srv: MonitorServer, geometry: dict, client: str, r: str) -> Held:
    """A held stream that opened request `r` with 4 benign prompt rows on layer 2."""
    return Held(srv, [hello(client), frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                               [Span(r, 4, 0, 4)])])


def test_idle_requests_on_an_open_stream_expire(srv: MonitorServer, geometry: dict) -> None:
    r = rid("idle")
    before = srv.metric("safety_monitor_requests_finished_total", reason="idle")
    inc0 = srv.metric("safety_monitor_requests_incomplete_total", model_name=MODEL,
                      reason="idle")
    held = open_one(srv, geometry, "tenant-idle", r)
    assert eventually(lambda: bool(finals(held.out, r)), timeout=30)  # no half-close needed
    assert srv.metric("safety_monitor_requests_finished_total", reason="idle") - before == 1
    assert srv.metric("safety_monitor_requests_incomplete_total", model_name=MODEL,
                      reason="idle") - inc0 == 1
    assert finals(held.out, r)["harmful_intent"].n_tokens_scored == 4
    held.close()


def test_orphans_are_swept_while_traffic_flows(srv: MonitorServer, geometry: dict) -> None:
    r = rid("orphan")
    before = srv.metric("safety_monitor_requests_finished_total", reason="orphaned")
    broken = open_one(srv, geometry, "tenant-gone", r)
    assert eventually(lambda: srv.metric("safety_monitor_active_requests") >= 1)
    broken.cancel()
    busy = Held(srv, [hello("tenant-busy")])
    t0 = time.monotonic()
    seq = 0
    # a steady stream of frames: the sweeper must not wait for an idle queue
    while time.monotonic() - t0 < 15:
        seq += 1
        b = rid("busy")
        busy.send(frame_msg(seq, 2, make_rows(geometry, "harmful_intent", 2),
                            [Span(b, 2, 0, 2)]), fin(b))
        if srv.metric("safety_monitor_requests_finished_total", reason="orphaned") > before:
            break
        time.sleep(0.05)
    assert srv.metric("safety_monitor_requests_finished_total", reason="orphaned") - \
        before == 1
    busy.close()


def test_overlong_request_id_is_refused_per_span(srv: MonitorServer, geometry: dict) -> None:
    long_id, ok = "x" * 65, rid("ok")
    before = srv.metric("safety_monitor_rows_unscored_total", reason="request_id_too_long")
    x = torch.cat([make_rows(geometry, "harmful_intent", 3),
                   make_rows(geometry, "harmful_intent", 4, [2])])
    out = stream(srv, [hello("tenant-long"),
                       frame_msg(1, 2, x, [Span(long_id, 3, 0, 3), Span(ok, 4, 0, 4)]),
                       fin(ok)])
    errs = errors(out)
    assert [(e.code, e.reason, e.seq) for e in errs] == [(INVALID, "request_id_too_long", 1)]
    assert len(errs[0].request_id) < 70
    assert srv.metric("safety_monitor_rows_unscored_total",
                      reason="request_id_too_long") - before == 3
    f = finals(out, ok)["harmful_intent"]  # the other span of the frame is judged
    assert f.n_tokens_scored == 4 and f.severity == monitor_pb2.SEVERITY_CRITICAL



def test_audit_file_reopens_on_sighup_after_rotation(srv: MonitorServer,
                                                     geometry: dict) -> None:
    import signal

    rotated = srv.audit_path.with_name("audit.jsonl.1")
    srv.audit_path.rename(rotated)
    srv.signal(signal.SIGHUP)  # logrotate's postrotate
    assert eventually(lambda: "reopened (reopen requested)" in srv.log())
    r = rid("rotated")
    out = stream(srv, [hello("tenant-rot"), frame_msg(1, 2, make_rows(
        geometry, "harmful_intent", 4, [1]), [Span(r, 4, 0, 4)]), fin(r)])
    assert finals(out, r)["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL
    assert eventually(lambda: [a["event"] for a in srv.audit_lines() if a["request_id"] == r]
                 == ["alert"])
    assert r not in rotated.read_text()
    assert srv.metric("safety_monitor_audit_write_failures_total") == 0
