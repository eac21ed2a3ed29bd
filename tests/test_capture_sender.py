"""The capture plugin's sender in a child process (`SAFETY_MONITOR_SENDER=process`).

Real processes and sockets: the worker side (`monitor.capture.sender.ProcessTransport`)
starts `python -m monitor.capture.sender_child`, which streams over loopback gRPC to the
recording sink of `tests/capture_sink.py`.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from capture_sink import CaptureSink
from conftest import eventually, thread_masks
from test_capture_cuda import HOOKS, _run

from monitor.capture.config import CaptureConfig
from monitor.capture.sender import ProcessTransport
from monitor.capture.transport import HostRing, StepRecord
from monitor.tools.net import free_port
from monitor.v1 import monitor_pb2
from monitor.wire.hooks import resid_post

D = 8
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("generated_only", [False, True], ids=["all_rows", "generated"])
def test_process_sender_sends_exactly_the_thread_senders_frames(generated_only: bool) -> None:
    """Prefill (chunked), mixed, decode and padded forwards and a finished request through
    a CaptureSession over the stand-in runner: the process sender delivers the same frames
    (hook, spans, rows bit for bit) and the same RequestFinished as the thread sender, and
    its stats (worker + child merged) count them alike."""
    th, ts, tf = _run(False, False, generated_only, sender="thread")
    pr, ps, pf = _run(False, False, generated_only, sender="process")
    assert len(th) == len(pr) and len(pr) >= 3 * len(HOOKS)
    for a, b in zip(th, pr, strict=True):
        assert a[:3] == b[:3]
        assert np.array_equal(a[3], b[3])
    assert tf == pf and len(pf) >= 1
    for k in ("sent_frames", "sent_rows", "sent_bytes", "steps_sent", "dropped_frames"):
        assert ts[k] == ps[k], k
    assert ps["sender_starts"] == 1 and ps["sender_deaths"] == 0 and ps["pipe_full"] == 0


def _verdicts(msg: monitor_pb2.ClientMessage) -> list[monitor_pb2.ServerMessage]:
    """The sink's answer to the first frame of r0: a block, a plain verdict, a progress."""
    if msg.WhichOneof("body") != "frame" or msg.frame.seq != 1:
        return []
    def verdict(mode: str, severity: monitor_pb2.Severity) -> monitor_pb2.ServerMessage:
        return monitor_pb2.ServerMessage(verdict=monitor_pb2.Verdict(
            request_id="r0", detector="harmful_intent", score=0.99, mode=mode,
            severity=severity))

    return [verdict("block", monitor_pb2.SEVERITY_CRITICAL),
            verdict("alert", monitor_pb2.SEVERITY_WARN),
            monitor_pb2.ServerMessage(judged_through=monitor_pb2.JudgedThrough(
                request_id="r0", position=2))]


def test_process_sender_brings_block_verdicts_and_progress_to_the_session() -> None:
    """A block verdict from the sidecar reaches `CaptureSession.on_verdict` in the worker
    (one block order for r0) and `JudgedThrough` reaches the block board, as with the
    thread sender; only those cross back (the child counts every verdict)."""
    _, ts, _ = _run(False, False, False, sender="thread", replies=_verdicts)
    _, ps, _ = _run(False, False, False, sender="process", replies=_verdicts)
    for st in (ts, ps):
        assert (st["blocks_ordered"], st["blocks_unresolved"], st["judged_r0"]) == (1, 0, 2)
        assert st["verdicts"] == 2


def _step(ring: HostRing, step: int) -> StepRecord | None:
    """A two-point step of 5 rows (values tell step and point apart), or None: no slot."""
    slot = ring.acquire()
    if slot is None:
        return None
    v = ring.view(slot)
    for k in range(2):
        v[k, :5] = torch.arange(5 * D, dtype=torch.float32).view(5, D) + 1000 * k + 10000 * step
    return StepRecord(ring=ring, slot=slot, step=step, plan_id="test-plan-1", model=MODEL,
                      points=(resid_post(3), resid_post(15)), n_rows=5,
                      spans=[("req-a", 2, 7, 9, 2), ("req-b", 3, 0, 100, 5)],
                      labels={"req-a": "ticket-a"})


