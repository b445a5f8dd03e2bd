"""The policy compiler: every problem reported at once, ambiguity refused, lookups deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import corekit as k
import pytest

from extauthz.decision import paths
from extauthz.decision.model import Policy, WorkloadPattern, normalise_host
from extauthz.errors import PolicyError
from extauthz.policy.compiler import HARD_MAX_TTL, compile_policy, load_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.yaml"


def problems_of(doc: dict[str, Any]) -> list[Any]:
    with pytest.raises(PolicyError) as info:
        k.compile_doc(doc)
    assert info.value.problems, "a PolicyError always carries its problems"
    return list(info.value.problems)


def has_problem(doc: dict[str, Any], field: str, where: str = "", text: str = "") -> Any:
    """The one problem about ``field`` (in entry ``where``), asserting it exists."""
    found = [
        p
        for p in problems_of(doc)
        if p.field == field and where in p.where and text.lower() in p.message.lower()
    ]
    assert found, f"no problem for {where} {field} {text!r}"
    return found[0]


def find(policy: Policy, caller: str, path: str, method: str = "GET", host: str = k.HOST) -> Any:
    segments = paths.normalise(path)
    assert segments is not None
    name = normalise_host(host)
    if name is None:
        return None  # a refused host reaches no rule
    rule = policy.find_rule(name, method, segments, caller, k.IDP_ID)
    return None if rule is None else rule.id


def line_number(text: str, needle: str) -> int:
    for index, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return index
    raise AssertionError(f"{needle!r} not in the document")


# --- the example and the good shape -----------------------------------------------------------


def test_example_policy_compiles() -> None:
    """The shipped example is a working policy: a broken example is a broken demo."""
    policy = load_policy(EXAMPLE)
    assert [r.id for r in policy.rules] == [
        "orders-read-profile",
        "orders-update-address",
        "checkout-charge-payment",
    ]
    assert policy.exchange.issuer == "https://exchange.shop.svc"
    assert policy.exchange.typ == "at+jwt"
    assert policy.exchange.max_ttl == 300
    assert set(policy.issuers) == {"corp-idp"}
    assert policy.issuers["corp-idp"].jwks.file == EXAMPLE.parent / "issuers" / "corp-idp.json"
    assert policy.trust_domains == {"cluster.local"}
    assert policy.xfcc_trusted_hops == frozenset()
    assert find(policy, k.ORDERS, "/v1/customers/42") == "orders-read-profile"
    assert find(policy, k.ORDERS, "/v1/customers/42/address", "PUT") == "orders-update-address"
    assert find(policy, k.CHECKOUT, "/v1/charges", "POST", k.PAYMENTS_HOST) == (
        "checkout-charge-payment"
    )
    assert find(policy, k.CHECKOUT, "/v1/customers/42") is None
    charge = policy.rules[2]
    assert charge.grant.ttl == 15
    assert charge.grant.audience == "spiffe://cluster.local/ns/shop/sa/payments"
    assert charge.require_scopes == {"payments.charge"}


def test_compile_is_deterministic_and_digested() -> None:
    """The digest tells which policy a sidecar runs."""
    text = EXAMPLE.read_text()
    a = compile_policy(text, base_dir=EXAMPLE.parent)
    b = compile_policy(text, base_dir=EXAMPLE.parent)
    assert a.digest == b.digest
    assert a.digest != compile_policy(text + "\n# x\n", base_dir=EXAMPLE.parent).digest


def test_durations_and_defaults() -> None:
    doc = k.policy_doc([k.rule_doc(ttl="1m")], max_ttl="5m")
    policy = k.compile_doc(doc)
    assert policy.exchange.max_ttl == 300
    assert policy.rules[0].grant.ttl == 60
    assert policy.rules[0].shadow is False
    assert policy.rules[0].reexchange is False


# --- every problem at once, located ------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_file_line_rule_and_field() -> None:
    """An operator fixes a policy in one pass, pointed at the line of each mistake."""
    doc = k.policy_doc(
        [
            k.rule_doc("first", ttl="900s"),
            k.rule_doc("second", audience="*", paths=["/v1/orders/{id}"]),
            k.rule_doc("third", paths=["/v1/third"], grnat={"audience": "x"}),
        ]
    )
    text = k.dump(doc)
    with pytest.raises(PolicyError) as info:
        compile_policy(text, source="policy.yaml")
    problems = info.value.problems
    by_rule = {(p.where, p.field): p for p in problems}

    ttl = by_rule[("rules[0] (first)", "grant.ttl")]
    assert ttl.line == line_number(text, "ttl: 900s")
    assert str(ttl).startswith(f"policy.yaml:{ttl.line}: rules[0] (first): grant.ttl: ")

    aud = by_rule[("rules[1] (second)", "grant.audience")]
    assert aud.line == line_number(text, "audience: '*'")
    assert f"policy.yaml:{aud.line}" in str(aud)

    unknown = by_rule[("rules[2] (third)", "grnat")]
    assert unknown.line == line_number(text, "grnat:")
    assert "unknown field" in unknown.message

    assert str(info.value).count("\n") == len(problems) - 1
    for p in problems:
        assert p.line is not None
        assert str(p) in str(info.value)


def test_problems_in_different_sections_are_all_reported() -> None:
    doc = k.policy_doc(max_ttl="2h")
    doc["exchange"]["issuer"] = "http://exchange.shop.svc"
    doc["trustedIssuers"][0]["algorithms"] = ["HS256"]
    doc["rules"][0]["match"]["methods"] = ["get"]
    fields = {(p.where.split(" ")[0], p.field) for p in problems_of(doc)}
    assert ("exchange", "exchange.issuer") in fields
    assert ("exchange", "exchange.maxTtl") in fields
    assert ("trustedIssuers[0]", "algorithms") in fields
    assert ("rules[0]", "match.methods") in fields


def test_overlaps_are_reported_together_with_field_problems() -> None:
    """Ambiguity among the valid rules is reported in the same pass as field errors."""
    doc = k.policy_doc(
        [k.rule_doc("a"), k.rule_doc("b"), k.rule_doc("c", paths=["/x"], ttl="9999s")]
    )
    fields = {p.field for p in problems_of(doc)}
    assert "grant.ttl" in fields
    assert any(f.startswith("match") for f in fields)


def test_overlap_problem_points_at_the_rule() -> None:
    doc = k.policy_doc([k.rule_doc("a"), k.rule_doc("b")])
    text = k.dump(doc)
    with pytest.raises(PolicyError) as info:
        compile_policy(text, source="policy.yaml")
    (problem,) = info.value.problems
    assert problem.line is not None
    assert line_number(text, "- id: a") <= problem.line


@pytest.mark.parametrize(
    ("section", "mutate", "field"),
    [
        ("", lambda d: d.update(extra=1), "extra"),
        ("exchange", lambda d: d["exchange"].update(ttl="30s"), "ttl"),
        ("trustedIssuers[0]", lambda d: d["trustedIssuers"][0].update(jku="x"), "jku"),
        ("workloads", lambda d: d["workloads"].update(trustDomain=["a"]), "trustDomain"),
        ("rules[0]", lambda d: d["rules"][0].update(scopes=["a"]), "scopes"),
        ("rules[0]", lambda d: d["rules"][0]["match"].update(path="/x"), "match.path"),
        ("rules[0]", lambda d: d["rules"][0]["grant"].update(audiences=["a"]), "grant.audiences"),
        ("rules[0]", lambda d: d["rules"][0]["require"].update(scope="a"), "require.scope"),
    ],
)
def test_unknown_fields_are_errors(section: str, mutate: Any, field: str) -> None:
    """A misspelt key is never silently ignored (it might have been a restriction)."""
    doc = k.policy_doc()
    mutate(doc)
    problem = has_problem(doc, field, section, "unknown field")
    assert problem.where.startswith(section)


def test_duplicate_yaml_keys_are_errors() -> None:
    """PyYAML keeps the last of two keys; a tampered or typo'd line must not win silently."""
    text = k.dump(k.policy_doc())
    at = text.index("  grant:\n")
    text = text[:at] + "  grant: {audience: x, scopes: [a], ttl: 1s}\n" + text[at:]
    with pytest.raises(PolicyError) as info:
        compile_policy(text, source="p.yaml")
    (problem,) = info.value.problems
    assert "duplicate key 'grant'" in problem.message
    assert problem.line is not None
    assert str(problem).startswith("p.yaml:")


