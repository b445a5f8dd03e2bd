"""decide() by example: one test (or more) per reason code, with an injected clock and keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import corekit as k
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extauthz.decision.identity import certificate_thumbprint
from extauthz.decision.jose import SigningKey, parse_compact, verify_signature
from extauthz.decision.model import Snapshot
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp
from extauthz.demo.pki import make_pki
from extauthz.policy.compiler import load_policy
from extauthz.policy.loader import assemble, load_issuer_keys

NOW = k.NOW
GATEWAY = "spiffe://cluster.local/ns/edge/sa/gateway"
OTHER_TD = "spiffe://other.domain/ns/shop/sa/orders"


@dataclass
class Env:
    idp: Idp
    key: SigningKey
    snap: Snapshot
    ids: k.Ids

    def decide(self, inp: CheckInput, now: float = NOW) -> Decision:
        return decide(inp, self.snap, now, self.ids)

    def token(self, now: float = NOW, typ: str = "at+jwt", **claims: Any) -> str:
        """A subject token signed by the trusted IdP (claims=None removes one)."""
        return self.idp.key.sign(k.subject_claims(now, **claims), typ)

    def raw(self, header: Mapping[str, Any], **claims: Any) -> str:
        """Validly signed by the IdP with an arbitrary header."""
        return k.sign_raw(self.idp.key, header, k.subject_claims(NOW, **claims))

    def ask(self, token: str | None = None, **kw: Any) -> Decision:
        return self.decide(k.request(token, **kw))


def make_env(
    tmp_path: Path,
    rules: Sequence[Mapping[str, Any]] | None = None,
    *,
    exchange: Mapping[str, Any] | None = None,
    **policy_kw: Any,
) -> Env:
    idp = Idp(k.IDP_ISS)
    key = k.new_signing_key()
    doc = k.policy_doc(rules, exchange=exchange, **policy_kw)
    snap = k.snapshot_on_disk(tmp_path, doc, idp, key)
    return Env(idp, key, snap, k.Ids())


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def minted(env: Env, decision: Decision) -> dict[str, Any]:
    """The minted token's claims, after checking it verifies with the snapshot's key."""
    assert decision.allowed, decision
    assert decision.token is not None
    jws = parse_compact(decision.token)
    assert verify_signature(jws, env.key.public(), env.key.alg)
    assert jws.header["kid"] == env.snap.signing_key.kid
    assert jws.header["typ"] == env.snap.policy.exchange.typ
    assert dict(jws.claims) == dict(decision.claims or {})
    return dict(jws.claims)


def denied(decision: Decision, reason: Reason) -> None:
    assert decision.reason is reason, (decision.reason, decision.detail)
    assert not decision.allowed
    assert decision.token is None
    assert decision.claims is None


# --- allowed --------------------------------------------------------------------------------


def test_allowed_mints_exactly_the_narrowed_claims(tmp_path: Path) -> None:
    """Every claim of T comes from the rule, the caller, the request or the narrowed subject."""
    rule = k.rule_doc(scopes=["profile.write", "profile.read", "orders.read"], ttl="30s")
    env = make_env(tmp_path, [rule])
    subject_act = {"sub": "spiffe://cluster.local/ns/edge/sa/gw", "act": {"sub": "older"}}
    token = env.token(
        scope="zeta profile.write email profile.read",
        act=subject_act,
        email="user@example.com",
        groups=["admins"],
        client_id="the-spa",
        cnf={"jkt": "attacker"},
        req={"path": "/admin"},
    )
    decision = env.ask(
        token,
        host="Profile.Shop.svc.cluster.local:8443",
        path="/v1/./customers//42?x=/admin",
        headers={"proxy-authorization": "Basic dXNlcjpwdw=="},
    )
    claims = minted(env, decision)
    assert claims == {
        "iss": k.EXCHANGE_ISS,
        "sub": "user-1",
        "aud": k.PROFILE,
        "iat": int(NOW),
        "exp": int(NOW) + 30,
        "jti": "jti-1",
        "scope": "profile.read profile.write",
        "client_id": k.ORDERS,
        "act": {"sub": k.ORDERS, "act": subject_act},
        "authorization_details": [
            {"type": "http_request", "method": "GET", "host": k.HOST, "path": "/v1/customers/42"}
        ],
    }
    assert env.ids.issued == ["jti-1"]
    assert decision.rule is not None and decision.rule.id == "orders-read-profile"
    assert decision.caller == k.ORDERS
    assert decision.header == "authorization"
    # The minted token overwrites authorization; of the other credential headers, only the
    # one the request carried is removed (Envoy sent every header).
    assert decision.strip_headers == ("proxy-authorization",)
    assert token not in decision.token  # type: ignore[operator]


def test_a_partial_view_of_the_headers_removes_every_credential_header(tmp_path: Path) -> None:
    """The HTTP front sees only the headers Envoy forwards, so it cannot know which credential
    headers the request carries: then all of them are removed."""
    env = make_env(tmp_path)
    inp = dataclasses.replace(k.request(env.token()), all_headers=False)
    decision = env.decide(inp)
    assert decision.allowed
    assert {"proxy-authorization", "txn-token", "x-id-token"} <= set(decision.strip_headers)
    assert "authorization" not in decision.strip_headers
    seen = env.decide(k.request(env.token()))
    assert seen.allowed and seen.strip_headers == ()


def test_act_is_only_the_caller_when_the_subject_has_none(env: Env) -> None:
    claims = minted(env, env.ask(env.token()))
    assert claims["act"] == {"sub": k.ORDERS}


def test_exp_is_capped_by_the_subject_token(env: Env) -> None:
    """T never outlives S."""
    claims = minted(env, env.ask(env.token(exp=int(NOW) + 7)))
    assert claims["exp"] == int(NOW) + 7


def test_exp_is_capped_by_the_rule_ttl(env: Env) -> None:
    claims = minted(env, env.ask(env.token(exp=int(NOW) + 10_000)))
    assert claims["exp"] == int(NOW) + 30


def test_scope_is_the_sorted_intersection(tmp_path: Path) -> None:
    env = make_env(tmp_path, [k.rule_doc(require=["b"], scopes=["c", "a", "y", "b"])])
    claims = minted(env, env.ask(env.token(scope="z b c a")))
    assert claims["scope"] == "a b c"


def test_scp_list_is_read_when_scope_is_absent(env: Env) -> None:
    claims = minted(env, env.ask(env.token(scope=None, scp=["profile.read", "x"])))
    assert claims["scope"] == "profile.read"


def test_jti_comes_from_the_injected_source_and_differs_per_decision(env: Env) -> None:
    token = env.token()
    first = minted(env, env.ask(token))
    second = minted(env, env.ask(token))
    assert (first["jti"], second["jti"]) == ("jti-1", "jti-2")


def test_cnf_is_bound_only_when_the_peer_certificate_is_known(tmp_path: Path, env: Env) -> None:
    """RFC 8705: cnf.x5t#S256 = base64url SHA-256 of the caller's DER certificate."""
    pki = make_pki(tmp_path / "pki", {"orders": k.ORDERS})
    pem = pki.workloads["orders"].cert.read_text()
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    expected = k.b64url(hashlib.sha256(der).digest())
    claims = minted(env, env.ask(env.token(), cert=pem))
    assert claims["cnf"] == {"x5t#S256": expected}
    assert certificate_thumbprint(pem) == expected
    assert "cnf" not in minted(env, env.ask(env.token()))


