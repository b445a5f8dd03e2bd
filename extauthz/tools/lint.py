"""``extauthz policy lint``: what in a policy turns token exchange into privilege amplification.

The compiler already refuses what is never safe (wildcard audiences, uncapped ttls, wildcard
scopes, symmetric algorithms, rules without a purpose, ambiguous overlaps); those come back here
as errors under the same check ids. The checks below flag what compiles but widens the blast
radius of a token: each finding says the risk in one line and how to fix it.

The file is read once and parsed once; the checks read the compiled policy (and the parsed
document, for what compiling drops: which keys were left out, and their lines). Every check is
linear in the number of rules: overlaps come from the compiled table, not from comparing rules
pairwise.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from extauthz.decision.identity import parse_spiffe_id
from extauthz.decision.model import Policy, Rule, TrustedIssuer
from extauthz.errors import KeyLoadError, PolicyError
from extauthz.policy import sources, yamlsrc
from extauthz.policy.compiler import (
    compile_document,
    compile_documents,
    parse_document,
    parse_sources,
    read_policy_text,
)
from extauthz.policy.loader import load_issuer_keys
from extauthz.policy.table import overlapping_rules

__all__ = [
    "CATCH_ALL_SCOPES",
    "CHECKS",
    "ERROR",
    "INFO",
    "MAX_AUDIENCES_PER_ISSUER",
    "MAX_WORKLOADS_PER_RULE",
    "SHORT_TTL",
    "WARNING",
    "Check",
    "Finding",
    "LintOptions",
    "UnreadablePolicy",
    "audience_not_single_system",
    "audience_shared",
    "exchange_path_shared",
    "grant_wider_than_require",
    "issuer_checks",
    "lint_file",
    "lint_text",
    "max_ttl_implicit",
    "purpose_vague",
    "reexchange",
    "rule_many_issuers",
    "rule_windows",
    "rules_empty",
    "rules_overlap",
    "scope_catch_all",
    "shadow_mode",
    "transaction_tokens",
    "ttl_long",
    "workloads_broad",
    "xfcc_hops",
]

# Severities: errors fail lint, warnings fail it with --strict, infos never do.
ERROR, WARNING, INFO = "error", "warning", "info"
SHORT_TTL = 60  # seconds; longer grants are flagged even when under maxTtl
DEFAULT_MAX_WINDOW_DAYS = 30  # a temporary grant longer than this is flagged
MAX_WORKLOADS_PER_RULE = 10  # more callers than this in one rule are flagged
MAX_AUDIENCES_PER_ISSUER = 3  # more accepted audiences than this are flagged
# Scope names that grant whatever the downstream decides they mean.
CATCH_ALL_SCOPES = frozenset(
    {"all", "any", "admin", "root", "superuser", "full", "full_access", "everything", "*"}
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One lint result: how bad, which check, where (file, line, rule, field), what and how to
    fix it."""

    severity: str
    check: str
    file: str
    line: int | None
    rule: str | None
    field: str
    message: str
    hint: str

    def render(self) -> str:
        """Two lines of text: ``file:line: severity[check] rule r: field: message``, the fix."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        subject = f"rule {self.rule}: " if self.rule else ""
        field = f"{self.field}: " if self.field else ""
        return (
            f"{where}: {self.severity}[{self.check}] {subject}{field}{self.message}\n"
            f"    fix: {self.hint}"
        )

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON object, one key per field."""
        return asdict(self)


class UnreadablePolicy(Exception):
    """The file cannot be read at all (exit 2), as opposed to read and found wanting."""