def test_duplicate_nested_yaml_keys_are_errors() -> None:
    text = k.dump(k.policy_doc()).replace("    ttl: 30s\n", "    ttl: 30s\n    ttl: 1h\n")
    with pytest.raises(PolicyError, match="duplicate key 'ttl'"):
        compile_policy(text)


def test_not_yaml_and_not_a_mapping() -> None:
    for text in ["a: [", "- a\n- b\n", "", "just a string"]:
        with pytest.raises(PolicyError):
            compile_policy(text)


# --- the amplification lints that are hard errors -----------------------------------------------


def test_ttl_above_max_ttl_is_an_error() -> None:
    problem = has_problem(k.policy_doc([k.rule_doc(ttl="301s")]), "grant.ttl", "rules[0]")
    assert "maxTtl" in problem.message
    assert k.compile_doc(k.policy_doc([k.rule_doc(ttl="300s")])).rules[0].grant.ttl == 300
    has_problem(k.policy_doc([k.rule_doc(ttl="2m")], max_ttl="60s"), "grant.ttl")


@pytest.mark.parametrize("ttl", ["0s", 0, -5, "30", "30 s", "1d", "1.5m", True, "forever"])
def test_ttl_must_be_a_positive_duration(ttl: Any) -> None:
    has_problem(k.policy_doc([k.rule_doc(ttl=ttl)]), "grant.ttl")