def _process_transport(sink: CaptureSink) -> ProcessTransport:
    """A process sender to `sink` (fast reconnects and reports), not started."""
    cfg = CaptureConfig(addr=sink.addr, model=MODEL, plan_timeout_s=5.0, backoff_s=0.05,
                        backoff_max_s=0.2, stats_period_s=0.1, client_id="test-client",
                        sender="process")
    return ProcessTransport(cfg, MODEL)


def _start(t: ProcessTransport) -> HostRing:
    """Fetch the plan, make a 4-slot ring of `_step`'s shape, start and wait connected."""
    assert t.fetch_plan(10.0) is not None
    ring = t.make_ring(slots=4, budget_mb=16, n_layers=2, max_rows=8, d_model=D,
                       dtype=torch.float32)
    t.start()
    assert eventually(lambda: t.connected, 20.0)
    return ring


def test_process_sender_survives_sidecar_down_and_a_killed_child() -> None:
    """Sidecar stopped: steps are dropped and counted in the worker, never queued; the
    sidecar back: frames flow, and its ClientStats include the worker's drops. The child
    SIGKILLed: the death is counted, the steps it held are counted as dropped, every slot
    is free again, steps meanwhile are dropped and counted; a new child starts, reconnects
    and sends again."""
    sink = CaptureSink(port=free_port(), d_model=D, layers=(3, 15)).start()
    t = _process_transport(sink)
    step = 0

    def send(n: int) -> list[bool]:
        nonlocal step
        out = []
        for _ in range(n):
            step += 1
            rec = _step(ring, step)
            out.append(rec is not None and t.submit_step(rec))
        return out

    try:
        ring = _start(t)
        assert all(send(2))
        assert eventually(lambda: sink.n_frames() == 4, 20.0)
        with sink.lock:
            fr = sink.log.frames[0]
        assert fr.spans == [("ticket-a", 2, 7, 9), ("req-b", 3, 0, 100)]
        assert np.array_equal(fr.x, (torch.arange(5 * D).view(5, D) + 10000).numpy())
        # sidecar down
        sink.stop()
        assert eventually(lambda: not t.connected, 20.0)
        assert send(3) == [False] * 3
        st = t.stats()
        assert (st["dropped_frames"], st["dropped_rows"]) == (6, 30)
        assert ring.free_slots() == ring.n_slots
        sink.start()
        assert eventually(lambda: t.connected, 20.0)
        assert all(send(1))
        assert eventually(lambda: sink.n_frames() == 6, 20.0)
        assert eventually(lambda: any(s.dropped_frames >= 6 for s in sink.log.stats), 20.0)
        # the child killed (after its report of the 6 frames: a killed child's last
        # 0.25 s of counts die with it)
        assert eventually(lambda: t.stats()["sent_frames"] == 6, 20.0)
        pid = t.proc.pid if t.proc is not None else 0
        os.kill(pid, signal.SIGKILL)
        assert eventually(lambda: t.stats()["sender_deaths"] == 1, 20.0)
        assert send(2) == [False, False] or t.connected  # restarted already: both fine
        assert ring.free_slots() == ring.n_slots
        assert eventually(lambda: t.connected and t.stats()["sender_starts"] == 2, 20.0)
        before = sink.n_frames()
        assert all(send(2))
        assert eventually(lambda: sink.n_frames() == before + 4, 20.0)
        st = t.stats()
        assert st["sender_alive"] and st["sender_pid"] != pid
        assert eventually(lambda: t.stats()["sent_frames"] == 10, 20.0)  # 6 + the new 4
    finally:
        t.close()
        sink.stop()
    assert t.proc is not None and t.proc.poll() is not None, "the child exits on close"


