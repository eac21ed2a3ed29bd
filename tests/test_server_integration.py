"""End-to-end tests of the sidecar over real sockets (server runs as a subprocess).

Each bad-input test sends the bad message, then a good frame, and checks: the specific
StreamError code/reason, the counter in /metrics, and that the stream still works
(the good request gets its final verdict).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
import torch
from conftest import D_MODEL, MODEL, POLICY_V1, REPO, MonitorServer, eventually, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from monitor.report.metrics import threshold_edge
from monitor.roles import TokenRole
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 64 * 1024
GRPC_LIMIT = 128 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.fixture(scope="module")
def server(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    return start_server(extra=["--max-frame-bytes", str(MAX_FRAME),
                               "--grpc-max-message-bytes", str(GRPC_LIMIT),
                               "--queue-rows", "4096", "--policy-watch-s", "0"],
                        name="main")


def rid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def make_rows(geometry: dict, det: str, n: int, pushed: Iterable[int] = ()) -> torch.Tensor:
    """n rows scoring ~0.05 on `det`, except rows in `pushed` scoring ~0.9975."""
    mean, u = geometry[det]
    x = mean.repeat(n, 1) + 0.001 * torch.randn(n, D_MODEL)
    for r in pushed:
        x[r] += u * (9.0 / float(u @ u))
    return x


def frame_msg(seq: int, layer: int, x: torch.Tensor, spans: list[Span]
              ) -> monitor_pb2.ClientMessage:
    return monitor_pb2.ClientMessage(frame=encode_frame(x, seq=seq, model=MODEL, layer=layer,
                                                        spans=spans))


def fin(request_id: str, reason: str = "stop") -> monitor_pb2.ClientMessage:
    return monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
        request_id=request_id, reason=reason))


def stream(srv: MonitorServer, msgs: list[monitor_pb2.ClientMessage]
           ) -> list[monitor_pb2.ServerMessage]:
    """Send all messages, half-close, collect everything until the server ends the call."""
    stub = monitor_pb2_grpc.MonitorStub(srv.channel)
    return list(stub.Stream(iter(msgs), timeout=60))


def verdicts(out: list[monitor_pb2.ServerMessage], request_id: str | None = None,
             final: bool | None = None) -> list[monitor_pb2.Verdict]:
    vs = [m.verdict for m in out if m.HasField("verdict")]
    return [v for v in vs if (request_id is None or v.request_id == request_id)
            and (final is None or v.final == final)]


def errors(out: list[monitor_pb2.ServerMessage]) -> list[monitor_pb2.StreamError]:
    return [m.error for m in out if m.HasField("error")]


def good_tail(geometry: dict, seq: int, request_id: str) -> list[monitor_pb2.ClientMessage]:
    """A good 4-row prompt frame for `request_id` on layer 2, then its RequestFinished."""
    return [frame_msg(seq, 2, make_rows(geometry, "harmful_intent", 4),
                      [Span(request_id, 4, 0, 4)]), fin(request_id)]


def assert_stream_usable(out: list[monitor_pb2.ServerMessage], request_id: str) -> None:
    finals = {v.detector: v for v in verdicts(out, request_id, final=True)}
    assert set(finals) == {"harmful_intent", "deception"}, out
    assert finals["harmful_intent"].n_tokens_scored == 4
    assert finals["harmful_intent"].severity == monitor_pb2.SEVERITY_NONE


# ------------------------------------------------------------------ service basics


def test_health_and_reflection(server: MonitorServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for svc in ("", "monitor.v1.Monitor"):
        r = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    # Admin is off by default and never on the data port (tests/test_access.py)
    with pytest.raises(grpc.RpcError) as exc:
        health.Check(health_pb2.HealthCheckRequest(service="monitor.v1.Admin"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    resp = list(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="monitor.v1.Monitor"),
    ]), timeout=5))
    names = {s.name for s in resp[0].list_services_response.service}
    assert {"monitor.v1.Monitor", "grpc.health.v1.Health"} <= names
    assert "monitor.v1.Admin" not in names
    assert resp[1].file_descriptor_response.file_descriptor_proto


def test_capture_plan(server: MonitorServer, bundle_dir: Path) -> None:
    plan = monitor_pb2_grpc.MonitorStub(server.channel).GetCapturePlan(
        monitor_pb2.GetCapturePlanRequest(), timeout=5)
    manifest_sha = __import__("hashlib").sha256(
        (bundle_dir / "manifest.json").read_bytes()).hexdigest()
    assert plan.model == MODEL and plan.d_model == D_MODEL
    assert plan.model_n_layers == json.loads(
        (bundle_dir / "manifest.json").read_text())["model"]["n_layers"] > 0
    assert list(plan.layers) == [2, 3]
    assert set(plan.token_kinds) == {monitor_pb2.TOKEN_KIND_PROMPT,
                                     monitor_pb2.TOKEN_KIND_GENERATED}
    assert plan.hook_name_template == "blocks.{layer}.hook_resid_post"
    assert plan.bundle_sha256 == manifest_sha
    assert plan.max_frame_bytes == MAX_FRAME
    assert len(plan.plan_id) == 16
    # the policy's enforcement block (built-in defaults here) rides on the plan
    assert (plan.enforcement.fail_mode, plan.enforcement.max_behind_frames) == ("open", 0)


# ------------------------------------------------------------------ the happy path


def test_stream_verdicts_audit_and_metrics(server: MonitorServer, geometry: dict) -> None:
    ra, rb, rc = rid("push-harm"), rid("push-decep"), rid("benign")
    before = server.metrics()
    p = 16  # prompt length
    spans = [Span(r, p, 0, p) for r in (ra, rb, rc)]
    # prefill: one frame per layer, three requests; ra pushed on layer 2 from position 10
    x2 = make_rows(geometry, "harmful_intent", 3 * p, pushed=range(10, 16))
    x3 = make_rows(geometry, "deception", 3 * p)
    msgs = [frame_msg(1, 2, x2, spans), frame_msg(2, 3, x3, spans)]
    seq = 3
    for t in range(8):  # decode: one row per request per layer; rb pushed at position 19
        pos = p + t
        dspans = [Span(r, 1, pos, p) for r in (ra, rb, rc)]
        msgs.append(frame_msg(seq, 2, make_rows(geometry, "harmful_intent", 3), dspans))
        pushed = [1] if pos >= 19 else []
        msgs.append(frame_msg(seq + 1, 3, make_rows(geometry, "deception", 3, pushed), dspans))
        seq += 2
    msgs += [fin(ra), fin(rb), fin(rc)]
    out = stream(server, msgs)
    assert errors(out) == []

    esc = [(v.request_id, v.detector, v.severity, v.crossed_at_position, v.mode)
           for v in verdicts(out, final=False)]
    assert sorted(esc) == sorted([
        (ra, "harmful_intent", monitor_pb2.SEVERITY_CRITICAL, 10, "alert"),
        (rb, "deception", monitor_pb2.SEVERITY_CRITICAL, 19, "observe"),
    ])
    finals = {(v.request_id, v.detector): v for v in verdicts(out, final=True)}
    assert len(finals) == 6
    assert finals[(ra, "harmful_intent")].severity == monitor_pb2.SEVERITY_CRITICAL
    assert finals[(ra, "harmful_intent")].n_tokens_scored == p  # prompt scope
    assert finals[(ra, "harmful_intent")].peak_score > 0.99
    assert finals[(ra, "deception")].n_tokens_scored == 8  # generated scope
    assert finals[(rb, "deception")].crossed_at_position == 19
    assert finals[(rc, "harmful_intent")].severity == monitor_pb2.SEVERITY_NONE
    assert finals[(rc, "harmful_intent")].crossed_at_position == -1
    assert all(v.policy_version == "test-v1" for v in finals.values())
    # an escalation comes before that request's final verdict
    order = [(m.verdict.request_id, m.verdict.final) for m in out if m.HasField("verdict")]
    assert order.index((ra, False)) < order.index((ra, True))

    audit = [a for a in server.audit_lines() if a["request_id"] in (ra, rb, rc)]
    assert len(audit) == 2
    by_req = {a["request_id"]: a for a in audit}
    assert by_req[ra]["event"] == "alert" and by_req[ra]["position"] == 10
    assert by_req[ra]["severity"] == "critical" and by_req[ra]["threshold"] == 0.9
    assert by_req[rb]["event"] == "would_alert" and by_req[rb]["mode"] == "observe"
    for a in audit:
        assert a["ts"].endswith("Z") and a["policy_version"] == "test-v1"
        assert a["model_name"] == MODEL and len(a["bundle_sha256"]) == 64
        assert "x" not in a and "data" not in a  # never activations

    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        def total(samples: dict) -> float:
            return sum(v for (n, lab), v in samples.items() if n == name
                       and all(dict(lab).get(k) == val for k, val in labels.items()))
        return total(after) - total(before)

    assert delta("safety_monitor_rows_scored_total", layer="2", model_name=MODEL) == 3 * p + 24
    assert delta("safety_monitor_rows_scored_total", layer="3") == 3 * p + 24
    assert delta("safety_monitor_frames_received_total") == len(msgs) - 3
    assert delta("safety_monitor_requests_finished_total", reason="stop") == 3
    assert delta("safety_monitor_alerts_total", detector="harmful_intent",
                 severity="critical", mode="alert") == 1
    assert delta("safety_monitor_alerts_total", detector="deception",
                 severity="critical", mode="observe") == 1
    assert delta("safety_monitor_request_score_count", detector="harmful_intent") == 3
    # bucket edges at the policy thresholds: 2 of 3 harmful_intent scores are below 0.5
    assert delta("safety_monitor_request_score_bucket", detector="harmful_intent",
                 le=repr(threshold_edge(0.5))) == 2
    assert delta("safety_monitor_request_score_bucket", detector="deception",
                 le=repr(threshold_edge(0.85))) == 2
    assert delta("safety_monitor_frame_latency_seconds_count") == len(msgs) - 3
    assert after[("safety_monitor_policy_info", (("sha256", _sha(POLICY_V1)),
                                                  ("version", "test-v1")))] == 1
    assert server.metric("safety_monitor_bundle_info", model_name=MODEL) == 1
    assert server.metric("safety_monitor_queue_capacity_rows") == 4096
    assert server.metric("safety_monitor_active_streams") == 0
    for (_, labels), _ in after.items():
        assert "request_id" not in dict(labels)


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_duplicate_rows_and_seq_gaps_and_client_stats(server: MonitorServer,
                                                      geometry: dict) -> None:
    r = rid("dup")
    dup0 = server.metric("safety_monitor_duplicate_rows_total")
    miss0 = server.metric("safety_monitor_frames_missing_total")
    drop0 = server.metric("safety_monitor_client_dropped_rows_total")
    x = make_rows(geometry, "harmful_intent", 8)
    msgs = [
        frame_msg(1, 2, x, [Span(r, 8, 0, 32)]),
        # seq jumps 1 -> 4 (2 missing); positions 4..11 recompute 4..7 (preemption)
        frame_msg(4, 2, x, [Span(r, 8, 4, 32)]),
        monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats(dropped_frames=1,
                                                                dropped_rows=10)),
        monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats(dropped_frames=3,
                                                                dropped_rows=25)),
        fin(r),
    ]
    out = stream(server, msgs)
    assert errors(out) == []
    final = {v.detector: v for v in verdicts(out, r, final=True)}
    assert final["harmful_intent"].n_tokens_scored == 12
    assert server.metric("safety_monitor_duplicate_rows_total") - dup0 == 4
    assert server.metric("safety_monitor_frames_missing_total") - miss0 == 2
    assert server.metric("safety_monitor_client_dropped_rows_total") - drop0 == 25


def test_unfinished_requests_get_finals_when_stream_closes(server: MonitorServer,
                                                           geometry: dict) -> None:
    r = rid("open")
    before = server.metric("safety_monitor_requests_finished_total", reason="stream_closed")
    out = stream(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                    [Span(r, 4, 0, 4)])])
    assert len(verdicts(out, r, final=True)) == 2
    assert server.metric("safety_monitor_requests_finished_total",
                         reason="stream_closed") - before == 1


def _break_stream_after(srv: MonitorServer, msgs: list[monitor_pb2.ClientMessage],
                        rows_on_layer_2: int) -> None:
    """Send `msgs` on a stream, wait until the server scored them, then cancel the call
    (the client vanishes without half-closing, as a killed or disconnected client does)."""
    def gen() -> Iterator[monitor_pb2.ClientMessage]:
        yield from msgs
        time.sleep(10)  # never half-close: the call is cancelled before this returns

    before = srv.metric("safety_monitor_rows_scored_total", layer="2", model_name=MODEL)
    call = monitor_pb2_grpc.MonitorStub(srv.channel).Stream(gen(), timeout=60)
    assert eventually(lambda: srv.metric("safety_monitor_rows_scored_total", layer="2",
                                    model_name=MODEL) - before >= rows_on_layer_2)
    call.cancel()


def test_broken_stream_requests_are_carried_on_by_a_new_stream(server: MonitorServer,
                                                                geometry: dict) -> None:
    r = rid("reconnect")
    closed0 = server.metric("safety_monitor_requests_finished_total", reason="stream_closed",
                            model_name=MODEL)
    again0 = server.metric("safety_monitor_requests_reattached_total")
    _break_stream_after(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                           [Span(r, 4, 0, 4)])], 4)
    assert eventually(lambda: server.metric("safety_monitor_active_streams") == 0)
    # the reconnected client carries the request on: seq restarts, positions continue
    out = stream(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4, [2]),
                                    [Span(r, 4, 4, 8)]), fin(r)])
    assert errors(out) == []
    final = {v.detector: v for v in verdicts(out, r, final=True)}
    assert final["harmful_intent"].n_tokens_scored == 8  # nothing lost across the break
    assert final["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL
    assert final["harmful_intent"].crossed_at_position == 6
    assert server.metric("safety_monitor_requests_reattached_total") - again0 == 1
    assert server.metric("safety_monitor_requests_finished_total", reason="stream_closed",
                         model_name=MODEL) == closed0


def test_a_reconnected_clients_finish_closes_its_orphan(server: MonitorServer,
                                                        geometry: dict) -> None:
    # the request's rows all went out before the stream broke; the reconnected client (same
    # client identity) only has the finish left: it adopts and closes the orphan, with the
    # rows scored before the break and the client's counts (was refused as not_owner)
    r = rid("finish-orphan")
    again0 = server.metric("safety_monitor_requests_reattached_total")
    _break_stream_after(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                           [Span(r, 4, 0, 4)])], 4)
    assert eventually(lambda: server.metric("safety_monitor_active_streams") == 0)
    out = stream(server, [monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
        request_id=r, reason="stop", n_prompt_tokens=6, n_generated_tokens=1))])
    assert errors(out) == []
    final = {v.detector: (v.n_tokens_scored, v.n_tokens_unscored)
             for v in verdicts(out, r, final=True)}
    assert final == {"harmful_intent": (4, 2), "deception": (0, 0)}  # positions 4, 5 missing
    assert server.metric("safety_monitor_requests_reattached_total") - again0 == 1


# ------------------------------------------------------------------ bad inputs


def _bad_frames() -> dict[str, tuple[Callable[[monitor_pb2.ActivationFrame], None], int, str]]:
    def set_dtype(v: int) -> Callable[[monitor_pb2.ActivationFrame], None]:
        def f(fr: monitor_pb2.ActivationFrame) -> None:
            fr.dtype = cast(monitor_pb2.DType, v)  # raw wire value: may be out of the enum
        return f

    def truncate(fr: monitor_pb2.ActivationFrame) -> None:
        fr.data = fr.data[:-4]

    def narrow(fr: monitor_pb2.ActivationFrame) -> None:  # 4 real rows of another width
        fr.shape[:] = [4, 32]
        fr.data = fr.data[: 4 * 32 * 4]

    def rank1(fr: monitor_pb2.ActivationFrame) -> None:
        fr.shape[:] = [4 * D_MODEL]

    def layer(fr: monitor_pb2.ActivationFrame) -> None:
        fr.layer = 5

    def model(fr: monitor_pb2.ActivationFrame) -> None:
        fr.model = "other/model"

    def spans(fr: monitor_pb2.ActivationFrame) -> None:
        fr.spans[0].n_rows = 3

    def empty_id(fr: monitor_pb2.ActivationFrame) -> None:
        fr.spans[0].request_id = ""

    def set_role(role: int) -> Callable[[monitor_pb2.ActivationFrame], None]:
        def f(fr: monitor_pb2.ActivationFrame) -> None:
            fr.spans[0].role = role  # type: ignore[assignment]
        return f

    def poison(value: float) -> Callable[[monitor_pb2.ActivationFrame], None]:
        def f(fr: monitor_pb2.ActivationFrame) -> None:
            x = np.frombuffer(fr.data, dtype="<f4").copy().reshape(4, D_MODEL)
            x[2, 7] = value
            fr.data = x.tobytes()
        return f

    return {
        "dtype_unspecified": (set_dtype(0), INVALID, "dtype_unspecified"),
        "dtype_unknown_value": (set_dtype(9), INVALID, "dtype_unspecified"),
        "byte_length": (truncate, INVALID, "byte_length_mismatch"),
        "d_model": (narrow, INVALID, "d_model_mismatch"),
        "rank": (rank1, INVALID, "bad_shape"),
        "unknown_layer": (layer, INVALID, "unknown_layer"),
        "model": (model, INVALID, "model_mismatch"),
        "spans_sum": (spans, INVALID, "bad_spans"),
        "spans_empty_id": (empty_id, INVALID, "bad_spans"),
        "role_unknown_value": (set_role(99), INVALID, "bad_spans"),
        "role_generated_in_prompt": (set_role(TokenRole.GENERATED), INVALID, "bad_spans"),
        "nan": (poison(float("nan")), INVALID, "non_finite"),
        "inf": (poison(float("inf")), INVALID, "non_finite"),
    }


@pytest.mark.parametrize("case", sorted(_bad_frames()))
def test_bad_frame_in_stream(server: MonitorServer, geometry: dict, case: str) -> None:
    mutate, code, reason = _bad_frames()[case]
    bad_id, ok_id = rid("bad"), rid("ok")
    frame = encode_frame(make_rows(geometry, "harmful_intent", 4), seq=1, model=MODEL,
                         layer=2, spans=[Span(bad_id, 4, 0, 4)])
    mutate(frame)
    before = server.metric("safety_monitor_frames_rejected_total", reason=reason)
    out = stream(server, [monitor_pb2.ClientMessage(frame=frame), *good_tail(geometry, 2,
                                                                             ok_id)])
    errs = errors(out)
    assert [(e.code, e.reason, e.seq) for e in errs] == [(code, reason, 1)], errs
    assert errs[0].message  # names field, expected, found
    assert server.metric("safety_monitor_frames_rejected_total", reason=reason) - before == 1
    assert_stream_usable(out, ok_id)
    if reason == "non_finite":
        assert "1 of 4 rows (first row 2" in errs[0].message
        # the refused rows are accounted as unscored for the request, not silently lost
        bad_final = {v.detector: v for v in verdicts(out, bad_id, final=True)}
        assert bad_final["harmful_intent"].n_tokens_unscored == 4
        assert bad_final["harmful_intent"].n_tokens_scored == 0


def test_old_client_without_roles_is_served_like_a_role_client(server: MonitorServer,
                                                               geometry: dict) -> None:
    """A wire_version 0 client (no hello version, spans without roles) and a wire_version
    2 client sending the same rows split at role boundaries get the same verdicts."""
    x = make_rows(geometry, "harmful_intent", 8, pushed=[3])
    old, new = rid("old"), rid("new")
    hello = monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(client_id="old",
                                                                    model=MODEL))
    out_old = stream(server, [hello, frame_msg(1, 2, x, [Span(old, 8, 0, 6)]), fin(old)])
    R = TokenRole
    hello2 = monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
        client_id="new", model=MODEL, wire_version=2))
    spans = [Span(new, 2, 0, 6, R.TEMPLATE), Span(new, 3, 2, 6, R.USER),
             Span(new, 1, 5, 6, R.TEMPLATE), Span(new, 2, 6, 6, R.GENERATED)]
    out_new = stream(server, [hello2, frame_msg(1, 2, x, spans), fin(new)])
    assert not errors(out_old) and not errors(out_new)
    f_old = {v.detector: v for v in verdicts(out_old, old, final=True)}
    f_new = {v.detector: v for v in verdicts(out_new, new, final=True)}
    assert set(f_old) == set(f_new) == {"harmful_intent", "deception"}
    for det in f_old:
        a, b = f_old[det], f_new[det]
        assert (a.severity, a.n_tokens_scored, a.crossed_at_position) == (
            b.severity, b.n_tokens_scored, b.crossed_at_position), det
        assert a.score == pytest.approx(b.score)
    assert f_old["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL
    assert f_old["harmful_intent"].n_tokens_scored == 6  # scope prompt


# POLICY_V1 with harmful_intent on the user's tokens only
ROLE_POLICY = POLICY_V1.replace('"test-v1"', '"roles-v1"').replace("scope: prompt", "scope: user")
assert "scope: user" in ROLE_POLICY


def test_role_scoped_policy_over_a_real_socket(start_server: Callable[..., MonitorServer],
                                               geometry: dict) -> None:
    """`scope: user` judges user rows only: a hot template row is ignored, a hot user row
    is critical at its position; an old client's rows (no roles) are never user rows; the
    plan asks for exactly the roles the policy reads."""
    srv = start_server(policy_text=ROLE_POLICY, extra=["--policy-watch-s", "0"], name="roles")
    R = TokenRole
    plan = monitor_pb2_grpc.MonitorStub(srv.channel).GetCapturePlan(
        monitor_pb2.GetCapturePlanRequest(), timeout=5)
    assert sorted(plan.token_roles) == [R.USER, R.GENERATED]
    assert set(plan.token_kinds) == {monitor_pb2.TOKEN_KIND_PROMPT,
                                     monitor_pb2.TOKEN_KIND_GENERATED}

    def spans(r: str) -> list[Span]:  # template 0-1, user 2-5, template 6-7
        return [Span(r, 2, 0, 8, R.TEMPLATE), Span(r, 4, 2, 8, R.USER),
                Span(r, 2, 6, 8, R.TEMPLATE)]

    cold, hot, old = rid("tmpl-hot"), rid("user-hot"), rid("old")
    out = stream(srv, [
        frame_msg(1, 2, make_rows(geometry, "harmful_intent", 8, pushed=[1, 7]), spans(cold)),
        frame_msg(2, 2, make_rows(geometry, "harmful_intent", 8, pushed=[4]), spans(hot)),
        frame_msg(3, 2, make_rows(geometry, "harmful_intent", 8, pushed=[4]),
                  [Span(old, 8, 0, 8)]),
        fin(cold), fin(hot), fin(old)])
    assert not errors(out), errors(out)
    f = {r: {v.detector: v for v in verdicts(out, r, final=True)}["harmful_intent"]
         for r in (cold, hot, old)}
    assert (f[cold].severity, f[cold].n_tokens_scored) == (monitor_pb2.SEVERITY_NONE, 4)
    assert (f[hot].severity, f[hot].crossed_at_position, f[hot].n_tokens_scored) == (
        monitor_pb2.SEVERITY_CRITICAL, 4, 4)
    assert (f[old].severity, f[old].n_tokens_scored) == (monitor_pb2.SEVERITY_NONE, 0)
    # rows per role are visible: the old client's rows show as `other`
    got = {r: srv.metric("safety_monitor_rows_received_total", model_name=MODEL, role=r)
           for r in ("user", "template", "other", "system")}
    assert got == {"user": 8, "template": 8, "other": 8, "system": 0}


SPAN_END_POLICY = ROLE_POLICY.replace('"roles-v1"', '"span-end-v1"').replace(
    "scope: user", "scope: user\n    judge_at: span_end")
assert "judge_at: span_end" in SPAN_END_POLICY


def test_span_end_policy_over_a_real_socket(start_server: Callable[..., MonitorServer],
                                            geometry: dict) -> None:
    """`judge_at: span_end` judges the user span once, at its last token: when the user
    span ends in a later frame (template rows arrive) the alert comes with that frame;
    when the request finishes inside the span, the escalation is sent (and counted as an
    alert) just before the final verdict; positions are the span's last token."""
    srv = start_server(policy_text=SPAN_END_POLICY, extra=["--policy-watch-s", "0"],
                       name="spanend")
    R = TokenRole
    split, open_, cold = rid("split"), rid("open"), rid("cold")
    x = make_rows(geometry, "harmful_intent", 6, pushed=[4])
    out = stream(srv, [
        # split: template 0-1, user 2-5 (hot at 4) | next frame: template 6-7
        frame_msg(1, 2, x, [Span(split, 2, 0, 6, R.TEMPLATE), Span(split, 4, 2, 6, R.USER)]),
        frame_msg(2, 2, make_rows(geometry, "harmful_intent", 2),
                  [Span(split, 2, 6, 8, R.TEMPLATE)]),
        # open: template 0-1, user 2-5 (hot at 4), then the request finishes
        frame_msg(3, 2, x, [Span(open_, 2, 0, 6, R.TEMPLATE), Span(open_, 4, 2, 6, R.USER)]),
        # cold: the whole user span is cold
        frame_msg(4, 2, make_rows(geometry, "harmful_intent", 8),
                  [Span(cold, 2, 0, 8, R.TEMPLATE), Span(cold, 4, 2, 8, R.USER),
                   Span(cold, 2, 6, 8, R.TEMPLATE)]),
        fin(split), fin(open_), fin(cold)])
    assert not errors(out), errors(out)
    for r in (split, open_):
        (esc,) = [v for v in verdicts(out, r, final=False) if v.detector == "harmful_intent"]
        (f,) = [v for v in verdicts(out, r, final=True) if v.detector == "harmful_intent"]
        assert (esc.severity, esc.crossed_at_position) == (monitor_pb2.SEVERITY_CRITICAL, 5)
        assert (f.severity, f.crossed_at_position, f.n_tokens_scored) == (
            monitor_pb2.SEVERITY_CRITICAL, 5, 4)
    (f,) = [v for v in verdicts(out, cold, final=True) if v.detector == "harmful_intent"]
    assert f.severity == monitor_pb2.SEVERITY_NONE
    assert srv.metric("safety_monitor_alerts_total", detector="harmful_intent",
                      severity="critical", mode="alert") == 2


