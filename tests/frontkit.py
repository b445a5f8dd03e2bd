"""One check, either front: build the request the way Envoy would, read the answer the way
Envoy would apply it.

``FrontClient(sidecar, "grpc")`` sends the CheckRequest Envoy 1.40 sends over gRPC (built by
``check_request``); ``FrontClient(sidecar, "http")`` sends the HTTP/1.1 authorization request
Envoy's ``http_service`` sends (``envoy-http.yaml``): the original method, ``/check`` + the
original path, ``host`` = the original authority, only the headers the filter's
``allowed_headers`` lets through, and the one ``x-forwarded-client-cert`` element the local
Envoy sets for the mTLS peer, over one keep-alive connection to 127.0.0.1. Both return an
``Answer``: allowed or not, the status, what Envoy would set on and remove from the upstream
request, or what it would send back to the client.

What the HTTP answer means is read from the shipped ``envoy-http.yaml`` itself (its allowed
header lists), so a change there changes what these tests expect.
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import json
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from google.protobuf.json_format import MessageToDict

from extauthz.decision.jose import SigningKey, generate_signing_key
from extauthz.demo.envoy import load_base_config
from extauthz.demo.idp import Idp
from extauthz.demo.pki import Pki, make_pki
from extauthz.demo.stack import ISSUER, LOOPBACK, WORKLOADS, SidecarProcess, free_port
from extauthz.policy.loader import write_private_key

__all__ = [
    "CHANNEL_OPTIONS",
    "ENVOY_ID",
    "FRONTS",
    "HOST",
    "HTTP_SERVICE",
    "PATH",
    "Answer",
    "Config",
    "ConnectionClosed",
    "FrontClient",
    "HttpConnection",
    "RawResponse",
    "Stack",
    "cert_sha256_hex",
    "check_request",
    "envoy_http_request",
    "grpc_answer",
    "http_answer",
    "phrase",
    "raw_http_request",
    "start_stack",
    "write_config",
    "xfcc_element",
]

FRONTS = ("grpc", "http")
HOST = "profile.shop.svc.cluster.local"
PATH = "/v1/customers/42"
# The local Envoy's own SPIFFE ID (extauthz.demo.pki): the ``By`` of the XFCC element it sets.
ENVOY_ID = "spiffe://cluster.local/ns/edge/sa/envoy"
# Keep gRPC on loopback even if the environment names an HTTP proxy.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
XFCC = "x-forwarded-client-cert"
REASON_HEADER = "x-extauthz-reason"
RULE_HEADER = "x-extauthz-rule"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
HeaderLines = Mapping[str, str] | Sequence[tuple[str, str]]


# --- what envoy-http.yaml tells Envoy to do with the HTTP front's answers ---------------------


def _find(node: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a YAML tree (depth first)."""
    if isinstance(node, Mapping):
        if key in node:
            return node[key]
        children: Any = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find(child, key)
        if found is not None:
            return found
    return None


def _exact(patterns: Any) -> frozenset[str]:
    names = [p["exact"] for p in patterns["patterns"]]
    assert all(isinstance(n, str) for n in names), patterns
    return frozenset(n.lower() for n in names)


@dataclass(frozen=True, slots=True)
class HttpService:
    """The HTTP ext_authz filter's settings that shape a check and its answer."""

    path_prefix: str
    allowed_headers: frozenset[str]  # request headers Envoy passes to the authz service
    upstream_headers: frozenset[str]  # answer headers Envoy sets on the upstream request
    client_headers: frozenset[str]  # answer headers Envoy sends the client on a deny
    dynamic_metadata_headers: frozenset[str]  # answer headers Envoy turns into metadata

    @classmethod
    def load(cls) -> HttpService:
        service = _find(load_base_config("http"), "http_service")
        assert isinstance(service, Mapping), "envoy-http.yaml has no http_service"
        request = service["authorization_request"]
        response = service["authorization_response"]
        return cls(
            path_prefix=str(service["path_prefix"]),
            allowed_headers=_exact(request["allowed_headers"]),
            upstream_headers=_exact(response["allowed_upstream_headers"]),
            # Envoy adds these to a configured allowed_client_headers list by itself.
            client_headers=_exact(response["allowed_client_headers"])
            | {"www-authenticate", "location"},
            dynamic_metadata_headers=_exact(response["dynamic_metadata_from_headers"]),
        )


HTTP_SERVICE = HttpService.load()


# --- the sidecar's inputs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    policy: Path
    idp: Idp
    key: SigningKey
    key_file: Path


