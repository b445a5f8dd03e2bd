"""A representative set of the attack suite through the real Envoy, on both fronts.

``test_attacks.py`` runs every attack through each front's edge in process (``edgekit``); this
module sends a representative set as real mTLS requests to a real Envoy with the shipped
bootstrap of each front (``envoy.yaml`` for gRPC, ``envoy-http.yaml`` for HTTP), in front of
the sidecar process and the echo upstream: forged tokens, a forged XFCC, repeated headers,
host and path tricks, an oversized token. Each must end with the documented status at the
client, nothing at the upstream, and one decision in the sidecar's log with the documented
reason code (so the deny is the sidecar's, not Envoy's own).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import corekit as k
import pytest

from extauthz.decision.jose import generate_signing_key
from extauthz.decision.reasons import Reason
from extauthz.demo.envoy import FRONTS
from extauthz.demo.idp import Idp
from extauthz.demo.stack import ISSUER, WORKLOADS, Mesh, Response

pytestmark = pytest.mark.envoy

HOST = "profile.shop.svc.cluster.local"
PATH = "/v1/customers/42"
AUDIENCE = "https://shop.example.com"
ENVOY_ID = "spiffe://cluster.local/ns/edge/sa/envoy"


@pytest.fixture(scope="module", params=FRONTS)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """One mesh per front, with the shipped example policy (orders may GET
    /v1/customers/{id} on the profile host with a corp-idp token carrying profile.read)."""
    front = str(request.param)
    with Mesh(tmp_path_factory.mktemp(f"attacks-{front}"), front=front) as running:
        yield running


def claims(**overrides: Any) -> dict[str, Any]:
    """A good subject token's claims, now; ``None`` removes a claim."""
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "jti": "subject-jti",
        "scope": "profile.read",
    }
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def good(mesh: Mesh, **overrides: Any) -> str:
    return mesh.idp.key.sign(claims(**overrides), "at+jwt")


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclass(frozen=True)
class Attack:
    """One attack: who sends what, and how it must end."""

    reason: Reason
    headers: Callable[[Mesh], Sequence[tuple[str, str]]]
    workload: str = "orders"
    path: str = PATH
    host: str = HOST
    # what the decision log must say besides the reason
    logged: Callable[[Mesh], dict[str, Any]] = lambda mesh: {}


def _alg_none(mesh: Mesh) -> list[tuple[str, str]]:
    return bearer(f"{k.b64json({'alg': 'none', 'typ': 'at+jwt'})}.{k.b64json(claims())}.c2ln")


def _hmac_with_public_key(mesh: Mesh) -> list[tuple[str, str]]:
    header = {"alg": "HS256", "kid": mesh.idp.key.kid, "typ": "at+jwt"}
    secret = k.public_key_secrets(mesh.idp.key)["pem-spki"]
    return bearer(k.hmac_token("HS256", header, claims(), secret))


def _kid_elsewhere(mesh: Mesh) -> list[tuple[str, str]]:
    attacker = generate_signing_key()
    header = {"alg": "ES256", "kid": "https://attacker.example/jwks.json#k1", "typ": "at+jwt"}
    return bearer(k.sign_raw(attacker, header, claims()))


def _untrusted_issuer(mesh: Mesh) -> list[tuple[str, str]]:
    evil = Idp("https://idp.evil.example")
    return bearer(evil.key.sign(claims(iss=evil.issuer), "at+jwt"))


def _forged_xfcc(mesh: Mesh) -> list[tuple[str, str]]:
    # What the local Envoy would write for orders, sent by billing, which has no rule.
    forged = f"By={ENVOY_ID};Hash={'ab' * 32};URI={WORKLOADS['orders']}"
    return [*bearer(good(mesh)), ("x-forwarded-client-cert", forged)]


def _two_authorization(mesh: Mesh) -> list[tuple[str, str]]:
    return [*bearer(good(mesh)), ("Authorization", f"Bearer {good(mesh, sub='user-2')}")]


def _second_host(mesh: Mesh) -> list[tuple[str, str]]:
    return [*bearer(good(mesh)), ("Host", "evil.example")]