def test_request_score_edge_separates_reached_from_not(
        start_server: Callable[..., MonitorServer], geometry: dict) -> None:
    """The request-score histogram over a real socket: with a threshold equal to one
    request's peak (a score below 0.1, where the edges were once rounded to 6 decimals),
    the requests above that threshold's bucket edge on /metrics are exactly those whose
    verdict reached the severity (the tracker's ``peak >= t``), and the edge is the
    largest float below t (a Prometheus bucket holds ``<= le``)."""
    srv = start_server(extra=["--policy-watch-s", "0"], name="edges")
    assert srv.policy_path is not None
    xs = [make_rows(geometry, "harmful_intent", 1) for _ in range(2)]  # ~0.05 each

    def send(x: torch.Tensor) -> monitor_pb2.Verdict:
        r = rid("edge")  # one single-row frame per stream: each row scored alone
        out = stream(srv, [frame_msg(1, 2, x, [Span(r, 1, 0, 1)]), fin(r)])
        (v,) = [v for v in verdicts(out, r, final=True) if v.detector == "harmful_intent"]
        return v

    peaks = sorted(send(x).peak_score for x in xs)
    assert peaks[0] < peaks[1] < 0.1, peaks
    t = peaks[1]
    srv.policy_path.write_text(POLICY_V1.replace('"test-v1"', '"edge-v1"').replace(
        "thresholds: {warn: 0.5, critical: 0.9}", f"thresholds: {{warn: {t!r}, critical: 0.9}}"))
    srv.signal(signal.SIGHUP)
    assert eventually(lambda: srv.metric("safety_monitor_policy_info", version="edge-v1") == 1)
    got = [send(x) for x in xs]
    assert sorted(v.peak_score for v in got) == peaks  # the same rows score the same
    reached = sum(v.severity == monitor_pb2.SEVERITY_WARN for v in got)
    assert reached == 1  # the peak equal to t reached warn, the lower one did not
    s = srv.metrics()
    name = "safety_monitor_request_score_bucket"
    les = [dict(lab)["le"] for (n, lab), _ in s.items()
           if n == name and dict(lab)["detector"] == "harmful_intent"]
    edge = max((le for le in les if le != "+Inf" and float(le) < t), key=float, default=None)
    assert edge is not None and float(edge) == math.nextafter(t, 0.0), (t, sorted(les))
    count = srv.metric("safety_monitor_request_score_count", detector="harmful_intent")
    assert count == 2
    assert count - srv.metric(name, detector="harmful_intent", le=edge) == reached


