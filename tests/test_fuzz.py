"""Property fuzzing (hypothesis) of every parser of outside input, and of the decision itself.

Each parser has one contract for input it does not like: a policy that does not compile is a
``PolicyError``; a token that does not parse is a ``TokenFormatError``; a JWKS that does not
load is a ``KeyLoadError``; an XFCC header that does not parse is a ``ValueError``; a path or a
SPIFFE ID that is not safe is ``None``. Anything else escaping is a bug: at request time the
edge would turn it into a deny, but at load time it bypasses the "keep the last good policy"
handling, which only catches ``ExtauthzError``.

Both fronts' edges are fuzzed: the gRPC edge on random CheckRequests, the HTTP edge on random
``HttpCheck``s, and the HTTP front's ``_Connection`` on bytes (pipelined checks cut anywhere,
mutated, or arbitrary): every answer must be one well-formed HTTP/1.1 response and none a 200
for a check decide() denies. The faults found there are kept as regression tests
(``test_http_front_never_decides_on_a_truncated_target``,
``test_head_readyz_answer_has_no_body``).

Bounded so the whole file runs in well under a minute: 300 examples per property (150 or 200
for the HTTP ones, which cost more), no deadline. The inputs that once escaped as other
exceptions are kept as regression tests (``test_*_former_escapes``).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import edgekit
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from hypothesis import HealthCheck, event, example, find, given, settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from extauthz.decision import paths
from extauthz.decision.identity import (
    certificate_thumbprint,
    parse_spiffe_id,
    parse_xfcc,
    xfcc_hash_thumbprint,
)
from extauthz.decision.jose import (
    SigningKey,
    TokenFormatError,
    generate_issuer_key,
    generate_signing_key,
    jwks_document,
    parse_compact,
    parse_jwks,
    verify_signature,
)
from extauthz.decision.model import (
    SELF_ISSUER_ID,
    Policy,
    Rule,
    Snapshot,
    WorkloadPattern,
    normalise_host,
)
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Deny, Reason
from extauthz.errors import KeyLoadError, PolicyError
from extauthz.policy.compiler import compile_policy
from extauthz.policy.loader import assemble
from extauthz.serve import http_edge
from extauthz.serve.decision_log import DecisionLog
from extauthz.serve.edge import check_input, check_response
from extauthz.serve.http_front import MAX_TARGET_BYTES, HttpFront, _Connection
from extauthz.serve.sidecar import Sidecar

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NOW = 1_700_000_000
EXCHANGE_ISS = "https://exchange.shop.svc"
CORP_ISS = "https://idp.example.com"
CORP_AUD = "https://shop.example.com"
PARTNER_ISS = "https://partner.example.org"
PARTNER_AUD = "https://partner.example.org/shop"
TD = "cluster.local"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
PROFILE = "spiffe://cluster.local/ns/shop/sa/profile"
PAYMENTS = "spiffe://cluster.local/ns/shop/sa/payments"
CART = "spiffe://cluster.local/ns/shop/sa/cart"
GATEWAY = "spiffe://cluster.local/ns/edge/sa/gateway"
PROFILE_HOST = "profile.shop.svc.cluster.local"
PAYMENTS_HOST = "payments.shop.svc.cluster.local"
B64URL = string.ascii_letters + string.digits + "-_"

# Protobuf strings must be valid UTF-8: no lone surrogates in anything put into a CheckRequest.
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


# --- the policy under fuzz ------------------------------------------------------------------------

POLICY_DOC: dict[str, Any] = {
    "apiVersion": "extauthz/v1",
    "kind": "ExchangePolicy",
    "exchange": {"issuer": EXCHANGE_ISS, "maxTtl": "300s", "leeway": "30s"},
    "trustedIssuers": [
        {
            "id": "corp-idp",
            "issuer": CORP_ISS,
            "jwks": {"file": "issuers/corp-idp.json"},
            "audiences": [CORP_AUD],
            "algorithms": ["ES256"],
        },
        {
            "id": "partner-idp",
            "issuer": PARTNER_ISS,
            "jwks": {"file": "issuers/partner-idp.json"},
            "audiences": [PARTNER_AUD],
            "algorithms": ["EdDSA"],
            "tokenTypes": ["JWT"],
        },
    ],
    "workloads": {"trustDomains": [TD], "xfcc": {"trustedHops": [GATEWAY]}},
    "rules": [
        {
            "id": "orders-read-profile",
            "purpose": "Orders shows the customer's profile on an order page",
            "match": {
                "workloads": [ORDERS],
                "host": PROFILE_HOST,
                "methods": ["GET"],
                "paths": ["/v1/customers/{id}"],
                "issuers": ["corp-idp"],
            },
            "require": {"scopes": ["profile.read"]},
            "grant": {"audience": PROFILE, "scopes": ["profile.read"], "ttl": "30s"},
        },
        {
            "id": "orders-update-address",
            "purpose": "Orders corrects the delivery address of an open order",
            "match": {
                "workloads": [ORDERS],
                "host": PROFILE_HOST,
                "methods": ["PUT", "PATCH"],
                "paths": ["/v1/customers/{id}/address"],
                "issuers": ["corp-idp"],
            },
            "require": {"scopes": ["profile.write"]},
            "grant": {"audience": PROFILE, "scopes": ["profile.write"], "ttl": "20s"},
        },
        {
            "id": "checkout-charge-payment",
            "purpose": "Checkout charges the customer's payment method for an order",
            "match": {
                "workloads": [CHECKOUT],
                "host": PAYMENTS_HOST,
                "methods": ["POST"],
                "paths": ["/v1/charges"],
                "issuers": ["corp-idp", "partner-idp"],
            },
            "require": {"scopes": ["payments.charge"]},
            "grant": {"audience": PAYMENTS, "scopes": ["payments.charge"], "ttl": "15s"},
        },
        {
            "id": "shop-static",
            "purpose": "Any shop workload reads static profile assets",
            "match": {
                "workloads": ["spiffe://cluster.local/ns/shop/sa/*"],
                "host": PROFILE_HOST,
                "methods": ["GET", "HEAD"],
                "paths": ["/static/**"],
                "issuers": ["corp-idp"],
            },
            "grant": {"audience": PROFILE, "scopes": ["static.read"], "ttl": "60s"},
        },
        {
            "id": "profile-onward",
            "purpose": "Profile looks up the charges of a customer on the caller's behalf",
            "match": {
                "workloads": [PROFILE],
                "host": PAYMENTS_HOST,
                "methods": ["GET"],
                "paths": ["/v1/charges/{id}"],
                "issuers": ["corp-idp"],
            },
            "require": {"scopes": ["profile.read"]},
            "grant": {"audience": PAYMENTS, "scopes": ["profile.read"], "ttl": "10s"},
            "reexchange": True,
        },
    ],
    "default": "deny",
}


@dataclass(frozen=True)
class Keys:
    corp: SigningKey
    partner: SigningKey
    signing: SigningKey
    attacker_es: SigningKey
    attacker_ed: SigningKey


KEYS = Keys(
    corp=generate_issuer_key("ES256"),
    partner=generate_issuer_key("EdDSA"),
    signing=generate_signing_key("ES256"),
    attacker_es=generate_issuer_key("ES256"),
    attacker_ed=generate_issuer_key("EdDSA"),
)
POLICY = compile_policy(yaml.safe_dump(POLICY_DOC, sort_keys=False), source="fuzz.yaml")
ISSUER_KEYS = {
    "corp-idp": parse_jwks(json.dumps(jwks_document([KEYS.corp])).encode()),
    "partner-idp": parse_jwks(json.dumps(jwks_document([KEYS.partner])).encode()),
}


def snapshot() -> Snapshot:
    """A fresh Snapshot (and so an empty subject cache) for one example."""
    return assemble(POLICY, ISSUER_KEYS, [KEYS.signing])


def _ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"jti-{next(counter)}"


# --- compile_policy -------------------------------------------------------------------------------


def _compile_or_policy_error(text: str) -> None:
    try:
        compile_policy(text, source="fuzz.yaml")
    except PolicyError as exc:
        assert exc.problems, "a PolicyError must list its problems"


@FUZZ
@given(st.text(max_size=400))
def test_compile_policy_arbitrary_text(text: str) -> None:
    """Any text at all: a Policy or a PolicyError, never another exception."""
    _compile_or_policy_error(text)


YAML_PIECES = st.sampled_from(
    [
        "apiVersion: extauthz/v1\n",
        "kind: ExchangePolicy\n",
        "exchange:\n",
        "  issuer: https://exchange.shop.svc\n",
        "trustedIssuers:\n",
        "  - id: corp\n",
        "    jwks: {url: 'https://[::1/jwks'}\n",
        "rules:\n",
        "  - ",
        "workloads: {trustDomains: [cluster.local]}\n",
        "match: ",
        "paths: ['/v1/{id}', /**]\n",
        "ttl: ",
        "maxTtl: ",
        "0x_",
        "0b_",
        "2020-13-45",
        "!!bool ",
        "!!int ",
        "!!timestamp ",
        "!!map ",
        "!!binary ",
        "!!python/object:os.system ",
        "&a ",
        "*a",
        "<<: *a\n",
        "? ",
        ": ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "'",
        '"',
        "\n",
        "  ",
        "\t",
        "#",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "30s",
        "-1",
        "1e400",
        ".nan",
        "null",
        "~",
        "yes",
        "x",
    ]
)


@FUZZ
@given(st.lists(YAML_PIECES, max_size=40).map("".join))
def test_compile_policy_yaml_like_text(text: str) -> None:
    """Text assembled from YAML syntax and policy fragments reaches deeper than random text:
    still only a Policy or a PolicyError."""
    _compile_or_policy_error(text)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)
    | st.sampled_from(
        [
            "",
            " ",
            "*",
            "**",
            "30s",
            "0s",
            "-5s",
            "3601s",
            "99999999999999999999h",
            "1.5m",
            "ES256",
            "HS256",
            "none",
            "EdDSA",
            "RS256",
            "access_token",
            "transaction_token",
            "shadow",
            "enforce",
            "allow",
            "deny",
            "exchange",
            "corp-idp",
            "cluster.local",
            "CLUSTER.local",
            GATEWAY,
            ORDERS,
            "spiffe://cluster.local/ns/*/sa/**",
            "spiffe://cluster.local/**",
            "spiffe://*/ns/shop",
            "spiffe://other/ns/x/sa/y",
            "/v1/{id}",
            "/v1/{id}/**",
            "/**/x",
            "/v1/%2f",
            "/v1/{a}{b}",
            "relative/path",
            "https://[::1",
            "https://[",
            "http://127.0.0.1:1/jwks",
            "http://evil.example/jwks",
            "https://idp.example.com",
            "https://exchange.shop.svc",
            "profile.read",
            "profile.*",
            'a"b',
            "GET",
            "get",
            "Authorization",
            "x-ok",
        ]
    )
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(SCALARS.map(str), inner, max_size=4)
    ),
    max_leaves=12,
)


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _locations(value, (*prefix, index))
    return found


def _mutate(doc: Any, data: st.DataObject) -> Any:
    location = data.draw(st.sampled_from(_locations(doc)), label="where")
    action = data.draw(st.sampled_from(["replace", "delete", "add", "duplicate"]), label="how")
    if not location:
        return data.draw(VALUES) if action == "replace" else doc
    parent = doc
    for step in location[:-1]:
        parent = parent[step]
    last = location[-1]
    if action == "replace":
        parent[last] = data.draw(VALUES, label="value")
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(SCALARS.map(str), label="key")] = data.draw(VALUES, label="value")
    elif action == "add" and isinstance(parent, list):
        parent.append(data.draw(VALUES, label="value"))
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[last]))
    return doc


def _competing_rule(rule_id: str, workload: str, path: str) -> dict[str, Any]:
    return {
        "id": rule_id,
        "purpose": "Competes with orders-read-profile for the same requests",
        "match": {
            "workloads": [workload],
            "host": PROFILE_HOST,
            "methods": ["GET"],
            "paths": [path],
            "issuers": ["corp-idp"],
        },
        "grant": {"audience": PROFILE, "scopes": ["profile.read"], "ttl": "10s"},
    }


# Rules whose templates or workloads match some of the same requests as orders-read-profile,
# each more or less specific, so that the lookup's order of precedence is what decides.
COMPETING_RULES = [
    _competing_rule("orders-customer-one", ORDERS, "/v1/customers/1"),
    _competing_rule("orders-customers-any", ORDERS, "/v1/customers/**"),
    _competing_rule("shop-section-one", "spiffe://cluster.local/ns/shop/sa/*", "/v1/{section}/1"),
    _competing_rule("cluster-customer", "spiffe://cluster.local/**", "/v1/customers/{id}"),
]


@FUZZ
@given(st.data())
def test_compile_policy_structured_documents(data: st.DataObject) -> None:
    """A valid policy, with some rules that compete for the same requests added, then 1-5
    random mutations (values replaced by any YAML value, keys deleted or added, list items
    duplicated): a Policy or a PolicyError, nothing else. When it does compile, every lookup
    finds the rule an independent reading of the rules picks."""
    doc = copy.deepcopy(POLICY_DOC)
    competing = data.draw(st.lists(st.sampled_from(COMPETING_RULES), unique_by=lambda r: r["id"]))
    doc["rules"] += copy.deepcopy(competing)
    for _ in range(data.draw(st.integers(1, 5), label="mutations")):
        doc = _mutate(doc, data)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    try:
        policy = compile_policy(text, source="fuzz.yaml")
    except PolicyError:
        return
    for host, method, segments, caller, issuer_id in _probes(policy):
        found = policy.find_rule(host, method, segments, caller, issuer_id)
        best = _oracle(policy.rules, host, method, segments, caller, issuer_id)
        where = (host, method, segments, caller, issuer_id)
        assert (found.id if found else None) in best, (where, found, best)


# An independent oracle for find_rule: which rules could match, and which of them wins, worked
# out from each rule's own definition (docs/policy.md "How a request finds its rule"), without
# the compiled table.


def _template_rank(template: str, segments: tuple[str, ...]) -> tuple[int, ...] | None:
    """How specifically ``template`` matches: per segment 2 for a literal, 1 for a {param},
    then 3 if it ends with the path or 0 for a final ``**``; None if it does not match."""
    parts = [""] if template == "/" else template[1:].split("/")
    rank: list[int] = []
    for index, part in enumerate(parts):
        if part == "**":  # zero or more remaining segments
            return (*rank, 0)
        if index >= len(segments):
            return None
        if part.startswith("{") and part.endswith("}"):
            if segments[index] == "":
                return None
            rank.append(1)
        elif part == segments[index]:
            rank.append(2)
        else:
            return None
    return (*rank, 3) if len(parts) == len(segments) else None


def _workload_rank(selector: str, caller: str) -> tuple[int, ...] | None:
    """An exact ID beats any pattern; patterns with more literal segments first, a fixed length
    before a final ``**`` (one or more segments); None if the caller is not selected."""
    if "*" not in selector:
        return (1,) if selector == caller else None
    if not caller.startswith("spiffe://"):
        return None
    want = selector.removeprefix("spiffe://").split("/")
    got = caller.removeprefix("spiffe://").split("/")
    rest = want[-1] == "**"
    if rest:
        if len(got) < len(want):
            return None
        want, got = want[:-1], got[: len(want) - 1]
    elif len(got) != len(want):
        return None
    if any(w != "*" and w != g for w, g in zip(want, got, strict=True)):
        return None
    return (0, sum(1 for w in want if w != "*"), 0 if rest else 1)


def _oracle(
    rules: tuple[Rule, ...],
    host: str,
    method: str,
    segments: tuple[str, ...],
    caller: str,
    issuer_id: str,
) -> set[str | None]:
    """The ids of the rules that should win (one, as the compiler refuses ties), or {None}."""
    ranked: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for rule in rules:
        issuers = rule.issuers | ({SELF_ISSUER_ID} if rule.reexchange else set())
        if rule.host != host or method not in rule.methods or issuer_id not in issuers:
            continue
        paths_ = [r for t in rule.paths if (r := _template_rank(t, segments)) is not None]
        workloads = [r for w in rule.workloads if (r := _workload_rank(w, caller)) is not None]
        if paths_ and workloads:
            ranked[rule.id] = (max(paths_), max(workloads))
    if not ranked:
        return {None}
    top = max(ranked.values())
    return {rule_id for rule_id, rank in ranked.items() if rank == top}


def _instances(pattern: str) -> list[str]:
    """Concrete values a path template or workload pattern stands for."""
    concrete = re.sub(r"\{[^/]*\}", "1", pattern).replace("/**", "/x/y").replace("/*", "/x")
    return [concrete, pattern.removesuffix("/**")] if pattern.endswith("/**") else [concrete]


def _probes(policy: Policy) -> Iterator[tuple[str, str, tuple[str, ...], str, str]]:
    """Lookups around every rule: its host and methods, its paths and callers made concrete
    (and the fixed ones the property started from), every issuer id."""
    issuer_ids = sorted({*policy.issuers, SELF_ISSUER_ID})
    seen: set[tuple[str, str, tuple[str, ...], str, str]] = set()
    for rule in policy.rules:
        paths_: list[tuple[str, ...]] = [("v1", "customers", "1")]
        for template in rule.paths:
            for text in _instances(template):
                segments = paths.normalise(text) if text.startswith("/") else None
                if segments is not None:
                    paths_.append(segments)
        callers = [ORDERS, *(c for w in rule.workloads for c in _instances(w))]
        for probe in itertools.product(
            [rule.host], sorted(rule.methods), paths_, callers, issuer_ids
        ):
            if probe not in seen:
                seen.add(probe)
                yield probe


BUG_POLICY_INPUTS = [
    "a: 0x_",
    "a: 0b_",
    "a: 2020-13-45",
    "a: !!bool x",
    "a: !!timestamp x",
    "a: !!int x",
    "a: !!map x",
    "!!int ",
    yaml.safe_dump(
        {
            **POLICY_DOC,
            "trustedIssuers": [
                {**POLICY_DOC["trustedIssuers"][0], "jwks": {"url": "https://[::1/jwks"}}
            ],
        }
    ),
]


@pytest.mark.parametrize("text", BUG_POLICY_INPUTS, ids=range(len(BUG_POLICY_INPUTS)))
def test_compile_policy_former_escapes(text: str) -> None:
    """Each of these must be a PolicyError (with the line), like any other bad document."""
    with pytest.raises(PolicyError):
        compile_policy(text, source="bug.yaml")


# --- SPIFFE IDs and XFCC --------------------------------------------------------------------------

SPIFFE_ALPHABET = string.ascii_letters + string.digits + "._-/:%@?#+ éА\x00"


@FUZZ
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(alphabet=SPIFFE_ALPHABET, max_size=60).map(lambda s: "spiffe://" + s),
        st.text(alphabet=SPIFFE_ALPHABET, max_size=60).map(lambda s: "SpIfFe://" + s),
        st.text(alphabet="a.", min_size=2000, max_size=2100).map(lambda s: "spiffe://td/" + s),
    )
)
@example("spiffe://cluster.local/ns/shop/sa/orders")
@example("SPIFFE://cluster.local")
def test_parse_spiffe_id(text: str) -> None:
    """Never raises; what it accepts re-serialises to the input (only the case-insensitive
    scheme is folded) and parses again to the same value; every accepted ID obeys the spec."""
    parsed = parse_spiffe_id(text)
    if parsed is None:
        return
    out = str(parsed)
    assert out == "spiffe://" + text[len("spiffe://") :]
    assert parse_spiffe_id(out) == parsed
    assert len(out.encode()) <= 2048
    assert parsed.trust_domain == parsed.trust_domain.lower()
    assert parsed.trust_domain and not any(c in parsed.trust_domain for c in "/:@%?#")
    if parsed.path:
        segments = parsed.path.split("/")[1:]
        assert all(s not in ("", ".", "..") for s in segments)
        assert all(c in string.ascii_letters + string.digits + "._-" for s in segments for c in s)


XFCC_ALPHABET = 'ByURIHashDNS=;,"\\ ' + string.ascii_lowercase + ":/."


@FUZZ
@given(
    st.one_of(
        st.text(max_size=120),
        st.text(alphabet=XFCC_ALPHABET, max_size=120),
        st.lists(
            st.tuples(
                st.sampled_from(["By", "URI", "Hash", "DNS", "Subject", "by", " uri ", ""]),
                st.one_of(
                    st.sampled_from([ORDERS, GATEWAY, "", "a,b", "a;b", "a=b"]),
                    st.text(alphabet=XFCC_ALPHABET, max_size=20),
                ),
                st.booleans(),
                st.sampled_from([";", ",", ", ", ";;", ""]),
            ),
            max_size=8,
        ).map(
            lambda items: "".join(
                f'{k}="{v.replace(chr(34), chr(92) + chr(34))}"{sep}' if quoted else f"{k}={v}{sep}"
                for k, v, quoted, sep in items
            )
        ),
    )
)
@example("x" * 20_000)
def test_parse_xfcc(value: str) -> None:
    """Only ValueError escapes; what it returns is a non-empty list of non-empty elements with
    lower-case keys, and every URI/By value came from the header."""
    try:
        elements = parse_xfcc(value)
    except ValueError:
        return
    assert elements
    for element in elements:
        assert element
        for key, values in element.items():
            assert key == key.lower() and key
            assert values and all(isinstance(v, str) for v in values)
            assert not any(c in key for c in ',;"=')


# --- JOSE -----------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _segment(raw: bytes) -> str:
    return b64url(raw)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.text(alphabet=B64URL + ".=+/ ", max_size=200),
        st.tuples(st.binary(max_size=60), st.binary(max_size=60), st.binary(max_size=60)).map(
            lambda parts: ".".join(_segment(p) for p in parts)
        ),
        st.tuples(JSON_VALUES, JSON_VALUES, st.binary(max_size=70)).map(
            lambda t: f"{b64json(t[0])}.{b64json(t[1])}.{_segment(t[2])}"
        ),
        st.lists(st.text(alphabet=B64URL, max_size=12), max_size=6).map(".".join),
    )
)
@example("a.b.c")
@example("..")
@example(b64url(b'{"a":1,"a":2}') + ".e30.AA")
@example(b64url(b'{"exp":' + b"9" * 5000 + b"}") + ".e30.AA")
@example(b64url(b"[" * 5000 + b"]" * 5000) + ".e30.AA")
@example(b64url(b"\xff\xfe") + ".e30.AA")
def test_parse_compact(token: str) -> None:
    """Only TokenFormatError escapes; what parses has object header and claims and a non-empty
    signature, and its signing input is exactly the first two segments."""
    try:
        jws = parse_compact(token)
    except TokenFormatError:
        return
    assert isinstance(jws.header, dict) and isinstance(jws.claims, dict)
    assert jws.signature
    head, body, _ = token.split(".")
    assert jws.signing_input == f"{head}.{body}".encode()


_REAL_JWKS = [dict(k.public_jwk) for k in (KEYS.corp, KEYS.partner, generate_issuer_key("RS256"))]
JWK_FIELDS = st.sampled_from(
    ["kty", "crv", "x", "y", "n", "e", "d", "kid", "alg", "use", "key_ops"]
)


@st.composite
def jwks_documents(draw: st.DrawFn) -> Any:
    keys = []
    for _ in range(draw(st.integers(0, 3))):
        jwk = dict(draw(st.sampled_from(_REAL_JWKS)))
        for _ in range(draw(st.integers(0, 3))):
            name = draw(JWK_FIELDS)
            if draw(st.booleans()) and name in jwk:
                del jwk[name]
            else:
                jwk[name] = draw(
                    JSON_VALUES
                    | st.sampled_from(["EC", "RSA", "OKP", "oct", "P-256", "P-384", "Ed448", "sig"])
                    | st.binary(max_size=40).map(b64url)
                )
        keys.append(jwk)
    doc: Any = {"keys": keys}
    if draw(st.booleans()):
        doc = draw(st.sampled_from([[doc], {"keys": {"a": 1}}, {"keys": keys, "extra": 1}, doc]))
    return doc


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300).map(lambda b: (b, None)),
        JSON_VALUES.map(lambda v: (json.dumps(v).encode(), v)),
        jwks_documents().map(lambda d: (json.dumps(d).encode(), d)),
    )
)
@example((b"x" * (256 * 1024 + 1), None))
def test_parse_jwks(case: tuple[bytes, Any]) -> None:
    """Only KeyLoadError escapes; every loaded key is usable with at least one algorithm and
    never with HMAC or none."""
    data, doc = case
    try:
        keys = parse_jwks(data)
    except KeyLoadError:
        return
    assert len(keys) >= 1
    for key in [*keys.by_kid.values(), *keys.without_kid]:
        assert key.algorithms
        assert not any(a.startswith("HS") or a.lower() == "none" for a in key.algorithms)


@pytest.mark.parametrize("alg", [["ES256"], {"alg": "ES256"}])
def test_parse_jwks_former_escapes(alg: Any) -> None:
    jwk = {**KEYS.corp.public_jwk, "alg": alg}
    with pytest.raises(KeyLoadError):
        parse_jwks(json.dumps({"keys": [jwk]}).encode())


# --- paths ----------------------------------------------------------------------------------------

PATH_PIECES = st.sampled_from(
    [
        "/",
        "//",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2e%2e",
        "%2f",
        "%2F",
        "%5c",
        "%25",
        "%00",
        "%41",
        "%7e",
        "%3A",
        "%3a",
        "%zz",
        "%",
        ";",
        "\\",
        "?",
        "#",
        "v1",
        "customers",
        "42",
        "a",
        "~",
        "é",
        "\x00",
        "\t",
        " ",
        "*",
        "{id}",
    ]
)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=100),
        st.lists(PATH_PIECES, max_size=30).map(lambda p: "/" + "".join(p)),
        st.lists(PATH_PIECES, max_size=30).map("".join),
    )
)
@example("/" + "a/" * 2100)
def test_normalise(raw: str) -> None:
    """Never raises; no output segment holds '/', ';', '\\', a control character, '%'-escaped
    unreserved characters or is '.' or '..'; normalising the joined output is the identity."""
    segments = paths.normalise(raw)
    if segments is None:
        return
    assert segments
    for index, seg in enumerate(segments):
        assert seg not in (".", "..")
        assert not any(c in seg for c in "/;\\?#")
        assert seg.isascii() and all(0x20 < ord(c) < 0x7F for c in seg)
        assert seg != "" or index == len(segments) - 1
    joined = paths.join(segments)
    assert paths.normalise(joined) == segments
    assert paths.normalise(paths.join(paths.normalise(joined) or ())) == segments


# --- decide() on random CheckRequests -------------------------------------------------------------

PRINCIPALS = st.one_of(
    st.sampled_from(
        [
            ORDERS,
            CHECKOUT,
            PROFILE,
            PAYMENTS,
            CART,
            GATEWAY,
            "SPIFFE://cluster.local/ns/shop/sa/orders",
            "spiffe://other.domain/ns/shop/sa/orders",
            "spiffe://cluster.local/ns/shop/sa/orders/",
            "spiffe://CLUSTER.local/ns/shop/sa/orders",
            "cluster.local/ns/shop/sa/orders",
            "",
        ]
    ),
    TEXT,
)
HOSTS = st.one_of(
    st.sampled_from(
        [
            PROFILE_HOST,
            PAYMENTS_HOST,
            "PROFILE.shop.svc.cluster.local",
            PROFILE_HOST + ":8080",
            PROFILE_HOST + ".",
            PAYMENTS_HOST + ":443",
            "[::1]:80",
            "evil.example",
            "",
        ]
    ),
    TEXT,
)
METHODS = st.one_of(
    st.sampled_from(["GET", "PUT", "PATCH", "POST", "HEAD", "DELETE", "get", "Get", ""]), TEXT
)
REQUEST_PATHS = st.one_of(
    st.sampled_from(
        [
            "/v1/customers/42",
            "/v1/customers/42/address",
            "/v1/charges",
            "/v1/charges/7",
            "/static/a/b.css",
            "/static",
            "/v1/customers/42?x=1",
        ]
    ),
    st.lists(
        st.sampled_from(
            [
                "v1",
                "customers",
                "42",
                "address",
                "charges",
                "7",
                "static",
                "..",
                ".",
                "",
                "%2e%2e",
                "%2f",
                ";x",
                "%00",
                "V1",
                "?q",
                "#f",
            ]
        ),
        max_size=6,
    ).map(lambda segs: "/" + "/".join(segs)),
    TEXT,
)
FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
CERTS = st.one_of(st.just(""), st.just(FAKE_PEM), TEXT)


def _overrides(base: dict[str, Any], choices: dict[str, st.SearchStrategy[Any]]) -> Any:
    """A plausible JSON object: ``base`` with some members replaced, removed or added."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = dict(base)
        for name in draw(st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=4)):
            if name in out and draw(st.integers(0, 3)) == 0:
                del out[name]
            else:
                out[name] = draw(choices[name] | JSON_VALUES)
        return out

    return build()


