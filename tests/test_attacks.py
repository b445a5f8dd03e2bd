"""One test per known attack on a token-exchange sidecar, each run through both fronts.

Organised by ATTACK (RFC 8725 and its revision, REFERENCE.md "JWT attacks", "XFCC", "SPIFFE"),
not by module: each test names the attack and the defence that stops it. Every request goes
through ``edgekit``'s round trip, once per front: the wire request Envoy would send the gRPC
front (a CheckRequest) or the HTTP front (``/check`` + the path, the forwarded headers, the XFCC
element Envoy sets), the edge's parse, ``decide()``, the edge's answer, and that answer as
Envoy applies it. Every attack must end in a deny with the documented reason code
(docs/policy.md "Reason codes") and status, with nothing minted or injected and nothing let
through to the upstream (``edgekit.refused``). Where a case is a deliberate ACCEPT (a
documented decision), the test says so and checks that the one token the upstream receives is
the narrow one decide() minted (``edgekit.passed``). Where the two fronts must differ because
Envoy hands them different facts (XFCC), the test says why.

The Snapshot is built in memory by ``corekit.make_world`` (the policy compiled, issuer keys from
a demo ``Idp``'s JWKS through ``parse_jwks``, our key from ``generate_signing_key``, paired by
``loader.assemble``). No file, clock or network is used: an autouse fixture makes any socket
use fail the test.
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

import corekit as k
import pytest
from corekit import (
    CHECKOUT,
    EXCHANGE_ISS,
    HOST,
    IDP_AUD,
    IDP_ISS,
    NOW,
    ORDERS,
    PAYMENTS,
    PROFILE,
    World,
    b64json,
    b64url,
    hmac_token,
    sign_parts,
    sign_raw,
)
from edgekit import ENVOY_ID, FRONTS, XFCC, passed, refused, send

from extauthz.decision.jose import (
    IssuerKeys,
    SigningKey,
    generate_issuer_key,
    generate_signing_key,
    jwks_document,
)
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp

GATEWAY = "spiffe://cluster.local/ns/edge/sa/gateway"
EVIL = "spiffe://cluster.local/ns/guest/sa/evil"
CUSTOMER = "/v1/customers/42"
DEFAULT_SCOPE = "profile.read charges.read"


def attack_policy(
    *,
    algorithms: tuple[str, ...] | list[str] = ("ES256",),
    token_types: list[str] | None = None,
    trusted_hops: tuple[str, ...] | list[str] = (),
    reexchange: bool = False,
    max_token_bytes: int | None = None,
) -> dict[str, Any]:
    """The attack suite's policy: two rules on one host, so a request that is confused about its
    path visibly lands on the wrong rule (different audience) instead of merely being allowed.
    The issuer's JWKS file is never read: keys are passed in memory."""
    profile = k.rule_doc("orders-read-profile", audience=PROFILE)
    if reexchange:
        profile["reexchange"] = True
    charges = k.rule_doc(
        "orders-list-charges",
        paths=["/v1/charges"],
        audience=PAYMENTS,
        require=["charges.read"],
        scopes=["charges.read"],
    )
    exchange = {} if max_token_bytes is None else {"maxTokenBytes": max_token_bytes}
    return k.policy_doc(
        [profile, charges],
        trusted_hops=trusted_hops,
        issuers=[k.issuer_doc(algorithms=algorithms, token_types=token_types)],
        exchange=exchange,
    )


def make_world(
    doc: dict[str, Any] | None = None,
    *,
    idp: Idp | None = None,
    jwks: dict[str, Any] | None = None,
    issuer_keys: dict[str, IssuerKeys] | None = None,
    **policy_kw: Any,
) -> World:
    """A World on ``doc`` (default the attack policy) whose subject tokens hold the scopes of
    both rules."""
    doc = doc if doc is not None else attack_policy(**policy_kw)
    return k.make_world(doc, idp=idp, jwks=jwks, issuer_keys=issuer_keys, scope=DEFAULT_SCOPE)


@pytest.fixture(scope="module", params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    """The front every request of a test goes through: gRPC or HTTP."""
    return str(request.param)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def hop_world() -> World:
    return make_world(trusted_hops=[GATEWAY])


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in a decision may touch the network (jku/x5u are never fetched, for one)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access during a decision: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_attack_world_allows_the_honest_request(front: str, world: World) -> None:
    """Control: the baseline request is allowed, so every deny below is the attack's doing;
    the subject token, also sent in other credential headers, is replaced or removed on the
    way to the upstream (the HTTP front never sees those headers: it lists them all in
    x-envoy-auth-headers-to-remove)."""
    token = world.token()
    extra = {"x-forwarded-access-token": token, "proxy-authorization": f"Bearer {token}"}
    result = send(world, front, token, headers=extra)
    claims = passed(result, "orders-read-profile")
    assert claims["aud"] == PROFILE
    assert claims["scope"] == "profile.read"
    assert set(extra) <= set(result.upstream_removed)
    assert result.upstream is not None and all(token not in v for _, v in result.upstream)


# --- alg: none, HMAC confusion, key/algorithm mismatch --------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "AA", "c2ln"])
def test_alg_none_any_case(front: str, world: World, alg: str, signature: str) -> None:
    """Attack: an unsecured JWS (`alg: none`, any letter case). Defence: `alg` must be in the
    issuer's list (asymmetric only); with an empty signature the compact form is malformed."""
    token = f"{b64json({'alg': alg, 'typ': 'at+jwt'})}.{b64json(world.claims())}.{signature}"
    expected = Reason.TOKEN_MALFORMED if signature == "" else Reason.ALGORITHM_NOT_ALLOWED
    refused(send(world, front, token), expected)


# Every serialisation k.public_key_secrets has for the IdP's EC P-256 key.
PUBLIC_KEY_FORMATS = ["pem-spki", "der-spki", "jwk", "jwk-compact", "jwks", "openssh"]


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("fmt", PUBLIC_KEY_FORMATS)
@pytest.mark.parametrize("with_kid", [True, False])
def test_hmac_signed_with_the_issuers_public_key(
    front: str, world: World, alg: str, fmt: str, with_kid: bool
) -> None:
    """Attack: algorithm confusion, the issuer's PUBLIC key (PEM, DER, JWK, JWKS JSON or OpenSSH)
    used as an HMAC secret. Defence: HMAC is in no issuer's list and not even in our algorithm
    table."""
    header: dict[str, Any] = {"alg": alg, "typ": "at+jwt"}
    if with_kid:
        header["kid"] = world.idp.key.kid
    token = hmac_token(alg, header, world.claims(), k.public_key_secrets(world.idp.key)[fmt])
    refused(send(world, front, token), Reason.ALGORITHM_NOT_ALLOWED)


MULTI_ALGS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")


@pytest.fixture(scope="module")
def multi_world() -> World:
    """An issuer that lists several algorithms but publishes only an EC P-256 key, without a
    declared `alg` in its JWK: only the key TYPE says what the key may be used for."""
    idp = Idp(IDP_ISS)
    jwk = {k: v for k, v in idp.key.public_jwk.items() if k != "alg"}
    return make_world(idp=idp, jwks={"keys": [jwk]}, algorithms=MULTI_ALGS)


@pytest.mark.parametrize(
    ("alg", "signer"),
    [("RS256", "RS256"), ("PS256", "PS256"), ("ES384", "ES384"), ("EdDSA", "EdDSA")],
)
@pytest.mark.parametrize("with_kid", [True, False])
def test_key_of_one_type_with_another_algorithm(
    front: str, multi_world: World, alg: str, signer: str, with_kid: bool
) -> None:
    """Attack: one key used with another algorithm (EC P-256 key, header RS256 / PS256 / ES384 /
    EdDSA; the attacker signs with a key of that algorithm's type). Defence: a key is only a
    candidate for the algorithms its type and curve allow (P-256: ES256 only)."""
    attacker = generate_issuer_key(signer)
    header: dict[str, Any] = {"alg": alg, "typ": "at+jwt"}
    if with_kid:
        header["kid"] = multi_world.idp.key.kid  # the issuer's EC key
    refused(
        send(multi_world, front, sign_raw(attacker, header, multi_world.claims())),
        Reason.KEY_UNKNOWN,
    )
    # the issuer's own key still works for the one algorithm it is for
    passed(send(multi_world, front, multi_world.token()), "orders-read-profile")


def test_algorithm_the_issuer_does_not_list_even_with_a_real_key(front: str) -> None:
    """Attack: the issuer lists ES256 only but its JWKS also holds an ES384 key; a token is
    signed ES384 with that real key and names its kid. Defence: the issuer's `algorithms` list
    is checked before any key is chosen, so a published key cannot widen it."""
    idp = Idp(IDP_ISS)
    es384 = generate_issuer_key("ES384")
    w = make_world(idp=idp, jwks=jwks_document([idp.key, es384]), algorithms=["ES256"])
    header = {"alg": "ES384", "kid": es384.kid, "typ": "at+jwt"}
    refused(send(w, front, sign_raw(es384, header, w.claims())), Reason.ALGORITHM_NOT_ALLOWED)
    passed(send(w, front, w.token()), "orders-read-profile")


# --- kid injection and attacker-supplied keys -----------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "../../etc/passwd",
        "../../../../dev/null",
        "/dev/null",
        "' OR 1=1 --",
        "x' UNION SELECT 'secret",
        "| cat /etc/passwd",
        "$(id)",
        "",
        "\u0000",
    ],
)
def test_kid_injection(front: str, world: World, kid: str) -> None:
    """Attack: a `kid` carrying a path or an injection payload. Defence: kid is only a key into
    the issuer's in-memory JWKS dict; never a file name, query or command."""
    refused(send(world, front, world.raw(world.header(kid=kid))), Reason.KEY_UNKNOWN)


