"""Mint: the narrowed claims. Each line of ``narrow`` holds one point of the invariant.

The minted token has exactly one audience (the rule's), the intersection of the subject's and
the rule's scopes (empty is a deny), a lifetime within the rule's ttl, the policy's maxTtl and
the subject's own ``exp``, the caller in ``act`` and the request in ``req``. Nothing of the
subject token is copied unless named here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from extauthz.decision.authenticate import Subject
from extauthz.decision.authorize import Request
from extauthz.decision.model import Policy, Rule
from extauthz.decision.reasons import Deny, Reason

__all__ = ["actor_chain", "narrow"]


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
    if exp <= now:
        return Deny(Reason.TOKEN_EXPIRED, "subject token expires now")
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
