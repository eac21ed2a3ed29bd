"""Same-pod shared-memory ring (issue 9) over a real socket: a `safety-monitor serve --shm`
subprocess reads frame bytes from a client's ring file (`monitor.wire.shm`) while gRPC
carries only metadata plus `ShmRef(slot, sequence, byte_length)`.

Proved here: verdicts equal the bytes path (raw frames and the plugin's `Transport`);
hostile references (slot outside the ring, length beyond the slot, a huge claimed length,
stale sequence, bytes as well, a truncated file, no ring negotiated) are refused in-stream,
counted, charged to their request, and never crash the server or allocate the claimed size;
hostile ring offers (path tricks, symlink, wrong token, short file) are refused and the
stream keeps working with bytes; a torn read (slot rewritten while read) is detected; a
frame finding the ring full goes as bytes (nothing lost); the transport falls back to bytes
against a server without `--shm` and re-offers the ring after a reconnect. The ring
directory is a fresh folder under /dev/shm (a tmp folder where there is none): the same
file operations.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import D_MODEL, MODEL, MonitorServer, eventually, submit_rows
from test_server_integration import errors, fin, make_rows, rid, stream, verdicts

from monitor.capture.config import CaptureConfig
from monitor.capture.transport import Transport
from monitor.roles import TokenRole
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame
from monitor.wire import shm as shm_mod
from monitor.wire.hooks import parse_hook_name
from monitor.wire.shm import ShmMiss, ShmRingReader, ShmRingWriter

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="sm-shm-test-", dir=base) as d:
        yield Path(d)


@pytest.fixture(scope="module")
def server(start_server: Callable[..., MonitorServer], shm_dir: Path) -> MonitorServer:
    return start_server(extra=["--policy-watch-s", "0", "--shm", "--shm-dir", str(shm_dir),
                               "--audit-finals"], name="shm")


@pytest.fixture(scope="module")
def plain(start_server: Callable[..., MonitorServer]) -> MonitorServer:
    """A server without --shm."""
    return start_server(extra=["--policy-watch-s", "0", "--audit-finals"], name="no-shm")


def _payload(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.uint8).numpy().reshape(-1)


def ring_frame(w: ShmRingWriter, seq: int, layer: int, x: torch.Tensor, spans: list[Span],
               **ref_over: int) -> monitor_pb2.ClientMessage:
    """A frame whose rows `x` are written into a slot of `w`; `ref_over` overrides
    fields of the `ShmRef` (a hostile client's claims)."""
    slot = w.acquire()
    assert slot is not None
    payload = _payload(x)
    sequence = w.write(slot, payload)
    ref = monitor_pb2.ShmRef(slot=slot, sequence=sequence, byte_length=payload.nbytes)
    for k, v in ref_over.items():
        setattr(ref, k, v)
    return monitor_pb2.ClientMessage(frame=encode_frame(
        x, seq=seq, model=MODEL, layer=layer, spans=spans, shm=ref))


def hello(w: ShmRingWriter | None, offer: monitor_pb2.ShmRing | None = None
          ) -> monitor_pb2.ClientMessage:
    ring = offer if offer is not None else (w.hello() if w is not None else None)
    return monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
        client_id=f"shm-test-{rid('c')}", model=MODEL, wire_version=2, shm_ring=ring))


def ring_answers(out: list[monitor_pb2.ServerMessage]) -> list[monitor_pb2.ShmRingAnswer]:
    return [m.shm_ack.ring for m in out if m.HasField("shm_ack") and m.shm_ack.HasField("ring")]


def slot_acks(out: list[monitor_pb2.ServerMessage]) -> list[tuple[int, int]]:
    return [(s, q) for m in out if m.HasField("shm_ack")
            for s, q in zip(m.shm_ack.slots, m.shm_ack.sequences, strict=True)]


