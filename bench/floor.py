"""The floor: the very same gRPC server stack as ``extauthz serve`` with an allow-all handler.

``python -m bench.floor --grpc-address A --admin-address B``: ``GrpcFront`` (ext_authz Check
and grpc.health.v1) around a Sidecar whose ``check`` returns a ready-made allow without
deciding, metering or logging, and the admin port (``/readyz``) so that it is started and
awaited like ``extauthz serve``. The response has the shape of a real allow (the narrowed-token
header, the headers to remove, dynamic metadata): what the benchmark compares against it is
the cost of deciding, not of a smaller message.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from extauthz.decision.jose import SigningKey
from extauthz.decision.pipeline import Decision
from extauthz.decision.reasons import Reason
from extauthz.policy.compiler import DEFAULT_STRIP_HEADERS
from extauthz.serve.admin import AdminServer
from extauthz.serve.decision_log import DecisionLog
from extauthz.serve.edge import check_response
from extauthz.serve.grpc_front import GrpcFront
from extauthz.serve.sidecar import Sidecar

# A token of the size the exchange mints (ES256 at+jwt with act, req and cnf claims).
_TOKEN = "e" * 760


class AllowAll(Sidecar):
    def __init__(self) -> None:
        super().__init__(DecisionLog(None))
        claims = {"jti": "floor-jti-0123456789abcdef"}
        allow = Decision(
            Reason.ALLOWED, token=_TOKEN, claims=claims, strip_headers=DEFAULT_STRIP_HEADERS
        )
        self._response = check_response(allow)

    def check(self, request: Any, edge: Any) -> Any:
        return self._response

    # What the admin port reports: always ready, no keys to publish.
    def ready(self) -> bool:
        return True

    def published_keys(self) -> tuple[SigningKey, ...]:
        return ()

    def status(self) -> dict[str, object]:
        return {"floor": True}


async def serve(grpc_address: str, admin_address: str) -> None:
    sidecar = AllowAll()
    front, admin = GrpcFront(sidecar), AdminServer(sidecar)
    await front.start(grpc_address)
    await front.set_serving(True)
    await admin.start(admin_address)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await admin.stop()
    await front.stop(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--grpc-address", required=True)
    parser.add_argument("--admin-address", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.grpc_address, args.admin_address))
