"""The real ``extauthz serve`` on loopback, driven over gRPC the way Envoy drives it.

Every CheckRequest here is shaped like Envoy's (source.principal = SPIFFE ID, URL-encoded peer
certificate, lower-case headers with pseudo-headers, the raw path); the answers are checked
as Envoy would apply them.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.decision.jose import (
    SigningKey,
    generate_signing_key,
    parse_compact,
    parse_jwks,
    thumbprint,
    verify_signature,
)
from extauthz.demo.idp import Idp
from extauthz.demo.pki import Pki, make_pki, x5t_s256
from extauthz.demo.stack import ISSUER, WORKLOADS, SidecarProcess, free_port, http_get
from extauthz.policy.loader import write_private_key

HOST = "profile.shop.svc.cluster.local"
PATH = "/v1/customers/42"
RULE = "orders-read-profile"
RULE_AUDIENCE = "spiffe://cluster.local/ns/shop/sa/profile"
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
UNAUTHENTICATED, PERMISSION_DENIED = 16, 7
# Keep gRPC on loopback even if the environment names an HTTP proxy.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


# --- a real sidecar on loopback --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    policy: Path
    idp: Idp
    key: SigningKey
    key_file: Path


def write_config(directory: Path, policy_text: str) -> Config:
    """The example policy, its issuer's JWKS beside it and a signing key, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.yaml"
    policy.write_text(policy_text, encoding="utf-8")
    idp = Idp(ISSUER)
    idp.write_jwks(directory / "issuers" / "corp-idp.json")
    key = generate_signing_key()
    key_file = directory / "signing-key.pem"
    write_private_key(key, key_file)
    return Config(policy, idp, key, key_file)


@dataclass
class Stack:
    config: Config
    pki: Pki
    sidecar: SidecarProcess
    channel: grpc.Channel
    checks: int = 0
    # Every token sent to or received from the sidecar, for the decision-log leak check.
    tokens: list[str] = field(default_factory=list)

    @property
    def stub(self) -> external_auth_pb2_grpc.AuthorizationStub:
        return external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def send(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        self.checks += 1
        response: external_auth_pb2.CheckResponse = self.stub.Check(request, timeout=5)
        for option in response.ok_response.headers:
            if option.header.key.lower() == "authorization":
                self.tokens.append(option.header.value.removeprefix("Bearer "))
        return response

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("now", time.time())
        token = self.config.idp.token(**kwargs)
        self.tokens.append(token)
        return token

    def cert_pem(self, workload: str) -> bytes:
        return self.pki.workloads[workload].cert.read_bytes()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, example_policy_text: str) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("grpc")
    config = write_config(base, example_policy_text)
    pki = make_pki(base / "certs", WORKLOADS)
    with SidecarProcess(config.policy, [config.key_file], base / "sidecar") as sidecar:
        channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}", CHANNEL_OPTIONS)
        try:
            yield Stack(config, pki, sidecar, channel)
        finally:
            channel.close()


