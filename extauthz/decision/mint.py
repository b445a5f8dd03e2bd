"""Mint: the narrowed claims. Each line of ``narrow`` holds one point of the invariant.

The minted token has exactly one audience, the intersection of the subject's and the rule's
scopes (empty is a deny), a lifetime within the rule's ttl, the policy's maxTtl and the
subject's own ``exp``, and the caller in ``act``. Nothing of the subject token is copied unless
named here.

An access token's audience is the rule's, and the request it is for is in
``authorization_details`` (RFC 9396's registered claim). A transaction token's audience is the
trust domain (draft-ietf-oauth-transaction-tokens, "JWT Body Claims"); the workload it is for
is ``may_act``. The first hop starts the transaction (a new ``txn``, the rule in ``tctx``, the
request in ``rctx``); an inner hop's replacement keeps ``txn``, ``sub``, ``aud``, ``tctx`` and
``rctx`` of the one received and nests the call chain in ``act``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from extauthz.decision.authenticate import Subject
from extauthz.decision.authorize import Request
from extauthz.decision.model import Policy, Rule
from extauthz.decision.reasons import Deny, Reason

__all__ = ["REQUEST_DETAIL_TYPE", "actor_chain", "narrow", "within_grant"]

# The authorization_details entry that binds an access token to its request.
REQUEST_DETAIL_TYPE = "http_request"


def narrow(
    subject: Subject,
    rule: Rule,
    caller: str,
    request: Request,
    cert_thumbprint: str | None,
    policy: Policy,
    now: int,
    new_id: Callable[[], str],
) -> dict[str, Any] | Deny:
    """The claims of the token to mint for this subject, rule, caller and request."""
    scopes = subject.scopes & rule.grant.scopes
    if not scopes:
        return Deny(Reason.INSUFFICIENT_SCOPE, "subject holds none of the grantable scopes")
    ttl = min(rule.grant.ttl, policy.exchange.max_ttl)
    exp = min(subject.exp, now + ttl)
    if rule.active_until is not None:
        exp = min(exp, rule.active_until)  # a temporary grant ends for its tokens too
    if exp <= now:
        return Deny(Reason.TOKEN_EXPIRED, "subject token expires now")
    act: dict[str, Any] = {"sub": caller}
    if subject.act is not None:
        act["act"] = actor_chain(subject.act)
    exchange = policy.exchange
    if exchange.transaction_tokens:
        head = {"iss": exchange.issuer, "sub": subject.sub, "aud": exchange.trust_domain}
        return _transaction(head, subject, rule, caller, request, scopes, act, now, exp, new_id)
    claims: dict[str, Any] = {
        "iss": exchange.issuer,
        "sub": subject.sub,
        "aud": rule.grant.audience,
        "iat": now,
        "exp": exp,
        "jti": new_id(),
        "scope": " ".join(sorted(scopes)),
        "client_id": caller,
        "act": act,
        "authorization_details": [
            {
                "type": REQUEST_DETAIL_TYPE,
                "method": request.method,
                "host": request.host,
                "path": request.path,
            }
        ],
    }
    if cert_thumbprint is not None:
        claims["cnf"] = {"x5t#S256": cert_thumbprint}
    return claims


def _transaction(
    head: dict[str, Any],
    subject: Subject,
    rule: Rule,
    caller: str,
    request: Request,
    scopes: frozenset[str],
    act: dict[str, Any],
    now: int,
    exp: int,
    new_id: Callable[[], str],
) -> dict[str, Any]:
    """A Txn-Token: the first of its transaction, or an inner hop's narrower replacement.
    ``head`` holds ``iss``, ``sub`` and ``aud`` (the trust domain)."""
    claims = dict(head)
    if subject.transaction:
        # "Txn-Token as a subject_token": txn, sub and aud are never modified (the subject
        # was verified to have this aud); the contexts are the transaction's and go on as
        # they were asserted.
        claims["txn"] = subject.txn
        tctx, rctx = subject.tctx, subject.rctx
    else:
        claims["txn"] = new_id()
        tctx = {"rule": rule.id, "purpose": rule.purpose}
        rctx = {
            "req_wl": caller,
            "method": request.method,
            "host": request.host,
            "path": request.path,
        }
    claims |= {
        "iat": now,
        "exp": exp,
        "jti": new_id(),
        "scope": " ".join(sorted(scopes)),
        "req_wl": caller,
        "act": act,
        "may_act": {"sub": rule.grant.audience},
    }
    if tctx is not None:
        claims["tctx"] = dict(tctx)
    if rctx is not None:
        claims["rctx"] = dict(rctx)
    return claims


def within_grant(subject: Subject, rule: Rule, now: int) -> None | Deny:
    """For ``txnToken: pass``: None (nothing to mint) when the received Txn-Token holds some
    scopes, none the rule does not grant, and has not expired (no leeway for a token that
    goes on: the next hop would refuse it); it then goes on as received."""
    if subject.exp <= now:
        return Deny(Reason.TOKEN_EXPIRED, "the Txn-Token expires now")
    if not subject.scopes:
        return Deny(Reason.INSUFFICIENT_SCOPE, "the Txn-Token holds no scope")
    wider = subject.scopes - rule.grant.scopes
    if wider:
        detail = "the Txn-Token holds scopes this rule does not grant: " + " ".join(sorted(wider))
        return Deny(Reason.INSUFFICIENT_SCOPE, detail)
    return None


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