HEADER_VALUES = _overrides(
    {"alg": "ES256", "kid": KEYS.corp.kid, "typ": "at+jwt"},
    {
        "alg": st.sampled_from(["ES256", "EdDSA", "RS256", "HS256", "none", "NONE", "ES384", ""]),
        "kid": st.sampled_from([KEYS.corp.kid, KEYS.partner.kid, KEYS.signing.kid, "x"]),
        "typ": st.sampled_from(["at+jwt", "JWT", "txntoken+jwt", "dpop+jwt"]),
        "crit": st.just(["b64"]),
        "jku": st.just("https://attacker.example/jwks"),
        "jwk": st.just(dict(KEYS.attacker_es.public_jwk)),
    },
)
CLAIM_VALUES = _overrides(
    {
        "iss": CORP_ISS,
        "sub": "user-1",
        "aud": CORP_AUD,
        "iat": NOW,
        "exp": NOW + 600,
        "scope": "profile.read profile.write payments.charge static.read",
    },
    {
        "iss": st.sampled_from([CORP_ISS, PARTNER_ISS, EXCHANGE_ISS, CORP_ISS + "/"]),
        "sub": st.sampled_from(["user-1", ""]),
        "aud": st.sampled_from([CORP_AUD, PARTNER_AUD, PROFILE, [CORP_AUD, "x"], []]),
        "exp": st.integers(NOW - 1000, NOW + 1000),
        "nbf": st.integers(NOW - 1000, NOW + 1000),
        "iat": st.integers(NOW - 1000, NOW + 1000),
        "scope": st.sampled_from(["profile.read", "payments.charge profile.write static.read"]),
        "scp": st.lists(st.sampled_from(["profile.read", "static.read"])),
        "act": st.just({"sub": ORDERS}),
        "may_act": st.sampled_from([{"sub": ORDERS}, {"sub": CHECKOUT}]),
    },
)
ALGS = get_default_algorithms()


