"""``extauthz policy test``: reviewed expectations for a policy, run through the real decision.

A cases file lists requests (who calls what, with which token claims) and what must happen.
The runner signs each subject token with a throwaway key for the named issuer, runs the same
``decide`` as the server, checks the expectation and reports which rules no case reached.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extauthz.decision.model import Policy
from extauthz.decision.pipeline import Decision
from extauthz.errors import ExtauthzError
from extauthz.policy import yamlsrc
from extauthz.policy.compiler import parse_duration, parse_instant
from extauthz.tools.simulate import SimRequest, Simulator

_REQUEST_FIELDS = {
    "workload", "method", "host", "path", "issuer", "claims", "expiresIn", "tokenType",
    "certificate", "headers", "now",
}  # fmt: skip
_EXPECT_FIELDS = {
    "decision", "reason", "rule", "audience", "scopes", "ttl", "maxTtl", "claims", "shadow",
}  # fmt: skip


class CasesError(ExtauthzError):
    """A cases file that cannot be used; the message names the file, case and field."""


@dataclass(frozen=True, slots=True)
class Expect:
    decision: str  # "allow" | "deny"
    reason: str | None = None
    rule: str | None = None
    audience: str | None = None
    scopes: frozenset[str] | None = None
    ttl: int | None = None
    max_ttl: int | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    shadow: bool | None = None


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    source: str
    line: int | None
    request: SimRequest
    expect: Expect
    now: float | None = None  # when the request happens (request.now), else when tests run


@dataclass(frozen=True, slots=True)
class Result:
    case: Case
    decision: Decision
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True, slots=True)
class Report:
    results: tuple[Result, ...]
    rules: tuple[str, ...]
    covered: frozenset[str]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.passed]

    @property
    def uncovered(self) -> list[str]:
        return [r for r in self.rules if r not in self.covered]


# --- reading cases -----------------------------------------------------------------------------


def load_cases(path: Path) -> list[Case]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CasesError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    return parse_cases(text, str(path))


def parse_cases(text: str, source: str) -> list[Case]:
    try:
        doc = yamlsrc.load(text)
    except yaml.YAMLError as exc:
        raise CasesError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise CasesError(f"{source}: expected a mapping with a 'cases' list")
    problems: list[str] = []
    cases: list[Case] = []
    for index, node in enumerate(doc["cases"]):
        where = f"{source}:{getattr(node, 'line', '?')}: cases[{index}]"
        try:
            cases.append(_case(node, source))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    names = [c.name for c in cases]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{source}: case name {name!r} is used twice")
    if problems:
        raise CasesError("\n".join(problems))
    return cases


def _case(node: Any, source: str) -> Case:
    if not isinstance(node, dict):
        raise ValueError("must be a mapping")
    unknown = set(node) - {"name", "request", "expect"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("name: required")
    line = node.line if isinstance(node, yamlsrc.Located) else None
    request = node.get("request")
    now = _now(request.get("now")) if isinstance(request, dict) and "now" in request else None
    return Case(name, source, line, _request(request), _expect(node.get("expect")), now)


def _now(value: Any) -> float:
    """``request.now``: an RFC 3339 time with a zone."""
    seconds = parse_instant(value)
    if seconds is None:
        raise ValueError("request.now: an RFC 3339 time with a zone, like 2026-12-04T09:00:00Z")
    return seconds


def _request(node: Any) -> SimRequest:
    if not isinstance(node, dict):
        raise ValueError("request: required mapping")
    _known(node, _REQUEST_FIELDS, "request")
    workload = node.get("workload")
    if not isinstance(workload, str):
        raise ValueError("request.workload: required SPIFFE ID")
    claims = node.get("claims", {})
    headers = node.get("headers", {})
    if not isinstance(claims, dict) or not isinstance(headers, dict):
        raise ValueError("request.claims and request.headers must be mappings")
    expires = parse_duration(node.get("expiresIn", 600))
    if expires is None:
        raise ValueError("request.expiresIn: a duration like 10m or -60s")
    for key in ("method", "host", "path", "issuer", "tokenType"):
        if key in node and not isinstance(node[key], str):
            raise ValueError(f"request.{key}: must be a string")
    return SimRequest(
        workload=workload,
        method=node.get("method", "GET"),
        host=node.get("host", ""),
        path=node.get("path", "/"),
        issuer=node.get("issuer"),
        claims=dict(claims),
        expires_in=expires,
        token_type=node.get("tokenType", "at+jwt"),
        certificate=node.get("certificate", False) is True,
        headers={str(k): str(v) for k, v in headers.items()},
    )


def _expect(node: Any) -> Expect:
    if not isinstance(node, dict):
        raise ValueError("expect: required mapping")
    _known(node, _EXPECT_FIELDS, "expect")
    decision = node.get("decision")
    if decision not in ("allow", "deny"):
        raise ValueError("expect.decision: allow or deny")
    scopes = node.get("scopes")
    if scopes is not None and (
        not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes)
    ):
        raise ValueError("expect.scopes: a list of scopes")
    ttl = _opt_duration(node, "ttl")
    max_ttl = _opt_duration(node, "maxTtl")
    claims = node.get("claims", {})
    if not isinstance(claims, dict):
        raise ValueError("expect.claims: a mapping")
    shadow = node.get("shadow")
    if shadow is not None and not isinstance(shadow, bool):
        raise ValueError("expect.shadow: true or false")
    return Expect(
        decision=decision,
        reason=node.get("reason"),
        rule=node.get("rule"),
        audience=node.get("audience"),
        scopes=frozenset(scopes) if scopes is not None else None,
        ttl=ttl,
        max_ttl=max_ttl,
        claims=dict(claims),
        shadow=shadow,
    )


def _opt_duration(node: Mapping[str, Any], key: str) -> int | None:
    if key not in node:
        return None
    value = parse_duration(node[key])
    if value is None:
        raise ValueError(f"expect.{key}: a duration like 30s")
    return value


def _known(node: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = set(node) - allowed
    if unknown:
        raise ValueError(f"{prefix}: unknown field(s): {', '.join(sorted(unknown))}")


# --- running -----------------------------------------------------------------------------------


def run_cases(policy: Policy, cases: Sequence[Case], now: float | None = None) -> Report:
    sim = Simulator(policy)
    at = time.time() if now is None else now
    results: list[Result] = []
    covered: set[str] = set()
    for case in cases:
        when = at if case.now is None else case.now
        try:
            inp = sim.check_input(case.request, when)
        except ValueError as exc:
            raise CasesError(f"{case.source}:{case.line}: case {case.name!r}: {exc}") from exc
        decision = sim.decide(inp, when)
        if decision.rule is not None:
            covered.add(decision.rule.id)
        results.append(Result(case, decision, tuple(check(case.expect, decision))))
    return Report(tuple(results), tuple(r.id for r in policy.rules), frozenset(covered))


def check(expect: Expect, decision: Decision) -> list[str]:
    failures: list[str] = []
    got = decision.verdict
    if got != expect.decision:
        failures.append(f"expected {expect.decision}, got {got} ({decision.reason.code})")
        return failures
    if expect.reason is not None and decision.reason.code != expect.reason:
        failures.append(f"expected reason {expect.reason}, got {decision.reason.code}")
    rule = decision.rule.id if decision.rule else None
    if expect.rule is not None and rule != expect.rule:
        failures.append(f"expected rule {expect.rule}, got {rule}")
    if expect.shadow is not None and decision.shadow != expect.shadow:
        failures.append(f"expected shadow {expect.shadow}, got {decision.shadow}")
    claims = decision.claims or {}
    if expect.audience is not None and claims.get("aud") != expect.audience:
        failures.append(f"expected audience {expect.audience}, got {claims.get('aud')}")
    if expect.scopes is not None:
        got_scopes = frozenset(str(claims.get("scope", "")).split())
        if got_scopes != expect.scopes:
            failures.append(f"expected scopes {sorted(expect.scopes)}, got {sorted(got_scopes)}")
    lifetime = claims.get("exp", 0) - claims.get("iat", 0) if claims else None
    if expect.ttl is not None and lifetime != expect.ttl:
        failures.append(f"expected ttl {expect.ttl}s, got {lifetime}s")
    if expect.max_ttl is not None and (lifetime is None or lifetime > expect.max_ttl):
        failures.append(f"expected ttl at most {expect.max_ttl}s, got {lifetime}s")
    for path, want in _flatten(expect.claims):
        have = _lookup(claims, path)
        if have != want:
            failures.append(f"expected claim {'.'.join(path)} = {want!r}, got {have!r}")
    return failures


def _flatten(
    value: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out.extend(_flatten(item, (*prefix, key)))
        else:
            out.append(((*prefix, key), item))
    return out


def _lookup(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = claims
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def render(report: Report) -> str:
    lines: list[str] = []
    for result in report.results:
        verdict = "PASS" if result.passed else "FAIL"
        d = result.decision
        got = f"{'allow' if d.allowed else 'deny'} {d.reason.code}"
        if d.rule:
            got += f" rule={d.rule.id}"
        lines.append(f"{verdict}  {result.case.name}  ({got})")
        for failure in result.failures:
            lines.append(f"      {result.case.source}:{result.case.line}: {failure}")
    total, failed = len(report.results), len(report.failed)
    covered = len(report.rules) - len(report.uncovered)
    lines.append("")
    lines.append(f"{total - failed} passed, {failed} failed")
    lines.append(f"rule coverage: {covered}/{len(report.rules)} rules reached")
    for rule in report.uncovered:
        lines.append(f"  not reached by any case: {rule}")
    return "\n".join(lines)
