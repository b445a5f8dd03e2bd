"""``extauthz policy paths POLICY``: the policy's trust paths as a document for review.

A trust path is one rule read end to end: the issuers whose tokens it takes, the workloads that
may call with them, the request it matches, and the audience it mints for, with the scopes,
lifetime and conditions of that grant. The paths are grouped twice: by audience (who can get a
token for this system: its fan-in) and by caller (which systems this workload can get tokens
for: its fan-out). Two shapes are flagged, as ``policy lint`` does: a rule shared by more than
``MAX_WORKLOADS_PER_RULE`` callers (``workloads-broad``), and a caller that reaches more than
one audience (``exchange-path-shared``). An exact SPIFFE ID reaches the audiences of the rules
that name it and of the rules whose caller patterns match it.

Formats: ``json`` (a stable shape, see ``TrustMap.to_json``), ``md`` (tables for a pull
request), ``dot`` (a Graphviz digraph issuer -> caller -> rule -> audience) and ``html`` (one
self-contained page: the graph as inline SVG drawn by Graphviz ``dot``, and the tables).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import shutil
import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.decision.model import SELF_ISSUER_ID, Policy, Rule, WorkloadPattern
from extauthz.errors import ExtauthzError, PolicyError
from extauthz.policy.compiler import load_policy
from extauthz.tools.lint import MAX_WORKLOADS_PER_RULE

__all__ = [
    "DOT_TIMEOUT",
    "FORMATS",
    "AudienceGroup",
    "CallerGroup",
    "Flag",
    "GraphvizError",
    "TrustMap",
    "TrustPath",
    "add_parser",
    "graph_svg",
    "render",
    "render_dot",
    "render_html",
    "render_json",
    "render_md",
    "run",
    "trust_map",
]

FORMATS = ("md", "json", "dot", "html")
DOT_TIMEOUT = 60.0  # seconds Graphviz may take to lay out the graph
GRAPHVIZ_PACKAGE = "graphviz"  # the Debian package that has the ``dot`` binary
_LABEL_WIDTH = 48  # characters per line of a graph label


class GraphvizError(ExtauthzError):
    """The graph cannot be drawn: ``dot`` is missing, fails or takes too long."""


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustPath:
    """One rule as a trust path: issuers -> callers -> the request -> the grant's audience."""

    rule: str
    purpose: str
    issuers: tuple[str, ...]
    callers: tuple[str, ...]
    host: str
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    audience: str
    scopes: tuple[str, ...]
    ttl: int
    require_scopes: tuple[str, ...]
    claims: tuple[str, ...]  # each ``ClaimCondition.text``
    window_from: str | None  # RFC 3339 UTC
    window_until: str | None
    mode: str  # "enforce" | "shadow"
    txn: str  # "bearer" | "replace" | "pass"
    reexchange: bool
    conditions: tuple[str, ...]  # everything above that limits the path, one line each

    def to_json(self) -> dict[str, Any]:
        """The path as a JSON object (see ``TrustMap.to_json``)."""
        return {
            "rule": self.rule,
            "purpose": self.purpose,
            "issuers": list(self.issuers),
            "callers": list(self.callers),
            "host": self.host,
            "methods": list(self.methods),
            "paths": list(self.paths),
            "audience": self.audience,
            "scopes": list(self.scopes),
            "ttl": self.ttl,
            "require_scopes": list(self.require_scopes),
            "claims": list(self.claims),
            "window": {"from": self.window_from, "until": self.window_until},
            "mode": self.mode,
            "txn": self.txn,
            "reexchange": self.reexchange,
            "conditions": list(self.conditions),
        }


@dataclass(frozen=True, slots=True)
class AudienceGroup:
    """Every path into one audience: its fan-in."""

    audience: str
    rules: tuple[str, ...]  # in policy order
    callers: tuple[str, ...]  # sorted; a pattern counts as one caller

    def to_json(self) -> dict[str, Any]:
        """The group as a JSON object."""
        return {"rules": list(self.rules), "callers": list(self.callers)}