def test_float_now_is_floored_for_iat_and_exp(env: Env) -> None:
    claims = minted(env, env.decide(k.request(env.token()), now=NOW + 0.9))
    assert claims["iat"] == int(NOW)
    assert claims["exp"] == int(NOW) + 30


def test_example_policy_allows_the_documented_call(tmp_path: Path) -> None:
    """examples/policy.yaml with a fresh IdP: orders reads a profile."""
    text = (Path(__file__).resolve().parent.parent / "examples" / "policy.yaml").read_text()
    idp = Idp(k.IDP_ISS)
    idp.write_jwks(tmp_path / "issuers" / "corp-idp.json")
    (tmp_path / "policy.yaml").write_text(text)
    key = k.new_signing_key("EdDSA")
    policy = load_policy(tmp_path / "policy.yaml")
    snap = assemble(policy, load_issuer_keys(policy), [key])
    decision = decide(k.request(idp.token(now=NOW)), snap, NOW, k.Ids())
    assert decision.allowed
    assert decision.token is not None
    jws = parse_compact(decision.token)
    assert jws.header["alg"] == "EdDSA"
    assert verify_signature(jws, key.public(), "EdDSA")


# --- token_missing / token_malformed / token_too_large ----------------------------------------


@pytest.mark.parametrize("headers", [{}, {"authorization": ""}, {"x-auth": "Bearer a.b.c"}])
def test_token_missing(env: Env, headers: dict[str, str]) -> None:
    denied(env.ask(headers=headers), Reason.TOKEN_MISSING)


def test_token_missing_is_a_401_bearer_challenge() -> None:
    assert Reason.TOKEN_MISSING.http_status == 401
    assert Reason.TOKEN_MISSING.challenge.value.startswith("Bearer")


DUPLICATE_ALG = k.b64url(b'{"alg":"ES256","alg":"none"}') + "." + k.b64json({}) + ".AA"


@pytest.mark.parametrize(
    "make",
    [
        lambda t: f"Bearer {t},Bearer {t}",  # two Authorization headers, joined by Envoy
        lambda t: f"Bearer {t}, Bearer {t}",
        lambda t: f"Bearer {t},{t}",
        lambda t: "Basic dXNlcjpwYXNzd29yZA==",
        lambda t: f"Bearer  {t}",  # two spaces
        lambda t: f" Bearer {t}",
        lambda t: f"Bearer {t} ",
        lambda t: f"Bearer\t{t}",
        lambda t: "Bearer",
        lambda t: "Bearer ",
        lambda t: t,  # no scheme
        lambda t: f"Token {t}",
        lambda t: "Bearer not-a-jws",
        lambda t: "Bearer a.b.c",
        lambda t: f"Bearer {t}.x",
        lambda t: "Bearer " + DUPLICATE_ALG,
    ],
)
def test_token_malformed(env: Env, make: Any) -> None:
    """Exactly one 'Bearer <jws>' in one header, or nothing is verified at all."""
    value = make(env.token())
    denied(env.ask(headers={"authorization": value}), Reason.TOKEN_MALFORMED)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_bearer_scheme_is_case_insensitive(env: Env, scheme: str) -> None:
    """RFC 7235: auth-scheme is case-insensitive."""
    assert env.ask(headers={"authorization": f"{scheme} {env.token()}"}).allowed


