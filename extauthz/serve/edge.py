"""The protobuf boundary: Envoy's CheckRequest in, our CheckResponse out.

Only this module (and the server that calls it) knows Envoy's wire types. It never decides
anything: it translates, and turns every failure into a deny that Envoy will enforce.
"""

from __future__ import annotations

import functools
import json
from urllib.parse import unquote

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.decision.pipeline import CheckInput, Decision
from extauthz.decision.reasons import Deny, Reason

# Envoy's own defaults are lower (100 headers, 60 KiB); these bound what we parse even when an
# Envoy is configured more generously.
MAX_HEADERS = 200
MAX_HEADER_BYTES = 64 * 1024


def check_input(request: external_auth_pb2.CheckRequest) -> CheckInput | Deny:
    """The plain values of a CheckRequest, or a deny when it carries more headers (or header
    bytes) than we are willing to look at."""
    attrs = request.attributes
    http = attrs.request.http
    headers: dict[str, str] = dict(http.headers)
    if not headers and len(http.header_map.headers):
        # encode_raw_headers: repeated headers arrive separately; join them like Envoy does,
        # so "two Authorization headers" looks the same either way (and is refused).
        for hv in http.header_map.headers:
            value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
            key = hv.key.lower()
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    if len(headers) > MAX_HEADERS:
        return Deny(Reason.REQUEST_TOO_LARGE, f"{len(headers)} headers")
    if sum(len(k) + len(v) for k, v in headers.items()) > MAX_HEADER_BYTES:
        return Deny(Reason.REQUEST_TOO_LARGE, "header bytes over the limit")
    cert = attrs.source.certificate
    return CheckInput(
        method=http.method,
        host=http.host,
        path=http.path,
        headers=headers,
        principal=attrs.source.principal,
        peer_certificate=_peer_pem(cert) if cert else "",
        # x-request-id, as the HTTP front reads it and the upstream receives it, so a decision
        # log line joins the request everywhere; Envoy's stream id when there is none.
        request_id=headers.get("x-request-id") or http.id,
    )


def recorded_check_input(text: str) -> CheckInput | Deny:
    """The input of a CheckRequest recorded as protobuf JSON (``explain --request``). Unknown
    fields are an error: a misspelt field would replay another request than the one meant."""
    try:
        message = json_format.Parse(text, external_auth_pb2.CheckRequest())
    except json_format.ParseError as exc:
        reason = " ".join(str(exc).split())  # protobuf's message spans lines
        raise ValueError(f"not a CheckRequest in protobuf JSON: {reason}") from exc
    return check_input(message)


@functools.lru_cache(maxsize=1024)  # the same certificate arrives on every request of a peer
def _peer_pem(url_encoded: str) -> str:
    return unquote(url_encoded)


# --- the answer, encoded -----------------------------------------------------------------------
#
# gRPC would build and serialise a CheckResponse message per check (about 80 us here). An
# answer is the same bytes for every check of a rule but the token and its jti, so the parts
# are encoded once and joined: protobuf's wire format is a sequence of fields, and a message
# field is its tag, its length and its bytes. ``check_response`` parses the same bytes back,
# for the tools and the tests, so what they read is what Envoy receives.


