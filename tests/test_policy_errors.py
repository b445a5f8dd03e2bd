"""Compile errors that guide: the closest known field for a misspelt one, no knock-on errors
from one mistake, a fix of its own for each kind of problem, "is required" for what is
missing, and YAML syntax errors at a real line, in a file and in a directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from clikit import in_process

from extauthz.errors import PolicyError, Problem
from extauthz.policy.compiler import compile_policy, load_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"
BASE = EXAMPLE.read_text(encoding="utf-8")


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def line_of(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if fragment in line)


def found(text: str) -> list[Problem]:
    with pytest.raises(PolicyError) as caught:
        compile_policy(text, source="p.yaml", base_dir=ROOT / "examples")
    return list(caught.value.problems)


def messages(text: str) -> list[str]:
    return [str(p) for p in found(text)]


# --- an unknown field names the closest known one ---------------------------------------------


def test_a_misspelt_field_names_the_known_one_it_is_closest_to() -> None:
    text = edit("require: {scopes: [profile.read]}", "require: {scope: [profile.read]}")
    assert messages(text) == [
        f"p.yaml:{line_of(text, 'scope: [profile.read]}')}: rules[0] (orders-read-profile): "
        "require.scope: unknown field `scope`: did you mean `scopes`?"
    ]


@pytest.mark.parametrize(
    ("old", "new", "where", "expected"),
    [
        ("    purpose: The order", "    porpoise: The order", "rules[0] (orders-read-profile): ",
         "porpoise: unknown field `porpoise`: did you mean `purpose`?"),
        ("      host: profile", "      hots: profile", "rules[0] (orders-read-profile): ",
         "match.hots: unknown field `hots`: did you mean `host`?"),
        ("  maxTtl: 300s", "  maxTTL: 300s", "exchange: ",
         "maxTTL: unknown field `maxTTL`: did you mean `maxTtl`?"),
        ("trustedIssuers:", "trustedIssuer:", "",
         "trustedIssuer: unknown field `trustedIssuer`: did you mean `trustedIssuers`?"),
    ],
)  # fmt: skip
def test_misspellings_at_every_level(old: str, new: str, where: str, expected: str) -> None:
    text = edit(old, new)
    assert messages(text) == [f"p.yaml:{line_of(text, new.strip())}: {where}{expected}"]


def test_a_field_like_no_known_one_lists_what_is_known() -> None:
    text = edit("exchange:\n", "exchange:\n  colour: blue\n")
    assert messages(text) == [
        "p.yaml:6: exchange: colour: unknown field `colour` (expected one of: issuer, leeway, "
        "maxTokenBytes, maxTtl, stripHeaders, tokenType, trustDomain)"
    ]


# --- errors that only follow from an earlier one are not reported -----------------------------


def test_a_misspelt_workloads_section_is_one_problem_not_one_per_rule() -> None:
    text = edit("workloads:\n  trustDomains", "workload:\n  trustDomains")
    # Not also "workloads: is required", nor per rule "trust domain ... not in trustDomains".
    assert messages(text) == [
        f"p.yaml:{line_of(text, 'workload:')}: workload: unknown field `workload`: "
        "did you mean `workloads`?"
    ]


def test_a_missing_workloads_section_is_required_once() -> None:
    text = edit("workloads:\n  trustDomains: [cluster.local]\n", "")
    assert messages(text) == ["p.yaml:2: workloads: is required"]


def test_a_misspelt_required_field_is_not_also_missing() -> None:
    text = edit("      ttl: 30s", "      tll: 30s")
    assert messages(text) == [
        f"p.yaml:{line_of(text, 'tll:')}: rules[0] (orders-read-profile): grant.tll: "
        "unknown field `tll`: did you mean `ttl`?"
    ]


def test_a_broken_trusted_issuer_is_not_blamed_on_the_rules_that_name_it() -> None:
    text = edit("    algorithms: [ES256]", "    algorithms: [ES257]")
    found_messages = messages(text)
    assert len(found_messages) == 1
    assert found_messages[0].startswith(
        f"p.yaml:{line_of(text, 'ES257')}: trustedIssuers[0] (corp-idp): algorithms: "
        "'ES257' is not accepted"
    )


def test_a_misspelt_issuers_section_is_one_problem() -> None:
    text = edit("trustedIssuers:", "trustedIsuers:")
    assert messages(text) == [
        f"p.yaml:{line_of(text, 'trustedIsuers:')}: trustedIsuers: unknown field "
        "`trustedIsuers`: did you mean `trustedIssuers`?"
    ]


def test_an_unknown_issuer_in_a_rule_is_still_reported_with_the_ids_to_choose_from() -> None:
    text = edit("      issuers: [corp-idp]", "      issuers: [corp-ipd]")
    (problem,) = found(text)
    assert str(problem) == (
        f"p.yaml:{line_of(text, 'corp-ipd')}: rules[0] (orders-read-profile): match.issuers: "
        "'corp-ipd' is not a trusted issuer id"
    )
    assert problem.fix == "name one of the trustedIssuers ids (corp-idp), or add that issuer"


# --- "is required" for what is missing ---------------------------------------------------------


def test_no_rules_key_is_required_not_must_be_a_list() -> None:
    assert messages(BASE.partition("rules:")[0]) == ["p.yaml:2: rules: is required"]
    assert messages(BASE.partition("rules:")[0] + "rules: {}\n")[0].endswith(
        "rules: must be a list"
    )


def test_missing_top_level_keys_are_required() -> None:
    text = edit("apiVersion: extauthz/v1\nkind: ExchangePolicy\n", "")
    text = edit("trustedIssuers:\n", "unused:\n", text)
    assert [m.split(": ", 1)[1] for m in messages(text)] == [
        "unused: unknown field `unused` (expected one of: apiVersion, default, exchange, kind, "
        "mode, rules, trustedIssuers, workloads)",
        "apiVersion: is required",
        "kind: is required",
        "trustedIssuers: is required",
    ]


# --- each kind of problem has its own fix ------------------------------------------------------


BROKEN = {
    "misspelt": ("require: {scopes:", "require: {scope:"),
    "unknown": ("exchange:\n", "exchange:\n  colour: blue\n"),
    "required": ("      ttl: 30s\n", ""),
    "not-a-list": ("      methods: [GET]", "      methods: GET"),
    "duration": ("      ttl: 30s", "      ttl: soon"),
    "method": ("      methods: [GET]", "      methods: [get]"),
    "scope-token": ("require: {scopes: [profile.read]}", 'require: {scopes: ["a b"]}'),
    "ttl-cap": ("      ttl: 30s", "      ttl: 600s"),
    "issuer-id": ("      issuers: [corp-idp]", "      issuers: [nobody]"),
    "trust-domain": ("trustDomains: [cluster.local]", "trustDomains: [example.org]"),
    "audience": (
        "      audience: spiffe://cluster.local/ns/shop/sa/profile",
        "      audience: '*'",
    ),
}


def test_every_kind_of_compile_problem_has_a_fix_of_its_own() -> None:
    fixes = {}
    for kind, (old, new) in BROKEN.items():
        problems = found(edit(old, new))
        assert all(p.fix for p in problems), kind
        fixes[kind] = problems[0].fix
    assert len(set(fixes.values())) == len(fixes), fixes
    assert fixes["misspelt"] == "rename `scope` to `scopes`"
    assert fixes["required"] == "add `grant.ttl` (docs/policy.md)"
    assert fixes["method"] == "write methods in upper case: GET, POST, PUT, ..."


def test_lint_prints_each_compile_problem_with_its_own_fix(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "issuers", tmp_path / "issuers")
    text = edit("      methods: [GET]", "      methods: [get]")
    text = edit("      ttl: 15s", "      ttl: soon", text)
    policy = tmp_path / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    result = in_process("policy", "lint", policy)
    assert result.returncode == 1
    assert result.stdout.splitlines()[:4] == [
        f"{policy}:{line_of(text, '[get]')}: error[invalid-policy] rule orders-read-profile: "
        "match.methods: 'get' is not an upper-case HTTP method",
        "    fix: write methods in upper case: GET, POST, PUT, ...",
        f"{policy}:{line_of(text, 'soon')}: error[invalid-policy] rule checkout-charge-payment: "
        "grant.ttl: must be a positive duration like 30s, 5m or 1h",
        "    fix: write `grant.ttl` as a whole number with s, m or h, like 30s",
    ]


# --- YAML syntax errors at a real line ---------------------------------------------------------


UNCLOSED = '      paths: ["/v1/customers/{id}"\n'


def test_a_yaml_syntax_error_names_the_line_the_parser_reports(tmp_path: Path) -> None:
    text = edit('      paths: ["/v1/customers/{id}"]\n', UNCLOSED)
    policy = tmp_path / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    (problem,) = caught.value.problems
    # The flow sequence opened on this line is still open when the next key comes.
    assert problem.line is not None
    assert line_of(text, UNCLOSED.strip()) <= problem.line <= len(text.splitlines())
    assert str(problem) == (
        f"{policy}:{problem.line}: not valid YAML: did not find expected ',' or ']'"
    )
    assert problem.fix.startswith("correct the YAML at that line")


def test_a_yaml_error_at_the_end_of_a_file_is_on_its_last_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(BASE + 'rules2: "never closed\n', encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    (problem,) = caught.value.problems
    assert problem.line == len((BASE + 'rules2: "never closed\n').splitlines())


def test_yaml_syntax_errors_in_a_directory_name_each_broken_file(tmp_path: Path) -> None:
    directory = tmp_path / "policy"
    directory.mkdir()
    shutil.copytree(ROOT / "examples" / "issuers", directory / "issuers")
    head, _, rules = BASE.partition("rules:\n")
    (directory / "00-shared.yaml").write_text(head, encoding="utf-8")
    (directory / "a.yaml").write_text("rules:\n" + rules.replace("]\n", "\n", 1), "utf-8")
    (directory / "b.yaml").write_text("rules:\n  - id: x\n   purpose: bad indent\n", "utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policy(directory)
    lines = [str(p) for p in caught.value.problems]
    assert [p.file for p in caught.value.problems] == [
        str(directory / "a.yaml"),
        str(directory / "b.yaml"),
    ]
    assert lines[0].startswith(f"{directory / 'a.yaml'}:")
    assert (
        lines[1] == f"{directory / 'b.yaml'}:3: not valid YAML: did not find expected '-' indicator"
    )
    result = in_process("policy", "lint", directory)
    assert result.returncode == 1
    assert f"{directory / 'b.yaml'}:3: error[invalid-policy] not valid YAML" in result.stdout
