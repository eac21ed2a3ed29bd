"""The request registry: the one owner of "which requests are alive" in the sidecar.

A request is keyed by :class:`~monitor.constants.RequestKey` ``(client, request_id)``,
never by a caller-chosen string alone. Its life:

```
  admit (first frame) ──► live ──► closing ──► retired (state released)
                          │  ▲        ▲            + key kept in closed-id memory
            stream broke  ▼  │ adopt  │ finish: client RequestFinished, stream half-closed,
                        orphaned ─────┘ orphan grace over, idle TTL over, evicted, shutdown

  never seen ── client RequestFinished (close_unseen) ──► closing (final: all missing)
```

- **Owner.** Every live request belongs to one open stream (a `StreamSink`). Only that
  stream adds rows to it or finishes it; a stream of the same client adopts it only
  while it is orphaned (its stream broke). Another stream of the same client gets
  ``not_owner``; another client's id with the same text is a different request. A
  finish for an orphaned request from a stream of the same client adopts and closes it.
- **Bounds.** At most ``max_requests`` live requests (orphans included): admitting one
  more evicts the least recently active one (finished with reason ``evicted``, counted).
  At most ``max_requests`` finals of never-seen requests wait to be written
  (`close_unseen`). Request ids longer than ``max_request_id_bytes`` are refused. The
  memory of closed keys (late frames for them are refused, not re-opened) is bounded in bytes
  (``closed_ids_bytes``, each key costing its string sizes plus a fixed overhead).
- **Timers.** :meth:`sweep` (called on a timer, independent of traffic) closes orphans
  older than ``orphan_grace_s`` and requests of open streams idle for ``idle_ttl_s``.
- **Duplicates.** :meth:`trim_recomputed` remembers per (request, layer) the highest
  position scored: rows at or below it are recomputes (vLLM preemption) and are skipped.

Closing never calls out: every method that closes requests returns :class:`Closing`
records and the caller (the pipeline) queues their final verdicts.

Thread rules: one lock guards all state. Reader tasks (event loop / decode threads)
call :meth:`admit`, :meth:`finish`, :meth:`orphan`, :meth:`owned_by`, :meth:`state`;
the sweeper thread calls :meth:`sweep`; the scoring worker is the only caller of
:meth:`trim_recomputed` and :meth:`retire` (it retires a key after writing its finals,
so tracker state never outlives its registry entry).
"""

from __future__ import annotations

import enum
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from monitor.constants import FinishReason, RequestKey
from monitor.v1 import monitor_pb2

__all__ = ["Admission", "Closing", "RegistryStats", "RequestRegistry", "StreamSink"]

#: Bytes charged per closed key on top of its strings (tuple, dict slot, list node).
_CLOSED_ENTRY_OVERHEAD = 160


class StreamSink(Protocol):
    """The outbound side of one stream; `post` must be callable from any thread."""

    name: str

    def post(self, msg: monitor_pb2.ServerMessage | None) -> None:
        """Queue a message for the client; None marks the end of the stream."""


class Admission(enum.Enum):
    """Outcome of :meth:`RequestRegistry.admit`."""

    OPEN = "open"  # new, or already owned by this stream: rows may be added
    ADOPTED = "adopted"  # was orphaned; this stream carries it on
    CLOSED = "closed"  # finished or evicted recently: late rows are refused
    NOT_OWNER = "not_owner"  # live on another open stream of the same client
    TOO_LONG = "too_long"  # request id over max_request_id_bytes

    @property
    def accepted(self) -> bool:
        return self in (Admission.OPEN, Admission.ADOPTED)


@dataclass(frozen=True)
class Closing:
    """A request the registry just closed: the pipeline queues its final verdicts."""

    key: RequestKey
    owner: StreamSink | None  # None: its stream is gone, nobody to tell
    reason: FinishReason
    adopted: bool = False  # an orphan its reconnected client finished (`finish`)


