"""The admin HTTP port: probes, metrics, status and the published JWKS. GET and HEAD only."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from extauthz.decision.jose import SigningKey, jwks_document
from extauthz.serve import metrics
from extauthz.serve.address import split_address
from extauthz.serve.metrics import Collector

__all__ = ["AdminServer", "Status"]

log = logging.getLogger("extauthz")
MAX_ADMIN_REQUEST = 8192


class Status(Protocol):
    """What the admin port reports on: one process's Runtime, or a Supervisor of workers."""

    def ready(self) -> bool:
        """Whether checks are being decided (a policy and a key are loaded)."""
        ...

    def published_keys(self) -> tuple[SigningKey, ...]:
        """Every key downstream verifiers should accept; empty until loaded."""
        ...

    def status(self) -> Mapping[str, object]:
        """The status document (JSON) served at ``/statusz``."""
        ...

    def collectors(self) -> Sequence[Collector]:
        """What ``/metrics`` reports besides the process's own registry."""
        ...


class AdminServer:
    """A small HTTP/1.1 server over asyncio streams."""

    def __init__(self, source: Status) -> None:
        self._source = source
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> int:
        """Listen on ``address``; the port actually bound (for port 0)."""
        host, port = split_address(address)
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and wait until the listener is closed."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        """The status, content type and body for one request."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self._source.ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        if path == "/.well-known/jwks.json":
            keys = self._source.published_keys()
            if not keys:
                return 503, "application/json", b'{"keys":[]}'
            return 200, "application/json", json.dumps(jwks_document(keys)).encode()
        if path == "/metrics":
            body, ctype = metrics.render(self._source.collectors())
            return 200, ctype, body
        if path == "/statusz":
            return 200, "application/json", json.dumps(self._source.status(), indent=2).encode()
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > MAX_ADMIN_REQUEST:
                raise ValueError("request too large")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, path, _version = request_line.split(" ", 2)
            status, ctype, body = self.route(method, path)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except Exception:
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        phrase = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head_out = (
            f"HTTP/1.1 {status} {phrase.get(status, 'Service Unavailable')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            writer.write(head_out + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