def test_ttl_is_required() -> None:
    doc = k.policy_doc()
    del doc["rules"][0]["grant"]["ttl"]
    has_problem(doc, "grant.ttl", text="required")


def test_max_ttl_above_the_hard_cap_is_an_error() -> None:
    """No policy can make minted tokens live longer than an hour."""
    has_problem(k.policy_doc(max_ttl=f"{HARD_MAX_TTL + 1}s"), "exchange.maxTtl")
    has_problem(k.policy_doc(max_ttl="2h"), "exchange.maxTtl")
    assert k.compile_doc(k.policy_doc(max_ttl="1h")).exchange.max_ttl == HARD_MAX_TTL


@pytest.mark.parametrize("alg", ["HS256", "HS512", "none", "None", "NONE", "ES256K", "es256"])
def test_symmetric_and_none_algorithms_are_errors(alg: str) -> None:
    """HMAC turns a public key into a secret; 'none' is no signature."""
    doc = k.policy_doc()
    doc["trustedIssuers"][0]["algorithms"] = ["ES256", alg]
    problem = has_problem(doc, "algorithms", "trustedIssuers[0]")
    assert alg in problem.message


@pytest.mark.parametrize(
    "audience",
    [
        "*",
        "spiffe://cluster.local/ns/shop/sa/*",
        "https://*.example.com",
        "https://a.example.com https://b.example.com",
        ["spiffe://cluster.local/ns/shop/sa/a", "spiffe://cluster.local/ns/shop/sa/b"],
        "",
    ],
)
def test_audience_must_be_exactly_one_system(audience: Any) -> None:
    """One minted token, one downstream: no wildcards, lists or families."""
    has_problem(k.policy_doc([k.rule_doc(audience=audience)]), "grant.audience", "rules[0]")


@pytest.mark.parametrize("scope", ["*", "profile.*", "profile*"])
@pytest.mark.parametrize("where", ["grant", "require"])
def test_wildcard_scopes_are_errors(scope: str, where: str) -> None:
    """Scopes are derived deterministically: no 'copy all' and no families."""
    if where == "grant":
        doc = k.policy_doc([k.rule_doc(scopes=["profile.read", scope])])
    else:
        doc = k.policy_doc([k.rule_doc(require=["profile.read", scope])])
    has_problem(doc, f"{where}.scopes", "rules[0]", "wildcard")


@pytest.mark.parametrize("scope", ["a b", 'a"b', "a\\b", "caf\u00e9"])
def test_invalid_scope_tokens_are_errors(scope: str) -> None:
    has_problem(k.policy_doc([k.rule_doc(scopes=[scope])]), "grant.scopes", "rules[0]")


def test_grant_scopes_are_required_and_non_empty() -> None:
    has_problem(k.policy_doc([k.rule_doc(scopes=[])]), "grant.scopes")


@pytest.mark.parametrize("issuer", ["http://exchange.shop.svc", "exchange.shop.svc", ""])
def test_exchange_issuer_must_be_https(issuer: str) -> None:
    doc = k.policy_doc()
    doc["exchange"]["issuer"] = issuer
    has_problem(doc, "exchange.issuer", "exchange")


