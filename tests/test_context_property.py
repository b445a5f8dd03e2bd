"""Context conditions on rules (``require.claims`` and ``active`` windows), by property.

The headline property: adding conditions to a policy never allows more. A base policy is
generated, then the same policy with claim conditions and windows added to some of its rules;
the same request is decided with both (the same ``now``, the same deterministic id source, the
same signing key).

A window is not quite a condition: a rule outside its window does not match at all, so the
next candidate rule (less specific) may match instead, and that rule may allow what the base
policy's own rule refused. The precise statement is therefore made against a third policy, the
base with every rule that is outside its window at ``now`` taken out (moved to a host of its
own, which no request names): the conditioned policy decides like that one, except that

- where that rule's claim conditions fail (by an independent model of the conditions, the
  path parameter taken from the most specific of its templates that matches), it denies
  ``claim_mismatch``, naming the first failing claim in the decision detail;
- where every candidate rule is outside its window, it denies ``rule_inactive`` naming the
  rule the base policy found;
- an allowed token's ``exp`` is capped at the rule's ``until``; every other claim is the same.

When no rule before the allowing one is outside its window, this is the plain statement: the
base policy allows too, with the same rule.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import corekit as k
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from extauthz.decision import paths
from extauthz.decision.jose import parse_compact
from extauthz.decision.model import Policy, Snapshot
from extauthz.decision.pipeline import Decision, decide
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp
from extauthz.errors import PolicyError

SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

IDP = Idp(k.IDP_ISS)
SIGNING = k.new_signing_key()
NOW = int(k.NOW)
TD = "cluster.local"
SHOP = f"spiffe://{TD}/ns/shop/sa/"
WORKLOADS = (k.ORDERS, k.CHECKOUT, SHOP + "*", f"spiffe://{TD}/**")
CALLERS = (k.ORDERS, k.CHECKOUT, SHOP + "billing")

# Path templates, each of its parameters at the same segment index in every template that has
# it. A rule whose templates hold one parameter at different indexes meets the core's choice
# of template (see test_the_parameter_comes_from_the_matched_template below), and is left out
# of the generated policies.
TEMPLATES = (
    "/v1/tenants/{tenant}/orders/{id}",
    "/v1/tenants/{tenant}/orders/me",
    "/v1/tenants/{tenant}/**",
    "/v1/tenants/acme/orders/{id}",
    "/v1/tenants/{org}/orders/{id}",
    "/v1/tenants/{tenant}/invoices",
)
TENANT_SEGMENTS = ("acme", "globex", "1", "tenants", "%61cme")  # "%61cme" normalises to acme
ID_SEGMENTS = ("1", "42", "me")
TAILS = ("orders/{id}", "invoices", "orders", "invoices/x/y")
SCOPES = ("orders.read", "orders.write", "orders.admin")
TTLS = (5, 30, 120, 300)

# Claim values: types that compare equal across types in Python (True == 1 == 1.0) on purpose.
SCALARS: tuple[Any, ...] = (
    "acme",
    "globex",
    "ops",
    "1",
    "true",
    "user-1",
    1,
    0,
    1.0,
    2.5,
    True,
    False,
)
LISTS: tuple[list[Any], ...] = (
    ["ops"],
    ["dev", "ops"],
    [1, "ops"],
    [True],
    [1.0],
    ["acme"],
    [],
)
MISSING = object()  # the claim is not in the token
CLAIM_VALUES: tuple[Any, ...] = (*SCALARS, *LISTS, MISSING)
# Names of claims that conditions test. "sub" is always in the token ("user-1").
CLAIM_NAMES = ("azp", "acr", "tenant", "groups", "sub")
KINDS = ("equals", "any", "param", "contains")
# Window bounds, in seconds from NOW (whole seconds: see test_a_fractional_from_is_not_early).
OFFSETS = (-7200, -1, 0, 1, 30, 600)
NOW_FRACTIONS = (0.0, 0.5, 0.999)


def same(a: object, b: object) -> bool:
    """The model's equality: the same type and value."""
    return type(a) is type(b) and a == b


