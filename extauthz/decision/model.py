"""The compiled policy: the immutable model that ``decide`` reads.

``policy.compiler`` builds these values from a document and ``policy.table`` builds the lookup
table; nothing here parses YAML or reports problems. A ``Policy`` is never changed once built.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extauthz.decision import paths
from extauthz.decision.jose import IssuerKeys, SigningKey

__all__ = [
    "SELF_ISSUER_ID",
    "ClaimCondition",
    "TXN_TOKEN_HEADER",
    "TXN_TYP",
    "Exchange",
    "Grant",
    "JwksSource",
    "Leaf",
    "Node",
    "Policy",
    "Rule",
    "RuleTable",
    "Snapshot",
    "TrustedIssuer",
    "WorkloadPattern",
    "normal_typ",
    "normalise_host",
]

SELF_ISSUER_ID = "exchange"  # the issuer id a re-exchanged token (minted by us) matches as
TXN_TYP = "txntoken+jwt"  # the JWT typ of a transaction token, as ``normal_typ`` spells it
TXN_TOKEN_HEADER = "txn-token"  # the one header a Txn-Token travels in


@dataclass(frozen=True, slots=True)
class Exchange:
    """Who we are when we mint, and the limits on what we accept and produce."""

    issuer: str
    token_type: str  # "access_token" | "transaction_token"
    typ: str  # JWT typ of what we mint
    header: str  # where the minted token goes
    max_ttl: int
    leeway: int
    max_token_bytes: int
    strip_headers: tuple[str, ...]  # removed from the upstream request on allow
    # transaction_token mode: the trust domain every Txn-Token is valid in (its ``aud``)
    trust_domain: str | None = None

    @property
    def transaction_tokens(self) -> bool:
        """Whether this exchange mints Txn-Tokens (and inner hops may present them)."""
        return self.token_type == "transaction_token"


@dataclass(frozen=True, slots=True)
class JwksSource:
    """Where an issuer's keys come from: a file (reloaded on change) or a URL (fetched in the
    background, refreshed every ``refresh`` seconds)."""

    file: Path | None = None
    url: str | None = None
    refresh: int = 0
    timeout: int = 0

    def __str__(self) -> str:
        return str(self.file) if self.file is not None else str(self.url)


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An identity provider whose tokens may be exchanged, with its keys' source and limits."""

    id: str
    issuer: str
    jwks: JwksSource
    audiences: frozenset[str]
    algorithms: frozenset[str]
    token_types: frozenset[str]  # accepted header typ values, lower-case, no "application/"
    line: int | None = field(default=None, compare=False)
    field_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def line_of(self, fieldpath: str) -> int | None:
        """The document line of a field ("grant.ttl"), else of the entry."""
        return self.field_lines.get(fieldpath, self.line)

    @property
    def transaction_token_service(self) -> bool:
        """A Transaction Token Service: its Txn-Tokens are accepted in ``txn-token`` on inner
        hops, and nothing of it in ``authorization``."""
        return TXN_TYP in self.token_types


@dataclass(frozen=True, slots=True)
class Grant:
    """What a rule mints: one audience, the grantable scopes, a lifetime in seconds."""

    audience: str
    scopes: frozenset[str]
    ttl: int


Scalar = str | int | float | bool
# Inside ``Rule`` the name ``paths`` is its field: the module's types under other names.
_Segments = paths.Segments
_Template = paths.Template
_template_matches = paths.template_matches