def test_trusted_issuer_cannot_be_the_exchange_or_a_wildcard() -> None:
    """A subject token claiming to be ours must never take the trusted-issuer path."""
    doc = k.policy_doc()
    doc["trustedIssuers"][0]["issuer"] = k.EXCHANGE_ISS
    has_problem(doc, "issuer", "trustedIssuers[0]")
    doc = k.policy_doc()
    doc["trustedIssuers"][0]["issuer"] = "https://*.example.com"
    has_problem(doc, "issuer", "trustedIssuers[0]", "wildcard")
    doc = k.policy_doc()
    doc["trustedIssuers"][0]["id"] = "exchange"
    has_problem(doc, "id", "trustedIssuers[0]", "reserved")


def test_unknown_issuer_id_in_a_rule_is_an_error() -> None:
    problem = has_problem(
        k.policy_doc([k.rule_doc(issuers=["corp-idp", "partner-idp"])]), "match.issuers"
    )
    assert "partner-idp" in problem.message


def test_default_allow_is_impossible() -> None:
    doc = k.policy_doc()
    doc["default"] = "allow"
    has_problem(doc, "default")


@pytest.mark.parametrize(
    "workload",
    [
        "spiffe://other.domain/ns/shop/sa/orders",
        "spiffe://other.domain/ns/*/sa/orders",
        "spiffe://evil.cluster.local/ns/shop/sa/orders",
    ],
)
def test_workload_outside_the_trust_domains_is_an_error(workload: str) -> None:
    problem = has_problem(k.policy_doc([k.rule_doc(workloads=[workload])]), "match.workloads")
    assert "trust domain" in problem.message


@pytest.mark.parametrize(
    "workload",
    [
        "spiffe://cluster.local/ns/sh*p/sa/orders",  # '*' inside a segment
        "spiffe://cluster.local/ns/**/sa/orders",  # '**' not last
        "spiffe://*/ns/shop/sa/orders",  # wildcard trust domain
        "spiffe://cluster.local*/ns/a",
        "spiffe://cluster.local/**x",
        "cluster.local/ns/shop/sa/orders",  # not a SPIFFE ID
        "spiffe://cluster.local/ns/shop/sa/orders/",
        "spiffe://Cluster.local/ns/shop/sa/orders",
    ],
)
def test_bad_workloads_are_errors(workload: str) -> None:
    has_problem(k.policy_doc([k.rule_doc(workloads=[workload])]), "match.workloads")


def test_upper_case_scheme_workload_is_canonical_or_refused() -> None:
    doc = k.policy_doc([k.rule_doc(workloads=["SPIFFE://cluster.local/ns/shop/sa/orders"])])
    try:
        policy = k.compile_doc(doc)
    except PolicyError:
        return  # refused: fine
    assert find(policy, k.ORDERS, "/v1/customers/1") == "orders-read-profile"


def test_upper_case_scheme_trusted_hop_is_canonical_or_refused() -> None:
    hop = "SPIFFE://cluster.local/ns/edge/sa/gateway"
    try:
        policy = k.compile_doc(k.policy_doc(trusted_hops=[hop]))
    except PolicyError:
        return
    assert "spiffe://cluster.local/ns/edge/sa/gateway" in policy.xfcc_trusted_hops


@pytest.mark.parametrize("host", ["Profile.svc", "profile.svc:8080", "*.svc", "a..b", "-a.svc"])
def test_rule_hosts_are_lower_case_names_without_port(host: str) -> None:
    has_problem(k.policy_doc([k.rule_doc(host=host)]), "match.host")


@pytest.mark.parametrize("path", ["/v1/*", "v1", "/v1/{id", "/**/x", "/v1/../x"])
def test_bad_path_templates_are_errors(path: str) -> None:
    has_problem(k.policy_doc([k.rule_doc(paths=[path])]), "match.paths")


def test_duplicate_rule_ids_are_errors() -> None:
    doc = k.policy_doc([k.rule_doc("same"), k.rule_doc("same", paths=["/other"])])
    has_problem(doc, "id", "rules[1]")


# --- ambiguity is a compile error -------------------------------------------------------------


def test_exact_duplicate_overlap_is_an_error() -> None:
    """Two rules for the same call are first-match luck; refuse them."""
    doc = k.policy_doc([k.rule_doc("a"), k.rule_doc("b", scopes=["profile.read"])])
    (problem,) = problems_of(doc)
    assert "overlaps" in problem.message and "'a'" in problem.message
    assert "(b)" in problem.where


def test_overlap_through_differently_named_params_is_an_error() -> None:
    doc = k.policy_doc(
        [
            k.rule_doc("a", paths=["/v1/customers/{id}"]),
            k.rule_doc("b", paths=["/v1/customers/{cid}"]),
        ]
    )
    assert any("overlaps" in p.message for p in problems_of(doc))


