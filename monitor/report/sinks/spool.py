"""Spools: the FIFO of alert events a sink could not deliver yet.

Two implementations of one interface (`Spool`):

- `DiskSpool(dir, max_bytes)`: one file per event, `<seq:016d>.json`, written as a temp
  file, fsynced, renamed into place, directory fsynced. Survives a process restart: the
  constructor rescans the directory and continues the sequence, so events come back in the
  order they were spooled. Leftover temp files (a crash mid-write) are removed; an
  unreadable record is dropped and counted (reason `corrupt`).
- `MemorySpool(max_bytes)`: the same bound and order in memory, for sinks without a spool
  directory (lost on exit; the sink's worker counts what is left as lost).

Bound: the sum of record sizes stays <= `max_bytes`. A new record that does not fit
evicts the OLDEST records until it fits (newest alerts matter most during an incident);
a record larger than `max_bytes` on its own is refused. Every eviction or refusal is
returned to the caller (`SpoolResult`) so it is counted, never silent.

Thread rules: a spool is owned by one sink worker thread; `events` / `bytes` may be
read from any thread (plain ints, for gauges).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from monitor.report.sinks.events import AlertEvent

__all__ = ["DiskSpool", "MemorySpool", "Spool", "SpoolResult"]


@dataclass
class SpoolResult:
    """What one `append` did.

    Attributes:
        stored: the new record is in the spool.
        dropped: (reason, bytes) of each record evicted or refused: `spool_full`
            (evicted or too large) or `corrupt` (unreadable, found while reading).
    """

    stored: bool
    dropped: list[tuple[str, int]] = field(default_factory=list)


class Spool(Protocol):
    """FIFO of serialised alert events, bounded in bytes."""

    durable: bool
    max_bytes: int

    @property
    def events(self) -> int:
        """Records spooled now."""

    @property
    def bytes(self) -> int:
        """Bytes spooled now (sum of record sizes)."""

    def append(self, event: AlertEvent) -> SpoolResult:
        """Add at the tail (evicting the oldest if needed); raises OSError if unwritable."""

    def peek(self, n: int) -> tuple[list[tuple[int, AlertEvent]], list[tuple[str, int]]]:
        """Up to `n` oldest records as (id, event), and records dropped as unreadable."""

    def remove(self, ids: list[int]) -> None:
        """Remove delivered records (ids from `peek`)."""


class MemorySpool:
    """In-memory spool (not durable)."""

    durable = False

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"spool max_bytes: expected >= 1, found {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._q: deque[tuple[int, AlertEvent, int]] = deque()
        self._seq = 0
        self._bytes = 0

    @property
    def events(self) -> int:
        return len(self._q)

    @property
    def bytes(self) -> int:
        return self._bytes

    def append(self, event: AlertEvent) -> SpoolResult:
        size = len(event.to_json())
        if size > self.max_bytes:
            return SpoolResult(False, [("spool_full", size)])
        res = SpoolResult(True)
        while self._bytes + size > self.max_bytes:
            _, _, old = self._q.popleft()
            self._bytes -= old
            res.dropped.append(("spool_full", old))
        self._seq += 1
        self._q.append((self._seq, event, size))
        self._bytes += size
        return res

    def peek(self, n: int) -> tuple[list[tuple[int, AlertEvent]], list[tuple[str, int]]]:
        return [(i, ev) for i, ev, _ in list(self._q)[:n]], []

    def remove(self, ids: list[int]) -> None:
        drop = set(ids)
        keep: deque[tuple[int, AlertEvent, int]] = deque()
        for rec in self._q:
            if rec[0] in drop:
                self._bytes -= rec[2]
            else:
                keep.append(rec)
        self._q = keep


class DiskSpool:
    """Durable spool: one fsynced file per event in `directory`.

    Raises:
        OSError: the directory cannot be created or listed (a start-up error).
    """

    durable = True
    _SUFFIX = ".json"

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"spool max_bytes: expected >= 1, found {max_bytes}")
        self.dir = os.fspath(directory)
        self.max_bytes = int(max_bytes)
        os.makedirs(self.dir, exist_ok=True)
        self._files: deque[tuple[int, int]] = deque()  # (seq, size), oldest first
        self._bytes = 0
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                os.unlink(path)  # a crash mid-write: never renamed, never acknowledged
                continue
            stem = name.removesuffix(self._SUFFIX)
            if not name.endswith(self._SUFFIX) or not stem.isdigit():
                continue
            size = os.path.getsize(path)
            self._files.append((int(stem), size))
            self._bytes += size
        self._seq = self._files[-1][0] if self._files else 0

    @property
    def events(self) -> int:
        return len(self._files)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _path(self, seq: int) -> str:
        return os.path.join(self.dir, f"{seq:016d}{self._SUFFIX}")

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink(self, seq: int) -> None:
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass

    def append(self, event: AlertEvent) -> SpoolResult:
        data = event.to_json()
        size = len(data)
        if size > self.max_bytes:
            return SpoolResult(False, [("spool_full", size)])
        res = SpoolResult(True)
        while self._bytes + size > self.max_bytes:
            seq, old = self._files.popleft()
            self._unlink(seq)
            self._bytes -= old
            res.dropped.append(("spool_full", old))
        seq = self._seq + 1
        tmp = self._path(seq) + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path(seq))
        self._fsync_dir()
        self._seq = seq
        self._files.append((seq, size))
        self._bytes += size
        return res

    def peek(self, n: int) -> tuple[list[tuple[int, AlertEvent]], list[tuple[str, int]]]:
        out: list[tuple[int, AlertEvent]] = []
        bad: list[tuple[str, int]] = []
        for seq, size in list(self._files):
            if len(out) >= n:
                break
            try:
                with open(self._path(seq), "rb") as fh:
                    out.append((seq, AlertEvent.from_json(fh.read())))
            except (OSError, ValueError):
                bad.append(("corrupt", size))
                self.remove([seq])
        return out, bad

    def remove(self, ids: list[int]) -> None:
        drop = set(ids)
        keep: deque[tuple[int, int]] = deque()
        for seq, size in self._files:
            if seq in drop:
                self._unlink(seq)
                self._bytes -= size
            else:
                keep.append((seq, size))
        self._files = keep