def _sign(key: SigningKey, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    head, body = b64json(header), b64json(claims)
    signature = ALGS[key.alg].sign(f"{head}.{body}".encode(), key.private_key)
    return f"{head}.{body}.{b64url(signature)}"


def _good_token(key: SigningKey, iss: str, aud: str) -> str:
    claims = {"iss": iss, "sub": "user-1", "aud": aud, "iat": NOW, "exp": NOW + 600}
    claims["scope"] = "profile.read profile.write payments.charge static.read"
    return _sign(key, {"alg": key.alg, "kid": key.kid}, claims)


@st.composite
def tampered_tokens(draw: st.DrawFn) -> str:
    """A validly signed token of a trusted issuer with one change, so it no longer verifies."""
    key, iss, aud = draw(
        st.sampled_from([(KEYS.corp, CORP_ISS, CORP_AUD), (KEYS.partner, PARTNER_ISS, PARTNER_AUD)])
    )
    head, body, sig = _good_token(key, iss, aud).split(".")
    which = draw(st.integers(0, 2))
    if which == 2:
        raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
        index = draw(st.integers(0, len(raw) - 1))
        raw[index] ^= draw(st.integers(1, 255))
        sig = b64url(bytes(raw))
    else:
        seg = [head, body][which]
        index = draw(st.integers(0, len(seg) - 2))  # the last character may only carry padding
        new = draw(st.sampled_from([c for c in B64URL if c != seg[index]]))
        seg = seg[:index] + new + seg[index + 1 :]
        head, body = (seg, body) if which == 0 else (head, seg)
    return f"{head}.{body}.{sig}"


UNSIGNED_TOKENS = st.one_of(
    st.text(alphabet=B64URL + ".", max_size=120),
    st.tuples(HEADER_VALUES, CLAIM_VALUES, st.binary(min_size=1, max_size=70)).map(
        lambda t: f"{b64json(t[0])}.{b64json(t[1])}.{b64url(t[2])}"
    ),
    st.tuples(
        st.sampled_from([KEYS.attacker_es, KEYS.attacker_ed]), HEADER_VALUES, CLAIM_VALUES
    ).map(lambda t: _sign(t[0], t[1], t[2])),
    tampered_tokens(),
)
AUTHORIZATION = st.one_of(
    TEXT,
    UNSIGNED_TOKENS.map(lambda t: f"Bearer {t}"),
    UNSIGNED_TOKENS.map(lambda t: f"bearer {t}"),
    st.tuples(UNSIGNED_TOKENS, UNSIGNED_TOKENS).map(lambda t: f"Bearer {t[0]},Bearer {t[1]}"),
)
XFCC = st.one_of(
    TEXT,
    PRINCIPALS.map(lambda p: f"By={GATEWAY};URI={p}"),
    PRINCIPALS.map(lambda p: f'By={GATEWAY};Hash=ab;URI="{p}"'),
)


@st.composite
def check_requests(draw: st.DrawFn, authorization: st.SearchStrategy[str]) -> Any:
    headers: dict[str, str] = {}
    if draw(st.integers(0, 7)):
        headers["authorization"] = draw(authorization)
    if draw(st.booleans()):
        headers["x-forwarded-client-cert"] = draw(XFCC)
    headers.update(draw(st.dictionaries(TEXT.map(str.lower), TEXT, max_size=3)))
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=draw(METHODS), host=draw(HOSTS), path=draw(REQUEST_PATHS), id="fuzz"
    )
    if draw(st.booleans()):
        http.headers.update(headers)
    else:  # encode_raw_headers: repeated headers arrive one by one, values as raw bytes
        for key, value in headers.items():
            for _ in range(draw(st.integers(1, 2))):
                raw = draw(st.just(value.encode()) | st.binary(max_size=40))
                http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=raw))
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                principal=draw(PRINCIPALS), certificate=draw(CERTS)
            ),
            request=attribute_context_pb2.AttributeContext.Request(http=http),
        )
    )


