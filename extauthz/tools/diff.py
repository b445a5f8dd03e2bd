"""``extauthz policy diff OLD NEW``: what a policy change does to the grants.

Rules are compared by id. Every change is classified: widening (someone can get a token they
could not, or a token that does more or lives longer), narrowing, or neutral. A review gate
fails the change when anything widens.

For a policy directory each change names the file it is in (the new rule's, the old one's for
a removal, the shared file's for the shared sections), and with an owners file (``Owners``:
``glob owner...`` lines, the last matching line wins, as in CODEOWNERS) who owns that file, so
a review gate can ask the right team.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from extauthz.decision.jose import IssuerKeys
from extauthz.decision.model import ClaimCondition, Policy, Rule, TrustedIssuer
from extauthz.policy.table import overlapping_rules

__all__ = [
    "NARROWS",
    "NEUTRAL",
    "WIDENS",
    "Change",
    "Owners",
    "OwnersError",
    "diff_policies",
    "load_owners",
    "render",
]

WIDENS, NARROWS, NEUTRAL = "widens", "narrows", "neutral"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two policies, and whether it widens what they grant."""

    effect: str  # widens | narrows | neutral
    kind: str  # stable: rule-added, scopes-added, ttl-raised, ...
    rule: str | None
    detail: str
    file: str | None = None  # the file of a policy directory the change is in
    owners: tuple[str, ...] = ()  # who owns that file (``Owners``)

    def render(self) -> str:
        """One line for a reviewer."""
        mark = {WIDENS: "WIDENS ", NARROWS: "narrows", NEUTRAL: "       "}[self.effect]
        subject = f"rule {self.rule}: " if self.rule else ""
        where = ""
        if self.file is not None:
            where = f"  [{self.file}" + (
                f"; owners {' '.join(self.owners)}]" if self.owners else "]"
            )
        return f"{mark}  {self.kind}: {subject}{self.detail}{where}"

    def to_json(self) -> dict[str, Any]:
        """The change as a JSON object (``file`` and ``owners`` for a policy directory)."""
        doc = asdict(self)
        if self.file is None:
            del doc["file"], doc["owners"]
        else:
            doc["owners"] = list(self.owners)
        return doc


class OwnersError(ValueError):
    """An owners file that cannot be read or has a line that is not ``glob owner...``."""


@dataclass(frozen=True, slots=True)
class Owners:
    """Who owns which file of a policy directory: ``(glob, owners)`` in file order; a file's
    owners are those of the last glob that matches its name (as in CODEOWNERS)."""

    entries: tuple[tuple[str, tuple[str, ...]], ...]

    def of(self, file: str) -> tuple[str, ...]:
        """The owners of ``file`` (matched by its name inside the policy directory)."""
        name = Path(file).name
        found: tuple[str, ...] = ()
        for glob, owners in self.entries:
            if fnmatch.fnmatchcase(name, glob):
                found = owners
        return found


def load_owners(path: Path) -> Owners:
    """Parse an owners file: one ``glob owner [owner...]`` per line, ``#`` comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OwnersError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise OwnersError(f"{path}:{number}: expected a file glob and at least one owner")
        entries.append((words[0], tuple(words[1:])))
    return Owners(tuple(entries))


def render(changes: Sequence[Change], output: str = "text") -> str:
    """The report ``policy diff`` prints: one line per change and a verdict, and for a policy
    directory the files changed with their owners; or JSON."""
    widens = [c for c in changes if c.effect == WIDENS]
    files = _by_file(changes)
    if output == "json":
        doc: dict[str, Any] = {"changes": [c.to_json() for c in changes], "widens": bool(widens)}
        if files:
            doc["files"] = files
        return json.dumps(doc, indent=2)
    lines = [change.render() for change in changes]
    if not changes:
        lines.append("no change to what the policy grants")
    elif widens:
        lines.append(f"{len(widens)} change(s) WIDEN what the policy grants")
    for file, summary in files.items():
        owners = " ".join(summary["owners"]) or "no owner"
        verdict = "widens" if summary["widens"] else "does not widen"
        lines.append(f"file {file}: {summary['changes']} change(s), {verdict}; owners: {owners}")
    return "\n".join(lines)


def _by_file(changes: Sequence[Change]) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for change in changes:
        if change.file is None:
            continue
        summary = files.setdefault(
            change.file, {"owners": list(change.owners), "changes": 0, "widens": False}
        )
        summary["changes"] += 1
        summary["widens"] = summary["widens"] or change.effect == WIDENS
    return dict(sorted(files.items()))


def _located(
    changes: list[Change], old: Policy, new: Policy, owners: Owners | None
) -> list[Change]:
    """Each change with its file, when either policy is a directory (several files)."""
    if len(old.files) <= 1 and len(new.files) <= 1 and owners is None:
        return changes
    old_rules = {r.id: r for r in old.rules}
    new_rules = {r.id: r for r in new.rules}
    shared = new.files[0] if new.files else new.source
    out = []
    for change in changes:
        rule = new_rules.get(change.rule or "") or old_rules.get(change.rule or "")
        file = rule.file if rule is not None and rule.file else shared
        out.append(replace(change, file=file, owners=owners.of(file) if owners else ()))
    return out


def diff_policies(
    old: Policy,
    new: Policy,
    keys: tuple[Mapping[str, IssuerKeys], Mapping[str, IssuerKeys]] | None = None,
    owners: Owners | None = None,
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
        was, now = Path(old_rules[ident].file).name, Path(new_rules[ident].file).name
        if was != now and len(old.files) > 1 and len(new.files) > 1:
            changes.append(Change(NEUTRAL, "rule-moved", ident, f"from {was} to {now}"))
    return _located(changes, old, new, owners)


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
