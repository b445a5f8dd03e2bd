"""A tiny HTTP/1.1 echo upstream on 127.0.0.1 for the demo and the tests.

It answers every request with 200 and a JSON description of what it received, and
records each request, so a test can assert both what reached the upstream and that
nothing did. The record keeps every header line as it arrived (repeats too), so "the
original token never reached the upstream" can be checked on the wire, not on a merged dict.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from extauthz.demo.lifecycle import Started

_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # one value per name: the last line of that name
    raw_headers: tuple[tuple[str, str], ...] = ()  # lower-case names, in arrival order
    at: float = 0.0  # time.monotonic() when the request line had been read

    def values(self, name: str) -> list[str]:
        """Every value sent in a header line called ``name`` (lower-case)."""
        return [value for key, value in self.raw_headers if key == name]


class _Recorder:
    """Append-only request log shared between handler threads and the test thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[ReceivedRequest] = []

    def add(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._items.append(request)

    def snapshot(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._items)


class _EchoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Tests restart servers on fresh ports quickly; don't trip on TIME_WAIT.
    allow_reuse_address = True

    def __init__(self, port: int, recorder: _Recorder) -> None:
        self.recorder = recorder
        super().__init__((_HOST, port), _EchoHandler)


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _EchoHTTPServer

    def do_GET(self) -> None:
        self._echo()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        # Default logging writes every request line to stderr; headers may carry tokens
        # and the noise buries test output.
        return

    def _echo(self) -> None:
        arrived = time.monotonic()
        self._drain_body()
        # HTTP header names are case-insensitive; lower-case them like Envoy does.
        raw = tuple((name.lower(), value) for name, value in self.headers.items())
        received = ReceivedRequest(
            method=self.command, path=self.path, headers=dict(raw), raw_headers=raw, at=arrived
        )
        self.server.recorder.add(received)
        body = json.dumps(
            {"method": received.method, "path": received.path, "headers": received.headers}
        ).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_body(self) -> None:
        # Read the body so a keep-alive connection stays in sync for the next request.
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)


class EchoServer(Started):
    """Echo upstream served from a daemon thread. Port 0 picks a free port."""

    def __init__(self, port: int = 0) -> None:
        self._requested_port = port
        self._recorder = _Recorder()
        self._server: _EchoHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("EchoServer is not started")
        return int(self._server.server_address[1])

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A copy of the requests received so far, in arrival order."""
        return self._recorder.snapshot()

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("EchoServer is already started")
        self._server = _EchoHTTPServer(self._requested_port, self._recorder)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="echo-server",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
