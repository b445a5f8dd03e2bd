"""``extauthz policy lint``: every check fires on a targeted edit of the example, and points at it.

Each case is the shipped example policy with one small edit. The finding must name the check,
its severity, the rule (or none, for policy- and issuer-level findings), the field and the line
that was edited, so a reviewer lands on the change that widened the blast radius.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import corekit as k
import pytest
from clikit import in_process
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extauthz.decision import paths
from extauthz.decision.jose import generate_signing_key
from extauthz.decision.model import Policy, WorkloadPattern
from extauthz.errors import ExtauthzError, PolicyError
from extauthz.policy.compiler import MAX_POLICY_BYTES
from extauthz.policy.loader import read_inputs, write_private_key
from extauthz.tools.lint import (
    CHECKS,
    ERROR,
    INFO,
    WARNING,
    Finding,
    lint_file,
    lint_text,
    rules_overlap,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"
BASE = EXAMPLE.read_text(encoding="utf-8")

READ = "orders-read-profile"
PROFILE_AUD = "audience: spiffe://cluster.local/ns/shop/sa/profile"
PAYMENTS_AUD = "audience: spiffe://cluster.local/ns/shop/sa/payments"
ORDERS_WL = "workloads: [spiffe://cluster.local/ns/shop/sa/orders]"
READ_GRANT_SCOPES = "scopes: [profile.read]\n      ttl"
READ_PURPOSE = "purpose: The order service shows the customer's profile on an order page"


def edit(old: str, new: str, text: str = BASE, count: int = 1) -> str:
    """Replace the first ``count`` occurrences of ``old``; the edit must really happen."""
    assert text.count(old) >= count, f"{old!r} not in the policy {count} time(s)"
    edited = text.replace(old, new, count)
    assert edited != text
    return edited


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not found")


def block(text: str, start: str, end: str | None) -> range:
    """Lines from the one containing ``start`` up to (not including) the one with ``end``."""
    first = line_of(text, start)
    lines = text.splitlines()
    last = len(lines) + 1
    if end is not None:
        for number in range(first + 1, len(lines) + 1):
            if end in lines[number - 1]:
                last = number
                break
    return range(first, last)


PARTNER_ISSUER = """  - id: partner-idp
    issuer: https://partner.example.com
    jwks: {file: issuers/partner-idp.json}
    audiences: [https://shop.example.com]
    algorithms: [ES256]

workloads:"""

OWN_PROFILE_RULE = """
  - id: orders-read-own-profile
    purpose: The order service shows the signed-in customer's own profile
    match:
      workloads: [spiffe://cluster.local/ns/shop/sa/orders]
      host: profile.shop.svc.cluster.local
      methods: [GET]
      paths: [PATH]
      issuers: [corp-idp]
    require: {scopes: [profile.read]}
    grant:
      audience: spiffe://cluster.local/ns/shop/sa/profile
      scopes: [profile.read]
      ttl: 30s
"""
OVERLAPPING = BASE + OWN_PROFILE_RULE.replace("PATH", "/v1/customers/me")
AMBIGUOUS = BASE + OWN_PROFILE_RULE.replace("PATH", '"/v1/customers/{id}"')

ELEVEN = ", ".join(f"spiffe://cluster.local/ns/shop/sa/app{i}" for i in range(11))
SHARED_PATTERN = edit(
    "workloads: [spiffe://cluster.local/ns/shop/sa/checkout]",
    'workloads: ["spiffe://cluster.local/ns/shop/sa/*"]',
    text=edit(ORDERS_WL, 'workloads: ["spiffe://cluster.local/ns/shop/sa/*"]', count=2),
)


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    check: str
    severity: str
    rule: str | None
    field: str
    at: str | None = None  # the edited line contains this text: the finding's line is it
    within: tuple[str, str | None] | None = None  # or: somewhere in this block (a deletion)

    def expected_lines(self) -> range:
        if self.at is not None:
            line = line_of(self.text, self.at)
            return range(line, line + 1)
        assert self.within is not None
        return block(self.text, *self.within)


CASES = [
    # audience-not-single-system: refused by the compiler, and flagged by lint
    Case(
        "audience-star-compile",
        edit(PROFILE_AUD, 'audience: "*"'),
        "audience-not-single-system",
        ERROR,
        READ,
        "grant.audience",
        at='audience: "*"',
    ),
    Case(
        "audience-namespace",
        edit(PROFILE_AUD, "audience: spiffe://cluster.local/ns/shop"),
        "audience-not-single-system",
        ERROR,
        READ,
        "grant.audience",
        at="audience: spiffe://cluster.local/ns/shop",
    ),
    Case(
        "audience-trailing-slash",
        edit(PROFILE_AUD, "audience: spiffe://cluster.local/ns/shop/sa/profile/"),
        "audience-not-single-system",
        ERROR,
        READ,
        "grant.audience",
        at="sa/profile/",
    ),
    Case(
        "audience-shared",
        edit(PROFILE_AUD, PAYMENTS_AUD),
        "audience-shared",
        WARNING,
        READ,
        "grant.audience",
        at=PAYMENTS_AUD,
    ),
    Case(
        "ttl-long",
        edit("ttl: 30s", "ttl: 120s"),
        "ttl-long",
        WARNING,
        READ,
        "grant.ttl",
        at="ttl: 120s",
    ),
    Case(
        "ttl-over-max-ttl",
        edit("ttl: 30s", "ttl: 600s"),
        "ttl-not-capped",
        ERROR,
        READ,
        "grant.ttl",
        at="ttl: 600s",
    ),
    Case(
        "max-ttl-over-hard-cap",
        edit("maxTtl: 300s", "maxTtl: 7200s"),
        "ttl-not-capped",
        ERROR,
        None,
        "exchange.maxTtl",
        at="maxTtl: 7200s",
    ),
    Case(
        "max-ttl-implicit",
        edit(
            "  maxTtl: 300s                             # no rule may grant longer than this\n", ""
        ),
        "max-ttl-implicit",
        WARNING,
        None,
        "exchange.maxTtl",
        within=("exchange:", "trustedIssuers:"),
    ),
    Case(
        "scope-wildcard-compile",
        edit(READ_GRANT_SCOPES, 'scopes: ["profile.*"]\n      ttl'),
        "scope-not-deterministic",
        ERROR,
        READ,
        "grant.scopes",
        at='"profile.*"',
    ),
    Case(
        "scope-catch-all",
        edit(
            "require: {scopes: [profile.read]}",
            "require: {scopes: [admin]}",
            text=edit(READ_GRANT_SCOPES, "scopes: [admin]\n      ttl"),
        ),
        "scope-not-deterministic",
        ERROR,
        READ,
        "grant.scopes",
        at="      scopes: [admin]",
    ),
    Case(
        "require-empty",
        edit("    require: {scopes: [profile.read]}\n", ""),
        "require-empty",
        WARNING,
        READ,
        "require.scopes",
        within=(f"id: {READ}", "id: orders-update-address"),
    ),
    Case(
        "grant-wider-than-require",
        edit(READ_GRANT_SCOPES, "scopes: [profile.read, profile.email]\n      ttl"),
        "grant-wider-than-require",
        WARNING,
        READ,
        "grant.scopes",
        at="profile.email",
    ),
    Case(
        "issuer-not-https",
        edit("issuer: https://idp.example.com", "issuer: http://idp.example.com"),
        "issuer-not-https",
        ERROR,
        None,
        "trustedIssuers (corp-idp).issuer",
        at="issuer: http://idp.example.com",
    ),
    Case(
        "issuer-wildcard-compile",
        edit("issuer: https://idp.example.com", "issuer: https://*.example.com"),
        "issuer-broad",
        ERROR,
        None,
        "issuer",
        at="issuer: https://*.example.com",
    ),
    Case(
        "issuer-hs256-compile",
        edit("algorithms: [ES256]", "algorithms: [HS256]"),
        "issuer-algorithm-weak",
        ERROR,
        None,
        "algorithms",
        at="algorithms: [HS256]",
    ),
    Case(
        "issuer-rs256",
        edit("algorithms: [ES256]", "algorithms: [RS256]"),
        "issuer-algorithm-weak",
        INFO,
        None,
        "trustedIssuers (corp-idp).algorithms",
        at="algorithms: [RS256]",
    ),
    Case(
        "issuer-audiences-missing-compile",
        edit("    audiences: [https://shop.example.com]\n", ""),
        "issuer-audiences-missing",
        ERROR,
        None,
        "audiences",
        within=("- id: corp-idp", "workloads:"),
    ),
    Case(
        "issuer-audiences-broad",
        edit(
            "audiences: [https://shop.example.com]",
            "audiences: [https://shop.example.com, https://a.example.com, "
            "https://b.example.com, https://c.example.com]",
        ),
        "issuer-audiences-broad",
        WARNING,
        None,
        "trustedIssuers (corp-idp).audiences",
        at="https://c.example.com",
    ),
    Case(
        "rule-many-issuers",
        edit(
            "issuers: [corp-idp]",
            "issuers: [corp-idp, partner-idp]",
            text=edit("\nworkloads:", "\n" + PARTNER_ISSUER),
        ),
        "rule-many-issuers",
        WARNING,
        READ,
        "match.issuers",
        at="issuers: [corp-idp, partner-idp]",
    ),
    Case(
        "purpose-missing-compile",
        edit(f"    {READ_PURPOSE}\n", ""),
        "purpose-missing",
        ERROR,
        READ,
        "purpose",
        within=(f"id: {READ}", "id: orders-update-address"),
    ),
    Case(
        "purpose-vague",
        edit(READ_PURPOSE, "purpose: misc"),
        "purpose-missing",
        WARNING,
        READ,
        "purpose",
        at="purpose: misc",
    ),
    Case(
        "workloads-whole-trust-domain",
        edit(ORDERS_WL, 'workloads: ["spiffe://cluster.local/**"]'),
        "workloads-broad",
        WARNING,
        READ,
        "match.workloads",
        at="spiffe://cluster.local/**",
    ),
    Case(
        "workloads-too-many",
        edit(ORDERS_WL, f"workloads: [{ELEVEN}]"),
        "workloads-broad",
        WARNING,
        READ,
        "match.workloads",
        at="sa/app10",
    ),
    Case(
        "workload-untrusted-domain-compile",
        edit(ORDERS_WL, "workloads: [spiffe://evil.example/ns/shop/sa/orders]"),
        "workload-invalid",
        ERROR,
        READ,
        "match.workloads",
        at="evil.example",
    ),
    Case(
        "workload-bad-pattern-compile",
        edit(ORDERS_WL, 'workloads: ["spiffe://cluster.local/ns/sh*p/sa/orders"]'),
        "workload-invalid",
        ERROR,
        READ,
        "match.workloads",
        at="sh*p",
    ),
    Case(
        "exchange-path-shared",
        SHARED_PATTERN,
        "exchange-path-shared",
        WARNING,
        READ,
        "match.workloads",
        at="sa/*",
    ),
    Case(
        "xfcc-trusted",
        edit(
            "  trustDomains: [cluster.local]\n",
            "  trustDomains: [cluster.local]\n"
            "  xfcc: {trustedHops: [spiffe://cluster.local/ns/istio-system/sa/gateway]}\n",
        ),
        "xfcc-trusted",
        INFO,
        None,
        "workloads.xfcc.trustedHops",
        at="trustedHops",
    ),
    Case(
        "rules-overlap",
        OVERLAPPING,
        "rules-overlap",
        WARNING,
        "orders-read-own-profile",
        "match",
        within=("id: orders-read-own-profile", None),
    ),
    Case(
        "rules-ambiguous-compile",
        AMBIGUOUS,
        "rules-ambiguous",
        ERROR,
        "orders-read-own-profile",
        "match",
        within=("id: orders-read-own-profile", None),
    ),
    Case(
        "shadow-policy",
        edit("kind: ExchangePolicy\n", "kind: ExchangePolicy\nmode: shadow\n"),
        "shadow-mode",
        WARNING,
        None,
        "mode",
        at="mode: shadow",
    ),
    Case(
        "shadow-rule",
        edit("      ttl: 30s\n", "      ttl: 30s\n    mode: shadow\n"),
        "shadow-mode",
        INFO,
        READ,
        "mode",
        at="mode: shadow",
    ),
    Case(
        "reexchange",
        edit("      ttl: 30s\n", "      ttl: 30s\n    reexchange: true\n"),
        "reexchange-enabled",
        INFO,
        READ,
        "reexchange",
        at="reexchange: true",
    ),
]


def findings_for(case: Case) -> list[Finding]:
    return [f for f in lint_text(case.text, source="policy.yaml") if f.check == case.check]


def the_finding(case: Case) -> Finding:
    found = findings_for(case)
    assert found, f"no {case.check} finding; got {lint_text(case.text, source='policy.yaml')}"
    matching = [f for f in found if f.rule == case.rule and f.field == case.field]
    assert matching, f"no {case.check} finding for rule {case.rule} field {case.field}: {found}"
    return matching[0]


def test_the_shipped_example_lints_clean() -> None:
    assert lint_file(EXAMPLE) == []
    assert lint_text(BASE, source="policy.yaml") == []


def test_every_check_id_has_a_case() -> None:
    """Adding a check without a failing example here should not go unnoticed."""
    covered = {c.check for c in CASES}
    assert covered >= {
        "audience-not-single-system", "audience-shared", "ttl-long", "ttl-not-capped",
        "max-ttl-implicit", "scope-not-deterministic", "require-empty",
        "grant-wider-than-require", "issuer-not-https", "issuer-broad", "issuer-algorithm-weak",
        "issuer-audiences-missing", "issuer-audiences-broad", "rule-many-issuers",
        "purpose-missing", "workloads-broad", "workload-invalid", "exchange-path-shared",
        "xfcc-trusted", "rules-overlap", "rules-ambiguous", "shadow-mode", "reexchange-enabled",
    }  # fmt: skip
    assert len(CHECKS) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_check_fires_on_a_targeted_edit(case: Case) -> None:
    assert lint_text(BASE, source="policy.yaml") == []  # the edit alone causes the finding
    finding = the_finding(case)
    assert finding.severity == case.severity
    assert finding.rule == case.rule
    assert finding.field == case.field
    assert finding.file == "policy.yaml"
    assert finding.message and finding.hint
    assert finding.line in case.expected_lines(), (finding.line, case.expected_lines())


def test_compile_time_and_lint_time_audience_checks_share_the_check_id() -> None:
    star = the_finding(CASES[0])
    family = the_finding(CASES[1])
    assert star.check == family.check == "audience-not-single-system"
    assert "wildcard" in star.message
    assert "namespace" in family.message


def test_ttl_within_short_limit_is_not_flagged() -> None:
    text = edit("ttl: 30s", "ttl: 60s")
    assert [f for f in lint_text(text) if f.check in ("ttl-long", "ttl-not-capped")] == []


def test_many_issuers_policy_without_the_rule_edit_is_clean_of_rule_many_issuers() -> None:
    text = edit("\nworkloads:", "\n" + PARTNER_ISSUER)
    assert [f for f in lint_text(text) if f.check == "rule-many-issuers"] == []


def test_disjoint_paths_do_not_overlap() -> None:
    text = BASE + OWN_PROFILE_RULE.replace("PATH", "/v2/customers/me")
    assert [f for f in lint_text(text) if f.check.startswith("rules-")] == []


@pytest.mark.parametrize(
    "pattern",
    [
        "spiffe://cluster.local/ns/**",
        "spiffe://cluster.local/*/**",
        "spiffe://cluster.local/*/*/*/*",
    ],
)
def test_broad_workload_patterns_are_flagged(pattern: str) -> None:
    text = edit(ORDERS_WL, f'workloads: ["{pattern}"]')
    found = [f for f in lint_text(text) if f.check == "workloads-broad"]
    assert found and found[0].rule == READ


# --- the command -----------------------------------------------------------------------------


def lint(*args: str | Path, real: bool = False) -> subprocess.CompletedProcess[str]:
    """``policy lint ARGS``; ``real`` runs the installed entry point in a child process."""
    if not real:
        return in_process("policy", "lint", *args)
    return subprocess.run(
        [sys.executable, "-m", "extauthz", "policy", "lint", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    # Lint reads the JWKS files the policy names, as serve does.
    shutil.copytree(EXAMPLE.parent / "issuers", tmp_path / "issuers", dirs_exist_ok=True)
    return path


def test_cli_example_is_clean_with_strict() -> None:
    result = lint(EXAMPLE, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout


def test_cli_error_exits_1_and_prints_file_line(tmp_path: Path) -> None:
    text = edit(PROFILE_AUD, 'audience: "*"')
    path = write(tmp_path, text)
    result = lint(path, real=True)
    assert result.returncode == 1, result.stdout + result.stderr
    line = line_of(text, 'audience: "*"')
    assert f"{path}:{line}: error[audience-not-single-system]" in result.stdout
    assert f"rule {READ}: grant.audience:" in result.stdout
    assert "fix:" in result.stdout


def test_cli_warnings_fail_only_with_strict(tmp_path: Path) -> None:
    text = edit("ttl: 30s", "ttl: 120s")
    path = write(tmp_path, text)
    relaxed = lint(path)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert f"{path}:{line_of(text, 'ttl: 120s')}: warning[ttl-long]" in relaxed.stdout
    assert "0 error(s), 1 warning(s)" in relaxed.stdout
    strict = lint(path, "--strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr


def test_cli_info_only_passes_strict(tmp_path: Path) -> None:
    path = write(tmp_path, edit("      ttl: 30s\n", "      ttl: 30s\n    reexchange: true\n"))
    result = lint(path, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "info[reexchange-enabled]" in result.stdout


def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    result = lint(tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_cli_missing_file_among_good_ones_exits_2(tmp_path: Path) -> None:
    result = lint(EXAMPLE, tmp_path / "nope.yaml", "--strict")
    assert result.returncode == 2


def test_cli_json_has_findings_and_summary(tmp_path: Path) -> None:
    text = edit(
        "      ttl: 30s\n",
        "      ttl: 120s\n    reexchange: true\n",
        text=edit(PROFILE_AUD, "audience: spiffe://cluster.local/ns/shop"),
    )
    path = write(tmp_path, text)
    result = lint(path, "--format", "json")
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) >= {"findings", "summary"}
    checks = {(f["severity"], f["check"]) for f in doc["findings"]}
    assert checks == {
        (ERROR, "audience-not-single-system"),
        (WARNING, "ttl-long"),
        (INFO, "reexchange-enabled"),
    }
    assert doc["summary"] == {"error": 1, "warning": 1, "info": 1}
    for finding in doc["findings"]:
        assert set(finding) >= {"severity", "check", "file", "line", "rule", "field", "message"}
        assert finding["file"] == str(path)
        assert finding["rule"] == READ
    by_check = {f["check"]: f for f in doc["findings"]}
    assert by_check["ttl-long"]["line"] == line_of(text, "ttl: 120s")


def test_cli_json_clean_example() -> None:
    result = lint(EXAMPLE, "--format", "json", "--strict")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["findings"] == []
    assert doc["summary"] == {"error": 0, "warning": 0, "info": 0}


def test_one_namespace_pattern_is_not_broad() -> None:
    text = edit(ORDERS_WL, 'workloads: ["spiffe://cluster.local/ns/shop/sa/*"]')
    assert [f for f in lint_text(text) if f.check == "workloads-broad"] == []


# --- compile problems under the check id of what they mean -------------------------------------

READ_MATCH = """    match:
      workloads: [spiffe://cluster.local/ns/shop/sa/orders]
      host: profile.shop.svc.cluster.local
      methods: [GET]
      paths: ["/v1/customers/{id}"]
      issuers: [corp-idp]
"""
CORP_ISSUER = "issuer: https://idp.example.com"
EXCHANGE_ISSUER = "  issuer: https://exchange.shop.svc        # the `iss` of every token we mint\n"


@dataclass(frozen=True)
class Recoded:
    """A compile problem that was reported under another check id than what it means."""

    name: str
    text: str
    field: str
    message: str  # a fragment of the problem's message
    check: str
    old: str  # the id it used to carry, looked up from the field alone


RECODED = [
    Recoded(
        "issuer-listed-twice",
        edit(
            "\nworkloads:",
            "\n" + PARTNER_ISSUER.replace("https://partner.example.com", "https://idp.example.com"),
        ),
        "issuer",
        "is listed twice",
        "invalid-policy",
        "issuer-broad",
    ),
    Recoded(
        "issuer-is-the-exchange",
        edit(CORP_ISSUER, "issuer: https://exchange.shop.svc"),
        "issuer",
        "the exchange's own issuer",
        "invalid-policy",
        "issuer-broad",
    ),
    Recoded(
        "issuer-not-a-string",
        edit(CORP_ISSUER, "issuer: [https://idp.example.com]"),
        "issuer",
        "must be a non-empty string",
        "invalid-policy",
        "issuer-broad",
    ),
    Recoded(
        "algorithm-unknown",
        edit("algorithms: [ES256]", "algorithms: [ES256K]"),
        "algorithms",
        "'ES256K' is not accepted",
        "invalid-policy",
        "issuer-algorithm-weak",
    ),
    Recoded(
        "algorithm-listed-twice",
        edit("algorithms: [ES256]", "algorithms: [ES256, ES256]"),
        "algorithms",
        "lists a value twice",
        "invalid-policy",
        "issuer-algorithm-weak",
    ),
    Recoded(
        "issuer-audiences-not-a-list",
        edit("audiences: [https://shop.example.com]", "audiences: https://shop.example.com"),
        "audiences",
        "must be a non-empty list of strings",
        "invalid-policy",
        "issuer-audiences-missing",
    ),
    Recoded(
        "equally-specific-patterns",
        edit(ORDERS_WL, 'workloads: ["spiffe://cluster.local/ns/*/sa/orders"]')
        + OWN_PROFILE_RULE.replace("PATH", '"/v1/customers/{id}"').replace(
            ORDERS_WL, 'workloads: ["spiffe://cluster.local/ns/shop/sa/*"]'
        ),
        "match.workloads",
        "equally specific",
        "rules-ambiguous",
        "workload-invalid",
    ),
    Recoded(
        "match-not-a-mapping",
        edit(READ_MATCH, "    match: [GET]\n"),
        "match",
        "must be a mapping",
        "invalid-policy",
        "rules-ambiguous",
    ),
    Recoded(
        "workloads-not-a-list",
        edit(ORDERS_WL, "workloads: spiffe://cluster.local/ns/shop/sa/orders"),
        "match.workloads",
        "must be a non-empty list of strings",
        "invalid-policy",
        "workload-invalid",
    ),
    Recoded(
        "exchange-issuer-missing",
        edit(EXCHANGE_ISSUER, ""),
        "exchange.issuer",
        "is required",
        "invalid-policy",
        "issuer-not-https",
    ),
    Recoded(
        "max-ttl-not-a-duration",
        edit("maxTtl: 300s", "maxTtl: forever"),
        "exchange.maxTtl",
        "must be a positive duration",
        "invalid-policy",
        "ttl-not-capped",
    ),
    Recoded(
        "ttl-not-a-duration",
        edit("ttl: 30s", "ttl: 1d"),
        "grant.ttl",
        "must be a positive duration",
        "invalid-policy",
        "ttl-not-capped",
    ),
    Recoded(
        "audience-a-number",
        edit(PROFILE_AUD, "audience: 42"),
        "grant.audience",
        "must be a non-empty string",
        "invalid-policy",
        "audience-not-single-system",
    ),
    Recoded(
        "grant-scope-listed-twice",
        edit(READ_GRANT_SCOPES, "scopes: [profile.read, profile.read]\n      ttl"),
        "grant.scopes",
        "lists a value twice",
        "invalid-policy",
        "scope-not-deterministic",
    ),
    Recoded(
        "grant-scope-not-a-token",
        edit(READ_GRANT_SCOPES, 'scopes: ["profile\\\\read"]\n      ttl'),
        "grant.scopes",
        "is not a valid scope token",
        "invalid-policy",
        "scope-not-deterministic",
    ),
    Recoded(
        "require-scopes-empty",
        edit("require: {scopes: [profile.read]}", "require: {scopes: []}"),
        "require.scopes",
        "must be a non-empty list of strings",
        "invalid-policy",
        "scope-not-deterministic",
    ),
    Recoded(
        "purpose-not-a-string",
        edit(READ_PURPOSE, "purpose: [orders, profile, page]"),
        "purpose",
        "must be a non-empty string",
        "invalid-policy",
        "purpose-missing",
    ),
    Recoded(
        "unknown-field-named-purpose",
        edit("    algorithms: [ES256]\n", "    algorithms: [ES256]\n    purpose: sign-in\n"),
        "purpose",
        "unknown field",
        "invalid-policy",
        "purpose-missing",
    ),
    Recoded(
        "unknown-field-named-audiences",
        edit("  maxTtl: 300s", "  audiences: [x]\n  maxTtl: 300s"),
        "audiences",
        "unknown field",
        "invalid-policy",
        "issuer-audiences-missing",
    ),
]


@pytest.mark.parametrize("case", RECODED, ids=[c.name for c in RECODED])
def test_compile_problems_carry_the_check_id_of_what_they_mean(case: Recoded) -> None:
    """A duplicate issuer is not a broad one, a typo in an algorithm is not a weak one: the id
    is chosen where the problem is found, not looked up from the field afterwards."""
    found = [
        f
        for f in lint_text(case.text, source="policy.yaml")
        if f.field == case.field and case.message in f.message
    ]
    assert found, lint_text(case.text, source="policy.yaml")
    assert {f.check for f in found} == {case.check}, found
    assert case.check != case.old
    assert all(f.severity == ERROR and f.hint for f in found)


@pytest.mark.parametrize(
    ("edited", "new", "check"),
    [
        ("algorithms: [ES256]", "algorithms: [hs512]", "issuer-algorithm-weak"),
        ("algorithms: [ES256]", "algorithms: [NONE]", "issuer-algorithm-weak"),
        ("audiences: [https://shop.example.com]", "audiences: []", "issuer-audiences-missing"),
        (PROFILE_AUD, "audience: [a, b]", "audience-not-single-system"),
        (PROFILE_AUD, 'audience: ""', "audience-not-single-system"),
        ("      ttl: 30s\n", "", "ttl-not-capped"),
        (READ_PURPOSE, 'purpose: " "', "purpose-missing"),
    ],
)
def test_compile_problems_that_are_the_risk_keep_its_check_id(
    edited: str, new: str, check: str
) -> None:
    """An HMAC or 'none' algorithm however spelt, no audiences, several or no grant audience,
    no ttl, a blank purpose: the problem is the risk the check names."""
    # the issuer's rules then name an unknown issuer: that is another problem
    errors = [f for f in lint_text(edit(edited, new)) if f.field != "match.issuers"]
    assert [(f.severity, f.check) for f in errors] == [(ERROR, check)], errors


# --- overlaps come from the compiled table -------------------------------------------------------

OTHER_ISSUER = {
    "id": "other",
    "issuer": "https://other.example.com",
    "jwks": {"file": "o.json"},
    "audiences": ["x"],
    "algorithms": ["ES256"],
}


def overlap_pairs(policy: Policy) -> list[tuple[str | None, str]]:
    """(later rule, earlier rule) of every rules-overlap finding, in the order lint gives."""
    out = []
    for finding in rules_overlap(policy, None):
        named = re.match(r"overlaps rule '([^']+)'", finding.message)
        assert named is not None and finding.severity == WARNING and finding.field == "match"
        out.append((finding.rule, named.group(1)))
    return out


def two_rules(**other: Any) -> Policy:
    doc = k.policy_doc(
        [k.rule_doc("a"), k.rule_doc("b", **other)],
        issuers=[k.policy_doc()["trustedIssuers"][0], OTHER_ISSUER],
    )
    return k.compile_doc(doc)


@pytest.mark.parametrize(
    ("other", "overlaps"),
    [
        ({"paths": ["/v1/customers/me"]}, True),  # a literal against {id}
        ({"paths": ["/v1/customers/**"]}, True),  # {id} against a ** rest
        ({"paths": ["/v1/**"]}, True),
        ({"paths": ["/**"]}, True),
        ({"paths": ["/v1/{kind}/{id}"]}, True),  # {param} against a literal, deeper
        ({"paths": ["/v1/customers/{id}/x"]}, False),
        ({"paths": ["/v1/customers/"]}, False),  # {id} never matches an empty segment
        ({"paths": ["/v1/customers/**"], "methods": ["POST"]}, False),
        ({"paths": ["/v1/customers/**"], "host": "other.svc"}, False),
        ({"paths": ["/v1/customers/**"], "issuers": ["other"]}, False),
        ({"paths": ["/v1/customers/**"], "issuers": ["other"], "reexchange": True}, False),
        ({"workloads": ["spiffe://cluster.local/ns/shop/sa/*"]}, True),  # exact against pattern
        ({"workloads": ["spiffe://cluster.local/ns/other/sa/*"]}, False),
        ({"paths": ["/v1/**"], "workloads": [k.CHECKOUT]}, False),
    ],
)
def test_overlap_shapes(other: dict[str, Any], overlaps: bool) -> None:
    """Paths, callers, methods, host and issuer must all have something in common."""
    assert overlap_pairs(two_rules(**other)) == ([("b", "a")] if overlaps else [])


def test_reexchange_rules_overlap_through_the_exchange_issuer() -> None:
    doc = k.policy_doc(
        [
            k.rule_doc("a", reexchange=True),
            k.rule_doc("b", issuers=["other"], paths=["/v1/**"], reexchange=True),
        ],
        issuers=[k.policy_doc()["trustedIssuers"][0], OTHER_ISSUER],
    )
    assert overlap_pairs(k.compile_doc(doc)) == [("b", "a")]


# A small universe in which every overlap has a witness among the probes below: templates at
# most three segments deep over the literals "a", "b" and "c"; caller patterns at most four parts.
TEMPLATES = (
    "/", "/**", "/a", "/a/", "/a/**", "/a/{id}", "/{x}", "/{x}/b", "/a/b", "/a/{id}/**",
    "/{x}/**", "/a/b/c", "/{x}/{y}", "/a/b/**", "/b", "/{x}/",
)  # fmt: skip
CALLERS = (
    "spiffe://cluster.local/ns/shop/sa/orders",
    "spiffe://cluster.local/ns/shop/sa/zz",
    "spiffe://cluster.local/ns/shop/sa/*",
    "spiffe://cluster.local/ns/shop/**",
    "spiffe://cluster.local/ns/*/sa/orders",
    "spiffe://cluster.local/ns/*/**",
    "spiffe://cluster.local/*/shop/**",
    "spiffe://cluster.local/ns/*/sa/*",
    "spiffe://cluster.local/**",
    "spiffe://cluster.local/ns/zz/sa/*",
)
PROBE_PATHS = [
    *(segs for n in (1, 2, 3) for segs in itertools.product(("a", "b", "c", "zz"), repeat=n)),
    *(
        (*segs, "")
        for n in (0, 1, 2)
        for segs in itertools.product(("a", "b", "c", "zz"), repeat=n)
    ),
]
PROBE_CALLERS = [
    "spiffe://cluster.local/" + "/".join(parts)
    for n in (1, 2, 3, 4)
    for parts in itertools.product(("ns", "shop", "sa", "orders", "zz"), repeat=n)
]


def _oracle(rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The pairs lint should report, by brute force: a probe path both rules' templates match
    and a probe caller both rules' workloads match, with a method and an issuer in common."""

    def reach(rule: dict[str, Any]) -> tuple[set[int], set[int], set[str]]:
        templates = [paths.parse_template(t) for t in rule["match"]["paths"]]
        matched = {
            i
            for i, segs in enumerate(PROBE_PATHS)
            if any(paths.template_matches(t, segs) for t in templates)
        }
        callers = {
            i
            for i, caller in enumerate(PROBE_CALLERS)
            for w in rule["match"]["workloads"]
            if (WorkloadPattern.parse(w).matches(caller) if "*" in w else w == caller)
        }
        issuers = set(rule["match"]["issuers"]) | ({"exchange"} if rule["reexchange"] else set())
        return matched, callers, issuers

    hosts: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        hosts.setdefault(rule["match"]["host"], []).append(rule)
    out = []
    for group in hosts.values():
        for x, y in itertools.combinations(group, 2):
            (xp, xc, xi), (yp, yc, yi) = reach(x), reach(y)
            methods = set(x["match"]["methods"]) & set(y["match"]["methods"])
            if methods and xi & yi and xp & yp and xc & yc:
                out.append((y["id"], x["id"]))
    return out


@st.composite
def overlapping_policies(draw: st.DrawFn) -> list[dict[str, Any]]:
    def some(options: tuple[str, ...] | list[str], most: int) -> list[str]:
        return draw(st.lists(st.sampled_from(options), min_size=1, max_size=most, unique=True))

    return [
        k.rule_doc(
            f"r{i}",
            host=draw(st.sampled_from(("h1.svc", "h2.svc"))),
            methods=some(("GET", "POST"), 2),
            paths=some(TEMPLATES, 2),
            workloads=some(CALLERS, 2),
            issuers=some(("corp-idp", "other"), 2),
            reexchange=draw(st.booleans()),
        )
        for i in range(draw(st.integers(min_value=2, max_value=6)))
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overlapping_policies())
def test_table_overlaps_match_a_brute_force_oracle(rules: list[dict[str, Any]]) -> None:
    """Walking the compiled trie finds exactly the pairs a pairwise brute force finds, in rule
    order host by host."""
    doc = k.policy_doc(rules, issuers=[k.policy_doc()["trustedIssuers"][0], OTHER_ISSUER])
    try:
        policy = k.compile_fast(doc)
    except PolicyError:
        event("ambiguous: refused by the compiler")
        return
    expected = _oracle(rules)
    event("overlaps" if expected else "disjoint")
    assert overlap_pairs(policy) == expected


# --- lint and serve load alike ------------------------------------------------------------------


def _example_with(tmp_path: Path, text: str, jwks: str | None = "example") -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    if jwks == "example":
        shutil.copytree(EXAMPLE.parent / "issuers", tmp_path / "issuers", dirs_exist_ok=True)
    elif jwks is not None:
        (tmp_path / "issuers").mkdir(exist_ok=True)
        (tmp_path / "issuers" / "corp-idp.json").write_text(jwks)
    return policy


REFUSED_BY_SERVE = {
    "jwks-missing": (EXAMPLE.read_text(), None),
    "jwks-not-json": (EXAMPLE.read_text(), "{not json"),
    "jwks-no-keys": (EXAMPLE.read_text(), '{"keys": []}'),
    "jwks-private-key": (
        EXAMPLE.read_text(),
        json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}]}),
    ),
    "too-large": (EXAMPLE.read_text() + "#" * (MAX_POLICY_BYTES + 1), "example"),
    "yaml-cut-off": (EXAMPLE.read_text()[:-40] + "\n  - id: [", "example"),
    "unknown-field": (EXAMPLE.read_text().replace("rules:", "rulez: []\nrules:", 1), "example"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BY_SERVE))