def test_overlap_on_one_shared_method_or_workload_is_an_error() -> None:
    doc = k.policy_doc(
        [
            k.rule_doc("a", methods=["GET", "HEAD"]),
            k.rule_doc("b", methods=["POST", "HEAD"], workloads=[k.CHECKOUT, k.ORDERS]),
        ]
    )
    assert any("overlaps" in p.message for p in problems_of(doc))


# (caller, method, host, path) -> the rule it reaches; "a" is k.rule_doc's default rule.
Probe = tuple[str, str, str, str, str | None]


@pytest.mark.parametrize(
    ("other", "probes"),
    [
        (
            {"methods": ["POST"]},
            [
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1", "a"),
                (k.ORDERS, "POST", k.HOST, "/v1/customers/1", "b"),
                (k.ORDERS, "PUT", k.HOST, "/v1/customers/1", None),
            ],
        ),
        (
            {"host": "other.svc"},
            [
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1", "a"),
                (k.ORDERS, "GET", "other.svc", "/v1/customers/1", "b"),
                (k.ORDERS, "GET", "third.svc", "/v1/customers/1", None),
            ],
        ),
        (
            {"workloads": [k.CHECKOUT]},
            [
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1", "a"),
                (k.CHECKOUT, "GET", k.HOST, "/v1/customers/1", "b"),
                (k.PAYMENTS, "GET", k.HOST, "/v1/customers/1", None),
            ],
        ),
        (
            {"paths": ["/v1/customers/{id}/address"]},
            [
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1", "a"),
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1/address", "b"),
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1/other", None),
            ],
        ),
        (
            {"paths": ["/v1/customers/**"]},
            [
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1", "a"),  # {id} beats **
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1/address", "b"),
                (k.ORDERS, "GET", k.HOST, "/v1/customers", "b"),  # ** takes zero segments
                (k.ORDERS, "GET", k.HOST, "/v1/orders/1", None),
            ],
        ),
        (
            {"paths": ["/v1/customers/me"]},
            [
                (k.ORDERS, "GET", k.HOST, "/v1/customers/me", "b"),  # a literal beats {id}
                (k.ORDERS, "GET", k.HOST, "/v1/customers/1", "a"),
                (k.ORDERS, "GET", k.HOST, "/v1/customers/me/x", None),
            ],
        ),
    ],
)
def test_disjoint_rules_compile(other: dict[str, Any], probes: list[Probe]) -> None:
    """Rules that differ in one dimension compile, and each request reaches the one meant."""
    policy = k.compile_doc(k.policy_doc([k.rule_doc("a"), k.rule_doc("b", **other)]))
    for caller, method, host, path, expected in probes:
        assert find(policy, caller, path, method, host) == expected, (method, host, path, caller)


def test_overlap_through_a_second_issuer_is_an_error() -> None:
    doc = k.policy_doc(
        [k.rule_doc("a", issuers=["corp-idp"]), k.rule_doc("b", issuers=["corp-idp", "other"])],
        issuers=[
            k.policy_doc()["trustedIssuers"][0],
            {
                "id": "other",
                "issuer": "https://other.example.com",
                "jwks": {"file": "o.json"},
                "audiences": ["x"],
                "algorithms": ["ES256"],
            },
        ],
    )
    assert any("overlaps" in p.message for p in problems_of(doc))


def test_same_workload_with_different_issuers_is_not_an_overlap() -> None:
    second = {
        "id": "other",
        "issuer": "https://other.example.com",
        "jwks": {"file": "o.json"},
        "audiences": ["x"],
        "algorithms": ["ES256"],
    }
    doc = k.policy_doc(
        [k.rule_doc("a", issuers=["corp-idp"]), k.rule_doc("b", issuers=["other"])],
        issuers=[k.policy_doc()["trustedIssuers"][0], second],
    )
    policy = k.compile_doc(doc)
    segs = ("v1", "customers", "1")
    assert policy.find_rule(k.HOST, "GET", segs, k.ORDERS, "corp-idp").id == "a"
    assert policy.find_rule(k.HOST, "GET", segs, k.ORDERS, "other").id == "b"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("spiffe://cluster.local/ns/*/sa/orders", "spiffe://cluster.local/ns/shop/sa/*"),
        ("spiffe://cluster.local/ns/*/**", "spiffe://cluster.local/*/shop/**"),
        ("spiffe://cluster.local/ns/shop/sa/*", "spiffe://cluster.local/ns/shop/sa/*"),
    ],
)
def test_equally_specific_overlapping_patterns_are_an_error(a: str, b: str) -> None:
    """Neither pattern is more specific, so which rule applies would be luck."""
    doc = k.policy_doc([k.rule_doc("a", workloads=[a]), k.rule_doc("b", workloads=[b])])
    problem = next(p for p in problems_of(doc) if p.field == "match.workloads")
    assert "overlaps" in problem.message and "equally specific" in problem.message


