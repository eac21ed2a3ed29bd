"""Accounting of rows that arrive but are not scored, and of client stats, with a scoring
worker that is behind: an in-process sidecar (`build_app` and the gRPC handlers on
127.0.0.1, real sockets) whose worker starts only when the test says so, so what the
queue holds while the worker is busy can be read directly.

Regressions: unscored-row marks entered the queue one per refused span with no bound
(`capacity_rows` never applied: 10 frames of 4096 bad spans queued 40,960 items and
opened 40,960 requests); a queue_full frame counted the rows of its already refused
spans twice; the too_many_spans pseudo-span (request id "") became a live request; the
ClientStats baselines per client instance had no bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import D_MODEL, MODEL, POLICY_V1, wait_until
from test_server_integration import errors, verdicts

from monitor.constants import RequestKey
from monitor.server.app import MonitorApp, build_app
from monitor.server.config import ServerConfig
from monitor.server.handlers import add_monitor_service
from monitor.server.service import MonitorService
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire import Span, encode_frame

pytestmark = pytest.mark.timeout(120)


@dataclass
class Sidecar:
    app: MonitorApp
    service: MonitorService
    channel: grpc.Channel

    def metric(self, name: str, **labels: str) -> float:
        v = self.app.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else float(v)

    def stream(self, msgs: Iterable[monitor_pb2.ClientMessage]
               ) -> list[monitor_pb2.ServerMessage]:
        return list(monitor_pb2_grpc.MonitorStub(self.channel).Stream(iter(msgs), timeout=60))

    @contextmanager
    def behind(self, msgs: Iterable[monitor_pb2.ClientMessage], until: Callable[[], object],
               what: str) -> Iterator[list[monitor_pb2.ServerMessage]]:
        """Send `msgs` on a stream while the worker is stopped; once `until()` holds the
        body runs (the queue as the worker would find it), then the worker starts and the
        call's replies are collected into the yielded list."""
        out: list[monitor_pb2.ServerMessage] = []
        call = threading.Thread(target=lambda: out.extend(self.stream(msgs)), daemon=True)
        call.start()
        wait_until(until, what=what)
        yield out
        self.app.pipeline.start()
        call.join(60)
        assert not call.is_alive()