# Hints for compile problems, by check id.
_COMPILE_HINTS = {
    "audience-not-single-system": "name exactly one downstream system as the audience",
    "ttl-not-capped": "give every grant a short ttl within exchange.maxTtl (at most 3600s)",
    "scope-not-deterministic": "list the exact scopes; no wildcards",
    "issuer-algorithm-weak": "list only the asymmetric algorithms the issuer really uses",
    "issuer-broad": "name one exact issuer per entry",
    "issuer-not-https": "use the https:// issuer URL",
    "issuer-audiences-missing": "list the audiences this issuer's tokens must carry for us",
    "purpose-missing": "say in a sentence why this exchange exists",
    "workload-invalid": "name callers by exact SPIFFE ID in a trusted domain",
    "rules-ambiguous": "make the rules disjoint: split hosts, methods, paths or workloads",
    "invalid-policy": "correct the field as the message says",
}


@dataclass(frozen=True, slots=True)
class LintOptions:
    """What some checks compare against: the time (None: now) and how long a rule's active
    window may be before it is flagged."""

    now: float | None = None
    max_window_days: int = DEFAULT_MAX_WINDOW_DAYS


def lint_file(path: Path, options: LintOptions | None = None) -> list[Finding]:
    """Lint one policy file as ``serve`` loads it: the same reader (size limit, UTF-8), the
    same compiler, and the JWKS files it names read and parsed. Raises ``UnreadablePolicy``
    when the file cannot be opened."""
    if path.is_dir():
        findings, policy = _lint_dir(path, options or LintOptions())
    else:
        try:
            text = read_policy_text(path)
        except PolicyError as exc:
            if not path.is_file():
                reason = exc.problems[0].message.removeprefix("cannot read: ")
                raise UnreadablePolicy(f"{path}: {reason}") from exc
            return _compile_findings(exc)
        findings, policy = _lint(text, str(path), path.parent, options or LintOptions())
    if policy is None:
        return findings
    try:
        load_issuer_keys(policy)
    except KeyLoadError as exc:
        findings.insert(
            0,
            Finding(
                ERROR,
                "invalid-policy",
                _shared_file(policy),
                None,
                None,
                "trustedIssuers",
                f"serve would refuse it: {exc}",
                "give every trusted issuer a JWKS file that exists and holds its public keys",
            ),
        )
    return findings


def lint_text(
    text: str,
    *,
    source: str = "<policy>",
    base_dir: Path | None = None,
    options: LintOptions | None = None,
) -> list[Finding]:
    """Lint a policy document: its compile problems as errors if it does not compile, else what
    every check finds. Sorted errors first, then by line."""
    return _lint(text, source, base_dir, options or LintOptions())[0]


def _lint(
    text: str, source: str, base_dir: Path | None, options: LintOptions
) -> tuple[list[Finding], Policy | None]:
    """The findings, and the compiled policy when it compiles (one parse, one compile)."""
    try:
        raw = parse_document(text, source=source)
        policy = compile_document(raw, text, source=source, base_dir=base_dir)
    except PolicyError as exc:
        return _compile_findings(exc), None
    return _checked(policy, raw, options), policy


def _checked(policy: Policy, raw: Any, options: LintOptions) -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS:
        findings.extend(check(policy, raw))
    findings.extend(rule_windows(policy, options))
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    files = {name: index for index, name in enumerate(sorted(policy.files))}
    findings.sort(key=lambda f: (order[f.severity], files.get(f.file, 0), f.line or 0, f.check))
    return findings


def _lint_dir(path: Path, options: LintOptions) -> tuple[list[Finding], Policy | None]:
    """A policy directory as ``serve`` loads it: its files read within the limits, parsed
    once, compiled as one policy; the checks read the shared file's document."""
    try:
        files = sources.read(path)
        docs = parse_sources(files)
        policy = compile_documents(files, docs, name=str(path), base_dir=path)
    except PolicyError as exc:
        return _compile_findings(exc), None
    raw = next(doc for file, doc in zip(files, docs, strict=True) if file.name == policy.files[0])
    return _checked(policy, raw, options), policy


