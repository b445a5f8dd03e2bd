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
import difflib
import hashlib
import math
import re
from collections.abc import Collection, Sequence
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
from extauthz.policy import sources, yamlsrc
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
    "MAX_POLICY_TOTAL_BYTES",
    "SHARED_KEYS",
    "METHODS",
    "TOKEN_TYPES",
    "canonical_spiffe",
    "compile_document",
    "compile_documents",
    "compile_policy",
    "compile_sources",
    "load_policy",
    "parse_document",
    "parse_duration",
    "parse_instant",
    "parse_sources",
    "read_policy_text",
]

# What a document must declare itself as, and the largest file and policy read (see sources).
API_VERSION = "extauthz/v1"
KIND = "ExchangePolicy"
MAX_POLICY_BYTES = sources.MAX_FILE_BYTES
MAX_POLICY_TOTAL_BYTES = sources.MAX_TOTAL_BYTES
# The top-level keys, and those of them one file of a policy directory holds for all.
TOP_KEYS: tuple[str, ...] = ("apiVersion", "kind", "mode", "exchange", "trustedIssuers")
TOP_KEYS += ("workloads", "rules", "default")
SHARED_KEYS = tuple(key for key in TOP_KEYS if key != "rules")
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
    """Read and compile a policy file, or a directory of them (``sources.policy_files``).
    Relative JWKS paths resolve against the file's directory (the directory itself)."""
    if not path.is_dir():
        return compile_policy(read_policy_text(path), source=str(path), base_dir=path.parent)
    return compile_sources(sources.read(path), name=str(path), base_dir=path)


def read_policy_text(path: Path) -> str:
    """The text of one policy file, as ``serve`` and ``policy lint`` both read it: at most
    ``MAX_POLICY_BYTES``, UTF-8. Raises ``PolicyError`` naming what is wrong."""
    return sources.read_one(path).text


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
        message = f"not valid YAML: {problem}"
        raise PolicyError([Problem(source, "", "", message, line, fix=_YAML_FIX)]) from exc
    except RecursionError as exc:
        fix = "flatten the document: no policy needs mappings this deep"
        raise PolicyError([Problem(source, "", "", "YAML nested too deep", fix=fix)]) from exc
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # PyYAML's constructors raise these on values like "0x_", "2020-13-45" or "!!bool x".
        fix = "quote the value that YAML reads as a number, date or tag"
        raise PolicyError([Problem(source, "", "", f"not valid YAML: {exc}", fix=fix)]) from exc


_YAML_FIX = "correct the YAML at that line: indentation, a missing ':', or an unclosed quote"


def parse_sources(files: Sequence[sources.Source]) -> list[Any]:
    """The YAML document of every file; the problems of every file that is not YAML at once."""
    problems: list[Problem] = []
    docs: list[Any] = []
    for file in files:
        try:
            docs.append(parse_document(file.text, source=file.name))
        except PolicyError as exc:
            problems.extend(exc.problems)
    if problems:
        raise PolicyError(problems)
    return docs


def compile_sources(
    files: Sequence[sources.Source], *, name: str, base_dir: Path | None = None
) -> Policy:
    """Parse and compile the files of a policy directory as one policy (one table)."""
    return compile_documents(files, parse_sources(files), name=name, base_dir=base_dir)


def compile_document(
    doc: Any, text: str, *, source: str = "<policy>", base_dir: Path | None = None
) -> Policy:
    """Compile a document ``parse_document`` returned for ``text`` (the text gives the digest)."""
    report = _Report(source)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    top = _Scope.top(report, doc)
    policy = _document(top, [top], digest, base_dir or Path("."), (source,))
    if report.problems or policy is None:
        raise PolicyError(report.problems or [Problem(source, "", "", "empty policy")])
    return policy


