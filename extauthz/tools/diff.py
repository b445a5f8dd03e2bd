"""``extauthz policy diff OLD NEW``: what a policy change does to the grants.

Rules are compared by id. Every change is classified: widening (someone can get a token they
could not, or a token that does more or lives longer), narrowing, or neutral. A review gate
fails the change when anything widens.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from extauthz.decision.jose import IssuerKeys
from extauthz.decision.model import ClaimCondition, Policy, Rule, TrustedIssuer
from extauthz.policy.table import overlapping_rules

__all__ = ["NARROWS", "NEUTRAL", "WIDENS", "Change", "diff_policies", "render"]

WIDENS, NARROWS, NEUTRAL = "widens", "narrows", "neutral"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two policies, and whether it widens what they grant."""

    effect: str  # widens | narrows | neutral
    kind: str  # stable: rule-added, scopes-added, ttl-raised, ...
    rule: str | None
    detail: str

    def render(self) -> str:
        """One line for a reviewer."""
        mark = {WIDENS: "WIDENS ", NARROWS: "narrows", NEUTRAL: "       "}[self.effect]
        subject = f"rule {self.rule}: " if self.rule else ""
        return f"{mark}  {self.kind}: {subject}{self.detail}"

    def to_json(self) -> dict[str, Any]:
        """The change as a JSON object."""
        return asdict(self)


def render(changes: Sequence[Change], output: str = "text") -> str:
    """The report ``policy diff`` prints: one line per change and a verdict, or JSON."""
    widens = [c for c in changes if c.effect == WIDENS]
    if output == "json":
        doc = {"changes": [c.to_json() for c in changes], "widens": bool(widens)}
        return json.dumps(doc, indent=2)
    lines = [change.render() for change in changes]
    if not changes:
        lines.append("no change to what the policy grants")
    elif widens:
        lines.append(f"{len(widens)} change(s) WIDEN what the policy grants")
    return "\n".join(lines)


def diff_policies(
    old: Policy,
    new: Policy,
    keys: tuple[Mapping[str, IssuerKeys], Mapping[str, IssuerKeys]] | None = None,
) -> list[Change]:
    """Every change from ``old`` to ``new``, rules compared by id. With ``keys`` (each
    policy's issuer keys loaded from its JWKS files), a key added to a trusted issuer widens
    and a key removed narrows; keys from URLs are not fetched, and the report says so."""
    changes = [*_exchange(old, new), *_issuers(old, new), *_workloads(old, new)]
    if keys is not None:
        changes.extend(_issuer_keys(old, new, *keys))
    old_rules = {r.id: r for r in old.rules}
    new_rules = {r.id: r for r in new.rules}
    for ident in sorted(new_rules.keys() - old_rules.keys()):
        rule = new_rules[ident]
        changes.append(
            Change(
                WIDENS,
                "rule-added",
                ident,
                f"{', '.join(sorted(rule.methods))} {rule.host} {', '.join(rule.paths)} -> "
                f"{rule.grant.audience} [{' '.join(sorted(rule.grant.scopes))}] "
                f"ttl {rule.grant.ttl}s",
            )
        )
    # A removed rule's requests go to the rules that overlapped it, if any remain.
    before: dict[str, set[str]] = {}
    for a, b in overlapping_rules(old.table):
        before.setdefault(a.id, set()).add(b.id)
        before.setdefault(b.id, set()).add(a.id)
    for ident in sorted(old_rules.keys() - new_rules.keys()):
        heirs = sorted(before.get(ident, set()) & new_rules.keys())
        if heirs:
            detail = f"its requests may go to {', '.join(heirs)} instead"
            changes.append(Change(WIDENS, "rule-removed", ident, detail))
        else:
            changes.append(Change(NARROWS, "rule-removed", ident, "no longer grants anything"))
    # Outside its window a rule does not match and another one may answer instead: a window
    # made smaller hands those requests to the rules that overlap it.
    overlaps: dict[str, set[str]] = {}
    for a, b in overlapping_rules(new.table):
        overlaps.setdefault(a.id, set()).add(b.id)
        overlaps.setdefault(b.id, set()).add(a.id)
    for ident in sorted(old_rules.keys() & new_rules.keys()):
        others = sorted(overlaps.get(ident, ()))
        changes.extend(_rule(old_rules[ident], new_rules[ident], others))
    return changes


def _sets(
    kind: str, rule: str | None, old: frozenset[str], new: frozenset[str], more: str
) -> Iterator[Change]:
    """Added members widen when ``more`` is WIDENS (and removed ones narrow), or the reverse."""
    less = NARROWS if more == WIDENS else WIDENS
    added, removed = sorted(new - old), sorted(old - new)
    if added:
        yield Change(more, f"{kind}-added", rule, " ".join(added))
    if removed:
        yield Change(less, f"{kind}-removed", rule, " ".join(removed))


