"""RequestRegistry: ownership, adoption, eviction, timers, byte-bounded closed memory,
recompute trimming (unit tests with a fake clock; the socket-level regressions are in
test_lifecycle.py)."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.constants import FinishReason, RequestKey
from monitor.server.registry import Admission, RequestRegistry
from monitor.v1 import monitor_pb2
from monitor.wire.hooks import resid_post


class Sink:
    def __init__(self, name: str) -> None:
        self.name = name

    def post(self, msg: monitor_pb2.ServerMessage | None) -> None:  # pragma: no cover
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def reg(**kw: float) -> tuple[RequestRegistry, Clock]:
    clock = Clock()
    return RequestRegistry(clock=clock, **kw), clock  # type: ignore[arg-type]


def test_keys_of_two_clients_never_merge_and_only_the_owner_adds_or_finishes() -> None:
    r, _ = reg()
    a, b, a2 = Sink("a"), Sink("b"), Sink("a-second-stream")
    ka, kb = RequestKey("client-a", "req-1"), RequestKey("client-b", "req-1")
    assert r.admit(ka, a) == (Admission.OPEN, [])
    assert r.admit(kb, b) == (Admission.OPEN, [])  # same id, other client: other request
    assert r.admit(ka, a)[0] is Admission.OPEN
    assert r.admit(ka, a2)[0] is Admission.NOT_OWNER  # same client, other open stream
    assert r.finish(ka, a2, FinishReason.STOP) is None
    assert r.state(ka) == "live"
    c = r.finish(ka, a, FinishReason.STOP)
    assert c is not None and (c.key, c.owner, c.reason) == (ka, a, FinishReason.STOP)
    assert r.state(ka) == "closed" and r.state(kb) == "live"
    assert r.admit(ka, a)[0] is Admission.CLOSED  # late rows refused, never re-opened
    assert r.finish(ka, a, FinishReason.STOP) is None  # finished twice


def test_orphans_are_adopted_by_the_same_client_or_swept_after_the_grace() -> None:
    r, clock = reg(orphan_grace_s=30.0, idle_ttl_s=0)
    old, new = Sink("old"), Sink("new")
    k1, k2 = RequestKey("c", "1"), RequestKey("c", "2")
    r.admit(k1, old)
    r.admit(k2, old)
    assert r.orphan(old) == 2 and r.stats().orphaned == 2
    assert r.owned_by(old) == []
    assert r.admit(k1, new)[0] is Admission.ADOPTED
    assert r.owned_by(new) == [k1] and r.stats().adopted == 1
    clock.t += 29.0
    assert r.sweep() == []
    clock.t += 1.5
    (c,) = r.sweep()
    assert (c.key, c.owner, c.reason) == (k2, None, FinishReason.ORPHANED)
    assert r.stats().orphans_closed == 1 and r.state(k1) == "live"


def test_idle_requests_of_open_streams_expire() -> None:
    r, clock = reg(idle_ttl_s=60.0)
    s = Sink("s")
    k_old, k_busy = RequestKey("c", "old"), RequestKey("c", "busy")
    r.admit(k_old, s)
    r.admit(k_busy, s)
    clock.t += 50
    r.admit(k_busy, s)  # activity
    clock.t += 15
    (c,) = r.sweep()
    assert (c.key, c.owner, c.reason) == (k_old, s, FinishReason.IDLE)
    assert r.state(k_busy) == "live" and r.stats().idle_closed == 1


def test_max_requests_holds_for_every_request_and_evicts_the_least_recent() -> None:
    r, _ = reg(max_requests=3)
    s = Sink("s")
    keys = [RequestKey("c", f"r{i}") for i in range(3)]
    for k in keys:
        assert r.admit(k, s) == (Admission.OPEN, [])
    r.admit(keys[0], s)  # r0 is now the most recent; r1 the least
    adm, evicted = r.admit(RequestKey("c", "new"), s)
    assert adm is Admission.OPEN
    assert [(c.key, c.owner, c.reason) for c in evicted] == [
        (keys[1], s, FinishReason.EVICTED)]
    for i in range(1000):
        r.admit(RequestKey("c", f"n{i}"), s)
        assert r.stats().live <= 3
    assert r.stats().evicted == 1001
    # orphans count too
    r.orphan(s)
    r.admit(RequestKey("c", "after"), Sink("t"))
    assert r.stats().live == 3


def test_request_id_length_limit() -> None:
    r, _ = reg(max_request_id_bytes=16)
    assert r.admit(RequestKey("c", "x" * 16), Sink("s"))[0] is Admission.OPEN
    assert r.admit(RequestKey("c", "x" * 17), Sink("s")) == (Admission.TOO_LONG, [])
    assert r.admit(RequestKey("c", "é" * 9), Sink("s"))[0] is Admission.TOO_LONG  # 18 bytes
    assert r.stats().live == 1


def test_closed_id_memory_is_bounded_in_bytes() -> None:
    budget = 64 << 10
    r, _ = reg(closed_ids_bytes=budget, max_request_id_bytes=1 << 20)
    s = Sink("s")
    for i in range(200):
        k = RequestKey("c", f"{i:04d}" + "z" * 2000)  # ~2 KB ids
        r.admit(k, s)
        r.finish(k, s, FinishReason.STOP)
        r.retire(k)
        assert r.stats().closed_ids_bytes <= budget
    st = r.stats()
    assert 0 < st.closed_ids < 200 and st.closing == 0
    # the most recent ids are remembered, the oldest forgotten
    assert r.state(RequestKey("c", "0199" + "z" * 2000)) == "closed"
    assert r.state(RequestKey("c", "0000" + "z" * 2000)) == "unknown"


def test_trim_recomputed_per_layer() -> None:
    r, _ = reg()
    s, k = Sink("s"), RequestKey("c", "r")
    r.admit(k, s)
    h2, h3 = resid_post(2).name, resid_post(3).name  # the hook names the scorer passes
    assert r.trim_recomputed(k, h2, np.arange(0, 8)) == 0
    assert r.trim_recomputed(k, h2, np.arange(4, 12)) == 4  # 4..7 recomputed
    assert r.trim_recomputed(k, h3, np.arange(4, 12)) == 0  # other layer: own mark
    assert r.trim_recomputed(k, h2, np.arange(0, 5)) == 5
    c = r.finish(k, s, FinishReason.STOP)
    assert c is not None and r.is_open(k)  # closing: queued rows may still be judged
    r.retire(k)
    assert not r.is_open(k)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_requests: expected >= 1, found 0"):
        RequestRegistry(max_requests=0)


def test_finish_of_an_orphan_adopts_it_and_unseen_finishes_are_bounded() -> None:
    r, _ = reg(max_requests=2, orphan_grace_s=30.0, idle_ttl_s=0)
    old, new, other = Sink("old"), Sink("new"), Sink("other-stream")
    k = RequestKey("c#i", "1")
    r.admit(k, old)
    r.orphan(old)
    # the reconnected client (same key: same client instance) finishes its orphan
    c = r.finish(k, new, FinishReason.STOP, "ticket")
    assert c is not None and (c.owner, c.reason, c.adopted) == (new, FinishReason.STOP, True)
    assert r.label(k) == "ticket" and r.stats().adopted == 1 and r.stats().orphaned == 0
    # a request no row of which ever arrived: closing at once, then remembered as closed
    u1, u2, u3 = (RequestKey("c#i", f"u{i}") for i in (1, 2, 3))
    c1 = r.close_unseen(u1, new, FinishReason.LENGTH, "t1")
    assert c1 is not None and (c1.key, c1.owner, c1.reason) == (u1, new, FinishReason.LENGTH)
    assert r.state(u1) == "closed" and r.label(u1) == "t1" and r.is_open(u1)
    assert r.close_unseen(u1, new, FinishReason.STOP) is None  # finished twice
    assert r.admit(u1, new)[0] is Admission.CLOSED  # late rows refused
    r.admit(RequestKey("c#i", "live"), other)
    assert r.close_unseen(RequestKey("c#i", "live"), new, FinishReason.STOP) is None
    # k and u1 still wait for their finals: max_requests (2) finals waiting is the bound
    assert r.close_unseen(u2, new, FinishReason.STOP) is None and r.state(u2) == "unknown"
    r.retire(k)
    assert r.close_unseen(u2, new, FinishReason.STOP) is not None
    r.retire(u1)
    r.retire(u2)
    assert r.close_unseen(u3, new, FinishReason.STOP) is not None
    assert r.stats().closing == 1


def test_shutdown_closes_orphans_with_reason_shutdown() -> None:
    r, _ = reg(orphan_grace_s=30.0, idle_ttl_s=0)
    s = Sink("s")
    r.admit(RequestKey("c", "1"), s)
    r.orphan(s)
    (c,) = r.close_orphans()
    assert (c.key, c.owner, c.reason) == (RequestKey("c", "1"), None, FinishReason.SHUTDOWN)