@FUZZ
@given(check_requests(AUTHORIZATION))
def test_random_check_requests_are_never_allowed(request: Any) -> None:
    """Random CheckRequests (any principal, host, method, path, XFCC, headers, repeated or
    undecodable headers) carrying tokens that are NOT validly signed by a trusted issuer
    (random text, unsigned, attacker-signed, tampered): decide never raises and never allows,
    and the CheckResponse is a deny."""
    inp = check_input(request)
    if isinstance(inp, Deny):  # more headers than the edge reads
        decision = Decision(inp.reason, inp.detail)
    else:
        decision = decide(inp, snapshot(), NOW, _ids())
    event(decision.reason.code)
    assert decision.reason is not Reason.ALLOWED, decision
    assert decision.token is None and decision.claims is None
    assert check_response(decision).status.code != 0


# --- decide() with validly signed tokens ----------------------------------------------------------

SCOPES = st.lists(
    st.sampled_from(["profile.read", "profile.write", "payments.charge", "static.read", "admin"]),
    unique=True,
).map(" ".join)
ISSUERS = {
    "corp-idp": (KEYS.corp, CORP_ISS, CORP_AUD),
    "partner-idp": (KEYS.partner, PARTNER_ISS, PARTNER_AUD),
}

# (principal, method, host, path, issuer id, scope): one request each rule allows, the seed
# that the strategies below perturb field by field.
ALLOWED_SEEDS = [
    (ORDERS, "GET", PROFILE_HOST, "/v1/customers/42", "corp-idp", "profile.read"),
    (ORDERS, "PATCH", PROFILE_HOST, "/v1/customers/7/address", "corp-idp", "profile.write"),
    (CHECKOUT, "POST", PAYMENTS_HOST, "/v1/charges", "corp-idp", "payments.charge"),
    (CHECKOUT, "POST", PAYMENTS_HOST, "/v1/charges", "partner-idp", "payments.charge"),
    (CART, "HEAD", PROFILE_HOST, "/static/css/site.css", "corp-idp", "static.read"),
    (PROFILE, "GET", PAYMENTS_HOST, "/v1/charges/9", "corp-idp", "profile.read"),
]