def test_kid_very_long(front: str) -> None:
    """Attack: a 10,000-character kid. Defence: the token size limit refuses it before it is
    decoded; with the limit raised, the kid is simply unknown."""
    kid = "k" * 10_000
    small = make_world()
    refused(send(small, front, small.raw(small.header(kid=kid))), Reason.TOKEN_TOO_LARGE)
    large = make_world(max_token_bytes=65536)
    refused(send(large, front, large.raw(large.header(kid=kid))), Reason.KEY_UNKNOWN)


@pytest.mark.parametrize("kid", [1, 1.5, True, None, ["kid"], {"kid": "x"}])
def test_kid_not_a_string(front: str, world: World, kid: Any) -> None:
    """Attack: a non-string kid (type confusion in a key lookup). Defence: kid must be a string
    (or absent); JSON null counts as absent and then the issuer's keys are tried by type."""
    token = world.raw(world.header(kid=kid))
    if kid is None:
        passed(
            send(world, front, token), "orders-read-profile"
        )  # null kid == no kid: still verified
    else:
        refused(send(world, front, token), Reason.TOKEN_MALFORMED)


def _attacker_headers(attacker: SigningKey) -> list[dict[str, Any]]:
    cert = base64.b64encode(b"attacker certificate DER").decode()
    return [
        {"jwk": dict(attacker.public_jwk)},
        {"jku": "https://attacker.example/jwks.json"},
        {"jku": "http://127.0.0.1:1/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"x5c": [cert]},
        {
            "jwk": dict(attacker.public_jwk),
            "jku": "https://attacker.example/jwks.json",
            "x5u": "https://attacker.example/cert.pem",
            "x5c": [cert],
        },
    ]


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("kid", ["none", "attacker", "issuer"])
def test_embedded_or_remote_attacker_keys(front: str, world: World, index: int, kid: str) -> None:
    """Attack: `jwk` / `jku` / `x5u` / `x5c` headers pointing the verifier at the ATTACKER's
    key, with the token signed by that key. Defence: keys come only from the issuer's configured
    JWKS; those headers are never read and nothing is fetched (the socket layer is disabled)."""
    attacker = generate_signing_key()
    header: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", **_attacker_headers(attacker)[index]}
    if kid == "attacker":
        header["kid"] = attacker.kid
    elif kid == "issuer":
        header["kid"] = world.idp.key.kid
    result = send(world, front, sign_raw(attacker, header, world.claims()))
    expected = Reason.KEY_UNKNOWN if kid == "attacker" else Reason.SIGNATURE_INVALID
    refused(result, expected)


# --- crit / b64 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"]},
        {"crit": ["urn:example:unknown"], "urn:example:unknown": True},
        {"crit": []},
        {"crit": "b64"},
        {"crit": ["b64"], "b64": False},
        {"crit": ["b64"], "b64": True},
    ],
)
def test_crit_headers_are_refused(front: str, world: World, extra: dict[str, Any]) -> None:
    """Attack: a `crit` header listing extensions the verifier must understand (RFC 7515
    4.1.11), among them RFC 7797 `b64: false`. Defence: we implement no JWS extension, so any
    `crit` at all is refused (header_unsupported), validly signed or not."""
    refused(send(world, front, world.raw(world.header(**extra))), Reason.HEADER_UNSUPPORTED)


def test_b64_false_unencoded_payload_is_not_understood(front: str, world: World) -> None:
    """Attack: RFC 7797 unencoded payload (`b64: false`) without `crit`, signed over the RAW
    payload as RFC 7797 defines. Defence: `b64` is ignored, so the payload segment must still be
    base64url JSON and the signature is checked over the encoded form: it cannot verify."""
    payload = json.dumps(world.claims(), separators=(",", ":"))
    head = b64json(world.header(b64=False))
    signature = sign_parts(world.idp.key, head, payload).rsplit(".", 1)[1]
    # As transmitted with a detached payload (RFC 7797 section 5.2): header..signature.
    refused(send(world, front, f"{head}..{signature}"), Reason.TOKEN_MALFORMED)
    # Re-attached in base64url form, the RFC 7797 signature does not cover it.
    encoded = f"{head}.{b64url(payload.encode())}.{signature}"
    refused(send(world, front, encoded), Reason.SIGNATURE_INVALID)


