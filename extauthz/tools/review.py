"""``extauthz review --policy POLICY LOG...``: what each rule of a policy really did, read
from decision logs, and (``--suggest OUT``) the policy narrowed to what was used.

The logs are streamed (plain or gzip, told by their first bytes; ``-`` is stdin), a line at a
time: memory is bounded by the policy, never by the log. Each rule keeps counters, its own
callers and scopes, and a sample of at most ``CALLER_SAMPLE`` other callers (those a pattern
admitted); every other set (revisions, unknown rule ids, deny reasons) is capped and the rest
counted under ``"(more)"``. A line that is not a decision log line (not JSON, no valid
``time`` or ``decision``, a field of the wrong type, longer than ``MAX_LINE_BYTES``) is
counted in ``malformed`` and skipped; blank lines are ignored.

What is counted where:

- ``--since T`` (RFC 3339 with a zone, or a duration back from now: ``90s``, ``30m``,
  ``24h``, ``7d``, ``2w``; ``--now`` fixes "now") skips older lines (``skipped``). Every
  other well-formed line is in ``window.lines``, whichever revision made it.
- Only lines whose ``policy_revision`` is the loaded policy's (``Policy.digest[:16]``) go into
  the per-rule figures. The others are counted per revision in ``revisions.other``; lines
  without a revision (version 1 lines, and lines logged before any policy was loaded) are
  counted there under ``"unknown"``: nothing says which document made them.
- A line of the current revision naming a rule the policy does not have goes to
  ``unknown_rules``; one without a rule (``no_rule``, ``token_missing``, ...) to
  ``without_rule``.
- Per rule, ``allowed``/``denied`` count enforced decisions; decisions made in shadow mode
  (``shadow: true``: a shadow rule, or a policy in shadow mode) are counted apart in
  ``shadow``. Usage counts both: ``callers_seen`` (any decision of the rule, allow or deny),
  ``scopes_granted`` and ``last_used`` (allows, would-be allows included): a shadow rule is
  reviewed before it is enforced, on what it would have granted.
- ``callers_unseen``: the rule's exact SPIFFE IDs no line showed, and its patterns no seen
  caller matches. ``scopes_never_granted``: grantable scopes no allow minted; null when some
  allow logged no scopes (a ``txnToken: pass`` hop sends the token on as received), since
  then nothing tells which were used.
- ``unused_rules``: rules no line reached at all; ``never_allowed``: rules reached, never
  allowed (only denied). The suggestion removes both.

The JSON report (``--format json``; text and md render the same figures)::

    {"policy": {"source", "revision", "rules"},
     "window": {"since", "from", "to", "lines"},      # times as the log spells them, or null
     "rules": [{"id", "purpose", "mode",               # mode: enforce | shadow
                "allowed", "denied",
                "callers_seen": {caller: lines}, "callers_other": lines beyond the sample,
                "callers_unseen": [workload],
                "scopes_granted": {scope: allows}, "scopes_never_granted": [scope] | null,
                "last_used": time | null,
                "deny_reasons": {reason: lines},       # most frequent first
                "shadow": {"allowed", "denied", "deny_reasons"}}],
     "unused_rules": [id], "never_allowed": [id],
     "without_rule": {"lines", "deny_reasons"},
     "unknown_rules": {id: lines},
     "revisions": {"current", "counted", "other": {revision | "unknown": lines}},
     "malformed": lines, "skipped": lines,
     "suggestion": {...}}                              # with --suggest only, see Suggestion

``--suggest OUT`` works on the policy document itself (PyYAML, comments are lost; every other
field is kept as written): rules never allowed are removed, scopes never granted leave
``grant.scopes`` (at least one stays), callers never seen leave ``match.workloads`` (a rule
left with none is removed). A rule that overlaps another (``policy.table.overlapping_rules``)
keeps its callers and stays even unused: without it the other rule would answer its requests,
which may grant more; its scopes are still narrowed. The result must compile, lint without an
error the original did not have, load its JWKS files if the original's loaded, and
``policy diff`` must find nothing that widens (a rule whose edits widen is left as it was);
if any of that fails, or nothing would be left, OUT is the policy unchanged and the report
says why. Relative ``jwks.file`` paths resolve against the policy's directory: OUT may be
anywhere, and a relative path is rewritten relative to OUT's directory (so OUT beside the
policy keeps every path as written, and can replace it in a pull request; directories that
share only the root get an absolute path). OUT may not be the policy file itself.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gzip
import io
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import yaml

from extauthz.decision.model import Policy, Rule, WorkloadPattern
from extauthz.errors import ExtauthzError, KeyLoadError, PolicyError
from extauthz.policy.compiler import (
    canonical_spiffe,
    compile_policy,
    load_policy,
    parse_instant,
    read_policy_text,
)
from extauthz.policy.loader import load_issuer_keys
from extauthz.policy.table import overlapping_rules
from extauthz.tools.diff import WIDENS, Change, diff_policies
from extauthz.tools.lint import ERROR, lint_text

__all__ = [
    "CALLER_SAMPLE",
    "MAX_KEYS",
    "MAX_LINE_BYTES",
    "MORE",
    "Review",
    "RuleStats",
    "Suggestion",
    "add_parser",
    "open_log",
    "parse_since",
    "render",
    "run",
    "suggest",
]

MAX_LINE_BYTES = 64 * 1024  # a real line is under 2 KB: host and path are cut to 256 and 1,024
CALLER_SAMPLE = 50  # callers per rule kept beside its exact IDs (those its patterns admit)
MAX_KEYS = 1000  # distinct revisions, unknown rule ids, deny reasons per table; the rest: MORE
MORE = "(more)"
UNKNOWN_REVISION = "unknown"
TOP = 5  # deny reasons the text and md reports show per rule
_SCOPE_STRINGS = 256  # distinct `scopes` values remembered per rule before splitting each
_BUFFER = 1 << 20
_OPTIONAL_STR = (str, type(None))
_DURATION = re.compile(r"(\d{1,9})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --- reading the logs ----------------------------------------------------------------------------


@contextlib.contextmanager
def open_log(name: str) -> Iterator[IO[bytes]]:
    """A decision log as bytes: ``-`` is stdin; gzip is told by its magic bytes, not its name.
    Raises ``OSError`` when it cannot be opened."""
    with contextlib.ExitStack() as stack:
        raw: Any  # a buffered binary reader: one that can peek
        if name == "-":
            raw = sys.stdin.buffer
            if not hasattr(raw, "peek"):
                raw = stack.enter_context(io.BufferedReader(raw, _BUFFER))
        else:
            raw = stack.enter_context(open(name, "rb", buffering=_BUFFER))  # noqa: SIM115
        if raw.peek(2)[:2] == b"\x1f\x8b":
            unzipped = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
            yield stack.enter_context(io.BufferedReader(unzipped, _BUFFER))
        else:
            yield raw


def _ms(seconds: float) -> str:
    """A Unix time as the log spells it (UTC, milliseconds), rounded up to the millisecond:
    a line at that time or later is in the window."""
    millis = math.ceil(round(seconds * 1000, 3))  # round first: 0.123 * 1000 is 123.00000001
    moment = _EPOCH + dt.timedelta(milliseconds=millis)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def parse_since(text: str, now: float) -> str:
    """``--since``: an RFC 3339 time with a zone, or a duration back from ``now`` (``7d``,
    ``24h``, ``30m``, ``90s``, ``2w``), as the log's time spelling. Raises ``ValueError``."""
    found = _DURATION.fullmatch(text.strip())
    if found:
        seconds = int(found.group(1)) * _UNIT[found.group(2)]
        return _ms(max(now - seconds, 0.0))
    instant = parse_instant(text.strip())
    if instant is None:
        raise ValueError(
            f"{text!r} is neither an RFC 3339 time with a zone (2026-12-01T00:00:00Z) nor a "
            "duration back from now (90s, 30m, 24h, 7d, 2w)"
        )
    return _ms(max(instant, 0.0))