@pytest.mark.parametrize(
    ("a", "b", "callers"),
    [
        (
            "spiffe://cluster.local/ns/a/sa/*",
            "spiffe://cluster.local/ns/b/sa/*",
            {
                "spiffe://cluster.local/ns/a/sa/x": "a",
                "spiffe://cluster.local/ns/b/sa/x": "b",
                "spiffe://cluster.local/ns/c/sa/x": None,
            },
        ),
        (
            "spiffe://cluster.local/ns/a/*",
            "spiffe://cluster.local/ns/*/sa/x",  # lengths differ
            {
                "spiffe://cluster.local/ns/a/q": "a",
                "spiffe://cluster.local/ns/a/sa/x": "b",
                "spiffe://cluster.local/ns/z/sa/x": "b",
                "spiffe://cluster.local/ns/z/q": None,
            },
        ),
        (
            "spiffe://cluster.local/ns/shop/sa/*",
            "spiffe://cluster.local/ns/shop/**",
            {
                k.ORDERS: "a",  # four literal segments beat three
                "spiffe://cluster.local/ns/shop/x": "b",
                "spiffe://cluster.local/ns/shop/sa/orders/extra": "b",
                "spiffe://cluster.local/ns/shop": None,  # ** is one segment or more
            },
        ),
    ],
)
def test_disjoint_or_differently_specific_patterns_compile(
    a: str, b: str, callers: dict[str, str | None]
) -> None:
    """Patterns that cannot match one caller, or are not equally specific, compile, and each
    caller reaches the rule of the most specific pattern that matches it."""
    policy = k.compile_doc(
        k.policy_doc([k.rule_doc("a", workloads=[a]), k.rule_doc("b", workloads=[b])])
    )
    for caller, expected in callers.items():
        assert find(policy, caller, "/v1/customers/1") == expected, caller


# --- which rule wins ----------------------------------------------------------------------------


def _policy_with_paths(*templates: str, workloads: tuple[str, ...] = (k.ORDERS,)) -> Policy:
    rules = [k.rule_doc(f"r{i}", paths=[t], workloads=workloads) for i, t in enumerate(templates)]
    return k.compile_doc(k.policy_doc(rules))


def test_literal_beats_param_beats_rest() -> None:
    """The most specific path template decides, whatever the rule order."""
    for order in [("/v1/customers/me", "/v1/customers/{id}", "/v1/customers/**"), None]:
        templates = order or ("/v1/customers/**", "/v1/customers/{id}", "/v1/customers/me")
        policy = _policy_with_paths(*templates)
        by_template = {r.paths[0]: r.id for r in policy.rules}
        assert find(policy, k.ORDERS, "/v1/customers/me") == by_template["/v1/customers/me"]
        assert find(policy, k.ORDERS, "/v1/customers/42") == by_template["/v1/customers/{id}"]
        assert find(policy, k.ORDERS, "/v1/customers/42/x") == by_template["/v1/customers/**"]


def test_rest_matches_zero_or_more_segments_and_param_exactly_one() -> None:
    policy = _policy_with_paths("/static/**", "/v1/{id}")
    assert find(policy, k.ORDERS, "/static") == "r0"
    assert find(policy, k.ORDERS, "/static/a/b/c") == "r0"
    assert find(policy, k.ORDERS, "/staticx") is None
    assert find(policy, k.ORDERS, "/v1/1") == "r1"
    assert find(policy, k.ORDERS, "/v1/1/2") is None
    assert find(policy, k.ORDERS, "/v1/") is None, "{id} never matches an empty segment"
    assert find(policy, k.ORDERS, "/v1") is None


def test_lookup_uses_the_normalised_path() -> None:
    policy = _policy_with_paths("/v1/customers/{id}")
    assert find(policy, k.ORDERS, "/v1/./customers//%34%32?x=1") == "r0"
    assert find(policy, k.ORDERS, "/v1/admin/../customers/7") == "r0"
    assert find(policy, k.ORDERS, "/v1/customers/42/") is None