def _maybe(draw: st.DrawFn, seed: Any, other: st.SearchStrategy[Any]) -> Any:
    """The seed value three times in four, else a perturbed one."""
    return seed if draw(st.integers(0, 3)) else draw(other)


@st.composite
def valid_tokens(draw: st.DrawFn, issuer_id: str, scope: str) -> str:
    """Tokens validly signed by a trusted issuer, with random (but well-typed) claims that
    are usually good for the seed request."""
    if not draw(st.integers(0, 5)):
        issuer_id = draw(st.sampled_from(sorted(ISSUERS)))
    key, iss, aud = ISSUERS[issuer_id]
    claims: dict[str, Any] = {
        "iss": iss,
        "sub": draw(st.sampled_from(["user-1", "user-2", "svc"])),
        "aud": _maybe(
            draw, aud, st.sampled_from([[aud, "https://other.example"], "https://other.example"])
        ),
        "iat": NOW + _maybe(draw, 0, st.integers(-100, 40)),
        "exp": NOW + _maybe(draw, 600, st.integers(-40, 900)),
        "scope": _maybe(draw, scope, SCOPES),
    }
    if draw(st.booleans()):
        claims["act"] = {"sub": draw(st.sampled_from([GATEWAY, "user-agent"]))}
    if draw(st.integers(0, 3)) == 0:
        claims["may_act"] = {"sub": draw(st.sampled_from([ORDERS, CHECKOUT, PROFILE]))}
    header: dict[str, Any] = {"alg": key.alg}
    if draw(st.booleans()):
        header["kid"] = key.kid
    typ = _maybe(draw, None, st.sampled_from(["JWT", "at+jwt", "txntoken+jwt"]))
    if typ is not None:
        header["typ"] = typ
    return _sign(key, header, claims)


@st.composite
def valid_inputs(draw: st.DrawFn) -> CheckInput:
    """A request derived from one a rule allows, each field perturbed now and then, carrying a
    validly signed token."""
    principal, method, host, path, issuer_id, scope = draw(st.sampled_from(ALLOWED_SEEDS))
    headers = {"authorization": f"Bearer {draw(valid_tokens(issuer_id, scope))}"}
    principal = _maybe(
        draw,
        principal,
        st.sampled_from([ORDERS, CHECKOUT, PROFILE, CART, GATEWAY, "spiffe://other/ns/shop/sa/x"]),
    )
    if principal == GATEWAY and draw(st.booleans()):
        headers["x-forwarded-client-cert"] = draw(XFCC)
    return CheckInput(
        method=_maybe(
            draw, method, st.sampled_from(["GET", "PUT", "PATCH", "POST", "HEAD", "get"])
        ),
        host=_maybe(
            draw,
            host,
            st.sampled_from(
                [PROFILE_HOST, PAYMENTS_HOST, PROFILE_HOST.upper() + ":80", PAYMENTS_HOST + "."]
            ),
        ),
        path=_maybe(draw, path, REQUEST_PATHS),
        headers=headers,
        principal=principal,
        peer_certificate=draw(st.sampled_from(["", FAKE_PEM])),
    )


def _workload_matches(pattern: str, caller: str) -> bool:
    if "*" not in pattern:
        return pattern == caller
    return WorkloadPattern.parse(pattern).matches(caller)


def assert_allow_is_covered(inp: CheckInput, decision: Decision, now: int) -> None:
    """An allow must be backed by a rule whose match covers this very request and token, and
    what was minted must be narrower than both."""
    rule, subject, request = decision.rule, decision.subject, decision.request
    assert rule is not None and subject is not None and request is not None
    assert decision.caller is not None and decision.claims is not None and decision.token
    # host, method, path
    assert request.host == normalise_host(inp.host) == rule.host
    assert request.method == inp.method and inp.method in rule.methods
    segments = paths.normalise(inp.path)
    assert segments is not None and segments == request.segments
    assert any(paths.template_matches(paths.parse_template(p), segments) for p in rule.paths)
    # caller
    peer = parse_spiffe_id(inp.principal)
    assert peer is not None
    if str(peer) != GATEWAY:
        assert decision.caller == str(peer)
    assert any(_workload_matches(w, decision.caller) for w in rule.workloads)
    # issuer and token
    if subject.issuer_id == "exchange":
        assert rule.reexchange and decision.caller in subject.audiences
    else:
        assert subject.issuer_id in rule.issuers
        issuer = POLICY.issuers[subject.issuer_id]
        assert not issuer.audiences.isdisjoint(subject.audiences)
    assert rule.require_scopes <= subject.scopes
    assert subject.exp > now
    # what was minted
    claims = decision.claims
    assert claims["aud"] == rule.grant.audience
    minted_scopes = set(claims["scope"].split(" "))
    assert minted_scopes and minted_scopes <= (subject.scopes & rule.grant.scopes)
    assert claims["exp"] <= min(subject.exp, now + rule.grant.ttl)
    assert claims["sub"] == subject.sub and claims["act"]["sub"] == decision.caller
    assert claims["authorization_details"][0]["path"] == paths.join(segments)
    jws = parse_compact(decision.token)
    assert dict(jws.claims) == dict(claims)
    assert verify_signature(jws, KEYS.signing.public(), KEYS.signing.alg)