def _bump(table: dict[str, int], key: str, by: int = 1) -> None:
    """Count ``key``; beyond ``MAX_KEYS`` distinct keys, under ``MORE``."""
    if key in table:
        table[key] += by
    elif len(table) < MAX_KEYS:
        table[key] = by
    else:
        table[MORE] = table.get(MORE, 0) + by


def _by_count(table: Mapping[str, int]) -> dict[str, int]:
    """Most frequent first, then by name; ``MORE`` last."""
    items = sorted(((k, v) for k, v in table.items() if k != MORE), key=lambda kv: (-kv[1], kv[0]))
    out = dict(items)
    if MORE in table:
        out[MORE] = table[MORE]
    return out


class RuleStats:
    """What the current revision's lines say about one rule."""

    __slots__ = (
        "allowed",
        "callers_other",
        "denied",
        "exact",
        "last_used",
        "others",
        "patterns",
        "reasons",
        "rule",
        "scope_strings",
        "scopes",
        "shadow_allowed",
        "shadow_denied",
        "shadow_reasons",
        "unmatched",
        "unscoped",
    )

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.allowed = self.denied = self.shadow_allowed = self.shadow_denied = 0
        self.reasons: dict[str, int] = {}
        self.shadow_reasons: dict[str, int] = {}
        # Lines per exact SPIFFE ID of the rule (all start at 0), and per other caller seen.
        self.exact: dict[str, int] = {w: 0 for w in rule.workloads if "*" not in w}
        self.others: dict[str, int] = {}
        self.callers_other = 0
        self.patterns = [WorkloadPattern.parse(w) for w in rule.workloads if "*" in w]
        self.unmatched = list(self.patterns)  # patterns no caller seen so far matches
        # Allows per `scopes` value as logged (few distinct ones), split into scopes at the end.
        self.scope_strings: dict[str, int] = {}
        self.scopes: dict[str, int] = {}
        self.unscoped = 0  # allows that logged no scopes
        self.last_used = ""

    def add(
        self, allow: bool, shadow: bool, when: str, caller: Any, scopes: Any, reason: Any
    ) -> None:
        """Count one decision of this rule."""
        if allow:
            if shadow:
                self.shadow_allowed += 1
            else:
                self.allowed += 1
            if when > self.last_used:
                self.last_used = when
            if scopes:
                seen = self.scope_strings
                if scopes in seen:
                    seen[scopes] += 1
                elif len(seen) < _SCOPE_STRINGS:
                    seen[scopes] = 1
                else:
                    for scope in scopes.split():
                        _bump(self.scopes, scope)
            else:
                self.unscoped += 1
        else:
            if shadow:
                self.shadow_denied += 1
                _bump(self.shadow_reasons, reason or "(none)")
            else:
                self.denied += 1
                _bump(self.reasons, reason or "(none)")
        if caller is None:
            return
        exact = self.exact
        count = exact.get(caller)
        if count is not None:
            exact[caller] = count + 1
            if count == 0 and self.unmatched:
                self._match(caller)
            return
        others = self.others
        if caller in others:
            others[caller] += 1
            return
        if self.unmatched:
            self._match(caller)
        if len(others) < CALLER_SAMPLE:
            others[caller] = 1
        else:
            self.callers_other += 1

    def _match(self, caller: str) -> None:
        self.unmatched = [p for p in self.unmatched if not p.matches(caller)]

    # -- the figures --

    @property
    def reached(self) -> bool:
        """Whether any line, enforced or shadow, came from this rule."""
        return bool(self.allowed or self.denied or self.shadow_allowed or self.shadow_denied)

    @property
    def used(self) -> bool:
        """Whether the rule allowed anything (in shadow mode too)."""
        return bool(self.allowed or self.shadow_allowed)

    def granted(self) -> dict[str, int]:
        """Allows per granted scope, by scope."""
        out = dict(self.scopes)
        for text, count in self.scope_strings.items():
            for scope in text.split():
                _bump(out, scope, count)
        return dict(sorted(out.items()))

    def never_granted(self) -> list[str] | None:
        """Grantable scopes no allow minted; None when some allow logged no scopes."""
        if self.unscoped:
            return None
        granted = self.granted()
        return sorted(s for s in self.rule.grant.scopes if s not in granted)

    def unseen(self) -> list[str]:
        """The rule's workload entries no line showed (exact) or matched (patterns), in the
        policy's order."""
        unmatched = {p.text for p in self.unmatched}
        return [w for w in self.rule.workloads if self.exact.get(w) == 0 or w in unmatched]

    def callers_seen(self) -> dict[str, int]:
        """Lines per caller: its exact IDs seen and the sample of the others."""
        seen = {c: n for c, n in self.exact.items() if n} | self.others
        return dict(sorted(seen.items()))

    def to_json(self, policy: Policy) -> dict[str, Any]:
        """The rule's entry of the JSON report."""
        rule = self.rule
        return {
            "id": rule.id,
            "purpose": rule.purpose,
            "mode": "shadow" if rule.shadow or policy.shadow else "enforce",
            "allowed": self.allowed,
            "denied": self.denied,
            "callers_seen": self.callers_seen(),
            "callers_other": self.callers_other,
            "callers_unseen": self.unseen(),
            "scopes_granted": self.granted(),
            "scopes_never_granted": self.never_granted(),
            "last_used": self.last_used or None,
            "deny_reasons": _by_count(self.reasons),
            "shadow": {
                "allowed": self.shadow_allowed,
                "denied": self.shadow_denied,
                "deny_reasons": _by_count(self.shadow_reasons),
            },
        }


