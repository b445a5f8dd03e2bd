"""The policy document: load it, check every field, compile it into a lookup table.

``compile_policy(text, source)`` is pure (text in, ``Policy`` out) and reports every problem at
once in one ``PolicyError``. ``load_policy(path)`` adds the file read. ``parse_document`` and
``compile_document`` are the two halves of ``compile_policy``, for tools that read the document
themselves too (lint). A ``Policy`` is immutable; replacing one is the caller's business (and
only with one that compiled).

Each section of the document has its own small parser, handed a ``_Scope``: the entry being
checked and its YAML mapping. A problem is reported where it is found, with the lint check id
that says what it means (``invalid-policy`` unless it is one of the risks lint names).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extauthz.decision import paths
from extauthz.decision.identity import parse_spiffe_id
from extauthz.decision.jose import SUPPORTED_ALGORITHMS
from extauthz.decision.model import (
    SELF_ISSUER_ID,
    TXN_TYP,
    ClaimCondition,
    Exchange,
    Grant,
    JwksSource,
    Policy,
    Rule,
    TrustedIssuer,
    normal_typ,
)
from extauthz.errors import PolicyError, Problem
from extauthz.policy import yamlsrc
from extauthz.policy.table import build_table

__all__ = [
    "API_VERSION",
    "DEFAULT_JWKS_REFRESH",
    "DEFAULT_JWKS_TIMEOUT",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_TOKEN_BYTES",
    "DEFAULT_MAX_TTL",
    "DEFAULT_STRIP_HEADERS",
    "HARD_MAX_TTL",
    "KIND",
    "MAX_POLICY_BYTES",
    "METHODS",
    "TOKEN_TYPES",
    "canonical_spiffe",
    "compile_document",
    "compile_policy",
    "load_policy",
    "parse_document",
    "parse_duration",
    "parse_instant",
    "read_policy_text",
]

# What a document must declare itself as, and the largest one read.
API_VERSION = "extauthz/v1"
KIND = "ExchangePolicy"
MAX_POLICY_BYTES = 4 * 1024 * 1024
# Defaults of the optional exchange and JWKS fields, in seconds (bytes for the token size).
DEFAULT_MAX_TTL = 300
DEFAULT_LEEWAY = 30
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_JWKS_REFRESH = 300
DEFAULT_JWKS_TIMEOUT = 5
HARD_MAX_TTL = 3600  # a minted token never lives longer than this, whatever a policy says
# The methods a rule may name, and each token type's JWT typ and the header it goes in.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
TOKEN_TYPES = {
    "access_token": ("at+jwt", "authorization"),
    "transaction_token": ("txntoken+jwt", "txn-token"),
}
# Headers that carry an inbound credential the upstream must not see after an exchange.
DEFAULT_STRIP_HEADERS = (
    "authorization",
    "proxy-authorization",
    "txn-token",
    "x-forwarded-access-token",
    "x-auth-request-access-token",
    "x-id-token",
)
_ID = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 scope-token
_HEADER = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_DURATION = re.compile(r"(-?)(\d+)(s|m|h)")
_UNIT = {"s": 1, "m": 60, "h": 3600}

# The lint check ids a compile problem can carry (``tools.lint`` has a hint for each). A
# problem takes a risk's id only when it is that risk; wrong types, malformed values, unknown
# names and duplicates are invalid-policy. (An absent value takes the risk's id where being
# absent is that risk: no purpose, no issuer audiences, no grant audience or ttl.)
_INVALID = "invalid-policy"
_AUDIENCE = "audience-not-single-system"
_TTL = "ttl-not-capped"
_SCOPES = "scope-not-deterministic"
_WEAK_ALGORITHM = "issuer-algorithm-weak"
_ISSUER_BROAD = "issuer-broad"
_NOT_HTTPS = "issuer-not-https"
_AUDIENCES_MISSING = "issuer-audiences-missing"
_PURPOSE = "purpose-missing"
_WORKLOAD = "workload-invalid"
_AMBIGUOUS = "rules-ambiguous"


# --- reading the document ----------------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    """Read and compile a policy file. Relative JWKS paths resolve against its directory."""
    return compile_policy(read_policy_text(path), source=str(path), base_dir=path.parent)


def read_policy_text(path: Path) -> str:
    """The text of a policy file, as ``serve`` and ``policy lint`` both read it: at most
    ``MAX_POLICY_BYTES``, UTF-8. Raises ``PolicyError`` naming what is wrong."""
    source = str(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError([Problem(source, "", "", f"cannot read: {exc.strerror or exc}")]) from exc
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError([Problem(source, "", "", f"larger than {MAX_POLICY_BYTES} bytes")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(source, "", "", "not UTF-8")]) from exc


def compile_policy(text: str, *, source: str = "<policy>", base_dir: Path | None = None) -> Policy:
    """Parse and compile a policy document; every problem found is in the one ``PolicyError``."""
    doc = parse_document(text, source=source)
    return compile_document(doc, text, source=source, base_dir=base_dir)


def parse_document(text: str, *, source: str = "<policy>") -> Any:
    """The YAML document of ``text``: mappings are ``yamlsrc.Located`` (they know their lines).
    Raises ``PolicyError`` for text that is not YAML, or has a key twice."""
    try:
        return yamlsrc.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        # PyYAML marks an error at the end of the text on the line after the last one.
        last = text.count("\n") + (0 if text.endswith("\n") else 1)
        line = min(mark.line + 1, max(last, 1)) if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([Problem(source, "", "", f"not valid YAML: {problem}", line)]) from exc
    except RecursionError as exc:
        raise PolicyError([Problem(source, "", "", "YAML nested too deep")]) from exc
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # PyYAML's constructors raise these on values like "0x_", "2020-13-45" or "!!bool x".
        raise PolicyError([Problem(source, "", "", f"not valid YAML: {exc}")]) from exc


def compile_document(
    doc: Any, text: str, *, source: str = "<policy>", base_dir: Path | None = None
) -> Policy:
    """Compile a document ``parse_document`` returned for ``text`` (the text gives the digest)."""
    report = _Report(source)
    policy = _document(_Scope.top(report, doc), text, base_dir or Path("."))
    if report.problems or policy is None:
        raise PolicyError(report.problems or [Problem(source, "", "", "empty policy")])
    return policy


# --- the reporter --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Report:
    """Every problem found so far, in the order found: nothing stops at the first."""

    source: str
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Scope:
    """One mapping being checked: the entry it belongs to (``where``, "rules[2] (orders-read)"),
    its dotted path inside that entry (``prefix``, "grant."), and the YAML node itself, whose
    key lines locate each problem. The getters report a bad value and return None (or the
    default) so the caller carries on and finds the next problem too."""

    report: _Report
    where: str
    prefix: str
    node: Any  # the raw YAML value: a mapping when the document is well formed
    line: int | None  # of the mapping, or of the key that holds this entry when it is not one

    @classmethod
    def top(cls, report: _Report, doc: Any) -> _Scope:
        """The document itself."""
        return cls(report, "", "", doc, _node_line(doc, None))

    def entry(self, where: str, node: Any, key: str) -> _Scope:
        """A new entry (a list item under ``key``, or a section), with paths starting afresh."""
        return _Scope(self.report, where, "", node, _node_line(node, self.line_of(key)))

    def child(self, key: str, node: Any) -> _Scope:
        """The mapping under ``key`` (as ``mapping`` returned it: None when absent or bad)."""
        return _Scope(self.report, self.where, f"{self.prefix}{key}.", node, _node_line(node, None))

    def section(self, where: str, prefix: str = "") -> _Scope:
        """This mapping as an entry of its own: its problems are reported under ``where``, its
        fields under ``prefix``."""
        return _Scope(self.report, where, prefix, self.node, self.line)

    def line_of(self, key: str) -> int | None:
        """The line of ``key`` in this mapping, else of the mapping."""
        if key and isinstance(self.node, yamlsrc.Located):
            return self.node.line_of(key)
        return self.line

    def fail(self, key: str, message: str, *, code: str = _INVALID) -> None:
        """Report a problem with the field ``key`` ("" for the mapping as a whole)."""
        fieldpath = self.prefix + key if key else self.prefix.removesuffix(".")
        self.report.problems.append(
            Problem(self.report.source, self.where, fieldpath, message, self.line_of(key), code)
        )

    def count(self) -> int:
        """How many problems the whole document has so far (to tell if an entry added any)."""
        return len(self.report.problems)

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of ``key``, if this is a mapping."""
        return self.node.get(key, default) if isinstance(self.node, dict) else default

    def has(self, key: str) -> bool:
        """Whether this is a mapping with ``key``."""
        return isinstance(self.node, dict) and key in self.node

    # -- typed getters --

    def fields(self, allowed: Collection[str]) -> None:
        """Every key of this mapping must be one of ``allowed``: a misspelt restriction must not
        be silently ignored."""
        if not isinstance(self.node, dict):
            return
        hint = ", ".join(sorted(allowed))
        for key in self.node:
            if key not in allowed:
                self.fail(key, f"unknown field (expected one of: {hint})")

    def mapping(self, key: str, *, required: bool) -> _Scope:
        """The child scope of the mapping under ``key`` (its node None when absent or bad)."""
        value = self.get(key)
        if value is None:
            if required:
                self.fail(key, "is required")
            return self.child(key, None)
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping")
            return self.child(key, None)
        return self.child(key, value)

    def string(
        self, key: str, *, required: bool = True, missing: str = _INVALID, invalid: str = _INVALID
    ) -> str | None:
        """A non-empty string. ``missing`` is the check id when it is absent or blank,
        ``invalid`` when it is not a string."""
        value = self.get(key)
        if value is None:
            if required:
                self.fail(key, "is required", code=missing)
            return None
        if not isinstance(value, str) or not value.strip():
            code = missing if isinstance(value, str) else invalid
            self.fail(key, "must be a non-empty string", code=code)
            return None
        return value

    def strings(
        self, key: str, *, required: bool = True, missing: str = _INVALID
    ) -> list[str] | None:
        """A non-empty list of distinct non-empty strings. ``missing`` is the check id when it is
        absent or empty."""
        value = self.get(key)
        if value is None:
            if required:
                self.fail(key, "is required", code=missing)
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            code = missing if value == [] else _INVALID
            self.fail(key, "must be a non-empty list of strings", code=code)
            return None
        if len(set(value)) != len(value):
            self.fail(key, "lists a value twice")
        return list(value)

    def duration(self, key: str, default: int | None, *, missing: str = _INVALID) -> int | None:
        """A positive duration in seconds; ``default`` when absent (None: it is required, and
        ``missing`` is the check id then)."""
        value = self.get(key)
        if value is None:
            if default is None:
                self.fail(key, "is required", code=missing)
            return default
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            self.fail(key, "must be a positive duration like 30s, 5m or 1h")
            return None
        return seconds


