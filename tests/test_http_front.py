"""What only the HTTP front has: HTTP/1.1 itself (keep-alive, ``Connection: close``, HEAD,
parse errors, upgrades, header limits on the wire), ``/readyz`` on the check port, the
``/check`` prefix, the caller's identity and certificate from the one XFCC element the local
Envoy sets, the loopback-only address, and workers sharing one listening socket.

What both fronts do alike is in test_grpc.py, run against each. No Envoy here: the requests are
the ones envoy-http.yaml makes Envoy send (``frontkit.envoy_http_request``), on real sockets
to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from frontkit import (
    ENVOY_ID,
    HOST,
    PATH,
    Answer,
    ConnectionClosed,
    HttpConnection,
    RawResponse,
    Stack,
    cert_sha256_hex,
    envoy_http_request,
    http_answer,
    phrase,
    raw_http_request,
    start_stack,
    xfcc_element,
)
from opskit import free_port_except, free_port_pair, statusz, wait_for

from extauthz.decision.jose import parse_compact
from extauthz.demo.pki import x5t_s256
from extauthz.demo.stack import WORKLOADS, free_port

ORDERS = WORKLOADS["orders"]
DENY_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}
XFCC = "x-forwarded-client-cert"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, example_policy_text: str) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("http-front"), example_policy_text, "http") as s:
        yield s


def port_of(stack: Stack) -> int:
    assert stack.sidecar.http_port is not None
    return stack.sidecar.http_port


@contextlib.contextmanager
def connection(port: int) -> Iterator[HttpConnection]:
    conn = HttpConnection(port)
    try:
        yield conn
    finally:
        conn.close()


def allowed_request(stack: Stack, **kwargs: Any) -> bytes:
    """What Envoy sends for orders reading a profile with a fresh token (allowed)."""
    kwargs.setdefault("token", stack.token(scope="profile.read"))
    kwargs.setdefault("cert_pem", stack.cert_pem("orders"))
    return envoy_http_request(**kwargs)


def answers_until_closed(conn: HttpConnection, *, head: bool = False) -> list[RawResponse]:
    """Every answer the front sends before it closes the connection."""
    out = []
    while True:
        try:
            out.append(conn.read(head=head))
        except ConnectionClosed as exc:
            assert not conn.pending(), f"a partial answer before the close: {exc}"
            return out


def new_decisions(stack: Stack, before: int) -> list[dict[str, Any]]:
    return stack.sidecar.decisions()[before:]


def assert_deny(answer: Answer, status: int, reason: str) -> None:
    assert not answer.allowed
    assert (answer.status, answer.raw.phrase) == (status, phrase(status))
    assert answer.error == answer.reason == reason
    assert answer.token is None
    assert {k: v for k, v in answer.client_headers.items() if k != "www-authenticate"} == (
        DENY_HEADERS
    )


# --- /readyz ---------------------------------------------------------------------------------


def test_readyz_is_200_when_ready_and_is_not_a_check(stack: Stack) -> None:
    before = len(stack.sidecar.decisions())
    readyz = raw_http_request("GET", "/readyz", [("host", "127.0.0.1")])
    with connection(port_of(stack)) as conn:
        first = conn.request(readyz)
        check = http_answer(conn.request(allowed_request(stack)))
        second = conn.request(readyz)
    for ready in (first, second):
        assert (ready.status, ready.body) == (200, b"ready\n")
        assert ready.header("content-type") == "text/plain"
    assert check.allowed
    # Only the check is a decision; health checks are not logged as decisions.
    assert [d["reason"] for d in new_decisions(stack, before)] == ["allowed"]


def test_head_readyz_is_answered_without_a_body(stack: Stack) -> None:
    with connection(port_of(stack)) as conn:
        head = conn.request(raw_http_request("HEAD", "/readyz", [("host", "x")]), head=True)
        leftover = conn.pending()  # a body comes in the same write as its head
        assert (head.status, head.header("content-length")) == (200, "6")
        assert leftover == b"", "HEAD /readyz was answered with a body"
        assert conn.request(raw_http_request("GET", "/readyz", [("host", "x")])).status == 200


def readyz_status(port: int) -> int:
    with connection(port) as conn:
        return conn.request(raw_http_request("GET", "/readyz", [("host", "127.0.0.1")])).status


def test_readyz_is_503_while_draining_and_checks_are_still_answered(
    tmp_path: Path, example_policy_text: str
) -> None:
    drain = 5.0
    extra = ["--drain-delay", str(drain), "--grace", "2"]
    with start_stack(tmp_path, example_policy_text, "http", extra) as stack:
        port = port_of(stack)
        proc = stack.sidecar._proc
        assert proc is not None
        kept = HttpConnection(port)  # opened before SIGTERM and kept, as Envoy keeps them
        try:
            assert http_answer(kept.request(allowed_request(stack))).allowed
            assert readyz_status(port) == 200
            os.kill(proc.pid, signal.SIGTERM)

            wait_for(lambda: readyz_status(port) == 503, drain - 1, what="/readyz 503")
            with connection(port) as conn:
                not_ready = conn.request(raw_http_request("GET", "/readyz", [("host", "x")]))
                assert conn.closed()  # draining: each connection is closed after its answer
            assert (not_ready.status, not_ready.body) == (503, b"not ready\n")
            # Still deciding while draining, so Envoy's checks in flight do not fail ...
            with connection(port) as conn:
                during = http_answer(conn.request(allowed_request(stack)))
                assert conn.closed()
            assert during.allowed
            assert during.token is not None
            # ... on the connections Envoy already holds, too.
            assert http_answer(kept.request(allowed_request(stack))).allowed
            assert kept.closed()
            assert proc.wait(timeout=drain + 15) == 0
        finally:
            kept.close()


# --- HTTP/1.1 --------------------------------------------------------------------------------


def mixed_checks(stack: Stack) -> list[tuple[str, bytes, int, str]]:
    """(request id, request, status, reason) of four checks that are answered differently."""
    ids = [uuid.uuid4().hex for _ in range(4)]
    token = stack.token(scope="profile.read")
    return [
        (ids[0], allowed_request(stack, request_id=ids[0], token=token), 200, "allowed"),
        (ids[1], allowed_request(stack, request_id=ids[1], token=None), 401, "token_missing"),
        (
            ids[2],
            allowed_request(
                stack,
                request_id=ids[2],
                principal=WORKLOADS["billing"],
                cert_pem=stack.cert_pem("billing"),
            ),
            403,
            "no_rule",
        ),
        (
            ids[3],
            allowed_request(stack, request_id=ids[3], token=stack.token(scope="email")),
            403,
            "insufficient_scope",
        ),
    ]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
def test_checks_on_one_keep_alive_connection_are_answered_in_order(
    stack: Stack, pipelined: bool
) -> None:
    checks = mixed_checks(stack) * 2
    before = len(stack.sidecar.decisions())
    with connection(port_of(stack)) as conn:
        if pipelined:  # more than Envoy does (one at a time), and answered the same way
            conn.send(b"".join(request for _, request, _, _ in checks))
            answers = [http_answer(conn.read()) for _ in checks]
        else:
            answers = [http_answer(conn.request(request)) for _, request, _, _ in checks]
        assert not conn.pending()
    assert [(a.status, a.reason) for a in answers] == [(s, r) for _, _, s, r in checks]
    tokens = [a.token for a in answers if a.allowed]
    assert len(tokens) == 2
    assert len(set(tokens)) == 2
    lines = new_decisions(stack, before)
    assert [(d["request_id"], d["reason"]) for d in lines] == [(i, r) for i, _, _, r in checks]


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_connection_close_is_honoured(stack: Stack, version: str) -> None:
    """``Connection: close`` (HTTP/1.1), or HTTP/1.0 without keep-alive: one answer, then
    the front closes the connection."""
    request = allowed_request(stack, connection="close" if version == "HTTP/1.1" else None)
    if version == "HTTP/1.0":
        request = request.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    with connection(port_of(stack)) as conn:
        answer = http_answer(conn.request(request))
        assert conn.closed()
    assert answer.allowed


def test_head_check_is_answered_without_a_body(stack: Stack) -> None:
    with connection(port_of(stack)) as conn:
        conn.send(allowed_request(stack, method="HEAD"))
        no_rule = conn.read(head=True)
        assert not conn.pending()  # a body would have come with the head, in the same write
        conn.send(allowed_request(stack, method="HEAD", token=None))
        missing = conn.read(head=True)
        assert not conn.pending()
        # The next answer on the connection starts where the head ended.
        after = http_answer(conn.request(allowed_request(stack)))
    assert after.allowed
    head = http_answer(no_rule)
    assert (head.status, head.raw.phrase, head.reason, head.body) == (
        403,
        "Forbidden",
        "no_rule",
        b"",
    )
    assert head.client_headers == DENY_HEADERS
    unauthenticated = http_answer(missing)
    assert (unauthenticated.status, unauthenticated.reason) == (401, "token_missing")
    assert unauthenticated.www_authenticate == 'Bearer realm="extauthz"'
    # The head is the GET's head: its content-length is the length of the body not sent.
    assert no_rule.header("content-length") == str(len(json.dumps({"error": "no_rule"})))
    assert missing.header("content-length") == str(len(json.dumps({"error": "token_missing"})))


MALFORMED = {
    "not-http": b"GARBAGE\r\n\r\n",
    "header-line-without-colon": (
        b"GET /check/v1/customers/42 HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n"
    ),
    "unknown-version": b"GET /check/v1/customers/42 HTTP/2.7\r\nhost: x\r\n\r\n",
    "bare-lf": b"GET /check/v1/customers/42 HTTP/1.1\nhost: x\n\n",
    "content-length-not-a-number": (
        b"GET /check/v1/customers/42 HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n"
    ),
    "content-length-and-chunked": (
        b"POST /check/v1/customers/42 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two-content-lengths": (
        b"GET /check/v1/customers/42 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
        b"content-length: 1\r\n\r\nx"
    ),
    "nul-in-a-value": b"GET /check/v1/customers/42 HTTP/1.1\r\nhost: x\r\nx-a: b\x00c\r\n\r\n",
    "folded-header": b"GET /check/v1/customers/42 HTTP/1.1\r\nhost: x\r\nx-a: b\r\n c\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_a_400_and_closes_the_connection(stack: Stack, case: str) -> None:
    before = len(stack.sidecar.decisions())
    with connection(port_of(stack)) as conn:
        conn.send(MALFORMED[case])
        answers = answers_until_closed(conn)
    assert len(answers) == 1, answers
    assert_deny(http_answer(answers[0]), 400, "request_invalid")
    (line,) = new_decisions(stack, before)
    assert (line["decision"], line["reason"]) == ("deny", "request_invalid")
    assert line["detail"]


def test_a_malformed_request_after_a_check_closes_the_connection(stack: Stack) -> None:
    with connection(port_of(stack)) as conn:
        conn.send(allowed_request(stack) + MALFORMED["not-http"])
        answers = [http_answer(a) for a in answers_until_closed(conn)]
    assert [(a.status, a.reason) for a in answers] == [(200, "allowed"), (400, "request_invalid")]


def upgrade_requests(stack: Stack) -> dict[str, bytes]:
    """Requests that would turn the connection into something else, with the credentials
    and XFCC element of a check that is allowed."""
    websocket = [("connection", "upgrade"), ("upgrade", "websocket")]
    h2c = [
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
    ]
    connect = allowed_request(stack).replace(
        f"GET /check{PATH} ".encode(), f"CONNECT {HOST}:443 ".encode(), 1
    )
    return {
        "websocket": allowed_request(stack, check_headers=websocket),
        "h2c": allowed_request(stack, check_headers=h2c),
        "connect": connect,
    }


@pytest.mark.parametrize("case", ["websocket", "h2c", "connect"])
def test_upgrade_or_connect_is_refused_not_checked(stack: Stack, case: str) -> None:
    request = upgrade_requests(stack)[case]
    before = len(stack.sidecar.decisions())
    with connection(port_of(stack)) as conn:
        conn.send(request)
        answers = [http_answer(a) for a in answers_until_closed(conn)]
    lines = new_decisions(stack, before)
    # One answer, the refusal: no check, no minted token, one decision.
    assert [(a.status, a.reason, a.token) for a in answers] == [(400, "request_invalid", None)]
    assert [(d["decision"], d["reason"]) for d in lines] == [("deny", "request_invalid")]


# --- limits ----------------------------------------------------------------------------------


def header_lines(request: bytes) -> list[tuple[str, str]]:
    lines = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]


@pytest.mark.parametrize("extra", [0, 1], ids=["200-headers", "201-headers"])
def test_more_than_200_header_lines_is_a_431(stack: Stack, extra: int) -> None:
    filler = 200 - len(header_lines(allowed_request(stack))) + extra
    request_id = f"too-many-{extra}-{time.time_ns()}"
    fillers = [(f"x-filler-{i}", "v") for i in range(filler)]
    request = allowed_request(stack, check_headers=fillers, request_id=request_id)
    assert len(header_lines(request)) == 200 + extra
    before = len(stack.sidecar.decisions())
    with connection(port_of(stack)) as conn:
        answer = http_answer(conn.request(request))
    if extra:
        assert_deny(answer, 431, "request_too_large")
    else:
        assert answer.allowed
    # Refused before it was read, the check is still logged under its request id.
    (line,) = new_decisions(stack, before)
    assert line["request_id"] == request_id


@pytest.mark.parametrize("extra", [0, 1], ids=["64KiB", "64KiB-and-a-byte"])
def test_more_than_64_kib_of_headers_is_a_431(stack: Stack, extra: int) -> None:
    """The bound is on names and values (as over gRPC), whatever the framing around them."""
    base = allowed_request(stack, check_headers=[("x-filler", "")])
    used = sum(len(name) + len(value) for name, value in header_lines(base))
    token = stack.token(scope="profile.read")
    filler = "v" * (64 * 1024 - used + extra)
    request = allowed_request(stack, token=token, check_headers=[("x-filler", filler)])
    # The fresh token has the same length as the one measured.
    assert sum(len(n) + len(v) for n, v in header_lines(request)) == 64 * 1024 + extra
    with connection(port_of(stack)) as conn:
        answer = http_answer(conn.request(request))
    if extra:
        assert_deny(answer, 431, "request_too_large")
    else:
        assert answer.allowed


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", PATH),
        ("GET", "/checkout" + PATH),
        ("GET", "/check"),
        ("GET", "/check?" + PATH),
        ("GET", "/readyz" + PATH),
        ("GET", f"http://{HOST}/check{PATH}"),
        ("OPTIONS", "*"),
    ],
    ids=[
        "no-prefix",
        "prefix-of-a-word",
        "prefix-alone",
        "prefix-then-query",
        "readyz",
        "absolute",
        "asterisk",
    ],
)
def test_a_target_not_under_check_is_path_invalid(stack: Stack, method: str, target: str) -> None:
    request = allowed_request(stack, method=method)
    request_line = request.split(b"\r\n", 1)[0]
    request = request.replace(request_line, f"{method} {target} HTTP/1.1".encode(), 1)
    before = len(stack.sidecar.decisions())
    with connection(port_of(stack)) as conn:
        answer = http_answer(conn.request(request))
        # Refused, not mistaken for a parse error: the connection stays open for the next.
        assert http_answer(conn.request(allowed_request(stack))).allowed
    assert_deny(answer, 400, "path_invalid")
    # Refused before it was read as a request: logged without its request id.
    lines = new_decisions(stack, before)
    assert [(d["decision"], d["reason"]) for d in lines] == [
        ("deny", "path_invalid"),
        ("allow", "allowed"),
    ]


# --- the caller, from XFCC -------------------------------------------------------------------


def xfcc_cases(stack: Stack) -> dict[str, list[tuple[str, str]]]:
    """XFCC header lines that do not name exactly one peer."""
    orders = xfcc_element(ORDERS, stack.cert_pem("orders"))
    checkout = xfcc_element(WORKLOADS["checkout"], stack.cert_pem("checkout"))
    digest = cert_sha256_hex(stack.cert_pem("orders"))
    return {
        "none": [],
        "two-elements": [(XFCC, f"{checkout},{orders}")],
        "two-xfcc-lines": [(XFCC, checkout), (XFCC, orders)],
        "two-uris": [(XFCC, f"{orders};URI={WORKLOADS['checkout']}")],
        "two-hashes": [(XFCC, f"By={ENVOY_ID};Hash={digest};Hash={digest};URI={ORDERS}")],
        "no-uri": [(XFCC, f"By={ENVOY_ID};Hash={digest}")],
        "uri-not-spiffe": [(XFCC, f"By={ENVOY_ID};Hash={digest};URI=https://orders.example")],
        "unterminated-quote": [(XFCC, f'By={ENVOY_ID};URI="{ORDERS}')],
    }


@pytest.mark.parametrize(
    "case",
    [
        "none",
        "two-elements",
        "two-xfcc-lines",
        "two-uris",
        "two-hashes",
        "no-uri",
        "uri-not-spiffe",
        "unterminated-quote",
    ],
)
def test_xfcc_not_naming_one_peer_is_workload_unidentified(stack: Stack, case: str) -> None:
    request = allowed_request(stack, xfcc="", check_headers=xfcc_cases(stack)[case])
    with connection(port_of(stack)) as conn:
        answer = http_answer(conn.request(request))
    assert_deny(answer, 403, "workload_unidentified")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize("form", ["cert", "hash"])
def test_xfcc_certificate_binds_cnf(stack: Stack, form: str) -> None:
    """``Cert="<url-encoded PEM>"`` binds the token to that certificate; ``Hash`` (its hex
    SHA-256) binds it to the same thumbprint: base64url of the same digest."""
    cert = stack.cert_pem("orders")
    element = xfcc_element(ORDERS, cert, form=form)
    assert ("Cert=" in element, "Hash=" in element) == (form == "cert", form == "hash")
    with connection(port_of(stack)) as conn:
        answer = http_answer(conn.request(allowed_request(stack, xfcc=element)))
    assert answer.allowed
    assert answer.token is not None
    claims = parse_compact(answer.token).claims
    assert claims["cnf"] == {"x5t#S256": x5t_s256(cert)}
    assert claims["cnf"]["x5t#S256"] == b64url(bytes.fromhex(cert_sha256_hex(cert)))
    assert claims["act"]["sub"] == ORDERS
    # Another workload's certificate is another binding.
    assert x5t_s256(stack.cert_pem("checkout")) != claims["cnf"]["x5t#S256"]


# --- the address -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "extra"),
    [
        ("0.0.0.0:1234", []),
        ("[::]:1234", []),
        ("192.0.2.10:9180", []),
        ("example.com:9180", []),
        ("0.0.0.0:1234", ["--workers", "2"]),
    ],
    ids=["any-v4", "any-v6", "another-host", "a-name", "with-workers"],
)
def test_serve_refuses_a_non_loopback_http_address(
    tmp_path: Path, address: str, extra: list[str]
) -> None:
    # Nothing to load either: had the address been accepted, serve would stop at the policy,
    # before binding anything.
    command = [
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        "--policy",
        str(tmp_path / "absent.yaml"),
        "--signing-key",
        str(tmp_path / "absent.pem"),
        "--grpc-address",
        f"127.0.0.1:{free_port()}",
        "--admin-address",
        f"127.0.0.1:{free_port()}",
        "--http-address",
        address,
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("extauthz:")
    assert "--http-address" in lines[0]
    assert "loopback" in lines[0]
    assert address in lines[0]
    assert "Traceback" not in result.stderr


# --- workers ---------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, T, Z, ...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` SIGSTOPped (and so accepting nothing) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(pid) == "T", 5, what=f"{pid} to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def socket_owner(conn: HttpConnection, server_port: int, pids: Sequence[int]) -> int | None:
    """Which of ``pids`` holds the server end of ``conn`` (a connection to 127.0.0.1)."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{conn.local_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            inode = fields[9]
    assert inode is not None, "the server end of the connection is not in /proc/net/tcp"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    return None


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory, example_policy_text: str
) -> Iterator[tuple[Stack, int]]:
    """``--workers 2 --http-address``: the stack, and the first worker's gRPC port."""
    base = tmp_path_factory.mktemp("http-workers")
    port = free_port_pair()
    with start_stack(
        base,
        example_policy_text,
        "http",
        ["--workers", "2", "--drain-delay", "0"],
        grpc_port=port,
        admin_port=free_port_except([port, port + 1]),
        timeout=40,
    ) as running:
        yield running, port