@FUZZ
@given(valid_inputs(), st.data())
def test_valid_tokens_are_allowed_only_where_a_rule_covers_the_request(
    inp: CheckInput, data: st.DataObject
) -> None:
    """Validly signed tokens with random claims on random (plausible) requests: every allow has
    a rule whose match covers the host, method, normalised path, caller, issuer and required
    scopes, and mints something narrower. The minted token, presented onward by a random
    caller, is only exchanged again by a `reexchange` rule for the workload it was minted for."""
    snap = snapshot()
    decision = decide(inp, snap, NOW, _ids())
    event(decision.reason.code)
    if not decision.allowed:
        assert decision.token is None and decision.claims is None
        return
    assert_allow_is_covered(inp, decision, NOW)
    assert decision.token is not None and decision.claims is not None
    onward_caller = data.draw(
        st.sampled_from([decision.claims["aud"], ORDERS, CHECKOUT, PROFILE, PAYMENTS, CART])
    )
    onward_path = data.draw(st.sampled_from(["/v1/charges/9"]) | REQUEST_PATHS)
    onward = CheckInput(
        method="GET",
        host=PAYMENTS_HOST,
        path=onward_path,
        headers={"authorization": f"Bearer {decision.token}"},
        principal=onward_caller,
    )
    again = decide(onward, snap, NOW + 1, _ids())
    event("onward " + again.reason.code)
    if again.allowed:
        assert_allow_is_covered(onward, again, NOW + 1)
        assert again.rule is not None and again.rule.reexchange
        assert again.caller == decision.claims["aud"]
    else:
        assert again.token is None and again.claims is None


def test_valid_token_strategy_reaches_allows() -> None:
    """Control: the strategy above does produce allowed requests (else it would prove nothing)."""

    def allowed(inp: CheckInput) -> bool:
        return decide(inp, snapshot(), NOW, _ids()).allowed

    found = find(valid_inputs(), allowed, settings=settings(max_examples=500, database=None))
    assert allowed(found)


# --- the HTTP edge and front ----------------------------------------------------------------------
#
# The HTTP front reads Envoy's authorization request with httptools into an ``HttpCheck``
# (``http_front._Connection``), and ``http_edge`` turns that into a CheckInput and a Decision
# into the bytes of an HTTP/1.1 answer. Whatever arrives: nothing raises, every answer is one
# well-formed HTTP/1.1 response (``edgekit.parse_response``, strict), and no answer is a 200 for
# a check that decide() denies.

ENVOY_XFCC_BY = edgekit.ENVOY_ID
XFCC_HEADER = "x-forwarded-client-cert"
REASONS = {reason.code: reason for reason in Reason}
ANY_TEXT = st.text(max_size=40)  # lone surrogates included: nothing may choke on them
HEX64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
XFCC_VALUES = st.one_of(
    PRINCIPALS,
    HEX64,
    st.sampled_from(["", "ab" * 31, "zz" * 32, "AB" * 32, FAKE_PEM, ENVOY_XFCC_BY]),
    st.just(quote(FAKE_PEM, safe="")),
    st.text(alphabet=XFCC_ALPHABET + "%", max_size=30),
)


@st.composite
def xfcc_elements(draw: st.DrawFn, uri: str | None = None) -> str:
    """XFCC shaped like what Envoy's SANITIZE_SET writes, and every way to get it wrong: keys
    missing, repeated, reordered, in another case; values quoted or not; several elements.
    With ``uri``, mostly one element whose URI values are mostly ``uri``."""
    elements = []
    for _ in range(draw(st.integers(1, 3) if uri is None else st.sampled_from([1, 1, 1, 2]))):
        keys = draw(
            st.lists(
                st.sampled_from(["By", "Hash", "URI", "Cert", "DNS", "Subject", "by", "uri"]),
                min_size=1,
                max_size=5,
            )
        )
        if uri is not None and draw(st.booleans()):
            keys = [*keys, "URI"]
        pairs = []
        for key in keys:
            if uri is not None and key.lower() == "uri" and draw(st.integers(0, 3)):
                value = uri
            else:
                value = draw(XFCC_VALUES)
            if draw(st.booleans()):
                value = '"' + value.replace('"', '\\"') + '"'
            pairs.append(f"{key}={value}")
        elements.append(draw(st.sampled_from([";", "; "])).join(pairs))
    return ",".join(elements)


HTTP_XFCC = st.one_of(
    xfcc_elements(),
    XFCC,
    ANY_TEXT,
    st.tuples(HEX64, PRINCIPALS).map(lambda t: f"By={ENVOY_XFCC_BY};Hash={t[0]};URI={t[1]}"),
)
HTTP_TARGETS = st.one_of(
    st.sampled_from(["/check", "/check/", "/checkv1/customers/42", "/readyz", "", "*", "/"]),
    ANY_TEXT,
    ANY_TEXT.map(lambda p: http_edge.PATH_PREFIX + p),
)


HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "authorization",
            "Authorization",
            "AUTHORIZATION",
            "x-forwarded-client-cert",
            "X-Forwarded-Client-Cert",
            "host",
            "Host",
            "x-request-id",
            ":authority",
            ":path",
            "content-length",
        ]
    ),
    ANY_TEXT,
)


@st.composite
def http_checks(draw: st.DrawFn) -> tuple[http_edge.HttpCheck, bool]:
    """An HttpCheck as a front could collect it (or anything else of its type), and whether it
    was a HEAD request."""
    head = draw(st.integers(0, 5)) == 0
    method = "HEAD" if head else draw(METHODS | ANY_TEXT)
    path = draw(REQUEST_PATHS)
    target = http_edge.PATH_PREFIX + (path if path.startswith("/") else "/" + path)
    check = http_edge.HttpCheck(method, _maybe(draw, target, HTTP_TARGETS))
    if draw(st.integers(0, 9)) == 0:
        check.invalid = draw(ANY_TEXT)
    # Mostly the three headers Envoy forwards, under any spelling, in any order, among others.
    names = [
        *(n for n in ("host", "authorization", XFCC_HEADER) if draw(st.integers(0, 7))),
        *draw(st.lists(HEADER_NAMES, max_size=4)),
    ]
    for index in draw(st.permutations(range(len(names)))):
        name = names[index]
        lower = name.lower()
        if lower == "authorization":
            value = draw(AUTHORIZATION | ANY_TEXT)
        elif lower == XFCC_HEADER:
            value = draw(HTTP_XFCC)
        elif lower in ("host", ":authority"):
            value = draw(HOSTS | ANY_TEXT)
        else:
            value = draw(ANY_TEXT)
        if draw(st.integers(0, 3)) == 0:
            name = name.upper()
        check.add_header(name, value)
    many = draw(st.sampled_from([0] * 18 + [201, 1000]))
    for i in range(many):
        check.add_header(f"x-h{i}", "v")
    if draw(st.integers(0, 19)) == 0:
        check.add_header("x-big", "x" * draw(st.integers(60_000, 70_000)))
    return check, head


def _answer_matches(answer: edgekit.HttpResponse, decision: Decision, head: bool) -> None:
    """The answer says what the decision says, in the edge's documented form."""
    reason = decision.reason
    assert answer.status == reason.http_status
    assert answer.header(http_edge.REASON_HEADER) == reason.code
    assert answer.header(http_edge.RULE_HEADER) == (decision.rule.id if decision.rule else None)
    if reason is Reason.ALLOWED:
        assert answer.header("content-length") == "0"
        return
    assert answer.header("content-type") == "application/json"
    assert answer.header("www-authenticate") == (reason.challenge.value or None)
    assert answer.header("authorization") is None and answer.header("txn-token") is None
    if not head:
        assert json.loads(answer.body) == {"error": reason.code}