@contextmanager
def sidecar(tmp_path: Path, bundle_dir: Path, *, queue_rows: int, worker: bool = False,
            max_stats_clients: int = 4096) -> Iterator[Sidecar]:
    """The app's Monitor service on a free 127.0.0.1 port, served by an event loop of its
    own thread; the scoring worker runs only if `worker` (else call
    ``app.pipeline.start()``)."""
    (tmp_path / "policy.yaml").write_text(POLICY_V1)
    cfg = ServerConfig(bundle=str(bundle_dir), policy=str(tmp_path / "policy.yaml"),
                       queue_rows=queue_rows, metrics_port=-1, policy_watch_s=0)
    app = build_app(cfg)
    svc = MonitorService(pipeline=app.pipeline, scorer=app.scorer, limits=app.service.limits,
                         plan=app.plan, metrics=app.metrics,
                         max_stats_clients=max_stats_clients)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_monitor_service(server, stream=svc.Stream, score=svc.Score, plan=svc.GetCapturePlan,
                            limits=cfg.rpc_limits(), on_refused=lambda _: None)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    if worker:
        app.pipeline.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Sidecar(app, svc, channel)
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        app.pipeline.stop(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        svc.shutdown()
        app.service.shutdown()
        app.audit.close()


def _bad_role_frame(seq: int, ids: list[str]) -> monitor_pb2.ClientMessage:
    """One row per id, each span refused on its own (role 99 is no TokenRole)."""
    spans = [Span(r, 1, 0, 1, 99) for r in ids]
    x = np.zeros((len(ids), D_MODEL), np.float32)
    return monitor_pb2.ClientMessage(frame=encode_frame(x, seq=seq, model=MODEL, layer=2,
                                                        spans=spans))


def _fin(r: str, n_prompt: int) -> monitor_pb2.ClientMessage:
    return monitor_pb2.ClientMessage(finished=monitor_pb2.RequestFinished(
        request_id=r, reason="stop", n_prompt_tokens=n_prompt, n_generated_tokens=1))


def test_unscored_marks_are_one_bounded_item_per_frame(tmp_path: Path,
                                                       bundle_dir: Path) -> None:
    kept = [f"k{i}" for i in range(40)]  # 40 rows: fit the 64 rows of marks
    over = [f"d{i}" for i in range(30)]  # 30 more do not: dropped, counted, no request
    msgs = [_bad_role_frame(1, kept), _bad_role_frame(2, over)]
    msgs += [_bad_role_frame(3 + i, [f"x{i}-{j}" for j in range(4096)]) for i in range(9)]
    go = threading.Event()

    def send() -> Iterator[monitor_pb2.ClientMessage]:
        yield from msgs
        go.wait(60)  # the finishes once the queue was looked at
        yield from (_fin("k0", 1), _fin("d0", 1))

    n_rows = 40 + 30 + 9 * 4096

    def read() -> bool:  # the last frame's marks are dropped last
        return (s.metric("safety_monitor_rows_unscored_total", reason="bad_spans") == n_rows
                and s.metric("safety_monitor_unscored_marks_dropped_total") == n_rows - 40)

    with sidecar(tmp_path, bundle_dir, queue_rows=64) as s, \
            s.behind(send(), read, "frames read") as out:
        pipe = s.app.pipeline
        marks = [it for it in list(pipe._items) if type(it).__name__ == "_UnscoredItem"]
        assert len(marks) == 1  # one per frame, not one per span
        assert pipe.unscored_rows_queued == 40 <= pipe.capacity_rows
        assert pipe.rows_queued == 0
        live = pipe.registry.stats().live
        assert live == 40, live  # dropped marks open no request
        go.set()
    assert {e.reason for e in errors(out)} == {"bad_spans"}
    # a kept mark is in its request's final; a dropped one is missing there: never silent
    for r in ("k0", "d0"):
        f = {v.detector: v for v in verdicts(out, r, final=True)}["harmful_intent"]
        assert (f.n_tokens_scored, f.n_tokens_unscored) == (0, 1), (r, f)


def test_queue_full_counts_only_the_rows_it_sheds(tmp_path: Path, bundle_dir: Path) -> None:
    x = np.zeros((4, D_MODEL), np.float32)
    spans = [Span("bad", 1, 0, 1, 99), Span("ok", 1, 0, 1)]
    msgs = [
        monitor_pb2.ClientMessage(frame=encode_frame(x, seq=1, model=MODEL, layer=2,
                                                     spans=[Span("fill", 4, 0, 4)])),
        monitor_pb2.ClientMessage(frame=encode_frame(x[:2], seq=2, model=MODEL, layer=2,
                                                     spans=spans)),  # no room: queue_full
        _fin("ok", 1), _fin("bad", 1),
    ]
    with sidecar(tmp_path, bundle_dir, queue_rows=4) as s:
        with s.behind(msgs, lambda: s.metric("safety_monitor_frames_rejected_total",
                                             reason="queue_full") == 1, "queue_full") as out:
            pass
        unscored = {r: s.metric("safety_monitor_rows_unscored_total", reason=r)
                    for r in ("bad_spans", "queue_full")}
    assert [(e.reason, e.seq) for e in errors(out)] == [("bad_spans", 2), ("queue_full", 2)]
    assert unscored == {"bad_spans": 1, "queue_full": 1}  # 2 rows, each counted once
    for r in ("ok", "bad"):
        f = {v.detector: v for v in verdicts(out, r, final=True)}["harmful_intent"]
        assert (f.n_tokens_scored, f.n_tokens_unscored) == (0, 1), (r, f)


def test_rows_of_too_many_spans_open_no_request(tmp_path: Path, bundle_dir: Path) -> None:
    n = 4097  # one span beyond the limit: its row is the pseudo-span of request id ""
    x = np.zeros((n, D_MODEL), np.float32)
    x[0, 0] = np.nan  # and the frame is refused whole (non_finite), its rows parsed
    spans = [Span(f"s{i}", 1, 0, 1) for i in range(n)]
    msgs = [monitor_pb2.ClientMessage(frame=encode_frame(x, seq=1, model=MODEL, layer=2,
                                                         spans=spans))]
    with sidecar(tmp_path, bundle_dir, queue_rows=8192) as s:
        registry = s.app.pipeline.registry
        # every span's rows marked for its final (one item, queued once all 4096
        # requests s0 ... s4095 are admitted)
        with s.behind(msgs, lambda: s.app.pipeline._items, "marks queued") as out:
            assert s.app.pipeline.unscored_rows_queued == n - 1
            assert registry.state(RequestKey("", "s0")) == "live"
            assert registry.state(RequestKey("", "")) == "unknown"
            assert registry.stats().live == 4096
        assert s.metric("safety_monitor_rows_unscored_total", reason="non_finite") == n
    assert [e.reason for e in errors(out)] == ["non_finite"]


def test_client_stats_baselines_are_bounded_and_evictions_counted(
        tmp_path: Path, bundle_dir: Path) -> None:
    def hello(i: str) -> monitor_pb2.ClientMessage:
        return monitor_pb2.ClientMessage(hello=monitor_pb2.ClientHello(
            client_id="w", instance_id=i, model=MODEL))

    stats = monitor_pb2.ClientMessage(stats=monitor_pb2.ClientStats(dropped_rows=10))
    with sidecar(tmp_path, bundle_dir, queue_rows=64, worker=True,
                 max_stats_clients=2) as s:
        for i in ("a", "b", "a", "c", "a"):  # c evicts b (a was used more recently)
            assert errors(s.stream([hello(i), stats])) == []
        assert s.metric("safety_monitor_client_dropped_rows_total") == 30  # a, b, c once
        assert s.metric("safety_monitor_client_stats_evicted_total") == 1
        assert errors(s.stream([hello("b"), stats])) == []  # b was evicted: counted again
        assert s.metric("safety_monitor_client_dropped_rows_total") == 40
        assert s.metric("safety_monitor_client_stats_evicted_total") == 2  # b, then c
