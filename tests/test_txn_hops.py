"""Transaction tokens across three hops of real Envoys, sidecars and upstreams (tests/hopkit.py).

The gateway calls the edge with the user's bearer token; the edge calls A and A calls B, each
through its own outbound Envoy, passing on only the Txn-Token it received. Every hop's
inbound Envoy checks with its own sidecar; the three share one policy and one signing key.
Each relay reports what it received, and each sidecar's decision log line for the request is
found by the x-request-id its relay saw, so every assertion is about what arrived on the wire
or was logged, per front (``grpc`` and ``http``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hopkit import (
    HOPS,
    TXN_TOKEN_HEADER,
    USER,
    WORKLOADS,
    Chain,
    HopMesh,
    HopToken,
    chain_of,
    hop_token,
)

from extauthz.decision.jose import parse_compact
from extauthz.decision.reasons import Reason
from extauthz.demo.envoy import FRONTS

pytestmark = pytest.mark.envoy

EXCHANGE = "https://exchange.shop.svc"
TRUST_DOMAIN = "cluster.local"
TXN_TYP = "txntoken+jwt"
TXN_CLAIMS = {"iss", "sub", "aud", "iat", "exp", "jti", "txn", "scope", "req_wl", "act"} | {
    "may_act",
    "tctx",
    "rctx",
}
# Per hop: the rule that admits its caller, the caller, and the rule's grant.
RULES = {"edge": "edge-orders", "a": "a-from-edge", "b": "b-from-a"}
CALLERS = {"edge": "gateway", "a": "edge", "b": "a"}
GRANTS = {
    "edge": ({"orders.read", "payments.charge", "profile.read"}, 60),
    "a": ({"payments.charge", "profile.read"}, 30),
    "b": ({"payments.charge"}, 30),
}

POLICY = """\
apiVersion: extauthz/v1
kind: ExchangePolicy
exchange:
  issuer: https://exchange.shop.svc
  tokenType: transaction_token
  trustDomain: cluster.local
  maxTtl: 300s
