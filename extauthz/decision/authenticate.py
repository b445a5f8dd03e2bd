"""Authenticate: exactly one subject token, verified against the one issuer it names.

The subject token is the one bearer token in ``authorization`` or, in transaction_token mode,
the one Txn-Token in ``txn-token`` (which takes its place: the draft keeps Txn-Tokens out of
``authorization``, and we keep them out of it too). Only the trusted issuer that the token's
``iss`` names is tried, with that issuer's keys and algorithms; a token we minted ourselves is
recognised by our own issuer and our published keys.
Everything that does not depend on the time can be remembered per exact token text in a
``SubjectCache``; ``exp``, ``nbf`` and ``iat`` are checked on every use.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from extauthz.decision.jose import (
    CompactJWS,
    IssuerKeys,
    TokenFormatError,
    parse_compact,
    verify_signature,
)
from extauthz.decision.model import (
    SELF_ISSUER_ID,
    TXN_TOKEN_HEADER,
    TXN_TYP,
    Exchange,
    Snapshot,
    normal_typ,
)
from extauthz.decision.reasons import Deny, Reason

__all__ = [
    "MAX_ACT_DEPTH",
    "LruSubjectCache",
    "Subject",
    "SubjectCache",
    "authenticate",
    "extract_bearer",
    "extract_txn_token",
    "presented",
]

MAX_ACT_DEPTH = 8
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9_.~+/=-]+)")
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_MAX_TXN = 256  # a transaction id is a UUID or like it
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_MAX_SUB = 1024


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
    not_before: int | float = float("-inf")  # the later of nbf and iat, when present
    # A Txn-Token (from ``txn-token``): the transaction it belongs to and its contexts.
    txn: str | None = None
    tctx: Mapping[str, Any] | None = None
    rctx: Mapping[str, Any] | None = None
    jti: str | None = None
    # Every verified claim, for the rules' claim conditions (never copied into a token).
    claims: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def transaction(self) -> bool:
        """Whether this subject is a Txn-Token of an inner hop."""
        return self.txn is not None


class SubjectCache(Protocol):
    """Verified subjects by their exact token text. Whoever owns one must start a new one
    whenever the Snapshot changes: nothing verified under old keys or an old policy may
    survive a reload."""

    def get(self, token: str) -> Subject | None:
        """The subject verified earlier from exactly this token text, if remembered."""
        ...

    def put(self, token: str, subject: Subject) -> None:
        """Remember the subject verified from this token text."""
        ...


class LruSubjectCache:
    """A bounded ``SubjectCache``; least recently used entries go first."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Subject] = OrderedDict()

    def get(self, token: str) -> Subject | None:
        """The subject remembered for this exact token, if any."""
        entry = self._entries.get(token)
        if entry is not None:
            self._entries.move_to_end(token)
        return entry

    def put(self, token: str, subject: Subject) -> None:
        """Remember a verified subject, evicting the oldest entry when full."""
        if self.max_entries <= 0:
            return
        self._entries[token] = subject
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def extract_bearer(headers: Mapping[str, str], max_bytes: int) -> str | Deny:
    """Exactly one bearer token in exactly one Authorization header."""
    value = headers.get("authorization")
    if value is None or value == "":
        return Deny(Reason.TOKEN_MISSING)
    if len(value) > max_bytes + len("Bearer "):
        return Deny(Reason.TOKEN_TOO_LARGE)
    # Envoy joins repeated headers with ","; a comma is never part of a JWS compact token.
    found = _BEARER.fullmatch(value)
    if found is None:
        return Deny(Reason.TOKEN_MALFORMED, "authorization is not one 'Bearer <token>'")
    return found.group(1)


def extract_txn_token(headers: Mapping[str, str], max_bytes: int) -> str | Deny:
    """Exactly one Txn-Token in exactly one ``txn-token`` header, as the draft's "Txn-Token"
    HTTP Header section says: the compact JWS itself, no scheme before it."""
    value = headers.get(TXN_TOKEN_HEADER, "")
    if value == "":
        return Deny(Reason.TOKEN_MISSING, "txn-token is empty")
    if len(value) > max_bytes:
        return Deny(Reason.TOKEN_TOO_LARGE)
    # Envoy joins repeated headers with ","; a comma is never part of a JWS compact token.
    if _COMPACT.fullmatch(value) is None:
        return Deny(Reason.TOKEN_MALFORMED, "txn-token is not one compact JWS")
    return value


def presented(headers: Mapping[str, str], exchange: Exchange) -> tuple[str | Deny, str]:
    """The subject token's text (or why there is none) and the header it came in: the
    Txn-Token of an inner hop in transaction_token mode, else the bearer token."""
    if exchange.transaction_tokens and TXN_TOKEN_HEADER in headers:
        return extract_txn_token(headers, exchange.max_token_bytes), TXN_TOKEN_HEADER
    return extract_bearer(headers, exchange.max_token_bytes), "authorization"


