"""End to end through the real Envoy: mTLS client -> Envoy -> extauthz -> echo upstream.

Every test runs once per front (ids ``grpc`` and ``http``): Envoy calling extauthz over
ext_authz gRPC (envoy.yaml) or over its HTTP authorization service (envoy-http.yaml), with the
same assertions. The echo upstream records every header line as it arrived (duplicates
included), so "the original token never reached the upstream" is checked on the wire, not on a
merged dict.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opskit import tampered, verifies, wait_for

from extauthz.decision.jose import CompactJWS, parse_compact
from extauthz.decision.reasons import Reason
from extauthz.demo.echo import ReceivedRequest
from extauthz.demo.envoy import FRONTS
from extauthz.demo.pki import x5t_s256
from extauthz.demo.stack import WORKLOADS, Mesh, Response, http_get

HOST = "profile.shop.svc.cluster.local"
PATH = "/v1/customers/42"
RULE_AUDIENCE = "spiffe://cluster.local/ns/shop/sa/profile"
RULE_TTL = 30
BROAD_SCOPE = "profile.read profile.write orders.read email"
MARK = "x-test-id"

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module", params=FRONTS)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """One mesh per front for the whole module."""
    front: str = request.param
    with Mesh(tmp_path_factory.mktemp(f"mesh-{front}"), front=front) as running:
        assert running.front == front
        yield running


@pytest.fixture(scope="module")
def jwks(mesh: Mesh) -> dict[str, Any]:
    status, body = http_get(mesh.sidecar.admin_port, "/.well-known/jwks.json")
    assert status == 200
    document: dict[str, Any] = json.loads(body)
    return document


# --- helpers ---------------------------------------------------------------------------------


def token(mesh: Mesh, **kwargs: Any) -> str:
    kwargs.setdefault("scope", BROAD_SCOPE)
    kwargs.setdefault("ttl", 3600)
    return mesh.idp.token(now=time.time(), **kwargs)


def send(
    mesh: Mesh,
    workload: str,
    *,
    bearer: str | None = None,
    path: str = PATH,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[Response, list[ReceivedRequest], int]:
    """One request through Envoy. Returns the response, what the upstream received for it,
    and how many requests (of any kind) reached the upstream meanwhile."""
    mark = uuid.uuid4().hex
    sent = {MARK: mark, **(headers or {})}
    if bearer is not None:
        sent["authorization"] = f"Bearer {bearer}"
    before = len(mesh.echo.requests)
    response = mesh.request(workload, method=method, path=path, host=HOST, headers=sent)
    after = mesh.echo.requests[before:]
    return response, [r for r in after if r.values(MARK) == [mark]], len(after)


def minted_from(received: ReceivedRequest) -> CompactJWS:
    (value,) = received.values("authorization")
    assert value.startswith("Bearer ")
    return parse_compact(value.removeprefix("Bearer "))


def assert_never_leaked(subject: str, received: ReceivedRequest) -> None:
    signature = subject.rsplit(".", 1)[1]
    for name, value in received.raw_headers:
        assert subject not in value, f"original token reached the upstream in {name}"
        assert signature not in value, f"original token's signature reached the upstream ({name})"


# --- allowed ---------------------------------------------------------------------------------


def test_allowed_request_reaches_upstream_with_only_a_narrowed_token(
    mesh: Mesh, jwks: dict[str, Any]
) -> None:
    subject = token(mesh)
    response, arrived, _ = send(
        mesh,
        "orders",
        bearer=subject,
        headers={
            "x-forwarded-access-token": subject,
            "proxy-authorization": f"Bearer {subject}",
        },
    )
    after = int(time.time())
    assert response.status == 200
    assert len(arrived) == 1
    upstream = arrived[0]
    assert upstream.path == PATH

    assert_never_leaked(subject, upstream)
    # Nothing of the check's own answer travels upstream but the token.
    assert not [n for n, _ in upstream.raw_headers if n.startswith(("x-extauthz", "x-envoy-auth"))]
    assert upstream.values("x-forwarded-access-token") == []
    assert upstream.values("proxy-authorization") == []
    assert len(upstream.values("authorization")) == 1

    minted = minted_from(upstream)
    assert verifies(minted, jwks)
    assert minted.header["typ"] == "at+jwt"
    claims, subject_claims = minted.claims, parse_compact(subject).claims
    assert claims["aud"] == RULE_AUDIENCE
    scopes = set(claims["scope"].split())
    assert scopes
    assert scopes <= set(subject_claims["scope"].split())
    assert scopes == {"profile.read"}
    assert claims["sub"] == subject_claims["sub"]
    assert claims["act"]["sub"] == WORKLOADS["orders"]
    assert claims["exp"] <= min(subject_claims["exp"], after + RULE_TTL)
    assert claims["exp"] > after - 5
    cert = mesh.pki.workloads["orders"].cert.read_bytes()
    assert claims["cnf"] == {"x5t#S256": x5t_s256(cert)}


def test_short_lived_subject_caps_the_minted_expiry(mesh: Mesh, jwks: dict[str, Any]) -> None:
    subject = token(mesh, ttl=10)
    response, arrived, _ = send(mesh, "orders", bearer=subject)
    assert response.status == 200
    minted = minted_from(arrived[0])
    assert verifies(minted, jwks)
    assert minted.claims["exp"] <= parse_compact(subject).claims["exp"]


# --- denied ----------------------------------------------------------------------------------


DENIED: dict[str, tuple[str, Callable[[Mesh], str] | None, Reason]] = {
    # name: (workload, bearer maker, reason)
    "wrong-workload": ("billing", lambda m: token(m), Reason.NO_RULE),
    "missing-scope": (
        "orders",
        lambda m: token(m, scope="orders.read email"),
        Reason.INSUFFICIENT_SCOPE,
    ),
    "tampered-signature": ("orders", lambda m: tampered(m.idp), Reason.SIGNATURE_INVALID),
    "expired": ("orders", lambda m: token(m, ttl=-600), Reason.TOKEN_EXPIRED),
    "no-token": ("orders", None, Reason.TOKEN_MISSING),
}


@pytest.mark.parametrize("case", list(DENIED))
def test_denied_requests_never_reach_upstream(mesh: Mesh, case: str) -> None:
    """Both fronts answer a deny alike: our status, JSON body, cache-control and challenge."""
    workload, make, reason = DENIED[case]
    bearer = make(mesh) if make is not None else None
    response, _, reached = send(mesh, workload, bearer=bearer)
    assert response.status == reason.http_status
    assert reached == 0
    assert response.json() == {"error": reason.code}
    assert response.headers.get("content-type") == "application/json"
    assert response.headers.get("cache-control") == "no-store"
    if bearer is not None:
        assert bearer not in response.body.decode()
    assert response.headers.get("www-authenticate") == (reason.challenge.value or None)
    if reason.http_status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if case == "tampered-signature":
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    # The reason travels to Envoy's access log only, never to the client.
    assert not [name for name in response.headers if name.startswith("x-extauthz")]


def test_client_sent_xfcc_does_not_change_the_caller(mesh: Mesh) -> None:
    forged_orders = (
        "By=spiffe://cluster.local/ns/edge/sa/envoy;URI=spiffe://cluster.local/ns/shop/sa/orders"
    )
    response, _, reached = send(
        mesh, "billing", bearer=token(mesh), headers={"x-forwarded-client-cert": forged_orders}
    )
    assert response.status == 403
    assert reached == 0

    forged_billing = forged_orders.replace("sa/orders", "sa/billing")
    response, arrived, _ = send(
        mesh, "orders", bearer=token(mesh), headers={"x-forwarded-client-cert": forged_billing}
    )
    assert response.status == 200
    assert minted_from(arrived[0]).claims["act"]["sub"] == WORKLOADS["orders"]
    assert all("sa/billing" not in v for v in arrived[0].values("x-forwarded-client-cert"))


# --- path tricks -----------------------------------------------------------------------------


def test_dot_dot_path_is_normalised_by_envoy_and_still_matches(mesh: Mesh) -> None:
    response, arrived, _ = send(mesh, "orders", bearer=token(mesh), path="/v1/customers/42/../42")
    assert response.status == 200
    assert [r.path for r in arrived] == [PATH]
    assert minted_from(arrived[0]).claims["authorization_details"][0]["path"] == PATH


@pytest.mark.parametrize("path", ["/v1/customers/%2F..", "/v1/customers/42;x=1"])
def test_ambiguous_paths_are_denied(mesh: Mesh, path: str) -> None:
    response, _, reached = send(mesh, "orders", bearer=token(mesh), path=path)
    assert response.status in (400, 403)
    assert reached == 0


# --- fail closed -----------------------------------------------------------------------------


def test_envoy_fails_closed_with_the_sidecar_stopped(mesh: Mesh) -> None:
    """The module's mesh, so it runs last for its front: the sidecar is started again (on the
    same ports) before the next front's tests, and must be allowing again by then."""
    assert send(mesh, "orders", bearer=token(mesh))[0].status == 200
    mesh.sidecar.stop()
    try:
        response, _, reached = send(mesh, "orders", bearer=token(mesh))
        assert response.status in (503, 403)
        assert reached == 0
    finally:
        mesh.sidecar.start()

    def allowed_again() -> bool:
        response, arrived, _ = send(mesh, "orders", bearer=token(mesh))
        return response.status == 200 and len(arrived) == 1

    wait_for(allowed_again, 10, what="Envoy to allow again after the restart", interval=0.1)