def write_config(directory: Path, policy_text: str) -> Config:
    """The example policy, its issuer's JWKS beside it and a signing key, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.yaml"
    policy.write_text(policy_text, encoding="utf-8")
    idp = Idp(ISSUER)
    idp.write_jwks(directory / "issuers" / "corp-idp.json")
    key = generate_signing_key()
    key_file = directory / "signing-key.pem"
    write_private_key(key, key_file)
    return Config(policy, idp, key, key_file)


# --- the requests ----------------------------------------------------------------------------


def _lines(headers: HeaderLines | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def joined(lines: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header lines as Envoy's gRPC client reports them: lower-case names, repeats joined."""
    out: dict[str, str] = {}
    for name, value in lines:
        key = name.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def check_request(
    *,
    principal: str = WORKLOADS["orders"],
    cert_pem: bytes | None = None,
    method: str = "GET",
    host: str = HOST,
    path: str = PATH,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy 1.40 builds it for an mTLS downstream."""
    request_id = request_id or uuid.uuid4().hex
    all_headers = {
        ":authority": host,
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "user-agent": "test-client/1.0",
        "x-request-id": request_id,
        "x-forwarded-proto": "https",
    }
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    ctx = attribute_context_pb2.AttributeContext
    source = ctx.Peer(principal=principal)
    if cert_pem is not None:
        source.certificate = urllib.parse.quote(cert_pem.decode("ascii"), safe="")
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=source,
            destination=ctx.Peer(principal=ENVOY_ID),
            request=ctx.Request(
                http=ctx.HttpRequest(
                    id=request_id,
                    method=method,
                    host=host,
                    path=path,
                    headers=all_headers,
                    scheme="https",
                    protocol="HTTP/1.1",
                )
            ),
        )
    )


def cert_sha256_hex(cert_pem: bytes) -> str:
    """XFCC ``Hash``: the hex SHA-256 of the certificate's DER."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def xfcc_element(
    principal: str, cert_pem: bytes | None = None, *, form: str = "hash", by: str = ENVOY_ID
) -> str:
    """The XFCC element the local Envoy sets for its mTLS peer (``SANITIZE_SET`` with
    ``uri: true``): ``By`` (itself), the certificate's ``Hash`` (``form="hash"``, what
    envoy-http.yaml configures) or the URL-encoded PEM as ``Cert`` (``form="cert"``, what
    ``cert: true`` adds), then the peer's ``URI``."""
    parts = [f"By={by}"]
    if cert_pem is not None:
        if form == "hash":
            parts.append(f"Hash={cert_sha256_hex(cert_pem)}")
        elif form == "cert":
            parts.append(f'Cert="{urllib.parse.quote(cert_pem.decode("ascii"), safe="")}"')
        else:
            raise ValueError(f"form must be hash or cert, not {form!r}")
    if principal:
        parts.append(f"URI={principal}")
    return ";".join(parts)


