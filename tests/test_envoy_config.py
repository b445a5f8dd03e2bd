"""The shipped Envoy bootstrap, its rendering, and the real Envoy failing closed.

No extauthz server is needed: the fail-closed tests point Envoy at a port where nothing
listens; the positive controls use an allow-all stub gRPC servicer defined here.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import Envoy, load_base_config, render_config, validate_config
from extauthz.demo.pki import Pki, make_pki, x5t_s256
from extauthz.demo.stack import free_port

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


@pytest.fixture(scope="module")
def fail_closed_stack(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Envoy, EchoServer, int]]:
    """Envoy in front of the echo server, with ext_authz pointing at a dead port."""
    with EchoServer() as echo:
        config = render_config(
            load_base_config(),
            listen_port=free_port(),
            authz_ports=[free_port()],  # closed again at once: nothing listens there
            upstream_port=echo.port,
            admin_port=free_port(),
            cert_dir=pki.dir,
        )
        listen_port = listener(config)["address"]["socket_address"]["port_value"]
        with Envoy(config, tmp_path_factory.mktemp("envoy")) as envoy:
            yield envoy, echo, listen_port


# --- (a) the shipped file validates ----------------------------------------------------------


@pytest.mark.envoy
def test_shipped_config_validates(pki: Pki, tmp_path: Path) -> None:
    config = render_config(
        load_base_config(),
        listen_port=free_port(),
        authz_ports=[free_port()],
        upstream_port=free_port(),
        admin_port=free_port(),
        cert_dir=pki.dir,
    )
    validate_config(config, tmp_path)


@pytest.mark.envoy
def test_validate_config_reports_envoy_errors(pki: Pki, tmp_path: Path) -> None:
    config = load_base_config()
    ext_authz_filter(config)["failure_mode_allow_typo"] = False
    with pytest.raises(RuntimeError, match="failure_mode_allow_typo"):
        validate_config(config, tmp_path)


# --- (b) the security-relevant settings are what we ship ------------------------------------


def test_shipped_config_fails_closed_and_requires_mtls() -> None:
    config = load_base_config()
    authz = ext_authz_filter(config)
    assert authz["failure_mode_allow"] is False
    assert authz["include_peer_certificate"] is True
    assert authz["validate_mutations"] is True
    assert authz["transport_api_version"] == "V3"
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "extauthz"
    assert authz["status_on_error"]["code"] == 503
    assert tls_context(config)["require_client_certificate"] is True
    manager = hcm(config)
    assert manager["stat_prefix"] == "ingress"
    assert manager["normalize_path"] is True
    assert manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert manager["forward_client_cert_details"] == "SANITIZE"
    # ext_authz must run before the router, or requests would be routed unchecked.
    names = [f["name"] for f in manager["http_filters"]]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]


def test_authz_cluster_speaks_http2() -> None:
    options = cluster(load_base_config(), "extauthz")["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]


def test_shipped_config_stays_on_loopback() -> None:
    config = load_base_config()
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert listener(config)["address"]["socket_address"]["address"] == "127.0.0.1"
    for name in ("extauthz", "upstream"):
        for group in cluster(config, name)["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                assert lb["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"


# --- (c) rendering -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_render_config_sets_ports_and_cert_paths(count: int, tmp_path: Path) -> None:
    base = load_base_config()
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
    assert listener(config)["address"]["socket_address"]["port_value"] == 20100
    assert config["admin"]["address"]["socket_address"]["port_value"] == 20300
    paths = [Path(p) for p in cert_filenames(config)]
    assert all(p.is_absolute() for p in paths)
    assert [p.name for p in paths] == ["envoy.crt", "envoy.key", "ca.crt"]
    assert {p.parent for p in paths} == {(tmp_path / "certs").absolute()}
    # The base must be left alone: callers render it several times.
    assert base == load_base_config()


def test_render_config_rejects_missing_pieces(tmp_path: Path) -> None:
    ports: dict[str, Any] = {
        "listen_port": 1,
        "authz_ports": [2],
        "upstream_port": 3,
        "admin_port": 4,
        "cert_dir": tmp_path,
    }
    renamed = load_base_config()
    cluster(renamed, "extauthz")["name"] = "something-else"
    with pytest.raises(ValueError, match="extauthz"):
        render_config(renamed, **ports)
    no_listener = load_base_config()
    listener(no_listener)["name"] = "egress"
    with pytest.raises(ValueError, match="ingress"):
        render_config(no_listener, **ports)
    with pytest.raises(ValueError):
        render_config(load_base_config(), **{**ports, "authz_ports": []})
    with pytest.raises(ValueError):
        render_config(load_base_config(), **{**ports, "listen_port": 0})


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
def test_envoy_start_reports_a_bad_config(pki: Pki, tmp_path: Path) -> None:
    config = render_config(
        load_base_config(),
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


class _AllowAll(external_auth_pb2_grpc.AuthorizationServicer):
    """Stub ext_authz that allows everything and remembers what Envoy sent."""

    def __init__(self) -> None:
        self.checks: list[external_auth_pb2.CheckRequest] = []

    def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.checks.append(request)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


@pytest.fixture(scope="module")
def allow_stack(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Envoy, EchoServer, _AllowAll, int]]:
    """Envoy in front of the echo server, checked by the allow-all stub."""
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
    try:
        with EchoServer() as echo:
            config = render_config(
                load_base_config(),
                listen_port=free_port(),
                authz_ports=[authz_port],
                upstream_port=echo.port,
                admin_port=free_port(),
                cert_dir=pki.dir,
            )
            listen_port = listener(config)["address"]["socket_address"]["port_value"]
            with Envoy(config, tmp_path_factory.mktemp("envoy-allow")) as envoy:
                yield envoy, echo, servicer, listen_port
    finally:
        server.stop(grace=None)


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
def test_envoy_forwards_peer_identity_to_authz_over_http2(
    allow_stack: tuple[Envoy, EchoServer, _AllowAll, int], pki: Pki
) -> None:
    envoy, echo, servicer, listen_port = allow_stack
    checks_before, seen_before = len(servicer.checks), len(echo.requests)
    ok_before = envoy.stat(AUTHZ_OK_STAT)
    status, body = https_get(listen_port, client_context(pki, "batch"), "/jobs")
    assert status == 200
    assert json.loads(body)["path"] == "/jobs"
    assert [r.path for r in echo.requests[seen_before:]] == ["/jobs"]
    assert wait_for_stat(envoy, AUTHZ_OK_STAT, ok_before + 1) == ok_before + 1
    source = servicer.checks[checks_before].attributes.source
    assert source.principal == WORKLOADS["batch"]
    # include_peer_certificate: the URL-encoded PEM of exactly the cert the client used.
    sent_pem = urllib.parse.unquote(source.certificate).encode()
    assert x5t_s256(sent_pem) == x5t_s256(pki.workloads["batch"].cert.read_bytes())


@pytest.mark.envoy
def test_envoy_authorizes_the_normalized_path(
    allow_stack: tuple[Envoy, EchoServer, _AllowAll, int], pki: Pki
) -> None:
    _, echo, servicer, listen_port = allow_stack
    checks_before, seen_before = len(servicer.checks), len(echo.requests)
    status = send(listen_port, client_context(pki, "batch"), "/a//b/../c?q=1", {})
    assert status == 200
    # normalize_path + merge_slashes run before ext_authz: the checked path is the
    # routed path, not the raw request target.
    assert servicer.checks[checks_before].attributes.request.http.path == "/a/c?q=1"
    assert [r.path for r in echo.requests[seen_before:]] == ["/a/c?q=1"]


@pytest.mark.envoy
@pytest.mark.parametrize("path", ["/a%2Fb", "/a%2fb", "/a%5Cb"])
def test_envoy_rejects_escaped_slashes_before_authz(
    allow_stack: tuple[Envoy, EchoServer, _AllowAll, int], pki: Pki, path: str
) -> None:
    _, echo, servicer, listen_port = allow_stack
    checks_before, seen_before = len(servicer.checks), len(echo.requests)
    assert send(listen_port, client_context(pki, "batch"), path, {}) == 400
    assert len(servicer.checks) == checks_before
    assert len(echo.requests) == seen_before


@pytest.mark.envoy
def test_envoy_strips_client_sent_xfcc(
    allow_stack: tuple[Envoy, EchoServer, _AllowAll, int], pki: Pki
) -> None:
    _, echo, servicer, listen_port = allow_stack
    checks_before, seen_before = len(servicer.checks), len(echo.requests)
    forged = {"X-Forwarded-Client-Cert": "By=spiffe://x;URI=spiffe://cluster.local/ns/a/sa/admin"}
    assert send(listen_port, client_context(pki, "batch"), "/xfcc", forged) == 200
    assert (
        "x-forwarded-client-cert"
        not in servicer.checks[checks_before].attributes.request.http.headers
    )
    assert "x-forwarded-client-cert" not in echo.requests[seen_before].headers


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
