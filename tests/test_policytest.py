"""``extauthz policy test``: reviewed cases run through the real decision, with rule coverage."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clikit import EXTRA_RULE, in_process

from extauthz.policy.compiler import compile_policy, load_policy
from extauthz.tools.policytest import CasesError, Report, load_cases, parse_cases, run_cases
from extauthz.tools.simulate import Simulator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
POLICY = EXAMPLES / "policy.yaml"
CASES = EXAMPLES / "policy.tests.yaml"
BASE = POLICY.read_text(encoding="utf-8")

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
GATEWAY = "spiffe://cluster.local/ns/edge/sa/gateway"
PROFILE_HOST = "profile.shop.svc.cluster.local"

READ_REQUEST = f"""
      workload: {ORDERS}
      method: GET
      host: {PROFILE_HOST}
      path: /v1/customers/42
      issuer: corp-idp"""


def ptest(*args: str | Path, real: bool = False) -> subprocess.CompletedProcess[str]:
    """``policy test ARGS``; ``real`` runs the installed entry point in a child process."""
    if not real:
        return in_process("policy", "test", *args)
    return subprocess.run(
        [sys.executable, "-m", "extauthz", "policy", "test", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def one_case(name: str, request_extra: str, expect: str) -> str:
    return f"""cases:
  - name: {name}
    request:{READ_REQUEST}{request_extra}
    expect: {expect}