def worker_pids(stack: Stack) -> list[int]:
    return [int(w["pid"]) for w in statusz(stack.sidecar.admin_port)["workers"]]


def test_both_workers_answer_on_the_one_port(workers: tuple[Stack, int]) -> None:
    """Each worker accepts on the listening socket the supervisor opened: with either one
    stopped, the other answers (and holds the connection), on the same port."""
    stack, _port = workers
    port = port_of(stack)
    pids = worker_pids(stack)
    assert len(set(pids)) == 2
    proc = stack.sidecar._proc
    assert proc is not None
    everyone = [proc.pid, *pids]
    for stop, answering in ((pids[0], pids[1]), (pids[1], pids[0])):
        with stopped(stop), connection(port) as conn:
            answer = http_answer(conn.request(allowed_request(stack)))
            assert answer.allowed
            assert answer.token is not None
            assert socket_owner(conn, port, everyone) == answering


def test_a_killed_worker_is_restarted_on_the_shared_port(workers: tuple[Stack, int]) -> None:
    stack, _port = workers
    port = port_of(stack)
    proc = stack.sidecar._proc
    assert proc is not None
    old, other = worker_pids(stack)
    # The supervisor held still, so the dead worker cannot be replaced yet ...
    with stopped(proc.pid):
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: process_state(old) in (None, "Z"), 10, what=f"worker {old} to die")
        # ... and checks go on while it is down: the other worker answers on the same port.
        for _ in range(3):
            with connection(port) as conn:
                assert http_answer(conn.request(allowed_request(stack))).allowed
                assert socket_owner(conn, port, [proc.pid, other]) == other

    def restarted() -> int:
        (worker, _) = statusz(stack.sidecar.admin_port)["workers"]
        return int(worker["pid"]) if worker["pid"] != old and worker["serving"] else 0

    new = wait_for(restarted, 20, what="worker 0 to be restarted", interval=0.1)
    assert worker_pids(stack) == [new, other]
    # The new worker inherited the listening socket too.
    with stopped(other), connection(port) as conn:
        assert http_answer(conn.request(allowed_request(stack))).allowed
        assert socket_owner(conn, port, [proc.pid, new, other]) == new


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split-target"])
def test_a_target_over_16_kib_is_refused_whole_never_decided_on_a_part(
    stack: Stack, split: bool
) -> None:
    """httptools may hand the target over in pieces; past MAX_TARGET_BYTES the check is
    refused (431), not decided on the part that fit."""
    from extauthz.serve.http_front import MAX_TARGET_BYTES

    path = "/v1/customers/42?" + "q" * MAX_TARGET_BYTES
    request = allowed_request(stack, path=path)
    with connection(port_of(stack)) as conn:
        if split:  # the first piece alone holds a target that would be allowed
            cut = request.index(b"?") + 1
            conn.sock.sendall(request[:cut])
            time.sleep(0.05)
            conn.sock.sendall(request[cut:])
            answer = http_answer(conn.read())
        else:
            answer = http_answer(conn.request(request))
    assert_deny(answer, 431, "request_too_large")
