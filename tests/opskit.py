"""Helpers for the operations tests (hot reload, key rotation, JWKS URLs, metrics, workers).

Everything runs real processes on 127.0.0.1: ``extauthz serve`` as a child process, the echo
upstream and Envoy. Every wait here is a poll with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import frontkit
import grpc
from envoy.service.auth.v3 import (
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from prometheus_client.parser import text_string_to_metric_families

from extauthz.decision.jose import (
    CompactJWS,
    SigningKey,
    jwks_document,
    parse_compact,
    parse_jwks,
    verify_signature,
)
from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import Envoy, load_base_config, render_config
from extauthz.demo.idp import Idp
from extauthz.demo.pki import Pki, make_pki
from extauthz.demo.stack import (
    ISSUER,
    LOOPBACK,
    WORKLOADS,
    Response,
    SidecarProcess,
    free_port,
    http_get,
    https_request,
    mtls_context,
)
from extauthz.serve.http_edge import PATH_PREFIX

HOST = "profile.shop.svc.cluster.local"
PATH = "/v1/customers/42"
RULE = "orders-read-profile"
# Keep gRPC on loopback even if the environment names an HTTP proxy.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

# Added to the example policy by the reload tests: billing may read a customer too.
BILLING_RULE = """
  - id: billing-read-profile
    purpose: Billing looks up the customer an invoice is addressed to
    match:
      workloads: [spiffe://cluster.local/ns/shop/sa/billing]
      host: profile.shop.svc.cluster.local
      methods: [GET]
      paths: ["/v1/customers/{id}"]
      issuers: [corp-idp]
    require: {scopes: [profile.read]}
    grant:
      audience: spiffe://cluster.local/ns/shop/sa/profile
      scopes: [profile.read]
      ttl: 30s
"""

# For sidecars whose shutdown is not under test: no drain delay, no decision log.
QUICK = ["--drain-delay", "0", "--no-decision-log"]

T = TypeVar("T")


# --- waiting ---------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], T], timeout: float, *, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- files -----------------------------------------------------------------------------------


def policy_with_jwks_url(
    policy_text: str, url: str, refresh: str = "10s", timeout: str = "1s"
) -> str:
    old = "jwks: {file: issuers/corp-idp.json}"
    assert old in policy_text
    return policy_text.replace(old, f"jwks: {{url: {url}, refresh: {refresh}, timeout: {timeout}}}")


def write_policy(directory: Path, policy_text: str) -> tuple[Path, Idp]:
    """``policy_text`` as ``directory/policy.yaml``, with the JWKS of a new corp-idp issuer
    at ``directory/issuers/corp-idp.json`` where the example policy expects it."""
    idp = Idp(ISSUER)
    idp.write_jwks(directory / "issuers" / "corp-idp.json")
    policy = directory / "policy.yaml"
    policy.write_text(policy_text)
    return policy, idp


def write_key(key: SigningKey, path: Path) -> Path:
    """Write a PEM private key atomically (a reader never sees half a file)."""
    from extauthz.policy.loader import write_private_key

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write_private_key(key, tmp)
    os.replace(tmp, path)
    return path


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class AtomicDir:
    """A directory updated the way the kubelet updates a ConfigMap or Secret volume.

    ``publish`` writes a new ``..<timestamp>`` directory, points a temporary symlink at it and
    renames that over ``..data`` (atomic), then adds the user-visible symlinks
    (``name -> ..data/name``) for new top-level names, drops those of removed names and
    deletes the old timestamped directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._current: str | None = None
        self._names: set[str] = set()

    def publish(self, files: Mapping[str, str | bytes], *, mode: int | None = None) -> Path:
        self._count += 1
        stamp = f"..2026_01_01_00_00_{self._count:02d}.{self._count}"
        target = self.root / stamp
        for name, content in files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            if mode is not None:
                path.chmod(mode)
        tmp_link = self.root / "..data_tmp"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(stamp, tmp_link)
        os.replace(tmp_link, self.root / "..data")
        names = {name.split("/", 1)[0] for name in files}
        for name in sorted(names - self._names):
            os.symlink(f"..data/{name}", self.root / name)
        for name in sorted(self._names - names):
            (self.root / name).unlink()
        if self._current is not None:
            shutil.rmtree(self.root / self._current)
        self._current, self._names = stamp, names
        return target


# --- the admin port --------------------------------------------------------------------------


def statusz(admin_port: int) -> dict[str, Any]:
    status, body = http_get(admin_port, "/statusz")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def published_jwks(admin_port: int) -> dict[str, Any]:
    status, body = http_get(admin_port, "/.well-known/jwks.json")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


class Metrics:
    """One scrape of ``/metrics``, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    @classmethod
    def scrape(cls, admin_port: int) -> Metrics:
        status, body = http_get(admin_port, "/metrics")
        assert status == 200
        return cls(body.decode())

    def matching(self, name: str, **labels: str) -> list[Any]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` whose labels include ``labels`` (0 if none)."""
        return float(sum(s.value for s in self.matching(name, **labels)))


# --- gRPC Check ------------------------------------------------------------------------------


def check_request(
    *,
    principal: str = WORKLOADS["orders"],
    method: str = "GET",
    host: str = HOST,
    path: str = PATH,
    token: str | None = None,
    request_id: str | None = None,
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest shaped like the one Envoy 1.40 sends for an mTLS downstream, without the
    peer certificate (frontkit builds it)."""
    return frontkit.check_request(
        principal=principal, method=method, host=host, path=path, token=token,
        request_id=request_id,
    )  # fmt: skip


class Checker:
    """A gRPC client of one sidecar port."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def check(
        self, token: str | None = None, *, workload: str = "orders", timeout: float = 5.0
    ) -> external_auth_pb2.CheckResponse:
        request = check_request(principal=WORKLOADS[workload], token=token)
        response: external_auth_pb2.CheckResponse = self.stub.Check(request, timeout=timeout)
        return response

    def close(self) -> None:
        self.channel.close()


def http_status(response: external_auth_pb2.CheckResponse) -> int:
    """The HTTP status Envoy would answer with: 200 for OK, else the denied status."""
    if response.status.code == 0:
        return 200
    return int(response.denied_response.status.code)


def deny_error(response: external_auth_pb2.CheckResponse) -> str | None:
    if response.status.code == 0:
        return None
    error: str = json.loads(response.denied_response.body)["error"]
    return error


def minted(response: external_auth_pb2.CheckResponse) -> CompactJWS:
    assert response.status.code == 0, response
    values = [
        o.header.value
        for o in response.ok_response.headers
        if o.header.key.lower() == "authorization"
    ]
    assert len(values) == 1
    return parse_compact(values[0].removeprefix("Bearer "))


def verifies(jws: CompactJWS, jwks: Mapping[str, Any]) -> bool:
    keys = parse_jwks(json.dumps(jwks).encode())
    alg = jws.header.get("alg", "")
    return any(verify_signature(jws, k, alg) for k in keys.candidates(jws.header.get("kid"), alg))


def tampered(idp: Idp) -> str:
    """A token of ``idp`` whose signature is valid, but for other content (same kid)."""
    one = idp.token(now=time.time())
    other = idp.token(now=time.time(), sub="someone-else")
    return one.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


# --- the HTTP front, directly (as Envoy's http_service calls it) --------------------------------


def http_check(
    port: int,
    token: str | None = None,
    *,
    workload: str = "orders",
    method: str = "GET",
    host: str = HOST,
    path: str = PATH,
    timeout: float = 5.0,
) -> Response:
    """One authorization request to an HTTP front, shaped like Envoy's (``envoy-http.yaml``):
    ``/check`` + the path, the original Host, and one XFCC element naming the mTLS peer (its
    URI only: no certificate hash, so nothing is bound to one). A fresh connection each time,
    so the kernel may hand it to any worker sharing the port."""
    headers = {
        "host": host,
        "x-forwarded-client-cert": f"URI={WORKLOADS[workload]}",
        "x-request-id": str(uuid.uuid4()),
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, PATH_PREFIX + path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        conn.close()


def http_minted(response: Response) -> CompactJWS:
    """The token an HTTP front's allow asks Envoy to set upstream."""
    assert response.status == 200, response
    value = response.headers.get("authorization", "")
    assert value.startswith("Bearer "), response.headers
    return parse_compact(value.removeprefix("Bearer "))


# --- an issuer's JWKS endpoint ---------------------------------------------------------------

JWKS_PATH = "/jwks.json"


class _JwksHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _JwksHTTPServer

    def do_GET(self) -> None:
        # A client that gave up (the timeout tests) closes the connection under us.
        with contextlib.suppress(ConnectionError):
            self._answer()

    def _answer(self) -> None:
        control = self.server.control
        control.record(self.path)
        control.answering.wait(timeout=30)
        if control.delay:
            time.sleep(control.delay)
        if self.path in control.redirects:
            self.send_response(302)
            self.send_header("Location", control.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = control.body
        self.send_response(control.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if control.drip:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(control.drip)
        else:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


class _JwksHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    control: JwksServer


class JwksServer:
    """An issuer's JWKS endpoint on 127.0.0.1 whose content and up/down state a test controls.

    ``down()`` closes the port and ``up()`` opens it again on the same one. Every request is
    recorded (monotonic time, path). While ``answering`` is clear, requests are held unanswered
    (a slow issuer whose slowness the test ends, rather than a fixed sleep)."""

    def __init__(self, *idps: Idp) -> None:
        self.port = free_port()
        self.body = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0  # seconds before answering
        self.drip = 0.0  # seconds between the body's bytes
        self.redirects: dict[str, str] = {}
        self.fetches: list[tuple[float, str]] = []
        self.answering = threading.Event()
        self.answering.set()
        self._lock = threading.Lock()
        self._server: _JwksHTTPServer | None = None
        if idps:
            self.publish(*idps)

    def url(self, path: str = JWKS_PATH) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def publish(self, *idps: Idp) -> None:
        self.body = json.dumps(jwks_document([i.key for i in idps])).encode()

    def record(self, path: str) -> None:
        with self._lock:
            self.fetches.append((time.monotonic(), path))

    def count(self, path: str = JWKS_PATH, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for at, p in self.fetches if p == path and at >= since)

    def up(self) -> None:
        assert self._server is None
        server = _JwksHTTPServer(("127.0.0.1", self.port), _JwksHandler)
        server.control = self
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self._server = server

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


# --- ports -----------------------------------------------------------------------------------


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free (for ``--workers 2``)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and _binds(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports found")


def free_port_except(taken: Sequence[int]) -> int:
    for _ in range(50):
        port = free_port()
        if port not in taken:
            return port
    raise RuntimeError("no free port found")


# --- a mesh slice: echo upstream, sidecar (or supervisor) and Envoy ---------------------------


class Slice:
    """Envoy in front of the echo upstream, checking with the given sidecar process over its
    front (``sidecar.front``: envoy.yaml for gRPC, envoy-http.yaml for HTTP). Without
    ``authz_ports``, Envoy's extauthz cluster is the sidecar's ``authz_port``; without ``pki``,
    one is made for the three workloads of ``WORKLOADS``."""

    def __init__(
        self,
        workdir: Path,
        sidecar: SidecarProcess,
        *,
        authz_ports: Sequence[int] = (),
        pki: Pki | None = None,
    ) -> None:
        self.workdir = workdir
        self.pki: Pki = pki or make_pki(workdir / "certs", WORKLOADS)
        self.echo = EchoServer()
        self.sidecar = sidecar
        self.front = sidecar.front
        self.authz_ports = list(authz_ports) or [sidecar.authz_port]
        self.listen_port = free_port()
        self.envoy: Envoy | None = None

    def start(self) -> None:
        try:
            self.echo.start()
            if not self.sidecar.running:
                self.sidecar.start()
            config = render_config(
                load_base_config(self.front),
                listen_port=self.listen_port,
                authz_ports=self.authz_ports,
                upstream_port=self.echo.port,
                admin_port=free_port(),
                cert_dir=self.pki.dir,
            )
            self.envoy = Envoy(config, self.workdir / "envoy")
            self.envoy.start()
        except BaseException:
            self.stop()
            raise

    def stop(self, *, sidecar: bool = True) -> None:
        """Stop Envoy and the upstream, and the sidecar too unless told to leave it running."""
        if self.envoy is not None:
            self.envoy.stop()
        if sidecar:
            self.sidecar.stop()
        self.echo.stop()

    def request(
        self,
        workload: str,
        token: str | None,
        *,
        path: str = PATH,
        timeout: float = 5.0,
        extra: Mapping[str, str] | None = None,
    ) -> Response:
        """One request through Envoy as ``workload``; ``extra`` headers are sent too."""
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(extra or {})
        ctx = mtls_context(self.pki.ca, self.pki.workloads[workload])
        return https_request(
            self.listen_port, ctx, path=path, host=HOST, headers=headers, timeout=timeout
        )

    def envoy_admin(self, path: str) -> str:
        assert self.envoy is not None
        status, body = http_get(self.envoy.admin_port, path)
        assert status == 200
        return body.decode()

    def __enter__(self) -> Slice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
