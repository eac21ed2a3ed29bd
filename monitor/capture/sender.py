"""The capture plugin's sender in a child process (`SAFETY_MONITOR_SENDER=process`).

Why: a sender *thread* in the vLLM worker shares the worker's GIL; encoding frames and
running gRPC there blocks the model thread 0.4-0.8 ms per forward (bench/RESULTS.md,
"What the model pays for work beside it"). Here the worker keeps only what the model
thread does anyway, and the child runs the ordinary `Transport` (plan, hello, frames,
shared-memory ring to the sidecar, RequestFinished backlog, ClientStats, reconnects,
verdicts): one owner for each of those, in another interpreter.

Worker side (this module, `ProcessTransport`, a `Transport` whose sender is the child):

- The host ring is a `SharedHostRing`: the same `[n_slots, n_points, max_rows, d_model]`
  slots in an anonymous shared mapping (`memfd`), passed to the child as a file
  descriptor (`SCM_RIGHTS`: no file name, nothing left in /dev/shm if the worker dies).
  One byte per slot in the same mapping says whether it is in use (1: acquired by the
  model thread) or free (0: released by the child once the rows are encoded, or by the
  worker when it drops the step).
- Model thread, per step: `submit_step` encodes one `STEP` record (slot, step, rows,
  spans with length-prefixed ids, so an id may hold any character; `encode_step`,
  binary, no pickle) and sends it with `MSG_DONTWAIT` on a
  `SOCK_SEQPACKET` socketpair (one record = one datagram: never half written). A full
  socket, a dead child or a disconnected sidecar drops the step and counts it exactly
  as the thread sender's full queue does (`dropped_*`, slot given back).
- One reader thread (`safety-monitor-reader`), blocked in `recv` (GIL released), starts
  the child, answers its plan (the session's `set_plan` validates it: the child streams
  only a plan the worker accepted), forwards block verdicts and `JudgedThrough` to the
  session, keeps the child's latest counters, and restarts a dead child with backoff
  (`backoff_s` doubling to `backoff_max_s`; deaths counted and logged).
- `RequestFinished` goes over the same socket; one that cannot be sent waits in the
  worker's bounded backlog (`finished_backlog`, more: `dropped_finished`), resent by the
  reader thread.
- `stats()` = the worker's own counters + the child's (latest report, every 0.25 s) +
  those of children that died; drops the worker counts are also sent to the child
  (`DROP`), which reports them to the sidecar in `ClientStats`.

Child side: `monitor.capture.sender_child` (run as `python -m` would, from the worker's
own package root, never the working directory: `_CHILD_MAIN`; never forked from vLLM).
It dies with the worker: EOF on the socket, and `PR_SET_PDEATHSIG` (SIGTERM) on Linux,
which fires when the reader thread that started it ends (at `close`).

Framing (both directions): each datagram is `<IBB` (payload bytes, message type, more)
then the payload; a message longer than `_PART` bytes is sent as several datagrams with
`more=1` on all but the last (only the reader thread and the child send those: plans
with projection weights, statistics). Every length is checked against what arrived and
against `_MAX_MESSAGE` before anything is allocated.

Thread rules: `submit_step` / `submit_finished` / `count_drop` / `stats` from any thread,
never blocking; `start` / `close` / `fetch_plan` from the installing thread.
"""

from __future__ import annotations

import collections
import json
import logging
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monitor.capture.steps import LABEL_UNSAFE, SpanTuple, clean_label
from monitor.capture.threads import place_current_thread
from monitor.capture.transport import HostRing, Plan, StepRecord, Transport
from monitor.v1 import monitor_pb2
from monitor.wire.codec import MAX_CORRELATION_ID_BYTES

log = logging.getLogger("monitor.capture")

# message types, worker -> child
M_CONFIG, M_RING, M_STEP, M_FIN, M_DROP, M_PLAN_REPLY = 1, 2, 3, 4, 5, 6
# child -> worker
M_PLAN, M_STATE, M_STATS, M_SERVER = 10, 11, 12, 13

