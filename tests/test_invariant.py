"""The narrowing invariant (DESIGN.md), by property over generated policies, tokens and requests.

Every allowed decision mints a token that is narrower than the subject token in every way the
design names; every denied one mints nothing. Policies, subject tokens (including claims that
must not be copied) and requests (including ones that match no rule) are all generated.

Every attempt goes through a front (``edgekit``: Envoy's wire request to the gRPC or the HTTP
front, the edge, decide(), the answer as Envoy applies it), so what is checked is the token
the upstream would receive, and what else reaches it; ``test_the_fronts_agree`` runs each
attempt through both and compares.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import corekit as k
import edgekit
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from edgekit import FRONTS, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extauthz.decision import paths
from extauthz.decision.identity import certificate_thumbprint
from extauthz.decision.jose import parse_compact, verify_signature
from extauthz.decision.model import Policy, Snapshot, normalise_host
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The properties run once per front: half the examples each, the same total; and a few for
# the two fronts side by side.
PER_FRONT = settings(SETTINGS, max_examples=100)

# --- the universe the generators draw from ----------------------------------------------------

ISSUERS = {
    "corp-idp": Idp("https://idp.example.com", alg="ES256"),
    "partner-idp": Idp("https://partner.example.net", alg="EdDSA"),
}
ISSUER_AUD = {
    "corp-idp": "https://shop.example.com",
    "partner-idp": "https://partner.example.net/api",
}
SIGNING = k.new_signing_key("ES256")
SIGNING_EDDSA = k.new_signing_key("EdDSA")

TD = "cluster.local"
NAMESPACES = ("a", "b")
ACCOUNTS = ("x", "y")
EXACT = tuple(f"spiffe://{TD}/ns/{ns}/sa/{sa}" for ns in NAMESPACES for sa in ACCOUNTS)
PATTERNS = (
    f"spiffe://{TD}/ns/a/sa/*",
    f"spiffe://{TD}/ns/*/sa/x",
    f"spiffe://{TD}/ns/**",
    f"spiffe://{TD}/**",
)
UNTRUSTED = "spiffe://untrusted.example/ns/a/sa/x"
CALLERS = (*EXACT, f"spiffe://{TD}/ns/c/sa/x", f"spiffe://{TD}/ns/a/sa/z/extra", UNTRUSTED)
AUDIENCES = (*EXACT, "https://api.example.com", "spiffe://cluster.local/ns/shop/sa/profile")
HOSTS = ("h1.svc", "h2.svc")
METHODS = ("GET", "POST", "PUT")
TEMPLATES = ("/r/{id}", "/r/me", "/r/**", "/s", "/s/{id}/t", "/")
SCOPES = tuple(f"s{i}" for i in range(6))
SEGMENT_VALUES = ("1", "42", "me", "x%41", "~u")
# Claims a subject may carry that must never reach the minted token.
FOREIGN_CLAIMS = (
    "email",
    "groups",
    "roles",
    "cnf",
    "authorization_details",
    "client_id",
    "txn",
    "req_wl",
    "tctx",
    "rctx",
    "purpose",
    "azp",
    "sid",
    "nonce",
    "at_hash",
)
LEAK = "LEAK-"  # every value a minted token must not contain starts with this

ALWAYS = frozenset(
    {"iss", "sub", "aud", "iat", "exp", "jti", "scope", "client_id", "act", "authorization_details"}
)


def _certificate() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "caller")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


CERT = _certificate()
CERT_X5T = certificate_thumbprint(CERT)


# --- an independent model of "does this rule name this request" -------------------------------


def template_matches(template: str, segments: tuple[str, ...]) -> bool:
    want = tuple(paths.parse_template(template).segments)
    if want and want[-1] == paths.REST:
        fixed = want[:-1]
        if len(segments) < len(fixed):
            return False
        pairs = zip(fixed, segments[: len(fixed)], strict=True)
    else:
        if len(segments) != len(want):
            return False
        pairs = zip(want, segments, strict=True)
    return all(w == s or (w == paths.PARAM and s != "") for w, s in pairs)


def workload_matches(pattern: str, caller: str) -> bool:
    if "*" not in pattern:
        return pattern == caller
    want = pattern[len("spiffe://") :].split("/")
    if not caller.startswith("spiffe://"):
        return False
    got = caller[len("spiffe://") :].split("/")
    if want[-1] == "**":
        if len(got) < len(want):
            return False
        want, got = want[:-1], got[: len(want) - 1]
    elif len(got) != len(want):
        return False
    return all(w in ("*", g) for w, g in zip(want, got, strict=True))


# --- generators -------------------------------------------------------------------------------
# Strategies are built once and indexed into: building them inside every draw costs more than
# the whole decision.

BOOLS = st.booleans()
SUBS = st.text("abcdefghij-_.@:/", min_size=1, max_size=12)
NOW_FRACTION = st.floats(0, 0.999)


@functools.cache
def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


@functools.cache
def _index_lists(n: int, min_size: int, max_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, n - 1), min_size=min_size, max_size=max_size, unique=True)


def pick(draw: st.DrawFn, seq: Sequence[Any]) -> Any:
    return seq[draw(_ints(0, len(seq) - 1))]


def some(draw: st.DrawFn, seq: Sequence[Any], min_size: int = 0, max_size: int = 99) -> list[Any]:
    indices = draw(_index_lists(len(seq), min_size, min(max_size, len(seq))))
    return [seq[i] for i in indices]


def chance(draw: st.DrawFn, one_in: int) -> bool:
    return draw(_ints(0, one_in - 1)) == 0


def rule_doc(draw: st.DrawFn, index: int, max_ttl: int) -> dict[str, Any]:
    rule = k.rule_doc(
        f"rule-{index}",
        workloads=some(draw, EXACT + PATTERNS, 1, 3),
        host=pick(draw, HOSTS),
        methods=some(draw, METHODS, 1, 2),
        paths=some(draw, TEMPLATES, 1, 2),
        issuers=some(draw, sorted(ISSUERS), 1),
        require=some(draw, SCOPES, 0, 2) or None,
        audience=pick(draw, AUDIENCES),
        scopes=some(draw, SCOPES, 1, 4),
        ttl=draw(_ints(1, max_ttl)),
    )
    if draw(BOOLS):
        rule["reexchange"] = True
    return rule


ISSUER_DOCS = [
    {
        "id": ident,
        "issuer": idp.issuer,
        "jwks": {"file": f"{ident}.json"},
        "audiences": [ISSUER_AUD[ident]],
        "algorithms": [idp.key.alg],
    }
    for ident, idp in ISSUERS.items()
]


def policy_doc(draw: st.DrawFn) -> dict[str, Any]:
    typical = draw(BOOLS)
    max_ttl = pick(draw, [1, 5, 30, 60, 300, 900, 3600]) if typical else draw(_ints(1, 3600))
    rules = [rule_doc(draw, i, max_ttl) for i in range(draw(_ints(1, 6)))]
    return k.policy_doc(
        rules,
        # Transaction tokens have their own invariant, over chains of hops (test_txn_tokens).
        token_type="access_token",
        max_ttl=max_ttl,
        issuers=ISSUER_DOCS,
    )


def snapshot(policy: Policy, eddsa: bool) -> Snapshot:
    signing = [SIGNING_EDDSA, SIGNING] if eddsa else [SIGNING]
    return k.snapshot_in_memory(policy, ISSUERS, signing)


def concrete_path(draw: st.DrawFn, template: str) -> str:
    out: list[str] = []
    for seg in template.split("/")[1:]:
        if seg.startswith("{"):
            out.append(pick(draw, SEGMENT_VALUES))
        elif seg == "**":
            out.extend(pick(draw, SEGMENT_VALUES) for _ in range(draw(_ints(0, 2))))
        else:
            out.append(seg)
    path = "/" + "/".join(out)
    variants = [path, path + "?aud=LEAK-query", path.replace("/", "//", 1), "/./" + path[1:]]
    return str(pick(draw, variants))


def concrete_caller(draw: st.DrawFn, pattern: str) -> str:
    if "*" not in pattern:
        return pattern
    parts: list[str] = []
    for seg in pattern[len("spiffe://") :].split("/"):
        if seg == "*":
            parts.append(pick(draw, ["a", "b", "x", "q"]))
        elif seg == "**":
            parts.extend(pick(draw, ["a", "sa", "x"]) for _ in range(draw(_ints(1, 3))))
        else:
            parts.append(seg)
    return "spiffe://" + "/".join(parts)


@dataclass(frozen=True)
class Attempt:
    issuer_id: str
    claims: dict[str, Any]
    typ: str | None
    method: str
    host: str
    path: str
    caller: str
    cert: bool
    headers: Mapping[str, str]


ACT_SUBS = ("spiffe://cluster.local/ns/edge/sa/gw", "svc-1", "u@x")


def act_chain(draw: st.DrawFn) -> dict[str, Any] | None:
    act: dict[str, Any] | None = None
    for _ in range(draw(_ints(0, 3))):
        node: dict[str, Any] = {"sub": pick(draw, ACT_SUBS)}
        if draw(BOOLS):
            node["iss"] = "https://idp.example.com"
        if act is not None:
            node["act"] = act
        act = node
    return act


def attempt(draw: st.DrawFn, doc: dict[str, Any], now: float) -> Attempt:
    rules = doc["rules"]
    if rules and not chance(draw, 4):  # mostly aim at a rule
        rule = pick(draw, rules)
        m = rule["match"]
        issuer_id = pick(draw, m["issuers"])
        method = pick(draw, m["methods"])
        host = m["host"]
        path = concrete_path(draw, pick(draw, m["paths"]))
        caller = concrete_caller(draw, pick(draw, m["workloads"]))
        wanted = set(rule.get("require", {}).get("scopes", [])) | set(rule["grant"]["scopes"])
        base = set(some(draw, sorted(wanted)))
    else:
        issuer_id = pick(draw, sorted(ISSUERS))
        method = pick(draw, METHODS)
        host = pick(draw, HOSTS)
        path = concrete_path(draw, pick(draw, TEMPLATES))
        caller = pick(draw, CALLERS)
        base = set()
    host = pick(draw, [host, host.upper(), host + ":8443", host + "."])
    scopes = base | set(some(draw, (*SCOPES, "zz-extra", "admin"), 0, 4))
    if chance(draw, 10):
        method = pick(draw, METHODS)
    if chance(draw, 10):
        caller = pick(draw, CALLERS)

    t = int(now)
    aud: Any = ISSUER_AUD[issuer_id]
    shape = draw(_ints(0, 9))
    if shape == 0:
        aud = [f"{LEAK}aud", aud]
    elif shape == 1:
        aud = "https://wrong.example.com"
    claims: dict[str, Any] = {
        "iss": ISSUERS[issuer_id].issuer,
        "sub": draw(SUBS),
        "aud": aud,
        "exp": t + draw(_ints(-120, 4000)),
        "iat": t + draw(_ints(-3600, 60)),
        "jti": f"{LEAK}subject-jti",
    }
    if draw(BOOLS):
        claims["nbf"] = t + draw(_ints(-3600, 60))
    if len(scopes) > 0 or draw(BOOLS):
        claims["scope"] = " ".join(sorted(scopes))
    act = act_chain(draw)
    if act is not None:
        claims["act"] = act
    if chance(draw, 10):
        claims["may_act"] = {"sub": pick(draw, [caller, EXACT[0]])}
    for name in some(draw, FOREIGN_CLAIMS, 0, 5):
        claims[name] = pick(
            draw, [f"{LEAK}{name}", [f"{LEAK}{name}"], {"x5t#S256": f"{LEAK}{name}", "path": "/"}]
        )
    headers = {
        "x-audience": f"{LEAK}header",
        "x-forwarded-client-cert": f"By={caller};URI=spiffe://cluster.local/ns/{LEAK}x/sa/y",
    }
    return Attempt(
        issuer_id=issuer_id,
        claims=claims,
        typ=pick(draw, ["at+jwt", "JWT", None]),
        method=method,
        host=host,
        path=path,
        caller=caller,
        cert=draw(BOOLS),
        headers=headers,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, Any], Policy, float, list[Attempt], bool]:
    doc = policy_doc(draw)
    policy = k.compile_lenient(doc)
    now = 1_700_000_000 + draw(NOW_FRACTION)
    tries = [attempt(draw, doc, now) for _ in range(draw(_ints(1, 5)))]
    return doc, policy, now, tries, draw(BOOLS)


def subject_token(attempt: Attempt) -> str:
    key = ISSUERS[attempt.issuer_id].key
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid}
    if attempt.typ is not None:
        header["typ"] = attempt.typ
    return k.sign_raw(key, header, attempt.claims)


def wire_request(attempt: Attempt, token: str, caller: str | None = None) -> edgekit.Request:
    """The attempt as the client sends it through Envoy, with ``token`` as its bearer token."""
    return edgekit.request(
        token,
        method=attempt.method,
        host=attempt.host,
        path=attempt.path,
        principal=caller or attempt.caller,
        headers=attempt.headers,
        cert=CERT if attempt.cert else None,
    )


def through(
    front: str,
    attempt: Attempt,
    token: str,
    snap: Snapshot,
    now: float,
    ids: k.Ids,
    caller: str | None = None,
) -> Result:
    """One attempt through ``front``: Envoy's wire request, the edge, decide(), the answer as
    Envoy applies it."""
    return edgekit.round_trip(
        front, wire_request(attempt, token, caller), snap, now=now, new_id=ids
    )


# --- the invariant ----------------------------------------------------------------------------


def assert_denied_mints_nothing(result: Result) -> None:
    """A deny: nothing signed, nothing injected, nothing let through, the reason's status."""
    decision = result.decision
    assert decision.token is None
    assert decision.claims is None
    assert decision.reason is not Reason.ALLOWED
    assert not result.allowed and result.upstream is None
    assert result.token is None and not result.upstream_set
    assert result.reason == decision.reason.code
    assert result.status == edgekit.expected_status(result.front, decision.reason)