def _node_line(node: Any, fallback: int | None) -> int | None:
    return node.line if isinstance(node, yamlsrc.Located) else fallback


# --- the sections ------------------------------------------------------------------------------


def _document(top: _Scope, text: str, base_dir: Path) -> Policy | None:
    if not isinstance(top.node, dict):
        top.fail("", "the document must be a mapping")
        return None
    top.fields(
        (
            "apiVersion",
            "kind",
            "mode",
            "exchange",
            "trustedIssuers",
            "workloads",
            "rules",
            "default",
        )
    )
    if top.get("apiVersion") != API_VERSION:
        top.fail("apiVersion", f"must be {API_VERSION!r}")
    if top.get("kind") != KIND:
        top.fail("kind", f"must be {KIND!r}")
    mode = top.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        top.fail("mode", "must be enforce or shadow")
    if top.get("default", "deny") != "deny":
        top.fail("default", "must be 'deny' (there is no default allow)")
    exchange = _exchange(top.mapping("exchange", required=True))
    issuers = _issuers(top, base_dir, exchange)
    trust_domains, hops = _workloads(top.mapping("workloads", required=True))
    rules = _rules(top, issuers, trust_domains, exchange)
    # The table is built even when other problems were found, from the rules that are valid
    # on their own, so overlaps are reported together with everything else.
    table, overlaps = build_table(rules)
    for overlap in overlaps:
        top.report.problems.append(
            Problem(
                top.report.source,
                f"rules ({overlap.rule.id})",
                overlap.field,
                overlap.message,
                overlap.rule.line_of(overlap.field),
                _AMBIGUOUS,
            )
        )
    if exchange is None or top.report.problems:
        return None
    return Policy(
        source=top.report.source,
        digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        exchange=exchange,
        issuers={i.id: i for i in issuers},
        issuers_by_iss={i.issuer: i for i in issuers},
        trust_domains=frozenset(trust_domains),
        xfcc_trusted_hops=frozenset(hops),
        rules=tuple(rules),
        table=table,
        shadow=mode == "shadow",
        windows=any(r.active_from is not None or r.active_until is not None for r in rules),
    )


