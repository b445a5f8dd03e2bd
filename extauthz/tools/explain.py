"""``extauthz explain``: the phase-by-phase trace of one decision, for humans.

The decision itself comes from ``core.decide``, the function the server runs; this module only
adds the narrative around it: what the token claims to be, which key would verify it, and for
every rule why it was or was not the one.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extauthz.decision import paths
from extauthz.decision.authenticate import presented
from extauthz.decision.authorize import request_of
from extauthz.decision.jose import IssuerKeys, TokenFormatError, parse_compact
from extauthz.decision.model import SELF_ISSUER_ID, Rule, Snapshot, WorkloadPattern, normalise_host
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Deny


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    token: dict[str, Any]
    caller: str
    request: dict[str, Any]
    candidates: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "decision": d.verdict,
            "reason": d.reason.code,
            "http_status": d.reason.http_status,
            "detail": d.detail or None,
            "shadow": d.shadow,
            "rule": d.rule.id if d.rule else None,
            "token": self.token,
            "caller": self.caller,
            "request": self.request,
            "candidates": self.candidates,
            "claims": dict(d.claims) if d.claims else None,
        }


def explain(inp: CheckInput, snap: Snapshot, now: float) -> Explanation:
    decision = decide(inp, snap, now, lambda: secrets.token_urlsafe(16))
    token = _token_facts(inp.headers, snap)
    found = request_of(inp.method, inp.host, inp.path, inp.headers)
    request = None if isinstance(found, Deny) else found
    issuer_id = token.get("issuer_id")
    caller = decision.caller or inp.principal
    req = {
        "method": inp.method,
        "host": inp.host,
        "path": inp.path,
        "normalised_host": normalise_host(inp.host),
        "normalised_path": request.path if request else None,
    }
    candidates = []
    if request is not None:
        picked = decision.rule.id if decision.rule else None
        for rule in snap.policy.rules:
            misses = why_not(
                rule, request.host, request.method, request.segments, caller, issuer_id, now
            )
            if misses:
                verdict = "passed over"
            elif rule.id == picked:
                verdict = "picked"
            else:
                verdict = "matches, but a more specific rule was picked"
            entry: dict[str, Any] = {"rule": rule.id, "verdict": verdict, "because": misses}
            if rule.claims and decision.subject is not None:
                params = rule.path_params(request.segments)
                entry["conditions"] = [
                    {"condition": c.text, "holds": c.holds(decision.subject.claims, params)}
                    for c in rule.claims
                ]
            candidates.append(entry)
    return Explanation(decision, token, caller, req, candidates)


def _token_facts(headers: Mapping[str, str], snap: Snapshot) -> dict[str, Any]:
    """What the token says about itself, read without trusting it (the decision verifies)."""
    token, where = presented(headers, snap.policy.exchange)
    if not isinstance(token, str):
        return {"present": where in headers, "header": where}
    try:
        jws = parse_compact(token)
    except TokenFormatError as exc:
        return {"present": True, "malformed": str(exc)}
    header, claims = jws.header, jws.claims
    facts: dict[str, Any] = {
        "present": True,
        "header": where,
        "alg": header.get("alg"),
        "kid": header.get("kid"),
        "typ": header.get("typ"),
        "iss": claims.get("iss"),
        "sub": claims.get("sub"),
        "aud": claims.get("aud"),
        "scope": claims.get("scope"),
        "exp": claims.get("exp"),
    }
    iss = claims.get("iss")
    if where != "authorization" and iss is None:
        iss = snap.policy.exchange.issuer  # a Txn-Token without iss is verified as ours
    if iss == snap.policy.exchange.issuer:
        facts["issuer_id"] = SELF_ISSUER_ID
        keys: IssuerKeys | None = snap.own_keys
    else:
        trusted = snap.policy.issuers_by_iss.get(iss) if isinstance(iss, str) else None
        facts["issuer_id"] = trusted.id if trusted else None
        keys = snap.issuer_keys.get(trusted.id) if trusted else None
    alg, kid = header.get("alg"), header.get("kid")
    if keys is not None and isinstance(alg, str) and (kid is None or isinstance(kid, str)):
        facts["keys_tried"] = [k.kid for k in keys.candidates(kid, alg)]
    return facts


def why_not(
    rule: Rule,
    host: str,
    method: str,
    segments: paths.Segments,
    caller: str,
    issuer_id: str | None,
    now: float | None = None,
) -> list[str]:
    """Every reason ``rule`` does not match; empty when it matches."""
    misses = []
    if now is not None and not rule.active_at(now):
        misses.append(f"outside its active window ({_window_text(rule)})")
    if rule.host != host:
        misses.append(f"host {host!r} is not {rule.host!r}")
    if method not in rule.methods:
        misses.append(f"method {method} is not in {sorted(rule.methods)}")
    if not any(paths.template_matches(paths.parse_template(t), segments) for t in rule.paths):
        misses.append(f"path {paths.join(segments)} matches none of {list(rule.paths)}")
    if not any(_workload_matches(w, caller) for w in rule.workloads):
        misses.append(f"caller {caller} is not among {list(rule.workloads)}")
    allowed = set(rule.issuers) | ({SELF_ISSUER_ID} if rule.reexchange else set())
    if issuer_id not in allowed:
        misses.append(f"token issuer {issuer_id or '(none)'} is not among {sorted(allowed)}")
    return misses


def _window_text(rule: Rule) -> str:
    def when(value: int | None) -> str:
        if value is None:
            return "open"
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return f"from {when(rule.active_from)} until {when(rule.active_until)}"


def _workload_matches(selector: str, caller: str) -> bool:
    if "*" not in selector:
        return selector == caller
    return WorkloadPattern.parse(selector).matches(caller)


def render(exp: Explanation) -> str:
    d = exp.decision
    t = exp.token
    lines = [
        f"request    {exp.request['method']} {exp.request['host']}{exp.request['path']}",
        f"           normalised: host {exp.request['normalised_host']}, "
        f"path {exp.request['normalised_path'] or '(cannot be normalised safely)'}",
        "",
        "1 authenticate",
    ]
    header = t.get("header", "authorization")
    if not t.get("present"):
        lines.append("   no bearer token")
    elif "malformed" in t:
        lines.append(f"   token is malformed: {t['malformed']}")
    elif "alg" not in t:
        shape = "'Bearer <token>'" if header == "authorization" else "compact JWS"
        lines.append(f"   {header} is not exactly one {shape}")
    else:
        lines.append(f"   token in {header}: alg {t['alg']}, kid {t['kid']}, typ {t['typ']}")
        lines.append(f"   iss {t['iss']} -> trusted issuer {t.get('issuer_id') or '(none)'}")
        tried = t.get("keys_tried")
        if tried is not None:
            lines.append(f"   keys matching kid and alg: {', '.join(map(str, tried)) or '(none)'}")
        lines.append(f"   sub {t['sub']}, aud {t['aud']}, scope {t['scope']!r}, exp {t['exp']}")
    lines += ["", "2 identify", f"   caller {exp.caller or '(none)'}"]
    lines += ["", "3 authorize"]
    for c in exp.candidates:
        lines.append(f"   {c['rule']}: {c['verdict']}")
        for miss in c["because"]:
            lines.append(f"      - {miss}")
        for condition in c.get("conditions", []):
            mark = "holds" if condition["holds"] else "does not hold"
            lines.append(f"      claim {condition['condition']}: {mark}")
    if not exp.candidates:
        lines.append("   (no rule was considered)")
    lines += ["", "4 mint"]
    if d.claims:
        for key, value in d.claims.items():
            lines.append(f"   {key}: {value}")
    elif d.passthrough:
        lines.append("   nothing minted: the Txn-Token goes on as received (txnToken: pass)")
    else:
        lines.append("   nothing minted")
    verdict = d.verdict
    rule = f", rule {d.rule.id}" if d.rule else ""
    shadow = " (shadow: not enforced, request passes untouched)" if d.shadow else ""
    detail = f" - {d.detail}" if d.detail else ""
    outcome = f"{verdict} ({d.reason.code}, HTTP {d.reason.http_status})"
    lines += ["", f"decision   {outcome}{rule}{shadow}{detail}"]
    return "\n".join(lines)
