"""Context-bound rules: claim conditions (``require.claims``), path parameters bound to claims,
and time-bound grants (``active``), in the compiler, the decision and the tools."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import corekit as k
import pytest
import yaml
from clikit import in_process

from extauthz.decision.pipeline import Decision
from extauthz.decision.reasons import Reason
from extauthz.errors import PolicyError
from extauthz.serve.decision_log import record
from extauthz.tools.diff import NARROWS, WIDENS, diff_policies
from extauthz.tools.lint import LintOptions, lint_text

PORTAL = "spiffe://cluster.local/ns/shop/sa/portal"
ORDERS_HOST = "orders.shop.svc.cluster.local"
TEMPLATES = ["/v1/tenants/{tenant}/orders", "/v1/tenants/{tenant}/orders/{id}"]
CONDITIONS: dict[str, Any] = {
    "azp": "web-shop",
    "acr": ["urn:mfa", "urn:hwk"],
    "tenant": "{tenant}",
    "groups": {"contains": "ops"},
}
GOOD = {"azp": "web-shop", "acr": "urn:hwk", "tenant": "acme", "groups": ["dev", "ops"]}


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tenant_rule(claims: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    rule = k.rule_doc(
        "tenant-orders",
        workloads=[PORTAL],
        host=ORDERS_HOST,
        paths=TEMPLATES,
        require=["orders.read"],
        audience=k.PROFILE,
        scopes=["orders.read"],
        **extra,
    )
    rule["require"]["claims"] = dict(CONDITIONS if claims is None else claims)
    return rule


def general_rule() -> dict[str, Any]:
    """A less specific rule for every shop workload under /v1/tenants/: it overlaps
    ``tenant_rule`` and answers where that one does not match."""
    return k.rule_doc(
        "portal-orders",
        workloads=["spiffe://cluster.local/ns/shop/sa/*"],
        host=ORDERS_HOST,
        paths=["/v1/tenants/**"],
        require=["orders.read"],
        audience=k.PROFILE,
        scopes=["orders.read"],
    )


def world(*rules: dict[str, Any]) -> k.World:
    return k.make_world(k.policy_doc(list(rules) or [tenant_rule()]), scope="orders.read")


def ask(
    w: k.World, path: str = "/v1/tenants/acme/orders", now: float = k.NOW, **claims: Any
) -> Decision:
    token = w.token(**{**GOOD, **claims})
    return w.ask(token, principal=PORTAL, host=ORDERS_HOST, path=path, now=now)


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        k.compile_doc(doc)
    return [f"{p.field}: {p.message}" for p in caught.value.problems]


# --- compiling ------------------------------------------------------------------------------------


def test_every_kind_compiles_into_a_condition() -> None:
    rule = world().snap.policy.rules[0]
    kinds = {c.claim: c.kind for c in rule.claims}
    assert kinds == {"azp": "equals", "acr": "any", "tenant": "param", "groups": "contains"}
    assert rule.templates and all(t.params for t in rule.templates)


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param(
            {"tenant": "{org}"},
            "require.claims: claims.tenant: {org} is not a parameter of every path template",
            id="param-unknown",
        ),
        pytest.param({"azp": None}, "require.claims: claims.azp: must be a string", id="null"),
        pytest.param({"acr": []}, "require.claims: claims.acr: a list holds", id="empty-list"),
        pytest.param({"acr": ["a", "a"]}, "require.claims: claims.acr: lists a value", id="twice"),
        pytest.param({"acr": [["a"]]}, "require.claims: claims.acr: a list holds", id="nested"),
        pytest.param(
            {"groups": {"has": "ops"}}, "require.claims: claims.groups: a mapping is", id="mapping"
        ),
        pytest.param({}, "require.claims: must be a mapping", id="empty"),
    ],
)
def test_a_bad_condition_is_one_problem(claims: dict[str, Any], expected: str) -> None:
    found = problems(k.policy_doc([tenant_rule(claims)]))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_parameter_missing_from_one_template_names_it_and_the_line() -> None:
    rule = tenant_rule({"tenant": "{tenant}"})
    rule["match"]["paths"].append("/v1/orders/{id}")
    text = k.dump(k.policy_doc([rule]))
    with pytest.raises(PolicyError) as caught:
        k.compile_policy(text, source="policy.yaml")
    (problem,) = caught.value.problems
    assert "not of /v1/orders/{id}" in problem.message
    lines = text.splitlines()
    assert problem.line is not None and "claims:" in lines[problem.line - 1]


def test_a_yaml_date_is_not_a_claim_value() -> None:
    text = k.dump(k.policy_doc([tenant_rule({"azp": "x"})])).replace("azp: x", "azp: 2026-12-01")
    with pytest.raises(PolicyError):
        k.compile_policy(text, source="policy.yaml")


@pytest.mark.parametrize(
    ("active", "expected"),
    [
        ({"from": "2026-12-01T00:00:00"}, "active.from: must be an RFC 3339 time with a zone"),
        ({"until": "tomorrow"}, "active.until: must be an RFC 3339 time with a zone"),
        (
            {"from": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"},
            "active.until: must be after from",
        ),
        ({}, "active: give from, until or both"),
        ({"to": "2026-12-01T00:00:00Z"}, "active.to: unknown field"),
    ],
)
def test_a_bad_window_is_reported(active: dict[str, Any], expected: str) -> None:
    found = problems(k.policy_doc([tenant_rule(active=active)]))
    assert any(p.startswith(expected) for p in found), found


def test_unquoted_yaml_timestamps_are_read_with_their_zone() -> None:
    doc = k.policy_doc([tenant_rule()])
    text = k.dump(doc).replace("  grant:", "  active: {until: 2026-12-04T18:00:00+02:00}\n  grant:")
    policy = k.compile_policy(text, source="policy.yaml")
    expected = dt.datetime(2026, 12, 4, 16, tzinfo=dt.UTC).timestamp()
    assert policy.rules[0].active_until == expected and policy.windows


# --- deciding -------------------------------------------------------------------------------------


def test_a_token_meeting_every_condition_is_exchanged() -> None:
    decision = ask(world())
    claims = k.allowed(decision, "tenant-orders")
    # Conditions narrow who gets a token; they add nothing to it.
    assert not {"azp", "acr", "tenant", "groups"} & set(claims)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("azp", "other-app"),
        ("azp", None),
        ("acr", "urn:pwd"),
        ("acr", ["urn:mfa"]),
        ("tenant", "globex"),
        ("groups", ["dev"]),
        ("groups", "ops"),
        ("groups", None),
    ],
)
def test_a_claim_that_does_not_meet_its_condition_is_claim_mismatch(claim: str, value: Any) -> None:
    decision = ask(world(), **{claim: value})
    k.denied(decision, Reason.CLAIM_MISMATCH)
    assert decision.rule is not None and decision.rule.id == "tenant-orders"
    assert decision.detail == f"claim {claim} does not meet the rule"
    line = json.dumps(record(decision, 0.001, "r-1", k.NOW))
    assert json.loads(line)["reason"] == "claim_mismatch" and claim in line
    if isinstance(value, str):
        assert value not in line


def test_the_path_parameter_is_the_matched_templates() -> None:
    w = world()
    assert ask(w, "/v1/tenants/acme/orders/7").allowed
    k.denied(ask(w, "/v1/tenants/globex/orders/7"), Reason.CLAIM_MISMATCH)
    # Normalised first: the segment compared is the one the upstream routes on.
    assert ask(w, "/v1/tenants/x/../acme/orders").allowed


@pytest.mark.parametrize(
    ("wanted", "given", "holds"),
    [
        (True, True, True),
        (True, 1, False),
        (1, True, False),
        (1, 1, True),
        (1, 1.0, False),
        (1, "1", False),
        ("1", 1, False),
        (1.5, 1.5, True),
        ("web", "web", True),
        ("web", "Web", False),
    ],
)
def test_values_compare_by_type_and_value(wanted: Any, given: Any, holds: bool) -> None:
    w = world(tenant_rule({"level": wanted}))
    decision = ask(w, level=given)
    assert decision.allowed is holds, (decision.reason, decision.detail)


def test_contains_compares_items_by_type_too() -> None:
    w = world(tenant_rule({"flags": {"contains": 1}}))
    assert ask(w, flags=[0, 1]).allowed
    k.denied(ask(w, flags=[True, 1.0, "1"]), Reason.CLAIM_MISMATCH)


def test_a_window_bounds_the_rule_and_its_tokens() -> None:
    start, end = k.NOW - 60, k.NOW + 20
    w = world(tenant_rule(active={"from": iso(start), "until": iso(end)}))
    claims = k.allowed(ask(w), "tenant-orders")
    assert claims["exp"] == int(end)  # the grant's 30 s would pass until
    before = ask(w, now=start - 1, iat=int(start - 120))
    k.denied(before, Reason.RULE_INACTIVE)
    assert before.rule is not None and before.rule.id == "tenant-orders"
    k.denied(ask(w, now=end), Reason.RULE_INACTIVE)
    assert ask(w, now=start, iat=int(start - 120)).allowed


def test_outside_its_window_a_rule_does_not_match_and_the_next_one_may() -> None:
    past = {"until": iso(k.NOW - 1)}
    specific = tenant_rule(active=past)
    general = general_rule()
    w = world(specific, general)
    k.allowed(ask(w), "portal-orders")
    # Without the general rule the same request names the rule that is over.
    k.denied(ask(world(specific)), Reason.RULE_INACTIVE)


# --- the tools ------------------------------------------------------------------------------------


def lint(rule: dict[str, Any], **options: Any) -> dict[str, Any]:
    text = k.dump(k.policy_doc([rule]))
    findings = lint_text(text, options=LintOptions(now=k.NOW, **options))
    return {f.check: f for f in findings}


def test_lint_flags_a_long_window_and_a_passed_one() -> None:
    long = lint(tenant_rule(active={"until": iso(k.NOW + 40 * 86400)}))
    assert long["rule-window-long"].severity == "warning"
    assert "40 days" in long["rule-window-long"].message
    assert "rule-window-long" not in lint(
        tenant_rule(active={"until": iso(k.NOW + 40 * 86400)}), max_window_days=45
    )
    short = lint(tenant_rule(active={"until": iso(k.NOW + 3 * 86400)}))
    assert "rule-window-long" not in short and "rule-window-passed" not in short
    over = lint(tenant_rule(active={"until": iso(k.NOW - 1)}))
    assert over["rule-window-passed"].severity == "warning"
    # A window that starts later is measured from its start.
    later = {"from": iso(k.NOW + 100 * 86400), "until": iso(k.NOW + 110 * 86400)}
    assert "rule-window-long" not in lint(tenant_rule(active=later))


def test_lint_cli_takes_the_window_limit(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    far = iso(dt.datetime.now(dt.UTC).timestamp() + 40 * 86400)
    doc = k.policy_doc([tenant_rule(active={"until": far})])
    policy.write_text(k.dump(doc))
    k.Idp(k.IDP_ISS).write_jwks(tmp_path / k.JWKS_FILE)
    strict = in_process("policy", "lint", "--strict", policy)
    assert strict.returncode == 1 and "rule-window-long" in strict.stdout
    relaxed = in_process("policy", "lint", "--strict", "--max-window-days", "60", policy)
    assert "rule-window-long" not in relaxed.stdout
    bad = in_process("policy", "lint", "--max-window-days", "0", policy)
    assert bad.returncode == 2


def changes(old: dict[str, Any], new: dict[str, Any]) -> set[tuple[str, str]]:
    a = k.compile_doc(k.policy_doc([old]))
    b = k.compile_doc(k.policy_doc([new]))
    return {(c.effect, c.kind) for c in diff_policies(a, b)}


def without(claim: str) -> dict[str, Any]:
    return {name: value for name, value in CONDITIONS.items() if name != claim}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (CONDITIONS, without("azp"), (WIDENS, "claim-condition-removed")),
        (without("azp"), CONDITIONS, (NARROWS, "claim-condition-added")),
        (
            CONDITIONS,
            {**CONDITIONS, "acr": ["urn:mfa", "urn:hwk", "urn:pwd"]},
            (WIDENS, "claim-condition-widened"),
        ),
        (CONDITIONS, {**CONDITIONS, "acr": ["urn:hwk"]}, (NARROWS, "claim-condition-narrowed")),
        (CONDITIONS, {**CONDITIONS, "azp": "other"}, (WIDENS, "claim-condition-changed")),
        (CONDITIONS, {**CONDITIONS, "azp": ["web-shop", "x"]}, (WIDENS, "claim-condition-changed")),
        ({"level": True}, {"level": 1}, (WIDENS, "claim-condition-changed")),
    ],
)
def test_diff_classifies_claim_conditions(
    old: dict[str, Any], new: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert changes(tenant_rule(old), tenant_rule(new)) == {expected}


A, B, C = iso(k.NOW), iso(k.NOW + 3600), iso(k.NOW + 7200)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"until": B}, {"until": C}, {(WIDENS, "window-until-later")}),
        ({"until": C}, {"until": B}, {(NARROWS, "window-until-earlier")}),
        ({"until": B}, None, {(WIDENS, "window-until-removed")}),
        (None, {"until": B}, {(NARROWS, "window-until-added")}),
        ({"from": B}, {"from": A}, {(WIDENS, "window-from-earlier")}),
        ({"from": A}, {"from": B}, {(NARROWS, "window-from-later")}),
        (
            {"from": A},
            {"until": B},
            {(WIDENS, "window-from-removed"), (NARROWS, "window-until-added")},
        ),
    ],
)
def test_diff_classifies_windows(
    old: dict[str, Any] | None, new: dict[str, Any] | None, expected: set[tuple[str, str]]
) -> None:
    before = tenant_rule(active=old) if old else tenant_rule()
    after = tenant_rule(active=new) if new else tenant_rule()
    assert changes(before, after) == expected


def test_policy_test_cases_carry_claims_and_a_now(tmp_path: Path) -> None:
    rule = tenant_rule(active={"from": "2026-12-01T00:00:00Z", "until": "2026-12-04T18:00:00Z"})
    policy = tmp_path / "policy.yaml"
    policy.write_text(k.dump(k.policy_doc([rule])))
    k.Idp(k.IDP_ISS).write_jwks(tmp_path / k.JWKS_FILE)

    def case(name: str, now: str, claims: dict[str, Any], expect: dict[str, Any]) -> Any:
        request = {
            "workload": PORTAL,
            "host": ORDERS_HOST,
            "path": "/v1/tenants/acme/orders",
            "issuer": k.IDP_ID,
            "now": now,
            "claims": {"scope": "orders.read", **claims},
        }
        return {"name": name, "request": request, "expect": expect}

    cases = [
        case("inside the window", "2026-12-02T09:00:00Z", GOOD, {"decision": "allow"}),
        case(
            "its last token ends with the window",
            "2026-12-04T17:59:50Z",
            GOOD,
            {"decision": "allow", "maxTtl": "10s"},
        ),
        case(
            "after the window",
            "2026-12-05T00:00:00Z",
            GOOD,
            {"decision": "deny", "reason": "rule_inactive", "rule": "tenant-orders"},
        ),
        case(
            "another tenant",
            "2026-12-02T09:00:00Z",
            {**GOOD, "tenant": "globex"},
            {"decision": "deny", "reason": "claim_mismatch"},
        ),
    ]
    cases_file = tmp_path / "cases.yaml"
    cases_file.write_text(yaml.safe_dump({"cases": cases}, sort_keys=False))
    result = in_process("policy", "test", policy, cases_file)
    assert result.returncode == 0, result.stdout
    assert "4 passed, 0 failed" in result.stdout
    cases[0]["request"]["now"] = "2026-12-02T09:00:00"
    cases_file.write_text(yaml.safe_dump({"cases": cases}, sort_keys=False))
    bad = in_process("policy", "test", policy, cases_file)
    assert bad.returncode == 2 and "request.now" in bad.stderr


def test_explain_shows_each_conditions_verdict(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(k.dump(k.policy_doc([tenant_rule()])))
    k.Idp(k.IDP_ISS).write_jwks(tmp_path / k.JWKS_FILE)
    claims = {**GOOD, "scope": "orders.read", "groups": ["dev"]}
    args = [
        "explain", "--policy", policy, "--workload", PORTAL, "--host", ORDERS_HOST,
        "--path", "/v1/tenants/acme/orders", "--claims", json.dumps(claims),
        "--now", str(k.NOW),
    ]  # fmt: skip
    doc = json.loads(in_process(*args, "--format", "json").stdout)
    assert doc["reason"] == "claim_mismatch"
    (candidate,) = doc["candidates"]
    verdicts = {c["condition"]: c["holds"] for c in candidate["conditions"]}
    assert verdicts == {
        "azp = 'web-shop'": True,
        "acr is one of ['urn:mfa', 'urn:hwk']": True,
        "tenant = path parameter {tenant}": True,
        "groups contains 'ops'": False,
    }
    text = in_process(*args).stdout
    assert "claim groups contains 'ops': does not hold" in text


# --- faults found in review, fixed ------------------------------------------------------------


def test_a_shadow_rule_outside_its_window_shadows_nothing() -> None:
    """A staged shadow rule before its window (or after it) must not wave requests through:
    the deny stands, as if the rule were not there."""
    for active in ({"from": iso(k.NOW + 3600)}, {"until": iso(k.NOW - 1)}):
        w = world(tenant_rule(active=active, mode="shadow"))
        decision = ask(w)
        k.denied(decision, Reason.RULE_INACTIVE)


def test_diff_calls_a_smaller_window_widening_when_another_rule_answers_instead() -> None:
    general = general_rule()
    old = k.compile_doc(k.policy_doc([tenant_rule(), general]))
    new = k.compile_doc(k.policy_doc([tenant_rule(active={"until": iso(k.NOW)}), general]))
    (change,) = diff_policies(old, new)
    assert (change.effect, change.kind) == (WIDENS, "window-until-added")
    assert "portal-orders may answer instead" in change.detail


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["/v1/{tenant}/admin", "/v1/x/{tenant}"], "is ambiguous"),
        (["/v1/tenants/{tenant}/orders", "/v1/tenants/{tenant}/orders/{bad"], "'{bad'"),
    ],
)
def test_a_bound_parameter_sits_at_one_segment_of_valid_templates(
    paths: list[str], expected: str
) -> None:
    rule = tenant_rule({"tenant": "{tenant}"})
    rule["match"]["paths"] = paths
    found = problems(k.policy_doc([rule]))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "active",
    [
        {"until": None},
        {"until": "2026-W49-4T18:00Z"},
        {"until": "20261203T180000Z"},
        {"until": "9999-12-31T23:59:59-01:00"},
        {"from": "0001-01-01T00:00:00+14:00"},
    ],
)
def test_a_window_bound_is_rfc_3339_within_printable_years(active: dict[str, Any]) -> None:
    found = problems(k.policy_doc([tenant_rule(active=active)]))
    assert len(found) == 1 and found[0].startswith("active."), found


def test_diff_calls_removing_a_rule_widening_when_an_overlapping_one_answers_instead() -> None:
    general = general_rule()
    old = k.compile_doc(k.policy_doc([tenant_rule(), general]))
    new = k.compile_doc(k.policy_doc([general]))
    (change,) = diff_policies(old, new)
    assert (change.effect, change.kind, change.rule) == (WIDENS, "rule-removed", "tenant-orders")
    assert "portal-orders" in change.detail
    alone = diff_policies(
        k.compile_doc(k.policy_doc([tenant_rule()])), k.compile_doc(k.policy_doc([k.rule_doc()]))
    )
    assert {(c.effect, c.kind) for c in alone} >= {(NARROWS, "rule-removed")}