def _exchange(found: _Scope) -> Exchange | None:
    if found.node is None:
        return None
    # Unknown keys of this section are reported by their bare name, the others as "exchange.x".
    found.section("exchange").fields(
        ("issuer", "tokenType", "trustDomain", "maxTtl", "leeway", "maxTokenBytes", "stripHeaders")
    )
    scope = found.section("exchange", "exchange.")
    issuer = scope.string("issuer")
    if issuer is not None and not issuer.startswith("https://"):
        scope.fail("issuer", "must be an https:// URL", code=_NOT_HTTPS)
    token_type = scope.get("tokenType", "access_token")
    if not isinstance(token_type, str) or token_type not in TOKEN_TYPES:
        scope.fail("tokenType", "must be access_token or transaction_token")
        token_type = "access_token"
    trust_domain = _trust_domain(scope, token_type)
    max_ttl = scope.duration("maxTtl", DEFAULT_MAX_TTL)
    if max_ttl is not None and max_ttl > HARD_MAX_TTL:
        scope.fail("maxTtl", f"must be at most {HARD_MAX_TTL}s", code=_TTL)
    leeway = scope.duration("leeway", DEFAULT_LEEWAY)
    if leeway is not None and leeway > 300:
        scope.fail("leeway", "must be at most 300s")
    max_bytes = scope.get("maxTokenBytes", DEFAULT_MAX_TOKEN_BYTES)
    if (
        not isinstance(max_bytes, int)
        or isinstance(max_bytes, bool)
        or not 256 <= max_bytes <= 65536
    ):
        scope.fail("maxTokenBytes", "must be an integer from 256 to 65536")
    extra = scope.get("stripHeaders", [])
    if not isinstance(extra, list) or not all(
        isinstance(h, str) and _HEADER.fullmatch(h) for h in extra
    ):
        scope.fail("stripHeaders", "must be a list of lower-case header names")
        extra = []
    typ, header = TOKEN_TYPES[token_type]
    strip = tuple(dict.fromkeys([*DEFAULT_STRIP_HEADERS, *extra]))
    if issuer is None or max_ttl is None or leeway is None or not isinstance(max_bytes, int):
        return None
    if token_type == "transaction_token" and trust_domain is None:
        return None
    return Exchange(
        issuer=issuer,
        token_type=token_type,
        typ=typ,
        header=header,
        max_ttl=max_ttl,
        leeway=leeway,
        max_token_bytes=max_bytes,
        strip_headers=tuple(h for h in strip if h != header),
        trust_domain=trust_domain,
    )


