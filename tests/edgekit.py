"""In-process round trips through either front, as Envoy drives them (imported as ``edgekit``).

A ``Request`` is what the client sent, in plain values: method, ``:authority``, ``:path``, the
header fields, the SPIFFE ID of the client certificate's URI SAN and the certificate's PEM.
``round_trip(front, request, snapshot)`` turns it into that front's wire request the way Envoy
1.40 with the shipped bootstrap builds it, runs the edge's parse, ``decide()`` and the edge's
answer, and applies the answer the way Envoy does, into one neutral ``Result``: allowed or not,
the status the client gets, what is set on and removed from the upstream request, what the
upstream finally receives, the client's headers and body on a deny, and the injected token.

What Envoy sends each front:

- gRPC (``envoy.yaml``): a CheckRequest with ``source.principal`` (the URI SAN),
  ``source.certificate`` (the URL-encoded PEM, ``include_peer_certificate``), and every header
  in ``http.headers`` with repeated names joined by ``,`` (or one by one in ``header_map``,
  ``encode_raw_headers``), pseudo-headers included. ``forward_client_cert_details: SANITIZE``
  drops a client's ``x-forwarded-client-cert``; ``forward_xfcc=True`` models an Envoy that
  forwards it unchanged instead (``FORWARD_ONLY``, the one setting under which
  ``workloads.xfcc.trustedHops`` means anything).
- HTTP (``envoy-http.yaml``): the original method, target ``/check`` + the original path
  (query included), ``host`` = the original authority, and only ``authorization``,
  ``txn-token``, ``x-forwarded-client-cert``, ``x-request-id`` and ``traceparent``, repeated
  lines joined with ``,``. The XFCC is one element the local Envoy sets (``SANITIZE_SET``,
  ``uri: true``):
  ``By=<its own URI SAN>;Hash=<hex SHA-256 of the client certificate DER>;URI=<the client's
  URI SAN>``, unquoted as Envoy writes it; whatever XFCC the client sent is gone.

The header fields and the path of a ``Request`` are those Envoy holds once its codec and path
normalisation are done (it trims whitespace around values, resolves dot segments and refuses
escaped slashes before ext_authz runs); what the real codec does to a raw request is covered
through the real Envoy (``test_attacks_envoy.py``, ``test_e2e.py``), not modelled here.

How Envoy applies the answer: gRPC, status OK allows (``ok_response.headers`` set, or added
when ``append`` is true, then ``headers_to_remove`` removed), any other status denies with the
``denied_response`` (403 when it names no status). HTTP, 200 allows (the headers that
``allowed_upstream_headers`` names are set upstream, then those listed in
``x-envoy-auth-headers-to-remove`` removed), a 5xx is a failed check (``status_on_error``
503, Envoy's own empty body), any other status denies with our status, body and the headers
``allowed_client_headers`` names. Envoy never removes pseudo-headers or ``host`` this way.
A header mutation that ``validate_mutations`` would refuse fails the round trip outright.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import corekit as k
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from frontkit import joined

from extauthz.decision.authenticate import SubjectCache
from extauthz.decision.jose import parse_compact
from extauthz.decision.model import Snapshot
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Deny, Reason
from extauthz.serve import edge, http_edge

__all__ = [
    "ENVOY_ID",
    "FRONTS",
    "REMOVE_HEADER",
    "XFCC",
    "HttpResponse",
    "MalformedResponse",
    "Request",
    "Result",
    "cert_hash",
    "envoy_xfcc",
    "expected_status",
    "grpc_wire",
    "http_wire",
    "parse_one",
    "parse_response",
    "passed",
    "refused",
    "request",
    "round_trip",
    "send",
]

FRONTS = ("grpc", "http")
# The local Envoy's own certificate URI SAN (the demo PKI's), the ``By`` of its XFCC element.
ENVOY_ID = "spiffe://cluster.local/ns/edge/sa/envoy"
XFCC = "x-forwarded-client-cert"
# envoy-http.yaml: authorization_request.allowed_headers (Envoy adds host itself) ...
HTTP_FORWARDED = ("authorization", "txn-token", XFCC, "x-request-id", "traceparent")
# ... and authorization_response.
ALLOWED_UPSTREAM = frozenset({"authorization", "txn-token"})
ALLOWED_CLIENT = frozenset({"content-type", "cache-control", "www-authenticate"})
# Envoy adds these to allowed_client_headers by itself.
ALWAYS_CLIENT = frozenset({"www-authenticate", "location"})
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
STATUS_ON_ERROR = 503
# Envoy does not remove these through an authorization answer.
NEVER_REMOVED = frozenset({"host"})


# --- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as the client sent it (after Envoy's codec and path normalisation)."""

    method: str = "GET"
    host: str = k.HOST  # :authority
    path: str = "/v1/customers/42"  # :path, query included
    headers: tuple[tuple[str, str], ...] = ()  # the fields in order; a name may repeat
    caller: str | None = k.ORDERS  # the client certificate's URI SAN; None: it has none
    cert: str | None = None  # that certificate's PEM; None: not sent (no cnf binding)
    request_id: str = "edgekit-request"  # Envoy's x-request-id when the client sent none

    def fields(self, name: str) -> list[str]:
        """The values of every field called ``name`` (any case), in order."""
        return [v for n, v in self.headers if n.lower() == name]