def test_more_specific_workload_pattern_wins() -> None:
    policy = k.compile_doc(
        k.policy_doc(
            [
                k.rule_doc("broad", workloads=["spiffe://cluster.local/ns/shop/**"]),
                k.rule_doc("narrow", workloads=["spiffe://cluster.local/ns/shop/sa/*"]),
            ]
        )
    )
    assert find(policy, k.ORDERS, "/v1/customers/1") == "narrow"
    assert find(policy, "spiffe://cluster.local/ns/shop/x/y/z", "/v1/customers/1") == "broad"
    assert find(policy, "spiffe://cluster.local/ns/shop", "/v1/customers/1") is None
    assert find(policy, "spiffe://cluster.local/ns/other/sa/x", "/v1/customers/1") is None


def test_exact_workload_beats_a_pattern() -> None:
    policy = k.compile_doc(
        k.policy_doc(
            [
                k.rule_doc("pattern", workloads=["spiffe://cluster.local/ns/shop/sa/*"]),
                k.rule_doc("exact", workloads=[k.ORDERS]),
            ]
        )
    )
    assert find(policy, k.ORDERS, "/v1/customers/1") == "exact"
    assert find(policy, k.CHECKOUT, "/v1/customers/1") == "pattern"


def test_find_rule_falls_through_to_a_less_specific_path() -> None:
    """A literal leaf that has no rule for this caller does not hide the {param} rule."""
    policy = k.compile_doc(
        k.policy_doc(
            [
                k.rule_doc("me-checkout", paths=["/v1/customers/me"], workloads=[k.CHECKOUT]),
                k.rule_doc("any-orders", paths=["/v1/customers/{id}"], workloads=[k.ORDERS]),
                k.rule_doc("rest-payments", paths=["/v1/**"], workloads=[k.PAYMENTS]),
            ]
        )
    )
    assert find(policy, k.CHECKOUT, "/v1/customers/me") == "me-checkout"
    assert find(policy, k.ORDERS, "/v1/customers/me") == "any-orders"
    assert find(policy, k.PAYMENTS, "/v1/customers/me") == "rest-payments"
    assert find(policy, k.CHECKOUT, "/v1/customers/1") is None
    assert find(policy, k.PROFILE, "/v1/customers/me") is None


def test_find_rule_respects_issuer_method_and_host() -> None:
    policy = _policy_with_paths("/v1/customers/{id}")
    segs = ("v1", "customers", "1")
    assert policy.find_rule(k.HOST, "GET", segs, k.ORDERS, k.IDP_ID) is not None
    assert policy.find_rule(k.HOST, "GET", segs, k.ORDERS, "exchange") is None
    assert policy.find_rule(k.HOST, "POST", segs, k.ORDERS, k.IDP_ID) is None
    assert policy.find_rule(k.HOST, "get", segs, k.ORDERS, k.IDP_ID) is None
    assert policy.find_rule("other.svc", "GET", segs, k.ORDERS, k.IDP_ID) is None


def test_reexchange_rules_also_accept_the_exchange_as_issuer() -> None:
    policy = k.compile_doc(k.policy_doc([k.rule_doc(reexchange=True)]))
    segs = ("v1", "customers", "1")
    assert policy.find_rule(k.HOST, "GET", segs, k.ORDERS, "exchange").id == "orders-read-profile"


def test_host_is_matched_without_port_and_case_insensitively() -> None:
    policy = _policy_with_paths("/v1/customers/{id}")
    assert find(policy, k.ORDERS, "/v1/customers/1", host="PROFILE.shop.svc.cluster.local:80")
    assert find(policy, k.ORDERS, "/v1/customers/1", host="profile.shop.svc.cluster.local.")
    assert find(policy, k.ORDERS, "/v1/customers/1", host="profile.shop.svc") is None


def test_workload_pattern_semantics() -> None:
    """'*' is exactly one segment, a final '**' one or more; no prefix tricks."""

    def pattern(text: str) -> WorkloadPattern:
        return WorkloadPattern.parse(text)

    star = pattern("spiffe://cluster.local/ns/*/sa/orders")
    assert star.matches("spiffe://cluster.local/ns/shop/sa/orders")
    assert not star.matches("spiffe://cluster.local/ns/a/b/sa/orders")
    assert not star.matches("spiffe://cluster.local/ns/shop/sa/orders2")
    assert not star.matches("spiffe://cluster.local.evil/ns/shop/sa/orders")
    assert not star.matches("https://cluster.local/ns/shop/sa/orders")
    rest = pattern("spiffe://cluster.local/ns/shop/**")
    assert rest.matches("spiffe://cluster.local/ns/shop/sa/orders")
    assert rest.matches("spiffe://cluster.local/ns/shop/x")
    assert not rest.matches("spiffe://cluster.local/ns/shop")
    assert not rest.matches("spiffe://cluster.local/ns/shopping/x")
    assert rest.specificity < star.specificity