def _trust_domain(scope: _Scope, token_type: str) -> str | None:
    """``trustDomain``: the ``aud`` of every Txn-Token, required in transaction_token mode and
    meaningless in the other. Spelt as a SPIFFE trust domain (``prod.example.com``)."""
    if token_type != "transaction_token":
        if scope.has("trustDomain"):
            scope.fail("trustDomain", "goes with tokenType transaction_token only")
        return None
    domain = scope.string("trustDomain")
    if domain is not None and ("/" in domain or parse_spiffe_id(f"spiffe://{domain}/x") is None):
        scope.fail("trustDomain", f"{domain!r} is not a trust domain name like prod.example.com")
        return None
    return domain


def _entry_name(section: str, index: int, node: Any) -> str:
    """``rules[2] (orders-read)``: the position, and the id when there is one to show."""
    ident = node.get("id") if isinstance(node, dict) else None
    return f"{section}[{index}]" + (f" ({ident})" if isinstance(ident, str) else "")


@dataclass(slots=True)
class _Seen:
    """What earlier entries of a list already claimed."""

    ids: set[str] = field(default_factory=set)
    issuers: set[str] = field(default_factory=set)


def _issuers(top: _Scope, base_dir: Path, exchange: Exchange | None) -> list[TrustedIssuer]:
    nodes = top.get("trustedIssuers")
    if not isinstance(nodes, list) or not nodes:
        top.fail("trustedIssuers", "must be a non-empty list")
        return []
    out: list[TrustedIssuer] = []
    seen = _Seen()
    for index, node in enumerate(nodes):
        scope = top.entry(_entry_name("trustedIssuers", index, node), node, "trustedIssuers")
        if not isinstance(node, dict):
            scope.fail("", "must be a mapping")
            continue
        issuer = _issuer(scope, base_dir, exchange, seen)
        if issuer is not None:
            out.append(issuer)
    return out


def _issuer(
    scope: _Scope, base_dir: Path, exchange: Exchange | None, seen: _Seen
) -> TrustedIssuer | None:
    scope.fields(("id", "issuer", "jwks", "audiences", "algorithms", "tokenTypes"))
    before = scope.count()
    ident = scope.string("id")
    if ident is not None:
        if not _ID.fullmatch(ident):
            scope.fail("id", "must be lower-case letters, digits, '.', '_' or '-'")
        elif ident == SELF_ISSUER_ID:
            scope.fail("id", f"{SELF_ISSUER_ID!r} is reserved for the exchange itself")
        elif ident in seen.ids:
            scope.fail("id", "is used by another trusted issuer")
        seen.ids.add(ident)
    iss = scope.string("issuer")
    if iss is not None:
        if "*" in iss:
            scope.fail("issuer", "must be one exact issuer, no wildcards", code=_ISSUER_BROAD)
        if iss in seen.issuers:
            scope.fail("issuer", "is listed twice")
        if exchange is not None and iss == exchange.issuer:
            scope.fail("issuer", "is the exchange's own issuer")
        seen.issuers.add(iss)
    jwks = _jwks(scope.mapping("jwks", required=True), base_dir)
    raw_types = scope.get("tokenTypes")
    service = isinstance(raw_types, list) and any(
        isinstance(t, str) and normal_typ(t) == TXN_TYP for t in raw_types
    )
    if service:
        audiences = _service_audiences(scope, exchange)
    else:
        audiences = scope.strings("audiences", missing=_AUDIENCES_MISSING)
    algorithms = scope.strings("algorithms")
    for alg in algorithms or []:
        if alg not in SUPPORTED_ALGORITHMS:
            hint = ", ".join(sorted(SUPPORTED_ALGORITHMS))
            code = _WEAK_ALGORITHM if _is_weak_algorithm(alg) else _INVALID
            scope.fail("algorithms", f"{alg!r} is not accepted (use: {hint})", code=code)
    types = scope.strings("tokenTypes", required=False) or ["JWT", "at+jwt"]
    if service and any(normal_typ(t) != TXN_TYP for t in types):
        scope.fail("tokenTypes", f"a transaction token service's tokenTypes is [{TXN_TYP}] only")
    if scope.count() != before or not (ident and iss and jwks and audiences and algorithms):
        return None
    return TrustedIssuer(
        id=ident,
        issuer=iss,
        jwks=jwks,
        audiences=frozenset(audiences),
        algorithms=frozenset(algorithms),
        token_types=frozenset(normal_typ(t) for t in types),
        line=scope.line,
        field_lines=_lines(scope, ("issuer", "jwks", "audiences", "algorithms", "tokenTypes")),
    )