def test_token_too_large(tmp_path: Path) -> None:
    env = make_env(tmp_path, exchange={"maxTokenBytes": 1024})
    big = env.token(pad="x" * 2000)
    denied(env.ask(big), Reason.TOKEN_TOO_LARGE)
    assert env.ask(env.token()).allowed


def test_token_too_large_default_limit(env: Env) -> None:
    denied(env.ask(headers={"authorization": "Bearer " + "a" * 9000}), Reason.TOKEN_TOO_LARGE)


def test_huge_integer_in_an_unverified_token_is_a_deny_not_an_exception(env: Env) -> None:
    """Unauthenticated input never raises out of decide (int_max_str_digits is a ValueError)."""
    token = k.b64json({"alg": "ES256"}) + "." + k.b64url(b'{"exp":' + b"9" * 4400 + b"}") + ".AA"
    denied(env.ask(token), Reason.TOKEN_MALFORMED)


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999"])
def test_infinite_exp_is_a_deny_not_an_exception(env: Env, literal: bytes) -> None:
    """A validly signed but absurd exp must still end in a deny value, not an exception."""
    payload = json.dumps(k.subject_claims(exp=0), separators=(",", ":")).encode()
    payload = payload.replace(b'"exp":0', b'"exp":' + literal)
    header = {"alg": "ES256", "kid": env.idp.key.kid, "typ": "at+jwt"}
    decision = env.ask(k.sign_bytes(env.idp.key, header, payload))
    assert not decision.allowed
    assert decision.reason in (Reason.TOKEN_MALFORMED, Reason.CLAIM_INVALID, Reason.TOKEN_EXPIRED)


# --- issuer / algorithm / header / typ / key / signature ---------------------------------------


@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.example.com",
        "https://idp.example.com.evil.com",
        "https://idp.example.com/",
        "https://IDP.example.com",
        "https://idp.example",
        "idp.example.com",
    ],
)
def test_issuer_untrusted(env: Env, iss: str) -> None:
    """The issuer is chosen by exact 'iss' (no partial or case-folded matches)."""
    denied(env.ask(env.token(iss=iss)), Reason.ISSUER_UNTRUSTED)


def test_issuer_missing_is_claim_invalid(env: Env) -> None:
    denied(env.ask(env.token(iss=None)), Reason.CLAIM_INVALID)
    denied(env.ask(env.token(iss=["https://idp.example.com"])), Reason.CLAIM_INVALID)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_casing(env: Env, alg: str) -> None:
    token = k.compact({"alg": alg, "typ": "at+jwt"}, k.subject_claims(), b"\x00")
    denied(env.ask(token), Reason.ALGORITHM_NOT_ALLOWED)


def test_unsecured_jws_with_empty_signature_is_refused(env: Env) -> None:
    token = f"{k.b64json({'alg': 'none'})}.{k.b64json(k.subject_claims())}."
    assert env.ask(token).reason in (Reason.TOKEN_MALFORMED, Reason.ALGORITHM_NOT_ALLOWED)
    assert env.ask(token).token is None


@pytest.mark.parametrize("fmt", ["pem-spki", "jwk"])
def test_hs256_with_the_public_key_as_secret(env: Env, fmt: str) -> None:
    """Algorithm confusion: the issuer's public key used as an HMAC secret."""
    secret = k.public_key_secrets(env.idp.key)[fmt]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": env.idp.key.kid}
    token = k.hmac_token("HS256", header, k.subject_claims(), secret)
    denied(env.ask(token), Reason.ALGORITHM_NOT_ALLOWED)


@pytest.mark.parametrize("alg", ["ES384", "RS256", "EdDSA", "PS256", "", None, 256, ["ES256"]])
def test_algorithms_not_configured_for_the_issuer(env: Env, alg: Any) -> None:
    header = {"typ": "at+jwt"} if alg is None else {"alg": alg, "typ": "at+jwt"}
    denied(env.ask(k.compact(header, k.subject_claims())), Reason.ALGORITHM_NOT_ALLOWED)


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "x"])
def test_crit_header_is_unsupported(env: Env, crit: Any) -> None:
    """We understand no JWS extensions, so any 'crit' means: do not accept."""
    token = env.raw({"alg": "ES256", "kid": env.idp.key.kid, "typ": "at+jwt", "crit": crit})
    denied(env.ask(token), Reason.HEADER_UNSUPPORTED)


