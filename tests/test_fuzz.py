"""Property fuzzing (hypothesis) of every parser of outside input, and of the decision itself.

Each parser has one contract for input it does not like: a policy that does not compile is a
``PolicyError``; a token that does not parse is a ``TokenFormatError``; a JWKS that does not
load is a ``KeyLoadError``; an XFCC header that does not parse is a ``ValueError``; a path or a
SPIFFE ID that is not safe is ``None``. Anything else escaping is a bug: at request time the
edge would turn it into a deny, but at load time it bypasses the "keep the last good policy"
handling, which only catches ``ExtauthzError``.

Bounded so the whole file runs in well under a minute: 300 examples per property, no deadline.
The inputs that once escaped as other exceptions are kept as regression tests
(``test_*_former_escapes``).
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from hypothesis import HealthCheck, event, example, find, given, settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from extauthz.decision import paths
from extauthz.decision.identity import parse_spiffe_id, parse_xfcc
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
from extauthz.decision.reasons import Reason
from extauthz.errors import KeyLoadError, PolicyError
from extauthz.policy.compiler import compile_policy
from extauthz.policy.loader import assemble
from extauthz.serve.edge import check_input, check_response

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
        paths_ = [("v1", "customers", "1")]
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
    assert claims["req"]["path"] == paths.join(segments)
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
