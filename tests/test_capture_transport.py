"""Unit tests of the capture plugin's transport, step bookkeeping and op (no vLLM needed).

The sidecar is the real gRPC sink of `tests/capture_sink.py` in this process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from capture_sink import CaptureSink
from conftest import eventually

from monitor.capture.config import CaptureConfig
from monitor.capture.op import SITE_IN, SITE_OUT, StaticBuffers, set_sink, wrap_decoder_layers
from monitor.capture.steps import StepLayout, StepTracker, correlation_id
from monitor.capture.transport import HostRing, StepRecord, Transport, split_spans
from monitor.roles import TokenRole
from monitor.tools.net import free_port
from monitor.v1 import monitor_pb2
from monitor.wire.hooks import resid_post

OTHER, GEN = int(TokenRole.OTHER), int(TokenRole.GENERATED)

D = 8
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _cfg(addr: str, **kw: Any) -> CaptureConfig:
    base: dict[str, Any] = dict(
                addr=addr, model=MODEL, plan_timeout_s=1.0, queue_size=16, backoff_s=0.05,
                backoff_max_s=0.2, stats_period_s=0.1, client_id="test-client")
    base.update(kw)
    return CaptureConfig(**base)


def _record(ring: HostRing, step: int, layers=(3, 15), n_rows: int = 5,
            plan_id: str = "test-plan-1", max_frame_bytes: int = 1 << 20) -> StepRecord:
    slot = ring.acquire()
    assert slot is not None, "ring full: the test gives every slot back before reusing it"
    v = ring.view(slot)
    for k in range(len(layers)):
        v[k, :n_rows] = torch.arange(n_rows * D, dtype=torch.float32).view(n_rows, D) + 1000 * k \
            + 10000 * step
    spans = [("req-a", 2, 7, 9, 2), ("req-b", n_rows - 2, 0, 100, 5)]
    return StepRecord(ring=ring, slot=slot, step=step, plan_id=plan_id, model=MODEL,
                      points=tuple(resid_post(i) for i in layers), n_rows=n_rows, spans=spans,
                      max_frame_bytes=max_frame_bytes)


@pytest.fixture
def sink():
    s = CaptureSink(port=free_port(), d_model=D, layers=(3, 15)).start()
    yield s
    s.stop()


def test_split_spans_cuts_and_advances_positions():
    spans = [("a", 3, 10, 20, 2), ("b", 4, 0, 2, 4)]
    got = split_spans(spans, 2)
    assert got == [
        (0, 2, [("a", 2, 10, 20, 2)]),
        (2, 4, [("a", 1, 12, 20, 2), ("b", 1, 0, 2, 4)]),
        (4, 6, [("b", 2, 1, 2, 4)]),
        (6, 7, [("b", 1, 3, 2, 4)]),
    ]
    assert split_spans(spans, 100) == [(0, 7, spans)]


def test_drops_counted_when_sidecar_down():
    t = Transport(_cfg(f"127.0.0.1:{free_port()}"), MODEL)
    t.start()
    ring = HostRing(2, 2, 16, D, torch.float32)
    try:
        assert t.fetch_plan(0.2) is None
        for step in range(1, 4):
            rec = _record(ring, step)
            assert t.submit_step(rec) is False
        assert ring.free_slots() == 2, "dropped steps must give their slot back"
        s = t.stats()
        assert not s["connected"]
        assert s["dropped_frames"] == 3 * 2
        assert s["dropped_rows"] == 3 * 2 * 5
        assert s["dropped_bytes"] == 3 * 2 * 5 * D * 4
        # finishes are kept for the next stream (bounded), not dropped with the frames
        assert t.submit_finished(monitor_pb2.RequestFinished(request_id="x")) is True
        assert (t.stats()["finished_backlog"], t.stats()["dropped_finished"]) == (1, 0)
    finally:
        t.close()



def test_send_queue_bound_drops_and_counts_steps_keeps_finishes():
    """The send queue holds at most `queue_size` items: a step past it is dropped and
    counted (slot given back), a finish past it goes to the backlog; nothing blocks."""
    t = Transport(_cfg(f"127.0.0.1:{free_port()}", queue_size=2), MODEL)  # never started
    t._connected.set()  # connected as far as the model thread can tell; nobody drains
    ring = HostRing(4, 2, 16, D, torch.float32)
    assert t.submit_step(_record(ring, 1)) and t.submit_step(_record(ring, 2))
    assert t.submit_step(_record(ring, 3)) is False
    s = t.stats()
    assert (s["queued"], s["dropped_frames"], s["dropped_rows"]) == (2, 2, 2 * 5)
    assert ring.free_slots() == 2, "the dropped step gives its slot back"
    assert t.submit_finished(monitor_pb2.RequestFinished(request_id="x")) is True
    assert (t.stats()["queued"], t.stats()["finished_backlog"]) == (2, 1)

def test_finished_kept_while_down_sent_after_reconnect_bounded(sink):
    # a request that finished while the sidecar was down: its RequestFinished (counts and
    # correlation id) reaches the sidecar after the reconnect, so a restarted sidecar can
    # write its final; the backlog is bounded and what it cannot keep is counted
    t = Transport(_cfg(sink.addr, finished_backlog=2), MODEL)
    t.start()
    try:
        assert eventually(lambda: t.connected)
        assert t.submit_finished(monitor_pb2.RequestFinished(request_id="before"))
        assert eventually(lambda: len(sink.log.finished) == 1)
        sink.stop()
        assert eventually(lambda: not t.connected)
        for r in ("down-1", "down-2"):
            assert t.submit_finished(monitor_pb2.RequestFinished(
                request_id=r, n_generated_tokens=5, correlation_id=f"ticket-{r}")) is True
        assert t.submit_finished(monitor_pb2.RequestFinished(request_id="down-3")) is False
        assert (t.stats()["finished_backlog"], t.stats()["dropped_finished"]) == (2, 1)
        sink.start()
        assert eventually(lambda: len(sink.log.finished) == 3)
        got = [(f.request_id, f.n_generated_tokens, f.correlation_id)
               for f in sink.log.finished]
        assert got == [("before", 0, ""), ("down-1", 5, "ticket-down-1"),
                       ("down-2", 5, "ticket-down-2")]
        assert (t.stats()["finished_backlog"], t.stats()["dropped_finished"]) == (0, 1)
        assert len(sink.log.hellos) == 2
    finally:
        t.close()


def test_hello_first_seq_and_frame_split(sink):
    # plan max_frame_bytes small: 5 rows of 8 float32 = 160 B; force 2 rows per frame
    sink.plan.max_frame_bytes = 64 * 1024 + 2 * D * 4
    t = Transport(_cfg(sink.addr), MODEL)
    t.start()
    try:
        assert eventually(lambda: t.connected)
        ring = HostRing(4, 2, 16, D, torch.float32)
        for step in (1, 2):
            assert t.plan is not None
            rec = _record(ring, step, max_frame_bytes=t.plan.max_frame_bytes)
            assert t.submit_step(rec)
        t.submit_finished(monitor_pb2.RequestFinished(request_id="req-a", reason="stop"))
        assert eventually(lambda: "req-a" in sink.finished())
        assert sink.log.hellos[0].client_id == "test-client"
        assert sink.log.hellos[0].plan_id == "test-plan-1"
        frames = sink.log.frames
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        assert len(frames) == 2 * 2 * 3  # steps x layers x chunks(2+2+1 rows)
        assert all(f.x.shape[0] <= 2 for f in frames)
        # reassemble rows by (request, position) and compare with what was written
        rows = sink.rows_by_request(15)
        want = torch.arange(5 * D, dtype=torch.float32).view(5, D) + 1000 + 20000
        np.testing.assert_array_equal(rows["req-a"][7], want[0].numpy())
        np.testing.assert_array_equal(rows["req-b"][2], want[4].numpy())
        assert ring.free_slots() == 4
        assert not sink.log.seq_errors
    finally:
        t.close()


def test_reconnect_reports_client_stats_and_resumes(sink):
    t = Transport(_cfg(sink.addr), MODEL)
    t.start()
    ring = HostRing(4, 2, 16, D, torch.float32)
    try:
        assert eventually(lambda: t.connected)
        assert t.submit_step(_record(ring, 1))
        assert eventually(lambda: sink.n_frames() == 2)
        sink.stop()
        assert eventually(lambda: not t.connected)
        for step in range(2, 5):  # sidecar down: refuses at once (False), drops and counts
            assert t.submit_step(_record(ring, step)) is False
        assert t.stats()["dropped_frames"] == 6
        sink.start()
        assert eventually(lambda: t.connected)
        assert t.stats()["reconnects"] == 1
        assert eventually(lambda: len(sink.log.stats) >= 1)
        st = sink.log.stats[0]
        assert (st.dropped_frames, st.dropped_rows, st.reconnects) == (6, 30, 1)
        assert t.submit_step(_record(ring, 5))
        assert eventually(lambda: sink.n_frames() == 4)
        new = [f for f in sink.log.frames if f.stream == 2]
        assert [f.seq for f in new] == [1, 2], "seq restarts at 1 on a new stream"
        assert len(sink.log.hellos) == 2
        assert not sink.log.seq_errors
    finally:
        t.close()


def test_ring_full_and_sizing():
    ring = HostRing.sized(slots=8, budget_mb=1, n_layers=2, max_rows=1024, d_model=64,
                          dtype=torch.float32)
    assert ring.n_slots == 2  # 512 KiB per slot, 1 MiB budget
    assert ring.acquire() == 0 and ring.acquire() == 1 and ring.acquire() is None
    ring.release(1)
    assert ring.acquire() == 1


def _fake_runner():
    class St(SimpleNamespace):
        pass

    sp = SimpleNamespace(max_tokens=3, extra_args={"correlation_id": "corr-A"},
                         _all_stop_token_ids={2}, stop_token_ids=[])
    reqs = {
        "a": St(num_prompt_tokens=4, prompt_token_ids=[1] * 4, sampling_params=sp,
                output_token_ids=[]),
        "b": St(num_prompt_tokens=10, prompt_token_ids=[1] * 10,
                sampling_params=SimpleNamespace(max_tokens=50, extra_args=None,
                                                _all_stop_token_ids={2}, stop_token_ids=[]),
                output_token_ids=[]),
    }
    ib = SimpleNamespace(num_reqs=2, req_ids=["a", "b"],
                         num_computed_tokens_cpu=np.array([3, 6], dtype=np.int32))
    return SimpleNamespace(input_batch=ib, requests=reqs,
                           query_start_loc=SimpleNamespace(np=np.array([0, 2, 6], np.int32)))


def _layout(tr: StepTracker, n_tokens: int, positions: np.ndarray, **kw: Any) -> StepLayout:
    """`tr.layout(...)` for a step the tracker can map (None fails the test)."""
    lay = tr.layout(n_tokens, positions, **kw)
    assert lay is not None, "step not mapped"
    return lay


def test_step_tracker_splits_spans_at_role_boundaries_and_filters_roles():
    T, U, S = int(TokenRole.TEMPLATE), int(TokenRole.USER), int(TokenRole.SYSTEM)
    calls: list[int] = []

    def segment(ids):
        calls.append(len(ids))
        n = len(ids)
        r = np.full(n, T, np.int8)
        r[1:n - 2] = U
        if n > 4:
            r[1] = S
        return r

    r = _fake_runner()
    tr = StepTracker(r, max_model_len=100, segment=segment)
    pos = np.array([3, 4, 6, 7, 8, 9, 0, 0], dtype=np.int64)
    lay = _layout(tr, 8, pos)
    # a: prompt 4 -> [T, U, T, T]; rows at 3 (T) and 4 (generated)
    # b: prompt 10 -> [T, S, U x6, T, T]; rows at 6..9 -> U U T T
    assert lay.spans == [("a", 1, 3, 4, T), ("a", 1, 4, 4, GEN),
                         ("b", 2, 6, 10, U), ("b", 2, 8, 10, T)]
    assert lay.ranges == [(0, 6)] and lay.n_rows == 6
    only_user = _layout(tr, 8, pos, roles=frozenset({U, GEN}))
    assert only_user.spans == [("a", 1, 4, 4, GEN), ("b", 2, 6, 10, U)]
    assert only_user.ranges == [(1, 4)]
    assert sorted(calls) == [4, 10]  # once per request, not per step
    # a prompt whose ids do not match its length, or a segmenter that raises -> OTHER
    r.requests["c"] = SimpleNamespace(num_prompt_tokens=3, prompt_token_ids=None,
                                      sampling_params=None, output_token_ids=[])
    r.input_batch.req_ids = ["c", "b"]
    r.input_batch.num_computed_tokens_cpu = np.array([0, 6], dtype=np.int32)
    r.query_start_loc.np = np.array([0, 3, 5], np.int32)
    lay = _layout(tr, 8, np.array([0, 1, 2, 6, 7, 0, 0, 0], np.int64))
    assert lay.spans == [("c", 3, 0, 3, OTHER), ("b", 2, 6, 10, U)]
    assert tr.requests_no_chat_roles == 1


def _cid(value: object) -> str | None:
    """`correlation_id` of a request whose caller sent `vllm_xargs.correlation_id=value`."""
    return correlation_id(SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args={"correlation_id": value})))


def test_correlation_id_is_a_clean_label():
    """The caller's correlation id (`vllm_xargs`, any JSON string) is a label: NUL, the
    other C0 / C1 controls, DEL and lone surrogates each become U+FFFD (a NUL once made the
    process sender refuse the whole step, every co-batched request's rows with it); the
    rest is kept; cut to 256 UTF-8 bytes at a character boundary after the replacement;
    no id / "" -> None."""
    assert _cid("x\x00") == "x\ufffd"
    assert _cid("a\x00b\nc\r\td\x1b[31m\x7f\x85\x9f\ud800e") == (
        "a\ufffdb\ufffdc\ufffd\ufffdd\ufffd[31m" + "\ufffd" * 4 + "e")
    assert _cid("ticket-42 é ✓ 工单") == "ticket-42 é ✓ 工单"  # printable: kept as is
    assert _cid(42) == "42"
    cut = _cid("\x00" * 300)  # 300 x U+FFFD = 900 bytes: cut to whole characters
    assert cut == "\ufffd" * 85 and len(cut.encode()) == 255
    assert _cid("é" * 200) == "é" * 128
    assert _cid("") is None and correlation_id(SimpleNamespace(sampling_params=None)) is None


def test_step_tracker_maps_rows_and_filters_kinds():
    r = _fake_runner()
    tr = StepTracker(r, max_model_len=100)
    pos = np.array([3, 4, 6, 7, 8, 9, 0, 0], dtype=np.int64)  # 2 padding rows
    lay = _layout(tr, 8, pos)
    assert lay.spans == [("a", 1, 3, 4, OTHER), ("a", 1, 4, 4, GEN),
                         ("b", 4, 6, 10, OTHER)]
    assert lay.labels == {"a": "corr-A"}  # engine ids key; the correlation id is a label
    assert lay.contiguous and lay.n_rows == 6
    gen = _layout(tr, 8, pos, prompt=False)
    assert gen.spans == [("a", 1, 4, 4, GEN)] and gen.ranges == [(1, 2)]
    prm = _layout(tr, 8, pos, generated=False)
    assert prm.spans == [("a", 1, 3, 4, OTHER), ("b", 4, 6, 10, OTHER)]
    assert prm.ranges == [(0, 1), (2, 6)]
    # positions that do not match the batch (dummy run) → skipped, never mislabeled
    assert tr.layout(8, np.zeros(8, np.int64)) is None and tr.unmapped_steps == 1
    # finish: "a" hit max_tokens, "b" vanished early without a stop token → abort
    r.requests["a"].output_token_ids = [5, 6, 7]
    # "b" ran its last prompt position (9), so it sampled a token, but output_token_ids
    # holds only a placeholder (-1, not filled in yet): the count sent is what ran
    r.requests["b"].output_token_ids = [-1]
    fa, fb = r.requests.pop("a"), r.requests.pop("b")
    assert fa and fb
    fin = {f.request_id: f for f in tr.collect_finished()}
    assert fin["a"].reason == "length" and fin["a"].n_generated_tokens == 3
    assert fin["a"].n_cached_prompt_tokens == 3
    assert (fin["a"].correlation_id, fin["b"].correlation_id) == ("corr-A", "")
    assert fin["b"].reason == "abort" and fin["b"].n_prompt_tokens == 10
    assert fin["b"].n_generated_tokens == 1 and tr.generated_count_raised == 1
    assert tr.collect_finished() == []


class _Layer(torch.nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, positions, hidden_states, residual):
        residual = hidden_states if residual is None else residual + hidden_states
        return hidden_states * self.k, residual


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(2.0), _Layer(3.0), _Layer(0.5)])

    def forward(self, positions, x):
        h, r = x, None
        for layer in self.layers:
            h, r = layer(positions, h, r)
        return h + r


@pytest.mark.parametrize("compiled", [False, True])
def test_op_captures_residual_stream_eager_and_compiled(compiled):
    got: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    pre: list[tuple[int, torch.Tensor]] = []

    class Sink:
        def on_layer(self, layer, site, hidden, residual, positions):
            if site == SITE_OUT:
                got.append((layer, (hidden + residual).clone(), positions.clone()))
            else:
                pre.append((layer, (hidden if residual is None else hidden + residual).clone()))

    m = _Model()
    bufs = StaticBuffers(3)
    want = {0: frozenset({SITE_IN, SITE_OUT}), 2: frozenset({SITE_OUT})}
    assert wrap_decoder_layers(m.layers, want, bufs.meta) == want
    assert wrap_decoder_layers(m.layers, {0: frozenset({SITE_OUT})}, bufs.meta) == {
        0: want[0]}  # idempotent: the first wrapping stays
    fn = torch.compile(m, backend="aot_eager", dynamic=True) if compiled else m
    x = torch.randn(5, 4)
    pos = torch.arange(5)
    set_sink(Sink())
    try:
        out = fn(pos, x)
        out2 = fn(pos[:3], x[:3])
    finally:
        set_sink(None)
    # reference residual stream after layers 0 and 2
    h0, r0 = x * 2, x
    h1, r1 = h0 * 3, r0 + h0
    h2, r2 = h1 * 0.5, r1 + h1
    torch.testing.assert_close(out, h2 + r2)
    assert [g[0] for g in got] == [0, 2, 0, 2]
    assert [p[0] for p in pre] == [0, 0]
    torch.testing.assert_close(pre[0][1], x)  # resid_pre of layer 0: residual None
    torch.testing.assert_close(got[0][1], h0 + r0)
    torch.testing.assert_close(got[1][1], h2 + r2)
    assert got[2][1].shape == (3, 4) and out2.shape == (3, 4)
    torch.testing.assert_close(got[1][2], pos)
    assert bufs.meta.tolist() == [2, 0, 2]


def test_refused_plan_never_streams(sink, caplog):
    def refuse(plan):
        raise ValueError(f"plan for {plan.model!r} refused")

    t = Transport(_cfg(sink.addr), MODEL, on_plan=refuse)
    with caplog.at_level("ERROR", logger="monitor.capture"):
        t.start()
        try:
            time.sleep(0.8)
            assert not t.connected and sink.n_streams == 0
        finally:
            t.close()
    msgs = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(msgs) == 1, "a refused plan is logged once, clearly"


@pytest.mark.parametrize(("in_dtype", "ring_dtype"), [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("case", ["decode", "padded", "indexed"])
def test_session_copies_every_kind_bit_equal(in_dtype, ring_dtype, case, monkeypatch):
    """`CaptureSession.on_layer` writes each hook kind's kept rows into the ring slot equal,
    bit for bit, to `first.to(ring) + second.to(ring)` (bf16 pairs into a float32 ring are
    widened before the add, never summed in bf16), for an unpadded decode step, a padded
    forward and a step whose kept rows are not a prefix (gathered)."""
    from synthetic_decoder import fake_runner

    from monitor.capture.plugin import CaptureSession
    from monitor.capture.transport import Plan
    from monitor.wire.hooks import HookPoint

    d, n_layers = 16, 2
    if case == "indexed":  # r0 prefills 5 prompt rows (not kept), r1 decodes one row
        runner, keep, n_tokens = fake_runner([5, 3], [0, 3], [5, 1]), [5], 6
    else:
        n_tokens = 4 if case == "padded" else 2
        runner, keep = fake_runner([4, 4], [4, 6], [1, 1]), [0, 1]
    points = tuple(HookPoint.of(layer, kind) for layer, kind in (
        (0, "resid_pre"), (1, "resid_pre"), (1, "resid_mid"), (1, "mlp_out"), (1, "resid_post")))
    s = CaptureSession(runner, _cfg("127.0.0.1:1"), model_name=MODEL, d_model=d,
                       n_layers=n_layers, max_rows=8)
    s.wrapped = {0: frozenset({SITE_IN}), 1: frozenset({SITE_IN, SITE_OUT})}
    s.first_site = (0, SITE_IN)
    s.set_plan(Plan(plan_id="p", model=MODEL, d_model=d, points=points, layers=(0, 1),
                    prompt=False, generated=True, dtype=ring_dtype, max_frame_bytes=1 << 20))
    s.transport._connected.set()  # never started: nothing reads the queue; records kept below
    recs: list[StepRecord] = []
    def submit(rec: StepRecord) -> bool:
        recs.append(rec)
        return True

    monkeypatch.setattr(s.transport, "submit_step", submit)
    g = torch.Generator().manual_seed(7)
    t = [(torch.randn(n_tokens, d, generator=g) * 8).to(in_dtype) for _ in range(5)]
    h0, h1, r1, h2, r2 = t
    nct = runner.input_batch.num_computed_tokens_cpu
    qsl = runner.query_start_loc.np
    pos = torch.from_numpy(np.concatenate(
        [np.arange(c, c + (b - a)) for c, a, b in zip(nct, qsl[:-1], qsl[1:], strict=True)]
        + [np.zeros(n_tokens - int(qsl[-1]), np.int64)]).astype(np.int64))
    s.on_layer(0, SITE_IN, h0, None, pos)
    s.on_layer(1, SITE_IN, h1, r1, pos)
    s.on_layer(1, SITE_OUT, h2, r2, pos)
    assert len(recs) == 1 and recs[0].n_rows == len(keep)
    got = recs[0].ring.view(recs[0].slot)[:, :len(keep)]
    rows = torch.tensor(keep)
    want = [h0[rows].to(ring_dtype), (h1[rows].to(ring_dtype) + r1[rows].to(ring_dtype)),
            r2[rows].to(ring_dtype), h2[rows].to(ring_dtype),
            (h2[rows].to(ring_dtype) + r2[rows].to(ring_dtype))]
    for k, w in enumerate(want):
        assert torch.equal(got[k], w), (points[k].name, in_dtype, ring_dtype, case)
    if (in_dtype, ring_dtype) == (torch.bfloat16, torch.float32):  # the test can tell
        assert not torch.equal((h2[rows] + r2[rows]).to(ring_dtype), want[4])


def test_step_tracker_position_check_skips_empty_requests():
    """The first-row position check compares only requests with rows in this forward: an
    empty request whose start is past the last row is neither an error nor a mismatch;
    any non-empty request whose first row is not at num_computed_tokens unmaps the step."""
    from synthetic_decoder import fake_runner

    r = fake_runner([4, 4, 4], [4, 6, 2], [1, 1, 0])  # r2 has no rows; its start is row 2
    tr = StepTracker(r)
    lay = tr.layout(2, np.array([4, 6], np.int64))
    assert lay is not None and lay.n_rows == 2 and tr.unmapped_steps == 0
    assert [s[0] for s in lay.spans] == ["r0", "r1"]
    assert tr.layout(2, np.array([4, 7], np.int64)) is None and tr.unmapped_steps == 1
    assert tr.layout(2, np.array([5, 6], np.int64)) is None and tr.unmapped_steps == 2
