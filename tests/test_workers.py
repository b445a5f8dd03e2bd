"""``extauthz serve --workers 2``: one gRPC port per worker, the supervisor's admin port,
metrics added up over the workers, load spread by Envoy, restart of a dead worker and a
clean drain on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opskit import (
    CHANNEL_OPTIONS,
    QUICK,
    Checker,
    Metrics,
    Slice,
    free_port_except,
    free_port_pair,
    http_status,
    minted,
    published_jwks,
    statusz,
    wait_for,
    write_key,
)

from extauthz.decision.jose import generate_signing_key
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, SidecarProcess, http_get

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


@dataclass
class Workers:
    sidecar: SidecarProcess
    idp: Idp
    port: int  # worker i listens on port + i

    @property
    def admin(self) -> int:
        return self.sidecar.admin_port

    def token(self) -> str:
        return self.idp.token(now=time.time())

    def decisions(self) -> float:
        return Metrics.scrape(self.admin).value("extauthz_decisions_total")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in statusz(self.admin)["workers"]]


def start_workers(tmp_path: Path, policy_text: str, extra: list[str]) -> Workers:
    idp = Idp(ISSUER)
    idp.write_jwks(tmp_path / "issuers" / "corp-idp.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    port = free_port_pair()
    sidecar = SidecarProcess(
        policy,
        [key],
        tmp_path / "workers",
        grpc_port=port,
        admin_port=free_port_except([port, port + 1]),
        extra_args=["--workers", "2", *extra],
    )
    sidecar.start(timeout=30)  # returns once /readyz is 200: every worker serves
    return Workers(sidecar, idp, port)


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory, example_policy_text: str
) -> Iterator[Workers]:
    running = start_workers(tmp_path_factory.mktemp("workers"), example_policy_text, QUICK)
    try:
        yield running
    finally:
        running.sidecar.stop()


def send_checks(workers: Workers, sent: dict[int, int]) -> set[str]:
    """``sent``: how many allowed Checks to send to each port; returns the minted kids."""
    kids = set()
    for port, count in sent.items():
        checker = Checker(port)
        try:
            for _ in range(count):
                response = checker.check(workers.token())
                assert http_status(response) == 200
                kids.add(minted(response).header["kid"])
        finally:
            checker.close()
    return kids


def test_every_worker_answers(workers: Workers) -> None:
    assert http_get(workers.admin, "/readyz")[0] == 200
    doc = statusz(workers.admin)
    assert doc["ready"] is True
    assert [(w["index"], w["address"], w["serving"]) for w in doc["workers"]] == [
        (0, f"127.0.0.1:{workers.port}", True),
        (1, f"127.0.0.1:{workers.port + 1}", True),
    ]
    assert len(set(workers.worker_pids()) | {doc["pid"]}) == 3
    # Every worker signs with the key the supervisor publishes.
    kids = send_checks(workers, {workers.port: 2, workers.port + 1: 2})
    assert kids == {doc["signing_kid"]}
    assert {k["kid"] for k in published_jwks(workers.admin)["keys"]} == kids


def test_supervisor_metrics_add_up_over_the_workers(workers: Workers) -> None:
    before = workers.decisions()
    send_checks(workers, {workers.port: 5, workers.port + 1: 4})
    assert workers.decisions() - before == 9


@pytest.mark.envoy
def test_envoy_spreads_checks_over_the_workers(tmp_path: Path, workers: Workers) -> None:
    mesh = Slice(tmp_path, workers.sidecar, authz_ports=[workers.port, workers.port + 1])
    mesh.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(lambda _: mesh.request("orders", workers.token()).status, range(60))
            )
        clusters = mesh.envoy_admin("/clusters")
    finally:
        mesh.stop(sidecar=False)
    assert statuses == [200] * 60
    per_host = {
        int(port): int(count)
        for port, count in re.findall(
            r"^extauthz::127\.0\.0\.1:(\d+)::rq_total::(\d+)$", clusters, re.M
        )
    }
    assert set(per_host) == {workers.port, workers.port + 1}
    assert all(count > 0 for count in per_host.values()), per_host


def test_a_killed_worker_is_restarted(workers: Workers) -> None:
    old_pid = workers.worker_pids()[0]
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        worker = statusz(workers.admin)["workers"][0]
        return bool(worker["pid"] != old_pid and worker["serving"])

    wait_for(restarted, 10, what="worker 0 to be restarted", interval=0.1)
    checker = Checker(workers.port)
    try:
        assert http_status(checker.check(workers.token())) == 200
    finally:
        checker.close()
    assert http_get(workers.admin, "/readyz")[0] == 200
    assert workers.worker_pids()[1] != old_pid


class Client(threading.Thread):
    """Direct Checks to both workers in a loop, recording what came back (bounded)."""

    def __init__(self, port: int, idp: Idp) -> None:
        super().__init__(daemon=True)
        self.port, self.idp = port, idp
        # (monotonic time sent, grpc status code name or "OK:<http status>")
        self.results: list[tuple[float, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        checkers = [Checker(self.port), Checker(self.port + 1)]
        token = self.idp.token(now=time.time())
        end = time.monotonic() + 20
        try:
            while not self.stopped.is_set() and time.monotonic() < end and len(self.results) < 3000:
                for checker in checkers:
                    sent = time.monotonic()
                    try:
                        response = checker.check(token, timeout=2)
                        self.results.append((sent, f"OK:{http_status(response)}"))
                    except grpc.RpcError as exc:
                        self.results.append((sent, exc.code().name))
                time.sleep(0.01)
        finally:
            for checker in checkers:
                checker.close()

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
        assert not self.is_alive()


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path, example_policy_text: str) -> None:
    drain, grace = 1.5, 2.0
    extra = ["--drain-delay", str(drain), "--grace", str(grace), "--no-decision-log"]
    running = start_workers(tmp_path, example_policy_text, extra)
    proc = running.sidecar._proc
    assert proc is not None
    client = Client(running.port, running.idp)
    try:
        pids = running.worker_pids()
        client.start()
        wait_for(lambda: len(client.results) >= 10, 5, what="checks to flow")
        terminated = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)

        # Draining: health says NOT_SERVING, but Checks are still answered.
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(
                lambda: (
                    health.Check(
                        health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE), timeout=1
                    ).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                drain - 0.5,
                what="NOT_SERVING while draining",
                interval=0.02,
            )
        code = proc.wait(timeout=drain + grace + 5)
    finally:
        client.finish()
        running.sidecar.stop()

    assert code == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
    before = [outcome for sent, outcome in client.results if sent < terminated]
    draining = [
        outcome for sent, outcome in client.results if terminated <= sent < terminated + drain - 0.5
    ]
    assert set(before) == {"OK:200"}
    assert len(draining) >= 10
    assert set(draining) == {"OK:200"}, "a Check failed while the workers were draining"
    # After the drain, only a refused connection is acceptable, never a wrong answer.
    assert {o for _, o in client.results} <= {"OK:200", "UNAVAILABLE"}


def test_workers_needs_a_fixed_port(tmp_path: Path, example_policy_text: str) -> None:
    Idp(ISSUER).write_jwks(tmp_path / "issuers" / "corp-idp.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(example_policy_text)
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    sidecar = SidecarProcess(policy, [key], tmp_path / "s", extra_args=["--workers", "2", *QUICK])
    command = [
        a if a != f"127.0.0.1:{sidecar.grpc_port}" else "127.0.0.1:0" for a in sidecar.command()
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2
    assert "fixed --grpc-address port" in result.stderr