def assert_narrowed(
    result: Result,
    *,
    policy: Policy,
    snap: Snapshot,
    now: float,
    attempt: Attempt,
    subject: Mapping[str, Any],
    subject_issuer_id: str,
    caller: str,
) -> dict[str, Any]:
    """Every point of DESIGN.md's narrowing invariant for the token that reaches the upstream
    through ``result``'s front (T); returns T's claims."""
    ex = policy.exchange
    decision = result.decision
    rule = decision.rule
    assert rule is not None
    assert rule.shadow is False
    # The one token the upstream receives, in the policy's header, is the one decide() signed;
    # no credential the client sent gets through beside it.
    claims = edgekit.passed(result, rule.id)
    assert result.token is not None

    # The rule really names this request (independently of the table).
    segments = paths.normalise(attempt.path)
    assert segments is not None
    assert rule.host == normalise_host(attempt.host)
    assert attempt.method in rule.methods
    assert any(template_matches(t, segments) for t in rule.paths)
    assert any(workload_matches(w, caller) for w in rule.workloads)
    if subject_issuer_id == "exchange":
        assert rule.reexchange is True
    else:
        assert subject_issuer_id in rule.issuers
    assert rule in policy.rules

    # T verifies with our key and is of our type.
    jws = parse_compact(result.token)
    signer = snap.signing_key
    assert jws.header == {"alg": signer.alg, "kid": signer.kid, "typ": ex.typ}
    assert verify_signature(jws, signer.public(), signer.alg)
    assert dict(jws.claims) == claims

    # 1. exactly one audience, from the rule
    assert isinstance(claims["aud"], str)
    assert claims["aud"] == rule.grant.audience
    # 2. scope is the (non-empty) intersection, sorted, deterministic
    subject_scopes = frozenset(str(subject.get("scope", "")).split())
    granted = claims["scope"].split(" ")
    assert granted == sorted(granted)
    assert set(granted) <= subject_scopes
    assert set(granted) <= rule.grant.scopes
    assert set(granted) == subject_scopes & rule.grant.scopes
    assert granted and all(granted)
    assert rule.require_scopes <= subject_scopes
    # 3. lifetime
    assert rule.grant.ttl <= ex.max_ttl <= 3600
    assert claims["exp"] <= min(subject["exp"], now + rule.grant.ttl)
    assert claims["exp"] > int(now)
    assert claims["iat"] == int(now)
    # 4. subject, issuer, delegation chain
    assert claims["sub"] == subject["sub"]
    assert claims["iss"] == ex.issuer
    expected_act: dict[str, Any] = {"sub": caller}
    if "act" in subject:
        expected_act["act"] = subject["act"]
    assert claims["act"] == expected_act
    assert claims["client_id"] == caller
    # 5. bound to the request (and the certificate when known: gRPC reads the PEM, HTTP the
    # XFCC Hash; both must give its x5t#S256)
    assert claims["authorization_details"][0] == {
        "type": "http_request",
        "method": attempt.method,
        "host": normalise_host(attempt.host),
        "path": paths.join(segments),
    }
    if attempt.cert:
        assert claims["cnf"] == {"x5t#S256": CERT_X5T}
    else:
        assert "cnf" not in claims
    # 7. nothing else: only the documented claims, and no subject-only value anywhere
    allowed_keys = set(ALWAYS) | ({"cnf"} if attempt.cert else set())
    assert decision.header == "authorization"
    assert set(claims) == allowed_keys
    assert LEAK not in json.dumps(claims)
    assert claims["jti"] != subject.get("jti")
    # the may_act gate
    if "may_act" in subject:
        assert subject["may_act"].get("sub") == caller
    return claims


