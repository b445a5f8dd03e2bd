"""The decision: authenticate -> identify -> authorize -> mint, pure and in one place.

Nothing here does I/O, reads the clock or knows gRPC. ``decide`` takes a plain ``CheckInput``,
an immutable ``Snapshot`` of everything loaded (policy, issuer keys, signing key), the time and
an id source, and returns a ``Decision``. A deny is a value with a stable ``Reason``; the only
exceptions that can leave ``decide`` are bugs, and the edge turns those into a deny too.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extauthz.decision import paths
from extauthz.decision.identity import (
    SpiffeId,
    certificate_thumbprint,
    parse_spiffe_id,
    parse_xfcc,
    xfcc_hash_thumbprint,
)
from extauthz.decision.jose import (
    IssuerKeys,
    SigningKey,
    TokenFormatError,
    parse_compact,
    verify_signature,
)
from extauthz.decision.reasons import Reason
from extauthz.policy.compiler import SELF_ISSUER_ID, Policy, Rule, normal_typ, normalise_host

MAX_ACT_DEPTH = 8
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9_.~+/=-]+)")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_MAX_SUB = 1024


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What the edge extracted from Envoy's CheckRequest; plain strings only."""

    method: str
    host: str
    path: str  # the raw request target, query included
    headers: Mapping[str, str]  # lower-case names, as Envoy sends them
    principal: str  # source.principal: the peer certificate's first URI SAN
    peer_certificate: str = ""  # PEM, when Envoy includes it
    request_id: str = ""