trustedIssuers:
  - id: corp-idp
    issuer: https://idp.example.com
    jwks: {file: issuers/corp-idp.json}
    audiences: [https://shop.example.com]
    algorithms: [ES256]
workloads:
  trustDomains: [cluster.local]
rules:
  - id: edge-orders
    purpose: the edge starts an order transaction for the user
    match: {workloads: [spiffe://cluster.local/ns/shop/sa/gateway], host: edge.shop.svc.cluster.local, methods: [GET], paths: ["/v1/orders/{id}"], issuers: [corp-idp]}
    require: {scopes: [orders.read]}
    grant: {audience: spiffe://cluster.local/ns/shop/sa/edge, scopes: [orders.read, payments.charge, profile.read], ttl: 60s}
  - id: a-from-edge
    purpose: service A works on the order
    match: {workloads: [spiffe://cluster.local/ns/shop/sa/edge], host: a.shop.svc.cluster.local, methods: [GET], paths: ["/v1/orders/{id}"], issuers: [exchange]}
    txnToken: replace
    grant: {audience: spiffe://cluster.local/ns/shop/sa/a, scopes: [payments.charge, profile.read], ttl: 30s}
  - id: b-from-a
    purpose: service B charges for the order
    match: {workloads: [spiffe://cluster.local/ns/shop/sa/a, spiffe://cluster.local/ns/shop/sa/checkout], host: b.shop.svc.cluster.local, methods: [GET], paths: ["/v1/orders/{id}"], issuers: [exchange]}
    txnToken: replace
    grant: {audience: spiffe://cluster.local/ns/shop/sa/b, scopes: [payments.charge], ttl: 30s}
"""  # noqa: E501 (the rules as the reader would write them, one mapping a line)


@dataclass(frozen=True, slots=True)
class Trip:
    """One user request through the whole chain: what each hop received and logged."""

    bearer: str = field(repr=False)
    sent_at: int
    chain: Chain
    tokens: dict[str, HopToken]
    decisions: dict[str, dict[str, Any]]


@pytest.fixture(scope="module", params=FRONTS)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HopMesh]:
    """One three-hop mesh per front for the whole module; starting it compiles the policy."""
    front: str = request.param
    with HopMesh(tmp_path_factory.mktemp(f"hops-{front}"), POLICY, front=front) as running:
        yield running


@pytest.fixture(scope="module")
def jwks(mesh: HopMesh) -> dict[str, dict[str, Any]]:
    return {hop: mesh.jwks(hop) for hop in HOPS}


@dataclass(frozen=True, slots=True)
class Sent:
    """The user's request as sent, and what came back, whatever the status."""

    bearer: str = field(repr=False)
    at: int
    chain: Chain


def send_user_request(mesh: HopMesh) -> Sent:
    bearer = mesh.user_token()
    at = int(time.time())
    return Sent(bearer, at, mesh.chain(bearer))


def trip(mesh: HopMesh, jwks: dict[str, dict[str, Any]], sent: Sent | None = None) -> Trip:
    """The user's request through the whole chain (``sent``, or a new one), which must answer
    200 with every hop reached, with each hop's token and decision log line."""
    sent = sent or send_user_request(mesh)
    bearer, sent_at, chain = sent.bearer, sent.at, sent.chain
    status = chain.status
    assert status == 200, f"the chain answered {status}: {chain!r}"
    assert chain.hops == list(HOPS)
    tokens = {hop: hop_token(chain.at(hop), jwks) for hop in HOPS}
    decisions = {}
    for hop in HOPS:
        (request_id,) = chain.at(hop).values("x-request-id")
        decisions[hop] = mesh.decision_for(hop, request_id)
    return Trip(bearer, sent_at, chain, tokens, decisions)


@pytest.fixture(scope="module")
def sent(mesh: HopMesh) -> Sent:
    """The user's request, once per front, for the tests that only look at it."""
    return send_user_request(mesh)


@pytest.fixture(scope="module")
def journey(mesh: HopMesh, jwks: dict[str, dict[str, Any]], sent: Sent) -> Trip:
    """That request, which must have gone through every hop."""
    return trip(mesh, jwks, sent)


# --- one transaction -------------------------------------------------------------------------


def test_the_chain_answers_200_and_keeps_one_transaction(journey: Trip) -> None:
    chain = journey.chain
    assert [(a.hop, a.status) for a in chain.arrivals] == [(hop, 200) for hop in HOPS]
    assert chain.end is None  # the leaf answered, no deny on the way

    for hop, token in journey.tokens.items():
        assert token.header["typ"] == TXN_TYP, hop
        assert isinstance(token.header.get("kid"), str), hop
        # One exchange: every sidecar publishes the key that signed every hop's token.
        assert token.verifies_with == {h: True for h in HOPS}, hop
        assert set(token.claims) == TXN_CLAIMS, hop
        assert token.claims["iss"] == EXCHANGE, hop
        assert token.claims["sub"] == USER, hop
        assert token.claims["aud"] == TRUST_DOMAIN, hop

    txns = {hop: token.claims["txn"] for hop, token in journey.tokens.items()}
    (txn,) = set(txns.values())
    assert isinstance(txn, str) and txn
    jtis = [token.claims["jti"] for token in journey.tokens.values()]
    assert len(set(jtis)) == len(HOPS)
    assert txn not in jtis

    for hop, line in journey.decisions.items():
        token = journey.tokens[hop]
        assert line["decision"] == "allow", hop
        assert line["reason"] == Reason.ALLOWED.code, hop
        assert line["rule"] == RULES[hop], hop
        assert line["caller"] == WORKLOADS[CALLERS[hop]], hop
        assert line["txn"] == txn, hop
        # The line is about the very token the relay received.
        assert line["jti"] == token.claims["jti"], hop
        assert line["scopes"] == token.claims["scope"], hop


def test_scopes_lifetime_and_actors_narrow_along_the_chain(journey: Trip) -> None:
    edge, a, b = (journey.tokens[hop] for hop in HOPS)
    user = parse_compact(journey.bearer).claims

    assert edge.scopes <= set(user["scope"].split())
    assert edge.scopes >= a.scopes >= b.scopes
    assert b.scopes == {"payments.charge"}
    for hop, token in journey.tokens.items():
        grant, ttl = GRANTS[hop]
        assert token.scopes == grant & set(user["scope"].split()), hop
        assert token.claims["iat"] >= journey.sent_at - 5, hop
        assert token.claims["exp"] <= token.claims["iat"] + ttl, hop

    assert user["exp"] >= edge.claims["exp"] >= a.claims["exp"] >= b.claims["exp"]
    assert edge.claims["iat"] <= a.claims["iat"] <= b.claims["iat"]

    for hop, token in journey.tokens.items():
        assert token.claims["req_wl"] == WORKLOADS[CALLERS[hop]], hop
        # Only the workload the token was minted for may present it at the next hop.
        assert token.claims["may_act"] == {"sub": WORKLOADS[hop]}, hop
    gateway = {"sub": WORKLOADS["gateway"]}
    assert edge.claims["act"] == gateway
    assert a.claims["act"] == {"sub": WORKLOADS["edge"], "act": gateway}
    assert b.claims["act"] == {
        "sub": WORKLOADS["a"],
        "act": {"sub": WORKLOADS["edge"], "act": gateway},
    }

    # The transaction's contexts are set by the first hop and go on as they were.
    assert edge.claims["tctx"]["rule"] == RULES["edge"]
    assert edge.claims["rctx"]["req_wl"] == WORKLOADS["gateway"]
    assert a.claims["tctx"] == b.claims["tctx"] == edge.claims["tctx"]
    assert a.claims["rctx"] == b.claims["rctx"] == edge.claims["rctx"]


def test_the_users_bearer_never_passes_the_first_hop(sent: Sent) -> None:
    """Checked on whatever arrived, so a leak is reported as one even if the chain broke."""
    bearer = sent.bearer
    signature = bearer.rsplit(".", 1)[1]
    for arrival in sent.chain.arrivals:
        assert "authorization" not in arrival.names, arrival.hop
        assert "proxy-authorization" not in arrival.names, arrival.hop
        leaked = [name for name, value in arrival.headers if bearer in value]
        assert leaked == [], f"the bearer reached {arrival.hop} in {leaked}"
        signed = [name for name, value in arrival.headers if signature in value]
        assert signed == [], f"the bearer's signature reached {arrival.hop} in {signed}"
        assert arrival.names.count(TXN_TOKEN_HEADER) == 1, arrival.hop
    # Not vacuous: every relay was reached (and so was checked above).
    assert sent.chain.hops == list(HOPS)


# --- replays and wrong places ----------------------------------------------------------------


def test_a_token_presented_by_a_workload_it_was_not_minted_for_is_refused(
    mesh: HopMesh, jwks: dict[str, dict[str, Any]]
) -> None:
    """A's token at B: checkout is a caller B's rule admits, but the token names A."""
    fresh = trip(mesh, jwks)
    for_a = fresh.tokens["a"]
    assert for_a.claims["may_act"] == {"sub": WORKLOADS["a"]}
    relay_b = mesh.hops["b"].relay
    reached, mark = len(relay_b.requests), len(mesh.decision_lines("b"))

    replayed = mesh.send("checkout", "b", {TXN_TOKEN_HEADER: for_a.text})
    status = replayed.status
    assert status == Reason.ACTOR_NOT_PERMITTED.http_status == 403
    assert replayed.json() == {"error": Reason.ACTOR_NOT_PERMITTED.code}
    assert len(relay_b.requests) == reached
    (line,) = mesh.decisions_after("b", mark)
    assert (line["decision"], line["reason"], line["rule"]) == (
        "deny",
        Reason.ACTOR_NOT_PERMITTED.code,
        RULES["b"],
    )
    assert line["caller"] == WORKLOADS["checkout"]
    assert line["txn"] == for_a.claims["txn"]

    # The same token from the workload it names is accepted: the token itself is valid.
    honest = mesh.send("a", "b", {TXN_TOKEN_HEADER: for_a.text})
    answered = chain_of(honest)
    assert (answered.status, answered.hops, answered.end) == (200, ["b"], None)
    (arrival,) = relay_b.requests[reached:]
    (value,) = arrival.values(TXN_TOKEN_HEADER)
    replaced = parse_compact(value).claims
    assert replaced["txn"] == for_a.claims["txn"]
    assert replaced["may_act"] == {"sub": WORKLOADS["b"]}
    assert replaced["jti"] not in (for_a.claims["jti"], fresh.tokens["b"].claims["jti"])
    (line,) = mesh.decisions_after("b", mark + 1)
    assert (line["decision"], line["caller"]) == ("allow", WORKLOADS["a"])


def test_the_users_bearer_sent_straight_to_an_inner_hop_is_refused(mesh: HopMesh) -> None:
    relay_a = mesh.hops["a"].relay
    reached, mark = len(relay_a.requests), len(mesh.decision_lines("a"))
    response = mesh.send("edge", "a", {"authorization": f"Bearer {mesh.user_token()}"})
    status = response.status
    assert status == Reason.NO_RULE.http_status == 403
    assert response.json() == {"error": Reason.NO_RULE.code}
    assert len(relay_a.requests) == reached
    (line,) = mesh.decisions_after("a", mark)
    assert (line["decision"], line["reason"]) == ("deny", Reason.NO_RULE.code)
    assert line["caller"] == WORKLOADS["edge"]


def test_a_txn_token_in_authorization_is_refused(mesh: HopMesh, journey: Trip) -> None:
    """The edge's own token, from the edge, but as a bearer token instead of in txn-token."""
    for_edge = journey.tokens["edge"]
    relay_a = mesh.hops["a"].relay
    reached, mark = len(relay_a.requests), len(mesh.decision_lines("a"))
    response = mesh.send("edge", "a", {"authorization": f"Bearer {for_edge.text}"})
    status = response.status
    assert status == Reason.TOKEN_TYPE_INVALID.http_status == 401
    assert response.json() == {"error": Reason.TOKEN_TYPE_INVALID.code}
    assert response.headers.get("www-authenticate", "").startswith("Bearer")
    assert len(relay_a.requests) == reached
    (line,) = mesh.decisions_after("a", mark)
    assert (line["decision"], line["reason"]) == ("deny", Reason.TOKEN_TYPE_INVALID.code)