# --- the demo --------------------------------------------------------------------------------


@pytest.mark.parametrize("front", FRONTS)
def test_demo_json_shows_only_narrowed_tokens_upstream(front: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extauthz", "demo", "--json", "--front", front],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    requests, jwks = report["requests"], report["jwks"]
    allowed = [r for r in requests if r["status"] == 200]
    denied = [r for r in requests if r["status"] in (401, 403)]
    assert len(allowed) >= 1
    assert len(denied) >= 3
    assert len(allowed) + len(denied) == len(requests)

    for r in allowed:
        subject = r["subject_token"]
        upstream = r["upstream_headers"]
        assert subject
        assert all(subject not in value for value in upstream.values())
        minted = parse_compact(upstream["authorization"].removeprefix("Bearer "))
        assert verifies(minted, jwks)
        claims, subject_claims = minted.claims, r["subject_claims"]
        assert isinstance(claims["aud"], str)
        assert claims["aud"] == RULE_AUDIENCE
        assert set(claims["scope"].split()) <= set(subject_claims["scope"].split())
        assert claims["exp"] <= subject_claims["exp"]
        assert claims["exp"] <= claims["iat"] + 300
        assert claims["act"]["sub"] == r["workload"]
        assert r["workload"].startswith("spiffe://")
    for r in denied:
        assert "upstream_headers" not in r
