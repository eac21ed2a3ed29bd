"""A recording `monitor.v1.Monitor` gRPC server: serves a capture plan, records all.

Library home of the recording sink used by the vLLM capture tests and by the probe
toolkit's ``vllm`` collector backend (``probes.collect.VLLMCollector``), which collects
training activations through the very capture path the monitor uses in production.

`CaptureSink(port=0).start()` listens on 127.0.0.1 (a free port when 0), answers
`GetCapturePlan` with the configured plan and records every message of every `Stream`:
hellos, frames (decoded to float32 numpy arrays with their spans and per-row
`TokenRole`s, as the sidecar decodes them), `RequestFinished` and `ClientStats`.
`stop()` kills the server (open streams break, like a crashed sidecar);
`start()` again restarts it on the same port.

Run standalone (e.g. for the benchmark or `vllm serve` by hand):
    python -m probes.capture_server --port 50051 --layers 3,15
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from monitor.constants import HOOK_NAME_TEMPLATE, hook_name
from monitor.tools.launch import eventually
from monitor.v1 import monitor_pb2, monitor_pb2_grpc
from monitor.wire.codec import decode_frame
from monitor.wire.hooks import parse_hook_name

__all__ = ["CaptureSink", "FrameRecord", "SinkLog", "serve_forever"]

@dataclass
class FrameRecord:
    """One received frame: `x` float32 `[n_rows, d_model]`, spans as tuples
    `(request_id, n_rows, start_position, prompt_len)`, hook point kind (`resid_post` for
    a frame without `hook_name`), `roles` int8 `[n_rows]`."""

    stream: int
    seq: int
    layer: int
    step: int
    x: np.ndarray
    spans: list[tuple[str, int, int, int]]
    kind: str = "resid_post"
    roles: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))


@dataclass
class SinkLog:
    hellos: list[monitor_pb2.ClientHello] = field(default_factory=list)
    frames: list[FrameRecord] = field(default_factory=list)
    finished: list[monitor_pb2.RequestFinished] = field(default_factory=list)
    stats: list[monitor_pb2.ClientStats] = field(default_factory=list)
    seq_errors: list[str] = field(default_factory=list)


def _decode(f: monitor_pb2.ActivationFrame) -> tuple[np.ndarray, np.ndarray]:
    """The frame's rows as float32 `[n_rows, d_model]` and their int8 roles, through the
    sidecar's own decoder (so every recorded frame also passed the sidecar's validation)."""
    hooks = frozenset({f.hook_name or hook_name(f.layer)})
    decoded = decode_frame(f, model=f.model, d_model=int(f.shape[1]) if len(f.shape) == 2
                           else 0, layers=frozenset({f.layer}), max_frame_bytes=len(f.data),
                           hook_names=hooks)
    return np.array(decoded.x, dtype=np.float32), decoded.roles  # own, writable copy


class _Servicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, sink: CaptureSink) -> None:
        self.sink = sink

    def GetCapturePlan(self, request, context):
        return self.sink.plan

    def Score(self, request, context):
        return monitor_pb2.ScoreResponse()

    def Stream(self, request_iterator, context):
        s = self.sink
        with s.lock:
            s.n_streams += 1
            stream_id = s.n_streams
        last_seq = 0
        first = True
        for msg in request_iterator:
            which = msg.WhichOneof("body")
            with s.lock:
                if first and which != "hello":
                    s.log.seq_errors.append(f"stream {stream_id}: first message is {which}")
                first = False
                if which == "hello":
                    s.log.hellos.append(msg.hello)
                elif which == "frame":
                    f = msg.frame
                    if f.seq <= last_seq:
                        s.log.seq_errors.append(f"stream {stream_id}: seq {f.seq} after {last_seq}")
                    last_seq = f.seq
                    if s.slow_s:
                        time.sleep(s.slow_s)
                    for sp in f.spans:  # the plugin keys by engine id, labels by corr. id
                        if sp.correlation_id:
                            s.labels[sp.request_id] = sp.correlation_id
                    x, roles = _decode(f)
                    s.log.frames.append(FrameRecord(
                        stream_id, f.seq, f.layer, f.step, x,
                        [(sp.correlation_id or sp.request_id, sp.n_rows, sp.start_position,
                          sp.prompt_len) for sp in f.spans],
                        parse_hook_name(f.hook_name).kind if f.hook_name else "resid_post",
                        roles))
                elif which == "finished":
                    s.log.finished.append(msg.finished)
                elif which == "stats":
                    s.log.stats.append(msg.stats)
                replies = s.replies
            if replies is not None:
                yield from replies(msg)


class CaptureSink:
    """In-process gRPC sink. Thread-safe accessors; see module docstring."""

    def __init__(
        self,
        *,
        port: int = 0,
        model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
        d_model: int = 576,
        layers: tuple[int, ...] = (3, 15),
        kinds: tuple[monitor_pb2.TokenKind, ...] = (monitor_pb2.TOKEN_KIND_PROMPT,
                                                    monitor_pb2.TOKEN_KIND_GENERATED),
        dtype: monitor_pb2.DType = monitor_pb2.DTYPE_FLOAT32,
        plan_id: str = "test-plan-1",
        max_frame_bytes: int = 8 * 1024 * 1024,
        hook_names: tuple[str, ...] = (),
    ) -> None:
        """`hook_names` (e.g. "blocks.1.hook_mlp_out"), when given, is the plan's hook point
        list (`layers` is then derived from it); else resid_post of every `layers` entry."""
        self.port = port
        if hook_names:
            layers = tuple(sorted({parse_hook_name(h).layer for h in hook_names}))
        self.plan = monitor_pb2.CapturePlan(
            plan_id=plan_id, model=model, d_model=d_model, layers=list(layers),
            token_kinds=list(kinds), hook_name_template=HOOK_NAME_TEMPLATE,
            preferred_dtype=dtype, max_frame_bytes=max_frame_bytes, hook_names=list(hook_names))
        self.lock = threading.Lock()
        self.log = SinkLog()
        self.labels: dict[str, str] = {}  # engine request id -> correlation id
        self.n_streams = 0
        self.slow_s = 0.0
        #: messages to answer each client message with (e.g. a verdict); None: none
        self.replies: Callable[[monitor_pb2.ClientMessage],
                               list[monitor_pb2.ServerMessage]] | None = None
        self._server: grpc.Server | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CaptureSink:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[("grpc.max_receive_message_length", 256 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)])
        monitor_pb2_grpc.add_MonitorServicer_to_server(_Servicer(self), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def reset(self) -> None:
        """Forget frames, finished and stats (hellos are kept: one per stream)."""
        with self.lock:
            self.log = SinkLog(hellos=self.log.hellos)

    # ---------------------------------------------------------------- queries
    def n_frames(self) -> int:
        with self.lock:
            return len(self.log.frames)

    def _by_position(self, layer: int, kind: str
                     ) -> Iterator[tuple[str, int, FrameRecord, int]]:
        """(request_id, position, frame, row) for every received row of one hook point."""
        with self.lock:
            frames = list(self.log.frames)
        for fr in frames:
            if fr.layer != layer or fr.kind != kind:
                continue
            r = 0
            for rid, n, start, _plen in fr.spans:
                for k in range(n):
                    yield rid, start + k, fr, r + k
                r += n

    def rows_by_request(
        self, layer: int, kind: str = "resid_post"
    ) -> dict[str, dict[int, np.ndarray]]:
        """request_id → {position: float32 [d_model]} for one hook point (last write wins)."""
        out: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for rid, pos, fr, row in self._by_position(layer, kind):
            out[rid][pos] = fr.x[row]
        return out

    def roles_by_request(
        self, layer: int, kind: str = "resid_post"
    ) -> dict[str, dict[int, int]]:
        """request_id → {position: TokenRole value} for one hook point (last write wins)."""
        out: dict[str, dict[int, int]] = defaultdict(dict)
        for rid, pos, fr, row in self._by_position(layer, kind):
            out[rid][pos] = int(fr.roles[row])
        return out

    def rows_received(self) -> int:
        with self.lock:
            return sum(fr.x.shape[0] for fr in self.log.frames)

    def finished(self) -> dict[str, monitor_pb2.RequestFinished]:
        """Finished requests by correlation id (engine id when the request had none)."""
        with self.lock:
            return {self.labels.get(f.request_id, f.request_id): f for f in self.log.finished}

    def wait_for(self, pred: Callable[[], object], timeout: float = 30.0, poll: float = 0.1
                 ) -> bool:
        """``monitor.tools.launch.eventually`` (polls every ``poll`` s)."""
        return eventually(pred, timeout, poll)


def serve_forever(port: int = 50051, layers: tuple[int, ...] = (3, 15)) -> None:
    """Run a sink until Ctrl-C, printing frame/row counts every 5 s."""
    sink = CaptureSink(port=port, layers=layers).start()
    print(f"sink on {sink.addr}", flush=True)
    try:
        while True:
            time.sleep(5)
            print(f"frames={sink.n_frames()} rows={sink.rows_received()}", flush=True)
    except KeyboardInterrupt:
        sink.stop()


def main(argv: list[str] | None = None) -> None:
    """``--port`` (default 50051) and ``--layers`` (comma list, default 3,15): serve_forever."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--layers", default="3,15")
    a = ap.parse_args(argv)
    serve_forever(a.port, tuple(int(x) for x in a.layers.split(",")))


if __name__ == "__main__":
    main()