def _service_audiences(scope: _Scope, exchange: Exchange | None) -> list[str] | None:
    """A Transaction Token Service's tokens are valid in the trust domain and nowhere else:
    ``audiences`` is that domain, so it may be left out."""
    if exchange is None:
        return None
    if not exchange.transaction_tokens or exchange.trust_domain is None:
        scope.fail("tokenTypes", f"{TXN_TYP} goes with exchange.tokenType transaction_token")
        return None
    audiences = scope.strings("audiences", required=False, missing=_AUDIENCES_MISSING)
    if audiences is not None and audiences != [exchange.trust_domain]:
        scope.fail("audiences", f"must be [{exchange.trust_domain}], the exchange's trustDomain")
        return None
    return [exchange.trust_domain]


def _is_weak_algorithm(name: str) -> bool:
    """HMAC turns the issuer's public key into a shared secret and ``none`` is no signature:
    that is the weak-algorithm risk, however it is spelt. Any other unknown name is a typo."""
    return name.upper().startswith("HS") or name.lower() == "none"


def _jwks(scope: _Scope, base_dir: Path) -> JwksSource | None:
    if scope.node is None:
        return None
    scope.fields(("file", "url", "refresh", "timeout"))
    if scope.has("file") == scope.has("url"):
        scope.fail("", "give exactly one of file or url")
        return None
    if scope.has("file"):
        if scope.has("refresh") or scope.has("timeout"):
            scope.fail("", "refresh and timeout go with url (files reload on change)")
        name = scope.string("file")
        return JwksSource(file=base_dir / name) if name is not None else None
    url = scope.string("url")
    refresh = scope.duration("refresh", DEFAULT_JWKS_REFRESH)
    timeout = scope.duration("timeout", DEFAULT_JWKS_TIMEOUT)
    if url is None or refresh is None or timeout is None:
        return None
    try:
        parsed = urlsplit(url)
        loopback = parsed.hostname in ("127.0.0.1", "::1", "localhost")
    except ValueError:
        scope.fail("url", "is not a valid URL")
        return None
    if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
        scope.fail("url", "must be https:// (http only on loopback)")
    if refresh < 10 or timeout > 30:
        scope.fail("", "refresh must be at least 10s and timeout at most 30s")
    return JwksSource(url=url, refresh=refresh, timeout=timeout)


def _workloads(found: _Scope) -> tuple[list[str], list[str]]:
    if found.node is None:
        return [], []
    scope = found.section("workloads")
    scope.fields(("trustDomains", "xfcc"))
    domains = scope.strings("trustDomains") or []
    for domain in domains:
        if parse_spiffe_id(f"spiffe://{domain}") is None:
            scope.fail("trustDomains", f"{domain!r} is not a SPIFFE trust domain")
    hops: list[str] = []
    xfcc = scope.mapping("xfcc", required=False)
    if xfcc.node is not None:
        xfcc.fields(("trustedHops",))
        raw = xfcc.get("trustedHops", [])
        if not isinstance(raw, list) or not all(isinstance(h, str) for h in raw):
            xfcc.fail("trustedHops", "must be a list of SPIFFE IDs")
        else:
            for hop in raw:
                if parse_spiffe_id(hop) is None:
                    xfcc.fail("trustedHops", f"{hop!r} is not a SPIFFE ID")
            hops = [canonical_spiffe(h) for h in raw]
    return domains, hops


@dataclass(frozen=True, slots=True)
class _Known:
    """What a rule may refer to, from the sections before the rules."""

    issuer_ids: set[str]
    trust_domains: list[str]
    exchange: Exchange | None
    txn_sources: set[str]  # where an inner hop's Txn-Token may come from: us, or a TTS