def compile_documents(
    files: Sequence[sources.Source], docs: Sequence[Any], *, name: str, base_dir: Path | None
) -> Policy:
    """Compile the documents of a policy directory (``docs[i]`` parsed from ``files[i]``) into
    one policy. The first file with a shared key (``SHARED_KEYS``) is the one that holds them;
    every other file holds only ``rules``. Rules from every file make one table."""
    report = _Report(name)
    scopes = [_Scope.top(report, doc, file.name) for file, doc in zip(files, docs, strict=True)]
    shared = next((s for s in scopes if any(s.has(key) for key in SHARED_KEYS)), None)
    for scope in scopes:
        if scope is not shared:
            _rules_file(scope, shared)
    # Over each file's name in the directory (not where it is mounted) and text: the same
    # files give the same revision in CI and in the pod.
    digest = hashlib.sha256()
    for file in files:
        text = file.text.encode("utf-8")
        digest.update(f"{Path(file.name).name}\0{len(text)}\0".encode() + text)
    if shared is None:
        report.problems.append(
            Problem(
                name,
                "",
                "",
                "no file holds the shared keys (apiVersion, kind, exchange, trustedIssuers, "
                "workloads)",
                fix="put them in one file of the directory, e.g. 00-shared.yaml",
            )
        )
        raise PolicyError(report.problems)
    rule_files = [shared, *(s for s in scopes if s is not shared)]
    order = tuple(s.source for s in rule_files)
    policy = _document(shared, rule_files, digest.hexdigest(), base_dir or Path("."), order)
    # File by file, each in the order found: a team reads its own file's problems together.
    rank = {file.name: index for index, file in enumerate(files)}
    report.problems.sort(key=lambda problem: rank.get(problem.file, -1))
    if report.problems or policy is None:
        raise PolicyError(report.problems or [Problem(name, "", "", "empty policy")])
    return policy


def _rules_file(scope: _Scope, shared: _Scope | None) -> None:
    """A file of a policy directory that is not the shared one: ``rules`` and nothing else."""
    if not isinstance(scope.node, dict):
        scope.fail("", "the document must be a mapping", fix="write `rules:` and a list of rules")
        return
    scope.fields(TOP_KEYS)
    if shared is None:
        return
    for key in SHARED_KEYS:
        if scope.has(key):
            there = f"{shared.source}:{shared.line_of(key) or shared.line or 1}"
            scope.fail(
                key,
                f"is a shared key, and {there} holds the shared keys already: "
                "one file of a policy directory holds them, the others only `rules`",
                fix=f"move `{key}` into {shared.source}, or delete it here",
            )