"""


def run_text(cases_text: str, policy_text: str = BASE) -> Report:
    policy = compile_policy(policy_text, source="policy.yaml", base_dir=EXAMPLES)
    return run_cases(policy, parse_cases(cases_text, "cases.yaml"))


# --- the shipped cases -----------------------------------------------------------------------


def test_shipped_cases_pass_with_full_coverage() -> None:
    result = ptest(POLICY, CASES, "--require-coverage", real=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule coverage: 3/3" in result.stdout
    assert "0 failed" in result.stdout
    assert "FAIL" not in result.stdout


def test_shipped_cases_in_process() -> None:
    report = run_cases(load_policy(POLICY), load_cases(CASES))
    assert report.failed == []
    assert report.uncovered == []
    assert report.covered == {
        "orders-read-profile",
        "orders-update-address",
        "checkout-charge-payment",
    }
    assert len(report.results) == 11


# --- failures say what differed --------------------------------------------------------------


def test_wrong_expected_scope_fails_and_says_what_differed(tmp_path: Path) -> None:
    cases = write(
        tmp_path / "cases.yaml",
        one_case(
            "too hopeful",
            "\n      claims: {scope: profile.read profile.write}",
            "{decision: allow, rule: orders-read-profile, scopes: [profile.read, profile.write]}",
        ),
    )
    result = ptest(POLICY, cases)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  too hopeful" in result.stdout
    assert "expected scopes ['profile.read', 'profile.write'], got ['profile.read']" in (
        result.stdout
    )
    assert f"{cases}:2:" in result.stdout
    assert "0 passed, 1 failed" in result.stdout


def test_wrong_expected_decision_fails_and_says_what_differed(tmp_path: Path) -> None:
    cases = write(
        tmp_path / "cases.yaml",
        one_case(
            "billing sneaks in",
            "\n      claims: {scope: profile.read}",
            "{decision: allow}",
        ).replace(ORDERS, "spiffe://cluster.local/ns/shop/sa/billing"),
    )
    result = ptest(POLICY, cases)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  billing sneaks in" in result.stdout
    assert "expected allow, got deny (no_rule)" in result.stdout


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ("{decision: allow, rule: orders-update-address}", "expected rule orders-update-address"),
        ("{decision: allow, ttl: 60s}", "expected ttl 60s, got 30s"),
        ("{decision: allow, maxTtl: 10s}", "expected ttl at most 10s, got 30s"),
        (
            "{decision: allow, audience: spiffe://cluster.local/ns/shop/sa/payments}",
            "expected audience spiffe://cluster.local/ns/shop/sa/payments",
        ),
        ("{decision: allow, shadow: true}", "expected shadow True, got False"),
    ],
)
def test_each_expectation_is_checked(expect: str, message: str) -> None:
    report = run_text(one_case("c", "\n      claims: {scope: profile.read}", expect))
    (result,) = report.results
    assert not result.passed
    assert any(message in f for f in result.failures), result.failures


def test_expected_reason_is_checked() -> None:
    report = run_text(
        one_case("c", "\n      claims: {scope: email}", "{decision: deny, reason: no_rule}")
    )
    (result,) = report.results
    assert result.failures == ("expected reason no_rule, got insufficient_scope",)


# --- coverage --------------------------------------------------------------------------------


def copy_examples(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLES / "issuers", tmp_path / "issuers")
    shutil.copy(CASES, tmp_path / "policy.tests.yaml")
    return tmp_path


def test_rule_no_case_reaches_is_reported_and_fails_coverage(tmp_path: Path) -> None:
    work = copy_examples(tmp_path)
    policy = write(work / "policy.yaml", BASE + EXTRA_RULE)
    relaxed = ptest(policy, work / "policy.tests.yaml")
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "rule coverage: 3/4" in relaxed.stdout
    assert "not reached by any case: orders-delete-profile" in relaxed.stdout
    strict = ptest(policy, work / "policy.tests.yaml", "--require-coverage")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "not reached by any case: orders-delete-profile" in strict.stdout


def test_a_denied_case_that_finds_the_rule_counts_as_coverage() -> None:
    report = run_text(
        one_case(
            "no delete scope",
            "\n      method: DELETE\n      claims: {scope: profile.read}",
            "{decision: deny, reason: insufficient_scope, rule: orders-delete-profile}",
        ).replace("      method: GET\n", ""),
        BASE + EXTRA_RULE,
    )
    assert report.failed == []
    assert report.covered == {"orders-delete-profile"}


# --- malformed cases files -------------------------------------------------------------------

GOOD_CASE = one_case("fine", "\n      claims: {scope: profile.read}", "{decision: allow}")


@pytest.mark.parametrize(
    ("bad_request", "message"),
    [
        (f"{{workload: {ORDERS}, hots: {PROFILE_HOST}}}", "request: unknown field(s): hots"),
        (f"{{host: {PROFILE_HOST}, issuer: corp-idp}}", "request.workload: required"),
        (f"{{workload: {ORDERS}, expiresIn: soon}}", "request.expiresIn"),
    ],
    ids=["unknown-field", "missing-workload", "bad-expires-in"],
)
def test_malformed_cases_exit_2_naming_file_and_case(
    tmp_path: Path, bad_request: str, message: str
) -> None:
    text = (
        GOOD_CASE
        + f"""  - name: the broken one
    request: {bad_request}
    expect: {{decision: deny}}