def raw_http_request(
    method: str, target: str, lines: Sequence[tuple[str, str]], *, version: str = "HTTP/1.1"
) -> bytes:
    """One HTTP/1 request head, exactly these lines and no others (nor a body)."""
    head = [f"{method} {target} {version}"] + [f"{name}: {value}" for name, value in lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")


def envoy_http_request(
    *,
    principal: str = WORKLOADS["orders"],
    cert_pem: bytes | None = None,
    method: str = "GET",
    host: str = HOST,
    path: str = PATH,
    token: str | None = None,
    headers: HeaderLines | None = None,
    request_id: str | None = None,
    check_headers: Sequence[tuple[str, str]] = (),
    xfcc: str | None = None,
    xfcc_form: str = "hash",
    connection: str | None = None,
) -> bytes:
    """The authorization request Envoy's ``http_service`` sends for a downstream request with
    ``headers`` (and ``token`` as its bearer token): only the ``allowed_headers`` of the
    downstream request, the XFCC element Envoy sets itself (``xfcc`` replaces it; ``""`` leaves
    it out), ``content-length: 0`` and Envoy's own ``x-envoy-*`` header. ``check_headers`` are
    added as they are, as if Envoy's filter let them through."""
    downstream = _lines(headers)
    if token is not None:
        downstream.insert(0, ("authorization", f"Bearer {token}"))
    downstream.append(("x-request-id", request_id or uuid.uuid4().hex))
    lines = [("host", host)]
    lines += [
        (name.lower(), value)
        for name, value in downstream
        # SANITIZE_SET: the client's own XFCC never reaches the authz service.
        if name.lower() in HTTP_SERVICE.allowed_headers and name.lower() != XFCC
    ]
    element = xfcc if xfcc is not None else xfcc_element(principal, cert_pem, form=xfcc_form)
    if element:
        lines.append((XFCC, element))
    lines += [("content-length", "0"), ("x-envoy-expected-rq-timeout-ms", "500")]
    if connection is not None:
        lines.append(("connection", connection))
    lines += list(check_headers)
    return raw_http_request(method, HTTP_SERVICE.path_prefix + path, lines)


# --- the answers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """A check's answer as Envoy applies it. ``status`` is the sidecar's own status (200 for
    an allow); Envoy answers a 5xx from the HTTP front with its ``status_on_error`` instead."""

    front: str
    allowed: bool
    status: int
    upstream: dict[str, str]  # set on the upstream request (overwriting), on an allow
    appended: dict[str, str]  # added to the upstream request beside what it has, on an allow
    removed: frozenset[str]  # removed from the upstream request, on an allow
    client_headers: dict[str, str]  # sent to the client with the deny
    body: bytes  # the deny's body, to the client
    reason: str | None  # the reason code Envoy records (gRPC metadata, HTTP header)
    rule: str | None
    metadata: dict[str, str]  # what Envoy puts in the filter's dynamic metadata
    raw: Any = field(repr=False)  # the CheckResponse, or the RawResponse

    @property
    def www_authenticate(self) -> str | None:
        return self.client_headers.get("www-authenticate")

    @property
    def error(self) -> str | None:
        """The ``error`` of a deny's JSON body."""
        if not self.body:
            return None
        document = json.loads(self.body)
        assert isinstance(document, dict), self.body
        value = document["error"]
        assert isinstance(value, str)
        return value

    @property
    def token(self) -> str | None:
        """The minted token Envoy sets upstream (``authorization: Bearer`` or ``txn-token``)."""
        value = self.upstream.get("authorization")
        if value is not None:
            assert value.startswith("Bearer "), value
            return value.removeprefix("Bearer ")
        return self.upstream.get("txn-token")