class SubjectCache:
    """Verified subject tokens, by their exact text, so a repeated token costs a dict lookup
    instead of a signature check. Only time-independent checks are remembered: exp, nbf and
    iat are checked again on every hit. It lives in one Snapshot, so any reload (a policy,
    key or JWKS change) starts from empty. Bounded; least recently used entries go first."""

    def __init__(
        self, max_entries: int = 10_000, on_lookup: Callable[[bool], None] | None = None
    ) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Subject] = OrderedDict()
        self._on_lookup = on_lookup

    def get(self, token: str) -> Subject | None:
        entry = self._entries.get(token)
        if entry is not None:
            self._entries.move_to_end(token)
        if self._on_lookup is not None:
            self._on_lookup(entry is not None)
        return entry

    def put(self, token: str, subject: Subject) -> None:
        if self.max_entries <= 0:
            return
        self._entries[token] = subject
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a decision reads, swapped as one value when anything is reloaded."""

    policy: Policy
    issuer_keys: Mapping[str, IssuerKeys]  # by trusted issuer id
    signing_keys: tuple[SigningKey, ...]  # all published; the first one signs
    own_keys: IssuerKeys  # public halves of all our keys, to recognise re-exchanged tokens
    subject_cache: SubjectCache = field(default_factory=SubjectCache, compare=False)

    @property
    def signing_key(self) -> SigningKey:
        return self.signing_keys[0]


@dataclass(frozen=True, slots=True)
class Subject:
    """The verified subject token, reduced to the claims the exchange may use."""

    issuer_id: str
    iss: str
    sub: str
    exp: int
    scopes: frozenset[str]
    audiences: tuple[str, ...]
    act: Mapping[str, Any] | None
    may_act: Mapping[str, Any] | None
    not_before: float = float("-inf")  # the later of nbf and iat, when present


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    host: str
    segments: paths.Segments  # the normalised path

    @property
    def path(self) -> str:
        return paths.join(self.segments)


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    detail: str = ""  # for the decision log only; never a token or key material
    rule: Rule | None = None
    caller: str | None = None
    subject: Subject | None = None
    request: Request | None = None
    claims: Mapping[str, Any] | None = None  # what was (or, in shadow mode, would be) minted
    token: str | None = field(default=None, repr=False)
    header: str = "authorization"
    strip_headers: tuple[str, ...] = ()
    issuer_id: str | None = None  # set on key_unknown, so the server can refetch that JWKS
    shadow: bool = False  # computed and logged, not enforced: the request passes untouched

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED

    def finished(self, *, token: str | None, shadow: bool) -> Decision:
        # Spelled out rather than dataclasses.replace, which costs more than the rest of a
        # warm decision put together.
        return Decision(
            self.reason,
            self.detail,
            self.rule,
            self.caller,
            self.subject,
            self.request,
            self.claims,
            token,
            self.header,
            self.strip_headers,
            self.issuer_id,
            shadow,
        )


@dataclass(frozen=True, slots=True)
class _Deny:
    reason: Reason
    detail: str = ""
    rule: Rule | None = None  # the rule that was found, when the deny came after finding it
    issuer_id: str | None = None


def decide(inp: CheckInput, snap: Snapshot, now: float, new_id: Callable[[], str]) -> Decision:
    """Decide one request and, when it is allowed and enforced, sign the narrowed token."""
    decision = evaluate(inp, snap, now, new_id)
    in_shadow = snap.policy.shadow or (decision.rule is not None and decision.rule.shadow)
    if in_shadow:
        # Shadow mode: the verdict and the would-be claims are logged; nothing is signed or
        # injected, and the edge lets the request through as it came.
        return decision.finished(token=None, shadow=True)
    if decision.allowed and decision.claims is not None:
        token = snap.signing_key.sign(decision.claims, snap.policy.exchange.typ)
        return decision.finished(token=token, shadow=False)
    return decision


def evaluate(inp: CheckInput, snap: Snapshot, now: float, new_id: Callable[[], str]) -> Decision:
    """The phases in order; the order is the security argument, read it top to bottom."""
    policy = snap.policy

    subject = authenticate(inp.headers, snap, now)
    if isinstance(subject, _Deny):
        return Decision(subject.reason, subject.detail, issuer_id=subject.issuer_id)

    identified = identify(inp, policy)
    if isinstance(identified, _Deny):
        return Decision(identified.reason, identified.detail, subject=subject)
    caller = identified.spiffe_id

    request = request_of(inp)
    if request is None:
        return Decision(
            Reason.PATH_INVALID, "path cannot be normalised safely", caller=caller, subject=subject
        )

    rule = authorize(subject, caller, request, policy)
    if isinstance(rule, _Deny):
        return Decision(
            rule.reason, rule.detail, rule.rule, caller=caller, subject=subject, request=request
        )

    claims = narrow(subject, rule, caller, request, identified.thumbprint, policy, int(now), new_id)
    if isinstance(claims, _Deny):
        return Decision(
            claims.reason, claims.detail, rule=rule, caller=caller, subject=subject, request=request
        )

    return Decision(
        Reason.ALLOWED,
        rule=rule,
        caller=caller,
        subject=subject,
        request=request,
        claims=claims,
        header=policy.exchange.header,
        strip_headers=policy.exchange.strip_headers,
    )


# --- authenticate ------------------------------------------------------------------------------


def extract_bearer(headers: Mapping[str, str], max_bytes: int) -> str | _Deny:
    """Exactly one bearer token in exactly one Authorization header."""
    value = headers.get("authorization")
    if value is None or value == "":
        return _Deny(Reason.TOKEN_MISSING)
    if len(value) > max_bytes + len("Bearer "):
        return _Deny(Reason.TOKEN_TOO_LARGE)
    # Envoy joins repeated headers with ","; a comma is never part of a JWS compact token.
    found = _BEARER.fullmatch(value)
    if found is None:
        return _Deny(Reason.TOKEN_MALFORMED, "authorization is not one 'Bearer <token>'")
    return found.group(1)


def authenticate(headers: Mapping[str, str], snap: Snapshot, now: float) -> Subject | _Deny:
    ex = snap.policy.exchange
    token = extract_bearer(headers, ex.max_token_bytes)
    if isinstance(token, _Deny):
        return token
    subject = snap.subject_cache.get(token)
    if subject is None:
        subject = _verify(token, snap)
        if isinstance(subject, _Deny):
            return subject
        snap.subject_cache.put(token, subject)
    # Time is checked on every use, cached or not.
    if subject.exp <= now - ex.leeway:
        return _Deny(Reason.TOKEN_EXPIRED)
    if subject.not_before > now + ex.leeway:
        return _Deny(Reason.TOKEN_NOT_YET_VALID, "nbf or iat in the future")
    return subject


def _verify(token: str, snap: Snapshot) -> Subject | _Deny:
    """Everything about the token that does not depend on the time."""
    ex = snap.policy.exchange
    try:
        jws = parse_compact(token)
    except TokenFormatError as exc:
        return _Deny(Reason.TOKEN_MALFORMED, str(exc))
    header, claims = jws.header, jws.claims

    iss = claims.get("iss")
    if not isinstance(iss, str):
        return _Deny(Reason.CLAIM_INVALID, "iss missing")
    if iss == ex.issuer:
        issuer_id, keys = SELF_ISSUER_ID, snap.own_keys
        algorithms = keys.algorithms
        types = frozenset({ex.typ})
        audiences: frozenset[str] | None = None  # checked against the caller in authorize
    else:
        trusted = snap.policy.issuers_by_iss.get(iss)
        if trusted is None:
            return _Deny(Reason.ISSUER_UNTRUSTED, "iss is not a trusted issuer")
        found = snap.issuer_keys.get(trusted.id)
        if found is None:
            return _Deny(Reason.KEY_UNKNOWN, "no keys loaded for this issuer", issuer_id=trusted.id)
        issuer_id, keys, algorithms = trusted.id, found, trusted.algorithms
        types, audiences = trusted.token_types, trusted.audiences

    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        return _Deny(Reason.ALGORITHM_NOT_ALLOWED, "alg not allowed for this issuer")
    if "crit" in header:
        return _Deny(Reason.HEADER_UNSUPPORTED, "crit header present")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or normal_typ(typ) not in types):
        return _Deny(Reason.TOKEN_TYPE_INVALID, "typ not accepted for this issuer")
    if typ is None and issuer_id == SELF_ISSUER_ID:
        return _Deny(Reason.TOKEN_TYPE_INVALID, "typ missing")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return _Deny(Reason.TOKEN_MALFORMED, "kid is not a string")
    candidates = keys.candidates(kid, alg)
    if not candidates:
        return _Deny(
            Reason.KEY_UNKNOWN, "no key of this issuer matches kid and alg", issuer_id=issuer_id
        )
    if not any(verify_signature(jws, key, alg) for key in candidates):
        return _Deny(Reason.SIGNATURE_INVALID)

    return _subject_claims(claims, issuer_id, iss, audiences)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _subject_claims(
    claims: Mapping[str, Any],
    issuer_id: str,
    iss: str,
    audiences: frozenset[str] | None,
) -> Subject | _Deny:
    exp = claims.get("exp")
    if not _number(exp):
        return _Deny(Reason.CLAIM_INVALID, "exp missing or not a number")
    not_before = float("-inf")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if not _number(value):
            return _Deny(Reason.CLAIM_INVALID, f"{name} not a number")
        not_before = max(not_before, float(value))

    aud = claims.get("aud")
    token_audiences: tuple[str, ...]
    if isinstance(aud, str):
        token_audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        token_audiences = tuple(aud)
    else:
        return _Deny(Reason.AUDIENCE_MISMATCH, "aud missing or malformed")
    if audiences is not None and audiences.isdisjoint(token_audiences):
        return _Deny(Reason.AUDIENCE_MISMATCH, "aud names none of the issuer's audiences")

    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB:
        return _Deny(Reason.CLAIM_INVALID, "sub missing or malformed")

    scopes = _scopes(claims)
    if scopes is None:
        return _Deny(Reason.CLAIM_INVALID, "scope malformed")

    act = claims.get("act")
    if act is not None and not _valid_act(act, MAX_ACT_DEPTH):
        return _Deny(Reason.CLAIM_INVALID, "act malformed")
    may_act = claims.get("may_act")
    if may_act is not None and not isinstance(may_act, dict):
        return _Deny(Reason.CLAIM_INVALID, "may_act malformed")

    return Subject(issuer_id, iss, sub, int(exp), scopes, token_audiences, act, may_act, not_before)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str] | None:
    """``scope`` (RFC 8693/9068: space-separated string) or, failing that, ``scp`` (a list, as
    some identity providers send). Absent means no scopes, which no rule can narrow from."""
    scope = claims.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            return None
        items = scope.split(" ")
    else:
        scp = claims.get("scp")
        if scp is None:
            return frozenset()
        if not isinstance(scp, list) or not all(isinstance(s, str) for s in scp):
            return None
        items = scp
    items = [s for s in items if s]
    if not all(_SCOPE_TOKEN.fullmatch(s) for s in items):
        return None
    return frozenset(items)


def actor_chain(act: Mapping[str, Any]) -> dict[str, Any]:
    """The subject's delegation chain reduced to who acted (``sub``, and ``iss`` when given):
    other members of ``act`` are not ours to pass on."""
    out: dict[str, Any] = {"sub": act["sub"]}
    if isinstance(act.get("iss"), str):
        out["iss"] = act["iss"]
    inner = act.get("act")
    if isinstance(inner, dict):
        out["act"] = actor_chain(inner)
    return out


def _valid_act(act: Any, depth: int) -> bool:
    if depth == 0 or not isinstance(act, dict) or not isinstance(act.get("sub"), str):
        return False
    inner = act.get("act")
    return inner is None or _valid_act(inner, depth - 1)


# --- identify ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    spiffe_id: str
    thumbprint: str | None  # x5t#S256 of the caller's own certificate, when known


def identify(inp: CheckInput, policy: Policy) -> Caller | _Deny:
    """The caller: the mTLS peer (``source.principal``, and its certificate when Envoy sends
    it), or, only when that peer is a named trusted hop, the client that hop vouches for in
    its XFCC element (and that element's certificate hash)."""
    peer = parse_spiffe_id(inp.principal) if inp.principal else None
    if peer is None:
        return _Deny(Reason.WORKLOAD_UNIDENTIFIED, "source.principal is not a SPIFFE ID")
    thumbprint = certificate_thumbprint(inp.peer_certificate) if inp.peer_certificate else None
    if str(peer) in policy.xfcc_trusted_hops:
        vouched = _from_trusted_hop(inp.headers.get("x-forwarded-client-cert", ""), str(peer))
        if vouched is None:
            return _Deny(Reason.WORKLOAD_UNIDENTIFIED, "trusted hop sent no usable XFCC element")
        # The peer certificate is the hop's own: never bind the caller's token to it.
        peer, thumbprint = vouched
    if peer.trust_domain not in policy.trust_domains:
        return _Deny(Reason.WORKLOAD_UNTRUSTED, "trust domain not trusted")
    return Caller(str(peer), thumbprint)


def _from_trusted_hop(xfcc: str, hop: str) -> tuple[SpiffeId, str | None] | None:
    if not xfcc:
        return None
    try:
        elements = parse_xfcc(xfcc)
    except ValueError:
        return None
    # The hop appends its own element last; what came before it is client-controlled.
    last = elements[-1]
    if last.get("by") != [hop]:
        return None
    uris = last.get("uri", [])
    if len(uris) != 1:
        return None
    caller = parse_spiffe_id(uris[0])
    if caller is None:
        return None
    hashes = last.get("hash", [])
    return caller, xfcc_hash_thumbprint(hashes[0]) if len(hashes) == 1 else None


# --- authorize ---------------------------------------------------------------------------------


def request_of(inp: CheckInput) -> Request | None:
    segments = paths.normalise(inp.path)
    if segments is None:
        return None
    return Request(inp.method, normalise_host(inp.host), segments)


def authorize(subject: Subject, caller: str, request: Request, policy: Policy) -> Rule | _Deny:
    rule = policy.find_rule(
        request.host, request.method, request.segments, caller, subject.issuer_id
    )
    if rule is None:
        if subject.issuer_id == SELF_ISSUER_ID:
            return _Deny(Reason.REEXCHANGE_DENIED, "a minted token is not a subject token here")
        return _Deny(Reason.NO_RULE)
    if subject.issuer_id == SELF_ISSUER_ID and caller not in subject.audiences:
        return _Deny(Reason.REEXCHANGE_DENIED, "minted token was not issued to this caller", rule)
    if subject.may_act is not None and subject.may_act.get("sub") != caller:
        return _Deny(Reason.ACTOR_NOT_PERMITTED, "may_act does not name the caller", rule)
    missing = rule.require_scopes - subject.scopes
    if missing:
        detail = "missing required scopes: " + " ".join(sorted(missing))
        return _Deny(Reason.INSUFFICIENT_SCOPE, detail, rule)
    return rule


# --- mint --------------------------------------------------------------------------------------


def narrow(
    subject: Subject,
    rule: Rule,
    caller: str,
    request: Request,
    cert_thumbprint: str | None,
    policy: Policy,
    now: int,
    new_id: Callable[[], str],
) -> dict[str, Any] | _Deny:
    """The narrowed claims. Each line holds one point of the narrowing invariant; nothing of the
    subject token is copied unless named here."""
    scopes = subject.scopes & rule.grant.scopes
    if not scopes:
        return _Deny(Reason.INSUFFICIENT_SCOPE, "subject holds none of the grantable scopes")
    ttl = min(rule.grant.ttl, policy.exchange.max_ttl)
    exp = min(subject.exp, now + ttl)
    if exp <= now:
        return _Deny(Reason.TOKEN_EXPIRED, "subject token expires now")
    act: dict[str, Any] = {"sub": caller}
    if subject.act is not None:
        act["act"] = actor_chain(subject.act)
    jti = new_id()
    claims: dict[str, Any] = {
        "iss": policy.exchange.issuer,
        "sub": subject.sub,
        "aud": rule.grant.audience,
        "iat": now,
        "exp": exp,
        "jti": jti,
        "scope": " ".join(sorted(scopes)),
        "client_id": caller,
        "act": act,
        "req": {"method": request.method, "host": request.host, "path": request.path},
    }
    if cert_thumbprint is not None:
        claims["cnf"] = {"x5t#S256": cert_thumbprint}
    if policy.exchange.token_type == "transaction_token":
        claims["txn"] = jti
        claims["req_wl"] = caller
        claims["tctx"] = {"purpose": rule.id}
    return claims