def test_oversized_frame_in_stream(server: MonitorServer, geometry: dict) -> None:
    n = MAX_FRAME // (D_MODEL * 4) + 8  # above max_frame_bytes, below the gRPC limit
    r, ok_id = rid("big"), rid("ok")
    before = server.metric("safety_monitor_frames_rejected_total", reason="oversized")
    out = stream(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", n),
                                    [Span(r, n, 0, n)]), *good_tail(geometry, 2, ok_id)])
    assert [(e.code, e.reason) for e in errors(out)] == [(EXHAUSTED, "oversized")]
    assert str(MAX_FRAME) in errors(out)[0].message
    assert server.metric("safety_monitor_frames_rejected_total", reason="oversized") - \
        before == 1
    assert_stream_usable(out, ok_id)


def test_frame_over_grpc_limit_kills_only_that_call(server: MonitorServer,
                                                    geometry: dict) -> None:
    n = GRPC_LIMIT // (D_MODEL * 4) + 16
    r = rid("huge")
    with pytest.raises(grpc.RpcError) as exc:
        stream(server, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", n),
                                  [Span(r, n, 0, n)])])
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.alive()
    ok_id = rid("ok")
    assert_stream_usable(stream(server, good_tail(geometry, 1, ok_id)), ok_id)


def test_out_of_order_seq(server: MonitorServer, geometry: dict) -> None:
    r = rid("ooo")
    x = make_rows(geometry, "harmful_intent", 4)
    before = server.metric("safety_monitor_frames_rejected_total", reason="out_of_order")
    out = stream(server, [frame_msg(5, 2, x, [Span(r, 4, 0, 4)]),
                          frame_msg(5, 2, x, [Span(r, 4, 4, 4)]),
                          frame_msg(3, 2, x, [Span(r, 4, 8, 4)]),
                          *good_tail(geometry, 6, rid("ok"))[:1],
                          fin(r)])
    errs = errors(out)
    assert [(e.code, e.reason, e.seq) for e in errs] == [
        (INVALID, "out_of_order", 5), (INVALID, "out_of_order", 3)]
    assert server.metric("safety_monitor_frames_rejected_total", reason="out_of_order") - \
        before == 2
    final = {v.detector: v for v in verdicts(out, r, final=True)}
    assert final["harmful_intent"].n_tokens_scored == 4