def same(a: object, b: object) -> bool:
    """Equal in type and value, never coerced: ``True`` is not ``1``, ``1`` is not ``1.0``
    nor ``"1"``."""
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class ClaimCondition:
    """One ``require.claims`` entry: a claim of the subject token that must be a value
    (``equals``), one of several (``any``), a path parameter of the request (``param``), or an
    array holding a value (``contains``)."""

    claim: str
    kind: str  # "equals" | "any" | "param" | "contains"
    values: tuple[Scalar, ...] = ()
    param: str = ""

    def holds(self, claims: Mapping[str, Any], params: Mapping[str, str]) -> bool:
        """Whether the subject's ``claims`` meet this condition, for a request whose path
        parameters are ``params``. A missing claim never does."""
        if self.claim not in claims:
            return False
        value = claims[self.claim]
        if self.kind == "param":
            return self.param in params and same(value, params[self.param])
        if self.kind == "contains":
            return isinstance(value, list) and any(same(item, self.values[0]) for item in value)
        return any(same(value, wanted) for wanted in self.values)

    @property
    def text(self) -> str:
        """The condition as the policy spells it, for tools (never a subject's value)."""
        if self.kind == "param":
            return f"{self.claim} = path parameter {{{self.param}}}"
        if self.kind == "contains":
            return f"{self.claim} contains {self.values[0]!r}"
        if self.kind == "any":
            return f"{self.claim} is one of {list(self.values)!r}"
        return f"{self.claim} = {self.values[0]!r}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One exchange path: who may call what, with which subject token, to get which grant."""

    id: str
    purpose: str
    workloads: tuple[str, ...]
    host: str
    methods: frozenset[str]
    paths: tuple[str, ...]
    issuers: frozenset[str]
    require_scopes: frozenset[str]
    grant: Grant
    shadow: bool
    reexchange: bool
    # Inner hops of transaction_token mode: "replace" mints a narrower Txn-Token from the one
    # received, "pass" sends the received one on unchanged. "": the rule takes a bearer token.
    txn: str = ""
    # Conditions on the subject token's claims beyond its scopes, and the window (Unix times,
    # from inclusive, until exclusive) in which the rule matches at all.
    claims: tuple[ClaimCondition, ...] = ()
    active_from: int | None = None
    active_until: int | None = None
    # The compiled path templates, for the path parameters a claim condition names.
    templates: tuple[_Template, ...] = field(default=(), compare=False, repr=False)
    line: int | None = field(default=None, compare=False)
    # "grant.ttl" -> line, for tools that point at a field (lint, explain)
    field_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    # The policy file the rule is written in (one of several when the policy is a directory).
    file: str = field(default="", compare=False)

    def line_of(self, fieldpath: str) -> int | None:
        """The document line of a field ("grant.ttl"), else of the entry."""
        return self.field_lines.get(fieldpath, self.line)

    def located(self) -> str:
        """``file:line`` of the rule, as far as it is known."""
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}" if self.file else f"line {self.line}"

    def active_at(self, now: float) -> bool:
        """Whether ``now`` is inside the rule's window (always, without one)."""
        if self.active_from is not None and now < self.active_from:
            return False
        return self.active_until is None or now < self.active_until

    def path_params(self, segments: _Segments, shape: _Segments | None = None) -> dict[str, str]:
        """The request's path parameters, from the template of the rule the lookup matched
        (``shape``, the leaf's; the compiler refuses two templates of one shape that place a
        parameter differently), else from the first template that matches."""
        found = [t for t in self.templates if t.segments == shape]
        found = found or [t for t in self.templates if _template_matches(t, segments)]
        if not found:
            return {}
        return {name: segments[index] for name, index in found[0].params}

    def unmet_claim(
        self, claims: Mapping[str, Any], segments: _Segments, shape: _Segments | None = None
    ) -> str | None:
        """The name of the first claim condition the subject does not meet, else None."""
        params = self.path_params(segments, shape) if self.templates else {}
        for condition in self.claims:
            if not condition.holds(claims, params):
                return condition.claim
        return None


