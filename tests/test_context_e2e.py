"""Context conditions through the real server: mTLS client -> Envoy -> extauthz -> echo.

One mesh per front (gRPC ext_authz and the HTTP authorization service) runs a policy with
three rules: one whose subject must meet claim conditions (``azp`` equals, ``acr`` any of,
``tenant`` equals the path's ``{tenant}``, ``groups`` contains, ``verified`` equals ``true``)
inside a window open now; one whose window is over; one whose window has not started. The
policy's times are computed when the mesh starts.

Tokens never appear in assertion messages: what is compared is claims, statuses and log lines.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opskit import verifies, wait_for

from extauthz.decision.jose import CompactJWS, parse_compact
from extauthz.decision.reasons import Reason
from extauthz.demo.echo import ReceivedRequest
from extauthz.demo.envoy import FRONTS
from extauthz.demo.stack import WORKLOADS, Mesh, Response, http_get

pytestmark = pytest.mark.envoy

HOST = "tenants.shop.svc.cluster.local"
AUDIENCE = "spiffe://cluster.local/ns/shop/sa/billing"
RULE = "orders-read-tenant"
ENDED = "promo-ended"
UPCOMING = "launch-upcoming"
MARK = "x-test-id"
# What a subject needs besides orders.read: every condition of RULE met.
GOOD = {
    "azp": "web-shop",
    "acr": "urn:hwk",
    "tenant": "acme",
    "groups": ["dev", "ops"],
    "verified": True,
}
NEVER_MINTED = set(GOOD) | {"scp", "email"}


def rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def policy_text(now: int) -> tuple[str, int]:
    """The policy for a mesh started at ``now``, and the end of RULE's window. The open
    window's ``from`` is a YAML timestamp, its ``until`` a string: both spellings are read."""
    until = now + 600
    text = f"""\
apiVersion: extauthz/v1
kind: ExchangePolicy
exchange:
  issuer: https://exchange.shop.svc
  tokenType: access_token
  maxTtl: 3600s
trustedIssuers:
  - id: corp-idp
    issuer: https://idp.example.com
    jwks: {{file: issuers/corp-idp.json}}
    audiences: [https://shop.example.com]
    algorithms: [ES256]
workloads:
  trustDomains: [cluster.local]
rules:
  - id: {RULE}
    purpose: The order service lists a tenant's orders for its web shop's users
    match:
      workloads: [{WORKLOADS["orders"]}]
      host: {HOST}
      methods: [GET]
      paths: ["/v1/tenants/{{tenant}}/orders"]
      issuers: [corp-idp]
    require:
      scopes: [orders.read]
      claims:
        azp: web-shop
        acr: [urn:mfa, urn:hwk]
        tenant: "{{tenant}}"
        groups: {{contains: ops}}
        verified: true
    active: {{from: {rfc3339(now - 3600)}, until: "{rfc3339(until)}"}}
    grant:
      audience: {AUDIENCE}
      scopes: [orders.read]
      ttl: 1800s
  - id: {ENDED}
    purpose: A promotion that has ended
    match:
      workloads: [{WORKLOADS["orders"]}]
      host: {HOST}
      methods: [GET]
      paths: ["/v1/promo/{{id}}"]
      issuers: [corp-idp]
    require: {{scopes: [orders.read]}}
    active: {{from: "{rfc3339(now - 7200)}", until: "{rfc3339(now - 3600)}"}}
    grant:
      audience: {AUDIENCE}
      scopes: [orders.read]
      ttl: 30s
  - id: {UPCOMING}
    purpose: A launch that has not started
    match:
      workloads: [{WORKLOADS["orders"]}]
      host: {HOST}
      methods: [GET]
      paths: ["/v1/launch/{{id}}"]
      issuers: [corp-idp]
    require: {{scopes: [orders.read]}}
    active: {{from: "{rfc3339(now + 3600)}"}}
    grant:
      audience: {AUDIENCE}
      scopes: [orders.read]
      ttl: 30s
default: deny
"""
    return text, until


@dataclass(frozen=True)
class Running:
    mesh: Mesh
    until: int  # the end of RULE's window
    jwks: dict[str, Any]


@pytest.fixture(scope="module", params=FRONTS)
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """One mesh per front for the whole module."""
    front: str = request.param
    text, until = policy_text(int(time.time()))
    workdir = tmp_path_factory.mktemp(f"context-{front}")
    with Mesh(workdir, policy_text=text, front=front) as mesh:
        status, body = http_get(mesh.sidecar.admin_port, "/.well-known/jwks.json")
        assert status == 200
        yield Running(mesh, until, json.loads(body))


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    response: Response
    arrived: list[ReceivedRequest]  # what the upstream received for this request
    reached: int  # requests of any kind that reached the upstream meanwhile
    sub: str  # the subject's unique sub, to find its decision-log line


def send(running: Running, path: str, claims: dict[str, Any]) -> Sent:
    """GET ``path`` as the orders workload with a subject token holding orders.read and
    ``claims`` (a None value leaves that claim out), and a unique ``sub``."""
    mesh = running.mesh
    sub = f"user-{uuid.uuid4().hex}"
    extra = {name: value for name, value in claims.items() if value is not None}
    bearer = mesh.idp.token(
        now=time.time(), sub=sub, scope="orders.read email", ttl=3600, extra=extra
    )
    mark = uuid.uuid4().hex
    headers = {MARK: mark, "authorization": f"Bearer {bearer}"}
    before = len(mesh.echo.requests)
    response = mesh.request("orders", method="GET", path=path, host=HOST, headers=headers)
    after = mesh.echo.requests[before:]
    return Sent(response, [r for r in after if r.values(MARK) == [mark]], len(after), sub)


