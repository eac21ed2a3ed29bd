"""A real HTTP receiver on loopback for alert tests (webhook target, Alertmanager webhook
receiver): records every POST, answers a settable status, can go down and come back on the
same port (connection refused while down)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (any JSON value)."""
        return json.loads(self.body)


class Receiver:
    """`start()` binds 127.0.0.1 (port 0 the first time, the same port afterwards)."""

    def __init__(self) -> None:
        self.port = 0
        self.status = 200
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with outer._lock:
                    status = outer.status
                    if 200 <= status < 300:
                        outer.received.append(Received(self.path, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, pred: Callable[[list[Received]], bool], timeout: float = 30.0,
                 what: str = "condition") -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if pred(snap):
                return snap
            time.sleep(0.05)
        raise AssertionError(f"receiver: timed out after {timeout} s waiting for {what}; "
                             f"got {len(self.snapshot())} posts")