@dataclass(frozen=True, slots=True)
class WorkloadPattern:
    """``spiffe://td/ns/*/sa/x``: ``*`` is one segment, a final ``**`` one or more."""

    text: str
    parts: tuple[str, ...]  # the ID split on "/" after the scheme

    @classmethod
    def parse(cls, text: str) -> WorkloadPattern:
        """The pattern of a ``spiffe://`` selector; the compiler has checked its shape."""
        return cls(text, tuple(text[len("spiffe://") :].split("/")))

    @property
    def specificity(self) -> tuple[int, int]:
        """Literal segments first, then a fixed length beats a trailing ``**``."""
        literal = sum(1 for p in self.parts if p not in ("*", "**"))
        return (literal, 0 if self.parts[-1] == "**" else 1)

    def matches(self, spiffe_id: str) -> bool:
        """Whether ``spiffe_id`` is one of the IDs this pattern stands for."""
        if not spiffe_id.startswith("spiffe://"):
            return False
        got = spiffe_id[len("spiffe://") :].split("/")
        want = self.parts
        if want[-1] == "**":
            if len(got) < len(want):
                return False
            want, got = want[:-1], got[: len(want) - 1]
        elif len(got) != len(want):
            return False
        return all(w == "*" or w == g for w, g in zip(want, got, strict=True))


@dataclass(slots=True)
class Leaf:
    """All rules sharing one (host, method, path template): who may call with which issuer."""

    template: str
    shape: paths.Segments  # the template's segments: literals, PARAM and REST markers
    exact: dict[tuple[str, str], Rule] = field(default_factory=dict)  # (spiffe id, issuer id)
    patterns: list[tuple[WorkloadPattern, str, Rule]] = field(default_factory=list)

    def pick(self, caller: str, issuer_id: str) -> Rule | None:
        """The rule for this caller and issuer: an exact SPIFFE ID first, then the most
        specific pattern."""
        rule = self.exact.get((caller, issuer_id))
        if rule is not None:
            return rule
        for pattern, iss, candidate in self.patterns:
            if iss == issuer_id and pattern.matches(caller):
                return candidate
        return None

    def candidates(self, caller: str, issuer_id: str) -> Iterator[Rule]:
        """Every rule of this leaf for this caller and issuer, in ``pick``'s order."""
        rule = self.exact.get((caller, issuer_id))
        if rule is not None:
            yield rule
        for pattern, iss, candidate in self.patterns:
            if iss == issuer_id and pattern.matches(caller):
                yield candidate


@dataclass(slots=True)
class Node:
    """One depth of the segment trie: literal children, one ``{param}`` child, and the leaves
    of templates that end here (``leaf``) or continue with ``**`` (``rest``)."""

    literal: dict[str, Node] = field(default_factory=dict)
    param: Node | None = None
    rest: Leaf | None = None
    leaf: Leaf | None = None


@dataclass(frozen=True, slots=True)
class RuleTable:
    """host -> method -> segment trie. A lookup walks one path, so its cost depends on the
    request's depth, not on how many rules there are."""

    hosts: Mapping[str, Mapping[str, Node]]

    def leaves(self, host: str, method: str, segments: paths.Segments) -> Iterator[Leaf]:
        """Leaves that match, most specific first: at each depth a literal segment beats a
        ``{param}``, which beats a trailing ``**``."""
        root = self.hosts.get(host, {}).get(method)
        if root is None:
            return iter(())
        return _walk(root, segments, 0)


