"""The HTTP boundary: Envoy's HTTP authorization request in, our HTTP/1.1 answer out.

Envoy's ``http_service`` sends each check as a request with the original method, ``Host``
and path (behind ``path_prefix``), with only the headers the filter's ``allowed_headers``
names. The caller's identity is the one ``x-forwarded-client-cert`` element the local Envoy
set for the mTLS peer (``forward_client_cert_details: SANITIZE_SET``). A 200 allows, with the
minted token in a header Envoy copies upstream and the credential headers to remove in
``x-envoy-auth-headers-to-remove``; any other status denies, with our status, body and
``WWW-Authenticate``. Like ``edge`` for gRPC, this module translates and decides nothing.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from extauthz.decision.identity import parse_xfcc
from extauthz.decision.pipeline import CheckInput, Decision
from extauthz.decision.reasons import Deny, Reason
from extauthz.serve.edge import MAX_HEADER_BYTES, MAX_HEADERS

__all__ = ["PATH_PREFIX", "HttpCheck", "HttpEdge", "check_input", "check_response"]

# Envoy's ``http_service.path_prefix`` in envoy-http.yaml: every check's path starts with it,
# and anything else (``/readyz``) is not a check.
PATH_PREFIX = "/check"
XFCC = "x-forwarded-client-cert"
# Envoy turns these response headers into the filter's dynamic metadata
# (``dynamic_metadata_from_headers``), for its access log.
REASON_HEADER = "x-extauthz-reason"
RULE_HEADER = "x-extauthz-rule"
JTI_HEADER = "x-extauthz-jti"  # of the minted (or, in shadow mode, would-be) token
TXN_HEADER = "x-extauthz-txn"
DECISION_HEADER = "x-extauthz-decision"  # the decision's id, as in the decision log


@dataclass(slots=True)
class HttpCheck:
    """One parsed authorization request: what the front's HTTP parser collected."""

    method: str
    target: str  # the request target as received: PATH_PREFIX + the original path
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; repeats joined
    header_bytes: int = 0
    header_count: int = 0
    invalid: str = ""  # why the front could not parse the request, when it could not
    target_too_long: bool = False

    def add_header(self, name: str, value: str) -> None:
        """Keep a header line as Envoy's gRPC client would report it: repeated names joined
        with ``,``, so two ``Authorization`` lines are refused alike on both fronts."""
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > MAX_HEADERS or self.header_bytes > MAX_HEADER_BYTES:
            return  # counted, not kept: check_input denies it
        key = name.lower()
        known = self.headers.get(key)
        self.headers[key] = value if known is None else f"{known},{value}"


def check_input(check: HttpCheck) -> CheckInput | Deny:
    """The plain values of an authorization request, or a deny for one too large to look at
    or not addressed to the check path."""
    if check.invalid:
        return Deny(Reason.REQUEST_INVALID, check.invalid)
    if check.target_too_long:
        return Deny(Reason.REQUEST_TOO_LARGE, "request target over the limit")
    if check.header_count > MAX_HEADERS:
        return Deny(Reason.REQUEST_TOO_LARGE, f"{check.header_count} headers")
    if check.header_bytes > MAX_HEADER_BYTES:
        return Deny(Reason.REQUEST_TOO_LARGE, "header bytes over the limit")
    if not check.target.startswith(PATH_PREFIX + "/"):
        return Deny(Reason.PATH_INVALID, f"not a check: the path does not start {PATH_PREFIX}/")
    # The XFCC element describes the peer; it is not a hop chain for ``identify`` to read.
    principal, certificate, digest = _peer(check.headers.get(XFCC, ""))
    headers = {name: value for name, value in check.headers.items() if name != XFCC}
    return CheckInput(
        method=check.method,
        host=headers.get("host", ""),
        path=check.target[len(PATH_PREFIX) :],
        headers=headers,
        principal=principal,
        peer_certificate=certificate,
        request_id=headers.get("x-request-id", ""),
        peer_certificate_hash=digest,
        all_headers=False,
    )


@functools.lru_cache(maxsize=1024)  # one element per peer certificate, on every request
def _peer(xfcc: str) -> tuple[str, str, str]:
    """(URI, certificate PEM, hash) of the single XFCC element the local Envoy set; empty
    strings when there is not exactly one well-formed element with one URI, which leaves the
    caller unidentified (a deny in the identify phase)."""
    if not xfcc:
        return "", "", ""
    try:
        elements = parse_xfcc(xfcc)
    except ValueError:
        return "", "", ""
    if len(elements) != 1:
        return "", "", ""
    element = elements[0]
    uris, certs, hashes = (element.get(key, []) for key in ("uri", "cert", "hash"))
    if len(uris) != 1 or len(certs) > 1 or len(hashes) > 1:
        return "", "", ""
    return uris[0], unquote(certs[0]) if certs else "", hashes[0] if hashes else ""


# --- the answer -------------------------------------------------------------------------------

_TOKEN_ID = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")

_PHRASES = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_PHRASES.get(status, 'Status')}\r\n".encode("ascii")