def test_a_callers_nul_or_bad_label_never_costs_the_co_batched_requests_rows() -> None:
    """An API caller writes its correlation id (`vllm_xargs`) and, through the body's
    `request_id`, part of its engine request id: any JSON string, NUL included. A step
    batching that request with another goes out whole over the process sender to the
    sidecar (before, the worker refused the record: the step, every co-batched request's
    rows with it, was dropped for as long as the caller's request ran). The request id is
    carried exactly (a key); a label the wire would not carry as is (NUL or another
    control, a lone surrogate, over 256 bytes) is replaced as `correlation_id` does
    (U+FFFD, cut) and counted (`labels_replaced`)."""
    sink = CaptureSink(port=free_port(), d_model=D, layers=(3, 15)).start()
    t = _process_transport(sink)
    nul_id = "chatcmpl-x\x00y-1234abcd"  # the engine id of a body `request_id` "x\0y"
    # (spans, labels) of each step; the victim "req-a" (label "ticket-a") 2 rows, then 3
    # rows of the caller's request; what the sink shows (label, else request id)
    cases = [
        ("req-b", {"req-a": "ticket-a", "req-b": "x\x00"}, "x\ufffd"),
        (nul_id, {"req-a": "ticket-a"}, nul_id),
        ("req-b", {"req-a": "ticket-a", "req-b": "\ud800" + "é" * 200},
         "\ufffd" + "é" * 126),  # 3 + 252 bytes: the next é would pass 256
    ]
    try:
        ring = _start(t)
        for step, (rid, labels, _) in enumerate(cases, 1):
            rec = _step(ring, step)
            assert rec is not None
            rec.spans = [("req-a", 2, 7, 9, 2), (rid, 3, 0, 100, 5)]
            rec.labels = labels
            assert t.submit_step(rec), f"step {step} dropped"
        assert eventually(lambda: sink.n_frames() == 2 * len(cases), 20.0)
        with sink.lock:
            frames = list(sink.log.frames)
            shown = dict(sink.labels)
        for i, fr in enumerate(frames):
            step, k = i // 2 + 1, i % 2
            assert fr.spans == [("ticket-a", 2, 7, 9), (cases[step - 1][2], 3, 0, 100)]
            want = torch.arange(5 * D).view(5, D) + 1000 * k + 10000 * step
            assert np.array_equal(fr.x, want.numpy())
        assert shown == {"req-a": "ticket-a", "req-b": cases[2][2]}  # latest label of b
        st = t.stats()
        assert (st["dropped_frames"], st["labels_replaced"]) == (0, 2)
        assert eventually(lambda: t.stats()["sent_rows"] == 5 * 2 * len(cases), 20.0)
    finally:
        t.close()
        sink.stop()


def test_a_callers_huge_request_id_never_costs_the_co_batched_requests_rows() -> None:
    """The body's `request_id` (part of the engine id) has no length limit in the API: a
    300 kB one made the step's record pass the socket's datagram limit (~208 KiB by
    default), and the whole step, every co-batched request's rows with it, was dropped
    (EMSGSIZE). Now an id over `MAX_WIRE_REQUEST_ID_BYTES` goes out as "" (the sidecar
    refuses that span on its own) and is counted (`ids_refused`); an id at the limit is
    carried exactly; the other request's rows arrive exactly."""
    from monitor.capture.sender import MAX_WIRE_REQUEST_ID_BYTES, encode_step

    sink = CaptureSink(port=free_port(), d_model=D, layers=(3, 15)).start()
    t = _process_transport(sink)
    huge = "chatcmpl-" + "x" * 300_000
    edge = "r" * MAX_WIRE_REQUEST_ID_BYTES  # at the limit: carried exactly
    try:
        ring = _start(t)
        for step, rid in enumerate((huge, edge), 1):
            rec = _step(ring, step)
            assert rec is not None
            rec.spans = [("req-a", 2, 7, 9, 2), (rid, 3, 0, 100, 5)]
            rec.labels = {"req-a": "ticket-a"}
            assert encode_step(1, rec)[2] == (rid == huge)
            assert t.submit_step(rec), f"step {step} dropped"
        assert eventually(lambda: sink.n_frames() == 4, 20.0)
        with sink.lock:
            frames = list(sink.log.frames)
        for i, fr in enumerate(frames):
            step, k = i // 2 + 1, i % 2
            assert fr.spans == [("ticket-a", 2, 7, 9), ("" if step == 1 else edge, 3, 0, 100)]
            want = torch.arange(5 * D).view(5, D) + 1000 * k + 10000 * step
            assert np.array_equal(fr.x, want.numpy())
        st = t.stats()
        assert (st["dropped_frames"], st["ids_refused"]) == (0, 1)
    finally:
        t.close()
        sink.stop()