@pytest.mark.parametrize(
    "typ", ["txntoken+jwt", "application/txntoken+jwt", "id+jwt", "JWS", "", "dpop+jwt", 1]
)
def test_token_type_invalid(env: Env, typ: Any) -> None:
    """Cross-JWT confusion: only the issuer's configured kinds of token are subject tokens."""
    token = env.raw({"alg": "ES256", "kid": env.idp.key.kid, "typ": typ})
    denied(env.ask(token), Reason.TOKEN_TYPE_INVALID)


@pytest.mark.parametrize("typ", ["at+jwt", "JWT", "jwt", "application/at+jwt", None])
def test_accepted_token_types(env: Env, typ: str | None) -> None:
    header: dict[str, Any] = {"alg": "ES256", "kid": env.idp.key.kid}
    if typ is not None:
        header["typ"] = typ
    assert env.ask(env.raw(header)).allowed


@pytest.mark.parametrize("kid", ["unknown", "../../../etc/passwd", "' OR 1=1 --", ""])
def test_key_unknown(env: Env, kid: str) -> None:
    token = env.raw({"alg": "ES256", "kid": kid, "typ": "at+jwt"})
    denied(env.ask(token), Reason.KEY_UNKNOWN)


def test_kid_not_a_string_is_malformed(env: Env) -> None:
    token = env.raw({"alg": "ES256", "kid": 1, "typ": "at+jwt"})
    denied(env.ask(token), Reason.TOKEN_MALFORMED)


def test_no_kid_tries_the_issuers_keys(env: Env) -> None:
    assert env.ask(env.raw({"alg": "ES256", "typ": "at+jwt"})).allowed


def test_attacker_keys_in_the_header_are_ignored(env: Env) -> None:
    """jwk/jku/x5u/x5c never choose the verification key: the attacker's own key fails."""
    attacker = k.new_signing_key()
    header = {
        "alg": "ES256",
        "typ": "at+jwt",
        "jwk": dict(attacker.public_jwk),
        "jku": "https://attacker.example/jwks.json",
    }
    token = k.sign_raw(attacker, header, k.subject_claims())
    denied(env.ask(token), Reason.SIGNATURE_INVALID)
    token = k.sign_raw(attacker, {**header, "kid": attacker.kid}, k.subject_claims())
    denied(env.ask(token), Reason.KEY_UNKNOWN)


def test_signature_invalid_on_a_tampered_payload(env: Env) -> None:
    head, _, sig = env.token().split(".")
    tampered = k.b64json(k.subject_claims(scope="profile.read admin"))
    denied(env.ask(f"{head}.{tampered}.{sig}"), Reason.SIGNATURE_INVALID)


def test_signature_invalid_with_another_key_under_the_issuers_kid(env: Env) -> None:
    forger = k.new_signing_key()
    token = k.sign_raw(
        forger, {"alg": "ES256", "kid": env.idp.key.kid, "typ": "at+jwt"}, k.subject_claims()
    )
    denied(env.ask(token), Reason.SIGNATURE_INVALID)


# --- time ---------------------------------------------------------------------------------------


def test_token_expired_at_the_leeway_boundary(env: Env) -> None:
    """exp <= now - leeway is expired; inside the leeway nothing can be minted either, because
    T may not outlive S."""
    leeway = env.snap.policy.exchange.leeway
    assert leeway == 30
    denied(env.ask(env.token(exp=int(NOW) - leeway)), Reason.TOKEN_EXPIRED)
    denied(env.ask(env.token(exp=int(NOW) - leeway - 100)), Reason.TOKEN_EXPIRED)
    denied(env.ask(env.token(exp=int(NOW) - leeway + 1)), Reason.TOKEN_EXPIRED)
    denied(env.ask(env.token(exp=int(NOW))), Reason.TOKEN_EXPIRED)
    assert minted(env, env.ask(env.token(exp=int(NOW) + 1)))["exp"] == int(NOW) + 1


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_token_not_yet_valid_beyond_leeway(env: Env, name: str) -> None:
    leeway = env.snap.policy.exchange.leeway
    denied(env.ask(env.token(**{name: int(NOW) + leeway + 1})), Reason.TOKEN_NOT_YET_VALID)
    assert env.ask(env.token(**{name: int(NOW) + leeway})).allowed


def test_clock_is_injected(env: Env) -> None:
    """The same token is valid or expired depending only on the 'now' passed in."""
    token = env.token(exp=int(NOW) + 60)
    assert env.decide(k.request(token), now=NOW).allowed
    assert env.decide(k.request(token), now=NOW + 200).reason is Reason.TOKEN_EXPIRED


# --- audience / claims --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "aud", ["https://other.example.com", [], ["https://other.example.com"], 7, None, [k.IDP_AUD, 1]]
)
def test_audience_mismatch(env: Env, aud: Any) -> None:
    denied(env.ask(env.token(aud=aud)), Reason.AUDIENCE_MISMATCH)