@pytest.mark.parametrize("front", FRONTS)
@PER_FRONT
@given(scenarios())
def test_every_allowed_decision_is_narrower(
    front: str,
    scenario: tuple[dict[str, Any], Policy, float, list[Attempt], bool],
) -> None:
    """DESIGN.md 'The narrowing invariant', points 1-5 and 7, for any policy/token/request, on
    the token that reaches the upstream through either front."""
    _doc, policy, now, tries, eddsa = scenario
    snap = snapshot(policy, eddsa)
    ids = k.Ids()
    jtis: list[str] = []
    for attempt in tries:
        issued_before = len(ids.issued)
        result = through(front, attempt, subject_token(attempt), snap, now, ids)
        event(result.decision.reason.code)
        if not result.decision.allowed:
            assert_denied_mints_nothing(result)
            continue
        claims = assert_narrowed(
            result,
            policy=policy,
            snap=snap,
            now=now,
            attempt=attempt,
            subject=attempt.claims,
            subject_issuer_id=attempt.issuer_id,
            caller=attempt.caller,
        )
        assert ids.issued[issued_before:] == [claims["jti"]], "one fresh jti per minted token"
        jtis.append(claims["jti"])
    assert len(jtis) == len(set(jtis))


@pytest.mark.parametrize("front", FRONTS)
@PER_FRONT
@given(scenarios())
def test_a_minted_token_never_comes_back_wider(
    front: str,
    scenario: tuple[dict[str, Any], Policy, float, list[Attempt], bool],
) -> None:
    """Point 6: a minted token, as the upstream received it, presented as a subject token is
    refused unless a rule allows re-exchange for a caller it was minted for, and then it
    narrows again (relative to T)."""
    _doc, policy, now, tries, eddsa = scenario
    snap = snapshot(policy, eddsa)
    ids = k.Ids()
    any_reexchange = any(r.reexchange for r in policy.rules)
    for attempt in tries:
        first = through(front, attempt, subject_token(attempt), snap, now, ids)
        if not first.allowed or first.token is None:
            continue
        minted = dict(parse_compact(first.token).claims)

        # the same request again, from the same caller, with T as the subject token
        again = through(front, attempt, first.token, snap, now, ids)
        event("again:" + again.decision.reason.code)
        if not again.decision.allowed:
            assert_denied_mints_nothing(again)
            if not any_reexchange:
                assert again.decision.reason is Reason.REEXCHANGE_DENIED
        else:
            assert again.decision.rule is not None and again.decision.rule.reexchange
            assert minted["aud"] == attempt.caller
        # the audience of T calls onward (the same request shape, as itself)
        onward = through(front, attempt, first.token, snap, now + 1, ids, minted["aud"])
        event("onward:" + onward.decision.reason.code)
        for result, caller in ((again, attempt.caller), (onward, minted["aud"])):
            if not result.decision.allowed:
                assert_denied_mints_nothing(result)
                continue
            assert caller == minted["aud"]
            claims = assert_narrowed(
                result,
                policy=policy,
                snap=snap,
                now=now if result is again else now + 1,
                attempt=attempt,
                subject=minted,
                subject_issuer_id="exchange",
                caller=caller,
            )
            assert set(claims["scope"].split()) <= set(minted["scope"].split())
            assert claims["exp"] <= minted["exp"]
            assert claims["act"]["act"] == minted["act"]
            assert claims["sub"] == minted["sub"]