# --- issuer and audience --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iss",
    [
        "https://idp.example.com.evil",  # prefix match
        "https://idp.example.com.evil.com",
        "https://evil.example/https://idp.example.com",  # suffix match
        "https://idp.example.com/",  # trailing slash
        "https://idp.example.com/realms/x",
        "https://IDP.example.com",  # case
        "HTTPS://idp.example.com",
        "https://idp.\u0435xample.com",  # Cyrillic 'е' look-alike
        "https://idp.example.com\u200b",  # zero-width space
        " https://idp.example.com",
        "https://idp.example.com ",
        "http://idp.example.com",
        "idp.example.com",
        "https://exchange.shop.svc.evil",  # look-alike of our own issuer
    ],
)
def test_issuer_partial_or_look_alike(front: str, world: World, iss: str) -> None:
    """Attack: an `iss` that only resembles a trusted issuer (prefix, suffix, trailing slash,
    case, Unicode look-alike). Defence: the issuer is found by exact string equality only."""
    refused(send(world, front, world.token(iss=iss)), Reason.ISSUER_UNTRUSTED)


@pytest.mark.parametrize("iss", [None, ["https://idp.example.com"], {"iss": IDP_ISS}, 1])
def test_issuer_missing_or_not_a_string(front: str, world: World, iss: Any) -> None:
    """Attack: `iss` absent or of another JSON type (hoping a list "contains" the issuer).
    Defence: `iss` must be a string (claim_invalid)."""
    refused(send(world, front, world.token(iss=iss)), Reason.CLAIM_INVALID)


@pytest.mark.parametrize(
    "aud",
    [
        "https://other.example.com",  # a token for another system
        "https://shop.example.com/",  # partial match
        "https://shop.example.com.evil",
        PROFILE,  # the downstream's own audience (a minted-looking aud)
        [],  # empty list
        ["https://other.example.com", "https://x.example"],
        [IDP_AUD, 1],  # ours, plus a non-string
        {"aud": IDP_AUD},
        7,
    ],
)
def test_audience_for_another_system(front: str, world: World, aud: Any) -> None:
    """Attack: cross-audience replay (a token issued for another system), or an `aud` of the
    wrong shape. Defence: `aud` (string or list of strings) must name one of the issuer's
    configured audiences exactly."""
    refused(send(world, front, world.token(aud=aud)), Reason.AUDIENCE_MISMATCH)


def test_audience_missing(front: str, world: World) -> None:
    """Attack: a token with no `aud` at all. Defence: `aud` is required."""
    refused(send(world, front, world.token(aud=None)), Reason.AUDIENCE_MISMATCH)


def test_audience_list_containing_ours_among_others_is_accepted(front: str, world: World) -> None:
    """DECISION: an `aud` list that contains our audience among others is ACCEPTED (RFC 7519
    4.1.3: the recipient must identify itself with a value in the list). What is minted still
    carries exactly the rule's one audience, never the subject token's list."""
    aud = ["https://other.example.com", IDP_AUD, "https://third.example"]
    claims = passed(send(world, front, world.token(aud=aud)), "orders-read-profile")
    assert claims["aud"] == PROFILE
    assert isinstance(claims["aud"], str)


# --- time -----------------------------------------------------------------------------------------


LEEWAY = 30


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(NOW) - LEEWAY - 1}, Reason.TOKEN_EXPIRED),
        ({"exp": int(NOW) - 86_400, "iat": int(NOW) - 90_000}, Reason.TOKEN_EXPIRED),
        ({"exp": 0, "iat": None}, Reason.TOKEN_EXPIRED),
        ({"exp": -1, "iat": None}, Reason.TOKEN_EXPIRED),
        ({"nbf": int(NOW) + LEEWAY + 1}, Reason.TOKEN_NOT_YET_VALID),
        ({"iat": int(NOW) + LEEWAY + 1}, Reason.TOKEN_NOT_YET_VALID),
        ({"iat": int(NOW) + 86_400, "exp": int(NOW) + 90_000}, Reason.TOKEN_NOT_YET_VALID),
        ({"exp": None}, Reason.CLAIM_INVALID),
        ({"exp": str(int(NOW) + 600)}, Reason.CLAIM_INVALID),
        ({"exp": True}, Reason.CLAIM_INVALID),
        ({"nbf": "0"}, Reason.CLAIM_INVALID),
        ({"iat": [int(NOW)]}, Reason.CLAIM_INVALID),
    ],
)
def test_token_lifetime_attacks(
    front: str, world: World, claims: dict[str, Any], reason: Reason
) -> None:
    """Attack: expired tokens, tokens not yet valid (`nbf`, or `iat` in the future beyond the
    leeway), a token without `exp` (one that never expires), time claims of the wrong type.
    Defence: numeric `exp` required and checked with the leeway; `nbf`/`iat` not in the future."""
    refused(send(world, front, world.token(**claims)), reason)


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_nbf_and_iat_within_the_leeway_are_accepted(front: str, world: World, name: str) -> None:
    """DECISION: clock skew up to `exchange.leeway` (30 s default) is tolerated."""
    skewed: dict[str, Any] = {name: int(NOW) + LEEWAY}
    passed(send(world, front, world.token(**skewed)), "orders-read-profile")


def test_cached_token_replayed_after_expiry(front: str) -> None:
    """Attack: a token verified once (and cached by its text) is replayed after it expired.
    Defence: the subject cache remembers only time-independent checks; exp is re-checked."""
    w = make_world()
    token = w.token(exp=int(NOW) + 60)
    passed(send(w, front, token), "orders-read-profile")
    assert w.cache is not None and len(w.cache) == 1
    refused(send(w, front, token, now=NOW + 60 + LEEWAY + 1), Reason.TOKEN_EXPIRED)


# --- claims ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": None},
        {"sub": ""},
        {"sub": 42},
        {"sub": ["user-1"]},
        {"sub": {"id": "user-1"}},
        {"sub": "u" * 1025},
        {"scope": ["profile.read"]},
        {"scope": 1},
        {"scope": {"profile.read": True}},
        {"scope": 'profile.read "x"'},
        {"scope": "profile.read\\admin"},
        {"scope": None, "scp": "profile.read"},
        {"scope": None, "scp": ["profile.read", 1]},
        {"act": "spiffe://cluster.local/ns/shop/sa/orders"},
        {"act": {"sub": 1}},
        {"may_act": "spiffe://cluster.local/ns/shop/sa/orders"},
    ],
)
def test_malformed_claims(front: str, world: World, claims: dict[str, Any]) -> None:
    """Attack: claims of the wrong type or shape (missing/non-string `sub`, `scope` that is not
    a space-separated string, `act`/`may_act` that are not objects). Defence: claim_invalid."""
    refused(send(world, front, world.token(**claims)), Reason.CLAIM_INVALID)


def test_may_act_naming_someone_else(front: str, world: World) -> None:
    """Attack: a caller exchanges a token whose `may_act` delegates to another workload.
    Defence: `may_act.sub` must equal the calling workload (actor_not_permitted)."""
    for may_act in ({"sub": CHECKOUT}, {"sub": ORDERS + "x"}, {"iss": EXCHANGE_ISS}, {}):
        refused(send(world, front, world.token(may_act=may_act)), Reason.ACTOR_NOT_PERMITTED)
    passed(send(world, front, world.token(may_act={"sub": ORDERS})), "orders-read-profile")