def request(
    token: str | None = None,
    *,
    authorization: str | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    method: str = "GET",
    host: str = k.HOST,
    path: str = "/v1/customers/42",
    principal: str | None = k.ORDERS,
    cert: str | None = None,
) -> Request:
    """A ``Request`` spelt like ``corekit.request``/``World.ask``: ``token`` as a bearer token,
    or the whole ``authorization`` value as given, beside ``headers``."""
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    if authorization is not None:
        pairs.append(("authorization", authorization))
    elif token is not None:
        pairs.append(("authorization", f"Bearer {token}"))
    return Request(method, host, path, tuple(pairs), principal, cert or None)


def _request_id(req: Request) -> str:
    # Envoy keeps a client's x-request-id (measured with the shipped bootstrap).
    sent = req.fields("x-request-id")
    return sent[0] if sent else req.request_id


def cert_hash(pem: str) -> str:
    """XFCC ``Hash``: the hex SHA-256 of the certificate's DER."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def envoy_xfcc(req: Request) -> str:
    """The one element Envoy's SANITIZE_SET writes for this client (envoy-http.yaml)."""
    parts = [f"By={ENVOY_ID}"]
    if req.cert:
        parts.append(f"Hash={cert_hash(req.cert)}")
    parts.append(f"URI={req.caller or ''}")  # the key is there even with no URI SAN
    return ";".join(parts)