@pytest.mark.parametrize("front", FRONTS)
@PER_FRONT
@given(scenarios())
def test_shadow_rules_never_sign(
    front: str,
    scenario: tuple[dict[str, Any], Policy, float, list[Attempt], bool],
) -> None:
    """The same scenarios with every rule in shadow mode: decisions are made, nothing minted;
    through either front the request goes upstream exactly as it came (the subject token
    included: shadow mode observes, it does not exchange)."""
    doc, _policy, now, tries, eddsa = scenario
    for rule in doc["rules"]:
        rule["mode"] = "shadow"
    policy = k.compile_fast(doc)
    snap = snapshot(policy, eddsa)
    for attempt in tries:
        token = subject_token(attempt)
        result = through(front, attempt, token, snap, now, k.Ids())
        decision = result.decision
        assert decision.token is None and result.token is None
        if decision.allowed:
            assert decision.shadow is True
            assert decision.claims is not None
            assert decision.claims["aud"] == decision.rule.grant.audience  # type: ignore[union-attr]
        if decision.shadow:
            assert result.allowed and result.status == 200
            assert not result.upstream_set and not result.upstream_removed
            assert result.upstream_values("authorization") == [f"Bearer {token}"]
            assert result.reason == decision.reason.code
        else:  # denied before a rule was found: enforced, shadow or not
            assert_denied_mints_nothing(result)