def _rules(
    top: _Scope,
    issuers: list[TrustedIssuer],
    trust_domains: list[str],
    exchange: Exchange | None,
) -> list[Rule]:
    nodes = top.get("rules")
    if not isinstance(nodes, list):
        top.fail("rules", "must be a list")
        return []
    services = {i.id for i in issuers if i.transaction_token_service}
    known = _Known({i.id for i in issuers}, trust_domains, exchange, {SELF_ISSUER_ID, *services})
    out: list[Rule] = []
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        scope = top.entry(_entry_name("rules", index, node), node, "rules")
        if not isinstance(node, dict):
            scope.fail("", "must be a mapping")
            continue
        before = scope.count()
        rule = _rule(scope, known)
        if rule is None:
            continue
        if rule.id in seen:
            scope.fail("id", "is used by another rule")
        seen.add(rule.id)
        if scope.count() == before:
            out.append(rule)
    return out


@dataclass(frozen=True, slots=True)
class _Match:
    workloads: list[str]
    host: str | None
    methods: list[str]
    paths: list[str]
    issuers: list[str]


def _rule(scope: _Scope, known: _Known) -> Rule | None:
    scope.fields(
        ("id", "purpose", "match", "require", "grant", "mode", "reexchange", "txnToken", "active")
    )
    ident = scope.string("id")
    if ident is not None and not _ID.fullmatch(ident):
        scope.fail("id", "must be lower-case letters, digits, '.', '_' or '-'")
    purpose = scope.string("purpose", missing=_PURPOSE)
    mode = scope.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        scope.fail("mode", "must be enforce or shadow")
    reexchange = scope.get("reexchange", False)
    if not isinstance(reexchange, bool):
        scope.fail("reexchange", "must be true or false")
    txn = _txn_mode(scope, known, reexchange is True)
    match_scope = scope.mapping("match", required=True)
    match = _match(match_scope, known, txn)
    require_scope = scope.mapping("require", required=False)
    required, conditions = _require(require_scope, match.paths)
    window_scope = scope.mapping("active", required=False)
    window = _window(window_scope)
    if txn == "pass" and window_scope.node is not None:
        scope.fail("active", "a passed Txn-Token keeps its own exp: use txnToken: replace")
    grant_scope = scope.mapping("grant", required=True)
    grant = _grant(grant_scope, known)
    if ident is None or purpose is None or match.host is None or grant is None:
        return None
    if not (match.workloads and match.methods and match.paths and match.issuers):
        return None
    return Rule(
        id=ident,
        purpose=purpose,
        workloads=tuple(match.workloads),
        host=match.host,
        methods=frozenset(match.methods),
        paths=tuple(match.paths),
        issuers=frozenset(match.issuers),
        require_scopes=frozenset(required),
        grant=grant,
        shadow=mode == "shadow",
        reexchange=reexchange is True,
        txn=txn,
        claims=tuple(conditions),
        active_from=window[0],
        active_until=window[1],
        templates=_templates(match.paths) if any(c.kind == "param" for c in conditions) else (),
        line=scope.line,
        field_lines={
            **_lines(scope, ("id", "purpose", "match", "mode", "reexchange", "txnToken")),
            **_lines(match_scope, ("workloads", "host", "methods", "paths", "issuers")),
            **_lines(require_scope, ("scopes", "claims")),
            **_lines(window_scope, ("from", "until")),
            **_lines(grant_scope, ("audience", "scopes", "ttl")),
        },
    )


def _txn_mode(scope: _Scope, known: _Known, reexchange: bool) -> str:
    """``txnToken``: how an inner hop treats the Txn-Token it receives ("" for a rule that
    takes a bearer token: the first hop)."""
    # With a broken exchange section the mode is unknown: the rule is checked as written.
    txn_mode = known.exchange is None or known.exchange.transaction_tokens
    # A rule found wrong here is not built; what is returned only keeps the checks of its
    # other fields from repeating the same mistake.
    value = scope.get("txnToken")
    if txn_mode and reexchange:
        scope.fail("reexchange", "is for access tokens; an inner hop's rule says txnToken")
        return "replace"
    if value is None:
        return ""
    if not txn_mode:
        scope.fail("txnToken", "goes with exchange.tokenType transaction_token only")
        return ""
    if value not in ("replace", "pass"):
        scope.fail("txnToken", "must be replace or pass")
        return "replace"
    return str(value)


def _match(scope: _Scope, known: _Known, txn: str = "") -> _Match:
    scope.fields(("workloads", "host", "methods", "paths", "issuers"))
    workloads = [canonical_spiffe(t) for t in scope.strings("workloads") or []]
    for text in workloads:
        reason = _workload_problem(text, known.trust_domains)
        if reason:
            scope.fail("workloads", f"{text!r}: {reason}", code=_WORKLOAD)
    host = scope.string("host")
    if host is not None and (host != host.lower() or not _HOST.fullmatch(host) or ".." in host):
        scope.fail("host", "must be a lower-case host name without port or wildcard")
    methods = scope.strings("methods") or []
    for method in methods:
        if method not in METHODS:
            scope.fail("methods", f"{method!r} is not an upper-case HTTP method")
    path_texts = scope.strings("paths") or []
    for text in path_texts:
        try:
            paths.parse_template(text)
        except ValueError as exc:
            scope.fail("paths", f"{text!r}: {exc}")
    issuers = scope.strings("issuers") or []
    for iss in issuers:
        if txn:
            if iss not in known.txn_sources:
                hint = ", ".join(sorted(known.txn_sources))
                scope.fail("issuers", f"{iss!r}: a txnToken rule takes Txn-Tokens of: {hint}")
        elif iss in known.txn_sources - {SELF_ISSUER_ID}:
            scope.fail("issuers", f"{iss!r} issues Txn-Tokens: only a txnToken rule takes them")
        elif iss not in known.issuer_ids:
            scope.fail("issuers", f"{iss!r} is not a trusted issuer id")
    return _Match(workloads, host, methods, path_texts, issuers)