def grpc_answer(response: external_auth_pb2.CheckResponse) -> Answer:
    """A CheckResponse as Envoy applies it: status OK allows with the ok_response's header
    mutations (``append: false`` overwrites; anything else adds a value); any other status
    denies with the denied_response (403 when it names no status)."""
    metadata = {k: str(v) for k, v in MessageToDict(response.dynamic_metadata).items()}
    common: dict[str, Any] = {
        "front": "grpc",
        "reason": metadata.get("reason"),
        "rule": metadata.get("rule"),
        "metadata": metadata,
        "raw": response,
    }
    if response.status.code == 0:
        ok = response.ok_response
        upstream: dict[str, str] = {}
        appended: dict[str, str] = {}
        for option in ok.headers:
            key = option.header.key.lower()
            overwrite = option.HasField("append") and not option.append.value
            target = upstream if overwrite else appended
            assert key not in target, f"{key} set twice: {response}"
            target[key] = option.header.value
        return Answer(
            allowed=True,
            status=200,
            upstream=upstream,
            appended=appended,
            removed=frozenset(name.lower() for name in ok.headers_to_remove),
            client_headers={},
            body=b"",
            **common,
        )
    denied = response.denied_response
    client: dict[str, str] = {}
    for option in denied.headers:
        key = option.header.key.lower()
        assert key not in client, f"{key} twice in a deny: {response}"
        client[key] = option.header.value
    return Answer(
        allowed=False,
        status=int(denied.status.code) or 403,
        upstream={},
        appended={},
        removed=frozenset(),
        client_headers=client,
        body=denied.body.encode("utf-8"),
        **common,
    )


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One HTTP/1.1 response as it came off the wire."""

    version: str
    status: int
    phrase: str
    headers: tuple[tuple[str, str], ...]  # lower-case names, in order
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, f"{name} {len(values)} times: {self.headers}"
        return values[0] if values else None


def http_answer(raw: RawResponse) -> Answer:
    """An HTTP front's answer as envoy-http.yaml makes Envoy apply it: 200 allows, setting
    the ``allowed_upstream_headers`` upstream and removing what
    ``x-envoy-auth-headers-to-remove`` names; any other status denies, with the status, the
    body and the ``allowed_client_headers`` (content-length aside: Envoy frames the body)."""
    metadata: dict[str, str] = {}
    for name in HTTP_SERVICE.dynamic_metadata_headers:
        value = raw.header(name)
        if value is not None:
            metadata[name] = value
    common: dict[str, Any] = {
        "front": "http",
        "status": raw.status,
        "reason": raw.header(REASON_HEADER),
        "rule": raw.header(RULE_HEADER),
        "metadata": metadata,
        "raw": raw,
    }
    if raw.status == 200:
        upstream: dict[str, str] = {}
        for name, value in raw.headers:
            if name in HTTP_SERVICE.upstream_headers:
                assert name not in upstream, f"{name} twice in an allow: {raw.headers}"
                upstream[name] = value
        remove = raw.header(REMOVE_HEADER) or ""
        return Answer(
            allowed=True,
            upstream=upstream,
            appended={},
            removed=frozenset(n.strip().lower() for n in remove.split(",") if n.strip()),
            client_headers={},
            body=b"",
            **common,
        )
    client: dict[str, str] = {}
    for name, value in raw.headers:
        if name in HTTP_SERVICE.client_headers:
            assert name not in client, f"{name} twice in a deny: {raw.headers}"
            client[name] = value
    return Answer(
        allowed=False,
        upstream={},
        appended={},
        removed=frozenset(),
        client_headers=client,
        body=raw.body,
        **common,
    )


# --- an HTTP/1.1 client that shows what is on the wire ------------------------------------------


class ConnectionClosed(AssertionError):
    """The front closed the connection before a whole answer."""


class HttpConnection:
    """One keep-alive TCP connection to 127.0.0.1, requests written as given and answers
    read with their framing checked (a body only as long as ``content-length`` says)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.local_port = int(self.sock.getsockname()[1])
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        self._buffer += chunk
        return bool(chunk)

    def read(self, *, head: bool = False) -> RawResponse:
        """The next answer; ``head``: it answers a HEAD request (a head without a body)."""
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                raise ConnectionClosed(f"closed before a whole answer: {self._buffer[:200]!r}")
        head_bytes, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        version, status, phrase = status_line.split(" ", 2)
        headers = []
        for line in header_lines:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"not a header line: {line!r}"
            headers.append((name.lower(), value.strip()))
        lengths = [v for k, v in headers if k == "content-length"]
        assert len(lengths) == 1, f"an answer needs one content-length: {head_bytes!r}"
        length = 0 if head else int(lengths[0])
        while len(self._buffer) < length:
            if not self._fill():
                raise ConnectionClosed(f"closed inside a body: {self._buffer[:200]!r}")
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return RawResponse(version, int(status), phrase, tuple(headers), body)

    def request(self, data: bytes, *, head: bool = False) -> RawResponse:
        self.send(data)
        return self.read(head=head)

    def closed(self) -> bool:
        """Whether the peer closed the connection (after everything it sent was read); waits
        up to the socket timeout for it."""
        if self._buffer:
            return False
        return not self._fill()

    def pending(self) -> bytes:
        """What arrived but was not read as an answer."""
        return self._buffer

    def close(self) -> None:
        self.sock.close()


# --- one client, either front ------------------------------------------------------------------


class FrontClient:
    """Checks against one running sidecar's ``front``, the way that front's Envoy sends
    them: over gRPC, or over one keep-alive HTTP/1.1 connection."""

    def __init__(self, sidecar: SidecarProcess, front: str) -> None:
        if front not in FRONTS:
            raise ValueError(f"front must be one of {FRONTS}, not {front!r}")
        self.front = front
        self.sidecar = sidecar
        self._channel: grpc.Channel | None = None
        self._http: HttpConnection | None = None
        if front == "grpc":
            self._channel = grpc.insecure_channel(
                f"{LOOPBACK}:{sidecar.grpc_port}", CHANNEL_OPTIONS
            )
            self.stub = external_auth_pb2_grpc.AuthorizationStub(self._channel)
        else:
            assert sidecar.http_port is not None, "the sidecar was started without an HTTP front"
            self.http_port = sidecar.http_port

    @property
    def connection(self) -> HttpConnection:
        """The keep-alive connection to the HTTP front (opened on first use)."""
        if self.front != "http":
            raise ValueError("only the HTTP front has a connection")
        if self._http is None:
            self._http = HttpConnection(self.http_port)
        return self._http

    def check(
        self,
        *,
        principal: str = WORKLOADS["orders"],
        cert_pem: bytes | None = None,
        method: str = "GET",
        host: str = HOST,
        path: str = PATH,
        token: str | None = None,
        headers: HeaderLines | None = None,
        request_id: str | None = None,
        check_headers: Sequence[tuple[str, str]] = (),
    ) -> Answer:
        """One check of a downstream request from ``principal`` (presenting ``cert_pem``)
        with ``headers`` and ``token``. ``check_headers`` go into the check request itself
        even where Envoy's filter would drop them (the sidecar's own limits)."""
        if self.front == "grpc":
            all_headers = joined([*_lines(headers), *check_headers])
            request = check_request(
                principal=principal,
                cert_pem=cert_pem,
                method=method,
                host=host,
                path=path,
                token=token,
                headers=all_headers,
                request_id=request_id,
            )
            return self.send_grpc(request)
        data = envoy_http_request(
            principal=principal,
            cert_pem=cert_pem,
            method=method,
            host=host,
            path=path,
            token=token,
            headers=headers,
            request_id=request_id,
            check_headers=check_headers,
        )
        return self.send_http(data, head=method == "HEAD")

    def send_grpc(self, request: external_auth_pb2.CheckRequest) -> Answer:
        response: external_auth_pb2.CheckResponse = self.stub.Check(request, timeout=5)
        return grpc_answer(response)

    def send_http(self, data: bytes, *, head: bool = False) -> Answer:
        return http_answer(self.connection.request(data, head=head))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._http is not None:
            self._http.close()
            self._http = None