def check_request(
    *,
    principal: str = WORKLOADS["orders"],
    cert_pem: bytes | None = None,
    method: str = "GET",
    host: str = HOST,
    path: str = PATH,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy 1.40 builds it for an mTLS downstream."""
    request_id = request_id or uuid.uuid4().hex
    all_headers = {
        ":authority": host,
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "user-agent": "test-client/1.0",
        "x-request-id": str(uuid.uuid4()),
        "x-forwarded-proto": "https",
    }
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    ctx = attribute_context_pb2.AttributeContext
    source = ctx.Peer(principal=principal)
    if cert_pem is not None:
        source.certificate = urllib.parse.quote(cert_pem.decode("ascii"), safe="")
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=source,
            destination=ctx.Peer(principal="spiffe://cluster.local/ns/edge/sa/envoy"),
            request=ctx.Request(
                http=ctx.HttpRequest(
                    id=request_id,
                    method=method,
                    host=host,
                    path=path,
                    headers=all_headers,
                    scheme="https",
                    protocol="HTTP/1.1",
                )
            ),
        )
    )


def header_values(options: Any, name: str) -> list[str]:
    return [o.header.value for o in options if o.header.key.lower() == name]


def decision_for(stack: Stack, request_id: str) -> dict[str, Any]:
    lines = [d for d in stack.sidecar.decisions() if d.get("request_id") == request_id]
    assert len(lines) == 1, f"expected one decision line for {request_id}, got {len(lines)}"
    return lines[0]


def fetch_jwks(stack: Stack) -> dict[str, Any]:
    status, body = http_get(stack.sidecar.admin_port, "/.well-known/jwks.json")
    assert status == 200
    document: dict[str, Any] = json.loads(body)
    return document


# --- allow -----------------------------------------------------------------------------------


def test_allow_overwrites_authorization_with_a_bound_narrowed_token(stack: Stack) -> None:
    subject = stack.token(scope="profile.read profile.write orders.read email", ttl=3600)
    cert = stack.cert_pem("orders")
    request_id = uuid.uuid4().hex
    response = stack.send(
        check_request(
            token=subject,
            cert_pem=cert,
            request_id=request_id,
            headers={"x-forwarded-access-token": subject, "proxy-authorization": "Basic eDp5"},
        )
    )
    after = time.time()

    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    auth = [o for o in ok.headers if o.header.key.lower() == "authorization"]
    assert len(auth) == 1
    # Envoy ignores append_action here: only an explicit append=false overwrites.
    assert auth[0].HasField("append")
    assert auth[0].append.value is False
    value = auth[0].header.value
    assert value.startswith("Bearer ")
    minted = value.removeprefix("Bearer ")
    assert minted != subject
    assert subject not in value
    # Envoy applies removals after sets: removing authorization would drop the minted token.
    removed = set(ok.headers_to_remove)
    assert "authorization" not in removed
    assert {"proxy-authorization", "x-forwarded-access-token"} <= removed

    jws = parse_compact(minted)
    meta = MessageToDict(response.dynamic_metadata)
    assert meta["rule"] == RULE
    assert meta["jti"] == jws.claims["jti"]

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
    assert claims["exp"] <= min(subject_claims["exp"], int(after) + 30)

    line = decision_for(stack, request_id)
    assert line["decision"] == "allow"
    assert line["rule"] == RULE
    assert line["jti"] == claims["jti"]


def test_allow_without_peer_certificate_is_unbound(stack: Stack) -> None:
    response = stack.send(check_request(token=stack.token(scope="profile.read")))
    assert response.status.code == 0
    (value,) = header_values(response.ok_response.headers, "authorization")
    assert "cnf" not in parse_compact(value.removeprefix("Bearer ")).claims


def test_minted_token_is_not_a_subject_token(stack: Stack) -> None:
    first = stack.send(check_request(token=stack.token(scope="profile.read")))
    (value,) = header_values(first.ok_response.headers, "authorization")
    minted = value.removeprefix("Bearer ")
    again = stack.send(check_request(token=minted, cert_pem=stack.cert_pem("orders")))
    assert again.status.code == PERMISSION_DENIED
    assert again.denied_response.status.code == 403
    assert json.loads(again.denied_response.body) == {"error": "reexchange_denied"}


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
    response = stack.send(
        check_request(
            principal=WORKLOADS[workload],
            cert_pem=stack.cert_pem(workload),
            token=token,
            request_id=request_id,
        )
    )

    assert response.status.code == grpc_code
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    assert denied.status.code == http_status
    assert json.loads(denied.body) == {"error": reason}
    assert denied.body == json.dumps({"error": reason})
    challenges = header_values(denied.headers, "www-authenticate")
    if http_status == 401:
        assert len(challenges) == 1
        assert challenges[0].startswith("Bearer")
    if error is None:
        assert all("error=" not in c for c in challenges)
    else:
        assert len(challenges) == 1
        assert f'error="{error}"' in challenges[0]
    if token is not None:
        assert token not in denied.body
        assert all(token not in o.header.value for o in denied.headers)
        for part in token.split("."):
            assert part not in denied.body
    assert "authorization" not in {o.header.key.lower() for o in denied.headers}

    line = decision_for(stack, request_id)
    assert line["decision"] == "deny"
    assert line["reason"] == reason
    assert line["jti"] is None


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(external_auth_pb2.CheckRequest(), id="empty"),
        pytest.param(
            external_auth_pb2.CheckRequest(
                attributes=attribute_context_pb2.AttributeContext(
                    request=attribute_context_pb2.AttributeContext.Request(
                        http=attribute_context_pb2.AttributeContext.HttpRequest(
                            headers={"authorization": "Bearer x.y.z"}
                        )
                    )
                )
            ),
            id="junk-token-no-principal",
        ),
    ],
)
def test_garbage_check_request_is_denied_not_failed(
    stack: Stack, request_: external_auth_pb2.CheckRequest
) -> None:
    response = stack.send(request_)  # an RPC error would raise grpc.RpcError here
    assert response.status.code != 0
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code in (400, 401, 403)
    assert set(json.loads(response.denied_response.body)) == {"error"}


def test_valid_token_without_a_spiffe_principal_is_denied(stack: Stack) -> None:
    response = stack.send(check_request(principal="", token=stack.token(scope="profile.read")))
    assert response.status.code == PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    assert not response.ok_response.headers


# --- health and admin ------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", AUTHZ_SERVICE])
def test_grpc_health_is_serving(stack: Stack, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(stack.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


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
    stack.send(
        check_request(token=stack.token(sub="alice", scope="profile.read"), request_id=ids["allow"])
    )
    stack.send(check_request(token=stack.token(sub="bob", scope="email"), request_id=ids["scope"]))
    stack.send(check_request(request_id=ids["missing"]))

    allow = decision_for(stack, ids["allow"])
    assert (allow["decision"], allow["reason"], allow["rule"]) == ("allow", "allowed", RULE)
    assert (allow["caller"], allow["sub"]) == (WORKLOADS["orders"], "alice")
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

    # Every Check this module made so far is exactly one line; nothing else goes there.
    assert len(stack.sidecar.decisions()) == stack.checks
    raw = stack.sidecar.decision_log.read_text(encoding="utf-8")
    assert stack.tokens
    for token in stack.tokens:
        assert token not in raw
        assert token.rsplit(".", 1)[1] not in raw  # not even the signature


# --- lifecycle -------------------------------------------------------------------------------


def test_sigterm_exits_zero(tmp_path: Path, example_policy_text: str) -> None:
    config = write_config(tmp_path, example_policy_text)
    sidecar = SidecarProcess(config.policy, [config.key_file], tmp_path / "sidecar")
    sidecar.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}", CHANNEL_OPTIONS) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            assert stub.Check(check_request(), timeout=5).status.code == UNAUTHENTICATED
        started = time.monotonic()
        assert sidecar.stop() == 0
        assert time.monotonic() - started < 8
    finally:
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


def test_too_many_headers_is_a_431_deny_not_an_error(stack: Any) -> None:
    """The sidecar bounds what it parses: over 200 headers is a deny inside the response."""
    request = check_request(request_id="many-headers")
    for index in range(250):
        request.attributes.request.http.headers[f"x-filler-{index}"] = "v"
    response = stack.send(request)
    assert response.status.code != 0
    assert response.denied_response.status.code == 431
    assert json.loads(response.denied_response.body) == {"error": "request_too_large"}
