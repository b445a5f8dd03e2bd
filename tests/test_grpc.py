"""The real ``extauthz serve`` on loopback, checked through each front the way Envoy checks.

Every check here runs against both fronts (ids ``grpc`` and ``http``), through
``frontkit.FrontClient``: over gRPC a CheckRequest shaped like Envoy's (source.principal = SPIFFE
ID, URL-encoded peer certificate, lower-case headers with pseudo-headers, the raw path); over
HTTP the authorization request envoy-http.yaml makes Envoy send (``/check`` + the path, the
original host, the allowed headers and the XFCC element Envoy sets). The answers are read as
Envoy would apply them, and each front must give the same ones.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from frontkit import (
    CHANNEL_OPTIONS,
    FRONTS,
    HOST,
    PATH,
    Answer,
    Config,
    FrontClient,
    HttpConnection,
    RawResponse,
    Stack,
    check_request,
    grpc_answer,
    phrase,
    raw_http_request,
    start_stack,
    write_config,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.decision.jose import (
    parse_compact,
    parse_jwks,
    thumbprint,
    verify_signature,
)
from extauthz.demo.pki import x5t_s256
from extauthz.demo.stack import WORKLOADS, SidecarProcess, free_port, http_get

__all__ = [
    "CHANNEL_OPTIONS",
    "HOST",
    "PATH",
    "Config",
    "Stack",
    "check_request",
    "decision_for",
    "fetch_jwks",
    "header_values",
    "write_config",
]

RULE = "orders-read-profile"
RULE_AUDIENCE = "spiffe://cluster.local/ns/shop/sa/profile"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
UNAUTHENTICATED, PERMISSION_DENIED = 16, 7
# What every deny sends the client besides its status, body and WWW-Authenticate.
DENY_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}


# --- a real sidecar on loopback, one per front ------------------------------------------------


@pytest.fixture(scope="module", params=FRONTS, ids=FRONTS)
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    example_policy_text: str,
) -> Iterator[Stack]:
    """The sidecar and a client of one front; ``@pytest.mark.parametrize("stack", ["grpc"],
    indirect=True)`` pins a test to one front."""
    front = str(request.param)
    with start_stack(tmp_path_factory.mktemp(f"front-{front}"), example_policy_text, front) as s:
        yield s


def header_values(options: Any, name: str) -> list[str]:
    return [o.header.value for o in options if o.header.key.lower() == name]


def decision_for(stack: Stack, request_id: str) -> dict[str, Any]:
    return stack.decision_for(request_id)


def fetch_jwks(stack: Stack) -> dict[str, Any]:
    status, body = http_get(stack.sidecar.admin_port, "/.well-known/jwks.json")
    assert status == 200
    document: dict[str, Any] = json.loads(body)
    return document


def assert_wire_deny(answer: Answer, grpc_code: int | None = None) -> None:
    """How each front frames a deny: a CheckResponse with a denied_response (and, when
    given, this gRPC status), or an HTTP/1.1 answer with the standard reason phrase."""
    if answer.front == "grpc":
        response: external_auth_pb2.CheckResponse = answer.raw
        assert response.status.code != 0
        assert response.WhichOneof("http_response") == "denied_response"
        if grpc_code is not None:
            assert response.status.code == grpc_code
    else:
        assert (answer.raw.version, answer.raw.phrase) == ("HTTP/1.1", phrase(answer.status))


def wire_bytes(answer: Answer) -> bytes:
    """Everything the front sent Envoy for this answer."""
    if answer.front == "grpc":
        return bytes(answer.raw.SerializeToString())
    raw: RawResponse = answer.raw
    return "\n".join(f"{k}: {v}" for k, v in raw.headers).encode() + raw.body


# --- allow -----------------------------------------------------------------------------------


def test_allow_overwrites_authorization_with_a_bound_narrowed_token(stack: Stack) -> None:
    subject = stack.token(scope="profile.read profile.write orders.read email", ttl=3600)
    cert = stack.cert_pem("orders")
    request_id = uuid.uuid4().hex
    answer = stack.check(
        token=subject,
        cert_pem=cert,
        request_id=request_id,
        headers={"x-forwarded-access-token": subject, "proxy-authorization": "Basic eDp5"},
    )
    after = time.time()

    assert answer.allowed
    assert answer.status == 200
    # Envoy overwrites authorization (gRPC: only an explicit append=false does; HTTP: the
    # allowed_upstream_headers), and adds nothing beside it.
    assert set(answer.upstream) == {"authorization"}
    assert answer.appended == {}
    if stack.front == "grpc":
        assert answer.raw.WhichOneof("http_response") == "ok_response"
        (option,) = answer.raw.ok_response.headers
        assert option.HasField("append")
        assert option.append.value is False
    value = answer.upstream["authorization"]
    assert value.startswith("Bearer ")
    minted = answer.token
    assert minted is not None
    assert minted != subject
    assert subject not in value
    # Envoy applies removals after sets: removing authorization would drop the minted token.
    assert "authorization" not in answer.removed
    assert {"proxy-authorization", "x-forwarded-access-token"} <= answer.removed

    jws = parse_compact(minted)
    assert (answer.reason, answer.rule) == ("allowed", RULE)
    # Envoy's dynamic metadata names the minted token (gRPC: a Struct; HTTP: from headers).
    assert (
        answer.metadata["jti" if stack.front == "grpc" else "x-extauthz-jti"] == (jws.claims["jti"])
    )

    # The minted token verifies against the JWKS the sidecar publishes.
    jwks = fetch_jwks(stack)
    assert jws.header["typ"] == "at+jwt"
    published = {k["kid"]: k for k in jwks["keys"]}
    assert jws.header["kid"] == stack.config.key.kid
    assert jws.header["kid"] == thumbprint(published[jws.header["kid"]])
    keys = parse_jwks(json.dumps(jwks).encode())
    alg = jws.header["alg"]
    candidates = keys.candidates(jws.header["kid"], alg)
    assert candidates
    assert any(verify_signature(jws, k, alg) for k in candidates)

    claims = jws.claims
    subject_claims = parse_compact(subject).claims
    assert claims["cnf"] == {"x5t#S256": x5t_s256(cert)}
    assert claims["aud"] == RULE_AUDIENCE
    assert claims["sub"] == subject_claims["sub"]
    assert set(claims["scope"].split()) == {"profile.read"}
    assert claims["act"]["sub"] == WORKLOADS["orders"]
    assert claims["authorization_details"][0] == {
        "type": "http_request",
        "method": "GET",
        "host": HOST,
        "path": PATH,
    }
    assert claims["exp"] <= min(subject_claims["exp"], int(after) + 30)

    line = decision_for(stack, request_id)
    assert line["decision"] == "allow"
    assert line["rule"] == RULE
    assert line["jti"] == claims["jti"]


def test_allow_without_peer_certificate_is_unbound(stack: Stack) -> None:
    answer = stack.check(token=stack.token(scope="profile.read"))
    assert answer.allowed
    assert answer.token is not None
    assert "cnf" not in parse_compact(answer.token).claims


def test_minted_token_is_not_a_subject_token(stack: Stack) -> None:
    first = stack.check(token=stack.token(scope="profile.read"))
    minted = first.token
    assert minted is not None
    again = stack.check(token=minted, cert_pem=stack.cert_pem("orders"))
    assert not again.allowed
    assert again.status == 403
    assert again.error == again.reason == "reexchange_denied"
    assert json.loads(again.body) == {"error": "reexchange_denied"}
    assert_wire_deny(again, PERMISSION_DENIED)


# --- deny ------------------------------------------------------------------------------------


def tampered(stack: Stack) -> str:
    """A token whose signature is valid, but for other content (same issuer, same kid)."""
    one = stack.token(scope="profile.read")
    other = stack.token(scope="profile.read", sub="someone-else")
    forged = one.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]
    stack.tokens.append(forged)
    return forged


DENIES = {
    # name: (workload, token maker, http status, grpc code, reason, www-authenticate error)
    "bad-signature": (
        "orders",
        tampered,
        401,
        UNAUTHENTICATED,
        "signature_invalid",
        "invalid_token",
    ),
    "missing-token": ("orders", None, 401, UNAUTHENTICATED, "token_missing", None),
    "no-rule": (
        "billing",
        lambda s: s.token(scope="profile.read"),
        403,
        PERMISSION_DENIED,
        "no_rule",
        None,
    ),
    "insufficient-scope": (
        "orders",
        lambda s: s.token(scope="orders.read email"),
        403,
        PERMISSION_DENIED,
        "insufficient_scope",
        "insufficient_scope",
    ),
}


@pytest.mark.parametrize("case", list(DENIES))
def test_deny_is_a_check_response(stack: Stack, case: str) -> None:
    workload, make_token, http_status, grpc_code, reason, error = DENIES[case]
    token = make_token(stack) if make_token is not None else None
    request_id = uuid.uuid4().hex
    answer = stack.check(
        principal=WORKLOADS[workload],
        cert_pem=stack.cert_pem(workload),
        token=token,
        request_id=request_id,
    )

    assert not answer.allowed
    assert_wire_deny(answer, grpc_code)
    assert answer.status == http_status
    assert json.loads(answer.body) == {"error": reason}
    assert answer.body == json.dumps({"error": reason}).encode()
    assert answer.reason == reason
    challenge = answer.www_authenticate
    if http_status == 401:
        assert challenge is not None
        assert challenge.startswith("Bearer")
    if error is None:
        assert challenge is None or "error=" not in challenge
    else:
        assert challenge is not None
        assert f'error="{error}"' in challenge
    others = {k: v for k, v in answer.client_headers.items() if k != "www-authenticate"}
    assert others == DENY_HEADERS
    # The rule found on the way, if any, is what Envoy's access log gets from either front.
    assert answer.rule == (RULE if case == "insufficient-scope" else None)
    if token is not None:
        assert token.encode() not in answer.body
        assert all(token not in value for value in answer.client_headers.values())
        for part in token.split("."):
            assert part.encode() not in answer.body
        # Nor anywhere in what the front sent Envoy.
        assert token.rsplit(".", 1)[1].encode() not in wire_bytes(answer)
    assert (answer.upstream, answer.appended, answer.removed) == ({}, {}, frozenset())

    line = decision_for(stack, request_id)
    assert line["decision"] == "deny"
    assert line["reason"] == reason
    assert line["jti"] is None


_ctx = attribute_context_pb2.AttributeContext
GARBAGE = {
    # name: (the CheckRequest, the HTTP authorization request, the reason either is denied for)
    "empty": (
        external_auth_pb2.CheckRequest(),
        raw_http_request("GET", "/check/", []),
        "token_missing",
    ),
    "junk-token-no-principal": (
        external_auth_pb2.CheckRequest(
            attributes=_ctx(
                request=_ctx.Request(
                    http=_ctx.HttpRequest(headers={"authorization": "Bearer x.y.z"})
                )
            )
        ),
        raw_http_request("GET", "/check/", [("authorization", "Bearer x.y.z")]),
        "token_malformed",
    ),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_check_request_is_denied_not_failed(stack: Stack, case: str) -> None:
    grpc_request, http_request, reason = GARBAGE[case]
    if stack.front == "grpc":
        answer = grpc_answer(stack.send(grpc_request))  # an RPC error would raise here
    else:
        answer = stack.send_http(http_request)  # a closed connection would raise here
    assert not answer.allowed
    assert_wire_deny(answer)
    assert answer.status in (400, 401, 403)
    assert set(json.loads(answer.body)) == {"error"}
    assert answer.error == answer.reason == reason
    # The front is still there for the next check.
    assert stack.check(token=stack.token(scope="profile.read")).allowed


def test_valid_token_without_a_spiffe_principal_is_denied(stack: Stack) -> None:
    answer = stack.check(principal="", token=stack.token(scope="profile.read"))
    assert not answer.allowed
    assert_wire_deny(answer, PERMISSION_DENIED)
    assert answer.status == 403
    assert answer.error == answer.reason == "workload_unidentified"
    assert answer.upstream == {}
    assert answer.token is None


def test_two_authorization_headers_are_refused(stack: Stack) -> None:
    """Envoy joins repeated headers with ","; either front then sees two tokens, not one."""
    first, second = stack.token(scope="profile.read"), stack.token(scope="profile.read")
    answer = stack.check(
        headers=[("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}")]
    )
    assert not answer.allowed
    assert answer.status == 401
    assert answer.error == answer.reason == "token_malformed"
    assert answer.www_authenticate is not None
    assert 'error="invalid_token"' in answer.www_authenticate


# --- health and admin ------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["grpc"], indirect=True)
@pytest.mark.parametrize("service", ["", AUTHZ_SERVICE], ids=["server", "authorization"])
def test_grpc_health_is_serving(stack: Stack, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(stack.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("stack", ["http"], indirect=True)
def test_http_readyz_is_ready(stack: Stack) -> None:
    """The HTTP front's counterpart of gRPC health: Envoy's health check of the cluster."""
    assert stack.sidecar.http_port is not None
    connection = HttpConnection(stack.sidecar.http_port)
    try:
        ready = connection.request(raw_http_request("GET", "/readyz", [("host", "extauthz")]))
    finally:
        connection.close()
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert ready.header("content-type") == "text/plain"


def admin_request(port: int, method: str, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        response = conn.getresponse()
        response.read()
        return int(response.status)
    finally:
        conn.close()


def test_admin_probes_and_jwks(stack: Stack) -> None:
    port = stack.sidecar.admin_port
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/readyz")[0] == 200
    jwks = fetch_jwks(stack)
    (published,) = jwks["keys"]
    assert published["kid"] == stack.config.key.kid
    assert {k: published[k] for k in ("kty", "crv", "x", "y")} == {
        k: stack.config.key.public_jwk[k] for k in ("kty", "crv", "x", "y")
    }
    assert "d" not in published
    assert http_get(port, "/nope")[0] == 404
    assert http_get(port, "/.well-known/jwks.json/../../etc/passwd")[0] == 404
    assert admin_request(port, "POST", "/healthz") == 405
    assert admin_request(port, "POST", "/.well-known/jwks.json") == 405


# --- the decision log ------------------------------------------------------------------------


def test_decision_log_has_one_line_per_check_and_no_token(stack: Stack) -> None:
    ids = {name: uuid.uuid4().hex for name in ("allow", "scope", "missing")}
    stack.check(token=stack.token(sub="alice", scope="profile.read"), request_id=ids["allow"])
    stack.check(token=stack.token(sub="bob", scope="email"), request_id=ids["scope"])
    stack.check(request_id=ids["missing"])

    allow = decision_for(stack, ids["allow"])
    assert (allow["decision"], allow["reason"], allow["rule"]) == ("allow", "allowed", RULE)
    assert (allow["caller"], allow["sub"]) == (WORKLOADS["orders"], "alice")
    assert (allow["method"], allow["host"], allow["path"]) == ("GET", HOST, PATH)
    assert isinstance(allow["jti"], str)
    assert allow["jti"]
    scope = decision_for(stack, ids["scope"])
    assert (scope["decision"], scope["reason"]) == ("deny", "insufficient_scope")
    assert (scope["caller"], scope["sub"]) == (WORKLOADS["orders"], "bob")
    assert scope["rule"] in (None, RULE)  # the matched rule is not carried on this deny
    assert scope["jti"] is None
    missing = decision_for(stack, ids["missing"])
    assert (missing["decision"], missing["reason"]) == ("deny", "token_missing")
    assert (missing["sub"], missing["rule"], missing["jti"]) == (None, None, None)
    for line in (allow, scope, missing):
        assert {"decision", "reason", "rule", "caller", "sub", "jti"} <= set(line)

    # Every check this module made of this sidecar so far is exactly one line; nothing else
    # goes there.
    assert len(stack.sidecar.decisions()) == stack.checks
    raw = stack.sidecar.decision_log.read_text(encoding="utf-8")
    assert stack.tokens
    for token in stack.tokens:
        assert token not in raw
        assert token.rsplit(".", 1)[1] not in raw  # not even the signature


# --- lifecycle -------------------------------------------------------------------------------


@pytest.mark.parametrize("front", FRONTS)
def test_sigterm_exits_zero(tmp_path: Path, example_policy_text: str, front: str) -> None:
    config = write_config(tmp_path, example_policy_text)
    sidecar = SidecarProcess(config.policy, [config.key_file], tmp_path / "sidecar", front=front)
    sidecar.start()
    client = FrontClient(sidecar, front)
    try:
        answer = client.check()
        assert (answer.status, answer.reason) == (401, "token_missing")
        if front == "grpc":
            assert answer.raw.status.code == UNAUTHENTICATED
        # The client's channel or keep-alive connection stays open, as Envoy's does.
        started = time.monotonic()
        assert sidecar.stop() == 0
        assert time.monotonic() - started < 8
        if front == "http":
            assert client.connection.closed()
    finally:
        client.close()
        sidecar.stop()


def test_dev_mode_starts_with_a_warning(tmp_path: Path, example_policy_text: str) -> None:
    config = write_config(tmp_path, example_policy_text)
    sidecar = SidecarProcess(config.policy, [], tmp_path / "sidecar", extra_args=["--dev"])
    sidecar.start()
    try:
        assert http_get(sidecar.admin_port, "/readyz")[0] == 200
        warnings = [line for line in sidecar.tail(200).splitlines() if "WARNING" in line]
        assert warnings
        assert any("--dev" in line for line in warnings)
    finally:
        assert sidecar.stop() == 0


def serve(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        *args,
        "--grpc-address",
        f"127.0.0.1:{free_port()}",
        "--admin-address",
        f"127.0.0.1:{free_port()}",
    ]
    # If it wrongly starts, the timeout kills it and the test fails.
    return subprocess.run(
        command, cwd=config_dir, capture_output=True, text=True, timeout=20, check=False
    )


def assert_refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert result.stderr.startswith("extauthz:")
    assert "Traceback" not in result.stderr
    return result.stderr


def test_serve_refuses_a_missing_policy(tmp_path: Path, example_policy_text: str) -> None:
    config = write_config(tmp_path, example_policy_text)
    missing = tmp_path / "absent.yaml"
    stderr = assert_refused(
        serve(tmp_path, "--policy", str(missing), "--signing-key", str(config.key_file))
    )
    assert str(missing) in stderr
    assert "No such file" in stderr


def test_serve_reports_every_policy_error(tmp_path: Path, example_policy_text: str) -> None:
    lines = example_policy_text.splitlines(keepends=True)
    # Two mistakes in the first rule: no purpose, and a ttl above exchange.maxTtl.
    purpose = next(i for i, line in enumerate(lines) if line.strip().startswith("purpose:"))
    ttl = next(i for i, line in enumerate(lines) if line.strip() == "ttl: 30s")
    del lines[purpose]
    ttl -= 1
    lines[ttl] = lines[ttl].replace("ttl: 30s", "ttl: 900s")
    config = write_config(tmp_path, "".join(lines))
    stderr = assert_refused(
        serve(tmp_path, "--policy", str(config.policy), "--signing-key", str(config.key_file))
    )
    located = re.findall(rf"{re.escape(str(config.policy))}:(\d+): (.*)", stderr)
    assert len(located) == 2, stderr
    messages = " | ".join(message for _, message in located)
    assert "purpose" in messages
    assert "900s" in messages
    assert "maxTtl" in messages
    assert "2 problem" in stderr


def test_serve_refuses_a_missing_key_file(tmp_path: Path, example_policy_text: str) -> None:
    config = write_config(tmp_path, example_policy_text)
    missing = tmp_path / "absent.pem"
    stderr = assert_refused(
        serve(tmp_path, "--policy", str(config.policy), "--signing-key", str(missing))
    )
    assert str(missing) in stderr


@pytest.mark.parametrize(
    "content",
    [
        "-----BEGIN PRIVATE KEY-----\n"
        "U2VjcmV0S2V5TWF0ZXJpYWxEb05vdExlYWs=\n"
        "-----END PRIVATE KEY-----\n",
        "hunter2-SecretKeyMaterialDoNotLeak\n",
    ],
    ids=["broken-pem", "not-pem"],
)
def test_serve_refuses_a_key_that_is_not_a_pem_key(
    tmp_path: Path, example_policy_text: str, content: str
) -> None:
    config = write_config(tmp_path, example_policy_text)
    bad = tmp_path / "bad-key.pem"
    bad.write_text(content, encoding="ascii")
    bad.chmod(0o600)
    stderr = assert_refused(
        serve(tmp_path, "--policy", str(config.policy), "--signing-key", str(bad))
    )
    assert str(bad) in stderr
    assert "PEM" in stderr
    for secret in ("U2VjcmV0S2V5TWF0ZXJpYWxEb05vdExlYWs", "SecretKeyMaterial", "hunter2"):
        assert secret not in stderr


def test_serve_requires_a_key_or_dev(tmp_path: Path, example_policy_text: str) -> None:
    config = write_config(tmp_path, example_policy_text)
    stderr = assert_refused(serve(tmp_path, "--policy", str(config.policy)))
    assert "--signing-key" in stderr
    assert "--dev" in stderr


def test_too_many_headers_is_a_431_deny_not_an_error(stack: Stack) -> None:
    """The sidecar bounds what it parses: over 200 headers is a deny inside the response."""
    answer = stack.check(check_headers=[(f"x-filler-{index}", "v") for index in range(250)])
    assert not answer.allowed
    assert_wire_deny(answer)
    assert answer.status == 431
    assert json.loads(answer.body) == {"error": "request_too_large"}
    assert answer.reason == "request_too_large"
    assert answer.client_headers == DENY_HEADERS


def test_too_many_header_bytes_is_a_431_deny_not_an_error(stack: Stack) -> None:
    """Over 64 KiB of header names and values is refused the same way."""
    token = stack.token(scope="profile.read")
    answer = stack.check(token=token, check_headers=[("x-filler", "v" * (64 * 1024))])
    assert not answer.allowed
    assert_wire_deny(answer)
    assert answer.status == 431
    assert answer.error == answer.reason == "request_too_large"