def check_response(decision: Decision, head_only: bool = False, decision_id: str = "") -> bytes:
    """The whole HTTP/1.1 response for ``decision``. ``head_only``: the check was a HEAD
    request, whose answer carries no body. ``decision_id`` goes into a header that Envoy
    copies into its dynamic metadata."""
    rule = decision.rule.id if decision.rule else ""
    own = _id_line(DECISION_HEADER, decision_id)
    if decision.shadow:
        # Shadow mode: logged, not enforced; the request goes upstream as it came.
        return _shadow(decision.reason, rule) + _minted(decision) + own + b"\r\n"
    if decision.allowed and decision.passthrough:
        # An inner hop's Txn-Token goes on as received; the other credentials do not.
        return _pass_parts(decision.strip_headers, rule) + _minted(decision) + own + b"\r\n"
    if decision.allowed and decision.token:
        before, after = _allow_parts(decision.header, decision.strip_headers, rule)
        value = "Bearer " + decision.token if decision.header == "authorization" else decision.token
        return before + value.encode("ascii") + b"\r\n" + _minted(decision) + own + after
    if decision.allowed:
        # An allow without a token is a bug; never forward the broad credential because of it.
        return _with(deny_response(Reason.INTERNAL_ERROR, head_only=head_only), own)
    return _with(deny_response(decision.reason, rule, head_only), own)


def _with(response: bytes, line: bytes) -> bytes:
    """``response`` with one more header line (a deny is encoded once per reason and rule)."""
    if not line:
        return response
    end = response.index(b"\r\n\r\n") + 2
    return response[:end] + line + response[end:]


def _id_line(name: str, value: str) -> bytes:
    # Only values that cannot end the header line (ours are base64url); anything else is
    # left out rather than escaped.
    if value and _TOKEN_ID.fullmatch(value):
        return f"{name}: {value}\r\n".encode("ascii")
    return b""


@functools.lru_cache(maxsize=4096)
def _allow_parts(header: str, strip: tuple[str, ...], rule: str) -> tuple[bytes, bytes]:
    """An allow is the same bytes for every request of a rule but the token: built once."""
    lines = [_status_line(200).decode("ascii"), "content-length: 0\r\n"]
    if strip:
        lines.append(f"x-envoy-auth-headers-to-remove: {','.join(strip)}\r\n")
    lines.append(_metadata(Reason.ALLOWED, rule))
    return "".join(lines).encode("ascii") + f"{header}: ".encode("ascii"), b"\r\n"


@functools.lru_cache(maxsize=4096)
def _pass_parts(strip: tuple[str, ...], rule: str) -> bytes:
    lines = [_status_line(200).decode("ascii"), "content-length: 0\r\n"]
    if strip:
        lines.append(f"x-envoy-auth-headers-to-remove: {','.join(strip)}\r\n")
    lines.append(_metadata(Reason.ALLOWED, rule))
    return "".join(lines).encode("ascii")


@functools.lru_cache(maxsize=4096)
def _shadow(reason: Reason, rule: str) -> bytes:
    head = "content-length: 0\r\n" + _metadata(reason, rule)
    return _status_line(200) + head.encode("ascii")


def _minted(decision: Decision) -> bytes:
    """The minted token's ids, for Envoy's dynamic metadata (its access log)."""
    claims: Mapping[str, Any] | None = decision.claims
    if claims is None and decision.passthrough and decision.subject is not None:
        claims = {"txn": decision.subject.txn}
    if claims is None:
        return b""
    out = b""
    for name, key in ((JTI_HEADER, "jti"), (TXN_HEADER, "txn")):
        value = claims.get(key)
        if isinstance(value, str):
            out += _id_line(name, value)
    return out


@functools.lru_cache(maxsize=4096)
def deny_response(reason: Reason, rule: str = "", head_only: bool = False) -> bytes:
    """A deny: the gRPC front's status, body and ``WWW-Authenticate``. Envoy treats a 5xx
    answer as a failed check and sends its own ``status_on_error`` instead (still a deny)."""
    body = json.dumps({"error": reason.code}).encode("ascii")
    lines = [
        "content-type: application/json\r\n",
        "cache-control: no-store\r\n",
        f"content-length: {len(body)}\r\n",
    ]
    if reason.challenge.value:
        lines.append(f"www-authenticate: {reason.challenge.value}\r\n")
    lines.append(_metadata(reason, rule))
    head = _status_line(reason.http_status) + "".join(lines).encode("ascii") + b"\r\n"
    return head if head_only else head + body


def _metadata(reason: Reason, rule: str) -> str:
    line = f"{REASON_HEADER}: {reason.code}\r\n"
    return line + f"{RULE_HEADER}: {rule}\r\n" if rule else line


class HttpEdge:
    """HttpCheck in, response bytes out (the ``Edge`` of ``sidecar``)."""

    def parse(self, request: HttpCheck) -> CheckInput | Deny:
        return check_input(request)

    def request_id(self, request: HttpCheck) -> str:
        return request.headers.get("x-request-id", "")

    def respond(self, decision: Decision, decision_id: str = "") -> bytes:
        return check_response(decision, decision_id=decision_id)

    def internal_error(self) -> bytes:
        return deny_response(Reason.INTERNAL_ERROR)


class HeadEdge(HttpEdge):
    """For HEAD checks: the same answers without a body."""

    def respond(self, decision: Decision, decision_id: str = "") -> bytes:
        return check_response(decision, head_only=True, decision_id=decision_id)

    def internal_error(self) -> bytes:
        return deny_response(Reason.INTERNAL_ERROR, head_only=True)