ATTACKS: dict[str, Attack] = {
    "alg-none": Attack(Reason.ALGORITHM_NOT_ALLOWED, _alg_none),
    "hmac-with-the-issuers-public-key": Attack(Reason.ALGORITHM_NOT_ALLOWED, _hmac_with_public_key),
    "kid-pointing-elsewhere": Attack(Reason.KEY_UNKNOWN, _kid_elsewhere),
    "expired": Attack(
        Reason.TOKEN_EXPIRED,
        lambda m: bearer(good(m, iat=int(time.time()) - 3600, exp=int(time.time()) - 1200)),
    ),
    "wrong-audience": Attack(
        Reason.AUDIENCE_MISMATCH, lambda m: bearer(good(m, aud="https://other.example.com"))
    ),
    "untrusted-issuer": Attack(Reason.ISSUER_UNTRUSTED, _untrusted_issuer),
    "client-sent-xfcc-impersonating-orders": Attack(
        Reason.NO_RULE,
        _forged_xfcc,
        workload="billing",
        logged=lambda m: {"caller": WORKLOADS["billing"]},
    ),
    "two-authorization-headers": Attack(Reason.TOKEN_MALFORMED, _two_authorization),
    "host-the-rule-does-not-cover": Attack(
        Reason.NO_RULE,
        lambda m: bearer(good(m)),
        host="payments.shop.svc.cluster.local",
        logged=lambda m: {"host": "payments.shop.svc.cluster.local"},
    ),
    # Envoy joins the two Host lines into one :authority, which is no host.
    "two-host-headers": Attack(Reason.HOST_INVALID, _second_host),
    # The absolute-form target names the authority Envoy routes by, not Host.
    "absolute-form-authority-beside-host": Attack(
        Reason.NO_RULE,
        lambda m: bearer(good(m)),
        path="https://evil.example/v1/customers/42",
        logged=lambda m: {"host": "evil.example", "path": PATH, "caller": WORKLOADS["orders"]},
    ),
    "dot-dot-segments": Attack(
        Reason.NO_RULE,
        lambda m: bearer(good(m)),
        path="/v1/customers/42/../../admin",
        logged=lambda m: {"path": "/v1/admin"},
    ),
    "encoded-dot-dot-segments": Attack(
        Reason.NO_RULE,
        lambda m: bearer(good(m)),
        path="/v1/customers/42/%2e%2e/%2E%2E/admin",
        logged=lambda m: {"path": "/v1/admin"},
    ),
    "token-too-large": Attack(Reason.TOKEN_TOO_LARGE, lambda m: bearer(good(m, pad="x" * 9000))),
}


def _logged_so_far(mesh: Mesh) -> int:
    """Decision lines already in the log (the previous test waited for its own)."""
    path = mesh.sidecar.decision_log
    return len(path.read_text().splitlines()) if path.exists() else 0


def send(
    mesh: Mesh, workload: str, path: str, host: str, headers: Sequence[tuple[str, str]]
) -> tuple[Response, int, list[dict[str, Any]]]:
    """One request through Envoy: the response, how many requests reached the upstream
    meanwhile, and the decisions the sidecar logged for it."""
    before_echo, before_log = len(mesh.echo.requests), _logged_so_far(mesh)
    response = mesh.request(workload, method="GET", path=path, host=host, headers=list(headers))
    decisions = mesh.sidecar.decisions()[before_log:]
    return response, len(mesh.echo.requests) - before_echo, decisions


def test_the_honest_request_is_allowed(mesh: Mesh) -> None:
    """Control: the request every attack below is a variation of reaches the upstream, with
    a minted token in place of the subject token."""
    subject = good(mesh)
    response, reached, decisions = send(mesh, "orders", PATH, HOST, bearer(subject))
    assert response.status == 200, response.body
    assert reached == 1
    upstream = mesh.echo.requests[-1]
    (value,) = upstream.values("authorization")
    assert value.startswith("Bearer ") and subject not in value
    assert [d["reason"] for d in decisions] == ["allowed"]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_through_envoy_is_denied_by_the_sidecar(mesh: Mesh, name: str) -> None:
    """Each attack: the client gets the reason's status and our body, the upstream gets
    nothing, and the sidecar logged one decision with that reason."""
    attack = ATTACKS[name]
    headers = attack.headers(mesh)
    response, reached, decisions = send(mesh, attack.workload, attack.path, attack.host, headers)
    reason = attack.reason
    assert response.status == reason.http_status, (mesh.front, response.status, response.body)
    assert reached == 0
    assert json.loads(response.body) == {"error": reason.code}
    for _, value in headers:
        assert value not in response.body.decode(errors="replace")
    challenge = response.headers.get("www-authenticate")
    assert challenge == (reason.challenge.value or None)
    assert len(decisions) == 1, decisions
    (logged,) = decisions
    assert logged["decision"] == "deny" and logged["reason"] == reason.code, logged
    assert logged["jti"] is None and logged["scopes"] is None
    for key, value in attack.logged(mesh).items():
        assert logged[key] == value, (key, logged)
