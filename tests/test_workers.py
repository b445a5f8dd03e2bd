"""``extauthz serve --workers 2``: one gRPC port per worker, the supervisor's admin port,
metrics added up over the workers, load spread by Envoy, restart of a dead worker and a
clean drain on SIGTERM.

Every test runs once per front (ids ``grpc`` and ``http``). Over gRPC each worker listens on
its own port and Envoy's extauthz cluster lists them all; over HTTP the workers share the one
port the supervisor opened, which is the cluster's only endpoint. To reach one given worker on
that shared port, the others are paused (SIGSTOP) while a fresh connection is made: only a
running process can accept it."""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    http_check,
    http_minted,
    http_status,
    minted,
    published_jwks,
    statusz,
    verifies,
    wait_for,
    write_key,
)

from extauthz.decision.jose import generate_signing_key, parse_compact
from extauthz.demo.echo import ReceivedRequest
from extauthz.demo.envoy import FRONTS
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, SidecarProcess, http_get

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
# The module's workers drain for real on SIGTERM (the module's last test sends it).
DRAIN, GRACE = 1.0, 1.0
MODULE_ARGS = ["--drain-delay", str(DRAIN), "--grace", str(GRACE), "--no-decision-log"]
EXCHANGE_ISSUER = "https://exchange.shop.svc"  # the example policy's
MARK = "x-test-id"


@dataclass
class Workers:
    sidecar: SidecarProcess
    idp: Idp
    port: int  # worker i's gRPC port is port + i
    front: str

    @property
    def admin(self) -> int:
        return self.sidecar.admin_port

    @property
    def http_port(self) -> int:
        """The HTTP front's one port, shared by every worker."""
        assert self.sidecar.http_port is not None
        return self.sidecar.http_port

    @property
    def authz_ports(self) -> list[int]:
        """Envoy's extauthz cluster: one endpoint per worker over gRPC, the shared port over
        HTTP."""
        if self.front == "http":
            return [self.http_port]
        return [self.port, self.port + 1]

    def token(self) -> str:
        return self.idp.token(now=time.time())

    def decisions(self, **labels: str) -> float:
        return Metrics.scrape(self.admin).value("extauthz_decisions_total", **labels)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in statusz(self.admin)["workers"]]

    def check(
        self, index: int, token: str | None, workload: str = "orders"
    ) -> tuple[int, str | None]:
        """One direct check answered by worker ``index``: (HTTP status, kid of the minted
        token on an allow)."""
        if self.front == "grpc":
            checker = Checker(self.port + index)
            try:
                response = checker.check(token, workload=workload)
            finally:
                checker.close()
            status = http_status(response)
            return status, minted(response).header["kid"] if status == 200 else None
        with only(self, index):
            answer = http_check(self.http_port, token, workload=workload)
        return answer.status, http_minted(answer).header["kid"] if answer.status == 200 else None


@contextlib.contextmanager
def only(workers: Workers, index: int) -> Iterator[None]:
    """Every worker but ``index`` paused: a new connection to the shared HTTP port can only be
    accepted by that one."""
    others = [pid for i, pid in enumerate(workers.worker_pids()) if i != index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def start_workers(tmp_path: Path, policy_text: str, extra: list[str], front: str) -> Workers:
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
        front=front,
    )
    if sidecar.http_port is not None:
        sidecar.http_port = free_port_except([port, port + 1, sidecar.admin_port])
    sidecar.start(timeout=30)  # returns once /readyz is 200: every worker serves
    return Workers(sidecar, idp, port, front)


@pytest.fixture(scope="module", params=FRONTS)
def workers(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    example_policy_text: str,
) -> Iterator[Workers]:
    front: str = request.param
    workdir = tmp_path_factory.mktemp(f"workers-{front}")
    running = start_workers(workdir, example_policy_text, MODULE_ARGS, front)
    try:
        yield running
    finally:
        running.sidecar.stop()


def send_checks(workers: Workers, sent: dict[int, int]) -> set[str]:
    """``sent``: how many allowed checks each worker (by index) answers; the minted kids."""
    kids = set()
    for index, count in sent.items():
        for _ in range(count):
            status, kid = workers.check(index, workers.token())
            assert status == 200
            assert kid is not None
            kids.add(kid)
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
    kids = send_checks(workers, {0: 2, 1: 2})
    assert kids == {doc["signing_kid"]}
    assert {k["kid"] for k in published_jwks(workers.admin)["keys"]} == kids