def test_unknown_request(server: MonitorServer, geometry: dict) -> None:
    r, ghost, ok_id = rid("late"), rid("ghost"), rid("ok")
    x = make_rows(geometry, "harmful_intent", 4)
    before = server.metric("safety_monitor_frames_rejected_total", reason="unknown_request")
    out = stream(server, [
        # never seen on this server (its rows went elsewhere): a final with every in-scope
        # position missing, not a refusal (3 prompt rows; 2 tokens sampled, 1 ran)
        monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
            request_id=ghost, reason="stop", n_prompt_tokens=3, n_generated_tokens=2)),
        frame_msg(1, 2, x, [Span(r, 4, 0, 4)]),
        fin(r),
        frame_msg(2, 2, x, [Span(r, 4, 4, 4)]),  # late: r already finished
        fin(r),  # finished twice
        fin(ghost),  # the ghost too
        *good_tail(geometry, 3, ok_id),
    ])
    errs = errors(out)
    assert [(e.code, e.reason, e.request_id) for e in errs] == [
        (INVALID, "unknown_request", r), (INVALID, "unknown_request", r),
        (INVALID, "unknown_request", ghost)]
    assert errs[0].seq == 2
    assert server.metric("safety_monitor_frames_rejected_total", reason="unknown_request") \
        - before == 3
    assert len(verdicts(out, r, final=True)) == 2  # exactly one set of finals
    assert {v.detector: (v.n_tokens_scored, v.n_tokens_unscored)
            for v in verdicts(out, ghost, final=True)} == {"harmful_intent": (0, 3),
                                                           "deception": (0, 1)}
    assert_stream_usable(out, ok_id)