def test_audience_list_containing_ours_is_accepted(env: Env) -> None:
    claims = minted(env, env.ask(env.token(aud=["https://x.example.com", k.IDP_AUD])))
    assert claims["aud"] == k.PROFILE


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": None},
        {"sub": ""},
        {"sub": 42},
        {"sub": "x" * 1025},
        {"scope": ["profile.read"]},
        {"scope": 1},
        {"scope": 'profile.read "quoted"'},
        {"scope": None, "scp": "profile.read"},
        {"exp": None},
        {"exp": str(int(NOW) + 60)},
        {"exp": True},
        {"nbf": "soon"},
        {"iat": [1]},
        {"act": "spiffe://x"},
        {"act": {"client": "x"}},
        {"may_act": "spiffe://cluster.local/ns/shop/sa/orders"},
    ],
)
def test_claim_invalid(env: Env, overrides: dict[str, Any]) -> None:
    denied(env.ask(env.token(**overrides)), Reason.CLAIM_INVALID)


def test_act_chain_depth_is_bounded(env: Env) -> None:
    act: dict[str, Any] = {"sub": "a0"}
    for i in range(1, 9):
        act = {"sub": f"a{i}", "act": act}
    denied(env.ask(env.token(act=act)), Reason.CLAIM_INVALID)


# --- identify -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "principal",
    [
        "",
        "cluster.local/ns/shop/sa/orders",  # Istio AuthorizationPolicy spelling, not a SPIFFE ID
        "spiffe://Cluster.local/ns/shop/sa/orders",
        "CN=orders,O=shop",
        "orders.shop.svc.cluster.local",
        "spiffe://cluster.local/ns/shop/sa/orders/",
    ],
)
def test_workload_unidentified(env: Env, principal: str) -> None:
    denied(env.ask(env.token(), principal=principal), Reason.WORKLOAD_UNIDENTIFIED)


def test_workload_untrusted(env: Env) -> None:
    denied(env.ask(env.token(), principal=OTHER_TD), Reason.WORKLOAD_UNTRUSTED)


def test_upper_case_scheme_principal_is_the_same_workload(env: Env) -> None:
    claims = minted(env, env.ask(env.token(), principal="SPIFFE://cluster.local/ns/shop/sa/orders"))
    assert claims["client_id"] == k.ORDERS


# --- XFCC ---------------------------------------------------------------------------------------


def xfcc_env(tmp_path: Path) -> Env:
    return make_env(tmp_path, trusted_hops=[GATEWAY])


def test_xfcc_is_ignored_from_an_untrusted_peer(tmp_path: Path) -> None:
    """Any XFCC element not appended by a hop we trust is client-controlled."""
    env = xfcc_env(tmp_path)
    forged = {"x-forwarded-client-cert": f"By={k.ORDERS};URI={k.CHECKOUT}"}
    claims = minted(env, env.ask(env.token(), headers=forged))
    assert claims["client_id"] == k.ORDERS
    # without a trusted hop configured, even the hop's own XFCC is ignored
    plain = make_env(tmp_path / "plain")
    xfcc = {"x-forwarded-client-cert": f"By={GATEWAY};URI={k.ORDERS}"}
    denied(plain.ask(plain.token(), principal=GATEWAY, headers=xfcc), Reason.NO_RULE)


def test_xfcc_from_a_trusted_hop_names_the_caller(tmp_path: Path) -> None:
    env = xfcc_env(tmp_path)
    xfcc = {"x-forwarded-client-cert": f"By={GATEWAY};Hash=abcd;URI={k.ORDERS}"}
    claims = minted(env, env.ask(env.token(), principal=GATEWAY, headers=xfcc))
    assert claims["client_id"] == k.ORDERS
    assert claims["act"] == {"sub": k.ORDERS}


def test_xfcc_only_the_last_element_counts(tmp_path: Path) -> None:
    """Earlier elements came from further away (or from the client): the hop's own is last."""
    env = xfcc_env(tmp_path)
    value = f'By={GATEWAY};URI={k.CHECKOUT},By={GATEWAY};URI="{k.ORDERS}"'
    claims = minted(
        env, env.ask(env.token(), principal=GATEWAY, headers={"x-forwarded-client-cert": value})
    )
    assert claims["client_id"] == k.ORDERS
    value = f"By={GATEWAY};URI={k.ORDERS},By={GATEWAY};URI={k.CHECKOUT}"
    decision = env.ask(env.token(), principal=GATEWAY, headers={"x-forwarded-client-cert": value})
    denied(decision, Reason.NO_RULE)
    assert decision.caller == k.CHECKOUT


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"URI={k.ORDERS}",  # no By
        f"By={k.CHECKOUT};URI={k.ORDERS}",  # appended by someone else
        f"By={GATEWAY};URI={k.ORDERS},URI={k.CHECKOUT}",  # last element is not the hop's
        f"By={GATEWAY};URI={k.ORDERS};URI={k.CHECKOUT}",  # two URIs
        f"By={GATEWAY};DNS=orders.svc",  # no URI
        f"By={GATEWAY};By={GATEWAY};URI={k.ORDERS}",
        f'By={GATEWAY};URI="{k.ORDERS}',  # malformed
        f"By={GATEWAY};URI=cluster.local/ns/shop/sa/orders",  # not a SPIFFE ID
    ],
)
def test_xfcc_from_a_trusted_hop_must_be_usable(tmp_path: Path, value: str) -> None:
    env = xfcc_env(tmp_path)
    headers = {"x-forwarded-client-cert": value} if value else {}
    decision = env.ask(env.token(), principal=GATEWAY, headers=headers)
    denied(decision, Reason.WORKLOAD_UNIDENTIFIED)


