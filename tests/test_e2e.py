"""End to end through the real Envoy: mTLS client -> Envoy -> extauthz -> echo upstream.

The echo upstream records every header line as it arrived (duplicates included), so "the
original token never reached the upstream" is checked on the wire, not on a merged dict.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opskit import tampered, verifies

from extauthz.decision.jose import CompactJWS, parse_compact
from extauthz.demo.echo import ReceivedRequest
from extauthz.demo.pki import x5t_s256
from extauthz.demo.stack import WORKLOADS, Mesh, Response, http_get

HOST = "profile.shop.svc.cluster.local"
PATH = "/v1/customers/42"
RULE_AUDIENCE = "spiffe://cluster.local/ns/shop/sa/profile"
RULE_TTL = 30
BROAD_SCOPE = "profile.read profile.write orders.read email"
MARK = "x-test-id"

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Mesh(tmp_path_factory.mktemp("mesh")) as running:
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


DENIED = {
    # name: (workload, bearer maker, status)
    "wrong-workload": ("billing", lambda m: token(m), 403),
    "missing-scope": ("orders", lambda m: token(m, scope="orders.read email"), 403),
    "tampered-signature": ("orders", lambda m: tampered(m.idp), 401),
    "expired": ("orders", lambda m: token(m, ttl=-600), 401),
    "no-token": ("orders", None, 401),
}


@pytest.mark.parametrize("case", list(DENIED))
def test_denied_requests_never_reach_upstream(mesh: Mesh, case: str) -> None:
    workload, make, status = DENIED[case]
    bearer = make(mesh) if make is not None else None
    response, _, reached = send(mesh, workload, bearer=bearer)
    assert response.status == status
    assert reached == 0
    assert set(response.json()) == {"error"}
    if bearer is not None:
        assert bearer not in response.body.decode()
    if status == 401:
        assert response.headers.get("www-authenticate", "").startswith("Bearer")
    if case == "tampered-signature":
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


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
    assert minted_from(arrived[0]).claims["req"]["path"] == PATH


@pytest.mark.parametrize("path", ["/v1/customers/%2F..", "/v1/customers/42;x=1"])
def test_ambiguous_paths_are_denied(mesh: Mesh, path: str) -> None:
    response, _, reached = send(mesh, "orders", bearer=token(mesh), path=path)
    assert response.status in (400, 403)
    assert reached == 0


# --- fail closed -----------------------------------------------------------------------------


def test_envoy_fails_closed_with_the_sidecar_stopped(tmp_path: Path) -> None:
    with Mesh(tmp_path / "mesh") as running:
        assert send(running, "orders", bearer=token(running))[0].status == 200
        running.sidecar.stop()
        response, _, reached = send(running, "orders", bearer=token(running))
        assert response.status in (503, 403)
        assert reached == 0


# --- the demo --------------------------------------------------------------------------------


def test_demo_json_shows_only_narrowed_tokens_upstream() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extauthz", "demo", "--json"],
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