@dataclass(frozen=True, slots=True)
class CallerGroup:
    """Every path out of one caller (an exact SPIFFE ID or a pattern): its fan-out."""

    caller: str
    pattern: bool
    rules: tuple[str, ...]  # the rules that name this caller, in policy order
    audiences: tuple[str, ...]  # their audiences, sorted
    matched_by: tuple[str, ...]  # for an exact ID: the patterns of other entries matching it
    reach: tuple[str, ...]  # audiences, with those reached through ``matched_by``

    def to_json(self) -> dict[str, Any]:
        """The group as a JSON object."""
        return {
            "pattern": self.pattern,
            "rules": list(self.rules),
            "audiences": list(self.audiences),
            "matched_by": list(self.matched_by),
            "reach": list(self.reach),
        }


@dataclass(frozen=True, slots=True)
class Flag:
    """A shape of the paths a reviewer should question, under the lint check of that worry."""

    check: str  # "workloads-broad" | "exchange-path-shared"
    kind: str  # "rule" | "caller"
    subject: str  # the rule id or the caller
    count: int
    limit: int
    message: str

    def to_json(self) -> dict[str, Any]:
        """The flag as a JSON object: ``{"check", "rule"|"caller", "count", "limit", ...}``."""
        return {
            "check": self.check,
            self.kind: self.subject,
            "count": self.count,
            "limit": self.limit,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class TrustMap:
    """A policy's trust paths, grouped by audience and by caller, with the flags."""

    source: str
    digest: str
    token_type: str
    trust_domain: str | None
    issuer: str  # the exchange's own ``iss``
    shadow: bool  # the whole policy in shadow mode
    issuers: dict[str, str]  # trusted issuer id -> its ``iss``
    paths: tuple[TrustPath, ...]
    by_audience: dict[str, AudienceGroup]  # sorted by audience
    by_caller: dict[str, CallerGroup]  # sorted by caller
    flags: tuple[Flag, ...]

    def flagged(self, kind: str, subject: str) -> Flag | None:
        """The flag on this rule or caller, if any."""
        return next((f for f in self.flags if f.kind == kind and f.subject == subject), None)

    def to_json(self) -> dict[str, Any]:
        """The document ``--format json`` prints; its shape is stable::

        {"policy": {"source", "digest", "token_type", "trust_domain", "issuer", "shadow",
                    "issuers": {id: iss}},
         "paths": [{"rule", "purpose", "issuers", "callers", "host", "methods", "paths",
                    "audience", "scopes", "ttl", "require_scopes", "claims",
                    "window": {"from", "until"}, "mode", "txn", "reexchange", "conditions"}],
         "by_audience": {audience: {"rules", "callers"}},
         "by_caller": {caller: {"pattern", "rules", "audiences", "matched_by", "reach"}},
         "fan_in": {audience: {"rules": n, "callers": n}},
         "fan_out": {caller: {"audiences": n, "rules": n}},
         "flags": [{"check", "rule" | "caller", "count", "limit", "message"}]}
        """
        return {
            "policy": {
                "source": self.source,
                "digest": self.digest,
                "token_type": self.token_type,
                "trust_domain": self.trust_domain,
                "issuer": self.issuer,
                "shadow": self.shadow,
                "issuers": dict(self.issuers),
            },
            "paths": [p.to_json() for p in self.paths],
            "by_audience": {a: g.to_json() for a, g in self.by_audience.items()},
            "by_caller": {c: g.to_json() for c, g in self.by_caller.items()},
            "fan_in": {
                a: {"rules": len(g.rules), "callers": len(g.callers)}
                for a, g in self.by_audience.items()
            },
            "fan_out": {
                c: {"audiences": len(g.reach), "rules": len(g.rules)}
                for c, g in self.by_caller.items()
            },
            "flags": [f.to_json() for f in self.flags],
        }


# --- building it ----------------------------------------------------------------------------


def trust_map(policy: Policy) -> TrustMap:
    """The trust paths of a compiled policy."""
    paths = tuple(_path(rule, policy) for rule in policy.rules)
    by_audience = _by_audience(paths)
    by_caller = _by_caller(paths)
    return TrustMap(
        source=policy.source,
        digest=policy.digest,
        token_type=policy.exchange.token_type,
        trust_domain=policy.exchange.trust_domain,
        issuer=policy.exchange.issuer,
        shadow=policy.shadow,
        issuers={i: policy.issuers[i].issuer for i in sorted(policy.issuers)},
        paths=paths,
        by_audience=by_audience,
        by_caller=by_caller,
        flags=(*_rule_flags(paths), *_caller_flags(by_caller)),
    )


def _path(rule: Rule, policy: Policy) -> TrustPath:
    shadow = rule.shadow or policy.shadow
    return TrustPath(
        rule=rule.id,
        purpose=rule.purpose,
        issuers=tuple(sorted(rule.issuers)),
        callers=rule.workloads,
        host=rule.host,
        methods=tuple(sorted(rule.methods)),
        paths=rule.paths,
        audience=rule.grant.audience,
        scopes=tuple(sorted(rule.grant.scopes)),
        ttl=rule.grant.ttl,
        require_scopes=tuple(sorted(rule.require_scopes)),
        claims=tuple(c.text for c in rule.claims),
        window_from=_when(rule.active_from),
        window_until=_when(rule.active_until),
        mode="shadow" if shadow else "enforce",
        txn=rule.txn or "bearer",
        reexchange=rule.reexchange,
        conditions=tuple(_conditions(rule, policy, shadow)),
    )


def _when(value: int | None) -> str | None:
    """A Unix time as RFC 3339 UTC, as ``policy diff`` prints it."""
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(rule: Rule, policy: Policy, shadow: bool) -> Iterator[str]:
    """What limits the path beyond who calls what, one readable line each."""
    if rule.require_scopes:
        yield "requires scopes " + ", ".join(sorted(rule.require_scopes))
    for condition in rule.claims:
        yield "requires claim " + condition.text
    if rule.active_from is not None:
        yield f"active from {_when(rule.active_from)}"
    if rule.active_until is not None:
        yield f"active until {_when(rule.active_until)}"
    if rule.txn == "replace":
        yield "takes a Txn-Token and replaces it with a narrower one"
    elif rule.txn == "pass":
        yield "takes a Txn-Token and passes it on unchanged"
    elif policy.exchange.transaction_tokens:
        yield "takes a bearer token and starts a transaction"
    if rule.reexchange:
        yield "re-exchange: accepts tokens this exchange minted"
    if shadow:
        yield "shadow mode: decided and logged, not enforced"


def _by_audience(paths: Sequence[TrustPath]) -> dict[str, AudienceGroup]:
    rules: dict[str, list[str]] = defaultdict(list)
    callers: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        rules[path.audience].append(path.rule)
        callers[path.audience].update(path.callers)
    return {
        aud: AudienceGroup(aud, tuple(rules[aud]), tuple(sorted(callers[aud])))
        for aud in sorted(rules)
    }


def _by_caller(paths: Sequence[TrustPath]) -> dict[str, CallerGroup]:
    rules: dict[str, list[str]] = defaultdict(list)
    audiences: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        for caller in dict.fromkeys(path.callers):
            rules[caller].append(path.rule)
            audiences[caller].add(path.audience)
    patterns = [(WorkloadPattern.parse(c), c) for c in sorted(rules) if _is_pattern(c)]
    out: dict[str, CallerGroup] = {}
    for caller in sorted(rules):
        matched_by = () if _is_pattern(caller) else _matching(patterns, caller)
        reach = audiences[caller].union(*(audiences[p] for p in matched_by))
        out[caller] = CallerGroup(
            caller=caller,
            pattern=_is_pattern(caller),
            rules=tuple(rules[caller]),
            audiences=tuple(sorted(audiences[caller])),
            matched_by=matched_by,
            reach=tuple(sorted(reach)),
        )
    return out


def _is_pattern(caller: str) -> bool:
    return "*" in caller


def _matching(patterns: Iterable[tuple[WorkloadPattern, str]], caller: str) -> tuple[str, ...]:
    return tuple(text for pattern, text in patterns if pattern.matches(caller))


def _rule_flags(paths: Iterable[TrustPath]) -> Iterator[Flag]:
    for path in paths:
        count = len(path.callers)
        if count > MAX_WORKLOADS_PER_RULE:
            message = (
                f"{count} callers share rule {path.rule} (more than {MAX_WORKLOADS_PER_RULE}): "
                "give each calling application its own rule and purpose"
            )
            yield Flag("workloads-broad", "rule", path.rule, count, MAX_WORKLOADS_PER_RULE, message)


def _caller_flags(by_caller: dict[str, CallerGroup]) -> Iterator[Flag]:
    for group in by_caller.values():
        count = len(group.reach)
        if count > 1:
            through = f" (also through {', '.join(group.matched_by)})" if group.matched_by else ""
            message = (
                f"{group.caller} reaches {count} audiences{through}: one path serves many "
                "apps; name each application's workloads in the rules for its own audience"
            )
            yield Flag("exchange-path-shared", "caller", group.caller, count, 1, message)


# --- tables, shared by md and html ----------------------------------------------------------

Cell = tuple[str, ...]  # the lines of one table cell, unescaped


@dataclass(frozen=True, slots=True)
class _Table:
    title: str
    anchor: str
    note: str
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    row_anchors: tuple[str, ...] = ()


def _summary(tm: TrustMap) -> tuple[str, ...]:
    domain = f", trust domain {tm.trust_domain}" if tm.trust_domain else ""
    return (
        f"Policy {tm.source} (sha256 {tm.digest}): exchange {tm.issuer}, "
        f"token type {tm.token_type}{domain}"
        + (", the whole policy in shadow mode" if tm.shadow else ""),
        f"{len(tm.paths)} rule(s), {len(tm.by_audience)} audience(s), "
        f"{len(tm.by_caller)} caller(s) (exact IDs and patterns), {len(tm.flags)} flag(s).",
    )


def _request(path: TrustPath) -> Cell:
    methods = ", ".join(path.methods)
    return tuple(f"{methods} {path.host}{p}" for p in path.paths)


def _grant(path: TrustPath) -> Cell:
    return (f"scopes {', '.join(path.scopes)}", f"ttl {path.ttl}s")


def _flag_cell(flag: Flag | None) -> Cell:
    return (f"FLAG {flag.check}: {flag.count} (limit {flag.limit})",) if flag else ()


def _fan_tables(tm: TrustMap) -> tuple[_Table, _Table]:
    fan_in = tuple(
        ((aud,), (str(len(g.rules)),), (str(len(g.callers)),)) for aud, g in tm.by_audience.items()
    )
    fan_out = tuple(
        (
            (caller,),
            ("pattern" if g.pattern else "exact ID",),
            (str(len(g.reach)),),
            (str(len(g.rules)),),
            _flag_cell(tm.flagged("caller", caller)),
        )
        for caller, g in tm.by_caller.items()
    )
    return (
        _Table("Fan-in", "fan-in", "", ("Audience", "Rules", "Callers"), fan_in),
        _Table("Fan-out", "fan-out", "", ("Caller", "Kind", "Audiences", "Rules", "Flag"), fan_out),
    )


def _audience_tables(tm: TrustMap) -> Iterator[_Table]:
    paths = {p.rule: p for p in tm.paths}
    headers = ("Rule", "Purpose", "Callers", "Issuers", "Request", "Grant", "Conditions", "Mode")
    for index, (aud, group) in enumerate(tm.by_audience.items()):
        rows = tuple(_audience_row(tm, paths[r]) for r in group.rules)
        title = f"Audience {aud}"
        note = f"{len(group.rules)} rule(s), {len(group.callers)} caller(s) reach it."
        anchors = tuple(f"rule-{r}" for r in group.rules)
        yield _Table(title, f"audience-{index}", note, headers, rows, anchors)


def _audience_row(tm: TrustMap, path: TrustPath) -> tuple[Cell, ...]:
    flag = _flag_cell(tm.flagged("rule", path.rule))
    return (
        (path.rule,),
        (path.purpose,),
        path.callers + flag,
        path.issuers,
        _request(path),
        _grant(path),
        path.conditions or ("none",),
        (path.mode, f"token: {path.txn}"),
    )


def _caller_tables(tm: TrustMap) -> Iterator[_Table]:
    paths = {p.rule: p for p in tm.paths}
    headers = ("Rule", "Purpose", "Audience", "Request", "Grant", "Mode")
    for index, (caller, group) in enumerate(tm.by_caller.items()):
        rows = tuple(_caller_row(paths[r]) for r in group.rules)
        kind = "pattern" if group.pattern else "exact ID"
        note = f"{kind}: reaches {len(group.reach)} audience(s) through {len(group.rules)} rule(s)."
        if group.matched_by:
            note += f" Also matched by the patterns {', '.join(group.matched_by)}."
        flag = tm.flagged("caller", caller)
        if flag:
            note += f" FLAG {flag.check}: {flag.message}."
        yield _Table(f"Caller {caller}", f"caller-{index}", note, headers, rows)


def _caller_row(path: TrustPath) -> tuple[Cell, ...]:
    return (
        (path.rule,),
        (path.purpose,),
        (path.audience,),
        _request(path),
        _grant(path),
        (path.mode, f"token: {path.txn}"),
    )


def _all_tables(tm: TrustMap) -> tuple[list[_Table], list[_Table]]:
    return list(_audience_tables(tm)), list(_caller_tables(tm))


# --- json and markdown ----------------------------------------------------------------------


def render_json(tm: TrustMap) -> str:
    """``--format json``: ``TrustMap.to_json``, indented."""
    return json.dumps(tm.to_json(), indent=2)


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#~!"})


def _md(text: str) -> str:
    """Policy text inside markdown: every character markdown reads escaped, one line."""
    return " ".join(text.split()).translate(_MD_SPECIAL)


def _md_table(table: _Table) -> list[str]:
    lines = [f"### {_md(table.title)}", ""]
    if table.note:
        lines += [_md(table.note), ""]
    lines.append("| " + " | ".join(table.headers) + " |")
    lines.append("|" + "---|" * len(table.headers))
    for row in table.rows:
        lines.append("| " + " | ".join("<br>".join(map(_md, c)) or " " for c in row) + " |")
    return [*lines, ""]


def render_md(tm: TrustMap) -> str:
    """``--format md``: the summary, the flags, fan-in and fan-out, then one table per
    audience and one per caller, for a reviewer reading a pull request."""
    lines = ["# Trust paths", "", *(_md(s) + "  " for s in _summary(tm)), "", "## Flags", ""]
    lines += [f"- **{f.check}**: {_md(f.message)}" for f in tm.flags] or ["None."]
    fan_in, fan_out = _fan_tables(tm)
    lines += ["", "## Fan-in and fan-out", "", *_md_table(fan_in), *_md_table(fan_out)]
    by_audience, by_caller = _all_tables(tm)
    lines += ["## By audience", ""] + [x for t in by_audience for x in _md_table(t)]
    lines += ["## By caller", ""] + [x for t in by_caller for x in _md_table(t)]
    return "\n".join(lines).rstrip()


# --- dot ------------------------------------------------------------------------------------


def _dot_string(text: str) -> str:
    """A double-quoted dot string: backslashes and quotes escaped, newlines as ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", "\\n") + '"'


def _label(*lines: str) -> str:
    """A node label: the lines, each wrapped to a readable width."""
    wrapped = [w for line in lines for w in _wrap(line) or [""]]
    return _dot_string("\n".join(wrapped))


def _wrap(line: str) -> list[str]:
    """Wrapped at spaces only: an ID, a host or a path is never cut."""
    return textwrap.wrap(line, _LABEL_WIDTH, break_long_words=False, break_on_hyphens=False)


def _attrs(**attrs: str) -> str:
    return "[" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "]"


_FLAGGED = {"color": '"#b00020"', "fontcolor": '"#b00020"', "penwidth": "2"}


class _Ids:
    """Safe dot node ids (``i0``, ``c3``...), one per distinct thing of each kind."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, key: str) -> str:
        return self._ids.setdefault((kind, key), f"{kind}{len(self._ids)}")


def render_dot(tm: TrustMap) -> str:
    """``--format dot``: a Graphviz digraph issuer -> caller -> rule -> audience. A flagged
    rule or caller is drawn in red; a caller pattern and a shadow rule are dashed."""
    ids = _Ids()
    lines = [
        "digraph trust_paths {",
        f"  graph [rankdir=LR, labelloc=t, fontname=Helvetica, label={_graph_label(tm)}];",
        "  node [fontname=Helvetica, fontsize=10];",
        '  edge [color="#555555"];',
    ]
    lines += _dot_nodes(tm, ids)
    lines += dict.fromkeys(_dot_edges(tm, ids))  # each edge once, in policy order
    return "\n".join([*lines, "}"])


def _graph_label(tm: TrustMap) -> str:
    counts = f"{len(tm.paths)} rule(s), {len(tm.by_audience)} audience(s), {len(tm.flags)} flag(s)"
    return _label(f"Trust paths of {tm.source}", f"sha256 {tm.digest[:16]}...", counts)


def _dot_nodes(tm: TrustMap, ids: _Ids) -> Iterator[str]:
    for issuer in sorted({i for p in tm.paths for i in p.issuers}):
        yield f"  {ids('i', issuer)} {_issuer_node(tm, issuer)};"
    for caller, group in tm.by_caller.items():
        yield f"  {ids('c', caller)} {_caller_node(tm, group)};"
    for path in tm.paths:
        yield f"  {ids('r', path.rule)} {_rule_node(tm, path)};"
    for aud, into in tm.by_audience.items():
        fan_in = f"{len(into.rules)} rule(s), {len(into.callers)} caller(s)"
        yield f"  {ids('a', aud)} {_attrs(shape='box3d', label=_label('audience', aud, fan_in))};"


def _issuer_node(tm: TrustMap, issuer: str) -> str:
    if issuer == SELF_ISSUER_ID:
        label = _label(f"issuer {issuer}", f"tokens this exchange minted ({tm.issuer})")
    else:
        label = _label(f"issuer {issuer}", tm.issuers.get(issuer, ""))
    return _attrs(shape="box", style='"rounded,filled"', fillcolor='"#eef3fb"', label=label)


def _caller_node(tm: TrustMap, group: CallerGroup) -> str:
    lines = [group.caller, f"reaches {len(group.reach)} audience(s)"]
    attrs = {"shape": "ellipse"}
    if group.pattern:
        lines.insert(1, "(pattern)")
        attrs["style"] = "dashed"
    flag = tm.flagged("caller", group.caller)
    if flag:
        lines.append(f"(!) {flag.check}")
        attrs.update(_FLAGGED)
    return _attrs(**attrs, label=_label(*lines))


def _rule_node(tm: TrustMap, path: TrustPath) -> str:
    lines = [f"rule {path.rule}", path.purpose, *_request(path), "; ".join(_grant(path))]
    lines += path.conditions
    attrs = {"shape": "box", "URL": _dot_string(f"#rule-{path.rule}")}
    if path.mode == "shadow":
        attrs["style"] = "dashed"
    flag = tm.flagged("rule", path.rule)
    if flag:
        lines.append(f"(!) {flag.check}: {flag.count} callers, more than {flag.limit}")
        attrs.update(_FLAGGED)
    return _attrs(**attrs, label=_label(*lines))


def _dot_edges(tm: TrustMap, ids: _Ids) -> Iterator[str]:
    for path in tm.paths:
        rule = ids("r", path.rule)
        for caller in path.callers:
            for issuer in path.issuers:
                yield f"  {ids('i', issuer)} -> {ids('c', caller)};"
            yield f"  {ids('c', caller)} -> {rule};"
        yield f"  {rule} -> {ids('a', path.audience)};"


# --- html -----------------------------------------------------------------------------------


def graph_svg(dot_text: str) -> str:
    """The graph drawn by Graphviz ``dot -Tsvg``, as an ``<svg>`` element to inline.
    Raises ``GraphvizError`` when ``dot`` is missing, fails or takes too long."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizError(
            f"--format html draws the graph with Graphviz's dot, which is not on PATH "
            f"(install the {GRAPHVIZ_PACKAGE} package: apt-get install {GRAPHVIZ_PACKAGE})"
        )
    try:
        done = subprocess.run(
            [dot, "-Tsvg"],
            input=dot_text,
            capture_output=True,
            encoding="utf-8",
            timeout=DOT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GraphvizError(f"dot took longer than {DOT_TIMEOUT:g}s to draw the graph") from None
    except OSError as exc:
        raise GraphvizError(f"cannot run {dot}: {exc.strerror or exc}") from exc
    start = done.stdout.find("<svg")
    if done.returncode != 0 or start < 0:
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise GraphvizError(f"dot failed (exit {done.returncode}): {first}")
    return done.stdout[start:].strip()


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #1b1b1b; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #c8c8c8; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td:first-child { white-space: nowrap; }
tr:target { background: #fff6c8; }
.flag { color: #b00020; font-weight: bold; }
figure { margin: 0; overflow: auto; border: 1px solid #e0e0e0; }
figure svg { max-width: 100%; height: auto; }
"""

# The page loads nothing: the browser refuses (and reports) anything but inline styles.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_cell(cell: Cell) -> str:
    parts = []
    for line in cell:
        escaped = _h(line)
        parts.append(
            f'<span class="flag">{escaped}</span>' if line.startswith("FLAG ") else escaped
        )
    return "<br>".join(parts)


def _html_table(table: _Table, level: int = 3) -> list[str]:
    out = [f'<h{level} id="{_h(table.anchor)}">{_h(table.title)}</h{level}>']
    if table.note:
        out.append(f"<p>{_h(table.note)}</p>")
    out.append("<table><thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in table.headers))
    out.append("</tr></thead><tbody>")
    anchors = table.row_anchors or ("",) * len(table.rows)
    for anchor, row in zip(anchors, table.rows, strict=True):
        attr = f' id="{_h(anchor)}"' if anchor else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>")
    return [*out, "</tbody></table>"]


def render_html(tm: TrustMap, svg: str) -> str:
    """``--format html``: one self-contained page, the graph (``svg``, from ``graph_svg``)
    and the tables. Every policy text is escaped; the page loads nothing."""
    fan_in, fan_out = _fan_tables(tm)
    by_audience, by_caller = _all_tables(tm)
    flags = [f'<li class="flag">{_h(f.check)}: {_h(f.message)}</li>' for f in tm.flags]
    body = [
        "<h1>Trust paths</h1>",
        *(f"<p>{_h(s)}</p>" for s in _summary(tm)),
        "<h2>Flags</h2>",
        "<ul>" + "".join(flags) + "</ul>" if flags else "<p>None.</p>",
        "<h2>Graph</h2>",
        f"<figure>{svg}</figure>",
        "<h2>Fan-in and fan-out</h2>",
        *_html_table(fan_in),
        *_html_table(fan_out),
        "<h2>By audience</h2>",
        *(x for t in by_audience for x in _html_table(t)),
        "<h2>By caller</h2>",
        *(x for t in by_caller for x in _html_table(t)),
    ]
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_h(_CSP)}">',
        f"<title>Trust paths: {_h(tm.source)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]
    return "\n".join([*head, *body, "</body></html>"])


# --- the command ----------------------------------------------------------------------------

_RENDERERS: dict[str, Callable[[TrustMap], str]] = {
    "json": render_json,
    "md": render_md,
    "dot": render_dot,
    "html": lambda tm: render_html(tm, graph_svg(render_dot(tm))),
}


def render(tm: TrustMap, output: str = "md") -> str:
    """The document in one of ``FORMATS``; ``html`` runs Graphviz (``GraphvizError``)."""
    return _RENDERERS[output](tm)


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``paths`` under the ``policy`` subcommands (``policy_sub``)."""
    paths = sub.add_parser("paths", help="the trust paths as a document: md, json, dot or html")
    paths.add_argument("policy", metavar="POLICY", help="policy YAML file, or a directory of them")
    paths.add_argument("--format", choices=FORMATS, default="md")
    paths.add_argument("--out", metavar="FILE", help="write the document here (else stdout)")
    paths.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``policy paths``: 0 with the document written; 2, one line on stderr, for an
    operator's mistake (no such file, a policy that does not compile, no Graphviz)."""
    try:
        text = render(trust_map(load_policy(Path(args.policy))), args.format)
    except PolicyError as exc:
        return _fail(_first_problem(exc))
    except GraphvizError as exc:
        return _fail(str(exc))
    return _emit(text, args.out)


def _first_problem(exc: PolicyError) -> str:
    if not exc.problems:
        return " ".join(str(exc).split())
    more = len(exc.problems) - 1
    tail = f" (and {more} more problem(s): see extauthz policy lint)" if more else ""
    return " ".join(str(exc.problems[0]).split()) + tail


def _emit(text: str, out: str | None) -> int:
    if out is None:
        sys.stdout.write(text + "\n")
        return 0
    try:
        Path(out).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {out}: {exc.strerror or exc}")
    return 0


def _fail(message: str) -> int:
    print(f"extauthz: {message}", file=sys.stderr)
    return 2