def _require(scope: _Scope, templates: list[str]) -> tuple[list[str], list[ClaimCondition]]:
    scope.fields(("scopes", "claims"))
    required = scope.strings("scopes", required=False) or []
    _check_scopes(scope, "scopes", required)
    return required, _claim_conditions(scope, templates)


_PARAM_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _claim_conditions(scope: _Scope, templates: list[str]) -> list[ClaimCondition]:
    """``require.claims``: claim name -> a value, a list of values (any of), ``"{param}"``
    (the request's path parameter), or ``{contains: value}`` (an array claim holds it)."""
    node = scope.get("claims")
    if node is None:
        return []
    if not isinstance(node, dict) or not node:
        scope.fail("claims", "must be a mapping of claim names to values")
        return []
    out: list[ClaimCondition] = []
    for name, value in node.items():
        where = f"claims.{name}"
        if not isinstance(name, str) or not name.strip():
            scope.fail("claims", "claim names are non-empty strings")
            continue
        if isinstance(value, str) and _PARAM_REF.fullmatch(value):
            param = value[1:-1]
            missing = [t for t in templates if not _template_has(t, param)]
            if missing:
                scope.fail(
                    "claims",
                    f"{where}: {value} is not a parameter of every path template "
                    f"(not of {', '.join(missing)})",
                )
                continue
            clash = _param_clash(templates, param)
            if clash:
                scope.fail("claims", f"{where}: {value} is ambiguous: {clash}")
                continue
            out.append(ClaimCondition(name, "param", param=param))
        elif isinstance(value, dict):
            if set(value) != {"contains"} or not _scalar(value["contains"]):
                scope.fail("claims", f"{where}: a mapping is {{contains: <value>}}")
                continue
            out.append(ClaimCondition(name, "contains", (value["contains"],)))
        elif isinstance(value, list):
            if not value or not all(_scalar(v) for v in value):
                scope.fail("claims", f"{where}: a list holds strings, numbers or booleans")
                continue
            if len({(type(v), v) for v in value}) != len(value):
                scope.fail("claims", f"{where}: lists a value twice")
                continue
            out.append(ClaimCondition(name, "any", tuple(value)))
        elif _scalar(value):
            out.append(ClaimCondition(name, "equals", (value,)))
        else:
            scope.fail("claims", f"{where}: must be a string, number, boolean, list or contains")
    return out


def _scalar(value: object) -> bool:
    """A claim value a condition may name: a string, a number or a boolean (no dates, nulls)."""
    return isinstance(value, str | int | float | bool) and value == value  # not NaN


def _templates(texts: list[str]) -> tuple[paths.Template, ...]:
    """The templates that parse (the others are reported where the paths are checked)."""
    out = []
    for text in texts:
        try:
            out.append(paths.parse_template(text))
        except ValueError:
            continue
    return tuple(out)


def _param_clash(templates: list[str], param: str) -> str:
    """Templates that put ``param`` at different segments: a request two of them match
    (``/v1/{tenant}/admin`` and ``/v1/x/{tenant}`` both match ``/v1/x/admin``) would not say
    which segment it is. A bound parameter sits at one index in every template."""
    first: tuple[str, int] | None = None
    for template in _templates(templates):
        index = dict(template.params).get(param, -1)
        first = first or (template.text, index)
        if index != first[1]:
            return f"it is segment {first[1] + 1} of {first[0]} but not of {template.text}"
    return ""


def _template_has(text: str, param: str) -> bool:
    try:
        return any(name == param for name, _ in paths.parse_template(text).params)
    except ValueError:
        return True  # reported with the path itself


def _window(scope: _Scope) -> tuple[int | None, int | None]:
    """``active: {from, until}``: RFC 3339 times with a zone; either bound may be left out."""
    if scope.node is None:
        return None, None
    scope.fields(("from", "until"))
    if not scope.has("from") and not scope.has("until"):
        scope.fail("", "give from, until or both")
    for key in ("from", "until"):
        if scope.has(key) and scope.get(key) is None:
            scope.fail(key, "is empty: give a time, or leave the key out")
    bounds = [_instant(scope, key) for key in ("from", "until")]
    start, end = bounds
    if start is not None and end is not None and end <= start:
        scope.fail("until", "must be after from")
    return start, end