def test_supervisor_metrics_add_up_over_the_workers(workers: Workers) -> None:
    """Denies no other test of the module causes (billing has no rule), so their count starts
    at 0; a worker moves its counts into the shared files every 0.1 s, so the sum lags."""
    no_rule = {"decision": "deny", "reason": "no_rule"}
    assert workers.decisions(**no_rule) == 0
    for index, count in ((0, 5), (1, 4)):
        for _ in range(count):
            assert workers.check(index, workers.token(), workload="billing") == (403, None)
    wait_for(lambda: workers.decisions(**no_rule) >= 9, 10, what="9 denies counted")
    assert workers.decisions(**no_rule) == 9


# --- through Envoy ----------------------------------------------------------------------------


@dataclass
class Sent:
    mark: str
    token: str
    t_send: float
    t_done: float
    status: int  # -1: no answer from Envoy at all


class Traffic(threading.Thread):
    """Allowed ``orders`` reads through Envoy, each tagged with ``x-test-id``, until told to
    stop (bounded: ``limit`` requests or ``seconds``)."""

    def __init__(self, mesh: Slice, idp: Idp, *, limit: int = 2000, seconds: float = 25.0) -> None:
        super().__init__(daemon=True)
        self.mesh, self.idp, self.limit, self.seconds = mesh, idp, limit, seconds
        self.sent: list[Sent] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self.stopped.is_set() and time.monotonic() < end and len(self.sent) < self.limit:
            token, mark = self.idp.token(now=time.time()), uuid.uuid4().hex
            started = time.monotonic()
            try:
                status = self.mesh.request("orders", token, extra={MARK: mark}).status
            except (OSError, http.client.HTTPException):
                status = -1
            self.sent.append(Sent(mark, token, started, time.monotonic(), status))
            time.sleep(0.005)

    def count(self, since: float = 0.0) -> int:
        return sum(1 for s in list(self.sent) if s.t_send >= since)

    def finish(self) -> list[Sent]:
        self.stopped.set()
        self.join(timeout=15)
        assert not self.is_alive()
        return list(self.sent)


def assert_every_request_was_checked(
    sent: list[Sent], received: Sequence[ReceivedRequest], jwks: dict[str, Any]
) -> None:
    """Of ``sent``, each allowed request reached the upstream once, carrying only a token we
    minted for it; nothing else reached it (a refused request, or one Envoy could not check).
    ``received``: what the upstream received meanwhile."""
    by_mark: dict[str, list[ReceivedRequest]] = {}
    for request in received:
        (mark,) = request.values(MARK)
        by_mark.setdefault(mark, []).append(request)
    assert set(by_mark) <= {s.mark for s in sent}
    for s in sent:
        arrived = by_mark.get(s.mark, [])
        if s.status != 200:
            assert arrived == [], f"a request answered {s.status} reached the upstream"
            continue
        assert len(arrived) == 1
        (value,) = arrived[0].values("authorization")
        token = parse_compact(value.removeprefix("Bearer "))
        assert token.claims["iss"] == EXCHANGE_ISSUER
        assert verifies(token, jwks)
        signature = s.token.rsplit(".", 1)[1]
        assert all(signature not in v for _, v in arrived[0].raw_headers)


def envoy_healthy(mesh: Slice) -> set[int]:
    """The extauthz endpoints Envoy's health checks currently pass."""
    clusters = mesh.envoy_admin("/clusters")
    flags = re.findall(r"^extauthz::127\.0\.0\.1:(\d+)::health_flags::(\S+)$", clusters, re.M)
    return {int(port) for port, flag in flags if flag == "healthy"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, workers: Workers) -> Iterator[Slice]:
    """Envoy in front of the module's workers: one endpoint per worker over gRPC, the shared
    port over HTTP."""
    running = Slice(
        tmp_path_factory.mktemp(f"workers-mesh-{workers.front}"),
        workers.sidecar,
        authz_ports=workers.authz_ports,
    )
    running.start()
    try:
        yield running
    finally:
        running.stop(sidecar=False)


def all_healthy(mesh: Slice, workers: Workers) -> None:
    """Every worker serving, and Envoy's health checks agree."""
    wait_for(
        lambda: (
            all(w["serving"] for w in statusz(workers.admin)["workers"])
            and envoy_healthy(mesh) == set(workers.authz_ports)
        ),
        15,
        what="every worker serving and healthy in Envoy",
        interval=0.1,
    )