def authenticate(
    headers: Mapping[str, str], snapshot: Snapshot, now: float, cache: SubjectCache | None
) -> tuple[Subject | Deny, bool | None]:
    """The verified subject (or the deny), and whether the cache answered (None: no lookup)."""
    token, where = presented(headers, snapshot.policy.exchange)
    if isinstance(token, Deny):
        return token, None
    if where == TXN_TOKEN_HEADER:
        # The same text is verified differently as a bearer token: never one cache entry.
        key, verify = "txn " + token, _verify_txn_token
    else:
        key, verify = token, _verify
    exchange = snapshot.policy.exchange
    subject = cache.get(key) if cache is not None else None
    hit = None if cache is None else subject is not None
    if subject is None:
        verified = verify(token, snapshot)
        if isinstance(verified, Deny):
            return verified, hit
        subject = verified
        if cache is not None:
            cache.put(key, subject)
    # Time is checked on every use, cached or not.
    if subject.exp <= now - exchange.leeway:
        return Deny(Reason.TOKEN_EXPIRED), hit
    if subject.not_before > now + exchange.leeway:
        return Deny(Reason.TOKEN_NOT_YET_VALID, "nbf or iat in the future"), hit
    return subject, hit


def _parse(token: str) -> CompactJWS | Deny:
    try:
        return parse_compact(token)
    except TokenFormatError as exc:
        return Deny(Reason.TOKEN_MALFORMED, str(exc))


def _verify(token: str, snapshot: Snapshot) -> Subject | Deny:
    """Everything about the token that does not depend on the time."""
    exchange = snapshot.policy.exchange
    jws = _parse(token)
    if isinstance(jws, Deny):
        return jws
    header, claims = jws.header, jws.claims

    iss = claims.get("iss")
    if not isinstance(iss, str):
        return Deny(Reason.CLAIM_INVALID, "iss missing")
    if exchange.transaction_tokens and iss == exchange.issuer:
        return Deny(Reason.TOKEN_TYPE_INVALID, "a Txn-Token goes in txn-token, not authorization")
    if iss == exchange.issuer:
        issuer_id, keys = SELF_ISSUER_ID, snapshot.own_keys
        algorithms = keys.algorithms
        types = frozenset({exchange.typ})
        audiences: frozenset[str] | None = None  # checked against the caller in authorize
    else:
        trusted = snapshot.policy.issuers_by_iss.get(iss)
        if trusted is None:
            return Deny(Reason.ISSUER_UNTRUSTED, "iss is not a trusted issuer")
        found = snapshot.issuer_keys.get(trusted.id)
        if found is None:
            return Deny(Reason.KEY_UNKNOWN, "no keys loaded for this issuer", issuer_id=trusted.id)
        if trusted.transaction_token_service:
            return Deny(Reason.TOKEN_TYPE_INVALID, "a Txn-Token goes in txn-token")
        issuer_id, keys, algorithms = trusted.id, found, trusted.algorithms
        types, audiences = trusted.token_types, trusted.audiences

    refused = _check_alg(header, algorithms)
    if refused is not None:
        return refused
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or normal_typ(typ) not in types):
        return Deny(Reason.TOKEN_TYPE_INVALID, "typ not accepted for this issuer")
    if typ is None and issuer_id == SELF_ISSUER_ID:
        return Deny(Reason.TOKEN_TYPE_INVALID, "typ missing")
    signed = _check_signature(jws, keys, issuer_id)
    if signed is not None:
        return signed

    return _subject_claims(claims, issuer_id, iss, audiences)


def _verify_txn_token(token: str, snapshot: Snapshot) -> Subject | Deny:
    """A Txn-Token of an inner hop, checked as the draft's "Txn-Token Validation" says (the
    signature, ``aud`` is our trust domain, not expired: the time is checked by the caller)
    and its "JWT Body Claims" section requires (``iat``, ``txn``, ``sub``, ``scope``,
    ``req_wl``). Ours are verified with our published keys; a configured Transaction Token
    Service's with its own, chosen by ``iss``."""
    exchange = snapshot.policy.exchange
    jws = _parse(token)
    if isinstance(jws, Deny):
        return jws
    header, claims = jws.header, jws.claims
    typ = header.get("typ")
    if not isinstance(typ, str) or normal_typ(typ) != TXN_TYP:
        return Deny(Reason.TOKEN_TYPE_INVALID, f"typ is not {TXN_TYP}")
    source = _txn_source(claims.get("iss"), exchange, snapshot)
    if isinstance(source, Deny):
        return source
    issuer_id, keys, algorithms = source
    signed = _check_alg(header, algorithms) or _check_signature(jws, keys, issuer_id)
    if signed is not None:
        return signed

    aud = claims.get("aud")
    if aud != exchange.trust_domain and aud != [exchange.trust_domain]:
        return Deny(Reason.AUDIENCE_MISMATCH, "aud is not this trust domain")
    for name in ("iat", "req_wl", "txn", "scope"):
        if name not in claims:
            return Deny(Reason.CLAIM_INVALID, f"{name} missing")
    txn, req_wl = claims["txn"], claims["req_wl"]
    if not isinstance(txn, str) or not txn or len(txn) > _MAX_TXN:
        return Deny(Reason.CLAIM_INVALID, "txn malformed")
    if not isinstance(req_wl, str) or not req_wl:
        return Deny(Reason.CLAIM_INVALID, "req_wl malformed")
    contexts = [claims.get(name) for name in ("tctx", "rctx")]
    if any(value is not None and not isinstance(value, dict) for value in contexts):
        return Deny(Reason.CLAIM_INVALID, "tctx or rctx is not an object")
    if issuer_id == SELF_ISSUER_ID and not isinstance(claims.get("may_act"), dict):
        # Every Txn-Token we mint names the one workload that may present it.
        return Deny(Reason.CLAIM_INVALID, "may_act missing")
    jti = claims.get("jti")
    subject = _subject_claims(claims, issuer_id, str(claims.get("iss", "")), None)
    if isinstance(subject, Deny):
        return subject
    return dataclasses.replace(
        subject,
        txn=txn,
        tctx=contexts[0],
        rctx=contexts[1],
        jti=jti if isinstance(jti, str) else None,
    )


