"""The running sidecar: the gRPC Check and health services, and the admin HTTP port.

I/O lives here; decisions do not. ``Sidecar.check`` wraps ``core.decide`` so that whatever
happens (nothing loaded, a bug) Envoy receives a deny inside a CheckResponse, never an aborted
RPC that ``failure_mode_allow`` could turn into an allow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .core import Decision, Snapshot, decide
from .decision_log import DecisionLog
from .edge import check_input, check_response, deny_response
from .jose import jwks_document
from .reasons import Reason

log = logging.getLogger("extauthz")
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
MAX_ADMIN_REQUEST = 8192


def new_jti() -> str:
    return secrets.token_urlsafe(16)


class Sidecar:
    """Holds the current Snapshot. Replacing it is one attribute store: a request sees either
    the old snapshot or the new one, never a mix."""

    def __init__(
        self,
        snapshot: Snapshot | None,
        decision_log: DecisionLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.snapshot = snapshot
        self.decision_log = decision_log
        self.clock = clock

    def check(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        now = self.clock()
        request_id = ""
        try:
            snap = self.snapshot
            if snap is None:
                decision = Decision(Reason.NOT_READY, "no policy or key loaded")
            else:
                inp = check_input(request)
                request_id = inp.request_id
                decision = decide(inp, snap, now, new_jti)
            response = check_response(decision)
        except Exception:
            log.exception("internal error while deciding; denying")
            decision = Decision(Reason.INTERNAL_ERROR, "internal error")
            response = deny_response(Reason.INTERNAL_ERROR)
        try:
            self.decision_log.write(decision, time.perf_counter() - started, request_id, now)
        except Exception:
            log.exception("decision log write failed")
        return response


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return self._sidecar.check(request)


@dataclass(frozen=True, slots=True)
class Addresses:
    grpc: str
    admin: str | None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class AdminServer:
    """A small HTTP/1.1 server for probes and the published JWKS. GET only, no keep-alive."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar
        self._server: asyncio.base_events.Server | None = None

    async def start(self, address: str) -> int:
        host, port = split_address(address)
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        snap = self._sidecar.snapshot
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if snap is None:
                return 503, "text/plain", b"not ready: no policy or key loaded\n"
            return 200, "text/plain", b"ready\n"
        if path == "/.well-known/jwks.json":
            if snap is None:
                return 503, "application/json", b'{"keys":[]}'
            document = jwks_document(snap.signing_keys)
            return 200, "application/json", json.dumps(document).encode()
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > MAX_ADMIN_REQUEST:
                raise ValueError("request too large")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, path, _version = request_line.split(" ", 2)
            status, ctype, body = self.route(method, path)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
            method = "GET"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head_out = (
            f"HTTP/1.1 {status} {reason.get(status, 'Service Unavailable')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            writer.write(head_out + (b"" if method == "HEAD" else body))
            await writer.drain()
        finally:
            writer.close()


async def serve(
    sidecar: Sidecar, addresses: Addresses, *, grace: float = 5.0, stop: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain in-flight checks."""
    server = grpc.aio.server(
        # Without this, a second server could bind the same port and silently share traffic.
        options=[("grpc.so_reuseport", 0)]
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationService(sidecar), server
    )
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    port = server.add_insecure_port(addresses.grpc)
    if port == 0:
        raise OSError(f"cannot listen on {addresses.grpc}")
    await server.start()
    admin = AdminServer(sidecar)
    admin_port = await admin.start(addresses.admin) if addresses.admin else None
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    status = serving if sidecar.snapshot is not None else not_serving
    for name in ("", AUTHZ_SERVICE):
        await health_service.set(name, status)
    grpc_host = addresses.grpc.rpartition(":")[0]
    log.info(
        "serving ext_authz on %s:%d, admin on %s",
        grpc_host,
        port,
        f"{split_address(addresses.admin)[0]}:{admin_port}" if addresses.admin else "(off)",
    )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight checks for up to %.1fs", grace)
    for name in ("", AUTHZ_SERVICE):
        await health_service.set(name, not_serving)
    await admin.stop()
    await server.stop(grace)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("extauthz")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