def _rows(geometry: dict, n: int) -> dict[int, torch.Tensor]:
    torch.manual_seed(0)
    return {2: make_rows(geometry, "harmful_intent", n, pushed=(3,)),
            3: make_rows(geometry, "deception", n, pushed=(5,))}


def _spans(request_id: str, n: int, n_prompt: int) -> list[Span]:
    return [Span(request_id, n_prompt, 0, n_prompt, int(TokenRole.OTHER)),
            Span(request_id, n - n_prompt, n_prompt, n_prompt, int(TokenRole.GENERATED))]


def _same_finals(a: dict[str, monitor_pb2.Verdict], b: dict[str, monitor_pb2.Verdict]) -> None:
    assert set(a) == set(b) == {"harmful_intent", "deception"}
    for det, va in a.items():
        vb = b[det]
        assert (vb.severity, vb.crossed_at_position, vb.n_tokens_scored, vb.n_tokens_unscored,
                vb.score, vb.peak_score) == (va.severity, va.crossed_at_position,
                                             va.n_tokens_scored, va.n_tokens_unscored,
                                             va.score, va.peak_score), det
    assert a["harmful_intent"].severity == monitor_pb2.SEVERITY_CRITICAL  # not all-zero


def _bytes_frames(rows: dict[int, torch.Tensor], request_id: str, dtype: torch.dtype,
                 seq0: int = 1) -> list[monitor_pb2.ClientMessage]:
    return [monitor_pb2.ClientMessage(frame=encode_frame(
        x.to(dtype), seq=seq0 + i, model=MODEL, layer=layer, spans=_spans(request_id, 8, 4)))
        for i, (layer, x) in enumerate(sorted(rows.items()))]


