"""The shipped Envoy bootstraps, their rendering, and the real Envoy failing closed.

Two bootstraps ship: envoy.yaml (ext_authz over gRPC) and envoy-http.yaml (Envoy's HTTP
authorization service). Both are validated by ``envoy --mode validate``, their safety settings
are checked, and one test keeps them equal everywhere but where the fronts must differ. No
extauthz server is needed: the fail-closed tests point Envoy at a port where nothing listens;
the positive controls use an allow-all stub of each authorization service, defined here.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.client
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import (
    CONFIG_FILES,
    FRONTS,
    Envoy,
    load_base_config,
    render_config,
    validate_config,
)
from extauthz.demo.pki import Pki, make_pki, x5t_s256
from extauthz.demo.stack import free_port
from extauthz.serve.http_edge import DECISION_HEADER, PATH_PREFIX, REASON_HEADER, RULE_HEADER
from extauthz.serve.http_front import READY_PATH

ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = {
    "frontend": "spiffe://cluster.local/ns/shop/sa/frontend",
    "batch": "spiffe://cluster.local/ns/jobs/sa/batch",
}
AUTHZ_ERROR_STAT = "http.ingress.ext_authz.error"
AUTHZ_OK_STAT = "http.ingress.ext_authz.ok"


# --- helpers -----------------------------------------------------------------------------


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item["name"] == name)


def listener(config: dict[str, Any]) -> dict[str, Any]:
    return named(config["static_resources"]["listeners"], "ingress")


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return named(config["static_resources"]["clusters"], name)


def tls_context(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = listener(config)["filter_chains"][0]["transport_socket"]["typed_config"]
    return typed


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = listener(config)["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def ext_authz_filter(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = named(hcm(config)["http_filters"], "envoy.filters.http.ext_authz")[
        "typed_config"
    ]
    return typed


def endpoint_ports(config: dict[str, Any], name: str) -> list[int]:
    groups = cluster(config, name)["load_assignment"]["endpoints"]
    return [
        lb["endpoint"]["address"]["socket_address"]["port_value"]
        for group in groups
        for lb in group["lb_endpoints"]
    ]


def cert_filenames(config: dict[str, Any]) -> list[str]:
    common = tls_context(config)["common_tls_context"]
    pair = common["tls_certificates"][0]
    return [
        pair["certificate_chain"]["filename"],
        pair["private_key"]["filename"],
        common["validation_context"]["trusted_ca"]["filename"],
    ]


def client_context(pki: Pki, workload: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if workload is not None:
        pair = pki.workloads[workload]
        context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


def https_get(port: int, context: ssl.SSLContext, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": "Bearer not-a-real-token"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_stat(envoy: Envoy, name: str, minimum: int, timeout: float = 5.0) -> int:
    # Stats are flushed asynchronously; give Envoy a moment after the response.
    deadline = time.monotonic() + timeout
    value = envoy.stat(name)
    while value < minimum and time.monotonic() < deadline:
        time.sleep(0.05)
        value = envoy.stat(name)
    return value


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki") / "certs", WORKLOADS)


@pytest.fixture(scope="module", params=FRONTS)
def fail_closed_stack(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Envoy, EchoServer, int]]:
    """Envoy (each front's shipped config) in front of the echo server, with ext_authz
    pointing at a dead port."""
    front: str = request.param
    with EchoServer() as echo:
        config = render_config(
            load_base_config(front),
            listen_port=free_port(),
            authz_ports=[free_port()],  # closed again at once: nothing listens there
            upstream_port=echo.port,
            admin_port=free_port(),
            cert_dir=pki.dir,
        )
        listen_port = listener(config)["address"]["socket_address"]["port_value"]
        with Envoy(config, tmp_path_factory.mktemp(f"envoy-{front}")) as envoy:
            yield envoy, echo, listen_port


# --- (a) the shipped files validate ---------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize("front", FRONTS)
def test_shipped_config_validates(pki: Pki, tmp_path: Path, front: str) -> None:
    config = render_config(
        load_base_config(front),
        listen_port=free_port(),
        authz_ports=[free_port()],
        upstream_port=free_port(),
        admin_port=free_port(),
        cert_dir=pki.dir,
    )
    validate_config(config, tmp_path)


@pytest.mark.envoy
@pytest.mark.parametrize("front", FRONTS)
def test_validate_config_reports_envoy_errors(pki: Pki, tmp_path: Path, front: str) -> None:
    config = load_base_config(front)
    ext_authz_filter(config)["failure_mode_allow_typo"] = False
    with pytest.raises(RuntimeError, match="failure_mode_allow_typo"):
        validate_config(config, tmp_path)


# --- (b) the security-relevant settings are what we ship ------------------------------------


@pytest.mark.parametrize("front", FRONTS)
def test_shipped_config_fails_closed_and_requires_mtls(front: str) -> None:
    config = load_base_config(front)
    authz = ext_authz_filter(config)
    assert authz["failure_mode_allow"] is False
    assert authz["validate_mutations"] is True
    assert authz["status_on_error"]["code"] == 503
    assert tls_context(config)["require_client_certificate"] is True
    manager = hcm(config)
    assert manager["stat_prefix"] == "ingress"
    assert manager["normalize_path"] is True
    assert manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    # ext_authz must run before the router, or requests would be routed unchecked.
    names = [f["name"] for f in manager["http_filters"]]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    # Checks go only to endpoints that pass the health check, never to unhealthy ones.
    authz_cluster = cluster(config, "extauthz")
    assert authz_cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert authz_cluster["health_checks"]
    # Nothing may let a request through when the check fails or is skipped.
    text = json.dumps(config)
    assert '"failure_mode_allow": true' not in text
    assert "typed_per_filter_config" not in text  # no route turns the check off
    for key in ("filter_enabled", "filter_enabled_metadata", "deny_at_disable"):
        assert key not in authz


def test_grpc_config_sends_the_peer_and_sanitizes_xfcc() -> None:
    config = load_base_config("grpc")
    authz = ext_authz_filter(config)
    assert authz["include_peer_certificate"] is True
    assert authz["transport_api_version"] == "V3"
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "extauthz"
    assert "http_service" not in authz
    manager = hcm(config)
    assert manager["forward_client_cert_details"] == "SANITIZE"
    assert "set_current_client_cert_details" not in manager


def test_http_config_asks_the_http_front_and_sets_xfcc() -> None:
    """The HTTP authorization request carries no source.principal: the caller is the one XFCC
    element Envoy sets for the verified peer, whatever the client sent (SANITIZE_SET), and
    only the headers extauthz reads go to it and come back."""
    config = load_base_config("http")
    authz = ext_authz_filter(config)
    assert "grpc_service" not in authz
    service = authz["http_service"]
    assert service["server_uri"]["cluster"] == "extauthz"
    assert urllib.parse.urlsplit(service["server_uri"]["uri"]).hostname == "127.0.0.1"
    assert service["path_prefix"] == PATH_PREFIX
    assert patterns(service["authorization_request"]["allowed_headers"]) == [
        "authorization",
        "txn-token",
        "x-forwarded-client-cert",
        "x-request-id",
        "traceparent",
    ]
    response = service["authorization_response"]
    assert patterns(response["allowed_upstream_headers"]) == ["authorization", "txn-token"]
    assert patterns(response["allowed_client_headers"]) == [
        "content-type",
        "cache-control",
        "www-authenticate",
    ]
    # Only extauthz's own answer headers (reason code, rule id, ...) go to the access log's
    # metadata: never a credential.
    metadata = patterns(response["dynamic_metadata_from_headers"])
    assert {REASON_HEADER, RULE_HEADER, DECISION_HEADER} <= set(metadata)
    assert all(name.startswith("x-extauthz-") for name in metadata), metadata
    manager = hcm(config)
    assert manager["forward_client_cert_details"] == "SANITIZE_SET"
    assert manager["set_current_client_cert_details"] == {"uri": True}


def patterns(matcher: dict[str, Any]) -> list[str]:
    """The names of a ListStringMatcher that may hold only exact, lower-case names."""
    names = []
    for pattern in matcher["patterns"]:
        assert set(pattern) == {"exact"}, pattern
        assert pattern["exact"] == pattern["exact"].lower()
        names.append(pattern["exact"])
    return names


def test_authz_cluster_speaks_http2() -> None:
    options = cluster(load_base_config("grpc"), "extauthz")["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    (check,) = cluster(load_base_config("grpc"), "extauthz")["health_checks"]
    assert check["grpc_health_check"]["service_name"] == "envoy.service.auth.v3.Authorization"


def test_http_authz_cluster_speaks_http1_and_checks_readyz() -> None:
    authz_cluster = cluster(load_base_config("http"), "extauthz")
    options = authz_cluster["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert http["explicit_http_config"] == {"http_protocol_options": {}}
    (check,) = authz_cluster["health_checks"]
    assert check["http_health_check"]["path"] == READY_PATH.decode()
    assert not check["http_health_check"]["path"].startswith(PATH_PREFIX + "/")
    assert len(endpoint_ports(load_base_config("http"), "extauthz")) == 1


@pytest.mark.parametrize("front", FRONTS)
def test_shipped_config_stays_on_loopback(front: str) -> None:
    config = load_base_config(front)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert listener(config)["address"]["socket_address"]["address"] == "127.0.0.1"
    for name in ("extauthz", "upstream"):
        for group in cluster(config, name)["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                assert lb["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"


# --- (b') the two files cannot drift apart ----------------------------------------------------

# Where envoy-http.yaml may differ from envoy.yaml: the ext_authz filter's service block (the
# gRPC service with its transport version and peer certificate, or the HTTP service), the
# extauthz cluster (HTTP/2 and gRPC health checks, or HTTP/1.1 and /readyz), the XFCC settings
# (SANITIZE, or SANITIZE_SET with the URI) and the header comment. Nothing else.
SERVICE_KEYS = ("grpc_service", "http_service", "transport_api_version", "include_peer_certificate")
XFCC_KEYS = ("forward_client_cert_details", "set_current_client_cert_details")


def common_part(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the parts in which the two fronts' configs may differ."""
    config = copy.deepcopy(config)
    authz = ext_authz_filter(config)
    for key in SERVICE_KEYS:
        authz.pop(key, None)
    manager = hcm(config)
    for key in XFCC_KEYS:
        manager.pop(key, None)
    resources = config["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "extauthz"]
    return config


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def yaml_block(lines: list[str], key: str) -> range:
    """The lines of the one mapping entry (or list item) ``key`` names, e.g. ``grpc_service``
    or ``- name: extauthz``: the comment lines right above it, its own line and every line
    indented deeper below it. An empty range when the file has no such entry."""
    pattern = re.compile(rf"^ *{re.escape(key)}(:|$| )")
    found = [i for i, line in enumerate(lines) if pattern.match(line)]
    assert len(found) <= 1, (key, found)
    if not found:
        return range(0)
    start = end = found[0]
    depth = _indent(lines[start])
    while start > 0 and lines[start - 1].strip().startswith("#"):
        if _indent(lines[start - 1]) != depth:
            break
        start -= 1
    end += 1
    while end < len(lines):
        if lines[end].strip():
            if _indent(lines[end]) <= depth:
                break
        else:  # a blank line belongs to the block only if the block goes on after it
            following = next((line for line in lines[end:] if line.strip()), "")
            if _indent(following) <= depth:
                break
        end += 1
    return range(start, end)


def shared_lines(text: str) -> list[str]:
    """The file's lines outside the header comment and the blocks the fronts may differ in."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip() and line[0] != "#")
    skip = set(range(header))
    for key in (*SERVICE_KEYS, *XFCC_KEYS, "- name: extauthz"):
        skip.update(yaml_block(lines, key))
    return [line for i, line in enumerate(lines) if i not in skip]


def test_the_two_configs_differ_only_where_the_fronts_do() -> None:
    grpc, http = (load_base_config(front) for front in FRONTS)
    assert common_part(grpc) == common_part(http)
    # The shared safety settings are in the common part, so this comparison covers them.
    assert ext_authz_filter(common_part(http))["failure_mode_allow"] is False
    # The comments too: the files read the same outside those blocks.
    texts = [(ROOT / CONFIG_FILES[front]).read_text(encoding="utf-8") for front in FRONTS]
    assert shared_lines(texts[0]) == shared_lines(texts[1])
    # And the comparison notices a change outside them.
    drifted = copy.deepcopy(http)
    hcm(drifted)["merge_slashes"] = False
    assert common_part(grpc) != common_part(drifted)
    assert shared_lines(texts[0]) != shared_lines(texts[1].replace("merge_slashes: true", ""))


def test_yaml_block_finds_entries_and_their_comments() -> None:
    lines = [
        "a:",
        "  # about b",
        "  b:",
        "    c: 1",
        "",
        "    d: 2",
        "  # about e",
        "  e: 3",
        "",
        "f: 4",
    ]
    assert list(yaml_block(lines, "b")) == [1, 2, 3, 4, 5]
    assert list(yaml_block(lines, "e")) == [6, 7]
    assert list(yaml_block(lines, "f")) == [9]
    assert list(yaml_block(lines, "g")) == []


# --- (c) rendering -------------------------------------------------------------------------


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("count", [1, 3])
def test_render_config_sets_ports_and_cert_paths(count: int, tmp_path: Path, front: str) -> None:
    base = load_base_config(front)
    authz_ports = [20001 + i for i in range(count)]
    config = render_config(
        base,
        listen_port=20100,
        authz_ports=authz_ports,
        upstream_port=20200,
        admin_port=20300,
        cert_dir=tmp_path / "certs",
    )
    assert endpoint_ports(config, "extauthz") == authz_ports
    assert endpoint_ports(config, "upstream") == [20200]
    if front == "http":  # the service's URI names the same server as its cluster
        (authz,) = [f for f in hcm(config)["http_filters"] if "ext_authz" in f["name"]]
        uri = authz["typed_config"]["http_service"]["server_uri"]["uri"]
        assert uri == f"http://127.0.0.1:{authz_ports[0]}"
    assert listener(config)["address"]["socket_address"]["port_value"] == 20100
    assert config["admin"]["address"]["socket_address"]["port_value"] == 20300
    paths = [Path(p) for p in cert_filenames(config)]
    assert all(p.is_absolute() for p in paths)
    assert [p.name for p in paths] == ["envoy.crt", "envoy.key", "ca.crt"]
    assert {p.parent for p in paths} == {(tmp_path / "certs").absolute()}
    # The base must be left alone: callers render it several times.
    assert base == load_base_config(front)


@pytest.mark.parametrize("front", FRONTS)
def test_render_config_rejects_missing_pieces(tmp_path: Path, front: str) -> None:
    ports: dict[str, Any] = {
        "listen_port": 1,
        "authz_ports": [2],
        "upstream_port": 3,
        "admin_port": 4,
        "cert_dir": tmp_path,
    }
    renamed = load_base_config(front)
    cluster(renamed, "extauthz")["name"] = "something-else"
    with pytest.raises(ValueError, match="extauthz"):
        render_config(renamed, **ports)
    no_listener = load_base_config(front)
    listener(no_listener)["name"] = "egress"
    with pytest.raises(ValueError, match="ingress"):
        render_config(no_listener, **ports)
    with pytest.raises(ValueError):
        render_config(load_base_config(front), **{**ports, "authz_ports": []})
    with pytest.raises(ValueError):
        render_config(load_base_config(front), **{**ports, "listen_port": 0})


# --- (d) echo upstream -----------------------------------------------------------------------


def test_echo_server_echoes_and_records() -> None:
    with EchoServer() as echo:
        conn = http.client.HTTPConnection("127.0.0.1", echo.port, timeout=5)
        conn.request("POST", "/a/b?x=1", body=b"payload", headers={"X-Probe": "42"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.request("HEAD", "/head")
        head = conn.getresponse()
        head_body = head.read()
        conn.close()
        recorded = echo.requests
    assert response.status == 200
    assert body["method"] == "POST"
    assert body["path"] == "/a/b?x=1"
    assert body["headers"]["x-probe"] == "42"
    assert head.status == 200
    assert head_body == b""
    assert [(r.method, r.path) for r in recorded] == [("POST", "/a/b?x=1"), ("HEAD", "/head")]
    assert recorded[0].headers["x-probe"] == "42"
    assert all(name == name.lower() for name in recorded[0].headers)


# --- (e) the real Envoy fails closed ---------------------------------------------------------


@pytest.mark.envoy
def test_envoy_fails_closed_when_authz_is_down(
    fail_closed_stack: tuple[Envoy, EchoServer, int], pki: Pki
) -> None:
    envoy, echo, listen_port = fail_closed_stack
    before = envoy.stat(AUTHZ_ERROR_STAT)
    status, _ = https_get(listen_port, client_context(pki, "frontend"), "/orders")
    # 503 from status_on_error: "authz unavailable", distinguishable from a 403 deny.
    assert status == 503
    assert wait_for_stat(envoy, AUTHZ_ERROR_STAT, before + 1) > before
    assert echo.requests == []


@pytest.mark.envoy
def test_stat_of_an_absent_name_is_zero(fail_closed_stack: tuple[Envoy, EchoServer, int]) -> None:
    envoy, _, _ = fail_closed_stack
    assert envoy.stat("http.ingress.no_such_stat") == 0


@pytest.mark.envoy
@pytest.mark.parametrize("front", FRONTS)
def test_envoy_start_reports_a_bad_config(pki: Pki, tmp_path: Path, front: str) -> None:
    config = render_config(
        load_base_config(front),
        listen_port=free_port(),
        authz_ports=[free_port()],
        upstream_port=free_port(),
        admin_port=free_port(),
        cert_dir=tmp_path / "missing-certs",
    )
    with pytest.raises(RuntimeError, match="exited early") as excinfo:
        Envoy(config, tmp_path / "envoy").start(timeout=10)
    assert "missing-certs" in str(excinfo.value)


@pytest.mark.envoy
def test_envoy_requires_a_client_certificate(
    fail_closed_stack: tuple[Envoy, EchoServer, int], pki: Pki
) -> None:
    _, echo, listen_port = fail_closed_stack
    # Under TLS 1.3 the server's rejection can surface after the client thinks the
    # handshake is done, so the whole exchange must fail, not just the handshake call.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(listen_port, client_context(pki, None))
    assert echo.requests == []


@pytest.mark.envoy
def test_envoy_rejects_a_client_cert_handshake_under_tls12(
    fail_closed_stack: tuple[Envoy, EchoServer, int], pki: Pki
) -> None:
    _, _, listen_port = fail_closed_stack
    # TLS 1.2 verifies the client before the handshake completes: fail right there.
    context = client_context(pki, None)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", listen_port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


# --- positive control: the same wiring lets an allowed request through ----------------------


@dataclass(frozen=True)
class Seen:
    """What one authorization request told the stub, in either front's terms."""

    path: str  # the request path being authorized
    headers: dict[str, str]
    principal: str  # the caller's SPIFFE ID, as Envoy asserts it
    x5t: str | None  # thumbprint of the certificate Envoy says the caller presented


class _AllowAll(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Stub ext_authz (gRPC) that allows everything and remembers what Envoy sent."""

    def __init__(self) -> None:
        self.checks: list[external_auth_pb2.CheckRequest] = []

    def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.checks.append(request)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))

    def seen(self) -> list[Seen]:
        out = []
        for check in list(self.checks):
            source, http = check.attributes.source, check.attributes.request.http
            pem = urllib.parse.unquote(source.certificate).encode()
            out.append(Seen(http.path, dict(http.headers), source.principal, x5t_s256(pem)))
        return out


class _HttpAllowAllHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpAllowAllServer

    def do_GET(self) -> None:
        if self.path != READY_PATH.decode():  # Envoy's health check, not a check
            with self.server.lock:
                self.server.requests.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()})
                )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        return


class _HttpAllowAllServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, dict[str, str]]]
    lock: threading.Lock


class _HttpAllowAll:
    """Stub HTTP authorization service that allows everything (200, no headers) and
    remembers what Envoy sent."""

    def __init__(self) -> None:
        self.server = _HttpAllowAllServer(("127.0.0.1", 0), _HttpAllowAllHandler)
        self.server.requests, self.server.lock = [], threading.Lock()
        self.port = int(self.server.server_address[1])
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self) -> list[Seen]:
        with self.server.lock:
            requests = list(self.server.requests)
        out = []
        for path, headers in requests:
            assert path.startswith(PATH_PREFIX + "/"), path
            element = xfcc_element(headers.get("x-forwarded-client-cert", ""))
            digest = element.get("hash")
            x5t = (
                base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
                if digest
                else None
            )
            out.append(Seen(path[len(PATH_PREFIX) :], headers, element.get("uri", ""), x5t))
        return out


def xfcc_element(value: str) -> dict[str, str]:
    """The pairs of a one-element XFCC value as Envoy writes it (By=...;Hash=...;URI=...);
    asserts it holds exactly one element."""
    if not value:
        return {}
    assert "," not in value, f"more than one XFCC element: {value}"
    pairs = [pair.split("=", 1) for pair in value.split(";")]
    return {key.lower(): val for key, val in pairs}


@dataclass
class AllowStack:
    envoy: Envoy
    echo: EchoServer
    listen_port: int
    front: str
    seen: Callable[[], list[Seen]]


@pytest.fixture(scope="module", params=FRONTS)
def allow_stack(
    request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AllowStack]:
    """Envoy (each front's shipped config) in front of the echo server, checked by the
    allow-all stub of that front's authorization service."""
    front: str = request.param
    stop: Callable[[], None]
    seen: Callable[[], list[Seen]]
    if front == "grpc":
        servicer = _AllowAll()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
        # The shipped cluster health-checks its endpoints; an unhealthy one gets no checks.
        health_servicer = health.HealthServicer()
        health_servicer.set(
            "envoy.service.auth.v3.Authorization", health_pb2.HealthCheckResponse.SERVING
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        authz_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stop, seen = (lambda: server.stop(grace=None)), servicer.seen
    else:
        stub = _HttpAllowAll()  # answers the /readyz health check with 200 too
        authz_port, stop, seen = stub.port, stub.stop, stub.seen
    try:
        with EchoServer() as echo:
            config = render_config(
                load_base_config(front),
                listen_port=free_port(),
                authz_ports=[authz_port],
                upstream_port=echo.port,
                admin_port=free_port(),
                cert_dir=pki.dir,
            )
            listen_port = listener(config)["address"]["socket_address"]["port_value"]
            with Envoy(config, tmp_path_factory.mktemp(f"envoy-allow-{front}")) as envoy:
                yield AllowStack(envoy, echo, listen_port, front, seen)
    finally:
        stop()


def send(listen_port: int, context: ssl.SSLContext, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", listen_port, context=context, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.envoy
def test_envoy_forwards_peer_identity_to_authz(allow_stack: AllowStack, pki: Pki) -> None:
    """gRPC: source.principal and (include_peer_certificate) the URL-encoded PEM. HTTP: the
    XFCC element Envoy sets, with the URI SAN and the certificate's SHA-256 (Hash)."""
    stack = allow_stack
    checks_before, seen_before = len(stack.seen()), len(stack.echo.requests)
    ok_before = stack.envoy.stat(AUTHZ_OK_STAT)
    status, body = https_get(stack.listen_port, client_context(pki, "batch"), "/jobs")
    assert status == 200
    assert json.loads(body)["path"] == "/jobs"
    assert [r.path for r in stack.echo.requests[seen_before:]] == ["/jobs"]
    assert wait_for_stat(stack.envoy, AUTHZ_OK_STAT, ok_before + 1) == ok_before + 1
    (check,) = stack.seen()[checks_before:]
    assert check.path == "/jobs"
    assert check.principal == WORKLOADS["batch"]
    # Exactly the certificate the client used.
    assert check.x5t == x5t_s256(pki.workloads["batch"].cert.read_bytes())


@pytest.mark.envoy
def test_envoy_authorizes_the_normalized_path(allow_stack: AllowStack, pki: Pki) -> None:
    stack = allow_stack
    checks_before, seen_before = len(stack.seen()), len(stack.echo.requests)
    status = send(stack.listen_port, client_context(pki, "batch"), "/a//b/../c?q=1", {})
    assert status == 200
    # normalize_path + merge_slashes run before ext_authz: the checked path is the
    # routed path, not the raw request target.
    assert [c.path for c in stack.seen()[checks_before:]] == ["/a/c?q=1"]
    assert [r.path for r in stack.echo.requests[seen_before:]] == ["/a/c?q=1"]


@pytest.mark.envoy
@pytest.mark.parametrize("path", ["/a%2Fb", "/a%2fb", "/a%5Cb"])
def test_envoy_rejects_escaped_slashes_before_authz(
    allow_stack: AllowStack, pki: Pki, path: str
) -> None:
    stack = allow_stack
    checks_before, seen_before = len(stack.seen()), len(stack.echo.requests)
    assert send(stack.listen_port, client_context(pki, "batch"), path, {}) == 400
    assert len(stack.seen()) == checks_before
    assert len(stack.echo.requests) == seen_before


@pytest.mark.envoy
def test_envoy_strips_client_sent_xfcc(allow_stack: AllowStack, pki: Pki) -> None:
    """A client-sent XFCC never reaches the authorization service or the upstream: over gRPC
    there is none at all (SANITIZE); over HTTP there is only the element Envoy set for the
    real peer (SANITIZE_SET)."""
    stack = allow_stack
    checks_before, seen_before = len(stack.seen()), len(stack.echo.requests)
    forged = {"X-Forwarded-Client-Cert": "By=spiffe://x;URI=spiffe://cluster.local/ns/a/sa/admin"}
    assert send(stack.listen_port, client_context(pki, "batch"), "/xfcc", forged) == 200
    (check,) = stack.seen()[checks_before:]
    upstream = stack.echo.requests[seen_before].headers
    assert check.principal == WORKLOADS["batch"]
    for headers in (check.headers, upstream):
        value = headers.get("x-forwarded-client-cert")
        if stack.front == "grpc":
            assert value is None
        else:
            assert value is not None
            element = xfcc_element(value)
            assert element["uri"] == WORKLOADS["batch"]
            assert "sa/admin" not in value and "spiffe://x" not in value


# --- (f) certificate thumbprint --------------------------------------------------------------


def test_x5t_s256_matches_independent_computation(pki: Pki) -> None:
    pem = pki.workloads["frontend"].cert.read_bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert x5t_s256(pem) == expected
    assert "=" not in expected
    assert len(expected) == 43


# --- PKI shape -----------------------------------------------------------------------------


def test_pki_files_and_modes(pki: Pki) -> None:
    assert pki.envoy.spiffe_id == "spiffe://cluster.local/ns/edge/sa/envoy"
    assert {name: pair.spiffe_id for name, pair in pki.workloads.items()} == WORKLOADS
    for key in [pki.dir / "ca.key", pki.envoy.key, *(p.key for p in pki.workloads.values())]:
        assert key.stat().st_mode & 0o777 == 0o600
        assert b"BEGIN PRIVATE KEY" in key.read_bytes()


def _grpc_ext_authz_filters(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, dict):
        if "grpc_service" in doc and "failure_mode_allow" in doc:
            yield doc
        for value in doc.values():
            yield from _grpc_ext_authz_filters(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _grpc_ext_authz_filters(value)


@pytest.mark.parametrize("name", ["envoy.yaml", "deploy/envoy/sidecar.yaml"])
def test_grpc_fronts_send_every_request_header(name: str) -> None:
    """Over gRPC, extauthz asks Envoy to remove only the credential headers it saw: a gRPC
    ext_authz filter limited by allowed_headers would let an unseen one reach the upstream."""
    import yaml

    filters = list(_grpc_ext_authz_filters(yaml.safe_load((ROOT / name).read_text())))
    assert filters, f"no gRPC ext_authz filter found in {name}"
    for config in filters:
        assert "allowed_headers" not in config
