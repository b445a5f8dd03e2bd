"""The floor: the very same gRPC server stack as ``extauthz serve`` with an allow-all handler.

``python -m bench.floor --port P`` runs ``extauthz.serve.grpc_front.GrpcFront`` (ext_authz Check and
grpc.health.v1, SERVING) around a Sidecar whose ``check`` returns a ready-made allow
CheckResponse without deciding, metering or logging. The response has the shape of a real
allow (the narrowed-token header, the headers to remove, dynamic metadata) so that what the
benchmark compares against it is the cost of deciding, not of a smaller message. It prints
``READY <port>`` once serving and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

# A token of the size the exchange mints (ES256 at+jwt with act, req and cnf claims).
_TOKEN_BYTES = 760


def allow_response() -> Any:
    from extauthz.decision.pipeline import Decision
    from extauthz.decision.reasons import Reason
    from extauthz.policy.compiler import DEFAULT_STRIP_HEADERS
    from extauthz.serve.edge import check_response

    decision = Decision(
        Reason.ALLOWED,
        token="e" * _TOKEN_BYTES,
        claims={"jti": "floor-jti-0123456789abcdef"},
        strip_headers=DEFAULT_STRIP_HEADERS,
    )
    return check_response(decision)


def make_sidecar() -> Any:
    from extauthz.serve.decision_log import DecisionLog
    from extauthz.serve.sidecar import Sidecar

    class AllowAll(Sidecar):
        def __init__(self) -> None:
            super().__init__(DecisionLog(None))
            self._response = allow_response()

        def check(self, request: Any, edge: Any) -> Any:
            return self._response

    return AllowAll()


async def serve(port: int) -> None:
    from extauthz.serve.grpc_front import GrpcFront

    front = GrpcFront(make_sidecar())
    bound = await front.start(f"127.0.0.1:{port}")
    await front.set_serving(True)  # the allow-all sidecar has no snapshot to wait for
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    await stop.wait()
    await front.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.port))
    except OSError as exc:
        print(f"bench.floor: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