def _walk(node: Node, segments: paths.Segments, depth: int) -> Iterator[Leaf]:
    if depth == len(segments):
        if node.leaf is not None:
            yield node.leaf
        if node.rest is not None:
            yield node.rest
        return
    seg = segments[depth]
    child = node.literal.get(seg)
    if child is not None:
        yield from _walk(child, segments, depth + 1)
    if node.param is not None and seg != "":
        yield from _walk(node.param, segments, depth + 1)
    if node.rest is not None:
        yield node.rest


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled policy document: the exchange, the trusted issuers and the rule table."""

    source: str
    digest: str  # sha256 of the document text, to tell which policy a sidecar runs
    exchange: Exchange
    issuers: Mapping[str, TrustedIssuer]  # by id
    issuers_by_iss: Mapping[str, TrustedIssuer]  # by the exact "iss" string
    trust_domains: frozenset[str]
    xfcc_trusted_hops: frozenset[str]
    rules: tuple[Rule, ...]
    table: RuleTable
    shadow: bool = False  # the whole policy in shadow mode: decide and log, enforce nothing
    windows: bool = False  # whether any rule has an active window
    # The files compiled, the one with the shared sections first (just ``source`` for a file).
    files: tuple[str, ...] = ()

    def find_rule(
        self, host: str, method: str, segments: paths.Segments, caller: str, issuer_id: str
    ) -> Rule | None:
        """The one rule for this request and caller, or None (which is a deny)."""
        for leaf in self.table.leaves(host, method, segments):
            rule = leaf.pick(caller, issuer_id)
            if rule is not None:
                return rule
        return None

    def find_active(
        self,
        host: str,
        method: str,
        segments: paths.Segments,
        caller: str,
        issuer_id: str,
        now: float,
    ) -> tuple[Rule | None, Rule | None, paths.Segments]:
        """The one rule active at ``now`` for this request and caller with the shape of the
        template it matched by, or, when there is none, the rule outside its window that
        would have been it. A rule outside its window does not match: the next one in
        ``find_rule``'s order may."""
        inactive: Rule | None = None
        for leaf in self.table.leaves(host, method, segments):
            if not self.windows:
                rule = leaf.pick(caller, issuer_id)
                if rule is not None:
                    return rule, None, leaf.shape
                continue
            for candidate in leaf.candidates(caller, issuer_id):
                if candidate.active_at(now):
                    return candidate, None, leaf.shape
                inactive = inactive or candidate
        return None, inactive, ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a decision reads, swapped as one value when anything is reloaded."""

    policy: Policy
    issuer_keys: Mapping[str, IssuerKeys]  # by trusted issuer id
    signing_keys: tuple[SigningKey, ...]  # all published; the first one signs
    own_keys: IssuerKeys  # public halves of all our keys, to recognise re-exchanged tokens
    generation: int = 0  # how many snapshots the server installed before this one, plus one

    @property
    def signing_key(self) -> SigningKey:
        """The key that signs what we mint."""
        return self.signing_keys[0]


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_MAX_HOST = 253


@functools.lru_cache(maxsize=1024)
def normalise_host(host: str) -> str | None:
    """``host[:port]`` as rules name it: lower case, without the port and without one trailing
    dot; None for anything else. The port is 1 to 65535, digits only; an IPv6 literal is in
    brackets. Everything a lenient parser would fold onto another host is refused rather than
    repaired (userinfo, several colons, empty labels, whitespace), because Envoy routes by the
    raw value: a host we folded could be routed to another virtual host than the one we
    decided for. A non-ASCII host is refused too: IDNA mapping folds look-alikes (a Kelvin
    sign becomes 'k'), and rules name hosts in ASCII (A-labels)."""
    if not host or not host.isascii():
        return None
    if host.startswith("["):
        end = host.find("]")
        literal, rest = host[1:end], host[end + 1 :]
        if end < 0 or "%" in literal or not _is_ipv6(literal):
            return None
        name = f"[{literal.lower()}]"
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
        name = name.lower()
        if name.endswith("."):
            name = name[:-1]
        if len(name) > _MAX_HOST or not all(_LABEL.fullmatch(x) for x in name.split(".")):
            return None
    if rest and not _is_port(rest[1:] if rest.startswith(":") else ""):
        return None
    return name


def _is_port(text: str) -> bool:
    return text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def normal_typ(value: str) -> str:
    """A JWT ``typ`` compared as RFC 8725 says: case-insensitive, without ``application/``."""
    lowered = value.lower()
    return lowered[len("application/") :] if lowered.startswith("application/") else lowered