@settings(FUZZ, max_examples=200)
@given(http_checks())
def test_random_http_checks_are_never_allowed(case: tuple[http_edge.HttpCheck, bool]) -> None:
    """Random HttpChecks (any method, target, header names and values, XFCC shapes, repeated,
    too many or too large headers, a parse failure) with tokens that are NOT validly signed:
    check_input and decide never raise and never allow, and the answer is one well-formed
    HTTP/1.1 deny that says why."""
    check, head = case
    parsed = http_edge.check_input(check)
    if isinstance(parsed, Deny):
        decision = Decision(parsed.reason, parsed.detail)
    else:
        assert parsed.path == check.target[len(http_edge.PATH_PREFIX) :]
        assert parsed.all_headers is False
        assert "x-forwarded-client-cert" not in parsed.headers
        decision = decide(parsed, snapshot(), NOW, _ids())
    event(decision.reason.code)
    assert decision.reason is not Reason.ALLOWED, decision
    assert decision.token is None and decision.claims is None
    raw = http_edge.check_response(decision, head_only=head)
    _answer_matches(edgekit.parse_one(raw, head=head), decision, head)


@settings(FUZZ, max_examples=150)
@given(
    st.one_of(
        HTTP_XFCC,
        xfcc_elements(uri=ORDERS),
        st.tuples(st.sampled_from(["", "", "", "Hash=" + "ab" * 32 + ";"]), HEX64).map(
            lambda t: f"By={ENVOY_XFCC_BY};{t[0]}Hash={t[1]};URI={ORDERS}"
        ),
    ),
    st.sampled_from(["", FAKE_PEM]),
    st.integers(0, 3).map(lambda i: i == 0),
)
@example(f"By={ENVOY_XFCC_BY};Hash={'ab' * 32};URI={ORDERS}", "", False)
def test_http_caller_is_the_one_uri_of_the_one_xfcc_element(
    xfcc: str, cert: str, twice: bool
) -> None:
    """A request a rule allows for `orders`, with a validly signed token, and any XFCC: the
    HTTP front allows it only when the header is exactly one well-formed element with exactly
    one URI, that URI is `orders`, and a `cnf` can only come from that element's certificate
    or hash."""
    token = _good_token(KEYS.corp, CORP_ISS, CORP_AUD)
    check = http_edge.HttpCheck("GET", http_edge.PATH_PREFIX + "/v1/customers/42")
    check.add_header("host", PROFILE_HOST)
    check.add_header("authorization", f"Bearer {token}")
    element = xfcc + (f';Cert="{quote(cert, safe="")}"' if cert else "")
    check.add_header(XFCC_HEADER, element)
    if twice:  # a second line, as Envoy would join it
        check.add_header(XFCC_HEADER, element)
    parsed = http_edge.check_input(check)
    assert not isinstance(parsed, Deny)
    decision = decide(parsed, snapshot(), NOW, _ids())
    event(decision.reason.code)
    if not decision.allowed:
        assert decision.token is None
        return
    joined = ",".join([element] * (2 if twice else 1))
    (only,) = parse_xfcc(joined)
    (uri,) = only["uri"]  # the scheme alone is folded: SPIFFE:// is spiffe://
    assert str(parse_spiffe_id(uri)) == ORDERS and decision.caller == ORDERS
    assert decision.claims is not None
    if "cnf" in decision.claims:
        thumbprint = decision.claims["cnf"]["x5t#S256"]
        known = {xfcc_hash_thumbprint(h) for h in only.get("hash", [])}
        known |= {certificate_thumbprint(unquote(c)) for c in only.get("cert", [])}
        assert thumbprint in known


# ... and the bytes Envoy's connection carries, through httptools.


class CapturingTransport(asyncio.Transport):
    """Test scaffolding for ``_Connection``: keeps what is written, remembers a close."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.writes_after_close = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            self.writes_after_close += 1
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def _http_front() -> HttpFront:
    """A real HttpFront around a real Sidecar deciding from the fuzz policy at NOW."""
    sidecar = Sidecar(DecisionLog(None), clock=lambda: float(NOW))
    sidecar.install(snapshot())
    return HttpFront(sidecar)


HTTP_FRONT = _http_front()


def _feed(data: bytes, cuts: list[int]) -> CapturingTransport:
    """``data`` into a fresh connection of HTTP_FRONT, in pieces cut at ``cuts``."""
    connection = _Connection(HTTP_FRONT)
    transport = CapturingTransport()
    connection.connection_made(transport)
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > start:
            connection.data_received(data[start:cut])
            start = cut
    connection.connection_lost(None)
    return transport


@dataclass(frozen=True)
class WireCheck:
    """One authorization request on the wire, as Envoy could send it."""

    method: str
    target: str
    lines: tuple[tuple[str, str], ...]  # header fields in order
    body: bytes = b""
    chunked: bool = False
    close: bool = False

    def encode(self) -> bytes:
        lines = list(self.lines)
        if self.chunked:
            lines.append(("transfer-encoding", "chunked"))
        elif self.body:
            lines.append(("content-length", str(len(self.body))))
        if self.close:
            lines.append(("connection", "close"))
        head = f"{self.method} {self.target} HTTP/1.1\r\n"
        head += "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n"
        body = self.body
        if self.chunked:
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        return head.encode("utf-8") + body

    def as_collected(self) -> http_edge.HttpCheck:
        """The HttpCheck the front should collect: every field, framing ones included, and
        a target over the front's limit flagged, wherever the pieces were cut."""
        check = http_edge.HttpCheck(self.method, self.target)
        check.target_too_long = len(self.target.encode()) > MAX_TARGET_BYTES
        for name, value in self.lines:
            check.add_header(name, value)
        if self.chunked:
            check.add_header("transfer-encoding", "chunked")
        elif self.body:
            check.add_header("content-length", str(len(self.body)))
        if self.close:
            check.add_header("connection", "close")
        return check


WIRE_METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
TARGET_ALPHABET = string.ascii_letters + string.digits + "-._~%/;=?&:@!$'()*+,"
# Field values as llhttp passes them: visible ASCII, spaces and tabs inside, UTF-8 letters.
VALUE_ALPHABET = st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\té€ж")
FIELD_VALUES = st.text(VALUE_ALPHABET, max_size=40).map(lambda v: v.strip(" \t"))
FIELD_NAMES = st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12).map(
    lambda n: "x-" + n
)
# Long targets, on both sides of http_front.MAX_TARGET_BYTES (past it, request_too_large).
LONG_PATHS = st.sampled_from([4000, 9000, 16_300, 16_400, 20_000]).map(
    lambda n: "/v1/customers/42?" + "a" * n
)


@st.composite
def wire_checks(draw: st.DrawFn, *, valid: bool) -> WireCheck:
    """A check derived from one a rule allows (with a validly signed token when ``valid``),
    each part perturbed now and then; or a health check."""
    principal, method, host, path, issuer_id, scope = draw(st.sampled_from(ALLOWED_SEEDS))
    method = _maybe(draw, method, WIRE_METHODS)
    if draw(st.integers(0, 15)) == 0:
        return WireCheck(draw(WIRE_METHODS), "/readyz", ())
    path = _maybe(
        draw,
        path,
        st.one_of(
            st.sampled_from(["/v1/customers/42", "/v1/charges", "/static/x", "/", "/v1/%2e%2e"]),
            st.text(TARGET_ALPHABET, max_size=40).map(lambda p: "/" + p),
            LONG_PATHS,
        ),
    )
    target = _maybe(
        draw,
        http_edge.PATH_PREFIX + path,
        st.sampled_from(["/check", "/checkv1", "/other" + path, "/readyz?x", "/Check" + path]),
    )
    lines: list[tuple[str, str]] = [(draw(st.sampled_from(["host", "Host"])), host)]
    if draw(st.integers(0, 7)):
        token = draw(valid_tokens(issuer_id, scope) if valid else UNSIGNED_TOKENS)
        lines.append((draw(st.sampled_from(["authorization", "Authorization"])), f"Bearer {token}"))
        if draw(st.integers(0, 9)) == 0:  # a second line: Envoy would join the two
            second = UNSIGNED_TOKENS.map(lambda t: f"Bearer {t}") | FIELD_VALUES
            lines.append(("authorization", draw(second)))
    if draw(st.integers(0, 7)):
        principal = _maybe(draw, principal, st.sampled_from([ORDERS, CHECKOUT, CART, GATEWAY]))
        digest = draw(st.just("") | HEX64)
        element = f"By={ENVOY_XFCC_BY};" + (f"Hash={digest};" if digest else "")
        element += f"URI={principal}"
        lines.append(
            (
                "x-forwarded-client-cert",
                _maybe(
                    draw,
                    element,
                    st.sampled_from(
                        [
                            f"URI={principal}",
                            f"By={GATEWAY};URI={principal},{element}",
                            element + ";URI=x",
                        ]
                    ),
                ),
            )
        )
    if draw(st.booleans()):
        lines.append(("x-request-id", draw(st.text(B64URL, max_size=20))))
    for _ in range(draw(st.integers(0, 3))):
        lines.append((draw(FIELD_NAMES), draw(FIELD_VALUES)))
    if draw(st.integers(0, 19)) == 0:
        lines += [(f"x-h{i}", "v") for i in range(201)]
    order = draw(st.permutations(range(len(lines))))
    body = draw(st.just(b"") | st.binary(max_size=20))
    return WireCheck(
        method,
        target,
        tuple(lines[i] for i in order),
        body=body,
        chunked=bool(body) and draw(st.booleans()),
    )


