"""The sender process of `SAFETY_MONITOR_SENDER=process` (see `monitor.capture.sender`).

Run by the worker as `python -m monitor.capture.sender_child FD PARENT_PID`, FD being its
end of a `SOCK_SEQPACKET` socketpair. It runs the ordinary `Transport` (the one owner of
plan, hello, frames, shm ring, finishes, ClientStats, reconnects and verdicts) fed from
the socket instead of the worker's threads:

- main thread: reads the worker's messages (`CONFIG` first, then `RING` with the ring's
  descriptor, `STEP` records → `Transport.submit_step` on the mapped ring slot, `FIN`,
  `DROP`, `PLAN_REPLY`); EOF (the worker exited or closed) ends the process;
- the Transport's sender thread: on each plan asks the worker (`PLAN`, waits for
  `PLAN_REPLY`: the session validates and installs it), tells it when a stream starts and
  ends (`STATE`), forwards block verdicts and `JudgedThrough` (`SERVER`; nothing else);
- a stats thread: the Transport's counters to the worker every 0.25 s (`STATS`, JSON).

Parent death: EOF on the socket, `PR_SET_PDEATHSIG` (SIGTERM, Linux), and a check that the
parent is still `PARENT_PID` right after that is set.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading

from monitor.capture.config import CaptureConfig
from monitor.capture.enforce import is_block
from monitor.capture.sender import (
    _DROP,
    _STEP,
    M_CONFIG,
    M_DROP,
    M_FIN,
    M_PLAN,
    M_PLAN_REPLY,
    M_RING,
    M_SERVER,
    M_STATE,
    M_STATS,
    M_STEP,
    FrameError,
    Reassembler,
    SharedHostRing,
    decode_step,
    send_all,
)
from monitor.capture.transport import Plan, StepRecord, Transport
from monitor.v1 import monitor_pb2
from monitor.wire.hooks import HookPoint

log = logging.getLogger("monitor.capture")

_RECV_BYTES = 4 << 20  # a STEP record is one datagram (its spans: ~50 bytes per request)


class Child:
    """State of the sender process (module docstring). `sock` blocks; sends from several
    threads are whole datagrams (atomic on a SEQPACKET socket)."""

    def __init__(self, sock: socket.socket, cfg: CaptureConfig, model: str,
                 instance_id: str) -> None:
        self.sock = sock
        self.model = model
        self.transport = Transport(cfg, model, on_plan=self._on_plan,
                                   on_verdict=self._on_verdict,
                                   on_judged_through=self._on_judged, on_state=self._on_state)
        self.transport.instance_id = instance_id
        self.rings: dict[int, tuple[SharedHostRing, tuple[HookPoint, ...]]] = {}
        self._reply = threading.Event()
        self._why = ""
        self._points: tuple[HookPoint, ...] = ()  # of the last plan the worker accepted
        self._eof = threading.Event()
        self.bad_records = 0  # STEP records naming an unknown ring / slot (dropped)

    # -------------------------------------------------------------- Transport callbacks
    def _send(self, mtype: int, payload: bytes) -> None:
        if not send_all(self.sock, mtype, payload, timeout=30.0):
            self._eof.set()  # the worker is gone or stuck: stop

    def _on_plan(self, plan: Plan) -> None:
        """Sender thread: the worker validates and installs the plan; ValueError (the
        Transport logs it and retries later) when it refused it."""
        self._reply.clear()
        self._send(M_PLAN, plan.proto)
        while not self._reply.wait(0.1):
            if self._eof.is_set():
                raise ValueError("the worker exited before answering the plan")
        if self._why:
            raise ValueError(self._why)
        # a ring made for this plan came before the reply (one made later takes the
        # points when it comes): the newest ring holds this plan's points
        self._points = plan.points
        if self.rings:
            gen = max(self.rings)
            self.rings[gen] = (self.rings[gen][0], plan.points)

    def _on_verdict(self, v: monitor_pb2.Verdict) -> None:
        if is_block(v):  # the worker acts on blocks only
            self._send(M_SERVER, monitor_pb2.ServerMessage(verdict=v).SerializeToString())

    def _on_judged(self, m: monitor_pb2.JudgedThrough) -> None:
        self._send(M_SERVER, monitor_pb2.ServerMessage(judged_through=m).SerializeToString())

    def _on_state(self, connected: bool) -> None:
        self._send(M_STATE, b"\x01" if connected else b"\x00")

    def _stats_loop(self) -> None:
        while not self._eof.wait(0.25):
            doc = {k: int(v) for k, v in self.transport.stats().items()}
            doc["bad_records"] = self.bad_records
            self._send(M_STATS, json.dumps(doc).encode())

    # -------------------------------------------------------------- main thread
    def run(self) -> None:
        threading.Thread(target=self._stats_loop, name="safety-monitor-child-stats",
                         daemon=True).start()
        self.transport.start()
        try:
            self._read()
        finally:
            self._eof.set()
            self.transport.close()

    def _read(self) -> None:
        buf = bytearray(_RECV_BYTES)
        asm = Reassembler()
        anc = socket.CMSG_SPACE(4)
        while True:
            n, ancdata, flags, _ = self.sock.recvmsg_into([buf], anc)
            fds = [int.from_bytes(d[:4], sys.byteorder) for lvl, typ, d in ancdata
                   if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS]
            if n == 0 and not fds:
                return  # EOF: the worker exited or closed
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise FrameError(f"datagram: expected at most {_RECV_BYTES} bytes and one "
                                 "descriptor, found a truncated one")
            got = asm.feed(bytes(buf[:n]))
            if got is None:
                continue
            mtype, payload = got
            if mtype == M_STEP:
                self._on_step(payload)
            elif mtype == M_FIN:
                self.transport.submit_finished(monitor_pb2.RequestFinished.FromString(payload))
            elif mtype == M_DROP:
                if len(payload) != _DROP.size:
                    raise FrameError(f"DROP: expected {_DROP.size} bytes, found {len(payload)}")
                self.transport.add_worker_drops(*_DROP.unpack(payload))
            elif mtype == M_RING:
                if len(fds) != 1:
                    raise FrameError(f"RING: expected one descriptor, found {len(fds)}")
                doc = json.loads(payload)
                ring = SharedHostRing.attach(doc, fds[0])
                # a new plan brought it: steps still in flight on the previous ring are
                # delivered (or dropped and counted by the Transport's plan check)
                last = max(self.rings, default=None)
                self.rings = {g: r for g, r in self.rings.items() if g == last}
                self.rings[ring.gen] = (ring, self._points)
            elif mtype == M_PLAN_REPLY:
                self._why = payload[1:].decode() if payload[:1] != b"\x01" else ""
                self._reply.set()
            else:
                raise FrameError(f"message type from the worker: expected one of "
                                 f"{[M_STEP, M_FIN, M_DROP, M_RING, M_PLAN_REPLY]}, found "
                                 f"{mtype}")

    def _on_step(self, payload: bytes) -> None:
        try:
            gen, slot, step, n_rows, mfb, plan_id, spans, labels = decode_step(payload)
        except ValueError as e:  # FrameError, bad UTF-8: counted, logged; the stream goes on
            self.bad_records += 1
            log.warning("safety monitor sender: malformed step record dropped: %s", e)
            if len(payload) >= _STEP.size:  # give its slot back when the head names one
                gen, slot = _STEP.unpack_from(payload)[:2]
                got = self.rings.get(gen)
                if got is not None and 0 <= slot < got[0].n_slots:
                    got[0].release(slot)
            return
        got = self.rings.get(gen)
        if got is None or not 0 <= slot < got[0].n_slots or n_rows > got[0].max_rows \
                or len(got[1]) != got[0].n_layers:
            self.bad_records += 1
            if got is not None and 0 <= slot < got[0].n_slots:
                got[0].release(slot)
            self.transport.count_drop(1, n_rows, 0, "step names no ring of this process")
            log.warning("safety monitor sender: step %d names ring %d slot %d rows %d, "
                        "which this process does not hold; dropped", step, gen, slot, n_rows)
            return
        ring, points = got
        rec = StepRecord(ring=ring, slot=slot, step=step, plan_id=plan_id, model=self.model,
                         points=points, n_rows=n_rows, spans=spans, max_frame_bytes=mfb,
                         labels=labels)
        self.transport.submit_step(rec)


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the worker thread that started us ends (Linux); exit now if the
    worker is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:
        sys.exit(0)


def _take_cpus(cpus: object) -> list[int] | None:
    """Set this process's CPU mask to `cpus` (the worker's reader thread's, `CONFIG`
    `cpus`) before any thread starts, so every thread of the child inherits it; returns
    the mask now in force (None where affinity is not supported). A list that is not
    one of ints, or that the kernel refuses, leaves the mask as it is (logged)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    if isinstance(cpus, list) and cpus and all(isinstance(c, int) for c in cpus):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:
            logging.getLogger("monitor.capture").warning(
                "safety monitor: sender process: cpus: expected a mask the kernel "
                "accepts, found %s (%s); left as it is", cpus, e)
    return sorted(os.sched_getaffinity(0))


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m monitor.capture.sender_child FD PARENT_PID")
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    def _term(*_: object) -> None:  # the main thread unwinds: Transport.close runs
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    sock = socket.socket(fileno=fd)
    asm = Reassembler()
    got = None
    while got is None:
        dgram = sock.recv(1 << 16)
        if not dgram:
            return
        got = asm.feed(dgram)
    mtype, payload = got
    if mtype != M_CONFIG:
        raise FrameError(f"first message: expected CONFIG ({M_CONFIG}), found {mtype}")
    doc = json.loads(payload)
    cpus = _take_cpus(doc.get("cpus"))
    cfg = CaptureConfig(**doc["cfg"])
    logger = logging.getLogger("monitor")
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter(
            "%(levelname)s %(asctime)s [%(name)s sender pid %(process)d] %(message)s"))
        logger.addHandler(h)
    logger.setLevel(cfg.log_level.upper())
    logger.info("safety monitor: sender process pid %d runs on cpus %s", os.getpid(), cpus)
    Child(sock, cfg, str(doc["model"]), str(doc["instance_id"])).run()


if __name__ == "__main__":
    main(sys.argv[1:])