def grpc_wire(
    req: Request, *, forward_xfcc: bool = False, raw_headers: bool = False
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy sends for ``req`` (envoy.yaml)."""
    pairs: list[tuple[str, str]] = [
        (":authority", req.host),
        (":path", req.path),
        (":method", req.method),
        (":scheme", "https"),
    ]
    for name, value in req.headers:
        lower = name.lower()
        if lower == XFCC and not forward_xfcc:
            continue  # SANITIZE
        if lower in ("x-request-id", "x-forwarded-proto"):
            continue  # Envoy's own, below
        pairs.append((lower, value))
    pairs += [("x-forwarded-proto", "https"), ("x-request-id", _request_id(req))]
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1234567890",  # Envoy's stream id
        method=req.method,
        host=req.host,
        path=req.path,
        scheme="https",
        protocol="HTTP/1.1",
    )
    if raw_headers:  # encode_raw_headers: one entry per field, values as bytes
        for name, value in pairs:
            http.header_map.headers.append(
                base_pb2.HeaderValue(key=name, raw_value=value.encode("utf-8", "surrogatepass"))
            )
    else:
        http.headers.update(joined(pairs))
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                principal=req.caller or "",
                certificate=quote(req.cert, safe="") if req.cert else "",
            ),
            destination=attribute_context_pb2.AttributeContext.Peer(principal=ENVOY_ID),
            request=attribute_context_pb2.AttributeContext.Request(http=http),
        )
    )


def http_wire(req: Request) -> http_edge.HttpCheck:
    """The HttpCheck the HTTP front collects from Envoy's authorization request for ``req``
    (envoy-http.yaml): Host, then each allowed header in one line, repeats joined by Envoy."""
    check = http_edge.HttpCheck(req.method, http_edge.PATH_PREFIX + req.path)
    check.add_header("host", req.host)
    sent = joined(req.headers)
    for name in HTTP_FORWARDED:
        if name == XFCC:
            value: str | None = envoy_xfcc(req)  # SANITIZE_SET: the client's XFCC is gone
        elif name == "x-request-id":
            value = _request_id(req)
        else:
            value = sent.get(name)
        if value is not None:
            check.add_header(name, value)
    return check


# --- HTTP/1.1 responses, strictly ---------------------------------------------------------------


class MalformedResponse(AssertionError):
    """Bytes that are not exactly one well-formed HTTP/1.1 response."""


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9]{2}) ([\x21-\x7e][\x20-\x7e]*)")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # lower-case field names only
_VALUE = re.compile(rb"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]  # in order; names lower-case
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of the one field ``name``; a repeated field is malformed here."""
        values = [v for n, v in self.headers if n == name]
        if len(values) > 1:
            raise MalformedResponse(f"{name} repeated: {values!r}")
        return values[0] if values else None


def parse_response(data: bytes, *, head: bool = False) -> tuple[HttpResponse, bytes]:
    """The first response in ``data`` and the bytes after it. ``head``: it answers a HEAD
    request, so it carries no body whatever its content-length says. Strict: CRLF lines, a
    lower-case token before each ``:``, one space, a value without control characters or
    surrounding whitespace, exactly one content-length and no transfer-encoding."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise MalformedResponse(f"no end of the header section in {data[:200]!r}")
    lines = data[:end].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise MalformedResponse(f"a bare CR or LF in {data[:end]!r}")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise MalformedResponse(f"not an HTTP/1.1 status line: {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise MalformedResponse(f"not a header field: {line!r}")
        if not value.startswith(b" ") or _VALUE.fullmatch(value[1:]) is None:
            raise MalformedResponse(f"not a header value: {line!r}")
        headers.append((name.decode("ascii"), value[1:].decode("ascii")))
    response = HttpResponse(int(status.group(1)), tuple(headers), b"")
    if response.header("transfer-encoding") is not None:
        raise MalformedResponse("transfer-encoding in an answer")
    length = response.header("content-length")
    if length is None or not length.isdigit() or not length.isascii():
        raise MalformedResponse(f"content-length {length!r}")
    rest = data[end + 4 :]
    if head:
        return response, rest
    size = int(length)
    if len(rest) < size:
        raise MalformedResponse(f"body shorter than content-length {size}: {rest!r}")
    return HttpResponse(response.status, response.headers, rest[:size]), rest[size:]


def parse_one(data: bytes, *, head: bool = False) -> HttpResponse:
    """Exactly one response, nothing after it."""
    response, rest = parse_response(data, head=head)
    if rest:
        raise MalformedResponse(f"bytes after the response: {rest[:200]!r}")
    return response


# --- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One round trip, as Envoy applied the answer; the same shape for either front."""

    front: str
    request: Request
    decision: Decision  # what decide() (or the edge's own deny) said
    allowed: bool  # Envoy forwards the request upstream
    status: int  # on a deny, the status the client gets; 200 on an allow
    reason: str | None  # the reason code the answer reports (dynamic metadata)
    rule: str | None  # the rule id the answer reports
    upstream_set: Mapping[str, str] = field(default_factory=dict)
    upstream_removed: tuple[str, ...] = ()
    upstream: tuple[tuple[str, str], ...] | None = None  # what the upstream receives
    client_headers: Mapping[str, str] = field(default_factory=dict)  # on a deny
    body: bytes = b""  # on a deny, what the client reads
    token: str | None = None  # the token injected upstream
    wire_request: Any = None
    wire_response: Any = None

    def upstream_values(self, name: str) -> list[str]:
        return [v for n, v in self.upstream or () if n == name]


def expected_status(front: str, reason: Reason) -> int:
    """The status a client gets for a deny: ours, except that Envoy turns a 5xx answer of
    the HTTP service into a failed check (status_on_error)."""
    if front == "http" and reason.http_status >= 500:
        return STATUS_ON_ERROR
    return reason.http_status


def _forwarded(req: Request, front: str, forward_xfcc: bool) -> list[tuple[str, str]]:
    """The header fields Envoy sends upstream before applying an answer."""
    out: list[tuple[str, str]] = [("host", req.host)]
    for name, value in req.headers:
        lower = name.lower()
        if lower in ("x-request-id", "x-forwarded-proto"):
            continue
        if lower == XFCC and (front == "http" or not forward_xfcc):
            continue
        out.append((lower, value))
    if front == "http":
        out.append((XFCC, envoy_xfcc(req)))
    out += [("x-forwarded-proto", "https"), ("x-request-id", _request_id(req))]
    return out


_MUTATION_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_MUTATION_VALUE = re.compile(r"[\x20-\x7e\t]*")


def _valid_mutation(name: str, value: str) -> None:
    """What validate_mutations lets through; anything else would be a failed check."""
    if _MUTATION_NAME.fullmatch(name) is None or _MUTATION_VALUE.fullmatch(value) is None:
        raise AssertionError(f"Envoy would refuse the header mutation {name!r}: {value!r}")


def _apply(
    upstream: list[tuple[str, str]],
    sets: Sequence[tuple[str, str, bool]],
    removes: Sequence[str],
) -> tuple[dict[str, str], tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Envoy's order: set (or append) each header, then remove the listed ones."""
    done: dict[str, str] = {}
    for name, value, append in sets:
        _valid_mutation(name, value)
        if not append:
            upstream = [(n, v) for n, v in upstream if n != name]
        upstream.append((name, value))
        done[name] = value
    removed = tuple(n for n in removes if not n.startswith(":") and n not in NEVER_REMOVED)
    upstream = [(n, v) for n, v in upstream if n not in removed]
    return done, removed, tuple(upstream)


def _injected(decision: Decision, upstream_set: Mapping[str, str]) -> str | None:
    value = upstream_set.get(decision.header)
    if value is None:
        return None
    if decision.header == "authorization":
        assert value.startswith("Bearer "), value
        return value.removeprefix("Bearer ")
    return value


def _from_grpc(
    req: Request,
    decision: Decision,
    wire: external_auth_pb2.CheckRequest,
    answer: external_auth_pb2.CheckResponse,
    forward_xfcc: bool,
) -> Result:
    meta = answer.dynamic_metadata.fields
    result = Result(
        front="grpc",
        request=req,
        decision=decision,
        allowed=False,
        status=0,
        reason=meta["reason"].string_value if "reason" in meta else None,
        rule=meta["rule"].string_value if "rule" in meta else None,
        wire_request=wire,
        wire_response=answer,
    )
    if answer.status.code == 0:
        ok = answer.ok_response
        sets = [(h.header.key, h.header.value, h.append.value) for h in ok.headers]
        done, removed, upstream = _apply(
            _forwarded(req, "grpc", forward_xfcc), sets, list(ok.headers_to_remove)
        )
        return replace(
            result,
            allowed=True,
            status=200,
            upstream_set=done,
            upstream_removed=removed,
            upstream=upstream,
            token=_injected(decision, done),
        )
    denied = answer.denied_response
    client: dict[str, str] = {}
    for option in denied.headers:
        _valid_mutation(option.header.key, option.header.value)
        client[option.header.key.lower()] = option.header.value
    return replace(
        result,
        status=denied.status.code or 403,
        client_headers=client,
        body=b"" if req.method == "HEAD" else denied.body.encode("utf-8"),
    )


def _from_http(req: Request, decision: Decision, wire: http_edge.HttpCheck, raw: bytes) -> Result:
    answer = parse_one(raw, head=req.method == "HEAD")
    result = Result(
        front="http",
        request=req,
        decision=decision,
        allowed=False,
        status=answer.status,
        reason=answer.header(http_edge.REASON_HEADER),
        rule=answer.header(http_edge.RULE_HEADER),
        wire_request=wire,
        wire_response=answer,
    )
    if answer.status == 200:
        sets = [(n, v, False) for n, v in answer.headers if n in ALLOWED_UPSTREAM]
        listed = answer.header(REMOVE_HEADER) or ""
        removes = [n.strip().lower() for n in listed.split(",") if n.strip()]
        done, removed, upstream = _apply(_forwarded(req, "http", False), sets, removes)
        return replace(
            result,
            allowed=True,
            upstream_set=done,
            upstream_removed=removed,
            upstream=upstream,
            token=_injected(decision, done),
        )
    if answer.status >= 500:  # a failed check: Envoy's own 503, none of ours
        return replace(result, status=STATUS_ON_ERROR)
    client = {n: v for n, v in answer.headers if n in ALLOWED_CLIENT | ALWAYS_CLIENT}
    return replace(result, client_headers=client, body=answer.body)


def round_trip(
    front: str,
    req: Request,
    snap: Snapshot,
    *,
    now: float = k.NOW,
    new_id: Callable[[], str] | None = None,
    cache: SubjectCache | None = None,
    forward_xfcc: bool = False,
    raw_headers: bool = False,
) -> Result:
    """``req`` through ``front``: Envoy's wire request, the edge's parse, decide(), the edge's
    answer, and Envoy applying it. ``forward_xfcc``/``raw_headers`` are gRPC-side Envoy
    settings (FORWARD_ONLY, encode_raw_headers); the HTTP front's Envoy has neither."""
    ids = new_id or k.Ids()
    if front == "grpc":
        wire = grpc_wire(req, forward_xfcc=forward_xfcc, raw_headers=raw_headers)
        decision = _decide(edge.check_input(wire), snap, now, ids, cache)
        # The bytes the gRPC front sends, read back as Envoy reads them.
        answer = external_auth_pb2.CheckResponse.FromString(edge.encode_response(decision))
        return _from_grpc(req, decision, wire, answer, forward_xfcc)
    if front == "http":
        check = http_wire(req)
        decision = _decide(http_edge.check_input(check), snap, now, ids, cache)
        raw = http_edge.check_response(decision, head_only=req.method == "HEAD")
        return _from_http(req, decision, check, raw)
    raise ValueError(f"no front {front!r}")


def _decide(
    parsed: CheckInput | Deny,
    snap: Snapshot,
    now: float,
    ids: Callable[[], str],
    cache: SubjectCache | None,
) -> Decision:
    if isinstance(parsed, Deny):  # what Sidecar.check does with an edge's own deny
        return Decision(parsed.reason, parsed.detail)
    return decide(parsed, snap, now, ids, cache)


def send(
    world: k.World,
    front: str,
    token: str | None = None,
    *,
    authorization: str | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    now: float = k.NOW,
    forward_xfcc: bool = False,
    raw_headers: bool = False,
    **where: Any,
) -> Result:
    """``World.ask`` through a front: the same arguments, a ``Result``."""
    req = request(token, authorization=authorization, headers=headers, **where)
    return round_trip(
        front,
        req,
        world.snap,
        now=now,
        cache=world.cache,
        forward_xfcc=forward_xfcc,
        raw_headers=raw_headers,
    )


# --- what an attack must end in ---------------------------------------------------------------


def refused(result: Result, reason: Reason) -> None:
    """A deny for ``reason`` as the client sees it: nothing reaches the upstream, nothing was
    minted or injected, the documented status, body and challenge (where Envoy passes ours)."""
    decision = result.decision
    assert result.reason == reason.code, (result.front, result.reason, decision.detail)
    assert decision.reason is reason
    assert not result.allowed and result.upstream is None
    assert result.token is None and not result.upstream_set and not result.upstream_removed
    assert decision.token is None and decision.claims is None and not decision.shadow
    assert result.status == expected_status(result.front, reason)
    if result.status == STATUS_ON_ERROR and result.front == "http":
        assert result.body == b"" and not result.client_headers
        return
    if result.request.method != "HEAD":
        assert json.loads(result.body) == {"error": reason.code}
    assert result.client_headers.get("content-type") == "application/json"
    assert result.client_headers.get("www-authenticate") == (reason.challenge.value or None)
    if decision.rule is not None:
        assert result.rule == decision.rule.id


def passed(result: Result, rule_id: str) -> dict[str, Any]:
    """An enforced allow by ``rule_id``: exactly one minted token reaches the upstream, in the
    policy's header, the one decide() signed; no other credential header and nothing of the
    subject token does. Returns the token's claims."""
    decision = result.decision
    assert result.allowed, (result.front, result.reason, decision.detail)
    assert result.status == 200 and result.reason == "allowed" and result.rule == rule_id
    assert decision.allowed and not decision.shadow
    assert decision.rule is not None and decision.rule.id == rule_id
    assert result.token is not None and result.token == decision.token
    assert result.upstream_values(decision.header) == [result.upstream_set[decision.header]]
    for name in {"authorization", *decision.strip_headers} - {decision.header}:
        assert result.upstream_values(name) == [], (result.front, name)
    for value in result.request.fields("authorization"):
        subject = value.partition(" ")[2].strip()
        if len(subject) >= 16:
            assert all(subject not in v for _, v in result.upstream or ()), result.front
    claims = dict(parse_compact(result.token).claims)
    assert claims == dict(decision.claims or {})
    return claims