def _act_chain(depth: int) -> dict[str, Any]:
    act: dict[str, Any] = {"sub": "spiffe://cluster.local/ns/x/sa/a0"}
    for i in range(1, depth):
        act = {"sub": f"spiffe://cluster.local/ns/x/sa/a{i}", "act": act}
    return act


@pytest.mark.parametrize("depth", [9, 10, 50])
def test_deeply_nested_act(front: str, world: World, depth: int) -> None:
    """Attack: a delegation chain nested deeper than anyone audits (or deep enough to hurt a
    recursive reader). Defence: `act` depth is bounded at 8 (claim_invalid beyond)."""
    refused(send(world, front, world.token(act=_act_chain(depth))), Reason.CLAIM_INVALID)


def test_act_at_the_depth_limit_is_accepted(front: str, world: World) -> None:
    """Boundary: exactly 8 levels is accepted, and nested under the caller in the minted act."""
    claims = passed(send(world, front, world.token(act=_act_chain(8))), "orders-read-profile")
    assert claims["act"]["sub"] == ORDERS
    assert claims["act"]["act"] == _act_chain(8)


# --- token kinds and replay of our own tokens -----------------------------------------------------


@pytest.fixture(scope="module")
def minted_token(front: str, world: World) -> str:
    """A token this exchange minted, as it reached the upstream through ``front``."""
    result = send(world, front, world.token())
    passed(result, "orders-read-profile")
    assert result.token is not None
    return result.token


@pytest.mark.parametrize(
    ("principal", "path"),
    [
        (ORDERS, CUSTOMER),  # the caller it was minted for, same request
        (ORDERS, "/v1/charges"),  # the same caller, another rule
        (PROFILE, CUSTOMER),  # its audience, forwarding it as a subject token
        (CHECKOUT, CUSTOMER),  # anybody else who stole it
    ],
)
def test_minted_token_replayed_as_a_subject_token(
    front: str, world: World, minted_token: str, principal: str, path: str
) -> None:
    """Attack: a token this exchange minted is presented back as a subject token (to launder it
    into a new token, or to reach another rule). Defence: no rule allows re-exchange, so it is
    reexchange_denied."""
    refused(
        send(world, front, minted_token, principal=principal, path=path), Reason.REEXCHANGE_DENIED
    )


def test_minted_token_replayed_by_its_caller_where_reexchange_is_allowed(front: str) -> None:
    """Attack: even on a rule with `reexchange: true`, the ORIGINAL caller presents the token it
    received. Defence: a minted token is only re-exchanged by the workload it was minted for
    (its `aud`), never by the one that asked for it."""
    w = make_world(reexchange=True)
    minted = send(w, front, w.token())
    assert minted.token is not None
    refused(send(w, front, minted.token), Reason.REEXCHANGE_DENIED)


def test_token_claiming_our_issuer_signed_by_someone_else(front: str, world: World) -> None:
    """Attack: a token with `iss` = the exchange, signed by another key (the IdP's, whose kid is
    not ours). Defence: tokens claiming our issuer verify only against our own keys."""
    token = world.idp.key.sign(world.claims(iss=EXCHANGE_ISS, aud=ORDERS), "at+jwt")
    refused(send(world, front, token), Reason.KEY_UNKNOWN)
    forger = generate_signing_key()
    header = {"alg": "ES256", "kid": world.signing.kid, "typ": "at+jwt"}
    refused(
        send(world, front, sign_raw(forger, header, world.claims(iss=EXCHANGE_ISS, aud=ORDERS))),
        Reason.SIGNATURE_INVALID,
    )


@pytest.mark.parametrize(
    "typ",
    [
        "txntoken+jwt",
        "application/txntoken+jwt",
        "secevent+jwt",
        "dpop+jwt",
        "id+jwt",
        "logout+jwt",
        "JOSE",
        "",
        7,
    ],
)
def test_token_of_another_type(front: str, world: World, typ: Any) -> None:
    """Attack: cross-JWT confusion, a validly signed token of another kind (transaction token,
    SET, DPoP proof, ...) presented as an access token. Defence: `typ` must be one of the
    issuer's tokenTypes (token_type_invalid)."""
    refused(send(world, front, world.raw(world.header(typ=typ))), Reason.TOKEN_TYPE_INVALID)


def test_minted_at_jwt_presented_to_an_issuer_that_accepts_only_jwt(front: str) -> None:
    """Attack: a token one exchange minted (`typ: at+jwt`) is presented to a second exchange
    that trusts the first one's issuer for plain JWTs only (`tokenTypes: [JWT]`). Defence: the
    typ check refuses it (token_type_invalid); accepting `at+jwt` there is an explicit choice."""
    first = make_world()
    minted = send(first, front, first.token())
    assert minted.token is not None

    def second(token_types: list[str]) -> World:
        doc = attack_policy(token_types=token_types)
        doc["exchange"]["issuer"] = "https://exchange-b.shop.svc"
        doc["trustedIssuers"][0].update(issuer=EXCHANGE_ISS, audiences=[PROFILE])
        doc["rules"][0]["match"]["workloads"] = [PROFILE]
        return make_world(doc, idp=first.idp, jwks=jwks_document([first.signing]))

    strict = second(["JWT"])
    refused(send(strict, front, minted.token, principal=PROFILE), Reason.TOKEN_TYPE_INVALID)
    # Control: the same token passes that check where at+jwt is accepted.
    lax = second(["JWT", "at+jwt"])
    passed(send(lax, front, minted.token, principal=PROFILE), "orders-read-profile")


# --- serialisation and the Authorization header ---------------------------------------------------


def _malformed_tokens(w: World) -> dict[str, str]:
    good = w.token()
    head, body, sig = good.split(".")
    dup_header = b64url(b'{"alg":"ES256","kid":"%s","alg":"none"}' % w.idp.key.kid.encode())
    dup_claims = json.dumps(w.claims())[:-1] + ', "sub": "admin"}'
    nan_header = b64url(b'{"alg":NaN}')
    non_utf8 = json.dumps(w.claims(sub="user-X")).encode().replace(b"user-X", b"user-\xff")
    return {
        "two parts": f"{head}.{body}",
        "four parts": f"{good}.{sig}",
        "five parts (JWE-shaped)": f"{head}.{body}.{sig}.{sig}.{sig}",
        "empty header": f".{body}.{sig}",
        "empty payload": f"{head}..{sig}",
        "only dots": "..",
        "padding in every part": f"{head}==.{body}=.{sig}=",
        "padding in the signature": f"{good}==",
        "standard base64 alphabet": f"{head}.{body}.{sig}+/",
        "tilde": f"{head}.{body}~.{sig}",
        "header not JSON": f"{b64url(b'alg=ES256')}.{body}.{sig}",
        "header a JSON array": f"{b64url(b'[1]')}.{body}.{sig}",
        "header NaN": f"{nan_header}.{body}.{sig}",
        "duplicate alg in header": sign_parts(w.idp.key, dup_header, body),
        "duplicate sub in payload": sign_parts(w.idp.key, head, b64url(dup_claims.encode())),
        "non-UTF-8 payload": sign_parts(w.idp.key, head, b64url(non_utf8)),
        "UTF-16 payload": sign_parts(
            w.idp.key, head, b64url(json.dumps(w.claims()).encode("utf-16"))
        ),
        "bad base64 length": f"{head}.{body}A.{sig}",
    }