# --- the reporter --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Report:
    """Every problem found so far, in the order found: nothing stops at the first."""

    source: str
    problems: list[Problem] = field(default_factory=list)
    # (file, entry, field) of required fields whose misspelling was reported: the "is
    # required" that would follow from it says nothing new.
    misspelt: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Scope:
    """One mapping being checked: the entry it belongs to (``where``, "rules[2] (orders-read)"),
    its dotted path inside that entry (``prefix``, "grant."), and the YAML node itself, whose
    key lines locate each problem. The getters report a bad value and return None (or the
    default) so the caller carries on and finds the next problem too."""

    report: _Report
    source: str  # the file this mapping is in
    where: str
    prefix: str
    node: Any  # the raw YAML value: a mapping when the document is well formed
    line: int | None  # of the mapping, or of the key that holds this entry when it is not one

    @classmethod
    def top(cls, report: _Report, doc: Any, source: str | None = None) -> _Scope:
        """The document itself (of the file ``source``; the report's by default)."""
        return cls(report, source or report.source, "", "", doc, _node_line(doc, None))

    def entry(self, where: str, node: Any, key: str) -> _Scope:
        """A new entry (a list item under ``key``, or a section), with paths starting afresh."""
        line = _node_line(node, self.line_of(key))
        return _Scope(self.report, self.source, where, "", node, line)

    def child(self, key: str, node: Any) -> _Scope:
        """The mapping under ``key`` (as ``mapping`` returned it: None when absent or bad)."""
        line = _node_line(node, None)
        return _Scope(self.report, self.source, self.where, f"{self.prefix}{key}.", node, line)

    def section(self, where: str, prefix: str = "") -> _Scope:
        """This mapping as an entry of its own: its problems are reported under ``where``, its
        fields under ``prefix``."""
        return _Scope(self.report, self.source, where, prefix, self.node, self.line)

    def line_of(self, key: str) -> int | None:
        """The line of ``key`` in this mapping, else of the mapping."""
        if key and isinstance(self.node, yamlsrc.Located):
            return self.node.line_of(key)
        return self.line

    def fail(self, key: str, message: str, *, code: str = _INVALID, fix: str = "") -> None:
        """Report a problem with the field ``key`` ("" for the mapping as a whole), and how to
        correct it (when ``fix`` is not given, a "must be ..." message says it)."""
        fieldpath = self.prefix + key if key else self.prefix.removesuffix(".")
        if not fix and message.startswith("must be ") and fieldpath:
            fix = f"make `{fieldpath}` {message.removeprefix('must be ')}"
        line = self.line_of(key)
        self.report.problems.append(
            Problem(self.source, self.where, fieldpath, message, line, code, fix)
        )

    def absent(self, key: str, *, code: str = _INVALID) -> None:
        """Report the required field ``key`` missing, unless its misspelling was reported."""
        mark = (self.source, self.where)
        if (*mark, self.prefix + key) in self.report.misspelt or (
            (*mark, key) in self.report.misspelt
        ):
            return
        self.fail(key, "is required", code=code, fix=f"add `{self.prefix}{key}` (docs/policy.md)")

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
            if key in allowed:
                continue
            close = [
                name
                for name in difflib.get_close_matches(str(key), list(allowed), n=3)
                if name not in self.node
            ]
            if close:
                self.report.misspelt.add((self.source, self.where, self.prefix + close[0]))
                self.fail(
                    key,
                    f"unknown field `{key}`: did you mean `{close[0]}`?",
                    fix=f"rename `{key}` to `{close[0]}`",
                )
            else:
                self.fail(
                    key,
                    f"unknown field `{key}` (expected one of: {hint})",
                    fix=f"remove `{key}`, or move it to the section it belongs to",
                )

    def mapping(self, key: str, *, required: bool) -> _Scope:
        """The child scope of the mapping under ``key`` (its node None when absent or bad)."""
        value = self.get(key)
        if value is None:
            if required:
                self.absent(key)
            return self.child(key, None)
        if not isinstance(value, dict):
            fix = f"write `{self.prefix}{key}` as indented `name: value` lines"
            self.fail(key, "must be a mapping", fix=fix)
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
                self.absent(key, code=missing)
            return None
        if not isinstance(value, str) or not value.strip():
            code = missing if isinstance(value, str) else invalid
            fix = f"give `{self.prefix}{key}` one value as text (quote it if YAML reads a list)"
            self.fail(key, "must be a non-empty string", code=code, fix=fix)
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
                self.absent(key, code=missing)
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            code = missing if value == [] else _INVALID
            fix = f"write `{self.prefix}{key}` as a list of at least one string, like [a, b]"
            self.fail(key, "must be a non-empty list of strings", code=code, fix=fix)
            return None
        if len(set(value)) != len(value):
            self.fail(key, "lists a value twice", fix="remove the repeated value")
        return list(value)

    def duration(self, key: str, default: int | None, *, missing: str = _INVALID) -> int | None:
        """A positive duration in seconds; ``default`` when absent (None: it is required, and
        ``missing`` is the check id then)."""
        value = self.get(key)
        if value is None:
            if default is None:
                self.absent(key, code=missing)
            return default
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            fix = f"write `{self.prefix}{key}` as a whole number with s, m or h, like 30s"
            self.fail(key, "must be a positive duration like 30s, 5m or 1h", fix=fix)
            return None
        return seconds


def _node_line(node: Any, fallback: int | None) -> int | None:
    return node.line if isinstance(node, yamlsrc.Located) else fallback


# --- the sections ------------------------------------------------------------------------------