_HEAD = struct.Struct("<IBB")  # payload bytes, type, more parts follow
_PART = 60_000  # payload bytes per datagram (below the socket's default send buffer)
_MAX_MESSAGE = 256 << 20  # the gRPC message cap: nothing larger is ever legitimate
# ring gen, slot, step, n_rows, max_frame_bytes, spans, bytes of plan id / request ids / labels
_STEP = struct.Struct("<IIqIIIHII")
_SPAN_BYTES = 4 + 8 + 8 + 4 + 4 + 4  # rows, start, prompt length, role, id / label bytes
_DROP = struct.Struct("<QQQ")
_RING_ALIGN = 64  # slot-state bytes rounded up so the rows start aligned

#: The child's `python -c`: `python -m monitor.capture.sender_child` with the worker's
#: package root (argv[1]) in place of the working directory at `sys.path[0]`, so the child
#: runs the worker's own code (its `STEP` framing), never a `monitor` in the cwd (`-P`
#: does this from Python 3.11 only)
_CHILD_MAIN = ("import runpy, sys; sys.path[0] = sys.argv.pop(1); "
               "runpy.run_module('monitor.capture.sender_child', run_name='__main__', "
               "alter_sys=True)")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FrameError(ValueError):
    """A datagram on the worker/child socket that does not follow the framing."""


# ------------------------------------------------------------------------- framing
def packets(mtype: int, payload: bytes) -> list[bytes]:
    """The datagrams of one message (`<IBB` head each; `more` on all but the last)."""
    if len(payload) <= _PART:
        return [_HEAD.pack(len(payload), mtype, 0) + payload]
    out = []
    for i in range(0, len(payload), _PART):
        part = payload[i:i + _PART]
        out.append(_HEAD.pack(len(part), mtype, int(i + _PART < len(payload))) + part)
    return out


