"""Same-pod shared-memory ring: the frame bytes of one capture worker, outside gRPC.

The worker (`ShmRingWriter`, on the plugin's sender side, never the model thread) owns one
file in a shared-memory directory (`/dev/shm`); the sidecar (`ShmRingReader`) reads it.
gRPC then carries only each frame's metadata plus `ShmRef(slot, sequence, byte_length)`
(docs/CAPTURE.md, "Beyond gRPC bytes").

File layout (little-endian):

    offset 0   8 bytes   magic b"SMRING01"
           8   u32       layout version (1)
          12   u32       n_slots
          16   u64       slot_bytes
          24   u64       data_offset (= header_bytes(n_slots))
          32   16 bytes  token (random; also sent in `ClientHello.shm_ring`)
          48   16 bytes  zero
          64   u64[n_slots]  write sequence of each slot (0: being written / never)
    data_offset + slot * slot_bytes: slot `slot` (payload at its start)

Write protocol (one writer per file): sequence[slot] = 0, copy the payload, sequence[slot]
= S (S from one counter per ring, strictly increasing from 1, never reused). A slot is
written only after the server acknowledged its previous frame (`ShmAck`) or at the start of
a new stream (every slot is free again; an old stream's reads are then caught by the
sequence checks). On x86 (total store order) the payload stores are visible before the
sequence store; a weakly ordered CPU would need a release fence there (not built).

Read protocol (`ShmRingReader.read`): every value of the `ShmRef` is the client's claim.
The slot index and byte length are checked against the ring's geometry (fixed when the
ring was opened from the hello and its header) before anything is read; the sequence is
read before the payload (must equal the claim: else `shm_stale`) and after it (else
`shm_torn`, the writer reused the slot while it was read). The reader never maps the
file: it copies with `os.pread`, so a client that truncates the file gets short reads
(`shm_bad_ref`), not a SIGBUS in the sidecar, and the copy is private (the writer may
reuse the slot as soon as it is acknowledged). Allocation per read is `byte_length`, which
was checked against `slot_bytes`, which was checked against the server's
`max_frame_bytes` when the ring was accepted.

Thread rules: `ShmRingWriter.acquire` / `write` / `release` / `reset` are safe from any
thread (one lock); `ShmRingReader.read` is safe from any thread (`pread` has no file
position).
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.v1 import monitor_pb2

__all__ = [
    "MAGIC",
    "MAX_SLOTS",
    "NAME_RE",
    "ShmMiss",
    "ShmRingReader",
    "ShmRingWriter",
    "data_offset",
]

MAGIC = b"SMRING01"
LAYOUT_VERSION = 1
#: most slots a ring may have (the sequence table stays below 512 KiB)
MAX_SLOTS = 1 << 16
#: the only file names a server opens in its shm directory
NAME_RE = re.compile(r"safety-monitor-[0-9a-f]{32}\.ring")
_HEAD = struct.Struct("<8sIIQQ16s16x")  # 64 bytes
_SEQ_OFFSET = _HEAD.size
_PAGE = 4096


def data_offset(n_slots: int) -> int:
    """Byte offset of slot 0: the header and sequence table, rounded up to a page."""
    return -(-(_SEQ_OFFSET + 8 * n_slots) // _PAGE) * _PAGE


class ShmMiss(Exception):
    """A ring read that did not produce the claimed bytes.

    Attributes:
        reason: `shm_bad_ref`, `shm_stale` or `shm_torn` (`monitor.constants.Reason`).
        message: which field, what was expected, what was found.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class ShmRingWriter:
    """The worker's ring: creates the file (O_EXCL, `mode`) and writes slots.

    Args:
        directory: shared-memory directory (the sidecar's `--shm-dir`).
        n_slots: slots (1..MAX_SLOTS).
        slot_bytes: bytes per slot (a frame's payload must fit one slot).
        mode: the file's permission bits (0600: only this user; the sidecar must run as
            the same user or share a group that `mode` lets read).
    """

    def __init__(self, directory: str | Path, n_slots: int, slot_bytes: int,
                 mode: int = 0o600) -> None:
        if not 1 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots: expected 1..{MAX_SLOTS}, found {n_slots}")
        if slot_bytes < 1:
            raise ValueError(f"slot_bytes: expected >= 1, found {slot_bytes}")
        self.n_slots = int(n_slots)
        self.slot_bytes = int(slot_bytes)
        self.data_offset = data_offset(self.n_slots)
        self.token = secrets.token_bytes(16)
        self.name = f"safety-monitor-{secrets.token_hex(16)}.ring"
        self.path = Path(directory) / self.name
        size = self.data_offset + self.n_slots * self.slot_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, mode)  # exact bits, whatever the umask
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._mm[:_HEAD.size] = _HEAD.pack(MAGIC, LAYOUT_VERSION, self.n_slots,
                                           self.slot_bytes, self.data_offset, self.token)
        #: u64 [n_slots] view of the sequence table (writable, in the file)
        self._seq = np.frombuffer(self._mm, dtype="<u8", count=self.n_slots,
                                  offset=_SEQ_OFFSET)
        self._lock = threading.Lock()
        self._next_seq = 1
        self._free = list(range(self.n_slots - 1, -1, -1))  # stack: low slots first
        #: slot -> sequence of the frame in flight there (0: free)
        self._inflight = [0] * self.n_slots
        self.closed = False

    def hello(self) -> monitor_pb2.ShmRing:
        """The `ClientHello.shm_ring` that offers this ring."""
        return monitor_pb2.ShmRing(name=self.name, n_slots=self.n_slots,
                                   slot_bytes=self.slot_bytes, token=self.token)

    def acquire(self) -> int | None:
        """A free slot, or None when every slot awaits its acknowledgement (ring full)."""
        with self._lock:
            return self._free.pop() if self._free and not self.closed else None

    def write(self, slot: int, payload: np.ndarray) -> int:
        """Copy `payload` (uint8, 1-D, at most `slot_bytes`) into acquired `slot`; returns
        the slot's new sequence (what the frame's `ShmRef.sequence` must say)."""
        n = int(payload.nbytes)
        if n > self.slot_bytes:
            raise ValueError(f"payload: expected at most slot_bytes={self.slot_bytes} "
                             f"bytes, found {n}")
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._inflight[slot] = seq
        self._seq[slot] = 0  # being written: a reader of the old frame sees torn/stale
        off = self.data_offset + slot * self.slot_bytes
        dst = np.frombuffer(self._mm, dtype=np.uint8, count=n, offset=off)
        np.copyto(dst, payload.reshape(-1).view(np.uint8))
        self._seq[slot] = seq
        return seq

    def release(self, slot: int, sequence: int) -> bool:
        """The server is done with (slot, sequence): free the slot. False (nothing freed)
        when that slot does not hold that sequence in flight (a late or foreign ack)."""
        with self._lock:
            if not 0 <= slot < self.n_slots or self._inflight[slot] != sequence or \
                    sequence == 0:
                return False
            self._inflight[slot] = 0
            self._free.append(slot)
            return True

    def reset(self) -> None:
        """A new stream: every slot is free (the old stream's frames are gone)."""
        with self._lock:
            self._inflight = [0] * self.n_slots
            self._free = list(range(self.n_slots - 1, -1, -1))

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def close(self) -> None:
        """Unmap and remove the file (idempotent)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        del self._seq
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the unlink still frees it
            pass
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Geometry:
    n_slots: int
    slot_bytes: int
    data_offset: int


class ShmRingReader:
    """The sidecar's read-only handle on one client's ring (one per stream).

    `open` validates the offer (`ShmRing` from the hello) against the file: the name (a
    plain name matching `NAME_RE`, opened without following links, a regular file), the
    header (magic, version, n_slots, slot_bytes, data_offset, token equal to the hello's)
    and the file size. `slot_bytes` above `max_slot_bytes` (the server's
    `max_frame_bytes`) or `n_slots` above `MAX_SLOTS` are refused.
    """

    def __init__(self, fd: int, geometry: _Geometry, name: str) -> None:
        self._fd = fd
        self.n_slots = geometry.n_slots
        self.slot_bytes = geometry.slot_bytes
        self.data_offset = geometry.data_offset
        self.name = name
        self.reads = 0
        self._lock = threading.Lock()
        self._active = 0  # reads in progress (the fd is closed only when none is)
        self._closing = False

    @classmethod
    def open(cls, directory: str | Path, offer: monitor_pb2.ShmRing, *,
             max_slot_bytes: int) -> ShmRingReader:
        """Raises ValueError naming the field, expected and found when refused."""
        name = offer.name
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"shm_ring.name: expected a file name matching "
                             f"{NAME_RE.pattern!r}, found {name[:80]!r}")
        if not 1 <= offer.n_slots <= MAX_SLOTS:
            raise ValueError(f"shm_ring.n_slots: expected 1..{MAX_SLOTS}, found "
                             f"{offer.n_slots}")
        if not 1 <= offer.slot_bytes <= max_slot_bytes:
            raise ValueError(f"shm_ring.slot_bytes: expected 1..{max_slot_bytes} (the "
                             f"server's max_frame_bytes), found {offer.slot_bytes}")
        if len(offer.token) != 16:
            raise ValueError(f"shm_ring.token: expected 16 bytes, found {len(offer.token)}")
        path = Path(directory) / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise ValueError(f"shm_ring.name: expected a ring file {str(path)!r} on this "
                             f"host, found none ({e.strerror}; sidecar not in the worker's "
                             "pod / shm directory not shared?)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"shm_ring.name: expected a regular file, found mode "
                                 f"{stat.filemode(st.st_mode)} at {str(path)!r}")
            off = data_offset(offer.n_slots)
            size = off + offer.n_slots * offer.slot_bytes
            if st.st_size < size:
                raise ValueError(f"shm_ring: expected a file of at least {size} bytes "
                                 f"({offer.n_slots} x {offer.slot_bytes} + {off}), found "
                                 f"{st.st_size}")
            head = os.pread(fd, _HEAD.size, 0)
            if len(head) != _HEAD.size:
                raise ValueError(f"shm_ring: expected a {_HEAD.size}-byte header, found "
                                 f"{len(head)} bytes")
            magic, version, n_slots, slot_bytes, doff, token = _HEAD.unpack(head)
            found = (magic, version, n_slots, slot_bytes, doff, token)
            want = (MAGIC, LAYOUT_VERSION, offer.n_slots, offer.slot_bytes, off, offer.token)
            for what, f, w in zip(("magic", "version", "n_slots", "slot_bytes", "data_offset",
                                   "token"), found, want, strict=True):
                if f != w:
                    w_s, f_s = ("<the hello's 16 bytes>", "other bytes") if what == "token" \
                        else (repr(w), repr(f))
                    raise ValueError(f"shm_ring header {what}: expected {w_s}, found {f_s}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, _Geometry(int(offer.n_slots), int(offer.slot_bytes), off), name)

    def _seq(self, slot: int) -> int:
        b = os.pread(self._fd, 8, _SEQ_OFFSET + 8 * slot)
        if len(b) != 8:
            raise ShmMiss("shm_bad_ref", f"shm.slot: the ring file no longer holds slot "
                                         f"{slot}'s sequence (truncated)")
        return int.from_bytes(b, "little")

    def read(self, ref: monitor_pb2.ShmRef) -> bytes:
        """The payload `ref` claims, copied out of the ring (private bytes).

        Raises:
            ShmMiss: `shm_bad_ref` (slot or length outside the ring, file truncated),
                `shm_stale` (the slot holds another sequence), `shm_torn` (it changed
                while read).
        """
        with self._lock:
            if self._closing:
                raise ShmMiss("shm_bad_ref", f"shm: the stream's ring {self.name} is closed")
            self._active += 1
        try:
            return self._read(ref)
        finally:
            with self._lock:
                self._active -= 1
                last = self._closing and self._active == 0
            if last:
                self._close_fd()

    def _read(self, ref: monitor_pb2.ShmRef) -> bytes:
        slot, n, want = int(ref.slot), int(ref.byte_length), int(ref.sequence)
        if slot >= self.n_slots:
            raise ShmMiss("shm_bad_ref", f"shm.slot: expected < n_slots={self.n_slots}, "
                                         f"found {slot}")
        if n > self.slot_bytes:
            raise ShmMiss("shm_bad_ref", f"shm.byte_length: expected at most slot_bytes="
                                         f"{self.slot_bytes}, found {n}")
        before = self._seq(slot)
        if before != want or want == 0:
            raise ShmMiss("shm_stale", f"shm.sequence: slot {slot} holds sequence {before}, "
                                       f"the frame claims {want}")
        data = os.pread(self._fd, n, self.data_offset + slot * self.slot_bytes)
        if len(data) != n:
            raise ShmMiss("shm_bad_ref", f"shm.byte_length: expected {n} bytes in slot "
                                         f"{slot}, found {len(data)} (file truncated)")
        after = self._seq(slot)
        if after != want:
            raise ShmMiss("shm_torn", f"shm.sequence: slot {slot} changed from {want} to "
                                      f"{after} while it was read")
        self.reads += 1
        return data

    def close(self) -> None:
        """Close the file once no read is in progress (never while one uses the fd, so a
        reused descriptor number is never read as the ring)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            idle = self._active == 0
        if idle:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
