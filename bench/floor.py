"""The floor: the very same server stacks as ``extauthz serve`` with an allow-all handler.

``python -m bench.floor --grpc-address A --admin-address B [--http-address C]``: ``GrpcFront``
(ext_authz Check and grpc.health.v1) and, with ``--http-address``, ``HttpFront`` (Envoy's HTTP
authorization protocol on httptools, ``/readyz`` for Envoy's health check) around one Sidecar
whose ``check`` returns a ready-made allow without deciding, metering or logging, and the admin
port (``/readyz``) so that it is started and awaited like ``extauthz serve``. The edge passed to
``check`` says which front asks: the gRPC front gets a CheckResponse message, the HTTP front the
bytes of an HTTP/1.1 answer. Both have the shape of a real allow (the narrowed-token header of a
minted token's size, the headers to remove, the reason/rule/jti metadata: dynamic metadata over
gRPC, ``x-extauthz-reason``/``x-extauthz-rule`` headers over HTTP), built once by the product's
own encoder of each edge (``edge.encode_response``, ``http_edge.check_response``): what the
benchmark compares against it is the cost of deciding, not of a smaller message.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from types import SimpleNamespace
from typing import Any, cast

from extauthz.decision.jose import SigningKey
from extauthz.decision.model import Rule, Snapshot
from extauthz.decision.pipeline import Decision
from extauthz.decision.reasons import Reason
from extauthz.policy.compiler import DEFAULT_STRIP_HEADERS
from extauthz.serve.admin import AdminServer
from extauthz.serve.decision_log import DecisionLog
from extauthz.serve.edge import encode_response
from extauthz.serve.grpc_front import GrpcFront
from extauthz.serve.http_edge import HttpEdge
from extauthz.serve.http_edge import check_response as http_check_response
from extauthz.serve.http_front import HttpFront
from extauthz.serve.sidecar import Sidecar

# A token of the size the exchange mints (ES256 at+jwt with act, req and cnf claims).
_TOKEN = "e" * 760
# The benchmark's policy matches its last rule; only the id is read (the metadata).
_RULE = cast(Rule, SimpleNamespace(id="r00009"))


class AllowAll(Sidecar):
    def __init__(self) -> None:
        super().__init__(DecisionLog(None))
        claims = {"jti": "floor-jti-0123456789abcdef"}
        allow = Decision(Reason.ALLOWED, rule=_RULE, token=_TOKEN, claims=claims,
                         strip_headers=DEFAULT_STRIP_HEADERS)  # fmt: skip
        self._response = encode_response(allow)  # the bytes the gRPC front sends
        self._http_response = http_check_response(allow)  # no body: a HEAD gets the same

    def check(self, request: Any, edge: Any) -> Any:
        return self._http_response if isinstance(edge, HttpEdge) else self._response

    @property
    def snapshot(self) -> Snapshot | None:
        # The HTTP front's /readyz wants a loaded snapshot; this sidecar never decides.
        return cast(Snapshot, self)

    # What the admin port reports: always ready, no keys to publish.
    def ready(self) -> bool:
        return True

    def published_keys(self) -> tuple[SigningKey, ...]:
        return ()

    def status(self) -> dict[str, object]:
        return {"floor": True}


async def serve(grpc_address: str, admin_address: str, http_address: str | None) -> None:
    sidecar = AllowAll()
    front, admin = GrpcFront(sidecar), AdminServer(sidecar)
    http = HttpFront(sidecar) if http_address else None
    await front.start(grpc_address)
    await front.set_serving(True)
    if http is not None:
        await http.start(http_address)
    await admin.start(admin_address)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await admin.stop()
    if http is not None:
        await http.stop(0.5)
    await front.stop(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--grpc-address", required=True)
    parser.add_argument("--admin-address", required=True)
    parser.add_argument("--http-address", help="also serve the HTTP front here")
    args = parser.parse_args()
    asyncio.run(serve(args.grpc_address, args.admin_address, args.http_address))
