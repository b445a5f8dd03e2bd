"""``--workers N``: N sidecar processes, one gRPC port each, under one supervisor.

Envoy's gRPC client holds one HTTP/2 connection per endpoint and Envoy worker, so processes
sharing one port through SO_REUSEPORT would not share Envoy's load. Each worker therefore
listens on its own port (base, base+1, ...) and Envoy lists them all as endpoints of the
extauthz cluster. Every worker loads and reloads the policy on its own. The supervisor runs
the admin port: readiness (its own snapshot and every worker SERVING), the JWKS, the status,
and metrics added up over all workers (prometheus multiprocess mode). SIGHUP is passed on;
SIGTERM drains every worker and exits 0 when they all did.

The HTTP front is different: Envoy opens an HTTP/1.1 connection per check in flight, so the
workers share one port. The supervisor opens that listening socket and every worker inherits
it and accepts on it (no SO_REUSEPORT, so no other process can join the port).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extauthz.decision.jose import SigningKey
from extauthz.serve import metrics
from extauthz.serve.address import is_loopback, split_address
from extauthz.serve.admin import AdminServer
from extauthz.serve.metrics import RuntimeCollector
from extauthz.serve.process import run_until_signalled
from extauthz.serve.runtime import Runtime

log = logging.getLogger("extauthz.workers")
RESTART_DELAY = 1.0
HEALTH_INTERVAL = 0.5


def worker_addresses(grpc_address: str, count: int) -> list[str]:
    host, port = split_address(grpc_address)
    if port == 0:
        raise ValueError(
            "--workers needs a fixed --grpc-address port (workers use port, port+1, ...)"
        )
    return [f"{host}:{port + i}" for i in range(count)]


def http_listener(address: str) -> socket.socket:
    """The HTTP front's listening socket, to be inherited by every worker."""
    host, port = split_address(address)
    if not is_loopback(host):
        raise OSError(f"cannot listen on {address}: the HTTP front is loopback only")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


class Worker:
    def __init__(
        self, index: int, address: str, command: list[str], pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.index = index
        self.address = address
        self.command = command
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.serving = False
        self.restarts = 0

    def start(self) -> None:
        # stdout is inherited: each decision-log line is one write, well under PIPE_BUF.
        self.proc = subprocess.Popen(self.command, pass_fds=self.pass_fds)
        log.info("worker %d (pid %d) on %s", self.index, self.proc.pid, self.address)


class WorkersCollector(Collector):
    """Each worker's process metrics under a stable ``worker`` label (its index, or
    ``supervisor``), whatever its pid; its restarts; whether it answers SERVING."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "extauthz_worker_restarts",
            "Times a worker process exited unasked and was started again.",
            labels=["worker"],
        )
        up = GaugeMetricFamily(
            "extauthz_worker_up", "1 while the worker answers SERVING.", labels=["worker"]
        )
        processes: list[tuple[str, int]] = [("supervisor", os.getpid())]
        for worker in self.workers:
            label = str(worker.index)
            restarts.add_metric([label], worker.restarts)
            up.add_metric([label], 1 if worker.serving else 0)
            if worker.proc is not None and worker.proc.poll() is None:
                processes.append((label, worker.proc.pid))
        yield from (restarts, up)
        families: dict[str, Metric] = {}
        for label, pid in processes:
            collector = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in collector.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": label}, sample.value)
        yield from families.values()


class Supervisor:
    def __init__(
        self,
        runtime: Runtime,
        worker_argv: Sequence[str],
        addresses: list[str],
        http_address: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.http = http_listener(http_address) if http_address else None
        http_argv = ["--http-fd", str(self.http.fileno())] if self.http else []
        fds = (self.http.fileno(),) if self.http else ()
        self.workers = [
            Worker(
                i,
                address,
                [
                    sys.executable,
                    "-m",
                    "extauthz",
                    "serve",
                    *worker_argv,
                    "--grpc-address",
                    address,
                    "--admin-address",
                    "",
                    *http_argv,
                    "--worker",
                ],
                fds,
            )  # fmt: skip
            for i, address in enumerate(addresses)
        ]
        self.stopping = False

    # -- Status for the admin port --

    def collectors(self) -> list[Collector]:
        """The runtime's state (counted here once, not once per worker) and the workers'."""
        return [RuntimeCollector(self.runtime, self.ready), WorkersCollector(self.workers)]

    def ready(self) -> bool:
        """Loaded here, and every worker SERVING."""
        return self.runtime.ready() and all(w.serving for w in self.workers)

    def published_keys(self) -> tuple[SigningKey, ...]:
        """The keys the workers sign with and publish (they load the same files)."""
        return self.runtime.published_keys()

    def status(self) -> dict[str, object]:
        """The runtime's status document and each worker's state."""
        doc = self.runtime.status()
        doc["workers"] = [
            {
                "index": w.index,
                "address": w.address,
                "pid": w.proc.pid if w.proc else None,
                "serving": w.serving,
            }
            for w in self.workers
        ]
        return doc

    # -- lifecycle --

    async def run(self, admin_address: str | None, grace: float, drain_delay: float = 0.0) -> int:
        stop = await run_until_signalled(self._reload)
        admin = AdminServer(self) if admin_address else None
        if admin is not None and admin_address is not None:
            # Before any worker: a port that cannot be had must not leave workers behind.
            port = await admin.start(admin_address)
            log.info("admin HTTP on %s:%d (all workers)", split_address(admin_address)[0], port)
        for worker in self.workers:
            worker.start()
        watches = [asyncio.create_task(self._watch(w)) for w in self.workers]
        reloader = asyncio.create_task(self.runtime.run(stop))
        await stop.wait()
        self.stopping = True
        for task in watches:  # no restart may race the signals below
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        log.info("stopping %d worker(s)", len(self.workers))
        for worker in self.workers:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = grace + drain_delay + 5
        codes = await asyncio.gather(*(self._reap(w, deadline) for w in self.workers))
        reloader.cancel()
        await asyncio.gather(reloader, return_exceptions=True)
        if admin is not None:
            await admin.stop()
        if self.http is not None:
            self.http.close()
        return 0 if all(code == 0 for code in codes) else 1

    def stop_requested(self) -> bool:
        return self.stopping

    def _reload(self) -> None:
        self.runtime.request_reload()
        for worker in self.workers:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGHUP)

    async def _reap(self, worker: Worker, timeout: float) -> int | None:
        proc = worker.proc
        if proc is None:
            return None
        try:
            code = await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
        except TimeoutError:
            log.error("worker %d did not drain in time; killing it", worker.index)
            proc.kill()
            code = await asyncio.to_thread(proc.wait)
        metrics.mark_process_dead(proc.pid)
        return code

    async def _watch(self, worker: Worker) -> None:
        """Follow one worker's health; restart it if it dies while we are not stopping."""
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                proc = worker.proc
                if proc is not None and proc.poll() is not None and not self.stopping:
                    worker.serving = False
                    metrics.mark_process_dead(proc.pid)
                    log.error("worker %d exited with %s; restarting", worker.index, proc.returncode)
                    await asyncio.sleep(RESTART_DELAY)
                    if self.stop_requested():  # SIGTERM came meanwhile: start nothing new
                        return
                    worker.start()
                    worker.restarts += 1
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    worker.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    worker.serving = False
                await asyncio.sleep(HEALTH_INTERVAL)
