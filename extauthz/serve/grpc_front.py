"""The gRPC front: ext_authz v3 ``Check`` and ``grpc.health.v1``, SERVING only while loaded."""

from __future__ import annotations

import asyncio
import socket

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz.decision.pipeline import CheckInput, Decision
from extauthz.decision.reasons import Deny, Reason
from extauthz.serve import edge
from extauthz.serve.address import split_address
from extauthz.serve.sidecar import Sidecar

__all__ = ["AUTHZ_SERVICE", "GrpcEdge", "GrpcFront"]

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


class GrpcEdge:
    """CheckRequest in, the serialised CheckResponse out (see ``edge``)."""

    def parse(self, request: external_auth_pb2.CheckRequest) -> CheckInput | Deny:
        return edge.check_input(request)

    def request_id(self, request: external_auth_pb2.CheckRequest) -> str:
        http = request.attributes.request.http
        return str(http.headers.get("x-request-id") or http.id)

    def respond(self, decision: Decision, decision_id: str = "") -> bytes:
        return edge.encode_response(decision, decision_id)

    def internal_error(self) -> bytes:
        return edge.encode_deny(Reason.INTERNAL_ERROR)


def _as_is(response: bytes) -> bytes:
    """Answers leave the edge serialised already."""
    return response


def authorization_handler(sidecar: Sidecar) -> grpc.GenericRpcHandler:
    """The ext_authz v3 Authorization service: ``Check``, answered with encoded bytes."""
    grpc_edge = GrpcEdge()

    async def check(request: external_auth_pb2.CheckRequest, context: object) -> bytes:
        return sidecar.check(request, grpc_edge)

    handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=_as_is,
    )
    return grpc.method_handlers_generic_handler(AUTHZ_SERVICE, {"Check": handler})


class GrpcFront:
    """The gRPC server around one Sidecar."""

    def __init__(self, sidecar: Sidecar) -> None:
        # Without so_reuseport=0 a second server could bind the same port and share traffic.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((authorization_handler(sidecar),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._sidecar = sidecar

    async def start(self, address: str) -> int:
        """Listen on ``address``; the port actually bound (for port 0)."""
        _check_bindable(address)
        try:
            port = int(self.server.add_insecure_port(address))
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            raise OSError(f"cannot listen on {address}: in use, or not an address here") from exc
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        await self.set_serving(self._sidecar.snapshot is not None)
        return port

    async def set_serving(self, serving: bool) -> None:
        """What grpc.health.v1 answers, for the server and the Authorization service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """NOT_SERVING first and keep answering for ``drain_delay``, so Envoy's health checks
        steer new checks elsewhere before we refuse them; then finish what is in flight."""
        await self.set_serving(False)
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        await self.server.stop(grace)


def _check_bindable(address: str) -> None:
    """Bind once ourselves, so a busy or foreign address fails with the system's reason
    (grpc only says "Failed to bind", after logging its own line)."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _name, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
