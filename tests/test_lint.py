"""``extauthz policy lint``: every check fires on a targeted edit of the example, and points at it.

Each case is the shipped example policy with one small edit. The finding must name the check,
its severity, the rule (or none, for policy- and issuer-level findings), the field and the line
that was edited, so a reviewer lands on the change that widened the blast radius.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from extauthz.tools.lint import CHECKS, ERROR, INFO, WARNING, Finding, lint_file, lint_text

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


def lint(*args: str | Path) -> subprocess.CompletedProcess[str]:
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
    return path


def test_cli_example_is_clean_with_strict() -> None:
    result = lint(EXAMPLE, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout


def test_cli_error_exits_1_and_prints_file_line(tmp_path: Path) -> None:
    text = edit(PROFILE_AUD, 'audience: "*"')
    path = write(tmp_path, text)
    result = lint(path)
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
