"""The decision: authenticate -> identify -> authorize -> mint, pure and in one place.

Nothing here does I/O, reads the clock or knows gRPC. ``decide`` takes a plain ``CheckInput``,
an immutable ``Snapshot`` of everything loaded (policy, issuer keys, signing keys), the time, an
id source and, optionally, a cache of verified subject tokens, and returns a ``Decision``. A
deny is a value with a stable ``Reason``; the only exceptions that can leave ``decide`` are
bugs, and the sidecar turns those into a deny too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extauthz.decision.authenticate import Subject, SubjectCache, authenticate
from extauthz.decision.authorize import Request, authorize, request_of
from extauthz.decision.identity import identify
from extauthz.decision.mint import narrow, within_grant
from extauthz.decision.model import Policy, Rule, Snapshot
from extauthz.decision.reasons import Deny, Reason

__all__ = ["CheckInput", "Decision", "decide"]


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What the front extracted from Envoy's check; plain strings only."""

    method: str
    host: str
    path: str  # the raw request target, query included
    headers: Mapping[str, str]  # lower-case names, as Envoy sends them
    principal: str  # the mTLS peer's SPIFFE ID (gRPC: source.principal; HTTP: the XFCC URI)
    peer_certificate: str = ""  # PEM, when Envoy includes it
    request_id: str = ""
    peer_certificate_hash: str = ""  # hex SHA-256 of the peer certificate's DER (XFCC Hash)
    # Whether ``headers`` holds every request header (gRPC), or only those Envoy was told to
    # forward (HTTP): credential headers are removed upstream only where they were seen, so
    # with a partial view every one of them is removed.
    all_headers: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check: the reason, what was found on the way, and on an enforced
    allow the signed token and where it goes."""

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
    issuer_id: str | None = None  # set on key_unknown, so the sidecar can refetch that JWKS
    shadow: bool = False  # computed and logged, not enforced: the request passes untouched
    # An inner hop's Txn-Token goes on as received: nothing is minted, credentials other than
    # the Txn-Token are still removed.
    passthrough: bool = False
    cache_hit: bool | None = None  # whether the subject cache answered; None: not consulted

    @property
    def allowed(self) -> bool:
        """Whether a rule allowed the exchange (in shadow mode too)."""
        return self.reason is Reason.ALLOWED

    @property
    def verdict(self) -> str:
        """``allow`` or ``deny``, as the log, the metrics and the tools spell it."""
        return "allow" if self.reason is Reason.ALLOWED else "deny"


def decide(
    inp: CheckInput,
    snapshot: Snapshot,
    now: float,
    new_id: Callable[[], str],
    cache: SubjectCache | None = None,
) -> Decision:
    """The phases in order; the order is the security argument, read it top to bottom.

    Each phase returns its result or a ``Deny``, and the first deny is the decision. Only an
    allowed request that is enforced (not in shadow mode) is signed."""
    policy = snapshot.policy

    subject, cache_hit = authenticate(inp.headers, snapshot, now, cache)
    if isinstance(subject, Deny):
        return _denied(subject, policy, cache_hit=cache_hit)

    xfcc = inp.headers.get("x-forwarded-client-cert", "")
    caller = identify(inp.principal, inp.peer_certificate, xfcc, policy, inp.peer_certificate_hash)
    if isinstance(caller, Deny):
        return _denied(caller, policy, subject=subject, cache_hit=cache_hit)

    request = request_of(inp.method, inp.host, inp.path, inp.headers)
    if isinstance(request, Deny):
        return _denied(request, policy, caller.spiffe_id, subject, cache_hit=cache_hit)

    rule = authorize(subject, caller.spiffe_id, request, policy, now)
    if isinstance(rule, Deny):
        return _denied(rule, policy, caller.spiffe_id, subject, request, cache_hit)
    # Shadow mode: the verdict and the would-be claims are logged; nothing is signed or
    # injected, and the front lets the request through as it came.
    shadow = policy.shadow or rule.shadow

    # An inner hop that passes its Txn-Token on mints nothing, if the token is within the
    # grant; everything else mints the narrowed claims.
    claims = (
        within_grant(subject, rule, int(now))
        if rule.txn == "pass"
        else narrow(
            subject, rule, caller.spiffe_id, request, caller.thumbprint, policy, int(now), new_id
        )
    )
    if isinstance(claims, Deny):
        found = Deny(claims.reason, claims.detail, rule)
        return _denied(found, policy, caller.spiffe_id, subject, request, cache_hit)

    token = None
    if claims is not None and not shadow:
        token = snapshot.signing_key.sign(claims, policy.exchange.typ)
    return Decision(
        Reason.ALLOWED,
        rule=rule,
        caller=caller.spiffe_id,
        subject=subject,
        request=request,
        claims=claims,
        token=token,
        header=policy.exchange.header,
        strip_headers=_strip(policy, inp),
        passthrough=claims is None,
        shadow=shadow,
        cache_hit=cache_hit,
    )


def _strip(policy: Policy, inp: CheckInput) -> tuple[str, ...]:
    """The credential headers to remove upstream: those seen, or all of them when the front
    sees only some headers."""
    strip = policy.exchange.strip_headers
    if inp.all_headers:
        strip = tuple(name for name in strip if name in inp.headers)
    return strip


def _denied(
    deny: Deny,
    policy: Policy,
    caller: str | None = None,
    subject: Subject | None = None,
    request: Request | None = None,
    cache_hit: bool | None = None,
) -> Decision:
    # A deny is shadowed too when the policy, or the rule that was found, is in shadow mode:
    # what would have been refused is logged and the request passes as it came.
    # A rule outside its window matches nothing, so it shadows nothing either: a staged
    # shadow rule must not wave requests through before its window opens or after it ends.
    found = deny.rule is not None and deny.reason is not Reason.RULE_INACTIVE
    shadow = policy.shadow or (found and deny.rule is not None and deny.rule.shadow)
    return Decision(
        deny.reason,
        deny.detail,
        rule=deny.rule,
        caller=caller,
        subject=subject,
        request=request,
        issuer_id=deny.issuer_id,
        shadow=shadow,
        cache_hit=cache_hit,
    )