def test_xfcc_caller_is_not_bound_to_the_hops_certificate(tmp_path: Path) -> None:
    env = xfcc_env(tmp_path)
    pki = make_pki(tmp_path / "pki", {"gateway": GATEWAY, "orders": k.ORDERS})
    hop_pem = pki.workloads["gateway"].cert.read_text()
    caller_pem = pki.workloads["orders"].cert.read_text()
    caller_der = x509.load_pem_x509_certificate(caller_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    caller_hash = hashlib.sha256(caller_der)
    xfcc = f"By={GATEWAY};Hash={caller_hash.hexdigest()};URI={k.ORDERS}"
    decision = env.ask(
        env.token(), principal=GATEWAY, headers={"x-forwarded-client-cert": xfcc}, cert=hop_pem
    )
    claims = minted(env, decision)
    assert claims["client_id"] == k.ORDERS
    assert claims.get("cnf") in (None, {"x5t#S256": k.b64url(caller_hash.digest())})


def test_xfcc_caller_from_another_trust_domain_is_untrusted(tmp_path: Path) -> None:
    env = xfcc_env(tmp_path)
    xfcc = {"x-forwarded-client-cert": f"By={GATEWAY};URI={OTHER_TD}"}
    denied(env.ask(env.token(), principal=GATEWAY, headers=xfcc), Reason.WORKLOAD_UNTRUSTED)


# --- authorize ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/customers/%2F", "/../v1/customers/1", "/v1;x/customers/1", "*", ""]
)
def test_path_invalid(env: Env, path: str) -> None:
    denied(env.ask(env.token(), path=path), Reason.PATH_INVALID)
    assert Reason.PATH_INVALID.http_status == 400


@pytest.mark.parametrize(
    "kw",
    [
        {"principal": k.CHECKOUT},
        {"method": "POST"},
        {"method": "get"},
        {"host": "payments.shop.svc.cluster.local"},
        {"host": "profile.shop.svc.cluster.local.evil.com"},
        {"path": "/v1/customers"},
        {"path": "/v1/customers/42/address"},
        {"path": "/v1/customers/"},
    ],
)
def test_no_rule(env: Env, kw: dict[str, Any]) -> None:
    denied(env.ask(env.token(), **kw), Reason.NO_RULE)
    assert Reason.NO_RULE.http_status == 403


def test_insufficient_scope_when_a_required_scope_is_missing(env: Env) -> None:
    denied(env.ask(env.token(scope="email profile.write")), Reason.INSUFFICIENT_SCOPE)
    denied(env.ask(env.token(scope=None)), Reason.INSUFFICIENT_SCOPE)
    assert "insufficient_scope" in Reason.INSUFFICIENT_SCOPE.challenge.value


def test_insufficient_scope_when_the_grant_intersection_is_empty(tmp_path: Path) -> None:
    """Required scope present but nothing grantable: denied, never a default scope."""
    env = make_env(tmp_path, [k.rule_doc(require=["profile.read"], scopes=["profile.write"])])
    decision = env.ask(env.token(scope="profile.read"))
    denied(decision, Reason.INSUFFICIENT_SCOPE)
    assert decision.rule is not None


def test_insufficient_scope_with_no_require_and_no_overlap(tmp_path: Path) -> None:
    env = make_env(tmp_path, [k.rule_doc(require=None, scopes=["profile.read"])])
    denied(env.ask(env.token(scope="email")), Reason.INSUFFICIENT_SCOPE)
    assert minted(env, env.ask(env.token(scope="email profile.read")))["scope"] == "profile.read"


def test_actor_not_permitted(env: Env) -> None:
    """may_act in S names who may act for it; anyone else is refused."""
    denied(env.ask(env.token(may_act={"sub": k.CHECKOUT})), Reason.ACTOR_NOT_PERMITTED)
    denied(env.ask(env.token(may_act={})), Reason.ACTOR_NOT_PERMITTED)
    claims = minted(env, env.ask(env.token(may_act={"sub": k.ORDERS})))
    assert "may_act" not in claims


# --- re-exchange --------------------------------------------------------------------------------

ONWARD_PATH = "/v1/charges"


def onward_rule(reexchange: bool, workloads: Sequence[str] = (k.PROFILE,)) -> dict[str, Any]:
    """Profile calls payments onward, holding the token it was given."""
    return k.rule_doc(
        "profile-charge",
        workloads=workloads,
        host=k.PAYMENTS_HOST,
        methods=["POST"],
        paths=[ONWARD_PATH],
        require=["profile.read"],
        audience=k.PAYMENTS,
        scopes=["profile.read"],
        ttl="10s",
        reexchange=reexchange,
    )


def onward(env: Env, token: str, caller: str = k.PROFILE, now: float = NOW) -> Decision:
    inp = k.request(token, method="POST", host=k.PAYMENTS_HOST, path=ONWARD_PATH, principal=caller)
    return env.decide(inp, now)