class Review:
    """The figures of every line fed so far, for one policy."""

    def __init__(self, policy: Policy, since: str | None = None) -> None:
        self.policy = policy
        self.revision = policy.digest[:16]
        self.since = since
        self.stats = {rule.id: RuleStats(rule) for rule in policy.rules}
        self.lines = self.malformed = self.skipped = self.counted = 0
        self.first = self.last = ""
        self.other_revisions: dict[str, int] = {}
        self.unknown_rules: dict[str, int] = {}
        self.without_rule = 0
        self.without_rule_reasons: dict[str, int] = {}

    def feed(self, stream: IO[bytes]) -> None:
        """Count every line of ``stream``."""
        loads, error, optional = orjson.loads, orjson.JSONDecodeError, _OPTIONAL_STR
        since, current, stats = self.since or "", self.revision, self.stats
        readline = stream.readline
        first, last = self.first or "~", self.last  # "~" sorts after every digit
        lines = malformed = skipped = counted = 0
        try:
            while True:
                raw = readline(MAX_LINE_BYTES)
                if not raw:
                    break
                if len(raw) == MAX_LINE_BYTES and raw[-1:] != b"\n":
                    while (rest := readline(MAX_LINE_BYTES)) and rest[-1:] != b"\n":
                        pass  # the rest of a line too long to be one of ours
                    malformed += 1
                    continue
                try:
                    line = loads(raw)
                except error:
                    if raw.strip():
                        malformed += 1
                    continue
                if type(line) is not dict:
                    malformed += 1
                    continue
                when = line.get("time")
                decision = line.get("decision")
                shadow = line.get("shadow", False)
                rule_id = line.get("rule")
                caller: Any = line.get("caller")  # each checked below: str or None
                scopes: Any = line.get("scopes")
                reason = line.get("reason")
                revision = line.get("policy_revision")
                if (
                    type(when) is not str
                    or len(when) != 24
                    or when[10] != "T"
                    or when[23] != "Z"
                    or decision not in ("allow", "deny")
                    or type(shadow) is not bool
                    or type(rule_id) not in optional
                    or type(caller) not in optional
                    or type(scopes) not in optional
                    or type(reason) not in optional
                    or type(revision) not in optional
                ):
                    malformed += 1
                    continue
                if when < since:
                    skipped += 1
                    continue
                lines += 1
                if when < first:
                    first = when
                if when > last:
                    last = when
                if revision != current:
                    _bump(self.other_revisions, revision or UNKNOWN_REVISION)
                    continue
                counted += 1
                if rule_id is None:
                    self.without_rule += 1
                    if decision == "deny":
                        _bump(self.without_rule_reasons, reason or "(none)")
                    continue
                rule = stats.get(rule_id)
                if rule is None:
                    _bump(self.unknown_rules, rule_id)
                    continue
                if decision == "allow" and not shadow:
                    # The usual line, counted here (a call per line costs a tenth of the
                    # time): an enforced allow by a caller and with scopes seen before.
                    exact, granted = rule.exact, rule.scope_strings
                    seen = exact.get(caller)
                    if seen and scopes in granted:
                        rule.allowed += 1
                        exact[caller] = seen + 1
                        granted[scopes] += 1
                        if when > rule.last_used:
                            rule.last_used = when
                        continue
                rule.add(decision == "allow", shadow, when, caller, scopes, reason)
        finally:
            self.lines += lines
            self.malformed += malformed
            self.skipped += skipped
            self.counted += counted
            self.first = first if first != "~" else self.first
            self.last = last

    def to_json(self) -> dict[str, Any]:
        """The JSON report (the module docstring says every key)."""
        policy = self.policy
        rules = [self.stats[rule.id] for rule in policy.rules]
        return {
            "policy": {"source": policy.source, "revision": self.revision, "rules": len(rules)},
            "window": {
                "since": self.since,
                "from": self.first or None,
                "to": self.last or None,
                "lines": self.lines,
            },
            "rules": [stats.to_json(policy) for stats in rules],
            "unused_rules": [s.rule.id for s in rules if not s.reached],
            "never_allowed": [s.rule.id for s in rules if s.reached and not s.used],
            "without_rule": {
                "lines": self.without_rule,
                "deny_reasons": _by_count(self.without_rule_reasons),
            },
            "unknown_rules": _by_count(self.unknown_rules),
            "revisions": {
                "current": self.revision,
                "counted": self.counted,
                "other": _by_count(self.other_revisions),
            },
            "malformed": self.malformed,
            "skipped": self.skipped,
        }