def rfc3339(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- an independent model of templates and conditions ---------------------------------------

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_parts(template: str) -> list[str]:
    return [""] if template == "/" else template[1:].split("/")


def params_of(template: str) -> set[str]:
    return {m.group(1) for part in template_parts(template) if (m := _PARAM.fullmatch(part))}


def match_params(template: str, segments: Sequence[str]) -> dict[str, str] | None:
    """The template's parameters for ``segments``, or None when it does not match."""
    parts = template_parts(template)
    out: dict[str, str] = {}
    for index, part in enumerate(parts):
        if part == "**":
            return out
        if index >= len(segments):
            return None
        m = _PARAM.fullmatch(part)
        if m:
            if segments[index] == "":
                return None
            out[m.group(1)] = segments[index]
        elif part != segments[index]:
            return None
    return out if len(parts) == len(segments) else None


def specificity(template: str) -> list[int]:
    """The lookup's order, smallest first: at each depth a literal beats a parameter, which
    beats ``**``; a template that ends beats one that goes on with ``**``."""
    return [2 if p == "**" else 1 if _PARAM.fullmatch(p) else 0 for p in template_parts(template)]


def matched_params(templates: Sequence[str], segments: Sequence[str]) -> dict[str, str]:
    """The parameters of the matched template: the most specific of the rule's templates that
    matches (the first listed among equals)."""
    found = [(specificity(t), i, t) for i, t in enumerate(templates)]
    for _, _, template in sorted(found):
        params = match_params(template, segments)
        if params is not None:
            return params
    return {}


@dataclass(frozen=True)
class Cond:
    claim: str
    kind: str
    value: Any  # equals/contains: a scalar; any: a list; param: the parameter's name

    def doc(self) -> Any:
        if self.kind == "param":
            return "{" + self.value + "}"
        if self.kind == "contains":
            return {"contains": self.value}
        return self.value

    def holds(self, claims: Mapping[str, Any], params: Mapping[str, str]) -> bool:
        if self.claim not in claims:
            return False
        got = claims[self.claim]
        if self.kind == "equals":
            return same(got, self.value)
        if self.kind == "any":
            return any(same(got, v) for v in self.value)
        if self.kind == "contains":
            return isinstance(got, list) and any(same(item, self.value) for item in got)
        return self.value in params and same(got, params[self.value])


def first_unmet(
    conds: Sequence[Cond], claims: Mapping[str, Any], templates: Sequence[str], segments: Any
) -> str | None:
    params = matched_params(templates, segments)
    for cond in conds:
        if not cond.holds(claims, params):
            return cond.claim
    return None


# --- generators -------------------------------------------------------------------------------


@functools.cache
def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi)


def pick(draw: st.DrawFn, seq: Sequence[Any]) -> Any:
    return seq[draw(_ints(0, len(seq) - 1))]


def some(draw: st.DrawFn, seq: Sequence[Any], lo: int, hi: int) -> list[Any]:
    n = draw(_ints(lo, min(hi, len(seq))))
    pool = list(seq)
    out = []
    for _ in range(n):
        out.append(pool.pop(draw(_ints(0, len(pool) - 1))))
    return out


def chance(draw: st.DrawFn, one_in: int) -> bool:
    return draw(_ints(0, one_in - 1)) == 0


def base_rule(draw: st.DrawFn, index: int) -> dict[str, Any]:
    return k.rule_doc(
        f"rule-{index}",
        workloads=some(draw, WORKLOADS, 1, 2),
        host=k.HOST,
        methods=["GET"],
        paths=some(draw, TEMPLATES, 1, 2),
        issuers=[k.IDP_ID],
        require=some(draw, SCOPES[:2], 0, 1) or None,
        audience=k.PROFILE,
        scopes=some(draw, SCOPES, 1, 2),
        ttl=pick(draw, TTLS),
    )


@dataclass(frozen=True)
class Added:
    conds: tuple[Cond, ...] = ()
    start: int | None = None  # Unix seconds
    until: int | None = None

    @property
    def window(self) -> bool:
        return self.start is not None or self.until is not None

    def active(self, now: float) -> bool:
        if self.start is not None and now < self.start:
            return False
        return self.until is None or now < self.until