def test_minted_token_is_not_a_subject_token_without_a_rule(tmp_path: Path) -> None:
    env = make_env(tmp_path, [k.rule_doc(), onward_rule(reexchange=False)])
    first = env.ask(env.token())
    assert first.allowed and first.token
    # the downstream (its audience) tries to exchange it onward
    denied(onward(env, first.token), Reason.REEXCHANGE_DENIED)
    # the caller replays it to its own sidecar for the same request
    denied(env.ask(first.token), Reason.REEXCHANGE_DENIED)


def test_reexchange_allowed_narrows_again_and_nests_act(tmp_path: Path) -> None:
    """With 'reexchange: true' the audience of T may exchange T once more, narrower."""
    rules = [
        k.rule_doc(scopes=["profile.read", "profile.write"], require=["profile.read"], ttl="60s"),
        onward_rule(reexchange=True),
    ]
    env = make_env(tmp_path, rules)
    first = env.ask(env.token(scope="profile.read profile.write", act={"sub": "gw"}))
    t1 = minted(env, first)
    assert t1["scope"] == "profile.read profile.write"
    second = onward(env, first.token or "", now=NOW + 5)
    t2 = minted(env, second)
    assert t2["aud"] == k.PAYMENTS
    assert t2["sub"] == t1["sub"] == "user-1"
    assert t2["iss"] == k.EXCHANGE_ISS
    assert t2["scope"] == "profile.read"
    assert t2["exp"] <= min(t1["exp"], int(NOW + 5) + 10)
    assert t2["act"] == {"sub": k.PROFILE, "act": {"sub": k.ORDERS, "act": {"sub": "gw"}}}
    assert t2["client_id"] == k.PROFILE
    assert t2["jti"] != t1["jti"]
    assert second.subject is not None and second.subject.issuer_id == "exchange"


def test_reexchange_requires_the_caller_to_be_the_tokens_audience(tmp_path: Path) -> None:
    env = make_env(tmp_path, [k.rule_doc(), onward_rule(True, workloads=[k.PROFILE, k.CHECKOUT])])
    token = env.ask(env.token()).token or ""
    denied(onward(env, token, caller=k.CHECKOUT), Reason.REEXCHANGE_DENIED)
    assert onward(env, token, caller=k.PROFILE).allowed


def test_reexchange_still_checks_time_and_typ(tmp_path: Path) -> None:
    env = make_env(tmp_path, [k.rule_doc(), onward_rule(reexchange=True)])
    token = env.ask(env.token()).token or ""
    denied(onward(env, token, now=NOW + 31), Reason.TOKEN_EXPIRED)
    claims = dict(parse_compact(token).claims)
    no_typ = k.sign_raw(env.key, {"alg": env.key.alg, "kid": env.key.kid}, claims)
    denied(onward(env, no_typ), Reason.TOKEN_TYPE_INVALID)
    wrong_typ = k.sign_raw(env.key, {"alg": env.key.alg, "kid": env.key.kid, "typ": "JWT"}, claims)
    denied(onward(env, wrong_typ), Reason.TOKEN_TYPE_INVALID)


def test_forged_exchange_token_is_refused(tmp_path: Path) -> None:
    """Claiming our issuer does not help: only our own keys verify 'exchange' tokens."""
    env = make_env(tmp_path, [k.rule_doc(), onward_rule(reexchange=True)])
    claims = {
        "iss": k.EXCHANGE_ISS,
        "sub": "admin",
        "aud": k.PROFILE,
        "exp": int(NOW) + 60,
        "scope": "profile.read",
    }
    by_idp = k.sign_raw(
        env.idp.key, {"alg": "ES256", "kid": env.idp.key.kid, "typ": "at+jwt"}, claims
    )
    denied(onward(env, by_idp), Reason.KEY_UNKNOWN)
    no_kid = k.sign_raw(env.idp.key, {"alg": "ES256", "typ": "at+jwt"}, claims)
    denied(onward(env, no_kid), Reason.SIGNATURE_INVALID)


# --- token formats and modes --------------------------------------------------------------------


def test_transaction_token_mode(tmp_path: Path) -> None:
    env = make_env(tmp_path, token_type="transaction_token")
    decision = env.ask(env.token())
    assert decision.header == "txn-token"
    assert "authorization" in decision.strip_headers
    assert "txn-token" not in decision.strip_headers
    assert env.snap.policy.exchange.typ == "txntoken+jwt"
    claims = minted(env, decision)
    assert parse_compact(decision.token or "").header["typ"] == "txntoken+jwt"
    # A new transaction: its id is not the token's; the audience is the trust domain, and the
    # workload the token is for is the one that may present it (may_act).
    assert claims["txn"] == "jti-1" and claims["jti"] == "jti-2"
    assert claims["aud"] == k.TD
    assert claims["may_act"] == {"sub": k.PROFILE}
    assert claims["req_wl"] == k.ORDERS
    assert claims["tctx"]["rule"] == "orders-read-profile"
    assert claims["rctx"]["req_wl"] == k.ORDERS
    assert "cnf" not in claims and "client_id" not in claims
    assert "authorization_details" not in claims
    assert set(claims) <= k.MINTED_KEYS | k.TXN_KEYS


