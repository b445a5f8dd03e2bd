"""Issuer JWKS from a URL: a real HTTP server on 127.0.0.1 whose content and up/down state the
tests control. Stale keys are kept while the issuer is down, an unknown kid triggers a
rate-limited refetch, bad documents are failed fetches, redirects and slow servers are refused.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opskit import (
    QUICK,
    Checker,
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
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, SidecarProcess, free_port
from extauthz.errors import KeyLoadError
from extauthz.serve.jwks_remote import UNKNOWN_KID_INTERVAL, fetch_jwks

JWKS_PATH = "/jwks.json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        # A client that gave up (the timeout tests) closes the connection under us.
        with contextlib.suppress(ConnectionError):
            self._answer()

    def _answer(self) -> None:
        control = self.server.control
        control.record(self.path)
        if control.delay:
            time.sleep(control.delay)
        if self.path in control.redirects:
            self.send_response(302)
            self.send_header("Location", control.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = control.body
        self.send_response(control.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if control.drip:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(control.drip)
        else:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    control: JwksServer


class JwksServer:
    """An issuer's JWKS endpoint. ``down()`` closes the port; ``up()`` opens it again on the
    same port. Every request is recorded (monotonic time, path)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.body = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0  # seconds before answering
        self.drip = 0.0  # seconds between the body's bytes
        self.redirects: dict[str, str] = {}
        self.fetches: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None

    def url(self, path: str = JWKS_PATH) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def publish(self, *idps: Idp) -> None:
        self.body = json.dumps(jwks_document([i.key for i in idps])).encode()

    def record(self, path: str) -> None:
        with self._lock:
            self.fetches.append((time.monotonic(), path))

    def count(self, path: str = JWKS_PATH, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for at, p in self.fetches if p == path and at >= since)

    def up(self) -> None:
        assert self._server is None
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.control = self
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self._server = server

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


@pytest.fixture
def issuer() -> Iterator[JwksServer]:
    server = JwksServer()
    server.up()
    try:
        yield server
    finally:
        server.down()


def url_sidecar(tmp_path: Path, policy_text: str, url: str, timeout: str = "1s") -> SidecarProcess:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_with_jwks_url(policy_text, url, refresh="10s", timeout=timeout))
    key = write_key(generate_signing_key(), tmp_path / "signing-key.pem")
    return SidecarProcess(policy, [key], tmp_path / "s", extra_args=QUICK)


def issuer_status(admin_port: int) -> dict[str, Any]:
    doc: dict[str, Any] = statusz(admin_port)["issuers"]["corp-idp"]
    return doc


def outcome(checker: Checker, token: str) -> tuple[int, str | None]:
    response = checker.check(token)
    return http_status(response), deny_error(response)


def fetch_failures(admin_port: int) -> float:
    return Metrics.scrape(admin_port).value(
        "extauthz_jwks_fetches_total", issuer="corp-idp", result="failure"
    )


# --- through a running sidecar ---------------------------------------------------------------


def test_stale_keys_while_down_and_rate_limited_refetch_on_rotation(
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
            assert outcome(checker, tampered(first)) == (401, "signature_invalid")

            # The issuer goes away: decisions stay right with the keys we had.
            issuer.down()
            assert outcome(checker, stranger.token(now=time.time())) == (401, "key_unknown")
            wait_for(lambda: issuer_status(admin)["last_fetch_error"], 5, what="a failed fetch")
            assert fetch_failures(admin) >= 1
            assert issuer_status(admin)["keys"] == [first.key.kid]
            assert outcome(checker, good()) == (200, None)
            assert outcome(checker, tampered(first)) == (401, "signature_invalid")

            # Back, still with the same key: the retry (with backoff) succeeds.
            issuer.up()
            wait_for(
                lambda: issuer_status(admin)["last_fetch_error"] is None,
                UNKNOWN_KID_INTERVAL + 3,
                what="a successful fetch after the issuer came back",
                interval=0.1,
            )

            # The issuer rotates. The next scheduled refresh is 10 s away; the unknown kid
            # brings the new key in much sooner.
            issuer.publish(second)
            assert outcome(checker, second.token(now=time.time())) == (401, "key_unknown")
            wait_for(
                lambda: outcome(checker, second.token(now=time.time())) == (200, None),
                UNKNOWN_KID_INTERVAL + 2,
                what="the rotated key to be fetched on an unknown kid",
                interval=0.1,
            )
            assert outcome(checker, good()) == (401, "key_unknown")  # withdrawn by the issuer
            assert issuer_status(admin)["keys"] == [second.key.kid]

            # A flood of unknown kids does not turn into a flood of fetches.
            since, sent = time.monotonic(), 0
            while time.monotonic() < since + UNKNOWN_KID_INTERVAL and sent < 200:
                assert outcome(checker, stranger.token(now=time.time())) == (401, "key_unknown")
                sent += 1
                time.sleep(0.02)
            assert sent >= 20
            assert issuer.count(since=since) <= 2
        finally:
            checker.close()


def test_oversized_or_invalid_jwks_is_a_failed_fetch(
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
            assert outcome(checker, idp.token(now=time.time())) == (200, None)

            # Not JSON at all: the retry fails too.
            issuer.body = b'{"keys": [ not json'
            wait_for(lambda: fetch_failures(admin) >= before + 2, 6, what="a second failure")
            assert "JSON" in issuer_status(admin)["last_fetch_error"]
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
    issuer.delay = 1.5  # a slow issuer, well within the fetch timeout
    with url_sidecar(tmp_path, example_policy_text, issuer.url(), timeout="5s") as sidecar:
        checker = Checker(sidecar.grpc_port)
        try:  # start() returned: /readyz said 200
            assert outcome(checker, idp.token(now=time.time())) == (200, None)
        finally:
            checker.close()


# --- fetch_jwks on its own -------------------------------------------------------------------


def test_fetch_jwks_reads_a_good_document(issuer: JwksServer) -> None:
    idp = Idp(ISSUER)
    issuer.publish(idp)
    keys = fetch_jwks(issuer.url(), 2)
    assert set(keys.by_kid) == {idp.key.kid}


def test_fetch_jwks_refuses_redirects(issuer: JwksServer) -> None:
    issuer.publish(Idp(ISSUER))
    issuer.redirects["/moved"] = issuer.url(JWKS_PATH)
    with pytest.raises(KeyLoadError, match="302"):
        fetch_jwks(issuer.url("/moved"), 2)
    assert issuer.count("/moved") == 1
    assert issuer.count(JWKS_PATH) == 0


def test_fetch_jwks_non_200_is_an_error(issuer: JwksServer) -> None:
    issuer.publish(Idp(ISSUER))
    issuer.status = 503
    with pytest.raises(KeyLoadError, match="503"):
        fetch_jwks(issuer.url(), 2)


def test_fetch_jwks_honours_the_timeout(issuer: JwksServer) -> None:
    issuer.publish(Idp(ISSUER))
    issuer.delay = 3.0
    started = time.monotonic()
    with pytest.raises(KeyLoadError):
        fetch_jwks(issuer.url(), 0.5)
    assert time.monotonic() - started < issuer.delay


def test_fetch_jwks_timeout_covers_a_slow_body(issuer: JwksServer) -> None:
    issuer.body = b'{"keys": []}'
    issuer.drip = 0.2  # 12 bytes: 2.4 s, every byte well within the 0.5 s timeout
    started = time.monotonic()
    with pytest.raises(KeyLoadError):
        fetch_jwks(issuer.url(), 0.5)
    assert time.monotonic() - started < 1.5
