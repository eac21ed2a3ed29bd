"""Issue 8, over a real socket: flow control for verdicts (a client that stops reading is
paused, never dropped), per-span refusal of structurally bad spans, per-client call
limits. Each test talks to a real `safety-monitor serve` subprocess.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from conftest import MODEL, MonitorServer, wait_until
from test_server_integration import (
    assert_stream_usable,
    errors,
    fin,
    frame_msg,
    good_tail,
    make_rows,
    rid,
    stream,
    verdicts,
)
from test_wire_limits import _hold_call, _until_refused

from monitor.roles import TokenRole
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame

pytestmark = pytest.mark.timeout(180)

OUTBOUND = 8 << 10  # --stream-outbound-bytes of the test server


@pytest.fixture(scope="module")
def server(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    return start_server(extra=["--policy-watch-s", "0", "--stream-outbound-bytes",
                               str(OUTBOUND)], name="reliab")


def _refused_reaches(srv: MonitorServer, n: float) -> bool:
    """Has `srv` refused `n` policy reloads (counter)?"""
    return srv.metric("safety_monitor_policy_reloads_total", result="refused") == n


def test_client_that_stops_reading_is_flow_controlled_not_dropped(
        server: MonitorServer, geometry: dict) -> None:
    # issue 8 item 5: a slow reader lost finals in bursts (verdicts_dropped_total); now the
    # server stops reading its frames until it reads again, and every final arrives
    n1, n = 500, 3500  # the server pauses during the first n1 requests
    ids = [rid(f"fc{i}") for i in range(n)]
    x = make_rows(geometry, "harmful_intent", 16)  # ~4 KiB frames: the last n - n1 exceed
    # the HTTP/2 windows and socket buffers between client and server several times
    sent = [0]
    done = threading.Event()
    pauses = server.metric("safety_monitor_stream_read_pauses_total")
    dropped = server.metric("safety_monitor_verdicts_dropped_total")
    received0 = server.metric("safety_monitor_frames_received_total")

    def paused() -> bool:
        return server.metric("safety_monitor_stream_read_pauses_total") > pauses

    def gen() -> Iterator[monitor_pb2.ClientMessage]:
        for i, r in enumerate(ids):
            if i == n1:
                wait_until(paused, what="the server to pause reading a stream whose client "
                                   "does not read its verdicts")
            yield frame_msg(i + 1, 2, x, [Span(r, 16, 0, 16)])
            yield fin(r)
            sent[0] = i + 1
        done.set()

    channel = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
    stub = monitor_pb2_grpc.MonitorStub(channel)
    call = stub.Stream(gen(), timeout=150)  # nobody reads the responses yet
    wait_until(lambda: sent[0] > n1, what="the client to send after the pause")
    # paused: the server takes no more of this stream's frames, so the client's sends
    # block once the HTTP/2 window is full (the sender, not the server, holds the rest)
    time.sleep(1.0)
    received = server.metric("safety_monitor_frames_received_total")
    time.sleep(1.0)
    assert server.metric("safety_monitor_frames_received_total") == received
    assert received - received0 < n and sent[0] < n and not done.is_set(), (
        received - received0, sent[0])
    finals: dict[str, int] = {}
    for msg in call:  # read again: the server resumes and the client sends the rest
        assert not msg.HasField("error"), msg
        if msg.verdict.final:
            finals[msg.verdict.request_id] = finals.get(msg.verdict.request_id, 0) + 1
    channel.close()
    assert done.is_set()
    assert set(finals) == set(ids)  # every request's finals, none dropped
    assert set(finals.values()) == {2}  # one per detector (harmful_intent, deception)
    assert server.metric("safety_monitor_verdicts_dropped_total") == dropped


def test_bad_spans_cost_only_their_own_rows(server: MonitorServer, geometry: dict) -> None:
    # issue 8 item 1: an empty id, an over-long correlation id or a bad role in one span
    # refused the whole batched frame, so other users' rows were lost uncounted
    a, b, c, d = (rid(t) for t in ("a", "b", "c", "d"))
    x = make_rows(geometry, "harmful_intent", 13, pushed=[11])  # d's second row harmful
    spans = [Span(a, 4, 0, 4), Span("", 2, 0, 2), Span(b, 3, 0, 3, correlation_id="c" * 300),
             Span(c, 2, 0, 4, TokenRole.GENERATED),  # a GENERATED span in the prompt
             Span(d, 2, 0, 2)]
    m = server.metric
    before = {(n, r): m(n, reason=r) for n in ("safety_monitor_frames_rejected_total",
                                               "safety_monitor_rows_unscored_total")
              for r in ("bad_spans", "correlation_id_too_long")}
    out = stream(server, [frame_msg(1, 2, x, spans), *(fin(r) for r in (a, b, c, d))])
    errs = sorted((e.reason, e.seq) for e in errors(out))
    assert errs == [("bad_spans", 1), ("correlation_id_too_long", 1)], errors(out)
    assert "2 spans refused" in next(e.message for e in errors(out) if e.reason == "bad_spans")

    def final(r: str) -> monitor_pb2.Verdict:
        return {v.detector: v for v in verdicts(out, r, final=True)}["harmful_intent"]

    assert (final(a).n_tokens_scored, final(a).n_tokens_unscored) == (4, 0)
    assert final(a).severity == monitor_pb2.SEVERITY_NONE
    assert (final(b).n_tokens_scored, final(b).n_tokens_unscored) == (0, 3)
    assert (final(c).n_tokens_scored, final(c).n_tokens_unscored) == (0, 2)
    assert (final(d).n_tokens_scored, final(d).n_tokens_unscored) == (2, 0)
    assert final(d).severity != monitor_pb2.SEVERITY_NONE  # judged, not lost
    delta = {k: m(k[0], reason=k[1]) - v for k, v in before.items()}
    assert delta == {("safety_monitor_frames_rejected_total", "bad_spans"): 2,
                     ("safety_monitor_frames_rejected_total", "correlation_id_too_long"): 1,
                     ("safety_monitor_rows_unscored_total", "bad_spans"): 4,
                     ("safety_monitor_rows_unscored_total", "correlation_id_too_long"): 3}


def test_call_limits_are_per_client(start_server: Callable[..., MonitorServer],
                                    geometry: dict) -> None:
    # issue 8 item 4: the caps were per server, so one client could hold every slot.
    # The server listens on localhost (127.0.0.1 and ::1): two peers, two clients.
    srv = start_server(extra=["--policy-watch-s", "0", "--host", "localhost",
                              "--max-streams", "8", "--max-streams-per-client", "1",
                              "--max-score-inflight", "4",
                              "--max-score-inflight-per-client", "1"], name="perclient")
    other = grpc.insecure_channel(f"[::1]:{srv.port}")  # the second client (IPv6 peer)
    m = srv.metric
    req = monitor_pb2.ScoreRequest(frame=encode_frame(
        make_rows(geometry, "harmful_intent", 2), seq=1, model=MODEL, layer=2, spans=[]))
    release, t = _hold_call(srv, "Stream")  # client 127.0.0.1 holds its one stream
    try:
        wait_until(lambda: m("safety_monitor_active_streams") == 1, what="the held stream")
        err = _until_refused(lambda: stream(srv, []))
        assert err.details().startswith("client_too_many_streams:"), err.details()
        assert "ipv4:127.0.0.1" in err.details()
        ok = rid("ok")  # the other client is served: the server has slots left
        out = list(monitor_pb2_grpc.MonitorStub(other).Stream(
            iter(good_tail(geometry, 1, ok)), timeout=60))
        assert_stream_usable(out, ok)
    finally:
        release.set()
        t.join(30)
    assert m("safety_monitor_frames_rejected_total", reason="client_too_many_streams") >= 1
    assert m("safety_monitor_frames_rejected_total", reason="too_many_streams") == 0

    release, t = _hold_call(srv, "Score")  # client 127.0.0.1 holds its one Score call
    try:
        stub = monitor_pb2_grpc.MonitorStub(srv.channel)
        err = _until_refused(lambda: stub.Score(req, timeout=10))
        assert err.details().startswith("client_score_busy:"), err.details()
        assert monitor_pb2_grpc.MonitorStub(other).Score(req, timeout=20).detectors
    finally:
        release.set()
        t.join(30)
    assert m("safety_monitor_frames_rejected_total", reason="client_score_busy") >= 1
    assert m("safety_monitor_frames_rejected_total", reason="score_busy") == 0
    # the slots are given back: the first client is served again
    ok = rid("ok")
    assert_stream_usable(stream(srv, good_tail(geometry, 1, ok)), ok)
    other.close()


def test_gap_across_a_sidecar_restart_is_counted_in_the_final(
        start_server: Callable[..., MonitorServer], server: MonitorServer,
        geometry: dict) -> None:
    # issue 8: the prompt rows of a request went to a sidecar that was then SIGKILLed and
    # the client's queue dropped one decode row; the sidecar that finishes it (a new
    # process, as after a restart) counts every missing in-scope position as unscored,
    # from what it received, and audits the request as incomplete
    import signal

    dead = start_server(extra=["--policy-watch-s", "0"], name="reliab-dead")
    r = rid("gap")
    release = threading.Event()

    def first() -> Iterator[monitor_pb2.ClientMessage]:
        yield frame_msg(1, 2, make_rows(geometry, "harmful_intent", 8), [Span(r, 8, 0, 8)])
        yield frame_msg(2, 3, make_rows(geometry, "deception", 8), [Span(r, 8, 0, 8)])
        release.wait(60)

    call = monitor_pb2_grpc.MonitorStub(dead.channel).Stream(first(), timeout=60)
    wait_until(lambda: dead.metric("safety_monitor_rows_scored_total", model_name=MODEL,
                              layer="3") == 8, what="the first sidecar to score the prompt")
    dead.signal(signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        list(call)
    release.set()
    missing0 = server.metric("safety_monitor_rows_unscored_total", reason="missing")
    msgs = []
    for seq, p in enumerate((8, 9, 10, 11)):  # decode rows 8..11; row 10 of layer 3 dropped
        msgs.append(frame_msg(2 * seq + 1, 2, make_rows(geometry, "harmful_intent", 1),
                              [Span(r, 1, p, 8)]))
        if p != 10:
            msgs.append(frame_msg(2 * seq + 2, 3, make_rows(geometry, "deception", 1),
                                  [Span(r, 1, p, 8)]))
    # 5 tokens sampled (the last never fed back: 4 generated rows ran), prompt of 8
    msgs.append(monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
        request_id=r, reason="stop", n_prompt_tokens=8, n_generated_tokens=5)))
    out = stream(server, msgs)
    assert not errors(out), errors(out)
    got = {v.detector: (v.n_tokens_scored, v.n_tokens_unscored)
           for v in verdicts(out, r, final=True)}
    assert got == {"harmful_intent": (0, 8), "deception": (3, 1)}
    assert server.metric("safety_monitor_rows_unscored_total", reason="missing") \
        == missing0 + 8
    # on record without --audit-finals: the incomplete request's finals, with the gap
    wait_until(lambda: len([a for a in server.audit_lines() if a["request_id"] == r]) == 2,
          what="the incomplete request's audit lines")
    lines = {a["detector"]: a for a in server.audit_lines() if a["request_id"] == r}
    assert {d: (a["event"], a["incomplete"], a["n_tokens_missing"])
            for d, a in lines.items()} == {"harmful_intent": ("final", True, 8),
                                           "deception": ("final", True, 1)}
    # a complete request stays off the audit log (finals not audited) and counts no gap
    c = rid("whole")
    out = stream(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                    [Span(c, 4, 0, 4)]),
                          monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
                              request_id=c, reason="stop", n_prompt_tokens=4,
                              n_generated_tokens=1))])
    assert {v.detector: v.n_tokens_unscored for v in verdicts(out, c, final=True)} == {
        "harmful_intent": 0, "deception": 0}
    assert not [a for a in server.audit_lines() if a["request_id"] == c]


def test_plugin_sender_drops_and_counts_while_its_stream_is_paused(
        server: MonitorServer) -> None:
    # issue 8: the real plugin sender (`monitor.capture.transport.Transport`) against a
    # sidecar that stops reading its stream: the plugin's verdict consumer is stuck, so
    # verdicts back up past --stream-outbound-bytes and the server pauses reading (flow
    # control). The "model thread" (this loop) never waits: a step that finds no ring
    # slot or no queue room is dropped and counted; memory stays the ring's and the
    # queue's; after the consumer recovers, every finished request's final counts its own
    # dropped rows. Each request's 16-row prompt comes in two steps (chunked prefill), so
    # a request can lose one half.
    import torch

    from monitor.capture.config import CaptureConfig
    from monitor.capture.transport import HostRing, StepRecord, Transport, open_channel

    class SmallWindows(Transport):
        """The real sender; no BDP probing, so HTTP/2 windows stay small and the
        backlog that makes the server pause builds within seconds (as in the test above)."""

        def _channel(self) -> grpc.Channel:
            return open_channel(self.cfg, [("grpc.http2.bdp_probe", 0),
                                           ("grpc.enable_retries", 0)])

    stuck = threading.Event()
    stuck.set()
    finals: dict[str, dict[str, int]] = {}

    def on_verdict(v: monitor_pb2.Verdict) -> None:  # a consumer that stops reading
        if v.final:
            finals.setdefault(v.request_id, {})[v.detector] = v.n_tokens_unscored
        while stuck.is_set():
            time.sleep(0.01)

    cfg = CaptureConfig(addr=server.target, model=MODEL, queue_size=8, backoff_s=0.05,
                        backoff_max_s=0.2, stats_period_s=0.2, client_id="reliab-plugin")
    t = SmallWindows(cfg, MODEL, on_verdict=on_verdict)
    pauses0 = server.metric("safety_monitor_stream_read_pauses_total")
    client_rows0 = server.metric("safety_monitor_client_dropped_rows_total")
    t.start()
    try:
        wait_until(lambda: t.connected, what="the plugin to connect")
        plan = t.plan
        assert plan is not None
        half = 8
        n_points = len(plan.points)
        ring = HostRing(4, n_points, 2 * half, plan.d_model, plan.dtype)
        ring.buf.copy_(0.01 * torch.randn(ring.buf.shape))
        kept: dict[str, list[bool]] = {}  # request id -> per half: its step was queued
        finished: list[str] = []
        prev = ""
        paused_at = 0
        step = 0
        while not paused_at or step < paused_at + 400:  # the model thread
            step += 1
            assert step < 30000, ("the server never paused the stream", t.stats())
            r = f"plug-{step}"
            spans = [(prev, half, half, 2 * half, 0)] if prev else []
            spans.append((r, half, 0, 2 * half, 0))
            n_rows = half * len(spans)
            slot = ring.acquire()  # as the plugin's capture op does
            if slot is None:
                t.count_drop(n_points, n_rows * n_points,
                             n_rows * n_points * plan.d_model * ring.buf.element_size(),
                             "ring full (sidecar slow)")
                ok = False
            else:
                ok = t.submit_step(StepRecord(
                    ring=ring, slot=slot, step=step, plan_id=plan.plan_id, model=MODEL,
                    points=plan.points, n_rows=n_rows, spans=spans,
                    max_frame_bytes=plan.max_frame_bytes))
            kept[r] = [ok]
            if prev:
                kept[prev].append(ok)
                if t.submit_finished(monitor_pb2.RequestFinished(
                        request_id=prev, reason="stop", n_prompt_tokens=2 * half,
                        n_generated_tokens=1)):
                    finished.append(prev)
            prev = r
            if not paused_at and step % 100 == 0 and server.metric(
                    "safety_monitor_stream_read_pauses_total") > pauses0:
                paused_at = step
            time.sleep(0.0005)
        st = t.stats()
        # bounded: what is in flight sits in the ring (4 slots) and the queue (8 items)
        assert st["queued"] <= cfg.queue_size
        n_lost_steps = sum(not ok[0] for ok in kept.values())
        assert n_lost_steps >= 20, st  # the paused stream made the plugin drop
        assert st["dropped_rows"] >= n_lost_steps * half * n_points
        stuck.clear()  # the consumer recovers: the server resumes reading this stream
        wait_until(lambda: server.metric("safety_monitor_client_dropped_rows_total")
              - client_rows0 >= st["dropped_rows"],
              what="the plugin's ClientStats to report its drops")
        # requests the server saw (at least one half arrived) and whose finish was sent
        judged = [r for r in finished if any(kept[r])]
        partial = [r for r in judged if not all(kept[r])]
        assert partial, "some request lost one half of its prompt"
        wait_until(lambda: all(len(finals.get(r, {})) == 2 for r in judged), timeout=120,
              what="the finals of every finished request")
        # harmful_intent reads the prompt: each lost half is 8 positions missing from the
        # request's final (audited incomplete); rows that arrived but found the server's
        # scoring queue full (the burst after the pause) are unscored too, not missing
        wait_until(lambda: {a["request_id"] for a in server.audit_lines()
                       if a.get("incomplete")} >= set(partial),
              what="the incomplete requests' audit lines")
        missing = {a["request_id"]: a["n_tokens_missing"] for a in server.audit_lines()
                   if a.get("incomplete") and a["detector"] == "harmful_intent"}
        for r in judged:
            lost = half * kept[r].count(False)
            assert missing.get(r, 0) == lost, (r, kept[r], missing.get(r))
            assert lost <= finals[r]["harmful_intent"] <= 2 * half, (r, finals[r])
            assert finals[r]["deception"] == 0, (r, finals[r])
    finally:
        stuck.clear()
        t.close()


def test_blocking_policy_path_stalls_neither_large_frames_nor_shutdown(
        start_server: Callable[..., MonitorServer], geometry: dict) -> None:
    # issue 8 item 6, over a real socket: a reload shared the pool that decodes frames
    # over 1 MiB and a blocking read (the policy path swapped for a FIFO nobody writes)
    # stalled them (31 s, or forever) and SIGTERM no longer stopped the process. Now the
    # FIFO (and an oversized or deeply nested policy) is refused and counted, a 1.1 MiB
    # frame is judged, SIGTERM exits 0.
    import os
    import signal

    srv = start_server(extra=["--policy-watch-s", "0"], name="reliab-fifo")
    assert srv.policy_path is not None
    refused0 = srv.metric("safety_monitor_policy_reloads_total", result="refused")
    srv.policy_path.unlink()
    os.mkfifo(srv.policy_path)
    srv.signal(signal.SIGHUP)
    wait_until(lambda: srv.metric("safety_monitor_policy_reloads_total", result="refused")
          == refused0 + 1, what="the FIFO policy to be refused")
    # a 1 MiB+ policy (was 2 GB RSS) and a deeply nested one (was an uncounted
    # RecursionError): each refused and counted, the process and its policy unharmed
    from monitor.judge.policy import MAX_POLICY_BYTES

    for i, text in enumerate(("#" * (MAX_POLICY_BYTES + 1) + "\n", "x: " + "[" * 100_000)):
        srv.policy_path.unlink()
        srv.policy_path.write_text(text)
        srv.signal(signal.SIGHUP)
        wait_until(functools.partial(_refused_reaches, srv, refused0 + 2 + i),
              what="the policy to be refused")
    srv.policy_path.unlink()
    os.mkfifo(srv.policy_path)
    r = rid("big")
    n = 4400  # 4400 rows x 64 x float32 = 1.07 MiB
    out = stream(srv, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", n),
                                 [Span(r, n, 0, n)]), fin(r)])
    assert not errors(out), errors(out)
    final = {v.detector: v for v in verdicts(out, r, final=True)}["harmful_intent"]
    assert (final.n_tokens_scored, final.n_tokens_unscored) == (n, 0)
    assert srv.metric("safety_monitor_policy_info", version="test-v1") == 1  # kept
    assert srv.stop(timeout=30) == 0  # graceful SIGTERM exit, not killed after 30 s


def test_a_finished_id_in_a_batched_frame_costs_only_its_own_rows(
        server: MonitorServer, geometry: dict) -> None:
    # issue 8 item 1: a retry that reused a finished engine id made the server refuse the
    # whole batched frame, so the other requests' rows were lost with finals saying
    # nothing was unscored. Now only that span is refused (counted); the others are judged.
    import torch

    done, other = rid("done"), rid("other")
    x = torch.cat([make_rows(geometry, "harmful_intent", 3),
                   make_rows(geometry, "harmful_intent", 4, pushed=[2])])
    before = server.metric("safety_monitor_rows_unscored_total", reason="unknown_request")
    out = stream(server, [
        frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4), [Span(done, 4, 0, 4)]),
        fin(done),
        frame_msg(2, 2, x, [Span(done, 3, 4, 4), Span(other, 4, 0, 4)]),  # batched
        fin(other)])
    assert [(e.reason, e.request_id, e.seq) for e in errors(out)] == [
        ("unknown_request", done, 2)]
    assert server.metric("safety_monitor_rows_unscored_total", reason="unknown_request") \
        - before == 3
    assert len(verdicts(out, done, final=True)) == 2  # its finals were sent once
    f = {v.detector: v for v in verdicts(out, other, final=True)}["harmful_intent"]
    assert (f.n_tokens_scored, f.n_tokens_unscored) == (4, 0)
    assert f.severity == monitor_pb2.SEVERITY_CRITICAL


def test_finals_the_server_closes_or_never_saw_are_incomplete_with_a_reason(
        start_server: Callable[..., MonitorServer]) -> None:
    # issue 8, the gap a real-vLLM restart showed: the real plugin sender
    # (`monitor.capture.transport.Transport`) across a graceful sidecar restart. The
    # stopping sidecar closes its open requests itself (no client counts): their finals
    # are incomplete, reason `shutdown`, never complete-looking. A request that finishes
    # while the sidecar is down keeps its RequestFinished in the plugin's backlog; the new
    # sidecar (a new process on another port: the plugin is pointed at it, as a restarted
    # sidecar behind the same address) never saw it and writes its final with every
    # in-scope position missing (`no_rows`), under its correlation id. A stream of the
    # same client identity cannot finish a request live on another stream (`not_owner`).
    import dataclasses
    import signal

    import torch
    from conftest import LAYERS, submit_rows

    from monitor.capture.config import CaptureConfig
    from monitor.capture.transport import INSTANCE_ID, Transport

    gen = int(TokenRole.GENERATED)
    finals: dict[str, dict[str, tuple[int, int]]] = {}

    def on_verdict(v: monitor_pb2.Verdict) -> None:
        if v.final:
            finals.setdefault(v.request_id, {})[v.detector] = (v.n_tokens_scored,
                                                                v.n_tokens_unscored)

    first = start_server(extra=["--policy-watch-s", "0"], name="reliab-first")
    cfg = CaptureConfig(addr=first.target, model=MODEL, backoff_s=0.05, backoff_max_s=0.2,
                        stats_period_s=0.2, client_id="reliab-restart")
    t = Transport(cfg, MODEL, on_verdict=on_verdict)
    t.start()
    try:
        wait_until(lambda: t.connected, what="the plugin to connect")
        plan = t.plan
        assert plan is not None

        def step(n: int, spans: list[tuple[str, int, int, int, int]]) -> None:
            rows = sum(s[1] for s in spans)
            submit_rows(t, {layer: 0.01 * torch.randn(rows, plan.d_model) for layer in LAYERS},
                        "", n, spans=spans, labels={s[0]: f"ticket-{s[0]}" for s in spans})

        a, b = "req-across-A", "req-across-B"
        step(1, [(a, 4, 0, 4, 0), (b, 4, 0, 4, 0)])  # both prompts, to the first sidecar
        wait_until(lambda: first.metric("safety_monitor_rows_scored_total", model_name=MODEL,
                                   layer="2") == 8, what="the first sidecar to score")
        first.signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        wait_until(lambda: not t.connected, what="the plugin to see the sidecar gone")
        down = {(x["request_id"], x["detector"]): (x["incomplete"], x["incomplete_reason"],
                                                   x["n_tokens_scored"], x["correlation_id"])
                for x in first.audit_lines() if x["event"] == "final"}
        assert down == {(r, d): (True, "shutdown", 4 if d == "harmful_intent" else 0,
                                 f"ticket-{r}")
                        for r in (a, b) for d in ("harmful_intent", "deception")}
        # a finishes while no sidecar runs (3 tokens sampled: 2 generated rows ran)
        assert t.submit_finished(monitor_pb2.RequestFinished(
            request_id=a, reason="stop", n_prompt_tokens=4, n_generated_tokens=3,
            correlation_id=f"ticket-{a}"))
        assert t.stats()["finished_backlog"] == 1

        second = start_server(extra=["--policy-watch-s", "0"], name="reliab-second")
        t.cfg = dataclasses.replace(cfg, addr=second.target)
        wait_until(lambda: t.connected, what="the plugin to reconnect")
        c = "req-live-C"
        step(2, [(b, 2, 4, 4, gen), (c, 4, 0, 4, 0)])  # b decodes on; c starts
        assert t.submit_finished(monitor_pb2.RequestFinished(
            request_id=b, reason="stop", n_prompt_tokens=4, n_generated_tokens=3,
            correlation_id=f"ticket-{b}"))
        wait_until(lambda: a in finals and b in finals, what="the finals of a and b")
        assert t.stats()["finished_backlog"] == 0 and t.stats()["dropped_finished"] == 0
        # a: no row reached this sidecar, every in-scope position is missing (prompt 4 for
        # harmful_intent, generated 2 for deception); b: its prompt went to the first one
        assert finals[a] == {"harmful_intent": (0, 4), "deception": (0, 2)}
        assert finals[b] == {"harmful_intent": (0, 4), "deception": (2, 0)}
        wait_until(lambda: len([x for x in second.audit_lines() if x["event"] == "final"]) == 3,
              what="the incomplete finals on record")
        up = {(x["request_id"], x["detector"]): (x["incomplete_reason"],
                                                 x["n_tokens_missing"], x["correlation_id"])
              for x in second.audit_lines() if x["event"] == "final"}
        assert up == {(a, "harmful_intent"): ("no_rows", 4, f"ticket-{a}"),
                      (a, "deception"): ("no_rows", 2, f"ticket-{a}"),
                      (b, "harmful_intent"): ("missing", 4, f"ticket-{b}")}
        assert second.metric("safety_monitor_requests_incomplete_total", model_name=MODEL,
                             reason="no_rows") == 1
        assert second.metric("safety_monitor_requests_incomplete_total", model_name=MODEL,
                             reason="missing") == 1
        # identity: another stream of the same client instance cannot finish c (live on
        # the plugin's stream); a client copying the readable client id alone finishes
        # only its own request of that id (never seen: a complete, empty final)
        nb0 = second.metric("safety_monitor_frames_rejected_total", reason="not_owner")
        same = [monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
            client_id="reliab-restart", model=MODEL, instance_id=INSTANCE_ID)),
            fin(c)]
        assert [(e.reason, e.request_id) for e in errors(stream(second, same))] == [
            ("not_owner", c)]
        assert second.metric("safety_monitor_frames_rejected_total", reason="not_owner") \
            == nb0 + 1
        copy = [monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
            client_id="reliab-restart", model=MODEL)), fin(c)]
        out = stream(second, copy)
        assert not errors(out)
        assert {(v.n_tokens_scored, v.n_tokens_unscored)
                for v in verdicts(out, c, final=True)} == {(0, 0)}
        assert c not in finals  # the plugin's c is untouched, still live
        assert t.submit_finished(monitor_pb2.RequestFinished(
            request_id=c, reason="stop", n_prompt_tokens=4, n_generated_tokens=1))
        wait_until(lambda: c in finals, what="c's finals")
        assert finals[c] == {"harmful_intent": (4, 0), "deception": (0, 0)}
    finally:
        t.close()