MALFORMED = [
    "two parts",
    "four parts",
    "five parts (JWE-shaped)",
    "empty header",
    "empty payload",
    "only dots",
    "padding in every part",
    "padding in the signature",
    "standard base64 alphabet",
    "tilde",
    "header not JSON",
    "header a JSON array",
    "header NaN",
    "duplicate alg in header",
    "duplicate sub in payload",
    "non-UTF-8 payload",
    "UTF-16 payload",
    "bad base64 length",
]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_compact_serialisation(front: str, world: World, case: str) -> None:
    """Attack: a token that different parsers read differently (wrong part count, empty parts,
    padding, another base64 alphabet, duplicate JSON keys, non-UTF-8 or non-JSON content).
    Defence: one strict parser, run before anything is trusted (token_malformed)."""
    tokens = _malformed_tokens(world)
    assert set(tokens) == set(MALFORMED)
    refused(send(world, front, tokens[case]), Reason.TOKEN_MALFORMED)


@pytest.mark.parametrize(
    "value",
    [
        "Bearer {tok},Bearer {tok}",  # two Authorization headers, as Envoy joins them
        "Bearer {tok}, Bearer {tok}",
        "Bearer {tok},Bearer {other}",
        "Bearer {tok},{other}",
        "Bearer  {tok}",  # two spaces
        "Bearer {tok} ",  # trailing space
        " Bearer {tok}",  # leading space
        "Bearer\t{tok}",
        "Bearer {tok}\n",
        "Bearer\n{tok}",
        "Basic dXNlcjpwYXNzd29yZA==",
        "Basic {tok}",
        "Token {tok}",
        "DPoP {tok}",
        "{tok}",  # no scheme at all
        "Bearer",
        "Bearer ",
        "Bearer {head} .{rest}",  # whitespace inside the token
        "Bearer {head}\t.{rest}",
        'Bearer {{"payload":"{body}","signatures":[{{"protected":"{head}","signature":"AA"}}]}}',
        'Bearer {{"payload":"{body}","protected":"{head}","signature":"AA"}}',
    ],
)
def test_authorization_header_confusion(front: str, world: World, value: str) -> None:
    """Attack: more than one credential, another scheme, stray whitespace, a JWS JSON
    serialisation, hoping that we and the upstream pick different tokens. Defence: exactly one
    `Bearer <compact JWS>` in one header, nothing else (token_malformed)."""
    tok, other = world.token(), world.token(sub="user-2")
    head, _, _ = tok.partition(".")
    rest = tok[len(head) + 1 :]
    body = tok.split(".")[1]
    authorization = value.format(tok=tok, other=other, head=head, rest=rest, body=body)
    refused(send(world, front, authorization=authorization), Reason.TOKEN_MALFORMED)


def _two_authorization_lines(world: World) -> list[tuple[str, str]]:
    return [
        ("authorization", f"Bearer {world.token()}"),
        ("Authorization", f"Bearer {world.token(sub='x')}"),
    ]


def test_two_authorization_headers_through_the_edge(front: str, world: World) -> None:
    """Attack: two Authorization header lines, hoping one reader takes the first and another
    the second. Defence: Envoy joins them with ',' (in the gRPC `headers` map, and in the one
    line the HTTP front gets), and the joined value is not one bearer token."""
    result = send(world, front, headers=_two_authorization_lines(world))
    refused(result, Reason.TOKEN_MALFORMED)


def test_two_authorization_headers_apart_in_the_header_map(world: World) -> None:
    """The same on gRPC with `encode_raw_headers`, which keeps them apart in `header_map`: the
    gRPC edge joins them like Envoy does, so it is refused alike."""
    result = send(world, "grpc", headers=_two_authorization_lines(world), raw_headers=True)
    assert len(result.wire_request.attributes.request.http.header_map.headers) > 2
    refused(result, Reason.TOKEN_MALFORMED)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_in_another_case_is_accepted(front: str, world: World, scheme: str) -> None:
    """DECISION: the auth-scheme is case-insensitive (RFC 7235 2.1), so `bearer <tok>` is
    accepted; only the scheme's case is relaxed, nothing else about the header."""
    passed(send(world, front, authorization=f"{scheme} {world.token()}"), "orders-read-profile")


@pytest.mark.parametrize(
    "header",
    ["x-access-token", "x-forwarded-access-token", "proxy-authorization", "txn-token", "cookie"],
)
def test_token_in_another_header_only(front: str, world: World, header: str) -> None:
    """Attack: the credential is put somewhere other than Authorization, hoping a lax reader
    picks it up. Defence: only `authorization` is read (token_missing)."""
    value = f"Bearer {world.token()}" if header != "cookie" else f"access_token={world.token()}"
    refused(send(world, front, headers={header: value}), Reason.TOKEN_MISSING)


def test_oversized_token(front: str, world: World) -> None:
    """Attack: a huge token (memory and CPU before the signature check). Defence: anything over
    `exchange.maxTokenBytes` (8192 by default) is refused unparsed (token_too_large), and a
    header section over the edges' limit is refused before decide() (request_too_large)."""
    limit = world.snap.policy.exchange.max_token_bytes
    assert limit == 8192
    padded = world.token(pad="x" * 9000)
    assert len(padded) > limit
    refused(send(world, front, padded), Reason.TOKEN_TOO_LARGE)
    refused(send(world, front, authorization="Bearer " + "A" * (limit + 1)), Reason.TOKEN_TOO_LARGE)
    # 200 kB of header: both edges refuse a header section over 64 KiB before anything reads it
    # (Envoy itself would answer 431 first, at its default 60 KiB).
    huge = send(world, front, authorization="Bearer " + "A." * 100_000)
    refused(huge, Reason.REQUEST_TOO_LARGE)


def test_a_flood_of_headers(front: str, world: World) -> None:
    """Attack: hundreds of headers, to make the sidecar parse and copy them all. Defence, gRPC:
    the edge reads at most 200 headers (request_too_large beyond). HTTP: Envoy forwards only
    the headers allowed_headers names, so the flood never reaches the sidecar and the check is
    the honest one it carries. (Envoy's own default, 100 headers, refuses either before.)"""
    flood = [(f"x-h{i}", "v") for i in range(201)]
    result = send(world, front, world.token(), headers=flood)
    if front == "grpc":
        refused(result, Reason.REQUEST_TOO_LARGE)
    else:
        assert len(result.wire_request.headers) <= 4
        passed(result, PROFILE_RULE)


