"""Transaction tokens against draft-ietf-oauth-transaction-tokens, one test per requirement.

Each conformance test names the section of the draft it checks and quotes the requirement in
short. Sections about the Transaction Token Service's HTTP token endpoint (the Txn-Token
Request and Response, refresh tokens, TTS discovery) do not apply: extauthz is the local
interface the draft allows ("may be obtained through a local interface"), called by Envoy, not
an RFC 8693 endpoint. docs/policy.md ("Transaction tokens") lists which sections apply.

The last part is the narrowing invariant over chains of hops, by property test: every hop
keeps ``txn``, ``sub`` and ``aud`` and never widens scope or lifetime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import corekit as k
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extauthz.decision.jose import generate_signing_key, parse_compact, parse_jwks
from extauthz.decision.model import Snapshot
from extauthz.decision.pipeline import Decision, decide
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp
from extauthz.errors import PolicyError
from extauthz.policy.loader import assemble

TD = k.TD
EDGE = "spiffe://cluster.local/ns/shop/sa/edge"
GATEWAY = "spiffe://cluster.local/ns/shop/sa/gateway"
A = "spiffe://cluster.local/ns/shop/sa/a"
B = "spiffe://cluster.local/ns/shop/sa/b"
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
EDGE_HOST = "edge.shop.svc.cluster.local"
A_HOST = "a.shop.svc.cluster.local"
B_HOST = "b.shop.svc.cluster.local"
PATH = "/v1/orders/7"
USER_SCOPE = "orders.read payments.charge profile.read email"
TTS_ISS = "https://tts.shop.svc"
TTS_ID = "shop-tts"
# The claims a Txn-Token we mint carries, and nothing else.
TXN_CLAIMS = frozenset(
    {"iss", "sub", "aud", "iat", "exp", "jti", "txn", "scope", "req_wl", "act", "may_act"}
    | {"tctx", "rctx"}
)


def _rules(b_mode: str = "replace") -> list[dict[str, Any]]:
    return [
        k.rule_doc(
            "edge-orders",
            workloads=[GATEWAY],
            host=EDGE_HOST,
            paths=["/v1/orders/{id}"],
            require=["orders.read"],
            audience=EDGE,
            scopes=["orders.read", "payments.charge", "profile.read"],
            ttl="60s",
        ),
        k.rule_doc(
            "a-from-edge",
            workloads=[EDGE],
            host=A_HOST,
            paths=["/v1/orders/{id}"],
            issuers=["exchange", TTS_ID],
            require=None,
            audience=A,
            scopes=["payments.charge", "profile.read"],
            txnToken="replace",
        ),
        k.rule_doc(
            "b-from-a",
            workloads=[A, CHECKOUT],
            host=B_HOST,
            paths=["/v1/orders/{id}"],
            issuers=["exchange"],
            require=None,
            audience=B,
            scopes=["payments.charge"],
            txnToken=b_mode,
        ),
    ]


def _tts_doc() -> dict[str, Any]:
    doc = k.issuer_doc(ident=TTS_ID, issuer=TTS_ISS, jwks_file="issuers/tts.json")
    doc.pop("audiences")
    doc["tokenTypes"] = ["txntoken+jwt"]
    return doc


class Hops:
    """One exchange (one policy, one signing key) as every sidecar of the trust domain runs it,
    and a Transaction Token Service of the same domain with keys of its own."""

    def __init__(self, b_mode: str = "replace") -> None:
        self.idp = Idp(k.IDP_ISS)
        self.tts = Idp(TTS_ISS)
        doc = k.policy_doc(
            _rules(b_mode),
            token_type="transaction_token",
            trust_domains=[TD],
            issuers=[k.issuer_doc(), _tts_doc()],
        )
        policy = k.compile_doc(doc)
        self.signing = generate_signing_key()
        keys = {
            k.IDP_ID: parse_jwks(json.dumps(self.idp.jwks()).encode()),
            TTS_ID: parse_jwks(json.dumps(self.tts.jwks()).encode()),
        }
        self.snap: Snapshot = assemble(policy, keys, [self.signing])
        self.ids = k.Ids("id")

    def bearer(self, scope: str = USER_SCOPE, **claims: Any) -> str:
        return self.idp.key.sign(
            k.subject_claims(k.NOW, sub="alice", scope=scope, **claims), "at+jwt"
        )

    def first(self, token: str | None = None, now: float = k.NOW) -> Decision:
        """The edge: the gateway brings the user's bearer token."""
        headers = {"authorization": f"Bearer {token or self.bearer()}"}
        return self.ask(headers, GATEWAY, EDGE_HOST, now)

    def inner(self, txn_token: str, caller: str, host: str, now: float = k.NOW) -> Decision:
        """An inner hop: the caller brings the Txn-Token it received, and no bearer."""
        return self.ask({"txn-token": txn_token}, caller, host, now)

    def ask(self, headers: dict[str, str], caller: str, host: str, now: float) -> Decision:
        inp = k.request(host=host, path=PATH, principal=caller, headers=headers)
        return decide(inp, self.snap, now, self.ids)

    def tts_token(self, **claims: Any) -> str:
        """A Txn-Token of the domain's Transaction Token Service."""
        body = {
            "iss": TTS_ISS,
            "aud": TD,
            "iat": int(k.NOW),
            "exp": int(k.NOW) + 60,
            "txn": "tts-txn-1",
            "sub": "alice",
            "scope": "payments.charge",
            "req_wl": GATEWAY,
            **claims,
        }
        body = {name: value for name, value in body.items() if value is not None}
        return self.tts.key.sign(body, "txntoken+jwt")

    def own(self, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A Txn-Token signed with the exchange's own key, with any header and claims."""
        head = {"alg": self.signing.alg, "kid": self.signing.kid, "typ": "txntoken+jwt"}
        return k.sign_raw(self.signing, {**head, **(header or {})}, claims)


def minted(decision: Decision, rule_id: str) -> dict[str, Any]:
    claims = k.allowed(decision, rule_id)
    assert decision.header == "txn-token"
    return claims


@pytest.fixture
def hops() -> Hops:
    return Hops()


def _chain(hops: Hops) -> tuple[Decision, Decision, Decision]:
    edge = hops.first()
    assert edge.token is not None, (edge.reason, edge.detail)
    a = hops.inner(edge.token, EDGE, A_HOST)
    assert a.token is not None, (a.reason, a.detail)
    b = hops.inner(a.token, A, B_HOST)
    return edge, a, b


# --- "Txn-Token Format": "JWT Header" ------------------------------------------------------------


def test_header_typ_must_be_txntoken_jwt_and_kid_is_set(hops: Hops) -> None:
    """JWT Header: typ MUST be present with the value txntoken+jwt; key rotation SHOULD be
    supported through kid."""
    for decision in _chain(hops):
        assert decision.token is not None
        header = parse_compact(decision.token).header
        assert header["typ"] == "txntoken+jwt"
        assert header["kid"] == hops.signing.kid


# --- "JWT Body Claims" ----------------------------------------------------------------------------


def test_required_claims_are_present_and_nothing_else(hops: Hops) -> None:
    """JWT Body Claims: iat, aud, exp, txn, sub, scope and req_wl are REQUIRED; tctx and rctx
    RECOMMENDED ("Request Context": SHOULD contain rctx; "Transaction Context": SHOULD contain
    tctx)."""
    for decision in _chain(hops):
        claims = dict(decision.claims or {})
        assert {"iat", "aud", "exp", "txn", "sub", "scope", "req_wl"} <= set(claims)
        assert isinstance(claims["tctx"], dict) and isinstance(claims["rctx"], dict)
        assert set(claims) == TXN_CLAIMS


def test_aud_identifies_the_trust_domain(hops: Hops) -> None:
    """JWT Body Claims: aud MUST identify the Trust Domain in which the Txn-Token is valid
    ("Txn-Token Request Processing": the TTS MUST set aud to its Trust Domain)."""
    for decision in _chain(hops):
        assert decision.claims is not None and decision.claims["aud"] == TD
    assert hops.snap.policy.exchange.trust_domain == TD


def test_a_token_of_another_trust_domain_is_not_accepted(hops: Hops) -> None:
    """JWT Body Claims: a Txn-Token MUST NOT be accepted outside the Trust Domain identified
    by its aud ("Txn-Token Validation": verify that aud identifies the workload's domain)."""
    edge = hops.first()
    claims = dict(edge.claims or {})
    for aud in ("other.example", [TD, "other.example"], ["other.example"], None):
        forged = hops.own(**{**claims, "aud": aud} if aud is not None else _without(claims, "aud"))
        k.denied(hops.inner(forged, EDGE, A_HOST), Reason.AUDIENCE_MISMATCH)
    as_list = hops.own(**{**claims, "aud": [TD]})
    assert hops.inner(as_list, EDGE, A_HOST).allowed


def _without(claims: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in claims.items() if key not in names}


@pytest.mark.parametrize("name", ["iat", "txn", "sub", "scope", "req_wl", "exp", "may_act"])
def test_a_received_token_missing_a_required_claim_is_refused(hops: Hops, name: str) -> None:
    """JWT Body Claims: iat, exp, txn, sub, scope, req_wl are REQUIRED; a token of ours always
    names the one workload that may present it (may_act)."""
    edge = hops.first()
    forged = hops.own(**_without(dict(edge.claims or {}), name))
    decision = hops.inner(forged, EDGE, A_HOST)
    k.denied(decision, Reason.CLAIM_INVALID)


def test_txn_is_new_per_transaction_and_not_the_token_id(hops: Hops) -> None:
    """Txn-Token Request Processing: the TTS MUST set txn to a unique ID specific to this
    transaction ("Unique Transaction Identifier": SHOULD be unique within the domain)."""
    one, two = hops.first(), hops.first()
    assert one.claims is not None and two.claims is not None
    assert one.claims["txn"] != two.claims["txn"]
    assert one.claims["txn"] != one.claims["jti"]


def test_iat_is_the_time_of_issuance(hops: Hops) -> None:
    """Txn-Token Request Processing: the TTS MUST set iat to the time of issuance."""
    later = k.NOW + 7
    edge = hops.first(now=later)
    assert edge.claims is not None and edge.claims["iat"] == int(later)
    assert edge.token is not None
    a = hops.inner(edge.token, EDGE, A_HOST, now=later + 3)
    assert a.claims is not None and a.claims["iat"] == int(later + 3)


def test_sub_is_the_subjects(hops: Hops) -> None:
    """Txn-Token Request Processing: the TTS determines sub (unique in the domain): the
    subject token's own sub, never the caller's."""
    for decision in _chain(hops):
        assert decision.claims is not None and decision.claims["sub"] == "alice"


def test_req_wl_names_the_requesting_workload(hops: Hops) -> None:
    """JWT Body Claims: req_wl is REQUIRED, the workload that requested the Txn-Token."""
    edge, a, b = _chain(hops)
    assert [d.claims["req_wl"] for d in (edge, a, b) if d.claims] == [GATEWAY, EDGE, A]


def test_tctx_and_rctx_hold_the_rule_and_the_request(hops: Hops) -> None:
    """Transaction Context: tctx holds what the TTS determined (the rule and its purpose);
    Request Context: rctx the environment of the request (who asked, for what)."""
    edge = hops.first()
    assert edge.claims is not None
    assert edge.claims["tctx"] == {
        "rule": "edge-orders",
        "purpose": "test rule edge-orders",
    }
    assert edge.claims["rctx"] == {
        "req_wl": GATEWAY,
        "method": "GET",
        "host": EDGE_HOST,
        "path": PATH,
    }


# --- "Txn-Token Lifetime", "Txn-Token Replay Risks" -----------------------------------------------


def test_lifetime_is_short_and_not_past_the_subject_token(hops: Hops) -> None:
    """Txn-Token Lifetime: short-lived (minutes or less); "Txn-Token Replay Risks": lifetime
    MUST be kept short. Ours never outlive the rule's ttl, maxTtl or the subject token."""
    short = hops.bearer(exp=int(k.NOW) + 20)
    edge = hops.first(short)
    assert edge.claims is not None
    assert edge.claims["exp"] == int(k.NOW) + 20
    edge = hops.first()
    assert edge.claims is not None and edge.claims["exp"] - edge.claims["iat"] == 60


def test_no_token_when_the_presented_token_has_expired(hops: Hops) -> None:
    """Txn-Token Lifetime: the TTS MUST NOT issue a Txn-Token if the presented token's
    expiration time has passed."""
    expired = hops.bearer(exp=int(k.NOW) - 300)
    k.denied(hops.first(expired), Reason.TOKEN_EXPIRED)


# --- "Scope Processing", "Unknown subject_token scope", "Access Tokens" ---------------------------


def test_scope_is_never_more_than_the_subject_tokens(hops: Hops) -> None:
    """Scope Processing: the TTS MUST ensure the scope of the Txn-Token is equal or less than
    the scopes of the original subject_token."""
    narrow = hops.bearer(scope="orders.read profile.read")
    edge = hops.first(narrow)
    assert edge.claims is not None
    assert set(edge.claims["scope"].split()) == {"orders.read", "profile.read"}


def test_an_unknown_subject_scope_is_refused_not_unconstrained(hops: Hops) -> None:
    """Unknown subject_token scope: the TTS MUST reject the request and MUST NOT treat an
    unknown scope as unconstrained."""
    no_scope = hops.idp.key.sign(_without(k.subject_claims(k.NOW, sub="alice"), "scope"), "at+jwt")
    k.denied(hops.first(no_scope), Reason.INSUFFICIENT_SCOPE)
    edge = hops.first()
    forged = hops.own(**_without(dict(edge.claims or {}), "scope"))
    k.denied(hops.inner(forged, EDGE, A_HOST), Reason.CLAIM_INVALID)


def test_the_access_token_is_not_inside_the_txn_token(hops: Hops) -> None:
    """Access Tokens: the Txn-Token MUST NOT contain the access token presented."""
    bearer = hops.bearer()
    edge = hops.first(bearer)
    assert edge.token is not None
    payload = json.dumps(dict(parse_compact(edge.token).claims))
    assert bearer not in payload
    assert all(part not in payload for part in bearer.split("."))


# --- "Using Txn-Tokens", "Txn-Token HTTP Header" --------------------------------------------------


def test_the_token_goes_in_txn_token_and_authorization_is_removed(hops: Hops) -> None:
    """Using Txn-Tokens: the standard Authorization header MUST NOT be used; "Txn-Token HTTP
    Header": the invoking workload MUST use the Txn-Token header."""
    edge = hops.first()
    assert edge.header == "txn-token"
    assert "authorization" in edge.strip_headers
    assert "txn-token" not in edge.strip_headers


def test_a_txn_token_in_authorization_is_refused(hops: Hops) -> None:
    """Using Txn-Tokens: Authorization MUST NOT carry a Txn-Token ("Transaction Tokens Are Not
    OAuth 2.0 Access Tokens": MUST NOT be used as one), whoever signed it."""
    edge = hops.first()
    assert edge.token is not None
    ours = {"authorization": f"Bearer {edge.token}"}
    k.denied(hops.ask(ours, EDGE, A_HOST, k.NOW), Reason.TOKEN_TYPE_INVALID)
    theirs = {"authorization": f"Bearer {hops.tts_token()}"}
    k.denied(hops.ask(theirs, EDGE, A_HOST, k.NOW), Reason.TOKEN_TYPE_INVALID)


@pytest.mark.parametrize("shape", ["two", "bearer", "empty", "spaces"])
def test_the_header_holds_exactly_one_txn_token(hops: Hops, shape: str) -> None:
    """Txn-Token HTTP Header: the value MUST be exactly one Txn-Token."""
    edge = hops.first()
    token = edge.token or ""
    value = {
        "two": f"{token},{token}",
        "bearer": f"Bearer {token}",
        "empty": "",
        "spaces": f" {token} ",
    }[shape]
    reason = Reason.TOKEN_MISSING if shape == "empty" else Reason.TOKEN_MALFORMED
    k.denied(hops.inner(value, EDGE, A_HOST), reason)


def test_a_bearer_token_is_not_taken_where_a_txn_token_is(hops: Hops) -> None:
    """An inner hop's rule takes Txn-Tokens only: the user's bearer token sent straight to it
    finds no rule."""
    headers = {"authorization": f"Bearer {hops.bearer()}"}
    k.denied(hops.ask(headers, EDGE, A_HOST, k.NOW), Reason.NO_RULE)


# --- "Txn-Token Validation" -----------------------------------------------------------------------


def test_validation_checks_signature_aud_and_expiry(hops: Hops) -> None:
    """Txn-Token Validation: the workload MUST validate the JWS signature, verify aud
    identifies its Trust Domain (above) and verify the token is not expired."""
    edge = hops.first()
    assert edge.token is not None and edge.claims is not None
    head, body, sig = edge.token.split(".")
    other = k.sign_parts(generate_signing_key(), head, body)
    k.denied(hops.inner(other, EDGE, A_HOST), Reason.SIGNATURE_INVALID)
    later = edge.claims["exp"] + hops.snap.policy.exchange.leeway + 1
    k.denied(hops.inner(edge.token, EDGE, A_HOST, now=later), Reason.TOKEN_EXPIRED)
    wrong_typ = hops.own({"typ": "at+jwt"}, **edge.claims)
    k.denied(hops.inner(wrong_typ, EDGE, A_HOST), Reason.TOKEN_TYPE_INVALID)
    no_typ = k.sign_raw(hops.signing, {"alg": "ES256", "kid": hops.signing.kid}, edge.claims)
    k.denied(hops.inner(no_typ, EDGE, A_HOST), Reason.TOKEN_TYPE_INVALID)


def test_pass_sends_the_token_on_as_it_was_received() -> None:
    """Txn-Token Validation: outbound calls MUST include the Txn-Token as it was received. A
    ``txnToken: pass`` hop mints nothing: the token goes on untouched, other credentials not."""
    hops = Hops(b_mode="pass")
    edge = hops.first(hops.bearer(scope="orders.read payments.charge"))
    assert edge.token is not None
    a = hops.inner(edge.token, EDGE, A_HOST)
    assert a.token is not None
    headers = {"txn-token": a.token, "authorization": "Bearer other"}
    b = hops.ask(headers, A, B_HOST, k.NOW)
    assert b.allowed and b.passthrough
    assert b.token is None and b.claims is None
    assert "txn-token" not in b.strip_headers and "authorization" in b.strip_headers
    assert b.subject is not None and b.subject.txn == (a.claims or {})["txn"]


def test_pass_refuses_an_expired_or_empty_token_and_a_window() -> None:
    """A token goes on only if the next hop can take it: not expired (no leeway), holding a
    scope; and a pass rule cannot have a window, since a passed token keeps its own exp."""
    hops = Hops(b_mode="pass")
    edge = hops.first(hops.bearer(scope="orders.read payments.charge"))
    claims = dict(edge.claims or {})
    late = hops.own(**{**claims, "may_act": {"sub": A}, "scope": "payments.charge"})
    k.denied(hops.inner(late, A, B_HOST, now=claims["exp"] + 1), Reason.TOKEN_EXPIRED)
    empty = hops.own(**{**claims, "may_act": {"sub": A}, "scope": ""})
    k.denied(hops.inner(empty, A, B_HOST), Reason.INSUFFICIENT_SCOPE)
    rules = _rules("pass")
    rules[2]["active"] = {"until": "2030-01-01T00:00:00Z"}
    doc = k.policy_doc(rules, token_type="transaction_token", issuers=[k.issuer_doc(), _tts_doc()])
    with pytest.raises(PolicyError, match="keeps its own exp"):
        k.compile_doc(doc)


def test_pass_refuses_a_token_wider_than_the_rule() -> None:
    """A pass hop lets through only a token no wider than its grant; a wider one needs
    replace (insufficient_scope names why)."""
    hops = Hops(b_mode="pass")
    edge = hops.first()
    assert edge.token is not None
    # The edge's token (orders.read, payments.charge, profile.read), sent by the workload it
    # was minted for: B grants payments.charge only.
    claims = dict(edge.claims or {})
    for_a = hops.own(**{**claims, "may_act": {"sub": A}})
    decision = hops.inner(for_a, A, B_HOST)
    k.denied(decision, Reason.INSUFFICIENT_SCOPE)
    assert "profile.read" in decision.detail


# --- "Txn-Token as a subject_token" (replacement) -------------------------------------------------


def test_a_replacement_keeps_txn_sub_and_aud(hops: Hops) -> None:
    """Txn-Token as a subject_token: the TTS MUST NOT modify txn, sub and aud."""
    edge, a, b = _chain(hops)
    values = {(d.claims["txn"], d.claims["sub"], d.claims["aud"]) for d in (edge, a, b) if d.claims}
    assert len(values) == 1
    assert len({d.claims["jti"] for d in (edge, a, b) if d.claims}) == 3


def test_a_replacement_never_widens(hops: Hops) -> None:
    """Txn-Token as a subject_token: MUST NOT enable modifications that expand the scope of
    permitted actions; MAY reduce them. Scope and lifetime only shrink; tctx and rctx stay."""
    edge, a, b = _chain(hops)
    chain = [d.claims for d in (edge, a, b) if d.claims is not None]
    scopes = [set(c["scope"].split()) for c in chain]
    assert scopes[0] >= scopes[1] >= scopes[2] and scopes[2] == {"payments.charge"}
    assert chain[0]["exp"] >= chain[1]["exp"] >= chain[2]["exp"]
    assert chain[0]["tctx"] == chain[1]["tctx"] == chain[2]["tctx"]
    assert chain[0]["rctx"] == chain[1]["rctx"] == chain[2]["rctx"]


def test_no_replacement_of_an_expired_token(hops: Hops) -> None:
    """Txn-Token as a subject_token: MUST NOT issue a new Txn-Token when the one being
    replaced has expired."""
    edge = hops.first()
    assert edge.claims is not None
    expired = hops.own(**{**edge.claims, "exp": int(k.NOW) - 120})
    k.denied(hops.inner(expired, EDGE, A_HOST), Reason.TOKEN_EXPIRED)


def test_a_replacement_keeps_the_call_chain(hops: Hops) -> None:
    """Txn-Token as a subject_token: MUST maintain the Call Chain of workloads that requested
    the Txn-Token being replaced. Each hop nests the one before in act."""
    _, _, b = _chain(hops)
    assert b.claims is not None
    assert b.claims["act"] == {"sub": A, "act": {"sub": EDGE, "act": {"sub": GATEWAY}}}


def test_a_replacement_is_refused_once_the_chain_is_too_long(hops: Hops) -> None:
    """Txn-Token as a subject_token: SHOULD limit the number of replacements. Lifetime never
    grows here, and a call chain deeper than eight actors is refused."""
    edge = hops.first()
    claims = dict(edge.claims or {})
    act: dict[str, Any] = {"sub": GATEWAY}
    for _ in range(8):
        act = {"sub": EDGE, "act": act}
    deep = hops.own(**{**claims, "act": act})
    k.denied(hops.inner(deep, EDGE, A_HOST), Reason.CLAIM_INVALID)


# --- replay, and the keys of another Transaction Token Service ------------------------------------


def test_a_token_presented_by_another_workload_is_refused(hops: Hops) -> None:
    """Txn-Token Replay Risks: a Txn-Token is not resistant to replay. Ours name the workload
    they were minted for (may_act); any other workload presenting one is refused, even where
    a rule admits that workload."""
    edge, a, _ = _chain(hops)
    assert a.token is not None and a.claims is not None
    assert a.claims["may_act"] == {"sub": A}
    k.denied(hops.inner(a.token, CHECKOUT, B_HOST), Reason.ACTOR_NOT_PERMITTED)
    assert edge.token is not None
    k.denied(hops.inner(edge.token, A, A_HOST), Reason.NO_RULE)
    assert hops.inner(a.token, A, B_HOST).allowed


def test_a_transaction_token_services_tokens_are_verified_with_its_keys(hops: Hops) -> None:
    """Determining signing keys: iss identifies the signer when keys are not predetermined.
    A configured TTS's Txn-Token is verified with its keys, and is replaced as ours are."""
    token = hops.tts_token()
    a = hops.inner(token, EDGE, A_HOST)
    claims = minted(a, "a-from-edge")
    assert (claims["txn"], claims["sub"], claims["aud"]) == ("tts-txn-1", "alice", TD)
    assert claims["iss"] == k.EXCHANGE_ISS
    # Its tokens only where a rule names it: B's rule takes ours only.
    k.denied(hops.inner(token, A, B_HOST), Reason.NO_RULE)
    # Its name on another key, or another issuer's name, is refused.
    forged = k.sign_raw(
        generate_signing_key(),
        {"alg": "ES256", "kid": hops.tts.key.kid, "typ": "txntoken+jwt"},
        dict(parse_compact(token).claims),
    )
    k.denied(hops.inner(forged, EDGE, A_HOST), Reason.SIGNATURE_INVALID)
    stranger = Idp("https://elsewhere.example").key.sign(
        {**parse_compact(token).claims, "iss": "https://elsewhere.example"}, "txntoken+jwt"
    )
    k.denied(hops.inner(stranger, EDGE, A_HOST), Reason.ISSUER_UNTRUSTED)
    idp_as_tts = hops.idp.key.sign(
        {**parse_compact(token).claims, "iss": k.IDP_ISS}, "txntoken+jwt"
    )
    k.denied(hops.inner(idp_as_tts, EDGE, A_HOST), Reason.ISSUER_UNTRUSTED)


def test_a_cached_txn_token_is_never_taken_as_a_bearer_token(hops: Hops) -> None:
    """The subject cache keys a Txn-Token apart from the same text sent as a bearer token."""
    cache = k.LruSubjectCache()
    edge = hops.first()
    assert edge.token is not None
    inp = k.request(host=A_HOST, path=PATH, principal=EDGE, headers={"txn-token": edge.token})
    assert decide(inp, hops.snap, k.NOW, hops.ids, cache).allowed
    bearer = {"authorization": f"Bearer {edge.token}"}
    inp = k.request(host=A_HOST, path=PATH, principal=EDGE, headers=bearer)
    k.denied(decide(inp, hops.snap, k.NOW, hops.ids, cache), Reason.TOKEN_TYPE_INVALID)


# --- the narrowing invariant over chains of hops --------------------------------------------------

SCOPES = ("a.read", "a.write", "b.read", "b.write", "c.admin")
CHAIN_TD = TD


def _workload(i: int) -> str:
    return f"spiffe://{CHAIN_TD}/ns/chain/sa/w{i}"


@st.composite
def chains(draw: st.DrawFn) -> tuple[list[dict[str, Any]], set[str], list[int], int]:
    """Hops 1..6: hop i is called by workload w(i-1) and mints for w(i), granting some of the
    scopes with some ttl and mode; the user's scopes; the seconds between hops; the subject
    token's remaining life."""
    length = draw(st.integers(1, 6))
    hops = []
    previous: Sequence[str] = SCOPES
    for i in range(length):
        # Mostly a chain that narrows as it goes (so that long chains are reached), sometimes
        # a grant of anything.
        pool = previous if draw(st.integers(0, 4)) else SCOPES
        granted = draw(st.sets(st.sampled_from(pool), min_size=1))
        previous = sorted(granted)
        mode = "" if i == 0 else draw(st.sampled_from(["replace", "replace", "pass"]))
        hops.append({"scopes": sorted(granted), "ttl": draw(st.integers(1, 300)), "mode": mode})
    user = set(SCOPES) if draw(st.integers(0, 3)) else draw(st.sets(st.sampled_from(SCOPES)))
    gaps = [0] + [draw(st.sampled_from([0, 1, 5, 30, 120])) for _ in range(length - 1)]
    life = draw(st.sampled_from([1, 60, 300, 900, 900]))
    return hops, user, gaps, life


def _chain_world(hops: Sequence[dict[str, Any]]) -> Hops:
    world = Hops()
    rules = []
    for i, hop in enumerate(hops):
        extra = {"txnToken": hop["mode"]} if hop["mode"] else {}
        rules.append(
            k.rule_doc(
                f"hop-{i}",
                workloads=[_workload(i)],
                host=f"hop{i}.chain.svc",
                paths=["/v1/orders/{id}"],
                issuers=["exchange"] if hop["mode"] else [k.IDP_ID],
                require=None,
                audience=_workload(i + 1),
                scopes=hop["scopes"],
                ttl=hop["ttl"],
                **extra,
            )
        )
    doc = k.policy_doc(rules, token_type="transaction_token", issuers=[k.issuer_doc()])
    world.snap = assemble(
        k.compile_fast(doc),
        {k.IDP_ID: parse_jwks(json.dumps(world.idp.jwks()).encode())},
        [world.signing],
    )
    return world


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_every_hop_narrows_with_txn_sub_and_aud_fixed(
    example: tuple[list[dict[str, Any]], set[str], list[int], int],
) -> None:
    """Per hop: txn, sub and aud fixed; scope within the token received and the rule's grant
    (empty is a deny); exp within the token received and now + ttl; iat now; the caller in
    req_wl and outermost in act, over the chain before; the next workload alone in may_act;
    tctx and rctx as the first hop set them; nothing else. A pass hop changes nothing."""
    hops, user, gaps, life = example
    world = _chain_world(hops)
    now = k.NOW
    bearer = world.idp.key.sign(
        k.subject_claims(now, sub="alice", scope=" ".join(sorted(user)), exp=int(now) + life),
        "at+jwt",
    )
    held: dict[str, Any] = {"scope": " ".join(sorted(user)), "exp": int(now) + life}
    token: str | None = None
    first: dict[str, Any] = {}
    for i, hop in enumerate(hops):
        now += gaps[i]
        caller = _workload(i)
        host = f"hop{i}.chain.svc"
        bearing = token is None
        headers = {"authorization": f"Bearer {bearer}"} if bearing else {"txn-token": token or ""}
        decision = world.ask(headers, caller, host, now)
        before = set(held["scope"].split())
        if not decision.allowed:
            expired = held["exp"] <= now - (world.snap.policy.exchange.leeway if i else 0)
            narrowed_away = not (before & set(hop["scopes"]))
            wider = hop["mode"] == "pass" and not before <= set(hop["scopes"])
            if decision.reason is Reason.TOKEN_EXPIRED:
                assert expired or held["exp"] <= now
            else:
                assert decision.reason is Reason.INSUFFICIENT_SCOPE, decision.reason
                assert narrowed_away or wider
            assert decision.token is None
            event(f"denied after {i} minted hops: {decision.reason.code}")
            return
        if hop["mode"] == "pass":
            assert decision.passthrough and decision.token is None
            assert decision.subject is not None and decision.subject.txn == first["txn"]
            assert before <= set(hop["scopes"])
            # The token goes on as received: still bound to the workload before.
            event(f"passed after {i} minted hops")
            return
        claims = minted(decision, f"hop-{i}")
        scopes = set(claims["scope"].split())
        assert scopes and scopes <= before & set(hop["scopes"])
        assert int(now) < claims["exp"] <= min(held["exp"], int(now) + hop["ttl"])
        assert claims["iat"] == int(now)
        assert claims["aud"] == CHAIN_TD and claims["sub"] == "alice"
        assert claims["req_wl"] == caller and claims["act"]["sub"] == caller
        assert claims["may_act"] == {"sub": _workload(i + 1)}
        assert set(claims) == TXN_CLAIMS
        if i == 0:
            first = claims
        else:
            assert claims["txn"] == first["txn"]
            assert claims["tctx"] == first["tctx"] and claims["rctx"] == first["rctx"]
            assert claims["act"]["act"] == held["act"]
            assert claims["jti"] != held["jti"]
        held, token = claims, decision.token
    event(f"all {len(hops)} hops minted")