@dataclass
class _Entry:
    owner: StreamSink | None  # None while orphaned
    last_active: float  # clock() of the last admit
    orphaned_at: float | None = None
    closing: bool = False
    hwm: dict[str, int] = field(default_factory=dict)  # hook point -> highest position scored
    first_generated: int = -1  # lowest position of a generated row seen (-1: none yet)
    label: str = ""  # the caller's correlation id (first one sent); a label, never a key


@dataclass(frozen=True)
class RegistryStats:
    """A consistent snapshot of the registry's sizes and counters."""

    live: int
    closing: int
    orphaned: int
    closed_ids: int
    closed_ids_bytes: int
    evicted: int
    idle_closed: int
    orphans_closed: int
    adopted: int


class RequestRegistry:
    """Live requests, their owners, and recently closed keys (see module docstring).

    Args:
        max_requests: most live requests (orphans included); more evict the oldest.
        max_request_id_bytes: longest request id accepted (UTF-8 bytes).
        closed_ids_bytes: memory budget of the closed-key memory.
        orphan_grace_s: how long a broken stream's requests wait for adoption.
        idle_ttl_s: a request of an open stream with no frame for this long is closed
            (reason ``idle``); 0 disables.
        clock: monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        max_requests: int = 100_000,
        max_request_id_bytes: int = 256,
        closed_ids_bytes: int = 32 << 20,
        orphan_grace_s: float = 30.0,
        idle_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests: expected >= 1, found {max_requests}")
        if max_request_id_bytes < 1:
            raise ValueError(
                f"max_request_id_bytes: expected >= 1, found {max_request_id_bytes}")
        if closed_ids_bytes < 0:
            raise ValueError(f"closed_ids_bytes: expected >= 0, found {closed_ids_bytes}")
        self.max_requests = int(max_requests)
        self.max_request_id_bytes = int(max_request_id_bytes)
        self.closed_ids_bytes = int(closed_ids_bytes)
        self.orphan_grace_s = float(orphan_grace_s)
        self.idle_ttl_s = float(idle_ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        # live (not closing) entries, least recently active first
        self._live: OrderedDict[RequestKey, _Entry] = OrderedDict()
        # closing entries: finals queued, not yet retired by the worker
        self._closing: dict[RequestKey, _Entry] = {}
        # orphaned live keys in orphaning order (oldest first) -> orphaned_at
        self._orphans: OrderedDict[RequestKey, float] = OrderedDict()
        self._by_owner: dict[int, set[RequestKey]] = {}  # id(owner) -> live keys
        self._closed: OrderedDict[RequestKey, int] = OrderedDict()  # key -> bytes charged
        self._closed_bytes = 0
        self._evicted = 0
        self._idle_closed = 0
        self._orphans_closed = 0
        self._adopted = 0

    # ---------------------------------------------------------------- readers

    def state(self, key: RequestKey) -> str:
        """``live``, ``closed`` (closing, finished or evicted recently) or ``unknown``."""
        with self._lock:
            if key in self._live:
                return "live"
            if key in self._closing or key in self._closed:
                return "closed"
            return "unknown"

    def owned_by(self, owner: StreamSink) -> list[RequestKey]:
        """Live keys owned by `owner`."""
        with self._lock:
            return list(self._by_owner.get(id(owner), ()))

    def stats(self) -> RegistryStats:
        """Sizes and counters (for metrics and tests)."""
        with self._lock:
            return RegistryStats(
                live=len(self._live), closing=len(self._closing), orphaned=len(self._orphans),
                closed_ids=len(self._closed), closed_ids_bytes=self._closed_bytes,
                evicted=self._evicted, idle_closed=self._idle_closed,
                orphans_closed=self._orphans_closed, adopted=self._adopted)

    # ---------------------------------------------------------------- writers

    def admit(self, key: RequestKey, owner: StreamSink, label: str = ""
              ) -> tuple[Admission, list[Closing]]:
        """Rows of `key` arrived on `owner`'s stream: open, continue or adopt the request.

        Returns the admission and the requests evicted to make room (their finals must
        be queued by the caller). Marks the request most recently active.
        """
        if len(key.request_id.encode("utf-8", "surrogatepass")) > self.max_request_id_bytes:
            return Admission.TOO_LONG, []
        now = self._clock()
        with self._lock:
            e = self._live.get(key)
            if e is not None:
                if e.owner is owner:
                    e.label = e.label or label
                    e.last_active = now
                    self._live.move_to_end(key)
                    return Admission.OPEN, []
                if e.owner is not None:
                    return Admission.NOT_OWNER, []
                # orphaned: this stream of the same client carries it on
                e.owner, e.orphaned_at, e.last_active = owner, None, now
                self._orphans.pop(key, None)
                self._by_owner.setdefault(id(owner), set()).add(key)
                self._live.move_to_end(key)
                self._adopted += 1
                return Admission.ADOPTED, []
            if key in self._closing or key in self._closed:
                return Admission.CLOSED, []
            evicted: list[Closing] = []
            while len(self._live) >= self.max_requests:
                old_key = next(iter(self._live))
                evicted.append(self._close(old_key, FinishReason.EVICTED))
                self._evicted += 1
            self._live[key] = _Entry(owner=owner, last_active=now, label=label)
            self._by_owner.setdefault(id(owner), set()).add(key)
            return Admission.OPEN, evicted

    def finish(self, key: RequestKey, owner: StreamSink | None,
               reason: FinishReason, label: str = "") -> Closing | None:
        """Close a live request on behalf of `owner` (None: the server itself, e.g. at
        shutdown). An orphaned request is adopted by `owner` and closed (its client
        reconnected and says it finished: the key carries the client's identity, so only
        the same client instance gets here). Returns None (nothing closed) when `key` is
        not live or is owned by another open stream. `label`: the caller's correlation id,
        kept when the request has none yet."""
        with self._lock:
            e = self._live.get(key)
            if e is None or (owner is not None and e.owner is not None
                             and e.owner is not owner):
                return None
            adopted = owner is not None and e.owner is None
            if adopted:
                self._adopted += 1
                e.owner, e.orphaned_at = owner, None
                self._orphans.pop(key, None)
            e.label = e.label or label
            c = self._close(key, reason)
            return Closing(c.key, c.owner, c.reason, adopted=True) if adopted else c

    def close_unseen(self, key: RequestKey, owner: StreamSink, reason: FinishReason,
                     label: str = "") -> Closing | None:
        """`owner`'s client finished `key` but no row of it ever reached this server (it
        ran while the sidecar restarted, or the plugin dropped every row): enter it as
        closing at once so its final (every in-scope position missing) is written, and
        remember it as closed (a second finish or late rows are refused). Returns None
        when `key` is known (live, closing or recently closed: see `state`) or when
        ``max_requests`` finals are already waiting to be written (a client cannot grow
        the closing set without bound)."""
        with self._lock:
            if key in self._live or key in self._closing or key in self._closed:
                return None
            if len(self._closing) >= self.max_requests:
                return None
            self._closing[key] = _Entry(owner=owner, last_active=self._clock(),
                                        closing=True, label=label)
            self._remember_closed(key)
            return Closing(key, owner, reason)

    def orphan(self, owner: StreamSink) -> int:
        """`owner`'s stream broke: its live requests wait ``orphan_grace_s`` for a
        stream of the same client to adopt them. Returns how many."""
        now = self._clock()
        with self._lock:
            keys = self._by_owner.pop(id(owner), set())
            for key in keys:
                e = self._live[key]
                e.owner, e.orphaned_at = None, now
                self._orphans[key] = now
            return len(keys)

    def close_orphans(self) -> list[Closing]:
        """Close every orphan now, reason ``shutdown`` (the server is stopping: nobody
        will reconnect to this process)."""
        with self._lock:
            keys = list(self._orphans)
            self._orphans_closed += len(keys)
            return [self._close(k, FinishReason.SHUTDOWN) for k in keys]

    def sweep(self) -> list[Closing]:
        """Close orphans past their grace and idle requests past the TTL."""
        now = self._clock()
        out: list[Closing] = []
        with self._lock:
            cutoff = now - self.orphan_grace_s
            while self._orphans:
                key, t = next(iter(self._orphans.items()))
                if t > cutoff:
                    break
                out.append(self._close(key, FinishReason.ORPHANED))
                self._orphans_closed += 1
            if self.idle_ttl_s > 0:
                idle_cutoff = now - self.idle_ttl_s
                # _live is in activity order: stop at the first recent one; orphans
                # (owner None) are left to the grace above
                stale = []
                for key, e in self._live.items():
                    if e.last_active > idle_cutoff:
                        break
                    if e.owner is not None:
                        stale.append(key)
                for key in stale:
                    out.append(self._close(key, FinishReason.IDLE))
                    self._idle_closed += 1
        return out

    def trim_recomputed(self, key: RequestKey, hook: str, positions: np.ndarray,
                        generated: np.ndarray | None = None) -> int:
        """Scoring worker only. `positions` (contiguous, ascending) of a span of `key` at
        hook point `hook` (a `monitor.wire.hooks` name: two hook points of one layer are
        tracked apart) are about to be scored: return how many leading ones were scored
        already (recomputes to skip) and record the new highest position. `generated`
        (bool, same length) marks generated rows: the lowest such position is kept
        (`extent`)."""
        if positions.size == 0:
            return 0
        with self._lock:
            e = self._live.get(key) or self._closing.get(key)
            if e is None:
                return 0
            if generated is not None and generated.any():
                g = int(positions[int(np.argmax(generated))])
                if e.first_generated < 0 or g < e.first_generated:
                    e.first_generated = g
            hwm = e.hwm.get(hook, -1)
            first = int(positions[0])
            n_dup = 0 if first > hwm else min(int(positions.size), hwm - first + 1)
            e.hwm[hook] = max(hwm, int(positions[-1]))
            return n_dup

    def is_open(self, key: RequestKey) -> bool:
        """True while `key` has an entry (live or closing): its rows may be judged."""
        with self._lock:
            return key in self._live or key in self._closing

    def extent(self, key: RequestKey) -> tuple[int, int]:
        """``(first_generated, highest)`` positions of `key` seen so far at any hook point
        (-1 for none) while it has an entry, else ``(-1, -1)``."""
        with self._lock:
            e = self._live.get(key) or self._closing.get(key)
            if e is None:
                return -1, -1
            return e.first_generated, max(e.hwm.values(), default=-1)

    def label(self, key: RequestKey) -> str:
        """The caller's correlation id of `key` while it has an entry, else ""."""
        with self._lock:
            e = self._live.get(key) or self._closing.get(key)
            return e.label if e is not None else ""

    def retire(self, key: RequestKey) -> None:
        """Scoring worker only: the finals of `key` are written; release its entry."""
        with self._lock:
            self._closing.pop(key, None)

    # ---------------------------------------------------------------- internals

    def _close(self, key: RequestKey, reason: FinishReason) -> Closing:
        # caller holds the lock; key is in _live
        e = self._live.pop(key)
        owner = e.owner
        if owner is not None:
            keys = self._by_owner.get(id(owner))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_owner[id(owner)]
        self._orphans.pop(key, None)
        e.closing = True
        self._closing[key] = e
        self._remember_closed(key)
        return Closing(key, owner, reason)

    def _remember_closed(self, key: RequestKey) -> None:
        cost = (sys.getsizeof(key.client) + sys.getsizeof(key.request_id)
                + _CLOSED_ENTRY_OVERHEAD)
        old = self._closed.pop(key, None)
        if old is not None:
            self._closed_bytes -= old
        self._closed[key] = cost
        self._closed_bytes += cost
        while self._closed and self._closed_bytes > self.closed_ids_bytes:
            _, c = self._closed.popitem(last=False)
            self._closed_bytes -= c