def test_shadow_mode_decides_but_mints_nothing(tmp_path: Path) -> None:
    """A shadow rule is evaluated and logged with what would be minted; nothing is signed."""
    env = make_env(tmp_path, [k.rule_doc(mode="shadow")])
    decision = env.ask(env.token())
    assert decision.reason is Reason.ALLOWED
    assert decision.rule is not None and decision.rule.shadow is True
    assert decision.shadow is True
    assert decision.token is None
    assert decision.claims is not None and decision.claims["aud"] == k.PROFILE


def test_shadow_rule_also_shadows_a_deny_after_the_rule_was_found(tmp_path: Path) -> None:
    """docs/policy.md: a shadow rule covers denies found after the rule (a missing scope)."""
    env = make_env(tmp_path, [k.rule_doc(mode="shadow")])
    decision = env.ask(env.token(scope="email"))
    denied(decision, Reason.INSUFFICIENT_SCOPE)
    assert decision.shadow is True
    before_rule = env.ask(env.token(), principal=OTHER_TD)
    denied(before_rule, Reason.WORKLOAD_UNTRUSTED)
    assert before_rule.shadow is False


def test_policy_wide_shadow_mode_covers_authentication_failures(tmp_path: Path) -> None:
    """docs/policy.md: on the policy, shadow applies to every decision, nothing is signed."""
    idp, key = Idp(k.IDP_ISS), k.new_signing_key()
    doc = k.policy_doc()
    doc["mode"] = "shadow"
    env = Env(idp, key, k.snapshot_on_disk(tmp_path, doc, idp, key), k.Ids())
    allowed = env.ask(env.token())
    assert allowed.allowed and allowed.shadow and allowed.token is None
    assert allowed.claims is not None
    missing = env.ask()
    denied(missing, Reason.TOKEN_MISSING)
    assert missing.shadow is True


def test_enforce_mode_is_not_shadow(env: Env) -> None:
    decision = env.ask(env.token())
    assert decision.shadow is False
    assert decision.token is not None


# --- deny values --------------------------------------------------------------------------------


def test_denies_carry_what_is_known_but_no_token(env: Env) -> None:
    """A deny after authentication still says who and what (for the log), never a token."""
    decision = env.ask(env.token(), principal=k.CHECKOUT)
    denied(decision, Reason.NO_RULE)
    assert decision.caller == k.CHECKOUT
    assert decision.subject is not None and decision.subject.sub == "user-1"
    assert decision.request is not None and decision.request.path == "/v1/customers/42"
    assert env.ids.issued == [], "no jti is spent on a deny"


def test_401_reasons_carry_an_invalid_token_challenge() -> None:
    for reason in Reason:
        if reason.http_status == 401 and reason is not Reason.TOKEN_MISSING:
            assert 'error="invalid_token"' in reason.challenge.value, reason


# --- the verified-subject cache -----------------------------------------------------------------


def test_cached_subject_is_time_checked_on_every_use(env: Env) -> None:
    """A token verified once is not valid forever: exp/nbf/iat are checked at each 'now'."""
    token = env.token(exp=int(NOW) + 100, nbf=int(NOW))
    assert env.decide(k.request(token), now=NOW).allowed
    denied(env.decide(k.request(token), now=NOW + 100), Reason.TOKEN_EXPIRED)
    denied(env.decide(k.request(token), now=NOW - 31), Reason.TOKEN_NOT_YET_VALID)
    claims = minted(env, env.decide(k.request(token), now=NOW + 50))
    assert claims["exp"] == int(NOW) + 80
    assert claims["iat"] == int(NOW) + 50


def test_cached_subject_is_re_authorized_for_each_request(env: Env) -> None:
    """The cache holds authentication only; caller, path and rule are decided every time."""
    token = env.token()
    assert env.ask(token).allowed
    denied(env.ask(token, principal=k.CHECKOUT), Reason.NO_RULE)
    denied(env.ask(token, path="/v1/customers/%2F"), Reason.PATH_INVALID)
    denied(env.ask(token, principal=OTHER_TD), Reason.WORKLOAD_UNTRUSTED)


def test_a_new_snapshot_does_not_trust_what_the_old_one_verified(env: Env) -> None:
    """After a reload that drops the issuer's key, a token verified before is refused."""
    token = env.token()
    assert env.ask(token).allowed
    rotated = k.snapshot_in_memory(env.snap.policy, {k.IDP_ID: Idp(k.IDP_ISS)}, [env.key])
    denied(decide(k.request(token), rotated, NOW, k.Ids()), Reason.KEY_UNKNOWN)
    assert env.ask(token).allowed


def test_a_failed_verification_is_not_remembered_as_success(env: Env) -> None:
    head, _, sig = env.token().split(".")
    forged = f"{head}.{k.b64json(k.subject_claims(scope='profile.read admin'))}.{sig}"
    for _ in range(2):
        denied(env.ask(forged), Reason.SIGNATURE_INVALID)
