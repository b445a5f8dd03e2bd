"""One JSON line per decision. Built field by field from the Decision so that no token, key or
header value can reach it: there is no code path from a token string to this line.

Version 2 of the line adds, beside every field of version 1: the decision's own id (also in
Envoy's dynamic metadata), the policy revision and generation it was made under, the W3C trace
id, and for a request denied before it was read as a rule sees it, its method, host, path and
caller as they came.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import IO, Any

import orjson

from extauthz.decision.pipeline import CheckInput, Decision

VERSION = 2
# The request id is the request's x-request-id, which a client may choose: a line keeps no more
# of it than any id needs (a UUID is 36 characters). The same for a raw host and path.
MAX_REQUEST_ID = 128
MAX_RAW_HOST = 256
MAX_RAW_PATH = 1024
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE = "0" * 32


@dataclass(frozen=True, slots=True)
class Context:
    """What the server knows about a decision besides the Decision itself."""

    decision_id: str = ""
    policy_revision: str | None = None  # the first 16 hex digits of the policy's sha256
    policy_generation: int | None = None
    inp: CheckInput | None = None  # the request as the front read it, if it did


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None when there is no valid one."""
    if not traceparent:
        return None
    found = _TRACEPARENT.fullmatch(traceparent.strip())
    if found is None or found.group(1) == _NO_TRACE:
        return None
    return found.group(1)


def record(
    decision: Decision,
    latency_s: float,
    request_id: str,
    now: float,
    context: Context | None = None,
) -> dict[str, Any]:
    rule, subject, claims, request = (
        decision.rule,
        decision.subject,
        decision.claims,
        decision.request,
    )
    verdict = decision.verdict
    line: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now % 1 * 1000):03d}Z",
        "decision": verdict,
        "shadow": decision.shadow,
        "reason": decision.reason.code,
        "rule": rule.id if rule else None,
        "rule_file": rule.file or None if rule else None,
        "purpose": rule.purpose if rule else None,
        "caller": decision.caller,
        "sub": subject.sub if subject else None,
        "iss": subject.iss if subject else None,
        "aud": claims.get("aud") if claims else None,
        "scopes": claims.get("scope") if claims else None,
        "jti": claims.get("jti") if claims else None,
        "txn": claims.get("txn") if claims else (subject.txn if subject else None),
        "method": request.method if request else None,
        "host": request.host if request else None,
        "path": request.path if request else None,
        "request_id": request_id[:MAX_REQUEST_ID] or None,
        "detail": decision.detail or None,
        "latency_ms": round(latency_s * 1000, 3),
        "v": VERSION,
        "decision_id": None,
        "policy_revision": None,
        "policy_generation": None,
        "trace_id": None,
    }
    if context is None:
        return line
    inp = context.inp
    line["decision_id"] = context.decision_id or None
    line["policy_revision"] = context.policy_revision
    line["policy_generation"] = context.policy_generation
    if inp is not None:
        line["trace_id"] = trace_id(inp.headers.get("traceparent"))
        if request is None:
            # Denied before the request was read as a rule sees it: as it came, without the
            # query (which may carry anything) and cut to a sane length.
            line["method"] = inp.method[:16] or None
            line["host"] = inp.host[:MAX_RAW_HOST] or None
            line["path"] = inp.path.partition("?")[0][:MAX_RAW_PATH] or None
        if line["caller"] is None:
            line["caller"] = inp.principal or None
    return line


class DecisionLog:
    """Lines are written as decisions happen and flushed by ``flush()``, which the server calls
    a few times a second and at shutdown: a flush (a system call) per decision cost more than
    the rest of the log line. Each line is still written whole, in one call."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._dirty = False

    def write(
        self,
        decision: Decision,
        latency_s: float,
        request_id: str,
        now: float,
        context: Context | None = None,
    ) -> None:
        if self._stream is None:
            return
        line = record(decision, latency_s, request_id, now, context)
        # orjson: a twentieth of json.dumps's time for this line; UTF-8 kept as is.
        self._stream.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE).decode())
        self._dirty = True

    def flush(self) -> None:
        if self._stream is not None and self._dirty:
            self._dirty = False
            self._stream.flush()
