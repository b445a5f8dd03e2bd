"""Authorize: the one rule for this request, caller and issuer, and its requirements.

The request is looked up by (host, method, normalised path); the rule is then picked by the
calling workload and the subject's issuer. No rule is a deny, never a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extauthz.decision import paths
from extauthz.decision.authenticate import Subject
from extauthz.decision.model import SELF_ISSUER_ID, Policy, Rule, normalise_host
from extauthz.decision.reasons import Deny, Reason

__all__ = ["Request", "authorize", "request_of"]


@dataclass(frozen=True, slots=True)
class Request:
    """The request as rules see it: method, normalised host and path segments."""

    method: str
    host: str
    segments: paths.Segments  # the normalised path

    @property
    def path(self) -> str:
        """The normalised path, as the minted token's request binding names it."""
        return paths.join(self.segments)


def request_of(
    method: str, host: str, path: str, headers: Mapping[str, str] | None = None
) -> Request | Deny:
    """The normalised request, or a deny when its host or path cannot be read safely. A
    ``host`` header that Envoy passed beside ``:authority`` must name the same host."""
    name = normalise_host(host)
    if name is None:
        return Deny(Reason.HOST_INVALID, "host is not one host[:port]")
    for header in (":authority", "host"):
        other = (headers or {}).get(header)
        if other is not None and other != host and normalise_host(other) != name:
            return Deny(Reason.HOST_INVALID, f"{header} names another host")
    segments = paths.normalise(path)
    if segments is None:
        return Deny(Reason.PATH_INVALID, "path cannot be normalised safely")
    return Request(method, name, segments)


def authorize(
    subject: Subject, caller: str, request: Request, policy: Policy, now: float
) -> Rule | Deny:
    """The rule that allows this exchange, or why there is none."""
    rule, inactive, shape = policy.find_active(
        request.host, request.method, request.segments, caller, subject.issuer_id, now
    )
    if rule is None and inactive is not None:
        return Deny(Reason.RULE_INACTIVE, "the rule is outside its active window", inactive)
    if rule is None:
        if subject.transaction:
            return Deny(Reason.NO_RULE, "no txnToken rule for this Txn-Token")
        if subject.issuer_id == SELF_ISSUER_ID:
            return Deny(Reason.REEXCHANGE_DENIED, "a minted token is not a subject token here")
        return Deny(Reason.NO_RULE)
    # A Txn-Token's aud is the trust domain; the one workload it was minted for is in its
    # may_act, checked below, so a Txn-Token replayed by any other workload is refused.
    reexchanged = subject.issuer_id == SELF_ISSUER_ID and not subject.transaction
    if reexchanged and caller not in subject.audiences:
        return Deny(Reason.REEXCHANGE_DENIED, "minted token was not issued to this caller", rule)
    if bool(rule.txn) != subject.transaction:
        # The compiler keeps the two apart (by issuer); this holds it here too.
        return Deny(Reason.NO_RULE, "a Txn-Token rule and a bearer token, or the reverse", rule)
    if subject.may_act is not None and subject.may_act.get("sub") != caller:
        return Deny(Reason.ACTOR_NOT_PERMITTED, "may_act does not name the caller", rule)
    missing = rule.require_scopes - subject.scopes
    if missing:
        detail = "missing required scopes: " + " ".join(sorted(missing))
        return Deny(Reason.INSUFFICIENT_SCOPE, detail, rule)
    unmet = rule.unmet_claim(subject.claims, request.segments, shape) if rule.claims else None
    if unmet is not None:
        # The claim is named, its value never: the detail reaches the decision log.
        return Deny(Reason.CLAIM_MISMATCH, f"claim {unmet} does not meet the rule", rule)
    return rule
