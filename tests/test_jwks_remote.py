"""Issuer JWKS from a URL: a real HTTP server on 127.0.0.1 whose content and up/down state the
tests control. Stale keys are kept while the issuer is down, an unknown kid triggers a
rate-limited refetch, bad documents are failed fetches, redirects and slow servers are refused.

The schedule (refresh, backoff, the unknown-kid rate limit, the first-fetch deadline) is tested
in-process on ``RemoteJwks`` with clocks and waits the test moves on, so no test waits for it in
real time; the tests through a running sidecar check the wiring and need only a fetch's time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opskit import (
    HOST,
    PATH,
    QUICK,
    Checker,
    JwksServer,
    Metrics,
    deny_error,
    http_status,
    policy_with_jwks_url,
    statusz,
    tampered,
    wait_for,
    write_key,
)

from extauthz.decision.jose import MAX_JWKS_BYTES, generate_signing_key, jwks_document
from extauthz.decision.model import Policy
from extauthz.decision.pipeline import CheckInput, decide
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, WORKLOADS, SidecarProcess, http_get
from extauthz.errors import KeyLoadError
from extauthz.policy.compiler import compile_policy
from extauthz.policy.loader import assemble
from extauthz.serve.jwks_remote import (
    RETRY_MIN,
    UNKNOWN_KID_INTERVAL,
    RemoteJwks,
    fetch_jwks,
)

CORP = "corp-idp"
REFRESH = 10.0  # the policy's refresh below, in seconds
WALL_START = 1_800_000_000.0
SIGNING = generate_signing_key()


@pytest.fixture
def issuer() -> Iterator[JwksServer]:
    server = JwksServer()
    server.up()
    try:
        yield server
    finally:
        server.answering.set()
        server.down()


def url_sidecar(tmp_path: Path, policy_text: str, url: str, timeout: str = "1s") -> SidecarProcess:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_with_jwks_url(policy_text, url, refresh="10s", timeout=timeout))
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    return SidecarProcess(policy, [key], tmp_path / "s", extra_args=QUICK)


def issuer_status(admin_port: int) -> dict[str, Any]:
    doc: dict[str, Any] = statusz(admin_port)["issuers"][CORP]
    return doc


def outcome(checker: Checker, token: str) -> tuple[int, str | None]:
    response = checker.check(token)
    return http_status(response), deny_error(response)


def fetch_failures(admin_port: int) -> float:
    return Metrics.scrape(admin_port).value(
        "extauthz_jwks_fetches_total", issuer=CORP, result="failure"
    )


# --- in-process: RemoteJwks on a clock the test moves ---------------------------------------


class Timers:
    """Monotonic and wall clocks that move only on ``advance``, and the ``wait`` RemoteJwks
    pauses with: it ends when its event is set or the clock has reached its deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self._waits: list[tuple[float, asyncio.Event, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_START + self.now

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        if event.is_set():
            return
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + timeout, event, timer)
        self._waits.append(entry)
        woken = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([woken, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            self._waits.remove(entry)

    def parked(self) -> int:
        """Waits that nothing has ended yet."""
        return sum(1 for _, event, timer in self._waits if not (timer.done() or event.is_set()))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for due, _, timer in self._waits:
            if due <= self.now and not timer.done():
                timer.set_result(None)


class Harness:
    """One RemoteJwks following the example policy's issuer, moved to ``url``."""

    def __init__(self, policy_text: str, url: str) -> None:
        text = policy_with_jwks_url(policy_text, url, refresh=f"{REFRESH:g}s", timeout="1s")
        self.policy: Policy = compile_policy(text, source="policy.yaml")
        self.timers = Timers()
        self.remote = RemoteJwks(
            monotonic=self.timers.monotonic, wall=self.timers.wall, wait=self.timers.wait
        )
        self.changes = 0
        self.remote.subscribe(self._changed)

    def _changed(self) -> None:
        self.changes += 1

    async def settle(self, parked: int = 1) -> None:
        """Until the fetch task has done what it was woken for and waits again (bounded in real
        time: a fetch is one request on loopback)."""
        deadline = time.monotonic() + 5
        while self.timers.parked() < parked:
            assert time.monotonic() < deadline, "the fetch task did not come back to its wait"
            await asyncio.sleep(0.002)

    async def advance(self, seconds: float) -> None:
        self.timers.advance(seconds)
        await self.settle()

    def kids(self) -> list[str]:
        return sorted(self.remote.keys[CORP].by_kid)

    def outcome(self, token: str) -> tuple[int, str | None]:
        """What a sidecar holding these keys answers (the same (status, error) as over gRPC)."""
        snapshot = assemble(self.policy, dict(self.remote.keys), [SIGNING])
        request = CheckInput(
            "GET", HOST, PATH, {"authorization": f"Bearer {token}"}, WORKLOADS["orders"]
        )
        decision = decide(request, snapshot, time.time(), lambda: "jti")
        return decision.reason.http_status, None if decision.allowed else decision.reason.code


def run(scenario: Callable[[Harness], Awaitable[None]], harness: Harness) -> None:
    async def main() -> None:
        harness.remote.configure(harness.policy.issuers.values())
        try:
            await scenario(harness)
        finally:
            await harness.remote.close()

    asyncio.run(main())


def fetches(h: Harness, result: str) -> int:
    return h.remote.fetches.get((CORP, result), 0)


def test_stale_keys_kept_through_an_outage_and_the_retry_backs_off(
    example_policy_text: str, issuer: JwksServer
) -> None:
    first, stranger = Idp(ISSUER), Idp(ISSUER)
    issuer.publish(first)
    harness = Harness(example_policy_text, issuer.url())

    async def scenario(h: Harness) -> None:
        await h.settle()
        assert h.kids() == [first.key.kid]
        assert h.remote.last_success[CORP] == WALL_START
        assert h.outcome(first.token(now=time.time())) == (200, None)

        # Down at the next scheduled refresh: the fetch fails, the keys we had stay.
        issuer.down()
        failures = fetches(h, "failure")
        await h.advance(REFRESH - 0.25)
        assert fetches(h, "failure") == failures and CORP not in h.remote.last_error
        await h.advance(0.25)
        assert fetches(h, "failure") == failures + 1
        assert h.remote.last_error[CORP]
        assert h.kids() == [first.key.kid]
        assert h.outcome(first.token(now=time.time())) == (200, None)
        assert h.outcome(tampered(first)) == (401, "signature_invalid")
        assert h.outcome(stranger.token(now=time.time())) == (401, "key_unknown")

        # Retries back off: 2 s after the first failure, 4 s after the second.
        await h.advance(2 * RETRY_MIN - 0.25)
        assert fetches(h, "failure") == failures + 1
        await h.advance(0.25)
        assert fetches(h, "failure") == failures + 2
        await h.advance(4 * RETRY_MIN - 0.25)
        assert fetches(h, "failure") == failures + 2

        # Back, still with the same key: the retry succeeds and clears the error.
        issuer.up()
        successes = fetches(h, "success")
        await h.advance(0.25)
        assert fetches(h, "success") == successes + 1
        assert CORP not in h.remote.last_error
        assert h.remote.last_success[CORP] == h.timers.wall()
        assert h.kids() == [first.key.kid]
        assert h.changes == 1  # the same keys again are no change

    run(scenario, harness)


def test_unknown_kid_refetches_at_once_but_at_most_once_per_interval(
    example_policy_text: str, issuer: JwksServer
) -> None:
    first, second = Idp(ISSUER), Idp(ISSUER)
    issuer.publish(first)
    harness = Harness(example_policy_text, issuer.url())

    async def scenario(h: Harness) -> None:
        await h.settle()
        assert issuer.count() == 1

        # The issuer rotates; the next scheduled refresh is 10 s away, the unknown kid brings
        # the new key in without the clock moving at all.
        issuer.publish(second)
        assert h.outcome(second.token(now=time.time())) == (401, "key_unknown")
        h.remote.unknown_kid(CORP)
        await h.settle()
        assert issuer.count() == 2
        assert h.kids() == [second.key.kid]
        assert h.changes == 2
        assert h.outcome(second.token(now=time.time())) == (200, None)
        assert h.outcome(first.token(now=time.time())) == (401, "key_unknown")  # withdrawn

        # A flood of unknown kids for the rest of the interval: not one more fetch.
        # (Steps of 1/64 s keep the clock exact: it reaches the interval, not just below it.)
        for _ in range(200):
            h.remote.unknown_kid(CORP)
            await h.advance(1 / 64)
        assert issuer.count() == 2
        h.remote.unknown_kid("no-such-issuer")  # not a URL issuer: ignored
        await h.advance(UNKNOWN_KID_INTERVAL - 200 / 64)
        h.remote.unknown_kid(CORP)  # a whole interval later: one fetch again
        await h.settle()
        assert issuer.count() == 3
        h.remote.unknown_kid(CORP)
        await h.settle()
        assert issuer.count() == 3

        # The scheduled refresh counts from the last fetch, forced or not.
        await h.advance(REFRESH - 0.25)
        assert issuer.count() == 3
        await h.advance(0.25)
        assert issuer.count() == 4

    run(scenario, harness)


def test_bad_documents_are_failed_fetches_and_the_keys_stay(
    example_policy_text: str, issuer: JwksServer
) -> None:
    idp, stranger = Idp(ISSUER), Idp(ISSUER)
    issuer.publish(idp)
    harness = Harness(example_policy_text, issuer.url())

    async def scenario(h: Harness) -> None:
        await h.settle()
        before = fetches(h, "failure")

        # A valid JWKS, padded past the size cap; fetched at once for the unknown kid.
        document = jwks_document([stranger.key]) | {"pad": "x" * MAX_JWKS_BYTES}
        issuer.body = json.dumps(document).encode()
        h.remote.unknown_kid(CORP)
        await h.settle()
        assert fetches(h, "failure") == before + 1
        assert "larger than" in h.remote.last_error[CORP]
        assert h.outcome(idp.token(now=time.time())) == (200, None)

        # Not JSON at all: the retry, 2 s later, fails too.
        issuer.body = b'{"keys": [ not json'
        await h.advance(2 * RETRY_MIN)
        assert fetches(h, "failure") == before + 2
        assert "JSON" in h.remote.last_error[CORP]
        assert h.kids() == [idp.key.kid]
        assert h.outcome(idp.token(now=time.time())) == (200, None)
        assert h.outcome(stranger.token(now=time.time())) == (401, "key_unknown")

    run(scenario, harness)


def test_first_fetch_waits_for_the_answer_but_not_past_its_deadline(
    example_policy_text: str, issuer: JwksServer
) -> None:
    idp = Idp(ISSUER)
    issuer.publish(idp)
    issuer.answering.clear()
    harness = Harness(example_policy_text, issuer.url())

    async def scenario(h: Harness) -> None:
        waiting = asyncio.ensure_future(h.remote.first_fetch(5.0))
        await asyncio.to_thread(wait_for, issuer.count, 5, what="the first request")
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the issuer has not answered yet
        issuer.answering.set()
        await asyncio.wait_for(waiting, 5)
        assert h.kids() == [idp.key.kid]
        assert h.timers.now == 0.0  # it returned on the answer, not on the deadline

        # An issuer that never answers holds first_fetch only until its deadline.
        issuer.answering.clear()
        configured = list(h.policy.issuers.values())
        h.remote.configure([])  # forget the issuer ...
        h.remote.configure(configured)  # ... and follow it afresh: no keys, no error
        waiting = asyncio.ensure_future(h.remote.first_fetch(5.0))
        await asyncio.to_thread(wait_for, lambda: issuer.count() == 2, 5, what="a request")
        await h.settle()  # first_fetch waits on the clock now
        h.timers.advance(4.9)
        await asyncio.sleep(0.05)
        assert not waiting.done()
        h.timers.advance(0.1)
        await asyncio.wait_for(waiting, 5)
        assert CORP not in h.remote.keys and CORP not in h.remote.last_error
        issuer.answering.set()

    run(scenario, harness)


# --- through a running sidecar ---------------------------------------------------------------


def test_stale_keys_served_while_the_issuer_is_down(
    tmp_path: Path, example_policy_text: str, issuer: JwksServer
) -> None:
    first, stranger = Idp(ISSUER), Idp(ISSUER)
    issuer.publish(first)
    with url_sidecar(tmp_path, example_policy_text, issuer.url()) as sidecar:
        admin = sidecar.admin_port
        checker = Checker(sidecar.grpc_port)
        try:
            wait_for(lambda: issuer_status(admin)["keys"] == [first.key.kid], 5, what="first fetch")
            good = lambda: first.token(now=time.time())  # noqa: E731
            assert outcome(checker, good()) == (200, None)
            assert outcome(checker, tampered(first)) == (401, "signature_invalid")

            # The issuer goes away: decisions stay right with the keys we had.
            issuer.down()
            assert outcome(checker, stranger.token(now=time.time())) == (401, "key_unknown")
            wait_for(lambda: issuer_status(admin)["last_fetch_error"], 5, what="a failed fetch")
            assert fetch_failures(admin) >= 1
            assert issuer_status(admin)["keys"] == [first.key.kid]
            assert outcome(checker, good()) == (200, None)
            assert outcome(checker, tampered(first)) == (401, "signature_invalid")
        finally:
            checker.close()


def test_unknown_kid_brings_a_rotated_key_in_and_a_flood_does_not_flood_the_issuer(
    tmp_path: Path, example_policy_text: str, issuer: JwksServer
) -> None:
    first, second, stranger = Idp(ISSUER), Idp(ISSUER), Idp(ISSUER)
    issuer.publish(first)
    with url_sidecar(tmp_path, example_policy_text, issuer.url()) as sidecar:
        admin = sidecar.admin_port
        checker = Checker(sidecar.grpc_port)
        try:
            wait_for(lambda: issuer_status(admin)["keys"] == [first.key.kid], 5, what="first fetch")
            good = lambda: first.token(now=time.time())  # noqa: E731
            assert outcome(checker, good()) == (200, None)

            # The issuer rotates. The next scheduled refresh is 10 s away; the unknown kid
            # brings the new key in within a fetch's time.
            issuer.publish(second)
            assert outcome(checker, second.token(now=time.time())) == (401, "key_unknown")
            wait_for(
                lambda: outcome(checker, second.token(now=time.time())) == (200, None),
                3,
                what="the rotated key to be fetched on an unknown kid",
            )
            assert outcome(checker, good()) == (401, "key_unknown")  # withdrawn by the issuer
            assert issuer_status(admin)["keys"] == [second.key.kid]

            # A flood of unknown kids does not turn into a flood of fetches.
            since, sent = time.monotonic(), 0
            while time.monotonic() < since + UNKNOWN_KID_INTERVAL and sent < 200:
                assert outcome(checker, stranger.token(now=time.time())) == (401, "key_unknown")
                sent += 1
            assert sent >= 20
            assert issuer.count(since=since) <= 2
        finally:
            checker.close()


def test_oversized_jwks_is_a_failed_fetch(
    tmp_path: Path, example_policy_text: str, issuer: JwksServer
) -> None:
    idp, stranger = Idp(ISSUER), Idp(ISSUER)
    issuer.publish(idp)
    with url_sidecar(tmp_path, example_policy_text, issuer.url()) as sidecar:
        admin = sidecar.admin_port
        checker = Checker(sidecar.grpc_port)
        try:
            wait_for(lambda: issuer_status(admin)["keys"] == [idp.key.kid], 5, what="fetch")
            before = fetch_failures(admin)

            # A valid JWKS, padded past the size cap.
            document = jwks_document([stranger.key]) | {"pad": "x" * MAX_JWKS_BYTES}
            issuer.body = json.dumps(document).encode()
            assert outcome(checker, stranger.token(now=time.time())) == (401, "key_unknown")
            wait_for(lambda: fetch_failures(admin) >= before + 1, 5, what="a failed fetch")
            assert "larger than" in issuer_status(admin)["last_fetch_error"]
            assert issuer_status(admin)["keys"] == [idp.key.kid]
            assert outcome(checker, idp.token(now=time.time())) == (200, None)
            assert outcome(checker, stranger.token(now=time.time())) == (401, "key_unknown")
        finally:
            checker.close()


def test_not_serving_before_the_first_fetch(
    tmp_path: Path, example_policy_text: str, issuer: JwksServer
) -> None:
    idp = Idp(ISSUER)
    issuer.publish(idp)
    issuer.answering.clear()  # a slow issuer, well within the fetch timeout
    sidecar = url_sidecar(tmp_path, example_policy_text, issuer.url(), timeout="5s")
    # start() returns once /readyz says 200, so it runs beside the test.
    starting = threading.Thread(target=sidecar.start, daemon=True)
    starting.start()
    try:
        wait_for(issuer.count, 10, what="the sidecar's first fetch")
        # Held: the process is up (its fetch arrived) but must not say it is ready.
        try:
            status, _ = http_get(sidecar.admin_port, "/readyz", timeout=0.5)
        except OSError:
            status = None
        assert status != 200
        assert starting.is_alive()
        issuer.answering.set()
        starting.join(timeout=20)
        assert not starting.is_alive() and sidecar.running
        checker = Checker(sidecar.grpc_port)
        try:  # start() returned: /readyz said 200
            assert outcome(checker, idp.token(now=time.time())) == (200, None)
        finally:
            checker.close()
    finally:
        issuer.answering.set()
        starting.join(timeout=20)
        sidecar.stop()


# --- fetch_jwks on its own -------------------------------------------------------------------


def test_fetch_jwks_reads_a_good_document(issuer: JwksServer) -> None:
    idp = Idp(ISSUER)
    issuer.publish(idp)
    keys = fetch_jwks(issuer.url(), 2)
    assert set(keys.by_kid) == {idp.key.kid}


def test_fetch_jwks_refuses_redirects(issuer: JwksServer) -> None:
    issuer.publish(Idp(ISSUER))
    issuer.redirects["/moved"] = issuer.url()
    with pytest.raises(KeyLoadError, match="302"):
        fetch_jwks(issuer.url("/moved"), 2)
    assert issuer.count("/moved") == 1
    assert issuer.count() == 0


def test_fetch_jwks_non_200_is_an_error(issuer: JwksServer) -> None:
    issuer.publish(Idp(ISSUER))
    issuer.status = 503
    with pytest.raises(KeyLoadError, match="503"):
        fetch_jwks(issuer.url(), 2)


def test_fetch_jwks_honours_the_timeout(issuer: JwksServer) -> None:
    issuer.publish(Idp(ISSUER))
    issuer.answering.clear()  # never answers while the client waits
    started = time.monotonic()
    with pytest.raises(KeyLoadError):
        fetch_jwks(issuer.url(), 0.2)
    assert time.monotonic() - started < 2


def test_fetch_jwks_timeout_covers_a_slow_body(issuer: JwksServer) -> None:
    issuer.body = b'{"keys": []}'
    issuer.drip = 0.01  # 12 bytes, one at a time: each read well within the timeout
    ticks = iter(range(0, 1000, 2))  # 2 s pass between two looks at the clock

    started = time.monotonic()
    with pytest.raises(KeyLoadError, match="no complete answer within 5s"):
        fetch_jwks(issuer.url(), 5, monotonic=lambda: float(next(ticks)))
    assert time.monotonic() - started < 1.5