def _number(kind: str, rule: str | None, old: int, new: int, unit: str = "s") -> Iterator[Change]:
    if new > old:
        yield Change(WIDENS, f"{kind}-raised", rule, f"{old}{unit} -> {new}{unit}")
    elif new < old:
        yield Change(NARROWS, f"{kind}-lowered", rule, f"{old}{unit} -> {new}{unit}")


def _rule(old: Rule, new: Rule, overlapping: Sequence[str] = ()) -> Iterator[Change]:
    r = new.id
    if old.grant.audience != new.grant.audience:
        yield Change(WIDENS, "audience-changed", r, f"{old.grant.audience} -> {new.grant.audience}")
    yield from _sets("scopes", r, old.grant.scopes, new.grant.scopes, WIDENS)
    yield from _number("ttl", r, old.grant.ttl, new.grant.ttl)
    yield from _sets("required-scopes", r, old.require_scopes, new.require_scopes, NARROWS)
    yield from _sets("workloads", r, frozenset(old.workloads), frozenset(new.workloads), WIDENS)
    yield from _sets("issuers", r, old.issuers, new.issuers, WIDENS)
    yield from _sets("methods", r, old.methods, new.methods, WIDENS)
    yield from _sets("paths", r, frozenset(old.paths), frozenset(new.paths), WIDENS)
    if old.host != new.host:
        yield Change(WIDENS, "host-changed", r, f"{old.host} -> {new.host}")
    if old.shadow != new.shadow:
        if new.shadow:
            yield Change(WIDENS, "shadow-enabled", r, "requests it matches pass unenforced")
        else:
            yield Change(NEUTRAL, "shadow-disabled", r, "now enforced")
    if old.reexchange != new.reexchange:
        effect = WIDENS if new.reexchange else NARROWS
        yield Change(effect, "reexchange-changed", r, f"{old.reexchange} -> {new.reexchange}")
    yield from _conditions(r, old, new)
    for change in _window(r, old, new):
        if change.effect == NARROWS and overlapping:
            # Those requests are not refused: the overlapping rules answer them.
            detail = f"{change.detail}; outside it {', '.join(overlapping)} may answer instead"
            change = Change(WIDENS, change.kind, r, detail)
        yield change
    if old.txn != new.txn:
        # A pass hop sends on the token as received, with its lifetime and the scopes within
        # the grant; a replacement is re-bound and re-capped by this rule.
        effect = WIDENS if new.txn == "pass" else NARROWS if old.txn == "pass" else NEUTRAL
        before, after = old.txn or "bearer", new.txn or "bearer"
        yield Change(effect, "txn-token-mode-changed", r, f"{before} -> {after}")
    if old.purpose != new.purpose:
        yield Change(NEUTRAL, "purpose-changed", r, f"{old.purpose!r} -> {new.purpose!r}")


def _accepted(condition: ClaimCondition) -> frozenset[tuple[str, object]] | None:
    """The values a condition accepts, typed (``True`` is not ``1``); None for a path
    parameter, which accepts what the path names."""
    if condition.kind == "param":
        return None
    return frozenset((type(v).__name__, v) for v in condition.values)


def _conditions(r: str, old: Rule, new: Rule) -> Iterator[Change]:
    before = {c.claim: c for c in old.claims}
    after = {c.claim: c for c in new.claims}
    for name in sorted(before.keys() - after.keys()):
        yield Change(WIDENS, "claim-condition-removed", r, before[name].text)
    for name in sorted(after.keys() - before.keys()):
        yield Change(NARROWS, "claim-condition-added", r, after[name].text)
    for name in sorted(before.keys() & after.keys()):
        a, b = before[name], after[name]
        x, y = _accepted(a), _accepted(b)
        if (a.kind, a.param, x) == (b.kind, b.param, y):
            continue
        detail = f"{a.text} -> {b.text}"
        if a.kind == b.kind and x is not None and y is not None and x < y:
            yield Change(WIDENS, "claim-condition-widened", r, detail)
        elif a.kind == b.kind and x is not None and y is not None and y < x:
            yield Change(NARROWS, "claim-condition-narrowed", r, detail)
        else:
            # Other values, or another kind of condition: someone new may meet it.
            yield Change(WIDENS, "claim-condition-changed", r, detail)


def _window(r: str, old: Rule, new: Rule) -> Iterator[Change]:
    """A window that opens earlier or closes later widens; the reverse narrows. A bound
    removed is the widest move of all (open on that side)."""
    for bound, a, b, later in (
        ("from", old.active_from, new.active_from, NARROWS),
        ("until", old.active_until, new.active_until, WIDENS),
    ):
        if a == b:
            continue
        detail = f"active.{bound}: {_when(a)} -> {_when(b)}"
        if a is None:
            yield Change(NARROWS, f"window-{bound}-added", r, detail)
        elif b is None:
            yield Change(WIDENS, f"window-{bound}-removed", r, detail)
        else:
            effect = later if b > a else (NARROWS if later == WIDENS else WIDENS)
            yield Change(effect, f"window-{bound}-{'later' if b > a else 'earlier'}", r, detail)