def test_deeply_nested_json_in_an_unverified_token(front: str, world: World) -> None:
    """Attack: JSON nested thousands deep (recursion exhaustion in the parser). Defence: the
    size limit and a parser that turns RecursionError into token_malformed."""
    big = make_world(max_token_bytes=65536)
    body = b64url(b"[" * 20_000 + b"]" * 20_000)
    token = f"{b64json({'alg': 'ES256'})}.{body}.AA"
    assert len(token) < 65536
    refused(send(big, front, token), Reason.TOKEN_MALFORMED)


# --- another trusted issuer ----------------------------------------------------------------------


def test_token_of_a_trusted_issuer_the_rule_does_not_accept(front: str) -> None:
    """Attack: a second, less trusted issuer (a partner IdP the policy trusts for other rules)
    mints a token for a rule that accepts only the corporate IdP; or signs a token that CLAIMS
    the corporate `iss` with its own key. Defence: rules name their issuers, and a token is
    verified only with the keys of the issuer its `iss` names."""
    corp, partner = Idp(IDP_ISS), Idp("https://partner.example.org", alg="EdDSA")
    doc = attack_policy()
    doc["trustedIssuers"].append(
        k.issuer_doc(
            ident="partner-idp",
            issuer=partner.issuer,
            jwks_file="issuers/partner.json",
            algorithms=["EdDSA"],
        )
    )
    keys = {k.IDP_ID: k.issuer_keys(corp), "partner-idp": k.issuer_keys(partner)}
    w = make_world(doc, idp=corp, issuer_keys=keys)
    partner_token = partner.key.sign(w.claims(iss=partner.issuer), "at+jwt")
    refused(send(w, front, partner_token), Reason.NO_RULE)
    posing = sign_raw(partner.key, {"alg": "EdDSA", "kid": partner.key.kid}, w.claims())
    refused(send(w, front, posing), Reason.ALGORITHM_NOT_ALLOWED)  # corp-idp allows ES256 only
    posing = sign_raw(partner.key, {"alg": "ES256", "kid": partner.key.kid}, w.claims())
    refused(send(w, front, posing), Reason.KEY_UNKNOWN)  # the partner's kid is no corp key
    passed(send(w, front, w.token()), "orders-read-profile")


# --- request line confusion ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "method", "expected"),
    [
        ("PROFILE.shop.svc.cluster.local:8443", "GET", "orders-read-profile"),  # documented
        ("profile.shop.svc.cluster.local.", "GET", "orders-read-profile"),  # FQDN dot
        ("profile.shop.svc.cluster.local.evil.example", "GET", Reason.NO_RULE),
        ("evil.example:profile.shop.svc.cluster.local", "GET", Reason.HOST_INVALID),
        ("profile.shop.svc.cluster.local@evil.example", "GET", Reason.HOST_INVALID),
        ("evil.example/profile.shop.svc.cluster.local", "GET", Reason.HOST_INVALID),
        ("profile.shop.svc.cluster.loca", "GET", Reason.NO_RULE),
        ("prof\u0456le.shop.svc.cluster.local", "GET", Reason.HOST_INVALID),  # Cyrillic i
        ("", "GET", Reason.HOST_INVALID),
        (HOST, "get", Reason.NO_RULE),  # methods compare exactly, upper case
        (HOST, "GET ", Reason.NO_RULE),
        (HOST, "HEAD", Reason.NO_RULE),  # HEAD is not GET
        (HOST, "POST", Reason.NO_RULE),
        (HOST, "", Reason.NO_RULE),
    ],
)
def test_host_and_method_confusion(
    front: str, world: World, host: str, method: str, expected: Any
) -> None:
    """Attack: a Host or method that a lenient matcher would fold onto a rule (suffix and
    userinfo tricks, look-alike letters, lower-case or padded methods). Defence: a host that is
    not one host[:port] is refused (host_invalid); the others are compared exactly after
    removing only the port and a trailing dot, lower-cased; methods are compared exactly."""
    result = send(world, front, world.token(), host=host, method=method)
    if isinstance(expected, Reason):
        refused(result, expected)
    else:
        assert passed(result, expected)["authorization_details"][0]["host"] == HOST


@pytest.mark.parametrize("other", ["evil.example", "payments.shop.svc.cluster.local"])
def test_host_header_beside_the_authority(front: str, world: World, other: str) -> None:
    """Attack: HTTP/2 lets a client send a `host` header beside `:authority`, hoping the
    sidecar checks one and something downstream routes by the other. Defence, gRPC: the
    CheckRequest carries every header, and a `host` that names another host than
    `:authority` is host_invalid. HTTP: Envoy's authorization request has one Host, the
    `:authority` Envoy routes by (`host` is not in allowed_headers), so the check is for that
    host and the extra header never reaches the sidecar; what is minted is bound to it."""
    result = send(world, front, world.token(), headers={"host": other})
    if front == "grpc":
        refused(result, Reason.HOST_INVALID)
    else:
        assert passed(result, PROFILE_RULE)["authorization_details"][0]["host"] == HOST


# --- spoofed workload identity --------------------------------------------------------------------
#
# The caller is what Envoy says it is. gRPC: `source.principal`, with the client's XFCC removed
# by the shipped envoy.yaml (SANITIZE); these tests run the gRPC front with an Envoy that
# forwards XFCC unchanged instead (FORWARD_ONLY, `forward_xfcc=True`), the one setting under
# which `workloads.xfcc.trustedHops` means anything, so the XFCC checks in `identify` are what
# stands between the attack and an allow. HTTP: the one XFCC element the local Envoy sets
# (SANITIZE_SET); whatever XFCC the client (or a hop in front of Envoy) sent never reaches the
# HTTP front, so an XFCC attack there is a request from the peer itself.


def test_xfcc_from_an_untrusted_hop_is_ignored(front: str, hop_world: World) -> None:
    """Attack: a peer that is not a configured trusted hop sends an XFCC header naming a
    privileged workload. Defence: XFCC is ignored; the caller is the mTLS peer itself."""
    xfcc = {"x-forwarded-client-cert": f"By={GATEWAY};URI={ORDERS}"}
    result = send(
        hop_world, front, hop_world.token(), principal=EVIL, headers=xfcc, forward_xfcc=True
    )
    refused(result, Reason.NO_RULE)
    assert result.decision.caller == EVIL


def test_xfcc_ignored_when_no_hop_is_trusted(front: str, world: World) -> None:
    """Attack: the gateway's own (genuine) XFCC, but the policy names no trusted hops.
    Defence: XFCC is off by default; the gateway itself has no rule."""
    xfcc = {"x-forwarded-client-cert": f"By={GATEWAY};URI={ORDERS}"}
    result = send(world, front, world.token(), principal=GATEWAY, headers=xfcc, forward_xfcc=True)
    refused(result, Reason.NO_RULE)
    assert result.decision.caller == GATEWAY