def _compile_findings(exc: PolicyError) -> list[Finding]:
    return [
        Finding(
            ERROR,
            p.code,
            p.file,
            p.line,
            _rule_id(p.where),
            p.field,
            p.message,
            p.fix or _COMPILE_HINTS.get(p.code, _COMPILE_HINTS["invalid-policy"]),
        )
        for p in exc.problems
    ]


def _rule_id(where: str) -> str | None:
    if where.startswith("rules") and "(" in where:
        return where[where.index("(") + 1 : where.rindex(")")]
    return None


def _finding(
    severity: str, check: str, policy: Policy, rule: Rule | None, field: str, msg: str, hint: str
) -> Finding:
    line = rule.line_of(field) if rule is not None else None
    return Finding(
        severity,
        check,
        rule.file if rule is not None and rule.file else _shared_file(policy),
        line,
        rule.id if rule else None,
        field,
        msg,
        hint,
    )


def _shared_file(policy: Policy) -> str:
    """The file of the exchange, the issuers and the workloads (a directory's shared file)."""
    return policy.files[0] if policy.files else policy.source


# --- the checks ------------------------------------------------------------------------------

# A check reads the compiled policy and the parsed document (raw YAML) and yields findings.
Check = Callable[[Policy, Any], Iterator[Finding]]


def audience_not_single_system(policy: Policy, raw: Any) -> Iterator[Finding]:
    """An audience that names a family of systems (a prefix, a pattern, a namespace)."""
    for rule in policy.rules:
        aud = rule.grant.audience
        why = _family_audience(aud)
        if why:
            yield _finding(
                ERROR,
                "audience-not-single-system",
                policy,
                rule,
                "grant.audience",
                f"{aud!r} {why}: every system under it would accept the token",
                "name exactly one workload or service as the audience",
            )


def _family_audience(aud: str) -> str:
    if aud.endswith("/"):
        return "ends with '/' like a prefix"
    if any(c in aud for c in "{}?[]"):
        return "looks like a pattern"
    if aud.startswith("spiffe://"):
        parsed = parse_spiffe_id(aud)
        if parsed is None:
            return "is not a valid SPIFFE ID"
        segments = parsed.path.split("/")[1:] if parsed.path else []
        if len(segments) < 2 or segments[-2] == "ns":
            return "names a whole trust domain or namespace, not one workload"
    return ""


def audience_shared(policy: Policy, raw: Any) -> Iterator[Finding]:
    """One audience granted for several hosts."""
    hosts: dict[str, set[str]] = defaultdict(set)
    first: dict[str, Rule] = {}
    for rule in policy.rules:
        hosts[rule.grant.audience].add(rule.host)
        first.setdefault(rule.grant.audience, rule)
    for aud, names in hosts.items():
        if len(names) > 1:
            yield _finding(
                WARNING,
                "audience-shared",
                policy,
                first[aud],
                "grant.audience",
                f"{aud!r} is granted for {len(names)} hosts ({', '.join(sorted(names))}): "
                "one token then opens several systems",
                "give each destination system its own audience",
            )