def _when(value: int | None) -> str:
    if value is None:
        return "(open)"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _exchange(old: Policy, new: Policy) -> Iterator[Change]:
    a, b = old.exchange, new.exchange
    yield from _number("max-ttl", None, a.max_ttl, b.max_ttl)
    yield from _number("leeway", None, a.leeway, b.leeway)
    yield from _number("max-token-bytes", None, a.max_token_bytes, b.max_token_bytes, " bytes")
    if a.issuer != b.issuer:
        yield Change(NEUTRAL, "exchange-issuer-changed", None, f"{a.issuer} -> {b.issuer}")
    if a.token_type != b.token_type:
        yield Change(NEUTRAL, "token-type-changed", None, f"{a.token_type} -> {b.token_type}")
    if a.trust_domain != b.trust_domain and b.trust_domain is not None:
        # Txn-Tokens are valid in their trust domain: another domain is another set of
        # workloads that accept them.
        detail = f"{a.trust_domain or '(none)'} -> {b.trust_domain}"
        yield Change(WIDENS, "trust-domain-changed", None, detail)
    yield from _sets(
        "strip-headers", None, frozenset(a.strip_headers), frozenset(b.strip_headers), NARROWS
    )
    if old.shadow != new.shadow:
        if new.shadow:
            yield Change(WIDENS, "policy-shadow-enabled", None, "nothing is enforced")
        else:
            yield Change(NEUTRAL, "policy-shadow-disabled", None, "enforced again")


def _issuers(old: Policy, new: Policy) -> Iterator[Change]:
    for ident in sorted(new.issuers.keys() - old.issuers.keys()):
        yield Change(WIDENS, "issuer-added", None, f"{ident} ({new.issuers[ident].issuer})")
    for ident in sorted(old.issuers.keys() - new.issuers.keys()):
        yield Change(NARROWS, "issuer-removed", None, ident)
    for ident in sorted(old.issuers.keys() & new.issuers.keys()):
        yield from _issuer(old.issuers[ident], new.issuers[ident])


def _issuer(a: TrustedIssuer, b: TrustedIssuer) -> Iterator[Change]:
    label = f"issuer {a.id}"
    if a.issuer != b.issuer:
        yield Change(WIDENS, "issuer-url-changed", None, f"{label}: {a.issuer} -> {b.issuer}")
    for kind, x, y in (
        ("issuer-audiences", a.audiences, b.audiences),
        ("issuer-algorithms", a.algorithms, b.algorithms),
        ("issuer-token-types", a.token_types, b.token_types),
    ):
        for change in _sets(kind, None, x, y, WIDENS):
            yield Change(change.effect, change.kind, None, f"{label}: {change.detail}")
    if a.jwks != b.jwks:
        yield Change(NEUTRAL, "issuer-jwks-changed", None, f"{label}: {a.jwks} -> {b.jwks}")


def _issuer_keys(
    old: Policy,
    new: Policy,
    old_keys: Mapping[str, IssuerKeys],
    new_keys: Mapping[str, IssuerKeys],
) -> Iterator[Change]:
    for ident in sorted(old.issuers.keys() & new.issuers.keys()):
        label = f"issuer {ident}"
        if new.issuers[ident].jwks.url is not None or old.issuers[ident].jwks.url is not None:
            yield Change(
                NEUTRAL,
                "issuer-keys-not-compared",
                None,
                f"{label}: keys come from a URL, which diff does not fetch",
            )
            continue
        before = _by_fingerprint(old_keys.get(ident))
        after = _by_fingerprint(new_keys.get(ident))
        for fingerprint in sorted(after.keys() - before.keys()):
            detail = f"{label}: trusts key {after[fingerprint]}"
            yield Change(WIDENS, "issuer-key-added", None, detail)
        for fingerprint in sorted(before.keys() - after.keys()):
            detail = f"{label}: no longer trusts key {before[fingerprint]}"
            yield Change(NARROWS, "issuer-key-removed", None, detail)


def _by_fingerprint(keys: IssuerKeys | None) -> dict[str, str]:
    """Each key by what it is, named by its kid (or its fingerprint when it has none)."""
    if keys is None:
        return {}
    found = [*keys.by_kid.values(), *keys.without_kid]
    return {k.fingerprint: k.kid or f"sha256:{k.fingerprint}" for k in found}


def _workloads(old: Policy, new: Policy) -> Iterator[Change]:
    yield from _sets("trust-domains", None, old.trust_domains, new.trust_domains, WIDENS)
    yield from _sets("xfcc-hops", None, old.xfcc_trusted_hops, new.xfcc_trusted_hops, WIDENS)