def test_a_trusted_hop_vouches_for_its_client_on_grpc_only(front: str, hop_world: World) -> None:
    """Control, and a difference between the fronts: the gateway (a trusted hop) forwards the
    genuine element it appended for `orders`. gRPC (FORWARD_ONLY): the caller is `orders`,
    allowed, and the minted token is not bound to the gateway's certificate. HTTP: the local
    Envoy's SANITIZE_SET replaced that element with its own, naming the gateway; a trusted hop
    with no element of its own is workload_unidentified, so trusted hops cannot work behind
    the HTTP front, and fail closed."""
    xfcc = {"x-forwarded-client-cert": f"By={GATEWAY};URI={ORDERS}"}
    result = send(
        hop_world, front, hop_world.token(), principal=GATEWAY, headers=xfcc, forward_xfcc=True
    )
    if front == "grpc":
        claims = passed(result, PROFILE_RULE)
        assert claims["act"]["sub"] == ORDERS and "cnf" not in claims
    else:
        refused(result, Reason.WORKLOAD_UNIDENTIFIED)


@pytest.mark.parametrize(
    ("xfcc", "reason"),
    [
        # quoted separators smuggling a second element into one value
        (f'By={GATEWAY};URI="{ORDERS},By={GATEWAY};URI={ORDERS}"', Reason.WORKLOAD_UNIDENTIFIED),
        (f'By={GATEWAY};URI="{ORDERS},By=x"', Reason.WORKLOAD_UNIDENTIFIED),
        (f'By={GATEWAY};URI="{ORDERS};By=x"', Reason.WORKLOAD_UNIDENTIFIED),
        (f'By={GATEWAY};URI="{ORDERS}\\",By={GATEWAY}"', Reason.WORKLOAD_UNIDENTIFIED),
        # an element the client wrote before the hop's own one: the last element is the hop's
        (f"By={GATEWAY};URI={ORDERS},By={GATEWAY};URI={EVIL}", Reason.NO_RULE),
        # the last element was not appended by the hop we are talking to
        (f"By={GATEWAY};URI={EVIL},By={CHECKOUT};URI={ORDERS}", Reason.WORKLOAD_UNIDENTIFIED),
        (f"By={CHECKOUT};URI={ORDERS}", Reason.WORKLOAD_UNIDENTIFIED),
        (f"URI={ORDERS}", Reason.WORKLOAD_UNIDENTIFIED),
        (f"By={GATEWAY}/;URI={ORDERS}", Reason.WORKLOAD_UNIDENTIFIED),
        (f"By={GATEWAY},URI={ORDERS}", Reason.WORKLOAD_UNIDENTIFIED),
        # two identities, or one that is not a valid SPIFFE ID
        (f"By={GATEWAY};URI={ORDERS};URI={EVIL}", Reason.WORKLOAD_UNIDENTIFIED),
        (
            f"By={GATEWAY};URI=spiffe://CLUSTER.local/ns/shop/sa/orders",
            Reason.WORKLOAD_UNIDENTIFIED,
        ),
        (f"By={GATEWAY};URI={ORDERS}/", Reason.WORKLOAD_UNIDENTIFIED),
        (f"By={GATEWAY};URI=spiffe://other.domain/ns/shop/sa/orders", Reason.WORKLOAD_UNTRUSTED),
        ("x" * 20_000, Reason.WORKLOAD_UNIDENTIFIED),  # over the 16 KiB XFCC limit
    ],
)
def test_xfcc_spoofing_through_a_trusted_hop(
    front: str, hop_world: World, xfcc: str, reason: Reason
) -> None:
    """Attack: XFCC tricks through a trusted hop: quoted separators that a naive split would
    turn into a second element, client-written elements before the hop's, an element By another
    proxy, several or invalid URIs. Defence (gRPC): a quote-aware parser; only the LAST element
    counts, only if its `By` is exactly the hop, and only with one valid SPIFFE `URI`. HTTP: the
    forged header never arrives (SANITIZE_SET), and the trusted hop itself is unidentified."""
    result = send(
        hop_world,
        front,
        hop_world.token(),
        principal=GATEWAY,
        headers={"x-forwarded-client-cert": xfcc},
        forward_xfcc=True,
    )
    refused(result, reason if front == "grpc" else Reason.WORKLOAD_UNIDENTIFIED)
    assert result.decision.caller in (None, EVIL)


@pytest.mark.parametrize("forged", [ORDERS, CHECKOUT, PROFILE])
def test_client_sent_xfcc_never_names_the_caller(front: str, world: World, forged: str) -> None:
    """Attack: a workload without a rule sends the XFCC element the local Envoy would write
    for a privileged one (its `By`, a `Hash`, the victim's URI), through the shipped Envoy
    config of each front (gRPC: SANITIZE; HTTP: SANITIZE_SET). Defence: Envoy drops it, and
    the caller is the workload of the client certificate."""
    element = f"By={ENVOY_ID};Hash={'ab' * 32};URI={forged}"
    result = send(world, front, world.token(), principal=EVIL, headers={XFCC: element})
    refused(result, Reason.NO_RULE)
    assert result.decision.caller == EVIL


@pytest.mark.parametrize(
    "principal",
    [
        "spiffe://CLUSTER.local/ns/shop/sa/orders",  # upper-case trust domain
        "spiffe://Cluster.Local/ns/shop/sa/orders",
        "spiffe://cluster.local/ns/shop/sa/orders/",  # trailing slash
        "spiffe://cluster.local/ns/shop/sa/x/../orders",  # dot-dot segment
        "spiffe://cluster.local/ns/shop/./sa/orders",
        "spiffe://cluster.local/ns//shop/sa/orders",  # empty segment
        "spiffe://cluster.local/ns/shop/sa/%6frders",  # percent-encoding
        "spiffe://cluster.local/ns/shop/sa/orders%2F..",
        "spiffe://",  # scheme only
        "spiffe:///ns/shop/sa/orders",  # no trust domain
        "spiffe://user@cluster.local/ns/shop/sa/orders",  # userinfo
        "spiffe://cluster.local:443/ns/shop/sa/orders",  # port
        "spiffe://cluster.local/ns/shop/sa/orders?x=1",  # query
        "spiffe://cluster.local/ns/shop/sa/orders#x",  # fragment
        "spiffe://cluster.local/ns/shop/sa/ordérs",  # non-ASCII
        "http://cluster.local/ns/shop/sa/orders",  # another scheme
        "https://cluster.local/ns/shop/sa/orders",
        "cluster.local/ns/shop/sa/orders",  # Istio's principal spelling
        "CN=orders,O=shop",  # a certificate subject
        "spiffe://cluster.local/" + "a/" * 1100 + "orders",  # over 2048 bytes
        "",
    ],
)
def test_principal_that_is_not_a_valid_spiffe_id(front: str, world: World, principal: str) -> None:
    """Attack: a `source.principal` that only resembles a SPIFFE ID (case, dot segments,
    percent-encoding, trailing slash, another scheme), hoping for a lenient or folding match.
    Defence: strict SPIFFE ID parsing; anything else is workload_unidentified."""
    refused(send(world, front, world.token(), principal=principal), Reason.WORKLOAD_UNIDENTIFIED)