"""
    )
    cases = write(tmp_path / "broken.tests.yaml", text)
    result = ptest(POLICY, cases)
    assert result.returncode == 2, result.stdout + result.stderr
    broken_line = text.splitlines().index("  - name: the broken one") + 1
    assert f"{cases}:{broken_line}: cases[1]" in result.stderr
    assert message in result.stderr
    assert "PASS" not in result.stdout  # nothing ran


def test_unknown_expect_field_is_refused() -> None:
    text = one_case("c", "", "{decision: allow, scope: [profile.read]}")
    with pytest.raises(CasesError, match=r"cases\.yaml:2: cases\[0\]: expect: unknown field"):
        parse_cases(text, "cases.yaml")


def test_duplicate_case_names_are_refused() -> None:
    with pytest.raises(CasesError, match="used twice"):
        parse_cases(GOOD_CASE + GOOD_CASE.removeprefix("cases:\n"), "cases.yaml")


def test_missing_cases_file_exits_2(tmp_path: Path) -> None:
    result = ptest(POLICY, tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_unknown_issuer_in_a_case_exits_2(tmp_path: Path) -> None:
    text = one_case("ghost issuer", "", "{decision: allow}").replace(
        "issuer: corp-idp", "issuer: ghost-idp"
    )
    result = ptest(POLICY, write(tmp_path / "c.yaml", text))
    assert result.returncode == 2
    assert "ghost issuer" in result.stderr
    assert "ghost-idp" in result.stderr


# --- what the cases can say ------------------------------------------------------------------


def test_expect_claims_is_a_subset_match_down_nested_act() -> None:
    request = f"\n      claims: {{scope: profile.read, act: {{sub: {GATEWAY}}}}}"
    passing = run_text(
        one_case(
            "chain",
            request,
            f"{{decision: allow, claims: {{act: {{sub: {ORDERS}, act: {{sub: {GATEWAY}}}}}}}}}",
        )
    )
    assert passing.failed == [], [r.failures for r in passing.failed]
    (result,) = passing.results
    assert result.decision.claims is not None
    assert result.decision.claims["act"] == {"sub": ORDERS, "act": {"sub": GATEWAY}}

    # naming only part of the nested structure is enough ...
    partial = run_text(
        one_case("chain", request, f"{{decision: allow, claims: {{act: {{sub: {ORDERS}}}}}}}")
    )
    assert partial.failed == []

    # ... but a wrong value deep inside is a failure that names the path
    wrong = run_text(
        one_case(
            "chain",
            request,
            "{decision: allow, claims: {act: {act: {sub: spiffe://cluster.local/ns/x/sa/y}}}}",
        )
    )
    (result,) = wrong.results
    assert result.failures == (
        f"expected claim act.act.sub = 'spiffe://cluster.local/ns/x/sa/y', got {GATEWAY!r}",
    )

    # and a claim the token does not have is a failure too
    missing = run_text(one_case("chain", request, "{decision: allow, claims: {cnf: {x: 1}}}"))
    assert missing.failed


@pytest.mark.parametrize("expires", ["-10m", "-10s", "-1h"])
def test_negative_expires_in_gives_token_expired(expires: str) -> None:
    report = run_text(
        one_case(
            "stale",
            f"\n      claims: {{scope: profile.read}}\n      expiresIn: {expires}",
            "{decision: deny, reason: token_expired}",
        )
    )
    assert report.failed == [], [r.failures for r in report.failed]
    (result,) = report.results
    assert result.decision.token is None
    assert result.decision.claims is None


def test_certificate_true_binds_the_token_with_cnf() -> None:
    report = run_text(
        one_case(
            "bound",
            "\n      claims: {scope: profile.read}\n      certificate: true",
            "{decision: allow}",
        )
        + one_case(
            "unbound", "\n      claims: {scope: profile.read}", "{decision: allow}"
        ).removeprefix("cases:\n")
    )
    bound, unbound = report.results
    assert bound.decision.claims is not None and unbound.decision.claims is not None
    thumb = bound.decision.claims["cnf"]["x5t#S256"]
    assert isinstance(thumb, str) and len(thumb) == 43  # base64url SHA-256, unpadded
    assert "cnf" not in unbound.decision.claims


def test_rs256_only_issuer_still_works(tmp_path: Path) -> None:
    """A policy whose issuer only speaks RS256: the runner signs with a throwaway RSA key."""
    work = copy_examples(tmp_path)
    text = BASE.replace("algorithms: [ES256]", "algorithms: [RS256]")
    assert text != BASE
    policy = write(work / "policy.yaml", text)
    assert Simulator(load_policy(policy)).issuer_keys["corp-idp"].alg == "RS256"
    result = ptest(policy, work / "policy.tests.yaml", "--require-coverage")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 passed, 0 failed" in result.stdout
    assert "rule coverage: 3/3" in result.stdout