@pytest.fixture(scope="module")
def aux(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    """A second server: 8-row queue, no policy file watcher, 1 s orphan grace."""
    return start_server(extra=["--queue-rows", "8", "--policy-watch-s", "0",
                               "--orphan-grace-s", "1"], name="aux")


def test_queue_full(aux: MonitorServer, geometry: dict) -> None:
    srv = aux
    r, ok_id = rid("shed"), rid("ok")
    out = stream(srv, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 16),
                                 [Span(r, 16, 0, 16)]), fin(r), *good_tail(geometry, 2, ok_id)])
    errs = errors(out)
    assert [(e.code, e.reason, e.seq) for e in errs] == [(EXHAUSTED, "queue_full", 1)]
    assert srv.metric("safety_monitor_frames_rejected_total", reason="queue_full") == 1
    assert srv.metric("safety_monitor_rows_unscored_total", reason="queue_full") == 16
    shed = {v.detector: v for v in verdicts(out, r, final=True)}
    assert shed["harmful_intent"].n_tokens_unscored == 16  # never silently skipped
    assert shed["harmful_intent"].n_tokens_scored == 0
    assert_stream_usable(out, ok_id)
    assert srv.metric("safety_monitor_queue_capacity_rows") == 8


def test_orphans_nobody_adopts_are_finished_after_the_grace(aux: MonitorServer,
                                                             geometry: dict) -> None:
    srv = aux
    r = rid("orphan")
    before = srv.metric("safety_monitor_requests_finished_total", reason="orphaned",
                        model_name=MODEL)
    _break_stream_after(srv, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4, [1]),
                                        [Span(r, 4, 0, 4)])], 4)
    assert eventually(lambda: srv.metric("safety_monitor_requests_finished_total",
                                    reason="orphaned", model_name=MODEL) - before == 1)
    # the alert was audited before the break; the finals (closed by the server, without
    # the client's counts) are on record as incomplete, reason orphaned
    assert eventually(lambda: len([a for a in srv.audit_lines() if a["request_id"] == r]) == 3)
    lines = [a for a in srv.audit_lines() if a["request_id"] == r]
    assert [(a["event"], a.get("incomplete_reason")) for a in lines] == [
        ("alert", None), ("final", "orphaned"), ("final", "orphaned")]
    # once finished, a late frame for it is refused, not silently re-opened
    out = stream(srv, [frame_msg(1, 2, make_rows(geometry, "harmful_intent", 4),
                                 [Span(r, 4, 4, 8)])])
    assert [(e.reason, e.request_id) for e in errors(out)] == [("unknown_request", r)]