@pytest.mark.parametrize(
    "principal",
    [
        "spiffe://other.domain/ns/shop/sa/orders",
        "spiffe://cluster.local.evil/ns/shop/sa/orders",
        "spiffe://evil.cluster.local/ns/shop/sa/orders",
        "spiffe://cluster.loca/ns/shop/sa/orders",
    ],
)
def test_workload_from_another_trust_domain(front: str, world: World, principal: str) -> None:
    """Attack: a valid SPIFFE ID from a trust domain we do not trust, with the same path as a
    privileged workload (or a look-alike domain). Defence: exact trust domain match
    (workload_untrusted)."""
    refused(send(world, front, world.token(), principal=principal), Reason.WORKLOAD_UNTRUSTED)


# --- path confusion -------------------------------------------------------------------------------
#
# The defence: the sidecar normalises the raw path the way the upstream resolves it (RFC 3986
# dot segments, unreserved percent-escapes decoded, duplicate slashes merged, query and fragment
# dropped) and refuses what has no single safe meaning (escaped separators, ';', '\\', controls,
# non-ASCII). The shipped envoy.yaml makes Envoy do the same before routing (normalize_path,
# merge_slashes, escaped slashes rejected), so an allow is only ever for the rule whose template
# matches the path the upstream routes. Rule `orders-read-profile` is GET /v1/customers/{id}
# (aud profile), `orders-list-charges` GET /v1/charges (aud payments).

PROFILE_RULE = "orders-read-profile"
CHARGES_RULE = "orders-list-charges"

PATH_CASES: list[tuple[str, str | Reason, str]] = [
    # (raw path, expected rule id or deny reason, the path the upstream routes / why)
    ("/v1/customers/42/../../admin", Reason.NO_RULE, "/v1/admin"),
    ("/v1/charges/../customers/42", PROFILE_RULE, "/v1/customers/42"),
    ("/v1/customers/7/../42", PROFILE_RULE, "/v1/customers/42"),
    ("/v1/x/%2e%2e/customers/42", PROFILE_RULE, "/v1/customers/42"),
    ("/v1/x/%2E%2E/customers/42", PROFILE_RULE, "/v1/customers/42"),
    ("/v1/customers/%2E%2E/", Reason.NO_RULE, "/v1/"),
    ("/v1/customers/42/%2e%2e", Reason.NO_RULE, "/v1/customers/"),
    ("/../v1/customers/42", Reason.PATH_INVALID, "climbs above the root"),
    ("/%2e%2e/v1/customers/42", Reason.PATH_INVALID, "climbs above the root"),
    ("/v1/customers/42%2f..%2f..%2fadmin", Reason.PATH_INVALID, "escaped '/'"),
    ("/v1/customers%2F42", Reason.PATH_INVALID, "escaped '/'"),
    ("/v1/customers/42%5c..%5cadmin", Reason.PATH_INVALID, "escaped '\\'"),
    ("/v1\\customers\\42", Reason.PATH_INVALID, "raw '\\'"),
    ("//v1/customers/42", PROFILE_RULE, "/v1/customers/42 (merge_slashes)"),
    ("/v1//customers///42", PROFILE_RULE, "/v1/customers/42 (merge_slashes)"),
    ("/v1/./customers/./42", PROFILE_RULE, "/v1/customers/42"),
    ("/v1/customers/42;x=1", Reason.PATH_INVALID, "';' parameters"),
    ("/v1/customers;/42", Reason.PATH_INVALID, "';' parameters"),
    ("/v1/charges;jsessionid=1", Reason.PATH_INVALID, "';' parameters"),
    ("/v1/customers/42%3b", Reason.PATH_INVALID, "escaped ';'"),
    ("/V1/customers/42", Reason.NO_RULE, "/V1/customers/42 (case-sensitive)"),
    ("/v1/Customers/42", Reason.NO_RULE, "/v1/Customers/42 (case-sensitive)"),
    ("/v1/charges?/v1/customers/42", CHARGES_RULE, "/v1/charges (query dropped)"),
    ("/v1/charges?x=/../customers/42", CHARGES_RULE, "/v1/charges (query dropped)"),
    ("/v1/charges#/v1/customers/42", CHARGES_RULE, "/v1/charges (fragment dropped)"),
    ("/v1/customers/42#/../../admin", PROFILE_RULE, "/v1/customers/42 (fragment dropped)"),
    ("/v1/charges%3F/v1/customers/42", Reason.NO_RULE, "one segment 'charges%3F'"),
    ("/v1/customers/42/", Reason.NO_RULE, "/v1/customers/42/ (trailing slash kept)"),
    ("/v1/customers/", Reason.NO_RULE, "{id} needs a non-empty segment"),
    ("/v1/charges/", Reason.NO_RULE, "/v1/charges/ (trailing slash kept)"),
    ("/v1/customers/42%00", Reason.PATH_INVALID, "escaped NUL"),
    ("/v1/customers/42%00.json", Reason.PATH_INVALID, "escaped NUL"),
    ("/v1/customers/42\x00", Reason.PATH_INVALID, "raw NUL"),
    ("/v1/customers/42%0d%0aX-Injected:1", Reason.PATH_INVALID, "escaped CR LF"),
    ("/v1/customers/42%25", Reason.PATH_INVALID, "escaped '%'"),
    ("/v1/customers/42%252f", Reason.PATH_INVALID, "double encoding"),
    ("/v1/customers/42%zz", Reason.PATH_INVALID, "broken escape"),
    ("/v1/customers/４２", Reason.PATH_INVALID, "non-ASCII"),
    ("/v1/customers/%34%32", PROFILE_RULE, "/v1/customers/42 (unreserved escapes decoded)"),
    ("/v1/%63ustomers/42", PROFILE_RULE, "/v1/customers/42 (unreserved escapes decoded)"),
    ("/v1/%63harges", CHARGES_RULE, "/v1/charges (unreserved escapes decoded)"),
    ("http://profile.shop.svc.cluster.local/v1/customers/42", Reason.PATH_INVALID, "absolute"),
    ("*", Reason.PATH_INVALID, "asterisk-form"),
    ("v1/customers/42", Reason.PATH_INVALID, "not origin-form"),
    ("", Reason.PATH_INVALID, "empty"),
    ("/v1/customers/" + "4" * 5000, Reason.PATH_INVALID, "over 4096 characters"),
]


@pytest.mark.parametrize(
    ("raw", "expected", "routed"), PATH_CASES, ids=[c[0][:60] for c in PATH_CASES]
)
def test_path_confusion(
    front: str, world: World, raw: str, expected: str | Reason, routed: str
) -> None:
    """Attack: a path that the sidecar and the upstream could read differently (dot segments,
    encoded dots and slashes, `;` parameters, case, query or fragment that look like a path,
    trailing slash, NUL). Defence: one strict normalisation that matches what the upstream
    routes, or a deny; an allow is only ever for the rule of the path the upstream routes."""
    decision = send(world, front, world.token(), path=raw)
    if isinstance(expected, Reason):
        refused(decision, expected)
        return
    claims = passed(decision, expected)
    path = routed.split(" ")[0]
    assert claims["authorization_details"][0]["path"] == path
    assert claims["aud"] == (PROFILE if expected == PROFILE_RULE else PAYMENTS)