# --- scale: the lookup does not scan rules -------------------------------------------------------


def _many_rules(count: int) -> dict[str, Any]:
    rules = []
    for i in range(count):
        rules.append(
            {
                "id": f"r{i}",
                "purpose": "scale test",
                "match": {
                    "workloads": [f"spiffe://cluster.local/ns/n{i % 97}/sa/s{i}"],
                    "host": f"h{i % 100}.svc",
                    "methods": ["GET"],
                    "paths": [f"/p{i // 100}/{{id}}", f"/q{i // 100}/**"],
                    "issuers": [k.IDP_ID],
                },
                "grant": {
                    "audience": f"spiffe://cluster.local/ns/a/sa/{i}",
                    "scopes": ["s"],
                    "ttl": 30,
                },
            }
        )
    rules.append(
        {
            "id": "pattern",
            "purpose": "one pattern among many exact rules",
            "match": {
                "workloads": ["spiffe://cluster.local/ns/n1/**"],
                "host": "h1.svc",
                "methods": ["GET"],
                "paths": ["/p0/{id}"],
                "issuers": [k.IDP_ID],
            },
            "grant": {"audience": "spiffe://cluster.local/ns/a/sa/p", "scopes": ["s"], "ttl": 30},
        }
    )
    return k.policy_doc(rules)


def test_ten_thousand_rules_compile_and_lookups_walk_one_path() -> None:
    """A decision costs the same with 10 rules or 10,000: the lookup visits the same number of
    leaves and never iterates over unrelated rules. (Parsed as JSON: PyYAML's pure-Python
    parser alone needs ~20 s for this document.)"""
    small = k.compile_fast(_many_rules(10))
    big = k.compile_fast(_many_rules(10_000))
    assert len(big.rules) == 10_001

    for i in (0, 1, 4242, 9999):
        caller = f"spiffe://cluster.local/ns/n{i % 97}/sa/s{i}"
        host = f"h{i % 100}.svc"
        for path in (f"/p{i // 100}/x", f"/q{i // 100}/a/b"):
            segs = paths.normalise(path)
            assert segs is not None
            rule = big.find_rule(host, "GET", segs, caller, k.IDP_ID)
            assert rule is not None and rule.id == f"r{i}"
            leaves = list(big.table.leaves(host, "GET", segs))
            assert len(leaves) == 1
            # the exact-ID dict holds only the rules of this one (host, method, path) leaf
            assert len(leaves[0].exact) <= 1
        own = paths.normalise(f"/p{i // 100}/x")
        assert own is not None
        assert big.find_rule(host, "GET", ("p9999", "x"), caller, k.IDP_ID) is None
        stranger = f"spiffe://cluster.local/ns/zz/sa/s{i}"
        assert big.find_rule(host, "GET", own, stranger, k.IDP_ID) is None

    # one leaf per (host, method, template), whatever the total
    segs = ("p0", "x")
    small_leaves = list(small.table.leaves("h1.svc", "GET", segs))
    big_leaves = list(big.table.leaves("h1.svc", "GET", segs))
    assert len(small_leaves) == len(big_leaves) == 1
    assert len(big_leaves[0].patterns) == 1
    rule = big.find_rule("h1.svc", "GET", segs, "spiffe://cluster.local/ns/n1/sa/zzz", k.IDP_ID)
    assert rule is not None and rule.id == "pattern"
    assert (
        big.find_rule("h1.svc", "GET", segs, "spiffe://cluster.local/ns/n1/sa/s1", k.IDP_ID).id
        == "r1"
    )
    assert len(big.table.hosts) == 100


def test_fast_loader_compiles_the_same_policy() -> None:
    """The JSON shortcut used above does not change what compiles."""
    doc = _many_rules(20)
    via_yaml = compile_policy(json.dumps(doc))
    via_json = k.compile_fast(doc)
    assert via_yaml.rules == via_json.rules
    assert via_yaml.table.hosts.keys() == via_json.table.hosts.keys()
