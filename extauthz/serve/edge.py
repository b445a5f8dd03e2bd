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

_APPEND_FALSE = wrappers_pb2.BoolValue(value=False)


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
        request_id=http.id,
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


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy ignores append_action on OkHttpResponse.headers; only append=false overwrites.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append=_APPEND_FALSE
    )


def _metadata(decision: Decision) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    fields: dict[str, str] = {"reason": decision.reason.code}
    if decision.rule is not None:
        fields["rule"] = decision.rule.id
    if decision.claims is not None:
        fields["jti"] = str(decision.claims.get("jti", ""))
        if "txn" in decision.claims:
            fields["txn"] = str(decision.claims["txn"])
    if decision.shadow:
        fields["shadow"] = "true"
    meta.update(fields)
    return meta


def check_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    if decision.shadow:
        # Shadow mode: the decision is logged, the request goes upstream as it came.
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(),
            dynamic_metadata=_metadata(decision),
        )
    if decision.allowed and decision.token:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_header(decision.header, _header_value(decision))],
            headers_to_remove=list(decision.strip_headers),
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ok,
            dynamic_metadata=_metadata(decision),
        )
    if decision.allowed:
        # An allow without a token is a bug; never forward the broad credential because of it.
        return deny_response(Reason.INTERNAL_ERROR)
    return _cached_deny(decision.reason, decision.rule.id if decision.rule else None)


@functools.lru_cache(maxsize=4096)
def _cached_deny(reason: Reason, rule: str | None) -> external_auth_pb2.CheckResponse:
    """A deny depends on its reason and rule only, so each is built once. gRPC serialises the
    message and never changes it; nothing here changes it either."""
    meta = struct_pb2.Struct()
    meta.update({"reason": reason.code, **({"rule": rule} if rule else {})})
    return deny_response(reason, meta)


def _header_value(decision: Decision) -> str:
    assert decision.token is not None
    if decision.header == "authorization":
        return "Bearer " + decision.token
    return decision.token


def deny_response(
    reason: Reason, metadata: struct_pb2.Struct | None = None
) -> external_auth_pb2.CheckResponse:
    headers = [_header("content-type", "application/json"), _header("cache-control", "no-store")]
    if reason.challenge.value:
        headers.append(_header("www-authenticate", reason.challenge.value))
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