def decision_of(running: Running, sub: str) -> dict[str, Any]:
    """The one decision-log line of the request whose subject is ``sub`` (the log is flushed
    a few times a second)."""
    log = running.mesh.sidecar.decision_log

    def lines() -> list[dict[str, Any]]:
        if not log.exists():
            return []
        found = [json.loads(line) for line in log.read_text().splitlines() if sub in line]
        return [line for line in found if line.get("sub") == sub]

    found = wait_for(lines, 5, what="the request's decision-log line", interval=0.05)
    assert len(found) == 1
    return found[0]


def minted_from(received: ReceivedRequest) -> CompactJWS:
    (value,) = received.values("authorization")
    assert value.startswith("Bearer ")
    return parse_compact(value.removeprefix("Bearer "))


def assert_denied(sent: Sent, reason: Reason) -> None:
    """Our deny, as both fronts answer it, and nothing reached the upstream."""
    response = sent.response
    assert response.status == reason.http_status == 403
    assert response.json() == {"error": reason.code}
    assert response.headers.get("www-authenticate") is None
    assert sent.reached == 0
    assert sent.arrived == []


# --- allowed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["acme", "globex"])
def test_every_condition_met_is_allowed_until_the_window_closes(
    running: Running, tenant: str
) -> None:
    """The tenant claim equals the path's tenant: allowed; the minted token expires at the
    window's end (the grant's ttl of 1800 s and the subject's hour would go past it) and
    carries none of the claims the conditions read."""
    sent = send(running, f"/v1/tenants/{tenant}/orders", {**GOOD, "tenant": tenant})
    assert sent.response.status == 200
    assert len(sent.arrived) == 1
    minted = minted_from(sent.arrived[0])
    assert verifies(minted, running.jwks)
    claims = minted.claims
    assert claims["exp"] <= running.until
    assert claims["exp"] == running.until
    assert claims["aud"] == AUDIENCE
    assert claims["scope"] == "orders.read"
    assert claims["sub"] == sent.sub
    assert claims["authorization_details"][0]["path"] == f"/v1/tenants/{tenant}/orders"
    assert not NEVER_MINTED & set(claims)
    line = decision_of(running, sent.sub)
    assert (line["decision"], line["reason"], line["rule"]) == ("allow", "allowed", RULE)


def test_the_condition_list_accepts_each_value(running: Running) -> None:
    """``acr: [urn:mfa, urn:hwk]``: either one."""
    for acr in ("urn:mfa", "urn:hwk"):
        sent = send(running, "/v1/tenants/acme/orders", {**GOOD, "acr": acr})
        assert sent.response.status == 200
        assert len(sent.arrived) == 1


# --- each condition broken in turn -----------------------------------------------------------

# name: (claims that differ from GOOD, the claim the deny names, a value the log must not show)
BROKEN: dict[str, tuple[dict[str, Any], str, str | None]] = {
    "azp-other": ({"azp": "evil-shop-3c9f"}, "azp", "evil-shop-3c9f"),
    "azp-missing": ({"azp": None}, "azp", None),
    "azp-boolean": ({"azp": True}, "azp", None),
    "acr-not-listed": ({"acr": "urn:password-only"}, "acr", "urn:password-only"),
    "acr-as-array": ({"acr": ["urn:mfa"]}, "acr", None),
    "acr-missing": ({"acr": None}, "acr", None),
    "tenant-other": ({"tenant": "globex-7d21"}, "tenant", "globex-7d21"),
    "tenant-missing": ({"tenant": None}, "tenant", None),
    "groups-lacking-ops": ({"groups": ["dev-team-51", "qa-team-51"]}, "groups", "team-51"),
    "groups-a-string": ({"groups": "ops"}, "groups", None),
    "groups-missing": ({"groups": None}, "groups", None),
    "verified-an-int": ({"verified": 1}, "verified", None),
    "verified-a-string": ({"verified": "true"}, "verified", None),
    "verified-missing": ({"verified": None}, "verified", None),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_condition_is_claim_mismatch(running: Running, case: str) -> None:
    """403 claim_mismatch, nothing upstream; the decision log names the rule and the claim,
    never the claim's value."""
    changed, claim, secret = BROKEN[case]
    sent = send(running, "/v1/tenants/acme/orders", {**GOOD, **changed})
    assert_denied(sent, Reason.CLAIM_MISMATCH)
    line = decision_of(running, sent.sub)
    assert (line["decision"], line["reason"], line["rule"]) == ("deny", "claim_mismatch", RULE)
    assert line["path"] == "/v1/tenants/acme/orders"
    detail = line["detail"]
    assert isinstance(detail, str)
    assert claim in detail.split()
    value = changed[claim]
    if value is not None:
        assert json.dumps(value) not in detail
        assert str(value) not in detail
    if secret is not None:
        assert secret not in json.dumps(line)
        assert secret not in sent.response.body.decode()


# --- windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "path"), [(ENDED, "/v1/promo/7"), (UPCOMING, "/v1/launch/7")])
def test_outside_its_window_is_rule_inactive(running: Running, rule: str, path: str) -> None:
    """The ended and the upcoming window: 403 rule_inactive, the rule named in the log."""
    sent = send(running, path, GOOD)
    assert_denied(sent, Reason.RULE_INACTIVE)
    line = decision_of(running, sent.sub)
    assert (line["decision"], line["reason"], line["rule"]) == ("deny", "rule_inactive", rule)
    assert line["jti"] is None and line["aud"] is None