def test_every_document_serve_refuses_is_a_lint_error(tmp_path: Path, name: str) -> None:
    """docs/policy.md promises that a policy that lints clean also loads: lint runs the reader,
    the compiler and the JWKS loading that serve runs."""
    text, jwks = REFUSED_BY_SERVE[name]
    policy = _example_with(tmp_path, text, jwks)
    write_private_key(generate_signing_key(), tmp_path / "key.pem")
    with pytest.raises(ExtauthzError):
        read_inputs(policy, [tmp_path / "key.pem"])
    errors = [f for f in lint_file(policy) if f.severity == ERROR]
    assert errors, name


def test_a_policy_that_lints_clean_loads(tmp_path: Path) -> None:
    policy = _example_with(tmp_path, EXAMPLE.read_text())
    write_private_key(generate_signing_key(), tmp_path / "key.pem")
    assert [f for f in lint_file(policy) if f.severity == ERROR] == []
    assert read_inputs(policy, [tmp_path / "key.pem"]).policy.rules


def test_too_large_is_said_so_not_linted_cut_off(tmp_path: Path) -> None:
    policy = _example_with(tmp_path, EXAMPLE.read_text() + "#" * (MAX_POLICY_BYTES + 1))
    findings = lint_file(policy)
    assert [f.message for f in findings] == [
        f"larger than {MAX_POLICY_BYTES:,} bytes, the limit of one policy file"
    ]


def test_no_rules_is_a_warning(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    policy = _example_with(tmp_path, text[: text.index("rules:")] + "rules: []\n")
    (finding,) = lint_file(policy)
    assert (finding.severity, finding.check, finding.field) == (WARNING, "rules-empty", "rules")
    assert finding.line == text[: text.index("rules:")].count("\n") + 1


def test_a_yaml_error_at_the_end_names_a_line_of_the_file(tmp_path: Path) -> None:
    text = "apiVersion: extauthz/v1\nkind: [ExchangePolicy\n"
    policy = _example_with(tmp_path, text)
    (finding,) = lint_file(policy)
    assert finding.line is not None and 1 <= finding.line <= 2