def condition(draw: st.DrawFn, name: str, templates: Sequence[str], claims: Any) -> Cond | None:
    """One condition on ``name``; often one the subject's ``claims`` meet, so that the
    conditioned policy still allows a good share of requests."""
    # A tenant claim is mostly compared with the path's tenant.
    kind = "param" if name == "tenant" and chance(draw, 2) else pick(draw, KINDS)
    have = claims.get(name, MISSING)
    aim = chance(draw, 2)
    if kind == "param":
        common = set.intersection(*(params_of(t) for t in templates))
        if not common:
            return None
        wanted = "tenant" if "tenant" in common and not chance(draw, 4) else None
        return Cond(name, "param", wanted or pick(draw, sorted(common)))
    if kind == "contains":
        if aim and isinstance(have, list) and have:
            return Cond(name, kind, pick(draw, have))
        return Cond(name, kind, pick(draw, SCALARS))
    value = have if aim and not isinstance(have, list) and have is not MISSING else None
    if value is None:
        value = pick(draw, SCALARS)
    if kind == "equals":
        return Cond(name, kind, value)
    others = [v for v in some(draw, SCALARS, 0, 2) if not same(v, value)]
    values = [value, *others]
    # Unique by type and value (the compiler refuses a list naming a value twice).
    unique = {(type(v), v): v for v in values}
    values = list(unique.values())
    return Cond(name, "any", tuple(values[i] for i in draw(st.permutations(range(len(values))))))


def window(draw: st.DrawFn) -> tuple[int | None, int | None]:
    start = NOW + pick(draw, OFFSETS) if draw(st.booleans()) else None
    until = None
    if draw(st.booleans()) or start is None:
        # Mostly a window open now, often closing before the grant's ttl runs out.
        offsets = OFFSETS if chance(draw, 3) else (1, 30, 600)
        until = NOW + pick(draw, offsets)
    if start is not None and until is not None and until <= start:
        start, until = (until, start) if until < start else (start, start + 30)
    return start, until


@dataclass(frozen=True)
class Scenario:
    base: dict[str, Any]
    added: dict[str, Added]  # by rule id
    claims: dict[str, Any]
    path: str
    caller: str
    now: float

    def conditioned(self) -> dict[str, Any]:
        doc = {**self.base, "rules": []}
        for rule in self.base["rules"]:
            rule = {**rule}
            add = self.added.get(rule["id"], Added())
            if add.conds:
                require = dict(rule.get("require", {}))
                require["claims"] = {c.claim: c.doc() for c in add.conds}
                rule["require"] = require
            if add.window:
                rule["active"] = {
                    key: rfc3339(value)
                    for key, value in (("from", add.start), ("until", add.until))
                    if value is not None
                }
            doc["rules"].append(rule)
        return doc

    def inactive(self) -> set[str]:
        return {ident for ident, add in self.added.items() if not add.active(self.now)}

    def without_inactive(self) -> dict[str, Any]:
        """The base policy with every rule outside its window at ``now`` moved to a host of
        its own, where no request finds it."""
        gone = self.inactive()
        rules = [
            {**r, "match": {**r["match"], "host": f"gone-{i}.invalid"}} if r["id"] in gone else r
            for i, r in enumerate(self.base["rules"])
        ]
        return {**self.base, "rules": rules}


def request_path(draw: st.DrawFn) -> str:
    tail = pick(draw, TAILS).replace("{id}", pick(draw, ID_SEGMENTS))
    return f"/v1/tenants/{pick(draw, TENANT_SEGMENTS)}/{tail}"


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    base = k.policy_doc([base_rule(draw, i) for i in range(draw(_ints(1, 4)))], max_ttl=300)
    k.compile_lenient(base)  # drops the overlapping rules from ``base``
    rules = base["rules"]

    # The request: mostly aimed at a rule, with the scopes it asks for.
    target = pick(draw, rules)
    caller = pick(draw, CALLERS)
    if not chance(draw, 4):
        workload = pick(draw, target["match"]["workloads"])
        if "*" not in workload:
            caller = workload
    path = request_path(draw)
    if not chance(draw, 4):
        template = pick(draw, target["match"]["paths"])
        path = template.replace("{tenant}", pick(draw, TENANT_SEGMENTS))
        path = path.replace("{org}", pick(draw, TENANT_SEGMENTS))
        path = path.replace("{id}", pick(draw, ID_SEGMENTS))
        path = path.replace("**", pick(draw, ("orders", "x/y", "invoices")))
    wanted = set(target.get("require", {}).get("scopes", [])) | set(target["grant"]["scopes"])
    scopes = set(wanted) if not chance(draw, 5) else set(some(draw, SCOPES, 0, 2))
    claims: dict[str, Any] = {}
    for name in CLAIM_NAMES:
        if name == "sub":
            continue
        value = pick(draw, CLAIM_VALUES)
        if name == "tenant" and chance(draw, 2):
            value = pick(draw, ("acme", "globex", "1"))
        if value is not MISSING:
            claims[name] = value
    subject = k.subject_claims(NOW, scope=" ".join(sorted(scopes)) or None, **claims)

    # What is added: conditions and windows on some rules.
    added: dict[str, Added] = {}
    for rule in rules:
        if draw(_ints(0, 3)) == 3:  # (hypothesis draws 0 more often than 1/n: tuned by hand)
            continue
        conds: list[Cond] = []
        for name in some(draw, CLAIM_NAMES, 0, 3):
            cond = condition(draw, name, rule["match"]["paths"], subject)
            if cond is not None:
                conds.append(cond)
        start, until = window(draw) if draw(_ints(0, 2)) != 0 else (None, None)
        if conds or start is not None or until is not None:
            added[rule["id"]] = Added(tuple(conds), start, until)
    now = NOW + pick(draw, NOW_FRACTIONS)
    return Scenario(base, added, subject, path, caller, now)