def ttl_long(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Grants that live longer than ``SHORT_TTL``."""
    for rule in policy.rules:
        if rule.grant.ttl > SHORT_TTL:
            yield _finding(
                WARNING,
                "ttl-long",
                policy,
                rule,
                "grant.ttl",
                f"{rule.grant.ttl}s: a leaked token stays useful that long",
                f"grant at most {SHORT_TTL}s; callers exchange again when they need to",
            )


def max_ttl_implicit(policy: Policy, raw: Any) -> Iterator[Finding]:
    """No ``exchange.maxTtl``: the cap is the built-in default."""
    exchange = raw.get("exchange") if isinstance(raw, dict) else None
    if isinstance(exchange, dict) and "maxTtl" not in exchange:
        yield Finding(
            WARNING,
            "max-ttl-implicit",
            _shared_file(policy),
            exchange.line if isinstance(exchange, yamlsrc.Located) else None,
            None,
            "exchange.maxTtl",
            f"no maxTtl: the cap is the built-in default ({policy.exchange.max_ttl}s)",
            "set exchange.maxTtl to the longest lifetime you accept",
        )


def scope_catch_all(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Granted scopes with catch-all names (``admin``, ``all``, ...)."""
    for rule in policy.rules:
        broad = sorted(s for s in rule.grant.scopes if s.lower() in CATCH_ALL_SCOPES)
        if broad:
            yield _finding(
                ERROR,
                "scope-not-deterministic",
                policy,
                rule,
                "grant.scopes",
                f"{', '.join(broad)}: a catch-all scope grants whatever the downstream decides",
                "grant the specific scopes the purpose needs",
            )


def grant_wider_than_require(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Rules that require no scope, or grant scopes they do not require."""
    for rule in policy.rules:
        if not rule.require_scopes:
            yield _finding(
                WARNING,
                "require-empty",
                policy,
                rule,
                "require.scopes",
                "no required scope: any token from the issuer holding one grantable scope is "
                "exchanged",
                "require the scopes the purpose depends on",
            )
            continue
        extra = sorted(rule.grant.scopes - rule.require_scopes)
        if extra:
            yield _finding(
                WARNING,
                "grant-wider-than-require",
                policy,
                rule,
                "grant.scopes",
                f"grants {', '.join(extra)} beyond what it requires",
                "grant only what require.scopes names, or require it too",
            )


def _issuer_finding(
    policy: Policy,
    issuer: TrustedIssuer,
    check: str,
    severity: str,
    field: str,
    msg: str,
    hint: str,
) -> Finding:
    where = f"trustedIssuers ({issuer.id}).{field}"
    line = issuer.line_of(field)
    return Finding(severity, check, _shared_file(policy), line, None, where, msg, hint)


def issuer_checks(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Trusted issuers that are not https, accept many audiences, or RSA PKCS#1 v1.5."""
    for issuer in policy.issuers.values():
        if not issuer.issuer.startswith("https://"):
            yield _issuer_finding(
                policy,
                issuer,
                "issuer-not-https",
                ERROR,
                "issuer",
                f"{issuer.issuer!r} is not https: its discovery and keys can be tampered with",
                "use the issuer's https:// URL",
            )
        if len(issuer.audiences) > MAX_AUDIENCES_PER_ISSUER:
            yield _issuer_finding(
                policy,
                issuer,
                "issuer-audiences-broad",
                WARNING,
                "audiences",
                f"{len(issuer.audiences)} audiences accepted: tokens meant for other systems "
                "are exchanged too",
                "accept only the audience(s) that name this mesh",
            )
        legacy = sorted(a for a in issuer.algorithms if a.startswith("RS"))
        if legacy:
            yield _issuer_finding(
                policy,
                issuer,
                "issuer-algorithm-weak",
                INFO,
                "algorithms",
                f"{', '.join(legacy)} (RSA PKCS#1 v1.5) accepted",
                "prefer ES256, EdDSA or PS256 where the issuer offers them",
            )


def rule_many_issuers(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Rules that accept tokens from more than one issuer."""
    for rule in policy.rules:
        if len(rule.issuers) > 1:
            yield _finding(
                WARNING,
                "rule-many-issuers",
                policy,
                rule,
                "match.issuers",
                f"accepts tokens from {len(rule.issuers)} issuers",
                "split the rule per issuer, or keep only the issuer its callers use",
            )


def purpose_vague(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Purposes too short to say why the exchange exists."""
    for rule in policy.rules:
        if len(rule.purpose.split()) < 3:
            yield _finding(
                WARNING,
                "purpose-missing",
                policy,
                rule,
                "purpose",
                f"{rule.purpose!r} does not say why the exchange exists",
                "write who calls what, for which user-visible feature",
            )


def workloads_broad(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Caller patterns spanning a trust domain or every namespace; too many callers."""
    for rule in policy.rules:
        for text in rule.workloads:
            if "*" in text and _literal_prefix(text) < 2:
                yield _finding(
                    WARNING,
                    "workloads-broad",
                    policy,
                    rule,
                    "match.workloads",
                    f"{text!r} matches a whole trust domain or every namespace",
                    "name the calling workloads, or at least one namespace",
                )
        if len(rule.workloads) > MAX_WORKLOADS_PER_RULE:
            yield _finding(
                WARNING,
                "workloads-broad",
                policy,
                rule,
                "match.workloads",
                f"{len(rule.workloads)} callers share one rule",
                "give each calling application its own rule and purpose",
            )


def _literal_prefix(pattern: str) -> int:
    """Literal path segments before the first wildcard: fewer than two (``/ns/<name>``) means
    the pattern spans every namespace or the whole trust domain."""
    count = 0
    for part in pattern[len("spiffe://") :].split("/")[1:]:
        if part in ("*", "**"):
            break
        count += 1
    return count


def exchange_path_shared(policy: Policy, raw: Any) -> Iterator[Finding]:
    """One caller pattern that exchanges into several audiences."""
    audiences: dict[str, set[str]] = defaultdict(set)
    owner: dict[str, Rule] = {}
    for rule in policy.rules:
        for text in rule.workloads:
            if "*" in text:
                audiences[text].add(rule.grant.audience)
                owner.setdefault(text, rule)
    for text, auds in audiences.items():
        if len(auds) > 1:
            yield _finding(
                WARNING,
                "exchange-path-shared",
                policy,
                owner[text],
                "match.workloads",
                f"{text!r} may exchange into {len(auds)} audiences: one path serves many apps",
                "name each application's workloads in the rules for its own audience",
            )


def _raw_line(raw: Any, *keys: str) -> int | None:
    """The line of a nested key in the raw document, or of the deepest mapping found."""
    node, line = raw, None
    for key in keys:
        if not isinstance(node, yamlsrc.Located):
            break
        line = node.line_of(key)
        node = node.get(key)
    return line


def xfcc_hops(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Proxies trusted to vouch for callers through XFCC."""
    if policy.xfcc_trusted_hops:
        yield Finding(
            INFO,
            "xfcc-trusted",
            _shared_file(policy),
            _raw_line(raw, "workloads", "xfcc", "trustedHops"),
            None,
            "workloads.xfcc.trustedHops",
            f"{len(policy.xfcc_trusted_hops)} hop(s) may vouch for callers through XFCC",
            "make sure those proxies overwrite (SANITIZE_SET/APPEND_FORWARD) client XFCC",
        )


def rules_overlap(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Pairs of rules one request could match both of, found in the compiled table. The
    compiler refused the equally specific ones; these it resolves by specificity."""
    index = {rule.id: position for position, rule in enumerate(policy.rules)}
    hosts: dict[str, int] = {}
    for rule in policy.rules:
        hosts.setdefault(rule.host, len(hosts))
    pairs = [
        (a, b) if index[a.id] < index[b.id] else (b, a) for a, b in overlapping_rules(policy.table)
    ]
    # Host by host, then in rule order: the order a reader of the policy meets them in.
    pairs.sort(key=lambda pair: (hosts[pair[0].host], index[pair[0].id], index[pair[1].id]))
    for earlier, later in pairs:
        yield _finding(
            WARNING,
            "rules-overlap",
            policy,
            later,
            "match",
            f"overlaps rule {earlier.id!r}; the compiler picks the more specific path or "
            "workload, which a reader may not expect",
            "make the rules disjoint so each request has one obvious rule",
        )


def shadow_mode(policy: Policy, raw: Any) -> Iterator[Finding]:
    """The policy, or a rule, in shadow mode (not enforced)."""
    if policy.shadow:
        yield Finding(
            WARNING,
            "shadow-mode",
            _shared_file(policy),
            _raw_line(raw, "mode"),
            None,
            "mode",
            "the whole policy is in shadow mode: nothing is enforced, every request passes",
            "use shadow mode only during a rollout; set mode: enforce after",
        )
    for rule in policy.rules:
        if rule.shadow:
            yield _finding(
                INFO,
                "shadow-mode",
                policy,
                rule,
                "mode",
                "in shadow mode: requests it matches pass with their original credentials",
                "set mode: enforce once the decision log shows what you expect",
            )


def reexchange(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Rules that accept tokens this exchange minted."""
    for rule in policy.rules:
        if rule.reexchange:
            yield _finding(
                INFO,
                "reexchange-enabled",
                policy,
                rule,
                "reexchange",
                "accepts tokens this exchange minted (delegation chains grow)",
                "allow re-exchange only where a service must call onward for the user",
            )


def transaction_tokens(policy: Policy, raw: Any) -> Iterator[Finding]:
    """Where Txn-Tokens are valid, and the inner hops that send them on unchanged."""
    exchange = policy.exchange
    if exchange.transaction_tokens:
        yield Finding(
            INFO,
            "txn-trust-domain",
            _shared_file(policy),
            _raw_line(raw, "exchange", "trustDomain"),
            None,
            "exchange.trustDomain",
            f"Txn-Tokens minted here are valid in all of {exchange.trust_domain}: every "
            "sidecar there with these keys takes them on a txnToken rule",
            "name the domain whose sidecars share this exchange's keys, and no wider",
        )
    for rule in policy.rules:
        if rule.txn == "pass":
            yield _finding(
                INFO,
                "txn-pass",
                policy,
                rule,
                "txnToken",
                "sends the Txn-Token on as received: it stays bound to the caller, so the "
                "service cannot call onward with it through a checking sidecar",
                "use txnToken: replace where the service calls further services",
            )


def rule_windows(policy: Policy, options: LintOptions) -> Iterator[Finding]:
    """Temporary grants that are not temporary (a window longer than the limit) or that are
    over (a rule whose window has passed matches nothing and should go)."""
    now = time.time() if options.now is None else options.now
    limit = options.max_window_days * 86400
    for rule in policy.rules:
        until = rule.active_until
        if until is None:
            continue
        if until <= now:
            yield _finding(
                WARNING,
                "rule-window-passed",
                policy,
                rule,
                "active.until",
                "its window has passed: the rule matches nothing any more",
                "delete the rule, or move active.until if the grant was extended on purpose",
            )
            continue
        start = max(now, rule.active_from) if rule.active_from is not None else now
        days = (until - start) / 86400
        if until - start > limit:
            yield _finding(
                WARNING,
                "rule-window-long",
                policy,
                rule,
                "active.until",
                f"a window of {days:.0f} days (more than {options.max_window_days}) is not a "
                "temporary grant",
                "end the window sooner, or make the rule permanent and review it as such",
            )


def rules_empty(policy: Policy, raw: Any) -> Iterator[Finding]:
    """A policy without rules: it loads, and then denies every request."""
    if not policy.rules:
        yield Finding(
            WARNING,
            "rules-empty",
            _shared_file(policy),
            _raw_line(raw, "rules"),
            None,
            "rules",
            "the policy has no rules: every request would be denied (no_rule)",
            "add the exchange paths this sidecar should allow, or do not deploy it yet",
        )


CHECKS: tuple[Check, ...] = (
    rules_empty,
    audience_not_single_system,
    audience_shared,
    ttl_long,
    max_ttl_implicit,
    scope_catch_all,
    grant_wider_than_require,
    issuer_checks,
    rule_many_issuers,
    purpose_vague,
    workloads_broad,
    exchange_path_shared,
    xfcc_hops,
    rules_overlap,
    shadow_mode,
    reexchange,
    transaction_tokens,
)