def _instant(scope: _Scope, key: str) -> int | None:
    value = scope.get(key)
    if value is None:
        return None
    seconds = parse_instant(value)
    if seconds is None:
        scope.fail(key, "must be an RFC 3339 time with a zone, like 2026-12-04T18:00:00Z")
        return None
    # Whole seconds, each bound rounded inwards: a window never opens early or closes late.
    return math.ceil(seconds) if key == "from" else math.floor(seconds)


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})")


def parse_instant(value: Any) -> float | None:
    """Unix seconds of an RFC 3339 time with a zone (``2026-12-04T18:00:00Z``, or the
    datetime YAML reads it as), else None: a time without a zone means different instants on
    different machines. Years 1 to 9999 in UTC only, so every tool can print it."""
    if isinstance(value, str):
        if not _RFC3339.fullmatch(value):
            return None
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        return None
    try:
        value.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        return None
    return value.timestamp()


def _grant(scope: _Scope, known: _Known) -> Grant | None:
    exchange = known.exchange
    scope.fields(("audience", "scopes", "ttl"))
    # No audience is a token every system accepts, and a list is several systems.
    several = isinstance(scope.get("audience"), list)
    audience = scope.string(
        "audience", missing=_AUDIENCE, invalid=_AUDIENCE if several else _INVALID
    )
    if audience is not None and ("*" in audience or " " in audience):
        scope.fail("audience", "must be exactly one audience, no wildcards", code=_AUDIENCE)
    elif audience is not None and exchange is not None and exchange.transaction_tokens:
        # A Txn-Token's aud is the trust domain; the rule's audience is the one workload the
        # token is minted for, and only that workload may present it at the next hop.
        problem = _workload_problem(canonical_spiffe(audience), known.trust_domains)
        if problem:
            scope.fail("audience", f"names the workload the Txn-Token is for: {problem}")
        audience = canonical_spiffe(audience)
    granted = scope.strings("scopes") or []
    _check_scopes(scope, "scopes", granted)
    # A grant without a ttl has no lifetime of its own to cap.
    ttl = scope.duration("ttl", None, missing=_TTL)
    if ttl is not None and exchange is not None and ttl > exchange.max_ttl:
        scope.fail("ttl", f"{ttl}s exceeds exchange.maxTtl ({exchange.max_ttl}s)", code=_TTL)
    if audience is None or ttl is None or not granted:
        return None
    return Grant(audience, frozenset(granted), ttl)


def _check_scopes(scope: _Scope, key: str, values: list[str]) -> None:
    for value in values:
        if not _SCOPE.fullmatch(value):
            scope.fail(key, f"{value!r} is not a valid scope token")
        elif value == "*" or value.endswith("*"):
            scope.fail(key, f"{value!r}: scopes are exact, no wildcards", code=_SCOPES)


def _lines(scope: _Scope, keys: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(scope.node, yamlsrc.Located):
        return {}
    found = {scope.prefix + key: scope.node.key_lines.get(key) for key in keys}
    return {key: line for key, line in found.items() if line is not None}


def _workload_problem(text: str, trust_domains: list[str]) -> str:
    if "*" in text:
        parts = text[len("spiffe://") :].split("/") if text.startswith("spiffe://") else []
        if len(parts) < 2:
            return "a pattern must name the trust domain and at least one path segment"
        if any(p not in ("*", "**") and "*" in p for p in parts) or "**" in parts[:-1]:
            return "'*' stands for a whole segment; '**' only as the last segment"
        if "*" in parts[0]:
            return "the trust domain cannot be a wildcard"
        concrete = "spiffe://" + "/".join("x" if p in ("*", "**") else p for p in parts)
        parsed = parse_spiffe_id(concrete)
    else:
        parsed = parse_spiffe_id(text)
    if parsed is None:
        return "not a valid SPIFFE ID"
    if parsed.trust_domain not in trust_domains:
        return f"trust domain {parsed.trust_domain!r} is not in workloads.trustDomains"
    return ""


def canonical_spiffe(text: str) -> str:
    """The scheme of a SPIFFE ID is case-insensitive; callers always arrive as ``spiffe://``,
    so a rule written ``SPIFFE://`` must be stored that way too or it would never match."""
    if text[:9].lower() == "spiffe://":
        return "spiffe://" + text[9:]
    return text


def parse_duration(value: Any) -> int | None:
    """Seconds from an integer or a string like ``30s``, ``5m``, ``1h`` (or ``-60s``: callers
    that need a positive duration check the sign themselves)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        found = _DURATION.fullmatch(value.strip())
        if found:
            sign = -1 if found.group(1) else 1
            return sign * int(found.group(2)) * _UNIT[found.group(3)]
    return None