def test_the_child_runs_the_workers_package_not_one_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child imports the worker's own `monitor` (the worker's package root on
    PYTHONPATH), never one in the worker's working directory: `python -m` put the cwd
    first on `sys.path`, so vLLM started beside another `monitor` (a checkout, a common
    name) ran a child of other code, whose `STEP` framing need not match (every step then
    dropped as malformed)."""
    other = tmp_path / "monitor"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('not the worker\'s monitor')\n")
    monkeypatch.chdir(tmp_path)
    sink = CaptureSink(port=free_port(), d_model=D, layers=(3, 15)).start()
    t = _process_transport(sink)
    try:
        ring = _start(t)
        rec = _step(ring, 1)
        assert rec is not None and t.submit_step(rec)
        assert eventually(lambda: sink.n_frames() == 2, 20.0)
        assert t.stats()["sender_deaths"] == 0
    finally:
        t.close()
        sink.stop()


def test_step_record_framing_round_trip_and_refusals() -> None:
    """`encode_step` / `decode_step` carry slot, step, rows, plan id, spans (unicode ids,
    NUL included, correlation ids only where set) exactly; a truncated or padded payload,
    id lengths that do not add up, rows that do not add up, an oversized or mistyped
    datagram are refused naming what is wrong; long messages reassemble from parts."""
    from monitor.capture.sender import (
        _HEAD,
        _STEP,
        M_STATS,
        FrameError,
        Reassembler,
        decode_step,
        encode_step,
        packets,
    )

    ring = HostRing(2, 2, 8, D, torch.float32)
    spans = [("req-ä", 2, 7, 9, 2), ("req-b", 3, 0, 100, 5), ("c", 0, 4, 4, 1)]
    rec = StepRecord(ring=ring, slot=1, step=42, plan_id="plan-x", model=MODEL,
                     points=(resid_post(3), resid_post(15)), n_rows=5, spans=spans,
                     max_frame_bytes=1 << 20, labels={"req-b": "ticket-é"})
    b, replaced, _ = encode_step(7, rec)
    assert replaced == 0
    got = Reassembler().feed(b)
    assert got is not None and got[0] == 3
    payload = got[1]
    assert decode_step(payload) == (7, 1, 42, 5, 1 << 20, "plan-x", spans,
                                    {"req-b": "ticket-é"})
    rec.labels = {}
    assert decode_step(encode_step(7, rec)[0][_HEAD.size:])[7] == {}
    for bad, what in ((payload[:-1], "STEP: expected"), (payload + b"x", "STEP: expected"),
                      (payload[:10], "at least")):
        with pytest.raises(FrameError, match=what):
            decode_step(bad)
    # ids are length-prefixed: a NUL (a caller writes part of the engine id and all of
    # its label) is carried, the request id exactly, the label cleaned and counted
    rec.spans = [("a\0b", 5, 0, 0, 1)]
    rec.labels = {"a\0b": "x\0y"}
    b, replaced, _ = encode_step(7, rec)
    assert replaced == 1
    assert decode_step(b[_HEAD.size:])[6:] == (rec.spans, {"a\0b": "x\ufffdy"})
    # id lengths that do not add up to the id bytes (the first id one byte longer)
    at = _HEAD.size + _STEP.size + len("plan-x") + 24
    bad_lens = bytearray(b)
    bad_lens[at] += 1
    with pytest.raises(FrameError, match="lengths summing to 3 / 5 bytes, found 4 / 5"):
        decode_step(bytes(bad_lens[_HEAD.size:]))
    rec.spans, rec.n_rows = spans, 6
    with pytest.raises(FrameError, match="summing to n_rows 6"):
        decode_step(encode_step(7, rec)[0][_HEAD.size:])
    with pytest.raises(FrameError, match="datagram length"):
        Reassembler().feed(_HEAD.pack(10, 3, 0) + b"abc")
    big = bytes(range(256)) * 1000  # 256 kB: five parts
    asm = Reassembler()
    parts = packets(M_STATS, big)
    assert len(parts) > 1 and [asm.feed(p) for p in parts[:-1]] == [None] * (len(parts) - 1)
    assert asm.feed(parts[-1]) == (M_STATS, big)
    with pytest.raises(FrameError, match="message type"):
        asm2 = Reassembler()
        asm2.feed(parts[0])
        asm2.feed(packets(3, b"x")[0])


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs this process may use")
def test_process_sender_child_stays_off_the_model_threads_cpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CPU worker preloads libgomp and sets `GOMP_CPU_AFFINITY` to the model
    thread's cores; a child started with that environment is pinned there by libgomp as it
    loads (the control below shows it). The sender child must run, every thread of it, on
    the reader thread's placed CPUs instead, and its environment carries no OpenMP
    binding."""
    import subprocess

    from monitor.capture.sender import OMP_BINDING_VARS, child_env
    from monitor.capture.threads import CpuSpec, Placement

    cpus = sorted(os.sched_getaffinity(0))
    model, plugin = cpus[0], cpus[1]
    gomp = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if not gomp:
        pytest.skip("this torch build ships no libgomp to preload")
    monkeypatch.setenv("LD_PRELOAD", str(gomp[0]))
    monkeypatch.setenv("GOMP_CPU_AFFINITY", str(model))
    monkeypatch.setenv("OMP_PROC_BIND", "true")
    env = child_env(os.environ)
    assert not set(OMP_BINDING_VARS) & set(env) and env["OMP_NUM_THREADS"] == "1"
    assert env["LD_PRELOAD"] == str(gomp[0])
    # control: the worker's environment as is pins a child started on `plugin` to `model`
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"
    raw = subprocess.run(["taskset", "-c", str(plugin), sys.executable, "-c", probe],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    assert raw.stdout.strip() == f"[{model}]", raw.stdout

    sink = CaptureSink(port=free_port(), d_model=D, layers=(3, 15)).start()
    cfg = CaptureConfig(addr=sink.addr, model=MODEL, plan_timeout_s=5.0, backoff_s=0.05,
                        stats_period_s=0.1, client_id="test-client", sender="process")
    placement = Placement(CpuSpec("list", frozenset({plugin})), frozenset({model}))
    t = ProcessTransport(cfg, MODEL, placement=placement)
    try:
        assert t.fetch_plan(10.0) is not None
        t.start()
        assert eventually(lambda: t.connected, 20.0)
        assert t.thread_cpus == frozenset({plugin})
        pid = t.proc.pid if t.proc is not None else 0
        masks = [m for _, m in thread_masks(pid).values()]
        assert len(masks) >= 2  # main + the Transport's sender thread (+ gRPC's)
        assert all(m == {plugin} for m in masks), masks
    finally:
        t.close()
        sink.stop()