# ------------------------------------------------------------------ unary Score


def test_score_unary(server: MonitorServer, geometry: dict, bundle_dir: Path) -> None:
    from monitor.score import Scorer, load_bundle

    x = make_rows(geometry, "harmful_intent", 5, pushed=[3])
    frame = encode_frame(x, seq=1, model=MODEL, layer=2, spans=[])
    stub = monitor_pb2_grpc.MonitorStub(server.channel)
    resp = stub.Score(monitor_pb2.ScoreRequest(frame=frame), timeout=10)
    got = {d.detector: np.array(d.scores) for d in resp.detectors}
    scorer = Scorer(load_bundle(bundle_dir))
    want = scorer.score(2, x)
    for j, det in enumerate(scorer.detectors_on(2)):
        np.testing.assert_allclose(got[det], want[:, j], rtol=1e-5, atol=1e-6)
    assert got["harmful_intent"][3] > 0.99 > 0.1 > got["harmful_intent"][0]


@pytest.mark.parametrize("reason", ["d_model_mismatch", "non_finite", "unknown_layer"])
def test_score_unary_errors(server: MonitorServer, geometry: dict, reason: str) -> None:
    x = make_rows(geometry, "harmful_intent", 4)
    layer = 2
    if reason == "non_finite":
        x[1, 0] = float("nan")
    elif reason == "unknown_layer":
        layer = 0
    frame = encode_frame(x, seq=1, model=MODEL, layer=layer, spans=[])
    if reason == "d_model_mismatch":
        frame.shape[:] = [8, 32]
    stub = monitor_pb2_grpc.MonitorStub(server.channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Score(monitor_pb2.ScoreRequest(frame=frame), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(reason + ":")


# ------------------------------------------------------------------ policy reload

POLICY_V2 = """\
version: "test-v2"
detectors:
  harmful_intent:
    mode: alert
    scope: prompt
    thresholds: {warn: 0.42, critical: 0.77}
"""


def _plan(srv: MonitorServer) -> monitor_pb2.CapturePlan:
    return monitor_pb2_grpc.MonitorStub(srv.channel).GetCapturePlan(
        monitor_pb2.GetCapturePlanRequest(), timeout=5)


def test_policy_hot_reload(start_server: Callable[..., MonitorServer], geometry: dict) -> None:
    admin_port = free_port()  # Admin is off unless given its own address
    srv = start_server(extra=["--policy-watch-s", "0.2", "--admin-port", str(admin_port)],
                       name="reload")
    assert srv.policy_path is not None
    plan1 = _plan(srv)
    assert list(plan1.layers) == [2, 3]

    # 1. file watch: a valid new policy is picked up; plan and metrics follow
    srv.policy_path.write_text(POLICY_V2)
    assert eventually(lambda: srv.metric("safety_monitor_policy_info", version="test-v2") == 1)
    plan2 = _plan(srv)
    assert list(plan2.layers) == [2] and plan2.plan_id != plan1.plan_id
    assert list(plan2.token_kinds) == [monitor_pb2.TOKEN_KIND_PROMPT]
    assert srv.metric("safety_monitor_policy_info", version="test-v1") == 0
    assert srv.metric("safety_monitor_policy_reloads_total", result="ok") == 1
    # verdicts now carry the new version
    r = rid("v2")
    out = stream(srv, good_tail(geometry, 1, r))
    assert {v.policy_version for v in verdicts(out, r)} == {"test-v2"}
    assert f'le="{threshold_edge(0.77)!r}"' in srv.metrics_text()

    # 2. an invalid file is refused: old policy stays, refusal counted and logged
    srv.policy_path.write_text("version: \"broken\"\ndetectors:\n  harmful_intent:\n"
                               "    thresholds: {warn: 0.9, critical: 0.5}\n")
    assert eventually(lambda: srv.metric("safety_monitor_policy_reloads_total",
                                    result="refused") == 1)
    assert srv.metric("safety_monitor_policy_info", version="test-v2") == 1
    assert list(_plan(srv).layers) == [2]
    assert "refused" in srv.log()

    # 3. a detector the bundle lacks is refused too (check_policy error)
    admin_channel = grpc.insecure_channel(f"127.0.0.1:{admin_port}")
    admin = monitor_pb2_grpc.AdminStub(admin_channel)
    srv.policy_path.write_text(POLICY_V2.replace("harmful_intent", "no_such_detector"))
    resp = admin.ReloadPolicy(monitor_pb2.ReloadPolicyRequest(), timeout=10)
    assert not resp.ok and resp.policy_version == "test-v2"
    assert "no_such_detector" in resp.message

    # 4. Admin RPC reload of a valid file
    srv.policy_path.write_text(POLICY_V1)
    resp = admin.ReloadPolicy(monitor_pb2.ReloadPolicyRequest(), timeout=10)
    assert resp.ok and resp.policy_version == "test-v1", resp.message
    assert list(_plan(srv).layers) == [2, 3]
    admin_channel.close()

    # 5. SIGHUP reload (the watcher would also see it; either way it must land)
    srv.policy_path.write_text(POLICY_V2.replace("test-v2", "test-v3"))
    srv.signal(signal.SIGHUP)
    assert eventually(lambda: srv.metric("safety_monitor_policy_info", version="test-v3") == 1)
    assert srv.alive()


def test_sighup_reload_without_watcher(aux: MonitorServer) -> None:
    srv = aux  # runs after test_queue_full (file order): it changes the policy
    assert srv.policy_path is not None
    srv.policy_path.write_text(POLICY_V2)
    time.sleep(0.3)
    assert srv.metric("safety_monitor_policy_info", version="test-v1") == 1  # no watcher
    srv.signal(signal.SIGHUP)
    assert eventually(lambda: srv.metric("safety_monitor_policy_info", version="test-v2") == 1)
    assert srv.metric("safety_monitor_policy_reloads_total", result="ok") == 1
    assert list(_plan(srv).layers) == [2]
    assert srv.stop() == 0  # graceful SIGTERM: drained, exit 0


# ------------------------------------------------------------------ startup errors


def test_startup_errors_exit_2_without_traceback(tmp_path: Path, bundle_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from monitor.cli import main

    bad_bundle = tmp_path / "bundle"
    bad_bundle.mkdir()
    (bad_bundle / "manifest.json").write_text(json.dumps({"format": "nope"}))
    # as a real process: exit status and stderr
    r = subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--bundle",
                        str(bad_bundle), "--port", "0", "--metrics-port", "-1"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bundle refused" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("safety-monitor: error:")

    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text("version: 1\ndetectors: {}\n")
    rc = main(["serve", "--bundle", str(bundle_dir), "--policy", str(bad_policy),
               "--port", "0", "--metrics-port", "-1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "policy refused" in err and "p.yaml:1" in err and "Traceback" not in err


def test_cli_check_and_plan(tmp_path: Path, bundle_dir: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from monitor.cli import main

    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY_V1)
    assert main(["check", "--bundle", str(bundle_dir), "--policy", str(pol)]) == 0
    capsys.readouterr()
    pol.write_text(POLICY_V1.replace("deception", "nonexistent"))
    assert main(["check", "--bundle", str(bundle_dir), "--policy", str(pol)]) == 1
    assert "nonexistent" in capsys.readouterr().out
    assert main(["plan", "--bundle", str(bundle_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"] == [2, 3] and doc["hook_name_template"].startswith("blocks.")


def test_replay_client_fires_alerts(server: MonitorServer) -> None:
    from monitor.tools.replay import ReplayConfig, run_replay

    res = run_replay(ReplayConfig(target=server.target, n_requests=4, prompt_len=12,
                                  gen_len=4, push_fraction=1.0, seed=3, dtype="fp32",
                                  concurrency=2), out=None)
    assert res.errors == []
    assert len([v for v in res.verdicts if v.final]) == 4 * 2
    pushed_judged = {r for r, (det, _) in res.pushed.items()
                     if det in ("harmful_intent", "deception")}
    escalated = {v.request_id for v in res.verdicts if not v.final}
    assert pushed_judged and pushed_judged <= escalated