@pytest.mark.envoy
def test_envoy_spreads_checks_over_the_workers(mesh: Slice, workers: Workers) -> None:
    """Over gRPC, Envoy holds a connection per endpoint and both workers get checks; over
    HTTP, every check goes to the one shared port (and the kernel hands each new connection
    to whichever worker accepts it)."""
    all_healthy(mesh, workers)
    before = len(mesh.echo.requests)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(lambda _: mesh.request("orders", workers.token()).status, range(60))
        )
    clusters = mesh.envoy_admin("/clusters")
    assert statuses == [200] * 60
    assert len(mesh.echo.requests) - before == 60
    per_host = {
        int(port): int(count)
        for port, count in re.findall(
            r"^extauthz::127\.0\.0\.1:(\d+)::rq_total::(\d+)$", clusters, re.M
        )
    }
    assert set(per_host) == set(workers.authz_ports)
    assert all(count > 0 for count in per_host.values()), per_host


@pytest.mark.envoy
def test_envoy_keeps_checking_while_a_worker_is_killed(mesh: Slice, workers: Workers) -> None:
    """Attack on availability, and on the fail-closed promise: a worker dies mid-traffic.
    Checks in flight on its connections fail (Envoy answers 503), the other worker keeps
    answering, and no request reaches the upstream unchecked. (Its restart is waited for by
    the next test.)"""
    all_healthy(mesh, workers)
    seen = len(mesh.echo.requests)
    traffic = Traffic(mesh, workers.idp)
    try:
        jwks = published_jwks(workers.admin)
        traffic.start()
        wait_for(lambda: traffic.count() >= 10, 10, what="traffic to flow")
        killed = time.monotonic()
        os.kill(workers.worker_pids()[1], signal.SIGKILL)

        def allowed_since_kill() -> int:
            return sum(1 for s in list(traffic.sent) if s.t_send > killed and s.status == 200)

        # The other worker kept answering while the killed one was down.
        wait_for(lambda: allowed_since_kill() >= 10, 10, what="allows after the kill")
        sent = traffic.finish()
    finally:
        traffic.finish()

    assert_every_request_was_checked(sent, mesh.echo.requests[seen:], jwks)
    assert {s.status for s in sent} <= {200, 503}, {s.status for s in sent}
    assert {s.status for s in sent if s.t_done < killed} == {200}


def test_a_killed_worker_is_restarted(workers: Workers) -> None:
    old_pid = workers.worker_pids()[0]
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        doc = statusz(workers.admin)["workers"]
        return bool(doc[0]["pid"] != old_pid and all(w["serving"] for w in doc))

    # (Worker 1 may be restarting too, after the test above.)
    wait_for(restarted, 15, what="the workers to be restarted", interval=0.1)
    assert http_get(workers.admin, "/readyz")[0] == 200
    assert workers.worker_pids()[1] != old_pid
    # The new process answers: on its own gRPC port, or on the shared HTTP port it inherited
    # (with worker 1 paused, nobody else could).
    assert workers.check(0, workers.token())[0] == 200
    assert workers.check(1, workers.token())[0] == 200


@pytest.mark.envoy
def test_sigterm_behind_envoy_fails_closed(mesh: Slice, workers: Workers) -> None:
    """The last test of the module's workers, which it stops: SIGTERM to the supervisor while
    requests flow through Envoy. Envoy keeps them flowing while the workers still answer, then
    fails closed (503) once its health check sees them drain and after they are gone. Never
    does a request reach the upstream unchecked."""
    proc = workers.sidecar._proc
    assert proc is not None
    all_healthy(mesh, workers)
    pids = workers.worker_pids()
    seen = len(mesh.echo.requests)
    traffic = Traffic(mesh, workers.idp)
    try:
        jwks = published_jwks(workers.admin)
        start = time.monotonic()
        traffic.start()
        wait_for(lambda: traffic.count() >= 10, 10, what="traffic to flow")
        terminated = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=DRAIN + GRACE + 5)
        exited = time.monotonic()
        wait_for(lambda: traffic.count(exited) >= 10, 10, what="traffic after the exit")
        sent = traffic.finish()
    finally:
        traffic.finish()

    assert code == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
    assert_every_request_was_checked(sent, mesh.echo.requests[seen:], jwks)
    assert {s.status for s in sent} <= {200, 503}, {s.status for s in sent}
    assert {s.status for s in sent if start <= s.t_send and s.t_done < terminated} == {200}
    after = [s.status for s in sent if s.t_send > exited]
    assert len(after) >= 10
    assert set(after) == {503}, "with every worker gone Envoy must fail closed"