def _finals(out: list[monitor_pb2.ServerMessage], request_id: str
            ) -> dict[str, monitor_pb2.Verdict]:
    return {v.detector: v for v in verdicts(out, request_id, final=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_frames_give_the_bytes_verdicts(server: MonitorServer, shm_dir: Path,
                                             geometry: dict, dtype: torch.dtype) -> None:
    rows = _rows(geometry, 8)
    raw_id, ring_id = rid("bytes"), rid("ring")
    out_raw = stream(server, [*_bytes_frames(rows, raw_id, dtype), fin(raw_id)])
    w = ShmRingWriter(shm_dir, 4, 64 << 10)
    try:
        msgs = [ring_frame(w, i, layer, x.to(dtype), _spans(ring_id, 8, 4))
                for i, (layer, x) in enumerate(sorted(rows.items()), start=1)]
        out_ring = stream(server, [hello(w), *msgs, fin(ring_id)])
    finally:
        w.close()
    assert not w.path.exists()  # the writer removes its file
    assert not errors(out_raw) and not errors(out_ring), errors(out_ring)
    assert [a.accepted for a in ring_answers(out_ring)] == [True]
    assert all(not m.frame.data for m in msgs)  # the bytes went through the ring
    # every slot acknowledged, with the sequence it was written with
    assert sorted(slot_acks(out_ring)) == sorted((m.frame.shm.slot, m.frame.shm.sequence)
                                                 for m in msgs)
    _same_finals(_finals(out_raw, raw_id), _finals(out_ring, ring_id))


def test_hostile_ring_references_refused_counted_per_request(server: MonitorServer,
                                                             shm_dir: Path,
                                                             geometry: dict) -> None:
    """Every claim of a ShmRef is checked against the ring before reading: refused
    in-stream with its own reason, counted, the rows charged to their request, the stream
    and the server go on; a good frame after them is scored."""
    x = make_rows(geometry, "harmful_intent", 4)
    r = rid("hostile")
    sp = [Span(r, 4, 0, 4, int(TokenRole.OTHER))]
    reasons = ("shm_bad_ref", "shm_stale", "oversized", "shm_not_negotiated")
    before = {k: server.metric("safety_monitor_frames_rejected_total", reason=k)
              for k in reasons}
    w = ShmRingWriter(shm_dir, 2, 4 * D_MODEL * 4)  # each slot holds exactly 4 rows
    try:
        bad_slot = ring_frame(w, 1, 2, x, sp, slot=2)  # slot == n_slots
        w.reset()
        stale = ring_frame(w, 2, 2, x, sp)
        stale.frame.shm.sequence += 7  # a sequence the slot never held
        w.reset()
        # a length beyond the slot, consistent with its shape (so it passes the shape check)
        big_x = make_rows(geometry, "harmful_intent", 5)
        too_long = monitor_pb2.ClientMessage(frame=encode_frame(
            big_x, seq=3, model=MODEL, layer=2, spans=[Span(r, 5, 4, 4, 0)],
            shm=monitor_pb2.ShmRef(slot=0, sequence=1, byte_length=5 * D_MODEL * 4)))
        # a ~1 EB claim: refused on size, nothing allocated
        huge_rows = (1 << 60) // (D_MODEL * 4)
        huge = monitor_pb2.ClientMessage(frame=monitor_pb2.ActivationFrame(
            seq=4, model=MODEL, layer=2, dtype=monitor_pb2.DTYPE_FLOAT32,
            shape=[huge_rows, D_MODEL], spans=[monitor_pb2.RowSpan(
                request_id=r, n_rows=4, start_position=0, prompt_len=4)],
            shm=monitor_pb2.ShmRef(slot=0, sequence=1, byte_length=huge_rows * D_MODEL * 4)))
        both = ring_frame(w, 5, 2, x, sp)
        both.frame.data = _payload(x).tobytes()  # bytes in data as well
        w.reset()
        good = ring_frame(w, 6, 2, x, sp)
        out = stream(server, [hello(w), bad_slot, stale, too_long, huge, both, good, fin(r)])
        # truncated under the server: short reads, refused, never a SIGBUS
        r2 = rid("trunc")
        w.reset()
        cut = ring_frame(w, 1, 2, x, [Span(r2, 4, 0, 4, int(TokenRole.OTHER))])
        msgs = [hello(w), cut, fin(r2)]

        def truncate_after_hello() -> Iterator[monitor_pb2.ClientMessage]:
            yield msgs[0]
            time.sleep(0.5)  # the server opened and checked the ring
            os.truncate(w.path, 4096)
            yield from msgs[1:]

        stub = monitor_pb2_grpc.MonitorStub(server.channel)
        out_cut = list(stub.Stream(truncate_after_hello(), timeout=60))
    finally:
        w.close()
    assert [a.accepted for a in ring_answers(out)] == [True]
    got = [(e.reason, e.seq) for e in errors(out)]
    assert got == [("shm_bad_ref", 1), ("shm_stale", 2), ("shm_bad_ref", 3), ("oversized", 4),
                   ("shm_bad_ref", 5)], got
    msg = {e.seq: e.message for e in errors(out)}
    assert "expected < n_slots=2, found 2" in msg[1]
    assert "claims" in msg[2] and "holds sequence" in msg[2]
    assert f"expected at most slot_bytes={4 * D_MODEL * 4}" in msg[3]
    assert "data: expected no bytes" in msg[5]
    finals = _finals(out, r)
    assert finals["harmful_intent"].n_tokens_scored == 4  # the good frame
    # the refused frames' rows are charged to the request: bad slot and stale (prompt rows;
    # the 1 EB claim and the frame with bytes twice are refused before any row is trusted)
    assert finals["harmful_intent"].n_tokens_unscored == 4 + 4
    assert [(e.reason, e.seq) for e in errors(out_cut)] == [("shm_bad_ref", 1)]
    assert "truncated" in errors(out_cut)[0].message
    assert _finals(out_cut, r2)["harmful_intent"].n_tokens_unscored == 4
    # without an accepted ring: refused, not read
    r3 = rid("noring")
    w2 = ShmRingWriter(shm_dir, 1, 64 << 10)
    try:
        out_no = stream(server, [hello(None), ring_frame(w2, 1, 2, x, [Span(
            r3, 4, 0, 4, int(TokenRole.OTHER))]), fin(r3)])
    finally:
        w2.close()
    assert [e.reason for e in errors(out_no)] == ["shm_not_negotiated"]
    assert not ring_answers(out_no) and not slot_acks(out_no)
    after = {k: server.metric("safety_monitor_frames_rejected_total", reason=k)
             for k in reasons}
    assert after == {"shm_bad_ref": before["shm_bad_ref"] + 4,
                     "shm_stale": before["shm_stale"] + 1,
                     "oversized": before["oversized"] + 1,
                     "shm_not_negotiated": before["shm_not_negotiated"] + 1}
    assert server.alive()


def test_hostile_ring_offers_refused_and_bytes_still_served(
        server: MonitorServer, plain: MonitorServer, shm_dir: Path, geometry: dict) -> None:
    w = ShmRingWriter(shm_dir, 2, 64 << 10)
    outside = Path(tempfile.mkdtemp(prefix="sm-outside-"))
    (outside / w.name).write_bytes(w.path.read_bytes())
    link = shm_dir / f"safety-monitor-{'ab' * 16}.ring"
    link.symlink_to(outside / w.name)
    short = shm_dir / f"safety-monitor-{'cd' * 16}.ring"
    short.write_bytes(w.path.read_bytes()[:4096])
    try:
        def offer(**over: object) -> monitor_pb2.ShmRing:
            o = w.hello()
            for k, v in over.items():
                setattr(o, k, v)
            return o

        cases = {
            "path": (offer(name=f"../{outside.name}/{w.name}"), "expected a file name"),
            "symlink": (offer(name=link.name), "expected a ring file"),
            "token": (offer(token=b"x" * 16), "header token"),
            "geometry": (offer(n_slots=3), "expected a file of at least"),
            "short": (offer(name=short.name), "expected a file of at least"),
            "slot_bytes": (offer(slot_bytes=1 << 40), "the server's max_frame_bytes"),
            "missing": (offer(name=f"safety-monitor-{'ef' * 16}.ring"), "found none"),
        }
        n0 = server.metric("safety_monitor_frames_rejected_total", reason="shm_ring_refused")
        x = make_rows(geometry, "harmful_intent", 4)
        for case, (o, why) in cases.items():
            r = rid(case)
            out = stream(server, [hello(None, o), monitor_pb2.ClientMessage(frame=encode_frame(
                x, seq=1, model=MODEL, layer=2, spans=[Span(r, 4, 0, 4)])), fin(r)])
            answers = ring_answers(out)
            assert [a.accepted for a in answers] == [False], case
            assert why in answers[0].reason, (case, answers[0].reason)
            assert not errors(out), case  # bytes frames still served on that stream
            assert _finals(out, r)["harmful_intent"].n_tokens_scored == 4, case
        assert server.metric("safety_monitor_frames_rejected_total",
                             reason="shm_ring_refused") == n0 + len(cases)
        # a server without --shm refuses every offer; the stream is served with bytes
        r = rid("plain")
        out = stream(plain, [hello(w), monitor_pb2.ClientMessage(frame=encode_frame(
            x, seq=1, model=MODEL, layer=2, spans=[Span(r, 4, 0, 4)])), fin(r)])
        assert [(a.accepted, "without --shm" in a.reason) for a in ring_answers(out)] == [
            (False, True)]
        assert _finals(out, r)["harmful_intent"].n_tokens_scored == 4
    finally:
        w.close()
        link.unlink()
        short.unlink()


def test_torn_read_detected(shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer reuses the slot while the reader copies it: the sequence after the read
    differs, so the copy is refused (shm_torn), never returned as the frame's bytes."""
    w = ShmRingWriter(shm_dir, 1, 4096)
    r = ShmRingReader.open(shm_dir, w.hello(), max_slot_bytes=4096)
    try:
        slot = w.acquire()
        assert slot == 0
        seq = w.write(slot, np.arange(64, dtype=np.uint8))
        ref = monitor_pb2.ShmRef(slot=0, sequence=seq, byte_length=64)
        assert r.read(ref) == bytes(range(64))
        real = shm_mod.os.pread

        def racing_pread(fd: int, n: int, off: int) -> bytes:
            if n == 64:  # the payload read: the writer rewrites the slot meanwhile
                w.write(0, np.full(64, 7, dtype=np.uint8))
            return real(fd, n, off)

        monkeypatch.setattr(shm_mod.os, "pread", racing_pread)
        with pytest.raises(ShmMiss) as e:
            r.read(ref)
        assert e.value.reason == "shm_torn" and f"changed from {seq}" in e.value.message
        monkeypatch.setattr(shm_mod.os, "pread", real)
        with pytest.raises(ShmMiss) as e:  # the new write's sequence is not the claim
            r.read(ref)
        assert e.value.reason == "shm_stale"
        # acks: only the sequence in flight frees a slot
        w.reset()
        s0 = w.acquire()
        assert s0 == 0 and w.acquire() is None  # one slot: the ring is full
        q = w.write(0, np.zeros(8, np.uint8))
        assert not w.release(0, q + 1) and not w.release(5, q) and w.free_slots() == 0
        assert w.release(0, q) and w.free_slots() == 1 and not w.release(0, q)
    finally:
        r.close()
        w.close()


def _transport(srv: MonitorServer, shm_dir: Path, **over: object) -> Transport:
    kw: dict = dict(addr=srv.target, model=MODEL, plan_timeout_s=5.0, queue_size=16,
                    backoff_s=0.05, backoff_max_s=0.2, stats_period_s=0.1,
                    client_id=f"shm-transport-{rid('t')}", shm=True, shm_dir=str(shm_dir))
    kw.update(over)
    t = Transport(CaptureConfig(**kw), MODEL)
    t.start()
    return t


def _submit(t: Transport, rows: dict[int, torch.Tensor], request_id: str, step: int) -> None:
    submit_rows(t, rows, request_id, step)
    t.submit_finished(monitor_pb2.RequestFinished(request_id=request_id, reason="stop",
                                                  n_prompt_tokens=4, n_generated_tokens=5))


def _audit_finals(srv: MonitorServer, request_id: str) -> dict[str, dict]:
    finals: dict[str, dict] = {}
    eventually(lambda: len(finals.update({a["detector"]: a for a in srv.audit_lines()
                                     if a["request_id"] == request_id
                                     and a["event"] == "final"}) or finals) >= 2)
    return finals


def test_transport_sends_through_the_ring(server: MonitorServer, shm_dir: Path,
                                          geometry: dict) -> None:
    rows = _rows(geometry, 8)
    want_id = rid("want")
    want = _finals(stream(server, [*_bytes_frames(rows, want_id, torch.float32),
                                   fin(want_id)]), want_id)
    t = _transport(server, shm_dir)
    try:
        assert eventually(lambda: t.connected and t._shm_on.is_set()), server.log()[-2000:]
        assert t.shm is not None and t.shm.path.exists()
        r = rid("tring")
        _submit(t, rows, r, 1)
        finals = _audit_finals(server, r)
        assert set(finals) == set(want), (finals, server.log()[-2000:])
        for det, v in want.items():
            assert finals[det]["n_tokens_scored"] == v.n_tokens_scored > 0
            assert finals[det]["peak_score"] == pytest.approx(v.peak_score, abs=1e-6)
        st = t.stats()
        assert st["shm_frames"] == 2 and st["sent_frames"] == 2 and st["dropped_frames"] == 0
        assert st["sent_bytes"] == 2 * 8 * D_MODEL * 4
        assert eventually(lambda: t.shm is not None and t.shm.free_slots() == t.shm.n_slots)
        path = t.shm.path
    finally:
        t.close()
    assert not path.exists()


def test_ring_full_sends_bytes_and_loses_nothing(server: MonitorServer, shm_dir: Path,
                                                 geometry: dict,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot and no acknowledgements: the first frame of the step takes the slot, the
    second finds the ring full and goes with its bytes in `data` (counted `shm_full`),
    nothing dropped: both detectors score their rows, the finals are complete."""
    rows = _rows(geometry, 8)
    t = _transport(server, shm_dir, shm_slots=1)
    try:
        assert eventually(lambda: t.connected and t._shm_on.is_set())
        assert t.shm is not None
        monkeypatch.setattr(t.shm, "release", lambda slot, sequence: False)  # acks withheld
        r = rid("full")
        _submit(t, rows, r, 1)
        finals = _audit_finals(server, r)
        st = t.stats()
        assert (st["shm_full"], st["shm_frames"], st["sent_frames"], st["dropped_frames"]) == (
            1, 1, 2, 0)
        assert st["sent_bytes"] == 2 * 8 * D_MODEL * 4
        assert t.plan is not None
        assert [parse_hook_name(hp.name).layer for hp in t.plan.points] == [2, 3]
        assert finals["harmful_intent"]["n_tokens_scored"] == 4  # layer 2, through the ring
        d = finals["deception"]  # layer 3, as bytes
        assert (d["n_tokens_scored"], d["n_tokens_unscored"], d["incomplete"]) == (4, 0, False)
    finally:
        t.close()


def test_transport_falls_back_to_bytes_and_reoffers_after_reconnect(
        start_server: Callable[..., MonitorServer], plain: MonitorServer, shm_dir: Path,
        geometry: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(geometry, 8)
    t = _transport(plain, shm_dir)
    try:
        assert eventually(lambda: t.connected and t.stats()["shm_refused"] == 1)
        r = rid("fallback")
        _submit(t, rows, r, 1)
        assert _audit_finals(plain, r)["harmful_intent"]["n_tokens_scored"] == 4
        st = t.stats()
        assert st["shm_frames"] == 0 and st["sent_frames"] == 2 and st["dropped_frames"] == 0
    finally:
        t.close()
    # reconnect: the sidecar restarts on the same port; the ring is offered again, accepted,
    # every slot free again (the old stream's frames are gone)
    port_holder: dict[str, int] = {}
    srv1 = start_server(extra=["--policy-watch-s", "0", "--shm", "--shm-dir", str(shm_dir),
                               "--audit-finals"], name="shm-restart1")
    port_holder["port"] = srv1.port
    t = _transport(srv1, shm_dir, shm_slots=2)
    try:
        assert eventually(lambda: t.connected and t._shm_on.is_set())
        assert t.shm is not None
        monkeypatch.setattr(t.shm, "release", lambda slot, sequence: False)  # slots stay used
        r1 = rid("before")
        _submit(t, rows, r1, 1)
        assert _audit_finals(srv1, r1)["harmful_intent"]["n_tokens_scored"] == 4
        assert t.shm.free_slots() == 0
        monkeypatch.undo()
        srv1.stop()
        assert eventually(lambda: not t.connected)
        real_free_port = conftest.free_port
        monkeypatch.setattr(conftest, "free_port",
                            lambda: port_holder.pop("port", None) or real_free_port())
        srv2 = start_server(extra=["--policy-watch-s", "0", "--shm", "--shm-dir",
                                   str(shm_dir), "--audit-finals"], name="shm-restart2")
        assert srv2.port == srv1.port
        assert eventually(lambda: t.connected and t._shm_on.is_set(), 60), srv2.log()[-2000:]
        assert t.shm.free_slots() == 2 and t.stats()["reconnects"] >= 1
        r2 = rid("after")
        _submit(t, rows, r2, 2)
        finals = _audit_finals(srv2, r2)
        assert finals["harmful_intent"]["n_tokens_scored"] == 4
        assert finals["deception"]["n_tokens_scored"] == 4
        assert t.stats()["shm_frames"] == 4
        srv2.stop()
    finally:
        t.close()
