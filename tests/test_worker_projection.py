"""In-worker projection (issue 9) over a real socket: a `safety-monitor serve --worker-projection`
subprocess offers each judged hook point's packed first-GEMM weights in the capture plan;
frames of projected rows (`x · W`, plus var(x) where needed) get the same verdicts and scores
as hidden-state frames of the same rows; projected frames naming a stale projection or with a
wrong width are refused in-stream and counted; the plugin's transport projects on its sender
thread and sends fewer bytes. The server is real; the client is the plugin's `Transport`
(no vLLM: rows are written into its ring as the capture op would).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from conftest import D_MODEL, MODEL, MonitorServer, submit_rows
from test_server_integration import INVALID, errors, fin, make_rows, rid, stream, verdicts

from monitor.capture.config import CaptureConfig
from monitor.capture.projection import WorkerProjection
from monitor.capture.transport import Plan, Transport
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    return start_server(extra=["--policy-watch-s", "0", "--worker-projection",
                                              "--audit-finals"],
                        name="projection")


def _plan(srv: MonitorServer) -> monitor_pb2.CapturePlan:
    stub = monitor_pb2_grpc.MonitorStub(srv.channel)
    return stub.GetCapturePlan(monitor_pb2.GetCapturePlanRequest(), timeout=10)


def _projections(srv: MonitorServer) -> dict[str, WorkerProjection]:
    p = _plan(srv)
    return {hp.hook_name: WorkerProjection.from_proto(hp, D_MODEL, "p") for hp in p.projections}


def _rows(geometry: dict, n: int) -> dict[int, torch.Tensor]:
    torch.manual_seed(0)
    return {2: make_rows(geometry, "harmful_intent", n, pushed=(3,)),
            3: make_rows(geometry, "deception", n, pushed=(5,))}


def _frames(rows: dict[int, torch.Tensor], request_id: str, n_prompt: int,
            proj: dict[str, WorkerProjection] | None) -> list[monitor_pb2.ClientMessage]:
    n = next(iter(rows.values())).shape[0]
    spans = [Span(request_id, n, 0, n_prompt)]
    out = []
    for seq, (layer, x) in enumerate(sorted(rows.items()), start=1):
        hook = f"blocks.{layer}.hook_resid_post"
        wp = (proj or {}).get(hook)
        data, version = (x, "") if wp is None else (wp.project(x), wp.version)
        out.append(monitor_pb2.ClientMessage(frame=encode_frame(
            data, seq=seq, model=MODEL, layer=layer, spans=spans, hook_name=hook,
            projection=version)))
    return out


def test_plan_carries_exact_projections(server: MonitorServer) -> None:
    plan = _plan(server)
    by_hook = {p.hook_name: p for p in plan.projections}
    assert set(by_hook) == set(plan.hook_names)  # probes + JumpReLU SAE: all exact
    for h, p in by_hook.items():
        assert p.version.endswith(h) and plan.bundle_sha256.startswith(p.version.split(":")[0])
        assert len(p.w) == p.d_model * p.n_cols * 4 and p.d_model == D_MODEL
        assert 0 < p.n_cols < D_MODEL


def test_projected_frames_give_the_raw_verdicts(server: MonitorServer, geometry: dict) -> None:
    proj = _projections(server)
    rows = _rows(geometry, 8)
    raw_id, proj_id = rid("raw"), rid("proj")
    out_raw = stream(server, [*_frames(rows, raw_id, 4, None), fin(raw_id)])
    out_proj = stream(server, [*_frames(rows, proj_id, 4, proj), fin(proj_id)])
    assert not errors(out_raw) and not errors(out_proj), (errors(out_raw), errors(out_proj))
    a = {v.detector: v for v in verdicts(out_raw, raw_id, final=True)}
    b = {v.detector: v for v in verdicts(out_proj, proj_id, final=True)}
    assert set(a) == set(b) == {"harmful_intent", "deception"}
    for det, va in a.items():
        vb = b[det]
        assert vb.severity == va.severity and vb.crossed_at_position == va.crossed_at_position
        assert vb.n_tokens_scored == va.n_tokens_scored > 0
        assert vb.score == pytest.approx(va.score, abs=1e-4)
        assert vb.peak_score == pytest.approx(va.peak_score, abs=1e-4)
    # the pushed rows cross: the comparison is not between two all-zero verdicts
    assert a["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL
    assert a["deception"].severity == monitor_pb2.SEVERITY_CRITICAL


def test_stale_and_wrong_width_projections_refused_and_counted(server: MonitorServer,
                                                               geometry: dict) -> None:
    proj = _projections(server)
    wp = proj["blocks.2.hook_resid_post"]
    x = make_rows(geometry, "harmful_intent", 4)
    r = rid("bad")
    stale0 = server.metric("safety_monitor_frames_rejected_total", reason="stale_projection")
    width0 = server.metric("safety_monitor_frames_rejected_total", reason="d_model_mismatch")

    def frame(seq: int, data: torch.Tensor, version: str) -> monitor_pb2.ClientMessage:
        return monitor_pb2.ClientMessage(frame=encode_frame(
            data, seq=seq, model=MODEL, layer=2, spans=[Span(r, 4, 0, 4)],
            hook_name=wp.hook_name, projection=version))

    stale = "0" * 16 + ":" + wp.hook_name  # another bundle's projection
    out = stream(server, [frame(1, wp.project(x), stale),
                          frame(2, wp.project(x)[:, :-1], wp.version),  # one column short
                          frame(3, x, wp.version),  # hidden states claiming a projection
                          frame(4, wp.project(x), wp.version), fin(r)])
    assert [(e.code, e.reason, e.seq) for e in errors(out)] == [
        (INVALID, "stale_projection", 1), (INVALID, "d_model_mismatch", 2),
        (INVALID, "d_model_mismatch", 3)]
    assert "expected projection width" in errors(out)[1].message
    finals = {v.detector: v for v in verdicts(out, r, final=True)}
    assert finals["harmful_intent"].n_tokens_scored == 4  # the good frame still counts
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="stale_projection") == stale0 + 1
    assert server.metric("safety_monitor_frames_rejected_total",
                         reason="d_model_mismatch") == width0 + 2


def test_server_without_flag_refuses_projected_frames(start_server: Callable[..., MonitorServer],
                                                      server: MonitorServer,
                                                      geometry: dict) -> None:
    plain = start_server(extra=["--policy-watch-s", "0"], name="no-projection")
    assert not _plan(plain).projections
    r = rid("p")
    out = stream(plain, [*_frames(_rows(geometry, 8), r, 4, _projections(server)), fin(r)])
    assert {e.reason for e in errors(out)} == {"stale_projection"}
    plain.stop()


def test_projection_from_proto_checks_sizes() -> None:
    w = torch.randn(D_MODEL, 3)
    p = monitor_pb2.HookProjection(hook_name="blocks.2.hook_resid_post", version="v",
                                   d_model=D_MODEL, n_cols=3, w=w.numpy().tobytes(), needs_var=True)
    wp = WorkerProjection.from_proto(p, D_MODEL, "f")
    x = torch.randn(5, D_MODEL)
    got = wp.project(x)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got[:, :3], x @ w)
    torch.testing.assert_close(got[:, 3], x.var(dim=1, correction=0))
    short = monitor_pb2.HookProjection()
    short.CopyFrom(p)
    short.w = p.w[:-4]
    with pytest.raises(ValueError, match=r"f\.w: expected 768 bytes .* found 764"):
        WorkerProjection.from_proto(short, D_MODEL, "f")
    big = monitor_pb2.HookProjection()
    big.CopyFrom(p)
    big.n_cols = (1 << 31) - 1  # claims a ~0.5 TB W with 768 bytes present
    with pytest.raises(ValueError, match=r"f\.w: expected"):
        WorkerProjection.from_proto(big, D_MODEL, "f")
    with pytest.raises(ValueError, match=r"f\.d_model: expected the plan's d_model=32"):
        WorkerProjection.from_proto(p, 32, "f")
    # a plan with one bad projection keeps its rows raw for that hook point, logged
    plan = monitor_pb2.CapturePlan(plan_id="x", model=MODEL, d_model=D_MODEL, layers=[2, 3],
                                   hook_names=["blocks.2.hook_resid_post",
                                               "blocks.3.hook_resid_post"],
                                   projections=[short, monitor_pb2.HookProjection(
                                       hook_name="blocks.3.hook_resid_post", version="v3",
                                       d_model=D_MODEL, n_cols=3, w=w.numpy().tobytes())])
    assert set(Plan.from_proto(plan).projections) == {"blocks.3.hook_resid_post"}


def test_transport_projects_on_its_sender_thread(server: MonitorServer, geometry: dict) -> None:
    """The plugin's transport against the real server: the same rows as hidden states and
    projected give the same final verdicts; projected bytes are k (+1) float32 per row."""
    rows = _rows(geometry, 8)
    raw_id, proj_id = rid("traw"), rid("tproj")
    out_raw = stream(server, [*_frames(rows, raw_id, 4, None), fin(raw_id)])
    want = {v.detector: v for v in verdicts(out_raw, raw_id, final=True)}
    cfg = CaptureConfig(addr=server.target, model=MODEL, plan_timeout_s=5.0, queue_size=16,
                        backoff_s=0.05, backoff_max_s=0.2, stats_period_s=0.1,
                        client_id="projection-test")
    t = Transport(cfg, MODEL)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not t.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.connected and t.plan is not None
        plan = t.plan
        assert set(plan.projections) == {hp.name for hp in plan.points}
        ring = submit_rows(t, rows, proj_id)
        t.submit_finished(monitor_pb2.RequestFinished(request_id=proj_id, reason="stop"))
        deadline = time.monotonic() + 30
        finals: dict[str, dict] = {}
        while time.monotonic() < deadline and len(finals) < 2:
            finals = {a["detector"]: a for a in server.audit_lines()
                      if a["request_id"] == proj_id and a["event"] == "final"}
            time.sleep(0.1)
        assert set(finals) == set(want), (finals, server.log()[-2000:])
        for det, w in want.items():
            assert finals[det]["severity"] == monitor_pb2.Severity.Name(
                w.severity).removeprefix("SEVERITY_").lower()
            assert finals[det]["n_tokens_scored"] == w.n_tokens_scored
            assert finals[det]["peak_score"] == pytest.approx(w.peak_score, abs=1e-4)
        width = sum(wp.width for wp in plan.projections.values())
        assert t.stats()["sent_bytes"] == 8 * width * 4  # vs 8 * 2 * D_MODEL * 4 raw
        assert ring.free_slots() == 1  # the sender released the host ring slot
    finally:
        t.close()