def _length(n: int) -> bytes:
    """A length as a protobuf varint; answers stay far below the three-byte lengths."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# The tag of a length-delimited field (wire type 2) for field numbers 1 to 5.
_TAG = {number: bytes((number << 3 | 2,)) for number in range(1, 6)}


def _field(number: int, payload: bytes) -> bytes:
    return _TAG[number] + _length(len(payload)) + payload


def _text(number: int, text: str) -> bytes:
    return _field(number, text.encode("utf-8"))


def _entry(key: str, value: str) -> bytes:
    """One ``Struct.fields`` entry (field 1: key, 2: Value) with a ``string_value`` (3)."""
    return _field(1, _text(1, key) + _field(2, _text(3, value)))


# CheckResponse: status 1, denied_response 2, ok_response 3, dynamic_metadata 4.
# OkHttpResponse: headers 2 (HeaderValueOption: header 1 (HeaderValue: key 1, value 2),
# append 2), headers_to_remove 5.
_STATUS_OK = _field(1, b"")  # google.rpc.Status with code 0 (OK)
# append=false, sent as an empty BoolValue: Envoy ignores append_action on OkHttpResponse
# headers, and only an explicit append=false overwrites instead of adding a second value.
_APPEND_FALSE = _field(2, b"")


@functools.lru_cache(maxsize=4096)
def _allow_parts(header: str, strip: tuple[str, ...], rule: str) -> tuple[bytes, bytes, bytes]:
    """(HeaderValue key field, headers_to_remove fields, the metadata's fixed entries)."""
    removals = b"".join(_text(5, name) for name in strip)
    return _text(1, header), removals, _entry("reason", Reason.ALLOWED.code) + _entry("rule", rule)


def encode_response(decision: Decision, decision_id: str = "") -> bytes:
    """The CheckResponse for ``decision``, serialised; ``decision_id`` goes into the dynamic
    metadata when given."""
    own = _entry("decision_id", decision_id) if decision_id else b""
    rule = decision.rule.id if decision.rule is not None else ""
    if decision.allowed and decision.token and not decision.shadow:
        key, removals, fixed = _allow_parts(decision.header, decision.strip_headers, rule)
        value = _header_value(decision)
        option = _field(1, key + _text(2, value)) + _APPEND_FALSE
        ok = _field(2, option) + removals
        return _STATUS_OK + _field(3, ok) + _field(4, fixed + _minted_entries(decision) + own)
    if decision.allowed and decision.passthrough and not decision.shadow:
        # An inner hop's Txn-Token goes on as received; the other credentials do not.
        _, removals, fixed = _allow_parts(decision.header, decision.strip_headers, rule)
        meta = fixed + _minted_entries(decision) + own
        return _STATUS_OK + _field(3, removals) + _field(4, meta)
    if decision.shadow:
        # Shadow mode: the decision is logged, the request goes upstream as it came.
        meta = _entry("reason", decision.reason.code) + _entry("shadow", "true")
        if rule:
            meta += _entry("rule", rule)
        return _STATUS_OK + _field(3, b"") + _field(4, meta + _minted_entries(decision) + own)
    # A deny is encoded once per reason and rule; its id follows as a second dynamic_metadata
    # field, which a protobuf parser merges into the first (Struct's fields are a map).
    tail = _field(4, own) if own else b""
    if decision.allowed:
        # An allow without a token is a bug; never forward the broad credential because of it.
        return encode_deny(Reason.INTERNAL_ERROR) + tail
    return encode_deny(decision.reason, rule) + tail


def _minted_entries(decision: Decision) -> bytes:
    claims = decision.claims
    if claims is None:
        subject = decision.subject
        txn = subject.txn if decision.passthrough and subject is not None else None
        return _entry("txn", txn) if txn is not None else b""
    out = _entry("jti", str(claims.get("jti", "")))
    if "txn" in claims:
        out += _entry("txn", str(claims["txn"]))
    return out


def _header_value(decision: Decision) -> str:
    assert decision.token is not None
    if decision.header == "authorization":
        return "Bearer " + decision.token
    return decision.token


@functools.lru_cache(maxsize=4096)
def encode_deny(reason: Reason, rule: str = "") -> bytes:
    """A deny depends on its reason and rule only, so each is encoded once."""
    meta = struct_pb2.Struct()
    meta.update({"reason": reason.code, **({"rule": rule} if rule else {})})
    return bytes(deny_response(reason, meta).SerializeToString())


def check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    """The CheckResponse Envoy receives for ``decision``, as a message."""
    return external_auth_pb2.CheckResponse.FromString(encode_response(decision))


def _option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append=wrappers_pb2.BoolValue(value=False),
    )


def deny_response(
    reason: Reason, metadata: struct_pb2.Struct | None = None
) -> external_auth_pb2.CheckResponse:
    headers = [_option("content-type", "application/json"), _option("cache-control", "no-store")]
    if reason.challenge.value:
        headers.append(_option("www-authenticate", reason.challenge.value))
    if reason.http_status == 401:
        grpc_code = code_pb2.UNAUTHENTICATED
    elif reason.http_status >= 500:
        grpc_code = code_pb2.UNAVAILABLE
    else:
        grpc_code = code_pb2.PERMISSION_DENIED
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=reason.http_status),
        headers=headers,
        body=json.dumps({"error": reason.code}),
    )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code),
        denied_response=denied,
        dynamic_metadata=metadata if metadata is not None else struct_pb2.Struct(),
    )