class Reassembler:
    """Turns datagrams back into `(type, payload)` messages, checking every claimed size."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._type = -1
        self._size = 0

    def feed(self, dgram: bytes) -> tuple[int, bytes] | None:
        """The message `dgram` completes, or None while parts are outstanding. Raises
        FrameError naming what is wrong (short datagram, length, type, size)."""
        if len(dgram) < _HEAD.size:
            raise FrameError(f"datagram: expected at least {_HEAD.size} bytes, found "
                             f"{len(dgram)}")
        n, mtype, more = _HEAD.unpack_from(dgram)
        if n != len(dgram) - _HEAD.size:
            raise FrameError(f"datagram length: expected {len(dgram) - _HEAD.size} "
                             f"(bytes that arrived), found {n}")
        if self._parts and mtype != self._type:
            raise FrameError(f"message type: expected part of {self._type}, found {mtype}")
        self._size += n
        if self._size > _MAX_MESSAGE:
            raise FrameError(f"message size: expected at most {_MAX_MESSAGE}, found "
                             f"{self._size} so far")
        self._type = mtype
        self._parts.append(dgram[_HEAD.size:])
        if more:
            return None
        payload = b"".join(self._parts)
        self._parts, self._size = [], 0
        return mtype, payload


def send_all(sock: socket.socket, mtype: int, payload: bytes, *, timeout: float,
             fds: list[int] | None = None) -> bool:
    """Send one message, waiting up to `timeout` s for room (never the model thread).
    False when the peer is gone or the time ran out."""
    end = time.monotonic() + timeout
    for i, pkt in enumerate(packets(mtype, payload)):
        while True:
            try:
                if fds and i == 0:
                    socket.send_fds(sock, [pkt], fds, socket.MSG_DONTWAIT)
                else:
                    sock.send(pkt, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                select.select([], [sock], [], min(0.05, left))
            except OSError:
                return False
    return True


#: Longest span request id (UTF-8 bytes) a `STEP` record carries. The API caller writes
#: part of the engine id (the body's `request_id`, any length), and a record past the
#: socket's datagram limit (~208 KiB by default) fails whole with EMSGSIZE: one caller's
#: 200 kB id once dropped every co-batched request's rows. A longer id is sent as ""
#: (never another request's key), which the sidecar refuses on its own (`bad_spans`:
#: those rows counted unscored, the step's other spans scored), and counted here
#: (`ids_refused`). Above the sidecar's default `max_request_id_bytes` (256), so that
#: limit stays the sidecar's to raise up to here. What it does not cover: ~160 spans of
#: 1 KiB ids with 256 B labels in one step still pass the datagram limit (one caller
#: would need that many concurrent requests in one batch).
MAX_WIRE_REQUEST_ID_BYTES = 1024


def encode_step(gen: int, rec: StepRecord) -> tuple[bytes, int, int]:
    """One `STEP` message, how many span labels it carries replaced and how many span
    request ids it sends as "" (over `MAX_WIRE_REQUEST_ID_BYTES`) (model thread, a
    few C calls for any number of spans): `_STEP` head (ring generation, slot, step, rows,
    frame size, spans `n`, plan id bytes, request id bytes, correlation id bytes), the plan
    id, the span columns as one `struct` pack (`n` u32 rows, `n` i64 start positions, `n`
    i64 prompt lengths, `n` i32 roles, `n` u32 request id bytes, `n` u32 correlation id
    bytes), then the request ids and the correlation ids, UTF-8, back to back (0 bytes for
    a request without one).

    Ids are length-prefixed, never split on a separator: the API caller writes its
    correlation id and part of its engine request id (the body's `request_id`), any JSON
    string; a NUL in either once made this refuse the record, dropping the step of every
    request batched with the caller's. A request id is a key: carried exactly, or sent as
    "" when over `MAX_WIRE_REQUEST_ID_BYTES` (counted in the third number). A label
    `clean_label` would change (only one not from `correlation_id`, which cleans at the
    source) is sent cleaned and counted in the number returned; never a refused step.
    Raises ValueError only for a request id holding a lone surrogate (not UTF-8; none
    reaches a worker through vLLM's msgpack): the step is dropped and counted."""
    pid = rec.plan_id.encode()
    rids, ns, poss, plens, roles = zip(*rec.spans, strict=True) if rec.spans else ((),) * 5
    n = len(rids)
    ids, n_ids = _utf8_column(rids)
    cut = 0
    if n and max(n_ids) > MAX_WIRE_REQUEST_ID_BYTES:
        cut = sum(k > MAX_WIRE_REQUEST_ID_BYTES for k in n_ids)
        ids, n_ids = _utf8_column(["" if k > MAX_WIRE_REQUEST_ID_BYTES else r
                                   for r, k in zip(rids, n_ids, strict=True)])
    labs, n_labs, replaced = _wire_labels(rec.labels, rids)
    payload = b"".join((
        _STEP.pack(gen, rec.slot, rec.step, rec.n_rows, rec.max_frame_bytes, n, len(pid),
                   len(ids), len(labs)),
        pid, struct.pack(f"<{n}I{n}q{n}q{n}i{n}I{n}I", *ns, *poss, *plens, *roles, *n_ids,
                         *n_labs),
        ids, labs))
    return _HEAD.pack(len(payload), M_STEP, 0) + payload, replaced, cut


def _utf8_column(strs: Sequence[str]) -> tuple[bytes, list[int]]:
    """`strs` as UTF-8, back to back, and each one's byte length (model thread: one C
    join and encode when all are ASCII, where byte and character lengths agree; else one
    encode each). Raises UnicodeEncodeError (a ValueError) for a lone surrogate."""
    joined = "".join(strs)
    if joined.isascii():
        return joined.encode(), list(map(len, strs))
    enc = [x.encode() for x in strs]
    return b"".join(enc), list(map(len, enc))


def _wire_labels(labels: Mapping[str, str], rids: Sequence[str]
                 ) -> tuple[bytes, list[int], int]:
    """Each span's label as UTF-8 back to back, their byte lengths (0 for a request
    without one) and how many of them `clean_label` changed. One regex scan over all
    labels when they are clean (those of `correlation_id` always are)."""
    if not labels:
        return b"", [0] * len(rids), 0
    raw = [labels.get(r, "") for r in rids]
    joined = "".join(raw)
    # LABEL_UNSAFE's characters are all unprintable (Cc, Cs): `isprintable` (one C pass)
    # clears the common case, the regex decides the rest (e.g. a no-break space)
    if joined.isprintable() or LABEL_UNSAFE.search(joined) is None:  # each encodes
        blob, lens = _utf8_column(raw)
        if max(lens, default=0) <= MAX_CORRELATION_ID_BYTES:
            return blob, lens, 0
    clean = [clean_label(lab) for lab in raw]
    blob, lens = _utf8_column(clean)
    return blob, lens, sum(c != lab for c, lab in zip(clean, raw, strict=True))


def _cut(b: bytes, off: int, lengths: Sequence[int]) -> list[str]:
    """The UTF-8 strings of `lengths` bytes each, back to back in `b` from `off`."""
    out = []
    for k in lengths:
        out.append(b[off:off + k].decode())
        off += k
    return out


def decode_step(b: bytes) -> tuple[int, int, int, int, int, str, list[SpanTuple],
                                   dict[str, str]]:
    """`(gen, slot, step, n_rows, max_frame_bytes, plan_id, spans, labels)` of a `STEP`
    payload; FrameError when the lengths do not add up to the payload, the id lengths do
    not add up to the id bytes, or the spans' rows do not sum to `n_rows` (bad UTF-8:
    UnicodeDecodeError, a ValueError)."""
    if len(b) < _STEP.size:
        raise FrameError(f"STEP: expected at least {_STEP.size} bytes, found {len(b)}")
    gen, slot, step, n_rows, mfb, n, n_pid, n_ids, n_labs = _STEP.unpack_from(b)
    want = _STEP.size + n_pid + _SPAN_BYTES * n + n_ids + n_labs
    if want != len(b):
        raise FrameError(f"STEP: expected {want} bytes for {n} spans, found {len(b)}")
    off = _STEP.size
    plan_id = b[off:off + n_pid].decode()
    off += n_pid
    cols = struct.unpack_from(f"<{n}I{n}q{n}q{n}i{n}I{n}I", b, off)
    off += _SPAN_BYTES * n
    id_lens, lab_lens = cols[4 * n:5 * n], cols[5 * n:]
    if sum(id_lens) != n_ids or sum(lab_lens) != n_labs:
        raise FrameError(f"STEP ids: expected request / correlation id lengths summing to "
                         f"{n_ids} / {n_labs} bytes, found {sum(id_lens)} / "
                         f"{sum(lab_lens)}")
    rids = _cut(b, off, id_lens)
    labs = _cut(b, off + n_ids, lab_lens)
    spans: list[SpanTuple] = list(zip(rids, cols[:n], cols[n:2 * n], cols[2 * n:3 * n],
                                      cols[3 * n:4 * n], strict=True))
    if sum(cols[:n]) != n_rows:
        raise FrameError(f"STEP spans: expected rows summing to n_rows {n_rows}, found "
                         f"{sum(cols[:n])}")
    labels = {r: lab for r, lab in zip(rids, labs, strict=True) if lab}
    return gen, slot, step, n_rows, mfb, plan_id, spans, labels


# ------------------------------------------------------------------------- shared ring
class SharedHostRing(HostRing):
    """A `HostRing` in a shared mapping both processes map (`fd`: a memfd).

    Layout: `n_slots` state bytes (0 free, 1 in use), padded to 64, then the rows
    `[n_slots, n_layers, max_rows, d_model]` of `dtype`. The worker's model thread is the
    only one to `acquire` (a lock guards it anyway); `release` is one byte store, done by
    the child after encoding or by the worker when a step is dropped. x86/ARM: the child
    has read the rows before it stores the byte (its reads complete before its store is
    visible on x86; the worker's next write to the slot follows its load of the byte).

    Args:
        fd: an open descriptor of a mapping of exactly `size_for(...)` bytes (the child's
            copy); None creates one (the worker).
        gen: the ring's generation (records name it; a new plan may bring a new ring).
    """

    def __init__(self, n_slots: int, n_layers: int, max_rows: int, d_model: int,
                 dtype: torch.dtype, *, pin: bool = False, buf: torch.Tensor | None = None,
                 fd: int | None = None, gen: int = 0) -> None:
        head = -(-n_slots // _RING_ALIGN) * _RING_ALIGN
        item = torch.finfo(dtype).bits // 8
        size = head + n_slots * n_layers * max_rows * d_model * item
        if fd is None:
            fd = os.memfd_create("safety-monitor-ring", os.MFD_CLOEXEC) \
                if hasattr(os, "memfd_create") else _unlinked_file()
            os.ftruncate(fd, size)
        else:
            found = os.fstat(fd).st_size
            if found != size:
                raise ValueError(f"shared ring size: expected {size} bytes for [{n_slots}, "
                                 f"{n_layers}, {max_rows}, {d_model}] {dtype}, found {found}")
        self.fd = fd
        self.gen = gen
        weakref.finalize(self, os.close, fd)
        self._mm = mmap.mmap(fd, size)
        raw = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.state = memoryview(self._mm)[:n_slots]
        rows = raw[head:].view(dtype).view(n_slots, n_layers, max_rows, d_model)
        super().__init__(n_slots, n_layers, max_rows, d_model, dtype, buf=rows)
        self._cursor = 0
        #: worker: per slot, `(frames, rows, bytes)` of the step sent to the child in it
        #: (None once re-acquired): what is lost if the child dies holding the slot
        self.sent: list[tuple[int, int, int] | None] = [None] * n_slots

    def describe(self) -> dict[str, int | str]:
        """What the child needs to map this ring (the `RING` message, JSON)."""
        return {"gen": self.gen, "n_slots": self.n_slots, "n_layers": self.n_layers,
                "max_rows": self.max_rows, "d_model": self.d_model,
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def attach(cls, doc: dict[str, int | str], fd: int) -> SharedHostRing:
        """The child's mapping of a ring the worker described (`describe`)."""
        dtype = _DTYPES.get(str(doc["dtype"]))
        if dtype is None:
            raise ValueError(f"RING dtype: expected one of {sorted(_DTYPES)}, found "
                             f"{doc['dtype']!r}")
        return cls(int(doc["n_slots"]), int(doc["n_layers"]), int(doc["max_rows"]),
                   int(doc["d_model"]), dtype, fd=fd, gen=int(doc["gen"]))

    def acquire(self) -> int | None:
        with self._lock:
            st, n, c = self.state, self.n_slots, self._cursor
            for i in range(n):
                s = (c + i) % n
                if not st[s]:
                    st[s] = 1
                    self.sent[s] = None
                    self._cursor = s + 1
                    return s
            return None

    def release(self, slot: int) -> None:
        self.state[slot] = 0

    def free_slots(self) -> int:
        return self.n_slots - sum(self.state)

    def release_all(self) -> list[tuple[int, int, int]]:
        """Every slot free (the child that held them died); the `sent` entries of the
        slots it still held (those steps are lost)."""
        lost = []
        for s in range(self.n_slots):
            if self.state[s] and self.sent[s] is not None:
                lost.append(self.sent[s])
            self.sent[s] = None
            self.state[s] = 0
        return [x for x in lost if x is not None]


def _unlinked_file() -> int:
    """An open, already unlinked file in /dev/shm (where `memfd_create` is missing)."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="safety-monitor-ring-", dir="/dev/shm")
    os.unlink(path)
    return fd


# ------------------------------------------------------------------------- child's env
# OpenMP binding variables vLLM's CPU worker sets for its own model thread
# (`vllm.utils.ompmultiprocessing`: `GOMP_CPU_AFFINITY` with the libgomp it preloads,
# `KMP_AFFINITY` with libiomp, else `OMP_PLACES` + `OMP_PROC_BIND`).
OMP_BINDING_VARS = ("GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PLACES", "OMP_PROC_BIND")


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The sender child's environment: the worker's, less its OpenMP binding, with one
    OpenMP thread.

    Why: the worker's environment names the *model thread's* cores
    (`GOMP_CPU_AFFINITY=0` on a 2-core host), and vLLM preloads libgomp
    (`LD_PRELOAD`), whose constructor pins the process's first thread to the first CPU
    of that list as the child starts, before any of our code runs. Inherited as is,
    the child left the CPUs it was placed on and ran on the model's core, preempting the
    forward pass (bench/RESULTS.md, "The sender child on the model's core"). The child
    runs no parallel math, so one OpenMP thread; the child also sets its CPU mask to
    the reader thread's (`CONFIG` `cpus`) before it starts any thread.
    """
    env = {k: v for k, v in environ.items() if k not in OMP_BINDING_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------- worker side
_COUNTERS = ("dropped_frames", "dropped_rows", "dropped_bytes", "dropped_finished",
             "finished_backlog", "reconnects", "sent_frames", "sent_rows", "sent_bytes",
             "verdicts", "stream_errors", "plans_refused", "shm_frames", "shm_full",
             "shm_refused", "queued", "bad_records")


class ProcessTransport(Transport):
    """A `Transport` whose sender runs in a child process (module docstring).

    Same constructor and calls as `Transport`; `on_plan`, `on_verdict` (block verdicts
    only) and `on_judged_through` run on the reader thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """`Transport`'s arguments (`on_state` is the child's, not given here)."""
        super().__init__(*args, **kwargs)
        self._sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._alive = False
        self._started = False
        self._first_plan = threading.Event()
        self._pending_plan: Plan | None = None  # received before `start`, unanswered
        self._ring: SharedHostRing | None = None
        self._gen = 0
        self._child: dict[str, int] = {}  # latest counters of the running child
        self._dead: collections.Counter[str] = collections.Counter()  # of children that died
        self._unsent = (0, 0, 0)  # worker drops not yet told to the child (`DROP`)
        self.pipe_full = 0  # steps dropped because the socket to the child was full
        #: span labels sent cleaned (`clean_label`: a control character, a lone surrogate,
        #: over `MAX_CORRELATION_ID_BYTES`), each a label the wire would not carry as is
        self.labels_replaced = 0
        #: span request ids over `MAX_WIRE_REQUEST_ID_BYTES`, sent as "" (their rows
        #: refused by the sidecar as `bad_spans`, the step's other spans scored)
        self.ids_refused = 0
        self.sender_starts = 0
        self.sender_deaths = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child (if `fetch_plan` did not) and answer a plan it sent before."""
        self._ensure_reader()
        with self._lock:
            self._started = True
            pending, self._pending_plan = self._pending_plan, None
        if pending is not None:
            self._answer_plan(pending)

    def _ensure_reader(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._reader, name="safety-monitor-reader",
                                            daemon=True)
            self._thread.start()

    def fetch_plan(self, timeout: float) -> Plan | None:
        """Start the child; its first plan (as the sidecar sent it), or None after
        `timeout` s (sidecar down, plan unparseable: the child logs why)."""
        self._ensure_reader()
        self._first_plan.wait(max(0.01, timeout))
        return self.plan

    def close(self, timeout: float = 2.0) -> None:
        """Stop the child (EOF on its socket; SIGTERM then SIGKILL if it lingers)."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ model thread
    def make_ring(self, *, slots: int, budget_mb: int, n_layers: int, max_rows: int,
                  d_model: int, dtype: torch.dtype, pin: bool = False) -> HostRing:
        """A `SharedHostRing` (not pinned: a CUDA host-path copy is synchronous anyway),
        announced to the child before any step names it."""
        with self._lock:
            self._gen += 1
            gen = self._gen
        n = HostRing.fit_slots(slots=slots, budget_mb=budget_mb, n_layers=n_layers,
                               max_rows=max_rows, d_model=d_model, dtype=dtype)
        ring = SharedHostRing(n, n_layers, max_rows, d_model, dtype, gen=gen)
        self._ring = ring
        sock = self._sock
        if sock is not None and self._alive:
            self._announce(sock, ring)
        return ring

    def submit_step(self, rec: StepRecord) -> bool:
        """Send the step's record to the child (non-blocking); False, dropped and counted
        when the sidecar is not connected, the child is down or the socket is full."""
        sock, ring = self._sock, rec.ring
        if not self.connected or sock is None:
            self.drop_record(rec, "sidecar not connected" if self._alive
                             else "sender process not running")
            return False
        if not isinstance(ring, SharedHostRing):
            self.drop_record(rec, "ring not shared with the sender process")
            return False
        n_p = len(rec.points)
        ring.sent[rec.slot] = (n_p, rec.n_rows * n_p, rec.n_rows * n_p * rec.row_bytes)
        try:
            record, replaced, cut = encode_step(ring.gen, rec)
        except ValueError as e:  # a request id that is not UTF-8: never sent, counted
            self.drop_record(rec, f"span request ids: expected UTF-8 ({e})")
            return False
        if replaced or cut:
            with self._lock:
                self.labels_replaced += replaced
                self.ids_refused += cut
        try:
            sock.send(record, socket.MSG_DONTWAIT)
        except BlockingIOError:
            with self._lock:
                self.pipe_full += 1
            self.drop_record(rec, "send queue full (sender process behind)")
            return False
        except OSError as e:  # EMSGSIZE (a record past the socket buffer), child gone
            self.drop_record(rec, f"record not sent to the sender process ({e})")
            return False
        if self._unsent != (0, 0, 0):
            self._tell_drops(sock)
        return True

    def submit_finished(self, msg: monitor_pb2.RequestFinished) -> bool:
        """Send a RequestFinished to the child (non-blocking), else keep it in the worker's
        bounded backlog (resent by the reader thread); False when that is full (counted)."""
        sock = self._sock
        with self._lock:
            direct = not self._backlog and self._alive and sock is not None
        if direct and sock is not None:
            try:
                sock.send(_HEAD.pack(msg.ByteSize(), M_FIN, 0) + msg.SerializeToString(),
                          socket.MSG_DONTWAIT)
                return True
            except OSError:
                pass
        return self._keep_finished(msg)

    def count_drop(self, frames: int, rows: int, nbytes: int, why: str = "") -> None:
        super().count_drop(frames, rows, nbytes, why)
        with self._lock:
            f, r, b = self._unsent
            self._unsent = (f + frames, r + rows, b + nbytes)

    def _tell_drops(self, sock: socket.socket) -> None:
        """Send the worker's uncounted drops to the child (for `ClientStats`); kept for the
        next try when the socket is full."""
        with self._lock:
            f, r, b = self._unsent
            self._unsent = (0, 0, 0)
        if (f, r, b) == (0, 0, 0):
            return
        try:
            sock.send(_HEAD.pack(_DROP.size, M_DROP, 0) + _DROP.pack(f, r, b),
                      socket.MSG_DONTWAIT)
        except OSError:
            with self._lock:
                uf, ur, ub = self._unsent
                self._unsent = (uf + f, ur + r, ub + b)

    # ------------------------------------------------------------------ counters
    def stats(self) -> dict[str, int | bool]:
        """The worker's counters + the running child's (latest report) + those of children
        that died, plus the sender process's own (`sender_*`, `pipe_full`,
        `labels_replaced`, `ids_refused`)."""
        own = super().stats()
        with self._lock:
            child = dict(self._child)
            dead = dict(self._dead)
            out: dict[str, int | bool] = {
                k: int(own.get(k, 0)) + int(child.get(k, 0)) + int(dead.get(k, 0))
                for k in _COUNTERS}
            out.update(pipe_full=self.pipe_full, sender_starts=self.sender_starts,
                       sender_deaths=self.sender_deaths, labels_replaced=self.labels_replaced,
                       ids_refused=self.ids_refused)
        out["queued"] = int(child.get("queued", 0))
        out.update(connected=self.connected, sender_alive=self._alive,
                   sender_pid=self.proc.pid if self.proc is not None else 0)
        return out

    # ------------------------------------------------------------------ reader thread
    def _spawn(self) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        """Start the child from the reader thread (it inherits this thread's placed CPU
        mask; `child_env` keeps the worker's OpenMP binding from moving it back)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = child_env(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the `monitor` package's parent
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, root, str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        cfg = {k: v for k, v in vars(self.cfg).items()}
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        doc = {"cfg": cfg, "model": self.model, "instance_id": self.instance_id,
               "cpus": cpus}
        if not send_all(mine, M_CONFIG, json.dumps(doc).encode(), timeout=10.0):
            raise OSError("the sender process did not take its configuration")
        ring = self._ring
        if ring is not None:
            self._announce(mine, ring)
        return mine, proc

    def _announce(self, sock: socket.socket, ring: SharedHostRing) -> None:
        if not send_all(sock, M_RING, json.dumps(ring.describe()).encode(), timeout=5.0,
                        fds=[ring.fd]):
            log.warning("safety monitor: the sender process did not take the ring; its "
                        "steps are dropped and counted until it restarts")

    def _reader(self) -> None:
        self.thread_cpus = place_current_thread(self.placement, "safety-monitor-reader")
        backoff = self.cfg.backoff_s
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                sock, proc = self._spawn()
            except OSError as e:
                log.error("safety monitor: cannot start the sender process: %s", e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max_s)
                continue
            with self._lock:
                self._sock, self.proc, self._alive = sock, proc, True
                self.sender_starts += 1
            log.info("safety monitor: sender process pid %d started", proc.pid)
            try:
                self._read(sock)
            except (OSError, FrameError, ValueError) as e:
                log.error("safety monitor: sender process channel broke: %s", e)
            self._on_child_gone(sock, proc)
            if self._stop.is_set():
                break
            if time.monotonic() - t0 > 10 * self.cfg.backoff_max_s:
                backoff = self.cfg.backoff_s  # it ran a while: not a crash loop
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.cfg.backoff_max_s)
        last = self._sock
        if last is not None:
            last.close()

    def _read(self, sock: socket.socket) -> None:
        """Messages from the child until EOF (it exited) or `close`."""
        asm = Reassembler()
        while not self._stop.is_set():
            dgram = sock.recv(_PART + _HEAD.size)
            if not dgram:
                return
            got = asm.feed(dgram)
            if got is None:
                continue
            mtype, payload = got
            if mtype == M_STATE:
                if payload[:1] == b"\x01":
                    self._connected.set()
                else:
                    self._connected.clear()
            elif mtype == M_STATS:
                doc = json.loads(payload)
                with self._lock:
                    self._child = {k: int(doc.get(k, 0)) for k in _COUNTERS}
                self._resend(sock)
            elif mtype == M_SERVER:  # a block verdict or a JudgedThrough (counted by the child)
                self.deliver(monitor_pb2.ServerMessage.FromString(payload))
            elif mtype == M_PLAN:
                self._on_plan_message(monitor_pb2.CapturePlan.FromString(payload))
            else:
                raise FrameError(f"message type from the sender process: expected one of "
                                 f"{[M_PLAN, M_STATE, M_STATS, M_SERVER]}, found "
                                 f"{mtype}")

    def _resend(self, sock: socket.socket) -> None:
        """Reader thread: the worker's kept finishes and drop counts, while there is room."""
        self._tell_drops(sock)
        while True:
            with self._lock:
                if not self._backlog:
                    return
                msg = self._backlog[0]
            try:
                sock.send(_HEAD.pack(msg.ByteSize(), M_FIN, 0) + msg.SerializeToString(),
                          socket.MSG_DONTWAIT)
            except OSError:
                return
            with self._lock:
                self._backlog.popleft()

    def _on_plan_message(self, p: monitor_pb2.CapturePlan) -> None:
        try:
            plan = Plan.from_proto(p)
        except ValueError as e:  # the child parsed it: only a version skew gets here
            self._reply_plan(str(e))
            return
        with self._lock:
            if not self._started:
                self._pending_plan = plan
                if self.plan is None:
                    self.plan = plan
                self._first_plan.set()
                return
        self._answer_plan(plan)

    def _answer_plan(self, plan: Plan) -> None:
        """The session validates and installs `plan` (`on_plan`); the child streams only
        when it did (a refusal's reason is logged by the child)."""
        why = ""
        if self.on_plan is not None:
            try:
                self.on_plan(plan)
            except ValueError as e:
                why = str(e) or "refused"
        if not why:
            self.plan = plan
        self._first_plan.set()
        self._reply_plan(why)

    def _reply_plan(self, why: str) -> None:
        sock = self._sock
        if sock is not None:
            send_all(sock, M_PLAN_REPLY, (b"\x01" if not why else b"\x00") + why.encode(),
                     timeout=5.0)

    def _on_child_gone(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """The child exited (or `close`): its counters join the dead ones, every slot it
        held is free, steps are dropped and counted until a new child connects."""
        with self._lock:
            self._alive = False
            self._connected.clear()
            self._dead.update({k: v for k, v in self._child.items()
                               if k not in ("queued", "finished_backlog")})
            # finishes the child still held are lost with it
            self.dropped_finished += self._child.get("finished_backlog", 0)
            self._child = {}
            self._sock = None
        sock.close()
        ring = self._ring
        if ring is not None:
            for f, r, b in ring.release_all():
                self.count_drop(f, r, b, "sender process died holding the step")
        try:
            rc = proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if self._stop.is_set():
            return
        with self._lock:
            self.sender_deaths += 1
            deaths = self.sender_deaths
        if deaths == 1 or deaths % 20 == 0:
            log.error("safety monitor: sender process pid %d exited (rc %s, %d deaths so "
                      "far); steps are dropped and counted until it restarts", proc.pid, rc,
                      deaths)
