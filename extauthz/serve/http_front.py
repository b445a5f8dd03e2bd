"""The HTTP front: Envoy's HTTP authorization service on loopback, HTTP/1.1 on httptools.

Envoy opens a keep-alive connection per check in flight and sends one check at a time on
each; every check is decided synchronously as soon as its request is complete, so answers
leave in the order the requests came. ``GET /readyz`` (outside the check path) is the health
check Envoy's cluster uses: 200 while a policy and a key are loaded and we are not draining.

The caller's identity comes from a header the local Envoy sets, so this port must only be
reachable from that Envoy: it listens on loopback addresses only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

import httptools

from extauthz.decision.reasons import Reason
from extauthz.serve.address import is_loopback, split_address
from extauthz.serve.http_edge import HeadEdge, HttpCheck, HttpEdge, deny_response
from extauthz.serve.sidecar import Sidecar

__all__ = ["HttpFront"]

log = logging.getLogger("extauthz")

READY_PATH = b"/readyz"
_READY = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\nready\n"
_NOT_READY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: 10\r\n\r\nnot ready\n"
)
# A longer request target is refused (request_too_large), never decided on a part of it.
MAX_TARGET_BYTES = 16 * 1024
# Answers a peer does not read pile up in the transport; past this, it is dropped.
MAX_UNREAD_ANSWERS = 1 << 20


class HttpFront:
    """The HTTP server around one Sidecar."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.serving = True
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._edges = (HttpEdge(), HeadEdge())

    async def start(self, address: str | None = None, sock: socket.socket | None = None) -> int:
        """Listen on ``address`` (a loopback host:port), or on a listening socket handed
        down by the supervisor; the port actually bound."""
        loop = asyncio.get_running_loop()
        if sock is None:
            if address is None:
                raise ValueError("an address or a socket to listen on")
            host, port = split_address(address)
            if not is_loopback(host):
                raise OSError(f"cannot listen on {address}: the HTTP front is loopback only")
            try:
                self._server = await loop.create_server(
                    lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
                )
            except OSError as exc:
                raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        else:
            self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        bound = self._server.sockets[0].getsockname()
        if not is_loopback(str(bound[0])):  # a handed-down socket is checked too
            self._server.close()
            raise OSError(f"cannot serve on {bound[0]}: the HTTP front is loopback only")
        return int(bound[1])

    def ready(self) -> bool:
        return self.serving and self.sidecar.snapshot is not None

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """/readyz says 503 for ``drain_delay`` while checks are still answered, so Envoy's
        health checks move new checks away first; then stop listening and close the
        connections once their current answer (if any) is written."""
        self.serving = False
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), grace)
            except TimeoutError:
                log.warning("HTTP front: connections still open after %.1fs", grace)

    def answer(self, method: bytes, target: bytes, check: HttpCheck) -> bytes:
        """The bytes to send back for one complete request."""
        if target == READY_PATH:
            answer = _READY if self.ready() else _NOT_READY
            return answer[: answer.index(b"\r\n\r\n") + 4] if method == b"HEAD" else answer
        check.method = method.decode("ascii", "replace")
        check.target = target.decode("utf-8", "replace")
        return self.sidecar.check(check, self._edges[method == b"HEAD"])

    def refuse(self, why: str) -> bytes:
        """The answer to bytes that are not a request we read: a deny, counted and logged."""
        try:
            return self.sidecar.check(HttpCheck("", "", invalid=why), self._edges[0])
        except Exception:  # the sidecar turns faults into denies; this is the last guard
            return deny_response(Reason.REQUEST_INVALID)


class _Connection(asyncio.Protocol):
    """One connection from Envoy: httptools calls the ``on_*`` methods while it parses."""

    def __init__(self, front: HttpFront) -> None:
        self.front = front
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.check = HttpCheck("", "")
        self.target = b""
        self.closing = False

    # -- asyncio --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's, or uvloop's, which does not subclass it).
        self.transport = cast(asyncio.Transport, transport)
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse("an upgrade or CONNECT request is not a check")
        except httptools.HttpParserError as exc:
            self._refuse(f"not an HTTP/1.1 request: {str(exc)[:80]}")

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- httptools --

    def on_message_begin(self) -> None:
        self.check = HttpCheck("", "")
        self.target = b""

    def on_url(self, url: bytes) -> None:
        if len(self.target) + len(url) > MAX_TARGET_BYTES:
            self.check.target_too_long = True  # check_input denies it
            return
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.check.add_header(name.decode("latin-1"), value.decode("utf-8", "replace"))

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        if self.parser.should_upgrade():
            return  # not a check: httptools raises HttpParserUpgrade next, and it is refused
        method = self.parser.get_method()
        answer = self.front.answer(method, self.target, self.check)
        transport.write(answer)
        if not self.parser.should_keep_alive() or not self.front.serving:
            self.close()
        elif transport.get_write_buffer_size() > MAX_UNREAD_ANSWERS:
            log.warning("HTTP front: a peer does not read its answers; closing it")
            self.close()

    def _refuse(self, why: str) -> None:
        """A request we cannot parse: a deny, counted and logged like any, then close."""
        if self.transport is None or self.closing:
            return
        self.transport.write(self.front.refuse(why))
        self.close()
