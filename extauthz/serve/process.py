"""One serving process: the gRPC front, the HTTP front when asked for, the admin port and the
reload loop, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from extauthz.serve import metrics
from extauthz.serve.address import split_address
from extauthz.serve.admin import AdminServer
from extauthz.serve.decision_log import DecisionLog
from extauthz.serve.grpc_front import GrpcFront
from extauthz.serve.http_front import HttpFront
from extauthz.serve.runtime import Runtime
from extauthz.serve.sidecar import Sidecar

__all__ = ["Addresses", "configure_logging", "run_until_signalled", "serve_single"]

log = logging.getLogger("extauthz")
LOG_FLUSH_INTERVAL = 0.1


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
    """Where to listen; None leaves that port closed."""

    grpc: str | None
    admin: str | None
    http: str | None = None
    # A listening socket for the HTTP front that the supervisor opened and shares among its
    # workers (instead of ``http``).
    http_socket: socket.socket | None = None


async def serve_single(
    sidecar: Sidecar,
    runtime: Runtime,
    addresses: Addresses,
    *,
    grace: float = 10.0,
    drain_delay: float = 0.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM (or ``stop``): NOT_SERVING for ``drain_delay``, then up to
    ``grace`` seconds for the checks in flight."""
    front = GrpcFront(sidecar) if addresses.grpc else None
    http = HttpFront(sidecar) if addresses.http or addresses.http_socket else None
    admin = AdminServer(runtime) if addresses.admin else None
    stop = await run_until_signalled(runtime.request_reload, stop)
    try:
        await runtime.start()
        if front is not None and addresses.grpc is not None:
            port = await front.start(addresses.grpc)
            log.info("ext_authz gRPC on %s:%d", addresses.grpc.rpartition(":")[0], port)
        if http is not None:
            http_port = await http.start(addresses.http, addresses.http_socket)
            log.info("ext_authz HTTP on port %d", http_port)
        if admin is not None and addresses.admin is not None:
            admin_port = await admin.start(addresses.admin)
            log.info("admin HTTP on %s:%d", split_address(addresses.admin)[0], admin_port)
    except OSError:
        # Close what did start, inside the event loop, so the caller's one-line reason is
        # all the operator sees.
        if front is not None:
            await front.server.stop(0)
        if http is not None:
            await http.stop(0)
        await runtime.remote.close()
        raise
    reloader = asyncio.create_task(runtime.run(stop))
    flusher = asyncio.create_task(_flush_periodically(sidecar.decision_log))
    tasks = [reloader, flusher]
    if front is not None and not runtime.ready():  # --retry-at-start: SERVING once loaded
        tasks.append(asyncio.create_task(_serving_once_ready(front, runtime)))
    await stop.wait()
    for task in tasks[2:]:  # nothing may turn SERVING back on while draining
        task.cancel()
    log.info(
        "stopping: NOT_SERVING for %.1fs, then up to %.1fs for in-flight checks", drain_delay, grace
    )
    await asyncio.gather(*(f.stop(grace, drain_delay) for f in (front, http) if f is not None))
    if admin is not None:
        await admin.stop()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    sidecar.decision_log.flush()
    metrics.TALLY.publish()


async def _serving_once_ready(front: GrpcFront, runtime: Runtime) -> None:
    await runtime.until_ready()
    await front.set_serving(True)
    log.info("inputs loaded: SERVING")


async def _flush_periodically(decision_log: DecisionLog) -> None:
    """The decision log's buffered lines, and (in a worker) the metrics tally, a few times a
    second: batches, off the request path."""
    while True:
        await asyncio.sleep(LOG_FLUSH_INTERVAL)
        try:
            decision_log.flush()
        except (OSError, ValueError):
            log.exception("decision log flush failed")
        try:
            metrics.TALLY.publish()
        except Exception:
            log.exception("publishing the metrics failed")


def configure_logging(level: str = "INFO") -> None:
    """Operational messages to stderr, one line each, with the process id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger("extauthz")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