# --- the suggestion ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Edit:
    remove: bool = False
    workloads: list[str] = field(default_factory=list)  # canonical entries to drop
    scopes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Suggestion:
    """What ``--suggest`` wrote to ``out``: what it removed, what it kept and why, and the
    ``policy diff`` of the change (narrowing only)."""

    out: Path
    changed: bool
    removed_rules: list[str] = field(default_factory=list)
    removed_workloads: dict[str, list[str]] = field(default_factory=dict)
    removed_scopes: dict[str, list[str]] = field(default_factory=dict)
    kept: list[dict[str, str]] = field(default_factory=list)  # {"rule", "why"}
    note: str = ""
    changes: list[Change] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report's ``suggestion`` entry."""
        return {
            "out": str(self.out),
            "changed": self.changed,
            "removed_rules": self.removed_rules,
            "removed_workloads": self.removed_workloads,
            "removed_scopes": self.removed_scopes,
            "kept": self.kept,
            "note": self.note,
            "changes": [c.to_json() for c in self.changes],
        }


def _plain(value: Any) -> Any:
    """The document as plain dicts and lists, nothing shared: a YAML alias would otherwise
    carry an edit of one rule into another."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _plan(policy: Policy, review: Review) -> tuple[dict[str, _Edit], list[dict[str, str]]]:
    """The edits the logs justify, rule by rule, and what is kept on purpose."""
    overlaps: dict[str, set[str]] = {}
    for a, b in overlapping_rules(policy.table):
        overlaps.setdefault(a.id, set()).add(b.id)
        overlaps.setdefault(b.id, set()).add(a.id)
    edits: dict[str, _Edit] = {}
    kept: list[dict[str, str]] = []
    for rule in policy.rules:
        stats = review.stats[rule.id]
        others = ", ".join(sorted(overlaps.get(rule.id, ())))
        handed = f"it overlaps {others}, which would answer its requests instead"
        if not stats.used:
            if others:
                kept.append({"rule": rule.id, "why": f"never allowed, but {handed}"})
            else:
                edits[rule.id] = _Edit(remove=True)
            continue
        edit = _Edit()
        unseen = stats.unseen()
        if unseen and others:
            kept.append({"rule": rule.id, "why": f"callers never seen are kept: {handed}"})
        elif unseen and len(unseen) == len(rule.workloads):
            edits[rule.id] = _Edit(remove=True)
            continue
        elif unseen:
            edit.workloads = unseen
        never = stats.never_granted()
        if never is None:
            kept.append(
                {"rule": rule.id, "why": "its scopes are kept: some allows logged no scopes"}
            )
        elif never and len(never) < len(rule.grant.scopes):
            edit.scopes = never
        if edit.workloads or edit.scopes:
            edits[rule.id] = edit
    return edits, kept


def _apply(doc: Any, edits: Mapping[str, _Edit]) -> Any:
    out = copy.deepcopy(doc)
    rules = []
    for node in out.get("rules") or []:
        ident = node.get("id") if isinstance(node, dict) else None
        edit = edits.get(ident) if isinstance(ident, str) else None
        if edit is None:
            rules.append(node)
            continue
        if edit.remove:
            continue
        if edit.workloads:
            match = node["match"]
            drop = set(edit.workloads)
            match["workloads"] = [w for w in match["workloads"] if canonical_spiffe(w) not in drop]
        if edit.scopes:
            grant = node["grant"]
            grant["scopes"] = [s for s in grant["scopes"] if s not in edit.scopes]
        rules.append(node)
    out["rules"] = rules
    return out


def _relocate(doc: Any, policy_dir: Path, out_dir: Path) -> bool:
    """Rewrite relative ``jwks.file`` paths to resolve from ``out_dir``; whether any changed."""
    if policy_dir == out_dir:
        return False
    # Relative while the two directories share more than the root; else absolute.
    shared = os.path.commonpath([policy_dir, out_dir]) != policy_dir.anchor
    changed = False
    for issuer in doc.get("trustedIssuers") or []:
        jwks = issuer.get("jwks") if isinstance(issuer, dict) else None
        name = jwks.get("file") if isinstance(jwks, dict) else None
        if isinstance(jwks, dict) and isinstance(name, str) and not os.path.isabs(name):
            target = os.path.normpath(policy_dir / name)
            jwks["file"] = os.path.relpath(target, out_dir) if shared else target
            changed = True
    return changed


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def _lint_errors(text: str, source: str, base_dir: Path) -> set[tuple[str, str | None, str]]:
    found = lint_text(text, source=source, base_dir=base_dir)
    return {(f.check, f.rule, f.message) for f in found if f.severity == ERROR}


def suggest(
    policy: Policy, text: str, policy_path: Path, review: Review, out: Path
) -> tuple[Suggestion, str]:
    """The narrowed policy's text for ``out`` and what it did (see the module docstring).
    ``policy`` is ``text`` compiled from ``policy_path``."""
    doc = _plain(yaml.safe_load(text))
    policy_dir, out_dir = policy_path.parent.resolve(), out.parent.resolve()
    unchanged = _plain(doc)
    moved = _relocate(unchanged, policy_dir, out_dir)
    unchanged_text = _dump(unchanged) if moved else text
    edits, kept = _plan(policy, review)
    result = Suggestion(out, changed=False, kept=kept)
    if not edits:
        result.note = "every rule, caller and scope was used: nothing to narrow"
        return result, unchanged_text
    try:
        old_keys = load_issuer_keys(policy)
    except KeyLoadError:
        old_keys = None  # the original's JWKS do not load either: nothing to compare
    while True:
        removed = [r.id for r in policy.rules if edits.get(r.id, _Edit()).remove]
        if len(removed) == len(policy.rules):
            result.note = "the suggestion would remove every rule: the policy is kept unchanged"
            return result, unchanged_text
        new_doc = _apply(doc, edits)
        _relocate(new_doc, policy_dir, out_dir)
        new_text = _dump(new_doc)
        try:
            new = compile_policy(new_text, source=str(out), base_dir=out.parent)
            keys = None if old_keys is None else (old_keys, load_issuer_keys(new))
        except ExtauthzError as exc:  # never expected: every edit keeps the document valid
            result.note = f"the narrowed policy does not load ({exc}): kept unchanged"
            return result, unchanged_text
        widening = [c for c in diff_policies(policy, new, keys) if c.effect == WIDENS]
        if not widening:
            break
        culprits = {c.rule for c in widening}
        if None in culprits or not culprits <= edits.keys():
            result.note = f"policy diff: {widening[0].render().strip()}: kept unchanged"
            return result, unchanged_text
        for change in widening:
            assert change.rule is not None
            edits.pop(change.rule, None)
            kept.append({"rule": change.rule, "why": f"policy diff: {change.kind} widens"})
        if not edits:
            result.note = "every edit would widen something: the policy is kept unchanged"
            return result, unchanged_text
    before = _lint_errors(text, str(policy_path), policy_path.parent)
    after = _lint_errors(new_text, str(out), out.parent)
    if after - before:
        check, ident, message = sorted(after - before, key=str)[0]
        result.note = f"lint: {check} {ident or ''} {message}: kept unchanged"
        return result, unchanged_text
    result.changed = True
    result.changes = diff_policies(policy, new, keys)
    for ident, edit in edits.items():
        if edit.remove:
            result.removed_rules.append(ident)
        if edit.workloads:
            result.removed_workloads[ident] = edit.workloads
        if edit.scopes:
            result.removed_scopes[ident] = edit.scopes
    return result, new_text


# --- rendering -----------------------------------------------------------------------------------


def _counts(table: Mapping[str, int], limit: int | None = None) -> str:
    items = list(table.items())
    shown = items[:limit] if limit else items
    text = ", ".join(f"{k} ({v})" for k, v in shown)
    if limit and len(items) > limit:
        text += f", {len(items) - limit} more"
    return text or "-"


def _names(values: Sequence[str] | None) -> str:
    if values is None:
        return "(not logged)"
    return ", ".join(values) or "-"


def _text(doc: Mapping[str, Any]) -> str:
    window, revisions = doc["window"], doc["revisions"]
    head = doc["policy"]
    out = [
        f"policy {head['source']} (revision {head['revision']}), {head['rules']} rule(s)",
        f"window {window['from'] or '-'} .. {window['to'] or '-'}: {window['lines']} line(s)"
        + (f" since {window['since']} ({doc['skipped']} older skipped)" if window["since"] else "")
        + f", {doc['malformed']} malformed",
        f"counted {revisions['counted']} line(s) of revision {revisions['current']}",
    ]
    for rule in doc["rules"]:
        shadow = rule["shadow"]
        status = "" if rule["id"] not in doc["unused_rules"] else "  UNUSED"
        if rule["id"] in doc["never_allowed"]:
            status = "  NEVER ALLOWED"
        out += [
            "",
            f"rule {rule['id']} ({rule['mode']}){status}",
            f"  allowed {rule['allowed']}, denied {rule['denied']}; "
            f"last used {rule['last_used'] or 'never'}",
            f"  callers seen: {_counts(rule['callers_seen'])}"
            + (f" (+{rule['callers_other']} line(s) of others)" if rule["callers_other"] else ""),
            f"  callers never seen: {_names(rule['callers_unseen'])}",
            f"  scopes granted: {_counts(rule['scopes_granted'])}",
            f"  scopes never granted: {_names(rule['scopes_never_granted'])}",
            f"  deny reasons: {_counts(rule['deny_reasons'], TOP)}",
        ]
        if shadow["allowed"] or shadow["denied"]:
            out.append(
                f"  shadow: would allow {shadow['allowed']}, would deny {shadow['denied']}"
                f" ({_counts(shadow['deny_reasons'], TOP)})"
            )
    out += [
        "",
        f"unused rules: {_names(doc['unused_rules'])}",
        f"never allowed: {_names(doc['never_allowed'])}",
        f"without a rule: {doc['without_rule']['lines']} line(s): "
        f"{_counts(doc['without_rule']['deny_reasons'], TOP)}",
        f"rules not in the policy: {_counts(doc['unknown_rules'])}",
        f"other revisions (not counted above): {_counts(revisions['other'])}",
    ]
    if "suggestion" in doc:
        out += ["", *_suggestion_text(doc["suggestion"])]
    return "\n".join(out)


def _suggestion_text(s: Mapping[str, Any]) -> list[str]:
    if not s["changed"]:
        return [f"suggestion {s['out']}: unchanged: {s['note']}"]
    out = [f"suggestion {s['out']}: narrows only (policy diff finds nothing that widens)"]
    out += [f"  remove rule {r}" for r in s["removed_rules"]]
    out += [f"  rule {r}: remove callers {', '.join(w)}" for r, w in s["removed_workloads"].items()]
    out += [f"  rule {r}: remove scopes {', '.join(w)}" for r, w in s["removed_scopes"].items()]
    out += [f"  kept: rule {k['rule']}: {k['why']}" for k in s["kept"]]
    return out


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _code(values: Sequence[str] | None) -> str:
    if values is None:
        return "(not logged)"
    return ", ".join(f"`{_cell(v)}`" for v in values) or "-"


def _md(doc: Mapping[str, Any]) -> str:
    window, revisions, head = doc["window"], doc["revisions"], doc["policy"]
    out = [
        f"### extauthz review: `{_cell(head['source'])}` (revision `{head['revision']}`)",
        "",
        f"{window['lines']} decision(s) from {window['from'] or '-'} to {window['to'] or '-'}"
        + (f" (since {window['since']})" if window["since"] else "")
        + f"; {revisions['counted']} of this revision, {doc['malformed']} malformed.",
        "",
        "| rule | mode | allowed | denied | shadow allow/deny | last used | callers never seen "
        "| scopes never granted | top deny reasons |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for rule in doc["rules"]:
        shadow = rule["shadow"]
        name = f"`{rule['id']}`"
        if rule["id"] in doc["unused_rules"]:
            name += " **unused**"
        elif rule["id"] in doc["never_allowed"]:
            name += " **never allowed**"
        cells = [
            name,
            rule["mode"],
            rule["allowed"],
            rule["denied"],
            f"{shadow['allowed']}/{shadow['denied']}",
            rule["last_used"] or "never",
            _code(rule["callers_unseen"]),
            _code(rule["scopes_never_granted"]),
            _cell(_counts(rule["deny_reasons"], TOP)),
        ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    out += ["", "| rule | callers seen (lines) | scopes granted (allows) |", "| --- | --- | --- |"]
    for rule in doc["rules"]:
        more = f" +{rule['callers_other']} line(s) of others" if rule["callers_other"] else ""
        out.append(
            f"| `{rule['id']}` | {_cell(_counts(rule['callers_seen']))}{more} "
            f"| {_cell(_counts(rule['scopes_granted']))} |"
        )
    out += [
        "",
        f"- without a rule: {doc['without_rule']['lines']} "
        f"({_cell(_counts(doc['without_rule']['deny_reasons'], TOP))})",
        f"- rules not in the policy: {_cell(_counts(doc['unknown_rules']))}",
        f"- other revisions, not counted: {_cell(_counts(revisions['other']))}",
    ]
    if "suggestion" in doc:
        out += ["", "#### Suggestion", "", *(f"- {line.strip()}" for line in
                                            _suggestion_text(doc["suggestion"]))]  # fmt: skip
    return "\n".join(out)


def render(doc: Mapping[str, Any], output: str = "text") -> str:
    """The report as text, Markdown (``md``, for a pull request) or JSON."""
    if output == "json":
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    return _md(doc) if output == "md" else _text(doc)


# --- the command ---------------------------------------------------------------------------------


def _since_argument(text: str) -> str:
    try:
        parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _now_argument(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1e11:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} must be a Unix time from 0 to 1e11")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``review`` on the top-level subcommands."""
    review = sub.add_parser("review", help="what each rule did, from decision logs")
    review.add_argument("--policy", required=True, help="the policy the logs are read against")
    review.add_argument("logs", nargs="+", metavar="LOG", help="decision log (.gz too; - stdin)")
    review.add_argument(
        "--since",
        type=_since_argument,
        metavar="T",
        help="only lines from T on: RFC 3339 with a zone, or back from now (24h, 7d)",
    )
    review.add_argument(
        "--now", type=_now_argument, help="the Unix time --since counts back from (default: now)"
    )
    review.add_argument("--format", choices=["text", "json", "md"], default="text")
    review.add_argument(
        "--suggest", metavar="OUT", help="write the policy narrowed to what was used to OUT"
    )
    review.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"extauthz: review: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``extauthz review``: 0 with the report on stdout, 2 on an operator mistake."""
    now = args.now if getattr(args, "now", None) is not None else time.time()
    path = Path(args.policy)
    try:
        since = parse_since(args.since, now) if args.since else None
    except ValueError as exc:
        return _fail(f"--since: {exc}")
    out = Path(args.suggest) if getattr(args, "suggest", None) else None
    if out is not None and path.is_dir():
        return _fail(
            "--suggest: needs a policy file, not a directory (review the directory without "
            "--suggest, or each team's policy as one file)"
        )
    try:
        if path.is_dir():
            text, policy = "", load_policy(path)  # its revision is of every file in it
        else:
            text = read_policy_text(path)  # read once: the digest and the suggestion are of it
            policy = compile_policy(text, source=str(path), base_dir=path.parent)
    except PolicyError as exc:
        more = len(exc.problems) - 1
        extra = f" (and {more} more problem(s))" if more > 0 else ""
        return _fail(f"cannot load the policy: {exc.problems[0]}{extra}")
    if out is not None:
        if out.resolve() == path.resolve():
            return _fail("--suggest: OUT must not be the policy itself")
        if not out.parent.is_dir():
            return _fail(f"--suggest: {out.parent} is not a directory")
    for name in args.logs:  # before reading any: a long log must not end in this mistake
        if name != "-" and not Path(name).exists():
            return _fail(f"{name}: no such file")
        if Path(name).is_dir():
            return _fail(f"{name}: is a directory")
    review = Review(policy, since)
    for name in args.logs:
        try:
            with open_log(name) as stream:
                review.feed(stream)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            return _fail(f"{name}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    doc = review.to_json()
    if out is not None:
        suggestion, new_text = suggest(policy, text, path, review, out)
        try:
            out.write_text(new_text, encoding="utf-8")
        except OSError as exc:
            return _fail(f"--suggest: cannot write {out}: {exc.strerror or exc}")
        doc["suggestion"] = suggestion.to_json()
    print(render(doc, getattr(args, "format", "text")))
    return 0