# --- a running sidecar and a client of one of its fronts -----------------------------------------


@dataclass
class Stack:
    front: str
    config: Config
    pki: Pki
    sidecar: SidecarProcess
    channel: grpc.Channel  # the gRPC port (every sidecar has one): health, raw CheckRequests
    client: FrontClient
    checks: int = 0  # checks sent: each is one decision-log line
    # Every token sent to or received from the sidecar, for the decision-log leak check.
    tokens: list[str] = field(default_factory=list)

    @property
    def stub(self) -> external_auth_pb2_grpc.AuthorizationStub:
        return external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def _seen(self, answer: Answer) -> Answer:
        self.checks += 1
        if answer.token is not None:
            self.tokens.append(answer.token)
        return answer

    def check(self, **kwargs: Any) -> Answer:
        """``FrontClient.check`` on this stack's front."""
        return self._seen(self.client.check(**kwargs))

    def send(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        """A CheckRequest as given, to the gRPC port."""
        response: external_auth_pb2.CheckResponse = self.stub.Check(request, timeout=5)
        self._seen(grpc_answer(response))
        return response

    def send_http(self, data: bytes, *, head: bool = False) -> Answer:
        """Request bytes as given, on the keep-alive connection to the HTTP front."""
        return self._seen(self.client.send_http(data, head=head))

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("now", time.time())
        token = self.config.idp.token(**kwargs)
        self.tokens.append(token)
        return token

    def cert_pem(self, workload: str) -> bytes:
        return self.pki.workloads[workload].cert.read_bytes()

    def decision_for(self, request_id: str) -> dict[str, Any]:
        lines = [d for d in self.sidecar.decisions() if d.get("request_id") == request_id]
        assert len(lines) == 1, f"expected one decision line for {request_id}, got {len(lines)}"
        return lines[0]


@contextlib.contextmanager
def start_stack(
    base: Path,
    policy_text: str,
    front: str,
    extra_args: Sequence[str] = (),
    *,
    grpc_port: int | None = None,
    admin_port: int | None = None,
    timeout: float = 20.0,
) -> Iterator[Stack]:
    """A sidecar serving ``front`` (the HTTP front besides gRPC for ``"http"``) with the
    policy, a fresh issuer, signing key and workload certificates, in ``base``."""
    config = write_config(base, policy_text)
    pki = make_pki(base / "certs", WORKLOADS)
    sidecar = SidecarProcess(
        config.policy,
        [config.key_file],
        base / "sidecar",
        grpc_port=grpc_port,
        admin_port=admin_port,
        extra_args=extra_args,
        front=front,
    )
    # Never the port a second worker would take (gRPC port + 1), nor the admin port.
    taken = {sidecar.grpc_port, sidecar.grpc_port + 1, sidecar.admin_port}
    while sidecar.http_port is not None and sidecar.http_port in taken:
        sidecar.http_port = free_port()
    sidecar.start(timeout=timeout)
    try:
        channel = grpc.insecure_channel(f"{LOOPBACK}:{sidecar.grpc_port}", CHANNEL_OPTIONS)
        client = FrontClient(sidecar, front)
        try:
            yield Stack(front, config, pki, sidecar, channel, client)
        finally:
            client.close()
            channel.close()
    finally:
        sidecar.stop()


def phrase(status: int) -> str:
    """The standard reason phrase of ``status``."""
    return http.HTTPStatus(status).phrase
