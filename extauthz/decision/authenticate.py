"""Authenticate: exactly one bearer token, verified against the one issuer it names.

Only the trusted issuer that the token's ``iss`` names is tried, with that issuer's keys and
algorithms; a token we minted ourselves is recognised by our own issuer and our published keys.
Everything that does not depend on the time can be remembered per exact token text in a
``SubjectCache``; ``exp``, ``nbf`` and ``iat`` are checked on every use.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from extauthz.decision.jose import TokenFormatError, parse_compact, verify_signature
from extauthz.decision.model import SELF_ISSUER_ID, Snapshot, normal_typ
from extauthz.decision.reasons import Deny, Reason

__all__ = [
    "MAX_ACT_DEPTH",
    "LruSubjectCache",
    "Subject",
    "SubjectCache",
    "authenticate",
    "extract_bearer",
]

MAX_ACT_DEPTH = 8
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9_.~+/=-]+)")
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


def authenticate(
    headers: Mapping[str, str], snapshot: Snapshot, now: float, cache: SubjectCache | None
) -> tuple[Subject | Deny, bool | None]:
    """The verified subject (or the deny), and whether the cache answered (None: no lookup)."""
    exchange = snapshot.policy.exchange
    token = extract_bearer(headers, exchange.max_token_bytes)
    if isinstance(token, Deny):
        return token, None
    subject = cache.get(token) if cache is not None else None
    hit = None if cache is None else subject is not None
    if subject is None:
        verified = _verify(token, snapshot)
        if isinstance(verified, Deny):
            return verified, hit
        subject = verified
        if cache is not None:
            cache.put(token, subject)
    # Time is checked on every use, cached or not.
    if subject.exp <= now - exchange.leeway:
        return Deny(Reason.TOKEN_EXPIRED), hit
    if subject.not_before > now + exchange.leeway:
        return Deny(Reason.TOKEN_NOT_YET_VALID, "nbf or iat in the future"), hit
    return subject, hit


def _verify(token: str, snapshot: Snapshot) -> Subject | Deny:
    """Everything about the token that does not depend on the time."""
    exchange = snapshot.policy.exchange
    try:
        jws = parse_compact(token)
    except TokenFormatError as exc:
        return Deny(Reason.TOKEN_MALFORMED, str(exc))
    header, claims = jws.header, jws.claims

    iss = claims.get("iss")
    if not isinstance(iss, str):
        return Deny(Reason.CLAIM_INVALID, "iss missing")
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
        issuer_id, keys, algorithms = trusted.id, found, trusted.algorithms
        types, audiences = trusted.token_types, trusted.audiences

    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        return Deny(Reason.ALGORITHM_NOT_ALLOWED, "alg not allowed for this issuer")
    if "crit" in header:
        return Deny(Reason.HEADER_UNSUPPORTED, "crit header present")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or normal_typ(typ) not in types):
        return Deny(Reason.TOKEN_TYPE_INVALID, "typ not accepted for this issuer")
    if typ is None and issuer_id == SELF_ISSUER_ID:
        return Deny(Reason.TOKEN_TYPE_INVALID, "typ missing")
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

    return _subject_claims(claims, issuer_id, iss, audiences)


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


def _valid_act(act: Any, depth: int) -> bool:
    if depth == 0 or not isinstance(act, dict) or not isinstance(act.get("sub"), str):
        return False
    inner = act.get("act")
    return inner is None or _valid_act(inner, depth - 1)