# --- SIGTERM ----------------------------------------------------------------------------------


def grpc_status(checker: Checker, token: str) -> int:
    return http_status(checker.check(token, timeout=2))


def http_check_status(port: int, token: str) -> int:
    return http_check(port, token, timeout=2).status


class Client(threading.Thread):
    """Direct checks to every worker in a loop, recording what came back (bounded): over
    gRPC to each worker's port, over HTTP to the shared port on a fresh connection each."""

    def __init__(self, workers: Workers) -> None:
        super().__init__(daemon=True)
        self.workers = workers
        # (monotonic time sent, "OK:<http status>" or why there was no answer)
        self.results: list[tuple[float, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        token = self.workers.idp.token(now=time.time())
        checkers: list[Checker] = []
        calls: list[Callable[[], int]]
        if self.workers.front == "grpc":
            checkers = [Checker(self.workers.port), Checker(self.workers.port + 1)]
            calls = [functools.partial(grpc_status, c, token) for c in checkers]
        else:
            calls = [functools.partial(http_check_status, self.workers.http_port, token)]
        end = time.monotonic() + 20
        try:
            while not self.stopped.is_set() and time.monotonic() < end and len(self.results) < 3000:
                for call in calls:
                    sent = time.monotonic()
                    try:
                        self.results.append((sent, f"OK:{call()}"))
                    except grpc.RpcError as exc:
                        self.results.append((sent, exc.code().name))
                    except (OSError, http.client.HTTPException) as exc:
                        self.results.append((sent, type(exc).__name__))
                time.sleep(0.01)
        finally:
            for checker in checkers:
                checker.close()

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
        assert not self.is_alive()


# After the drain, a direct client may only fail to get an answer, never get a wrong one.
NO_ANSWER = {
    # CANCELLED: a check still in flight when the grace period ends is cancelled by the
    # server's stop; Envoy counts that as a failed check (a deny, failure_mode_allow: false).
    "grpc": {"UNAVAILABLE", "CANCELLED"},
    "http": {
        "ConnectionRefusedError",
        "ConnectionResetError",
        "RemoteDisconnected",
        "BrokenPipeError",
    },
}


def draining(workers: Workers) -> bool:
    """Whether the front Envoy health-checks says not ready: gRPC health NOT_SERVING, or the
    HTTP front's /readyz 503 (while checks are still answered)."""
    if workers.front == "http":
        return http_get(workers.http_port, "/readyz", timeout=1)[0] == 503
    with grpc.insecure_channel(f"127.0.0.1:{workers.port}", CHANNEL_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE)
        status = health.Check(request, timeout=1).status
        return bool(status == health_pb2.HealthCheckResponse.NOT_SERVING)


@pytest.mark.parametrize("front", FRONTS)
def test_sigterm_drains_every_worker_and_exits_0(
    tmp_path: Path, example_policy_text: str, front: str
) -> None:
    drain, grace = 1.5, 2.0
    extra = ["--drain-delay", str(drain), "--grace", str(grace), "--no-decision-log"]
    running = start_workers(tmp_path, example_policy_text, extra, front)
    proc = running.sidecar._proc
    assert proc is not None
    client = Client(running)
    try:
        pids = running.worker_pids()
        client.start()
        wait_for(lambda: len(client.results) >= 10, 5, what="checks to flow")
        terminated = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        # Draining: health says not ready, but checks are still answered.
        wait_for(
            lambda: draining(running), drain - 0.5, what="not ready while draining", interval=0.02
        )
        code = proc.wait(timeout=drain + grace + 5)
    finally:
        client.finish()
        running.sidecar.stop()

    assert code == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"
    before = [outcome for sent, outcome in client.results if sent < terminated]
    during = [
        outcome for sent, outcome in client.results if terminated <= sent < terminated + drain - 0.5
    ]
    assert set(before) == {"OK:200"}
    assert len(during) >= 10
    assert set(during) == {"OK:200"}, "a check failed while the workers were draining"
    # After the drain, only a refused connection is acceptable, never a wrong answer.
    assert {o for _, o in client.results} <= {"OK:200", *NO_ANSWER[front]}


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
