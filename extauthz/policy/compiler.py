"""The policy document: load it, check every field, compile it into a lookup table.

``compile_policy(text, source)`` is pure (text in, ``Policy`` out) and reports every problem at
once in one ``PolicyError``. ``load_policy(path)`` adds the file read. A ``Policy`` is immutable;
replacing one is the caller's business (and only with one that compiled).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extauthz.decision import paths
from extauthz.decision.identity import parse_spiffe_id
from extauthz.decision.jose import SUPPORTED_ALGORITHMS
from extauthz.decision.model import (
    SELF_ISSUER_ID,
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

API_VERSION = "extauthz/v1"
KIND = "ExchangePolicy"
MAX_POLICY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TTL = 300
DEFAULT_LEEWAY = 30
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_JWKS_REFRESH = 300
DEFAULT_JWKS_TIMEOUT = 5
HARD_MAX_TTL = 3600  # a minted token never lives longer than this, whatever a policy says
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


# Compile problems that are also lint findings, by the field they concern: the policy linter
# reports them under these check ids.
PROBLEM_CODES = {
    "grant.audience": "audience-not-single-system",
    "grant.ttl": "ttl-not-capped",
    "exchange.maxTtl": "ttl-not-capped",
    "grant.scopes": "scope-not-deterministic",
    "require.scopes": "scope-not-deterministic",
    "algorithms": "issuer-algorithm-weak",
    "issuer": "issuer-broad",
    "exchange.issuer": "issuer-not-https",
    "audiences": "issuer-audiences-missing",
    "purpose": "purpose-missing",
    "match.workloads": "workload-invalid",
    "match": "rules-ambiguous",
}


# --- reading the document ----------------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    """Read and compile a policy file. Relative JWKS paths resolve against its directory."""
    source = str(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError([Problem(source, "", "", f"cannot read: {exc.strerror or exc}")]) from exc
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError([Problem(source, "", "", f"larger than {MAX_POLICY_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(source, "", "", "not UTF-8")]) from exc
    return compile_policy(text, source=source, base_dir=path.parent)


def compile_policy(text: str, *, source: str = "<policy>", base_dir: Path | None = None) -> Policy:
    try:
        doc = yamlsrc.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([Problem(source, "", "", f"not valid YAML: {problem}", line)]) from exc
    except RecursionError as exc:
        raise PolicyError([Problem(source, "", "", "YAML nested too deep")]) from exc
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # PyYAML's constructors raise these on values like "0x_", "2020-13-45" or "!!bool x".
        raise PolicyError([Problem(source, "", "", f"not valid YAML: {exc}")]) from exc
    checker = _Checker(source)
    policy = checker.document(doc, text, base_dir or Path("."))
    if checker.problems or policy is None:
        raise PolicyError(checker.problems or [Problem(source, "", "", "empty policy")])
    return policy


class _Checker:
    """Walks the document, collecting every problem instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def fail(
        self,
        where: str,
        fieldpath: str,
        message: str,
        node: Any = None,
        key: str = "",
        line: int | None = None,
    ) -> None:
        if isinstance(node, yamlsrc.Located):
            line = node.line_of(key) if key else node.line
        code = PROBLEM_CODES.get(fieldpath, "invalid-policy")
        self.problems.append(Problem(self.source, where, fieldpath, message, line, code))

    # -- small typed getters; each reports and returns a safe fallback on a bad value --

    def mapping(self, node: Any, key: str, where: str, prefix: str, required: bool) -> Any:
        value = node.get(key) if isinstance(node, dict) else None
        if value is None:
            if required:
                self.fail(where, prefix + key, "is required", node, key)
            return None
        if not isinstance(value, dict):
            self.fail(where, prefix + key, "must be a mapping", node, key)
            return None
        return value

    def fields(self, node: Any, allowed: set[str], where: str, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key in node:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.fail(
                    where, prefix + key, f"unknown field (expected one of: {hint})", node, key
                )

    def string(
        self, node: Any, key: str, where: str, prefix: str, required: bool = True
    ) -> str | None:
        value = node.get(key) if isinstance(node, dict) else None
        if value is None:
            if required:
                self.fail(where, prefix + key, "is required", node, key)
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(where, prefix + key, "must be a non-empty string", node, key)
            return None
        return value

    def strings(
        self, node: Any, key: str, where: str, prefix: str, required: bool = True
    ) -> list[str] | None:
        value = node.get(key) if isinstance(node, dict) else None
        if value is None:
            if required:
                self.fail(where, prefix + key, "is required", node, key)
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            self.fail(where, prefix + key, "must be a non-empty list of strings", node, key)
            return None
        if len(set(value)) != len(value):
            self.fail(where, prefix + key, "lists a value twice", node, key)
        return list(value)

    def duration(
        self, node: Any, key: str, where: str, prefix: str, default: int | None
    ) -> int | None:
        value = node.get(key) if isinstance(node, dict) else None
        if value is None:
            if default is None:
                self.fail(where, prefix + key, "is required", node, key)
            return default
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            self.fail(
                where, prefix + key, "must be a positive duration like 30s, 5m or 1h", node, key
            )
            return None
        return seconds

    # -- the document --

    def document(self, doc: Any, text: str, base_dir: Path) -> Policy | None:
        if not isinstance(doc, dict):
            self.fail("", "", "the document must be a mapping")
            return None
        self.fields(
            doc,
            {
                "apiVersion",
                "kind",
                "mode",
                "exchange",
                "trustedIssuers",
                "workloads",
                "rules",
                "default",
            },
            "",
            "",
        )
        if doc.get("apiVersion") != API_VERSION:
            self.fail("", "apiVersion", f"must be {API_VERSION!r}", doc, "apiVersion")
        if doc.get("kind") != KIND:
            self.fail("", "kind", f"must be {KIND!r}", doc, "kind")
        mode = doc.get("mode", "enforce")
        if mode not in ("enforce", "shadow"):
            self.fail("", "mode", "must be enforce or shadow", doc, "mode")
        if doc.get("default", "deny") != "deny":
            self.fail("", "default", "must be 'deny' (there is no default allow)", doc, "default")
        exchange = self.exchange(self.mapping(doc, "exchange", "", "", required=True))
        issuers = self.issuers(doc.get("trustedIssuers"), doc, base_dir, exchange)
        trust_domains, hops = self.workloads(self.mapping(doc, "workloads", "", "", required=True))
        rules = self.rules(doc.get("rules"), doc, issuers, trust_domains, exchange)
        # The table is built even when other problems were found, from the rules that are
        # valid on their own, so overlaps are reported together with everything else.
        table, overlaps = build_table(rules)
        for overlap in overlaps:
            self.fail(
                f"rules ({overlap.rule.id})",
                overlap.field,
                overlap.message,
                line=overlap.rule.line_of(overlap.field),
            )
        if exchange is None or self.problems:
            return None
        return Policy(
            source=self.source,
            digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            exchange=exchange,
            issuers={i.id: i for i in issuers},
            issuers_by_iss={i.issuer: i for i in issuers},
            trust_domains=frozenset(trust_domains),
            xfcc_trusted_hops=frozenset(hops),
            rules=tuple(rules),
            table=table,
            shadow=mode == "shadow",
        )

    def exchange(self, node: Any) -> Exchange | None:
        if node is None:
            return None
        w, p = "exchange", "exchange."
        self.fields(
            node,
            {"issuer", "tokenType", "maxTtl", "leeway", "maxTokenBytes", "stripHeaders"},
            w,
            "",
        )
        issuer = self.string(node, "issuer", w, p)
        if issuer is not None and not issuer.startswith("https://"):
            self.fail(w, p + "issuer", "must be an https:// URL", node, "issuer")
        token_type = node.get("tokenType", "access_token")
        if token_type not in TOKEN_TYPES:
            self.fail(
                w, p + "tokenType", "must be access_token or transaction_token", node, "tokenType"
            )
            token_type = "access_token"
        max_ttl = self.duration(node, "maxTtl", w, p, DEFAULT_MAX_TTL)
        if max_ttl is not None and max_ttl > HARD_MAX_TTL:
            self.fail(w, p + "maxTtl", f"must be at most {HARD_MAX_TTL}s", node, "maxTtl")
        leeway = self.duration(node, "leeway", w, p, DEFAULT_LEEWAY)
        if leeway is not None and leeway > 300:
            self.fail(w, p + "leeway", "must be at most 300s", node, "leeway")
        max_bytes = node.get("maxTokenBytes", DEFAULT_MAX_TOKEN_BYTES)
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or not 256 <= max_bytes <= 65536
        ):
            self.fail(
                w,
                p + "maxTokenBytes",
                "must be an integer from 256 to 65536",
                node,
                "maxTokenBytes",
            )
        extra = node.get("stripHeaders", [])
        if not isinstance(extra, list) or not all(
            isinstance(h, str) and _HEADER.fullmatch(h) for h in extra
        ):
            self.fail(
                w,
                p + "stripHeaders",
                "must be a list of lower-case header names",
                node,
                "stripHeaders",
            )
            extra = []
        typ, header = TOKEN_TYPES[token_type]
        strip = tuple(dict.fromkeys([*DEFAULT_STRIP_HEADERS, *extra]))
        if issuer is None or max_ttl is None or leeway is None or not isinstance(max_bytes, int):
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
        )

    def issuers(
        self, nodes: Any, doc: Any, base_dir: Path, exchange: Exchange | None
    ) -> list[TrustedIssuer]:
        if not isinstance(nodes, list) or not nodes:
            self.fail("", "trustedIssuers", "must be a non-empty list", doc, "trustedIssuers")
            return []
        out: list[TrustedIssuer] = []
        seen_ids: set[str] = set()
        seen_iss: set[str] = set()
        for index, node in enumerate(nodes):
            ident = node.get("id") if isinstance(node, dict) else None
            w = f"trustedIssuers[{index}]" + (f" ({ident})" if isinstance(ident, str) else "")
            if not isinstance(node, dict):
                self.fail(w, "", "must be a mapping", doc, "trustedIssuers")
                continue
            self.fields(
                node, {"id", "issuer", "jwks", "audiences", "algorithms", "tokenTypes"}, w, ""
            )
            before = len(self.problems)
            ident = self.string(node, "id", w, "")
            if ident is not None:
                if not _ID.fullmatch(ident):
                    self.fail(
                        w, "id", "must be lower-case letters, digits, '.', '_' or '-'", node, "id"
                    )
                elif ident == SELF_ISSUER_ID:
                    self.fail(
                        w,
                        "id",
                        f"{SELF_ISSUER_ID!r} is reserved for the exchange itself",
                        node,
                        "id",
                    )
                elif ident in seen_ids:
                    self.fail(w, "id", "is used by another trusted issuer", node, "id")
                seen_ids.add(ident)
            iss = self.string(node, "issuer", w, "")
            if iss is not None:
                if "*" in iss:
                    self.fail(w, "issuer", "must be one exact issuer, no wildcards", node, "issuer")
                if iss in seen_iss:
                    self.fail(w, "issuer", "is listed twice", node, "issuer")
                if exchange is not None and iss == exchange.issuer:
                    self.fail(w, "issuer", "is the exchange's own issuer", node, "issuer")
                seen_iss.add(iss)
            jwks = self.jwks(self.mapping(node, "jwks", w, "", required=True), w, base_dir)
            audiences = self.strings(node, "audiences", w, "")
            algorithms = self.strings(node, "algorithms", w, "")
            for alg in algorithms or []:
                if alg not in SUPPORTED_ALGORITHMS:
                    hint = ", ".join(sorted(SUPPORTED_ALGORITHMS))
                    self.fail(
                        w,
                        "algorithms",
                        f"{alg!r} is not accepted (use: {hint})",
                        node,
                        "algorithms",
                    )
            types = self.strings(node, "tokenTypes", w, "", required=False) or ["JWT", "at+jwt"]
            if len(self.problems) == before and ident and iss and jwks and audiences and algorithms:
                out.append(
                    TrustedIssuer(
                        id=ident,
                        issuer=iss,
                        jwks=jwks,
                        audiences=frozenset(audiences),
                        algorithms=frozenset(algorithms),
                        token_types=frozenset(normal_typ(t) for t in types),
                        line=node.line,
                        field_lines=_lines(
                            node, "", ("issuer", "jwks", "audiences", "algorithms", "tokenTypes")
                        ),
                    )
                )
        return out

    def jwks(self, node: Any, w: str, base_dir: Path) -> JwksSource | None:
        if node is None:
            return None
        self.fields(node, {"file", "url", "refresh", "timeout"}, w, "jwks.")
        if ("file" in node) == ("url" in node):
            self.fail(w, "jwks", "give exactly one of file or url", node)
            return None
        if "file" in node:
            if "refresh" in node or "timeout" in node:
                self.fail(
                    w, "jwks", "refresh and timeout go with url (files reload on change)", node
                )
            name = self.string(node, "file", w, "jwks.")
            return JwksSource(file=base_dir / name) if name is not None else None
        url = self.string(node, "url", w, "jwks.")
        refresh = self.duration(node, "refresh", w, "jwks.", DEFAULT_JWKS_REFRESH)
        timeout = self.duration(node, "timeout", w, "jwks.", DEFAULT_JWKS_TIMEOUT)
        if url is None or refresh is None or timeout is None:
            return None
        try:
            parsed = urlsplit(url)
            loopback = parsed.hostname in ("127.0.0.1", "::1", "localhost")
        except ValueError:
            self.fail(w, "jwks.url", "is not a valid URL", node, "url")
            return None
        if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
            self.fail(w, "jwks.url", "must be https:// (http only on loopback)", node, "url")
        if refresh < 10 or timeout > 30:
            self.fail(w, "jwks", "refresh must be at least 10s and timeout at most 30s", node)
        return JwksSource(url=url, refresh=refresh, timeout=timeout)

    def workloads(self, node: Any) -> tuple[list[str], list[str]]:
        if node is None:
            return [], []
        w = "workloads"
        self.fields(node, {"trustDomains", "xfcc"}, w, "")
        domains = self.strings(node, "trustDomains", w, "") or []
        for domain in domains:
            if parse_spiffe_id(f"spiffe://{domain}") is None:
                self.fail(
                    w,
                    "trustDomains",
                    f"{domain!r} is not a SPIFFE trust domain",
                    node,
                    "trustDomains",
                )
        hops: list[str] = []
        xfcc = self.mapping(node, "xfcc", w, "", required=False)
        if xfcc is not None:
            self.fields(xfcc, {"trustedHops"}, w, "xfcc.")
            raw = xfcc.get("trustedHops", [])
            if not isinstance(raw, list) or not all(isinstance(h, str) for h in raw):
                self.fail(
                    w, "xfcc.trustedHops", "must be a list of SPIFFE IDs", xfcc, "trustedHops"
                )
            else:
                for hop in raw:
                    if parse_spiffe_id(hop) is None:
                        self.fail(
                            w,
                            "xfcc.trustedHops",
                            f"{hop!r} is not a SPIFFE ID",
                            xfcc,
                            "trustedHops",
                        )
                hops = [canonical_spiffe(h) for h in raw]
        return domains, hops

    def rules(
        self,
        nodes: Any,
        doc: Any,
        issuers: list[TrustedIssuer],
        trust_domains: list[str],
        exchange: Exchange | None,
    ) -> list[Rule]:
        if not isinstance(nodes, list):
            self.fail("", "rules", "must be a list", doc, "rules")
            return []
        issuer_ids = {i.id for i in issuers}
        out: list[Rule] = []
        seen: set[str] = set()
        for index, node in enumerate(nodes):
            ident = node.get("id") if isinstance(node, dict) else None
            w = f"rules[{index}]" + (f" ({ident})" if isinstance(ident, str) else "")
            if not isinstance(node, dict):
                self.fail(w, "", "must be a mapping", doc, "rules")
                continue
            before = len(self.problems)
            rule = self.rule(node, w, issuer_ids, trust_domains, exchange)
            if rule is not None and rule.id in seen:
                self.fail(w, "id", "is used by another rule", node, "id")
            if rule is not None:
                seen.add(rule.id)
            if rule is not None and len(self.problems) == before:
                out.append(rule)
        return out

    def rule(
        self,
        node: yamlsrc.Located,
        w: str,
        issuer_ids: set[str],
        trust_domains: list[str],
        exchange: Exchange | None,
    ) -> Rule | None:
        self.fields(
            node, {"id", "purpose", "match", "require", "grant", "mode", "reexchange"}, w, ""
        )
        ident = self.string(node, "id", w, "")
        if ident is not None and not _ID.fullmatch(ident):
            self.fail(w, "id", "must be lower-case letters, digits, '.', '_' or '-'", node, "id")
        purpose = self.string(node, "purpose", w, "")
        mode = node.get("mode", "enforce")
        if mode not in ("enforce", "shadow"):
            self.fail(w, "mode", "must be enforce or shadow", node, "mode")
        reexchange = node.get("reexchange", False)
        if not isinstance(reexchange, bool):
            self.fail(w, "reexchange", "must be true or false", node, "reexchange")

        match = self.mapping(node, "match", w, "", required=True)
        self.fields(match, {"workloads", "host", "methods", "paths", "issuers"}, w, "match.")
        workloads = [
            canonical_spiffe(t) for t in self.strings(match, "workloads", w, "match.") or []
        ]
        for text in workloads:
            reason = _workload_problem(text, trust_domains)
            if reason:
                self.fail(w, "match.workloads", f"{text!r}: {reason}", match, "workloads")
        host = self.string(match, "host", w, "match.")
        if host is not None and (host != host.lower() or not _HOST.fullmatch(host) or ".." in host):
            self.fail(
                w,
                "match.host",
                "must be a lower-case host name without port or wildcard",
                match,
                "host",
            )
        methods = self.strings(match, "methods", w, "match.") or []
        for method in methods:
            if method not in METHODS:
                self.fail(
                    w,
                    "match.methods",
                    f"{method!r} is not an upper-case HTTP method",
                    match,
                    "methods",
                )
        path_texts = self.strings(match, "paths", w, "match.") or []
        for text in path_texts:
            try:
                paths.parse_template(text)
            except ValueError as exc:
                self.fail(w, "match.paths", f"{text!r}: {exc}", match, "paths")
        rule_issuers = self.strings(match, "issuers", w, "match.") or []
        for iss in rule_issuers:
            if iss not in issuer_ids:
                self.fail(
                    w, "match.issuers", f"{iss!r} is not a trusted issuer id", match, "issuers"
                )

        require = self.mapping(node, "require", w, "", required=False)
        self.fields(require, {"scopes"}, w, "require.")
        required = self.strings(require, "scopes", w, "require.", required=False) or []
        self.scopes(required, w, "require.scopes", require)

        grant_node = self.mapping(node, "grant", w, "", required=True)
        self.fields(grant_node, {"audience", "scopes", "ttl"}, w, "grant.")
        audience = self.string(grant_node, "audience", w, "grant.")
        if audience is not None and ("*" in audience or " " in audience):
            self.fail(
                w,
                "grant.audience",
                "must be exactly one audience, no wildcards",
                grant_node,
                "audience",
            )
        granted = self.strings(grant_node, "scopes", w, "grant.") or []
        self.scopes(granted, w, "grant.scopes", grant_node)
        ttl = self.duration(grant_node, "ttl", w, "grant.", None)
        if ttl is not None and exchange is not None and ttl > exchange.max_ttl:
            self.fail(
                w,
                "grant.ttl",
                f"{ttl}s exceeds exchange.maxTtl ({exchange.max_ttl}s)",
                grant_node,
                "ttl",
            )
        if None in (ident, purpose, host, audience, ttl) or not (
            workloads and methods and path_texts and rule_issuers and granted
        ):
            return None
        assert ident and purpose and host and audience and ttl  # for the type checker
        return Rule(
            id=ident,
            purpose=purpose,
            workloads=tuple(workloads),
            host=host,
            methods=frozenset(methods),
            paths=tuple(path_texts),
            issuers=frozenset(rule_issuers),
            require_scopes=frozenset(required),
            grant=Grant(audience, frozenset(granted), ttl),
            shadow=mode == "shadow",
            reexchange=reexchange is True,
            line=node.line,
            field_lines={
                **_lines(node, "", ("id", "purpose", "match", "mode", "reexchange")),
                **_lines(match, "match.", ("workloads", "host", "methods", "paths", "issuers")),
                **_lines(require, "require.", ("scopes",)),
                **_lines(grant_node, "grant.", ("audience", "scopes", "ttl")),
            },
        )

    def scopes(self, scopes: list[str], w: str, fieldpath: str, node: Any) -> None:
        for scope in scopes:
            if not _SCOPE.fullmatch(scope):
                self.fail(
                    w,
                    fieldpath,
                    f"{scope!r} is not a valid scope token",
                    node,
                    fieldpath.split(".")[-1],
                )
            elif scope == "*" or scope.endswith("*"):
                self.fail(
                    w,
                    fieldpath,
                    f"{scope!r}: scopes are exact, no wildcards",
                    node,
                    fieldpath.split(".")[-1],
                )


def _lines(node: Any, prefix: str, keys: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(node, yamlsrc.Located):
        return {}
    found = {prefix + key: node.key_lines.get(key) for key in keys}
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
