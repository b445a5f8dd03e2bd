"""The running sidecar: the gRPC Check and health services, and the admin HTTP port.

I/O lives here; decisions do not. ``Sidecar.check`` wraps ``core.decide`` so that whatever
happens (nothing loaded, a bug) Envoy receives a deny inside a CheckResponse, never an aborted
RPC that ``failure_mode_allow`` could turn into an allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz.decision.jose import jwks_document
from extauthz.decision.pipeline import Decision, Snapshot, decide
from extauthz.decision.reasons import Reason
from extauthz.serve import metrics
from extauthz.serve.decision_log import DecisionLog
from extauthz.serve.edge import RequestTooLarge, check_input, check_response, deny_response

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
        on_unknown_kid: Callable[[str], None] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.decision_log = decision_log
        self.clock = clock
        self.on_unknown_kid = on_unknown_kid

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
        except RequestTooLarge as exc:
            decision = Decision(Reason.REQUEST_TOO_LARGE, str(exc))
            response = check_response(decision)
        except Exception:
            log.exception("internal error while deciding; denying")
            decision = Decision(Reason.INTERNAL_ERROR, "internal error")
            response = deny_response(Reason.INTERNAL_ERROR)
        elapsed = time.perf_counter() - started
        try:
            self._account(decision, elapsed)
            self.decision_log.write(decision, elapsed, request_id, now)
        except Exception:
            log.exception("recording the decision failed")
        return response

    def _account(self, decision: Decision, elapsed: float) -> None:
        rule = decision.rule.id if decision.rule else ""
        _decision_counter(decision.allowed, decision.reason.code, rule, decision.shadow).inc()
        metrics.DECISION_SECONDS.observe(elapsed)
        if decision.token is not None:
            _minted_counter(rule).inc()
        if (
            decision.reason is Reason.KEY_UNKNOWN
            and decision.issuer_id
            and self.on_unknown_kid is not None
        ):
            self.on_unknown_kid(decision.issuer_id)


# Looking a labelled child up by its label values costs more than incrementing it; the label
# sets are few (reasons x rules), so keep the children.
@functools.lru_cache(maxsize=16384)
def _decision_counter(allowed: bool, reason: str, rule: str, shadow: bool) -> Any:
    return metrics.DECISIONS.labels(
        decision="allow" if allowed else "deny",
        reason=reason,
        rule=rule,
        shadow="true" if shadow else "false",
    )


@functools.lru_cache(maxsize=16384)
def _minted_counter(rule: str) -> Any:
    return metrics.TOKENS_MINTED.labels(rule=rule)


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    async def Check(  # noqa: N802 - the gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return self._sidecar.check(request)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class Status(Protocol):
    """What the admin port reports on; one process, or a supervisor of workers."""

    def ready(self) -> bool: ...
    def snapshot(self) -> Snapshot | None: ...
    def status(self) -> dict[str, Any]: ...


class AdminServer:
    """A small HTTP/1.1 server: probes, metrics, status and the published JWKS. GET only."""

    def __init__(self, source: Status) -> None:
        self._source = source
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
            snap = self._source.snapshot()
            if snap is None:
                return 503, "application/json", b'{"keys":[]}'
            return 200, "application/json", json.dumps(jwks_document(snap.signing_keys)).encode()
        if path == "/metrics":
            body, ctype = metrics.render()
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


class GrpcFront:
    """The gRPC server: ext_authz Check and grpc.health.v1, SERVING only while loaded."""

    def __init__(self, sidecar: Sidecar) -> None:
        # Without so_reuseport=0 a second server could bind the same port and share traffic.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationService(sidecar), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._sidecar = sidecar

    async def start(self, address: str) -> int:
        port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self.set_serving(self._sidecar.snapshot is not None)
        return port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        # NOT_SERVING first and keep answering for drain_delay, so Envoy's health checks
        # steer new checks elsewhere before we refuse them; then finish what is in flight.
        await self.set_serving(False)
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        await self.server.stop(grace)


async def run_until_signalled(
    on_reload: Callable[[], None], stop: asyncio.Event | None = None
) -> asyncio.Event:
    """Install SIGTERM/SIGINT (stop) and SIGHUP (reload) handlers; return the stop event."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    return stop


@dataclass(frozen=True, slots=True)
class Addresses:
    grpc: str | None
    admin: str | None


async def serve_single(
    sidecar: Sidecar,
    runtime: Any,
    addresses: Addresses,
    *,
    grace: float = 10.0,
    drain_delay: float = 0.0,
    stop: asyncio.Event | None = None,
) -> None:
    """One process: gRPC front, admin port and the reload loop, until SIGTERM."""

    class _Source:
        def ready(self) -> bool:
            return sidecar.snapshot is not None

        def snapshot(self) -> Snapshot | None:
            return sidecar.snapshot

        def status(self) -> dict[str, Any]:
            return dict(runtime.status())

    front = GrpcFront(sidecar) if addresses.grpc else None
    admin = AdminServer(_Source()) if addresses.admin else None
    stop = await run_until_signalled(runtime.request_reload, stop)
    await runtime.start()
    if front is not None:
        assert addresses.grpc is not None
        port = await front.start(addresses.grpc)
        log.info("ext_authz gRPC on %s:%d", addresses.grpc.rpartition(":")[0], port)
    if admin is not None:
        assert addresses.admin is not None
        admin_port = await admin.start(addresses.admin)
        log.info("admin HTTP on %s:%d", split_address(addresses.admin)[0], admin_port)
    reloader = asyncio.create_task(runtime.run(stop))
    flusher = asyncio.create_task(_flush_periodically(sidecar.decision_log))
    await stop.wait()
    log.info(
        "stopping: NOT_SERVING for %.1fs, then up to %.1fs for in-flight checks", drain_delay, grace
    )
    if front is not None:
        await front.stop(grace, drain_delay)
    if admin is not None:
        await admin.stop()
    for task in (reloader, flusher):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    sidecar.decision_log.flush()


LOG_FLUSH_INTERVAL = 0.1


async def _flush_periodically(decision_log: DecisionLog) -> None:
    while True:
        await asyncio.sleep(LOG_FLUSH_INTERVAL)
        try:
            decision_log.flush()
        except (OSError, ValueError):
            log.exception("decision log flush failed")


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger("extauthz")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