# --- deciding ---------------------------------------------------------------------------------


def snapshot(policy: Policy) -> Snapshot:
    return k.snapshot_in_memory(policy, {k.IDP_ID: IDP}, [SIGNING])


def decide_with(doc: dict[str, Any], token: str, scenario: Scenario) -> Decision:
    inp = k.request(token, path=scenario.path, principal=scenario.caller)
    return decide(inp, snapshot(k.compile_fast(doc)), scenario.now, k.Ids(), None)


def rule_id(decision: Decision) -> str | None:
    return decision.rule.id if decision.rule is not None else None


# Reasons only decided after the claim conditions were checked (so a failing condition turns
# them into claim_mismatch); insufficient_scope is one of them only when it is about the
# grantable scopes (the required ones are checked first).
AFTER_CLAIMS = {Reason.ALLOWED, Reason.TOKEN_EXPIRED}


@SETTINGS
@given(scenarios())
@example(  # the plainest fallback: the specific rule's window is over, the general one allows
    Scenario(
        base=k.policy_doc(
            [
                k.rule_doc(
                    "specific",
                    paths=["/v1/tenants/acme/orders/{id}"],
                    require=["orders.admin"],
                    scopes=["orders.read"],
                ),
                k.rule_doc(
                    "general",
                    paths=["/v1/tenants/{tenant}/orders/{id}"],
                    require=["orders.read"],
                    scopes=["orders.read"],
                ),
            ]
        ),
        added={"specific": Added(until=NOW - 1)},
        claims=k.subject_claims(NOW, scope="orders.read"),
        path="/v1/tenants/acme/orders/1",
        caller=k.ORDERS,
        now=NOW + 0.5,
    )
)
def test_adding_conditions_never_allows_more(scenario: Scenario) -> None:
    """The base, the base without its rules outside their windows ("pruned"), and the base
    with conditions and windows added ("conditioned"), deciding one request (module
    docstring)."""
    token = IDP.key.sign(scenario.claims, "at+jwt")
    base = decide_with(scenario.base, token, scenario)
    pruned = decide_with(scenario.without_inactive(), token, scenario)
    conditioned_doc = scenario.conditioned()
    conditioned = decide_with(conditioned_doc, token, scenario)
    inactive = scenario.inactive()
    event(f"base: {base.reason.code}")
    event(f"conditioned: {conditioned.reason.code}")

    # The pruned base decides like the base wherever the base's rule is inside its window.
    if rule_id(base) not in inactive:
        assert (pruned.reason, rule_id(pruned)) == (base.reason, rule_id(base))
        assert pruned.claims == base.claims

    if conditioned.allowed:
        assert conditioned.rule is not None
        assert pruned.allowed, (pruned.reason, pruned.detail)
        assert rule_id(pruned) == conditioned.rule.id
        until = scenario.added.get(conditioned.rule.id, Added()).until
        if rule_id(base) == conditioned.rule.id:
            event("conditioned allows: base allows with the same rule")
            assert base.allowed, (base.reason, base.detail)
            assert base.claims is not None and conditioned.claims is not None
            capped = min(base.claims["exp"], until) if until is not None else base.claims["exp"]
            assert dict(conditioned.claims) == {**base.claims, "exp": capped}
        else:
            # A rule outside its window made a less specific one match: what the base
            # policy's own rule decided does not bind it.
            event(f"conditioned allows by a fallback rule (base: {base.reason.code})")
            assert rule_id(base) in inactive
        assert pruned.claims is not None and conditioned.claims is not None
        expected = dict(pruned.claims)
        if until is not None:
            expected["exp"] = min(expected["exp"], until)
            if until < pruned.claims["exp"]:
                event("exp capped at until")
        assert dict(conditioned.claims) == expected
        assert conditioned.token is not None
        claims_in_token = parse_compact(conditioned.token).claims
        assert dict(claims_in_token) == expected
        return

    assert conditioned.token is None and conditioned.claims is None
    # In short: a deny the base does not give is a failed condition or a window, or comes
    # from a less specific rule that matched because the base's rule is outside its window.
    if conditioned.reason not in (base.reason, Reason.CLAIM_MISMATCH, Reason.RULE_INACTIVE):
        assert rule_id(base) in inactive and rule_id(conditioned) == rule_id(pruned)
        event(f"conditioned denies {conditioned.reason.code} by a fallback rule")
    if base.rule is None:
        # Denied before any rule was found (or none names the request): conditions on rules
        # change nothing.
        assert (conditioned.reason, conditioned.rule) == (base.reason, None)
        return
    if pruned.rule is None:
        # Every candidate is outside its window: the deny names the rule the base found.
        assert pruned.reason is Reason.NO_RULE
        assert conditioned.reason is Reason.RULE_INACTIVE, conditioned.reason
        assert rule_id(conditioned) == base.rule.id
        assert base.rule.id in inactive
        return

    found = pruned.rule
    assert rule_id(conditioned) == found.id
    add = scenario.added.get(found.id, Added())
    assert add.active(scenario.now)
    rule = next(r for r in scenario.base["rules"] if r["id"] == found.id)
    scopes = set(str(scenario.claims.get("scope", "")).split())
    reached = pruned.reason in AFTER_CLAIMS or (
        pruned.reason is Reason.INSUFFICIENT_SCOPE
        and set(rule.get("require", {}).get("scopes", [])) <= scopes
    )
    segments = paths.normalise(scenario.path)
    assert segments is not None
    unmet = first_unmet(add.conds, scenario.claims, rule["match"]["paths"], segments)
    if reached and unmet is not None:
        assert conditioned.reason is Reason.CLAIM_MISMATCH, (conditioned.reason, unmet)
        assert unmet in conditioned.detail
        assert conditioned.detail == f"claim {unmet} does not meet the rule"
        event(f"claim_mismatch on a {next(c.kind for c in add.conds if c.claim == unmet)}")
    else:
        assert conditioned.reason is pruned.reason, (conditioned.reason, pruned.reason, unmet)
        assert conditioned.detail == pruned.detail