@settings(SETTINGS, max_examples=75)
@given(scenarios())
def test_the_fronts_agree(
    scenario: tuple[dict[str, Any], Policy, float, list[Attempt], bool],
) -> None:
    """The same attempt through both fronts ends the same way: reason, status, rule, the
    claims of the token the upstream receives (with the same jti source), and the rest of what
    the upstream receives, but for the XFCC element only the HTTP front's Envoy sets."""
    _doc, policy, now, tries, eddsa = scenario
    snap = snapshot(policy, eddsa)
    for attempt in tries:
        token = subject_token(attempt)
        grpc, http = (through(f, attempt, token, snap, now, k.Ids("same")) for f in FRONTS)
        event(grpc.decision.reason.code)
        assert (grpc.reason, grpc.status, grpc.rule, grpc.allowed) == (
            http.reason,
            http.status,
            http.rule,
            http.allowed,
        )
        assert grpc.decision.caller == http.decision.caller
        assert grpc.decision.claims == http.decision.claims
        if grpc.token is not None and http.token is not None:
            assert parse_compact(grpc.token).claims == parse_compact(http.token).claims
        else:
            assert grpc.token is None and http.token is None
        # ECDSA signatures differ from one signing to the next: the claims are compared above.
        header = grpc.decision.header
        assert _rest(grpc.upstream, header) == _rest(http.upstream, header)
        assert (grpc.body, grpc.client_headers) == (http.body, http.client_headers)


def _rest(upstream: Sequence[tuple[str, str]] | None, header: str) -> list[Any] | None:
    """What the upstream receives, but the XFCC element only the HTTP front's Envoy sets and
    the minted token's signature."""
    if upstream is None:
        return None
    out: list[Any] = []
    for name, value in upstream:
        if name == edgekit.XFCC:
            continue
        if name == header and value.count(".") == 2:
            value = value.rsplit(".", 1)[0]
        out.append((name, value))
    return sorted(out)