def _document(
    top: _Scope, rule_files: Sequence[_Scope], digest: str, base_dir: Path, files: tuple[str, ...]
) -> Policy | None:
    """The shared sections from ``top``, and the rules of every one of ``rule_files`` (``top``
    among them) compiled into one table."""
    if not isinstance(top.node, dict):
        top.fail("", "the document must be a mapping", fix="start the file with apiVersion: ...")
        return None
    top.fields(TOP_KEYS)
    for key, value in (("apiVersion", API_VERSION), ("kind", KIND)):
        if not top.has(key):
            top.absent(key)
        elif top.get(key) != value:
            top.fail(key, f"must be {value!r}", fix=f"write `{key}: {value}`")
    mode = top.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        top.fail("mode", "must be enforce or shadow")
    if top.get("default", "deny") != "deny":
        top.fail("default", "must be 'deny' (there is no default allow)", fix="remove `default`")
    exchange = _exchange(top.mapping("exchange", required=True))
    issuers, declared = _issuers(top, base_dir, exchange)
    trust_domains, hops = _workloads(top.mapping("workloads", required=True))
    services = {i.id for i in issuers if i.transaction_token_service}
    known = _Known(
        {i.id for i in issuers},
        trust_domains,
        exchange,
        {SELF_ISSUER_ID, *services},
        None if declared is None else declared - {i.id for i in issuers},
    )
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for scope in rule_files:
        if isinstance(scope.node, dict):
            rules += _rules(scope, known, seen, required=scope is not top or len(rule_files) == 1)
    # The table is built even when other problems were found, from the rules that are valid
    # on their own, so overlaps are reported together with everything else.
    table, overlaps = build_table(rules)
    for overlap in overlaps:
        top.report.problems.append(
            Problem(
                overlap.rule.file or top.report.source,
                f"rules ({overlap.rule.id})",
                overlap.field,
                overlap.message,
                overlap.rule.line_of(overlap.field),
                _AMBIGUOUS,
                "make the two rules disjoint: split their hosts, methods, paths or workloads",
            )
        )
    if exchange is None or top.report.problems:
        return None
    return Policy(
        source=top.report.source,
        digest=digest,
        exchange=exchange,
        issuers={i.id: i for i in issuers},
        issuers_by_iss={i.issuer: i for i in issuers},
        trust_domains=frozenset(trust_domains or ()),
        xfcc_trusted_hops=frozenset(hops),
        rules=tuple(rules),
        table=table,
        shadow=mode == "shadow",
        windows=any(r.active_from is not None or r.active_until is not None for r in rules),
        files=files,
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
            scope.fail(
                "trustDomain",
                "goes with tokenType transaction_token only",
                fix="remove `trustDomain`, or set tokenType: transaction_token",
            )
        return None
    domain = scope.string("trustDomain")
    if domain is not None and ("/" in domain or parse_spiffe_id(f"spiffe://{domain}/x") is None):
        scope.fail(
            "trustDomain",
            f"{domain!r} is not a trust domain name like prod.example.com",
            fix="write the trust domain alone, like prod.example.com",
        )
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


def _issuers(
    top: _Scope, base_dir: Path, exchange: Exchange | None
) -> tuple[list[TrustedIssuer], set[str] | None]:
    """The trusted issuers that compile, and the ids of every entry written (None when the
    section itself is missing or broken: then no rule's issuer can be checked)."""
    nodes = top.get("trustedIssuers")
    if nodes is None:
        top.absent("trustedIssuers")
        return [], None
    if not isinstance(nodes, list) or not nodes:
        fix = "list at least one trusted issuer, each a mapping with id, issuer, jwks, ..."
        top.fail("trustedIssuers", "must be a non-empty list", fix=fix)
        return [], None
    out: list[TrustedIssuer] = []
    declared: set[str] = set()
    seen = _Seen()
    for index, node in enumerate(nodes):
        scope = top.entry(_entry_name("trustedIssuers", index, node), node, "trustedIssuers")
        if not isinstance(node, dict):
            scope.fail("", "must be a mapping")
            continue
        if isinstance(node.get("id"), str):
            declared.add(node["id"])
        issuer = _issuer(scope, base_dir, exchange, seen)
        if issuer is not None:
            out.append(issuer)
    return out, declared


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
            scope.fail(
                "id",
                f"{SELF_ISSUER_ID!r} is reserved for the exchange itself",
                fix="give the trusted issuer another id",
            )
        elif ident in seen.ids:
            scope.fail(
                "id",
                "is used by another trusted issuer",
                fix="give each trusted issuer an id of its own",
            )
        seen.ids.add(ident)
    iss = scope.string("issuer")
    if iss is not None:
        if "*" in iss:
            scope.fail("issuer", "must be one exact issuer, no wildcards", code=_ISSUER_BROAD)
        if iss in seen.issuers:
            scope.fail(
                "issuer",
                "is listed twice",
                fix="keep one entry per issuer and merge what the two say",
            )
        if exchange is not None and iss == exchange.issuer:
            scope.fail(
                "issuer",
                "is the exchange's own issuer",
                fix="remove this entry: tokens we minted are recognised without it",
            )
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
            scope.fail(
                "algorithms",
                f"{alg!r} is not accepted (use: {hint})",
                code=code,
                fix="list only the asymmetric algorithms the issuer signs with, from those named",
            )
    types = scope.strings("tokenTypes", required=False) or ["JWT", "at+jwt"]
    if service and any(normal_typ(t) != TXN_TYP for t in types):
        scope.fail(
            "tokenTypes",
            f"a transaction token service's tokenTypes is [{TXN_TYP}] only",
            fix="write tokenTypes: [txntoken+jwt] for a transaction token service",
        )
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
        scope.fail(
            "tokenTypes",
            f"{TXN_TYP} goes with exchange.tokenType transaction_token",
            fix="set exchange.tokenType: transaction_token, or remove txntoken+jwt",
        )
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
        scope.fail(
            "",
            "give exactly one of file or url",
            fix="write jwks: {file: PATH} or jwks: {url: https://...}",
        )
        return None
    if scope.has("file"):
        if scope.has("refresh") or scope.has("timeout"):
            scope.fail(
                "",
                "refresh and timeout go with url (files reload on change)",
                fix="remove refresh and timeout from a jwks file",
            )
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
        scope.fail(
            "url",
            "is not a valid URL",
            fix="write the JWKS URL in full, like https://idp.example.com/jwks.json",
        )
        return None
    if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
        scope.fail("url", "must be https:// (http only on loopback)")
    if refresh < 10 or timeout > 30:
        scope.fail(
            "",
            "refresh must be at least 10s and timeout at most 30s",
            fix="set refresh to 10s or more and timeout to 30s or less",
        )
    return JwksSource(url=url, refresh=refresh, timeout=timeout)


def _workloads(found: _Scope) -> tuple[list[str] | None, list[str]]:
    """The trust domains (None when they are not known: the section or a domain is broken,
    which was reported here) and the XFCC trusted hops."""
    if found.node is None:
        return None, []
    scope = found.section("workloads")
    scope.fields(("trustDomains", "xfcc"))
    domains = scope.strings("trustDomains")
    for domain in domains or []:
        if parse_spiffe_id(f"spiffe://{domain}") is None:
            fix = "write the trust domain alone, like cluster.local (no scheme, no path)"
            scope.fail("trustDomains", f"{domain!r} is not a SPIFFE trust domain", fix=fix)
            domains = None
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
                    xfcc.fail(
                        "trustedHops",
                        f"{hop!r} is not a SPIFFE ID",
                        fix="name each proxy by its full SPIFFE ID, spiffe://<domain>/<path>",
                    )
            hops = [canonical_spiffe(h) for h in raw]
    return domains, hops


@dataclass(frozen=True, slots=True)
class _Known:
    """What a rule may refer to, from the sections before the rules. A section that is broken
    leaves what it would have said unknown (None), so the rules are not blamed for it too."""

    issuer_ids: set[str]
    trust_domains: list[str] | None  # None: the workloads section is missing or broken
    exchange: Exchange | None
    txn_sources: set[str]  # where an inner hop's Txn-Token may come from: us, or a TTS
    # Issuer ids written in trustedIssuers whose entry does not compile (reported there);
    # None: the section itself is missing or broken.
    broken_issuers: set[str] | None = None


def _rules(top: _Scope, known: _Known, seen: dict[str, str], *, required: bool) -> list[Rule]:
    """The rules of one file; ``seen`` holds the ids of the rules before it (any file), with
    where each is."""
    nodes = top.get("rules")
    if nodes is None:
        if required:
            top.absent("rules")
        return []
    if not isinstance(nodes, list):
        top.fail("rules", "must be a list", fix="write `rules:` followed by `- id: ...` entries")
        return []
    out: list[Rule] = []
    for index, node in enumerate(nodes):
        scope = top.entry(_entry_name("rules", index, node), node, "rules")
        if not isinstance(node, dict):
            scope.fail("", "must be a mapping", fix="write each rule as `- id: ...` and its fields")
            continue
        before = scope.count()
        rule = _rule(scope, known)
        if rule is None:
            continue
        if rule.id in seen:
            scope.fail(
                "id",
                f"is used by another rule ({seen[rule.id]})",
                fix="give each rule an id of its own, unique across every file of the policy",
            )
        seen.setdefault(rule.id, rule.located())
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
        scope.fail(
            "active",
            "a passed Txn-Token keeps its own exp: use txnToken: replace",
            fix="remove `active`, or use txnToken: replace",
        )
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
        file=scope.source,
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
        scope.fail(
            "reexchange",
            "is for access tokens; an inner hop's rule says txnToken",
            fix="remove reexchange and say txnToken: replace or pass",
        )
        return "replace"
    if value is None:
        return ""
    if not txn_mode:
        scope.fail(
            "txnToken",
            "goes with exchange.tokenType transaction_token only",
            fix="remove `txnToken`, or set exchange.tokenType: transaction_token",
        )
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
            fix = (
                "add the trust domain to workloads.trustDomains, or correct the caller's ID"
                if "trustDomains" in reason
                else "write spiffe://<trust domain>/<path>, '*' or '**' only as whole segments"
            )
            scope.fail("workloads", f"{text!r}: {reason}", code=_WORKLOAD, fix=fix)
    host = scope.string("host")
    if host is not None and (host != host.lower() or not _HOST.fullmatch(host) or ".." in host):
        scope.fail("host", "must be a lower-case host name without port or wildcard")
    methods = scope.strings("methods") or []
    for method in methods:
        if method not in METHODS:
            scope.fail(
                "methods",
                f"{method!r} is not an upper-case HTTP method",
                fix="write methods in upper case: GET, POST, PUT, ...",
            )
    path_texts = scope.strings("paths") or []
    for text in path_texts:
        try:
            paths.parse_template(text)
        except ValueError as exc:
            scope.fail(
                "paths", f"{text!r}: {exc}", fix="write a path template like /v1/orders/{id}"
            )
    issuers = scope.strings("issuers") or []
    for iss in issuers:
        if known.broken_issuers is None or iss in known.broken_issuers:
            continue  # the trusted issuer's own problem was reported with it
        if txn:
            if iss not in known.txn_sources:
                hint = ", ".join(sorted(known.txn_sources))
                scope.fail(
                    "issuers",
                    f"{iss!r}: a txnToken rule takes Txn-Tokens of: {hint}",
                    fix="name one of the Txn-Token sources listed",
                )
        elif iss in known.txn_sources - {SELF_ISSUER_ID}:
            scope.fail(
                "issuers",
                f"{iss!r} issues Txn-Tokens: only a txnToken rule takes them",
                fix="move this issuer to a rule with txnToken, or name a bearer-token issuer",
            )
        elif iss not in known.issuer_ids:
            ids = ", ".join(sorted(known.issuer_ids)) or "none compiles"
            fix = f"name one of the trustedIssuers ids ({ids}), or add that issuer"
            scope.fail("issuers", f"{iss!r} is not a trusted issuer id", fix=fix)
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
            scope.fail(
                "claims",
                "claim names are non-empty strings",
                fix="name each claim, like azp: web-shop",
            )
            continue
        if isinstance(value, str) and _PARAM_REF.fullmatch(value):
            param = value[1:-1]
            missing = [t for t in templates if not _template_has(t, param)]
            if missing:
                scope.fail(
                    "claims",
                    f"{where}: {value} is not a parameter of every path template "
                    f"(not of {', '.join(missing)})",
                    fix="bind the claim to a parameter every path template of the rule has",
                )
                continue
            clash = _param_clash(templates, param)
            if clash:
                scope.fail(
                    "claims",
                    f"{where}: {value} is ambiguous: {clash}",
                    fix="put the parameter at the same segment of every path template",
                )
                continue
            out.append(ClaimCondition(name, "param", param=param))
        elif isinstance(value, dict):
            if set(value) != {"contains"} or not _scalar(value["contains"]):
                scope.fail(
                    "claims",
                    f"{where}: a mapping is {{contains: <value>}}",
                    fix="write {contains: VALUE}",
                )
                continue
            out.append(ClaimCondition(name, "contains", (value["contains"],)))
        elif isinstance(value, list):
            if not value or not all(_scalar(v) for v in value):
                scope.fail(
                    "claims",
                    f"{where}: a list holds strings, numbers or booleans",
                    fix="list strings, numbers or booleans only",
                )
                continue
            if len({(type(v), v) for v in value}) != len(value):
                scope.fail(
                    "claims", f"{where}: lists a value twice", fix="remove the repeated value"
                )
                continue
            out.append(ClaimCondition(name, "any", tuple(value)))
        elif _scalar(value):
            out.append(ClaimCondition(name, "equals", (value,)))
        else:
            scope.fail(
                "claims",
                f"{where}: must be a string, number, boolean, list or contains",
                fix='give a value, a list of values, "{param}" or {contains: value}',
            )
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
        scope.fail(
            "",
            "give from, until or both",
            fix="write active: {until: 2027-01-31T00:00:00Z} (and from if it starts later)",
        )
    for key in ("from", "until"):
        if scope.has(key) and scope.get(key) is None:
            scope.fail(
                key,
                "is empty: give a time, or leave the key out",
                fix="give an RFC 3339 time, or remove the key",
            )
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
            scope.fail(
                "audience",
                f"names the workload the Txn-Token is for: {problem}",
                fix="name the one workload the Txn-Token is for, by its SPIFFE ID",
            )
        audience = canonical_spiffe(audience)
    granted = scope.strings("scopes") or []
    _check_scopes(scope, "scopes", granted)
    # A grant without a ttl has no lifetime of its own to cap.
    ttl = scope.duration("ttl", None, missing=_TTL)
    if ttl is not None and exchange is not None and ttl > exchange.max_ttl:
        scope.fail(
            "ttl",
            f"{ttl}s exceeds exchange.maxTtl ({exchange.max_ttl}s)",
            code=_TTL,
            fix="lower the ttl, or raise exchange.maxTtl (at most 3600s)",
        )
    if audience is None or ttl is None or not granted:
        return None
    return Grant(audience, frozenset(granted), ttl)


def _check_scopes(scope: _Scope, key: str, values: list[str]) -> None:
    for value in values:
        if not _SCOPE.fullmatch(value):
            scope.fail(
                key,
                f"{value!r} is not a valid scope token",
                fix="write scopes as single words without spaces, quotes or backslashes",
            )
        elif value == "*" or value.endswith("*"):
            scope.fail(
                key,
                f"{value!r}: scopes are exact, no wildcards",
                code=_SCOPES,
                fix="list the exact scopes the downstream checks",
            )


def _lines(scope: _Scope, keys: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(scope.node, yamlsrc.Located):
        return {}
    found = {scope.prefix + key: scope.node.key_lines.get(key) for key in keys}
    return {key: line for key, line in found.items() if line is not None}


def _workload_problem(text: str, trust_domains: list[str] | None) -> str:
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
    if trust_domains is not None and parsed.trust_domain not in trust_domains:
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