@st.composite
def conversations(draw: st.DrawFn, *, valid: bool) -> tuple[list[WireCheck], bytes, list[int]]:
    """Pipelined checks on one connection (the last may say ``connection: close``), their bytes
    and where to cut them into the pieces that arrive."""
    checks = draw(st.lists(wire_checks(valid=valid), min_size=1, max_size=3))
    if draw(st.integers(0, 4)) == 0:
        last = checks[-1]
        checks[-1] = WireCheck(last.method, last.target, last.lines, last.body, last.chunked, True)
    data = b"".join(c.encode() for c in checks)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=6))
    return checks, data, cuts


def _expected(check: WireCheck) -> Decision | None:
    """What the front must answer for ``check``: None for the health check, else the decision
    decide() makes for the request the front should have collected."""
    if check.target == "/readyz":
        return None
    parsed = http_edge.check_input(check.as_collected())
    if isinstance(parsed, Deny):
        return Decision(parsed.reason, parsed.detail)
    return decide(parsed, snapshot(), NOW, _ids())


@settings(FUZZ, max_examples=150)
@given(conversations(valid=True))
def test_http_front_answers_each_check_as_decide_does(
    conversation: tuple[list[WireCheck], bytes, list[int]],
) -> None:
    """Pipelined checks, some with validly signed tokens, cut into pieces anywhere, fed to a
    real ``_Connection``: one answer per check, in order, each a well-formed HTTP/1.1 response
    saying what decide() says for that check (a 200 only where decide() allows, with a token
    of our key carrying decide()'s claims), and nothing after ``connection: close``."""
    checks, data, cuts = conversation
    transport = _feed(data, cuts)
    assert transport.writes_after_close == 0
    assert len(transport.writes) == len(checks), transport.writes
    assert transport.closed is checks[-1].close
    for check, raw in zip(checks, transport.writes, strict=True):
        head = check.method == "HEAD"
        answer = edgekit.parse_one(raw, head=head)
        expected = _expected(check)
        if expected is None:
            assert (answer.status, answer.body) == (200, b"" if head else b"ready\n")
            continue
        event(expected.reason.code)
        _answer_matches(answer, expected, head)
        if expected.allowed:
            value = answer.header("authorization")
            assert value is not None and value.startswith("Bearer ")
            jws = parse_compact(value.removeprefix("Bearer "))
            assert verify_signature(jws, KEYS.signing.public(), KEYS.signing.alg)
            assert expected.claims is not None
            got, want = dict(jws.claims), dict(expected.claims)
            assert got.pop("jti") and want.pop("jti")  # the front's own fresh id
            assert got == want
            removed = answer.header(edgekit.REMOVE_HEADER)
            assert removed is not None and "authorization" not in removed.split(",")


def _mutate_bytes(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, chunk in edits:
        at = where % (len(out) + 1)
        if kind == 0:
            out[at:at] = chunk  # insert
        elif kind == 1:
            del out[at : at + len(chunk) + 1]  # delete
        else:
            out[at : at + len(chunk)] = chunk  # overwrite
    return bytes(out)


EDITS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 1 << 16),
        st.binary(min_size=1, max_size=4)
        | st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b" ", b":", b"\r\n\r\n", b"\t"]),
    ),
    min_size=1,
    max_size=4,
)
RAW_STREAMS: st.SearchStrategy[Any] = st.one_of(
    st.binary(max_size=300),
    st.tuples(conversations(valid=False), EDITS).map(
        lambda t: (_mutate_bytes(t[0][1], t[1]), t[0][2])
    ),
    st.tuples(
        WIRE_METHODS | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", max_size=8), st.binary(max_size=80)
    ).map(lambda t: (t[0].encode() + b" /check/v1/customers/42 HTTP/1.1\r\n" + t[1], [])),
)


@settings(FUZZ, max_examples=200)
@given(RAW_STREAMS, st.lists(st.integers(0, 400), max_size=5))
@example(b"GET /readyz HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", [])
@example(b"CONNECT profile.shop.svc.cluster.local:443 HTTP/1.1\r\n\r\n", [])
@example(
    b"GET /check/v1/customers/42 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", []
)
@example(b"GET /check/v1/customers/42 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", [])
@example(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", [])  # a TLS ClientHello
@example(b"HEAD /readyz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\nconnection: close\r\n\r\n", [])
def test_http_front_survives_any_bytes(stream: Any, more_cuts: list[int]) -> None:
    """Arbitrary bytes, and pipelined checks (without a validly signed token) with bytes
    inserted, deleted or overwritten anywhere, in pieces: ``_Connection`` never raises, every
    answer is one well-formed HTTP/1.1 response, nothing is written after it closed, and none
    is a 200 but the health check's."""
    data, cuts = stream if isinstance(stream, tuple) else (stream, [])
    transport = _feed(data, [*cuts, *more_cuts])
    assert transport.writes_after_close == 0
    for raw in transport.writes:
        try:
            answer = edgekit.parse_one(raw)
        except edgekit.MalformedResponse:
            answer = edgekit.parse_one(raw, head=True)  # a HEAD check's answer has no body
            if answer.header(http_edge.REASON_HEADER) is None:  # HEAD of the health check
                assert answer.status == 200 and answer.header("content-length") == "6", raw
                continue
        reason = answer.header(http_edge.REASON_HEADER)
        if reason is None:  # the health check
            assert (answer.status, answer.body) == (200, b"ready\n"), raw
            continue
        event(reason)
        assert reason != Reason.ALLOWED.code and answer.status != 200, raw
        assert answer.status == REASONS[reason].http_status
        if answer.body:
            assert json.loads(answer.body) == {"error": reason}


def _long_target_check(split_after: str) -> tuple[bytes, int]:
    token = _good_token(KEYS.corp, CORP_ISS, CORP_AUD)
    target = "/check/v1/customers/42/address?" + "a" * 17_000
    data = (
        f"GET {target} HTTP/1.1\r\nhost: {PROFILE_HOST}\r\nauthorization: Bearer {token}\r\n"
        f"x-forwarded-client-cert: By={ENVOY_XFCC_BY};URI={ORDERS}\r\n\r\n"
    ).encode()
    return data, data.index(split_after.encode()) + len(split_after)


def test_http_front_never_decides_on_a_truncated_target() -> None:
    """A 17 kB target (within Envoy's default 60 KiB) is refused whether it is read in one
    piece or cut after ``/check/v1/customers/42`` (a read boundary neither the caller nor the
    front controls): the same deny either way, never an allow of GET /v1/customers/42 for a
    request the upstream receives as /v1/customers/42/address?... (a fault found here, fixed:
    the front used to drop the pieces past the limit and decide on the first)."""
    data, cut = _long_target_check("GET /check/v1/customers/42")
    whole = edgekit.parse_one(_feed(data, []).writes[0])
    split = edgekit.parse_one(_feed(data, [cut]).writes[0])
    assert whole.status != 200
    reason = http_edge.REASON_HEADER
    assert (split.status, split.header(reason)) == (whole.status, whole.header(reason))


def test_head_readyz_answer_has_no_body() -> None:
    """A HEAD request's answer ends with its header section (RFC 9110 9.3.2); a body after it
    is read by the peer as the start of the next answer on the connection (a fault found
    here, fixed)."""
    transport = _feed(b"HEAD /readyz HTTP/1.1\r\nhost: x\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n", [])
    stream = b"".join(transport.writes)
    first, rest = edgekit.parse_response(stream, head=True)
    assert first.status == 200
    second = edgekit.parse_one(rest)
    assert (second.status, second.body) == (200, b"ready\n")