def _txn_source(
    iss: object, exchange: Exchange, snapshot: Snapshot
) -> tuple[str, IssuerKeys, frozenset[str]] | Deny:
    """Whose keys verify a Txn-Token: ours when it names no issuer (the draft makes ``iss``
    optional) or names us; else the Transaction Token Service its ``iss`` names."""
    if iss is None or iss == exchange.issuer:
        return SELF_ISSUER_ID, snapshot.own_keys, snapshot.own_keys.algorithms
    if not isinstance(iss, str):
        return Deny(Reason.CLAIM_INVALID, "iss is not a string")
    trusted = snapshot.policy.issuers_by_iss.get(iss)
    if trusted is None or not trusted.transaction_token_service:
        return Deny(Reason.ISSUER_UNTRUSTED, "iss is not a trusted transaction token service")
    found = snapshot.issuer_keys.get(trusted.id)
    if found is None:
        return Deny(Reason.KEY_UNKNOWN, "no keys loaded for this issuer", issuer_id=trusted.id)
    return trusted.id, found, trusted.algorithms


def _check_alg(header: Mapping[str, Any], algorithms: frozenset[str]) -> Deny | None:
    """None when ``alg`` is one of the issuer's and no ``crit`` asks for what we do not do."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        return Deny(Reason.ALGORITHM_NOT_ALLOWED, "alg not allowed for this issuer")
    if "crit" in header:
        return Deny(Reason.HEADER_UNSUPPORTED, "crit header present")
    return None


def _check_signature(jws: CompactJWS, keys: IssuerKeys, issuer_id: str) -> Deny | None:
    """None when one of the issuer's keys for this ``kid`` and ``alg`` verifies (the caller
    checked ``alg`` with ``_check_alg``)."""
    header = jws.header
    alg = str(header["alg"])
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return Deny(Reason.TOKEN_MALFORMED, "kid is not a string")
    candidates = keys.candidates(kid, alg)
    if not candidates:
        return Deny(
            Reason.KEY_UNKNOWN, "no key of this issuer matches kid and alg", issuer_id=issuer_id
        )
    if not any(verify_signature(jws, key, alg) for key in candidates):
        return Deny(Reason.SIGNATURE_INVALID)
    return None


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _subject_claims(
    claims: Mapping[str, Any],
    issuer_id: str,
    iss: str,
    audiences: frozenset[str] | None,
) -> Subject | Deny:
    exp = claims.get("exp")
    if not _number(exp):
        return Deny(Reason.CLAIM_INVALID, "exp missing or not a number")
    # Compared as the numbers they are: an int of any size against a float is exact in
    # Python, where converting a 400-digit int to float would overflow.
    not_before: int | float = float("-inf")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if not _number(value):
            return Deny(Reason.CLAIM_INVALID, f"{name} not a number")
        not_before = max(not_before, value)

    aud = claims.get("aud")
    token_audiences: tuple[str, ...]
    if isinstance(aud, str):
        token_audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        token_audiences = tuple(aud)
    else:
        return Deny(Reason.AUDIENCE_MISMATCH, "aud missing or malformed")
    if audiences is not None and audiences.isdisjoint(token_audiences):
        return Deny(Reason.AUDIENCE_MISMATCH, "aud names none of the issuer's audiences")

    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB:
        return Deny(Reason.CLAIM_INVALID, "sub missing or malformed")

    scopes = _scopes(claims)
    if scopes is None:
        return Deny(Reason.CLAIM_INVALID, "scope malformed")

    act = claims.get("act")
    if act is not None and not _valid_act(act, MAX_ACT_DEPTH):
        return Deny(Reason.CLAIM_INVALID, "act malformed")
    may_act = claims.get("may_act")
    if may_act is not None and not isinstance(may_act, dict):
        return Deny(Reason.CLAIM_INVALID, "may_act malformed")

    return Subject(
        issuer_id,
        iss,
        sub,
        int(exp),
        scopes,
        token_audiences,
        act,
        may_act,
        not_before,
        claims=claims,
    )


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


def _valid_act(act: Any, depth: int) -> bool:
    if depth == 0 or not isinstance(act, dict) or not isinstance(act.get("sub"), str):
        return False
    inner = act.get("act")
    return inner is None or _valid_act(inner, depth - 1)