def claims_rule(claims: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """``corekit.rule_doc`` (rule ``orders-read-profile``) with ``require.claims``."""
    rule = k.rule_doc(**kwargs)
    rule["require"]["claims"] = dict(claims)
    return rule


# --- type strictness --------------------------------------------------------------------------

STRICT_VALUES: tuple[Any, ...] = (True, False, 1, 0, 1.0, 0.0, 2.5, "1", "0", "true", "1.0")


@functools.cache
def strict_snapshot(kind: str, type_name: str, text: str, value: Any) -> Snapshot:
    """One rule with one condition on claim ``c``, compiled from YAML (which types ``1.0``,
    ``true`` and ``'1'`` itself). Cached by type and text: ``True``, ``1`` and ``1.0`` are one
    key of a dict."""
    spec: Any = {"equals": value, "any": [value, "never"], "contains": {"contains": value}}[kind]
    return snapshot(k.compile_doc(k.policy_doc([claims_rule({"c": spec})])))


@settings(SETTINGS, max_examples=150)
@given(st.sampled_from(STRICT_VALUES), st.sampled_from((*STRICT_VALUES, MISSING)))
@example(True, 1)
@example(1, True)
@example(1, 1.0)
@example(1.0, 1)
@example("1", 1)
@example(1, "1")
@example(0, False)
@example(0.0, 0)
@example(1, 1)
def test_equality_is_strict_in_type_and_value(wanted: Any, claim: Any) -> None:
    """``equals``, ``any`` and ``contains`` hold iff the claim has the condition value's type
    and value: ``True`` is not ``1``, ``1`` is not ``1.0`` nor ``"1"``."""
    holds = claim is not MISSING and type(wanted) is type(claim) and wanted == claim
    event("holds" if holds else "differs in type" if wanted == claim else "differs")
    for kind in ("equals", "any", "contains"):
        snap = strict_snapshot(kind, type(wanted).__name__, repr(wanted), wanted)
        value = [claim] if kind == "contains" else claim
        claims = k.subject_claims(scope="profile.read", c=None if claim is MISSING else value)
        decision = decide(k.request(IDP.key.sign(claims, "at+jwt")), snap, k.NOW, k.Ids())
        if holds:
            k.allowed(decision, "orders-read-profile")
        else:
            k.denied(decision, Reason.CLAIM_MISMATCH)
            assert decision.detail == "claim c does not meet the rule"


@settings(SETTINGS, max_examples=60)
@given(st.sampled_from((*STRICT_VALUES, "42", 42, 42.0, MISSING)))
def test_a_path_parameter_is_a_string(claim: Any) -> None:
    """``"{id}"`` compares the claim with the path segment, a string: 42 is not "42"."""
    snap = param_snapshot()
    claims = k.subject_claims(scope="profile.read", c=None if claim is MISSING else claim)
    decision = decide(k.request(IDP.key.sign(claims, "at+jwt")), snap, k.NOW, k.Ids())
    if same(claim, "42"):
        k.allowed(decision, "orders-read-profile")
    else:
        k.denied(decision, Reason.CLAIM_MISMATCH)


@functools.cache
def param_snapshot() -> Snapshot:
    return snapshot(k.compile_doc(k.policy_doc([claims_rule({"c": "{id}"})])))


# --- faults found while writing these, fixed ------------------------------------------------


def test_the_parameter_comes_from_the_matched_template() -> None:
    """``/v1/tenants/acme/orders/1`` matches both templates: read from the less specific
    ``/v1/{tenant}/**`` the tenant is ``tenants``. (A fault found here: it was, and a user of
    tenant "tenants" got every tenant's orders.) A bound parameter must now sit at one
    segment of every template, and the lookup's own template is the one read."""
    rule = claims_rule(
        {"tenant": "{tenant}"}, paths=["/v1/{tenant}/**", "/v1/tenants/{tenant}/orders/{id}"]
    )
    with pytest.raises(PolicyError, match="ambiguous"):
        k.compile_fast(k.policy_doc([rule]))
    same = claims_rule(
        {"tenant": "{tenant}"}, paths=["/v1/{tenant}/**", "/v1/{tenant}/orders/{id}"]
    )
    snap = snapshot(k.compile_fast(k.policy_doc([same])))
    outcomes = {}
    for tenant in ("acme", "orders"):
        token = IDP.key.sign(k.subject_claims(tenant=tenant), "at+jwt")
        inp = k.request(token, path="/v1/acme/orders/1")
        outcomes[tenant] = decide(inp, snap, k.NOW, k.Ids()).reason
    assert outcomes == {"acme": Reason.ALLOWED, "orders": Reason.CLAIM_MISMATCH}


def test_a_fractional_from_is_not_early() -> None:
    """A bound with a fraction of a second is rounded inwards (a fault found here: ``from``
    was rounded down, so the rule matched before its window opened)."""
    rule = k.rule_doc(active={"from": rfc3339(NOW).replace("Z", ".5Z")})
    snap = snapshot(k.compile_fast(k.policy_doc([rule])))
    token = IDP.key.sign(k.subject_claims(), "at+jwt")
    decision = decide(k.request(token), snap, NOW + 0.2, k.Ids())
    assert decision.reason is Reason.RULE_INACTIVE


def test_one_parameter_in_two_places_of_one_shape_does_not_compile() -> None:
    rule = claims_rule({"tenant": "{tenant}"}, paths=["/t/{tenant}/{id}", "/t/{id}/{tenant}"])
    with pytest.raises(PolicyError) as caught:
        k.compile_fast(k.policy_doc([rule]))
    (problem,) = caught.value.problems
    assert "is ambiguous" in problem.message
