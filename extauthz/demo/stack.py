"""Real processes on loopback: the sidecar as a subprocess, and an mTLS client for Envoy.

Used by ``extauthz demo`` and by the end-to-end tests, so both exercise the same wiring.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from extauthz.decision.jose import generate_signing_key
from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import Envoy, load_base_config, render_config
from extauthz.demo.idp import Idp
from extauthz.demo.lifecycle import Started
from extauthz.demo.pki import CertPair, make_pki
from extauthz.policy.loader import write_private_key

LOOPBACK = "127.0.0.1"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with _DIRECT.open(f"http://{LOOPBACK}:{port}{path}", timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


class SidecarProcess(Started):
    """``extauthz serve`` in a child process; the decision log goes to a file we can read.
    ``front="http"`` serves the HTTP front too (on ``http_port``), and ``authz_port`` is the
    port Envoy's ext_authz cluster should use for that front."""

    def __init__(
        self,
        policy: Path,
        signing_keys: Sequence[Path],
        workdir: Path,
        *,
        grpc_port: int | None = None,
        admin_port: int | None = None,
        extra_args: Sequence[str] = (),
        front: str = "grpc",
    ) -> None:
        if front not in ("grpc", "http"):
            raise ValueError(f"front must be grpc or http, not {front!r}")
        self.front = front
        self.http_port = free_port() if front == "http" else None
        self.policy = policy
        self.signing_keys = list(signing_keys)
        self.workdir = workdir
        self.grpc_port = grpc_port or free_port()
        self.admin_port = admin_port or free_port()
        self.extra_args = list(extra_args)
        self.decision_log = workdir / "decisions.jsonl"
        self.log = workdir / "sidecar.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "extauthz", "serve", "--policy", str(self.policy)]
        for key in self.signing_keys:
            cmd += ["--signing-key", str(key)]
        cmd += [
            "--grpc-address",
            f"{LOOPBACK}:{self.grpc_port}",
            "--admin-address",
            f"{LOOPBACK}:{self.admin_port}",
        ]
        if self.http_port is not None:
            cmd += ["--http-address", f"{LOOPBACK}:{self.http_port}"]
        return cmd + self.extra_args

    @property
    def authz_port(self) -> int:
        """Where Envoy sends checks for this sidecar's front."""
        return self.http_port if self.http_port is not None else self.grpc_port

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.decision_log.open("ab") as out, self.log.open("ab") as err:
            self._proc = subprocess.Popen(self.command(), stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"extauthz exited with {self._proc.returncode}:\n{self.tail()}")
            try:
                status, _ = http_get(self.admin_port, "/readyz", timeout=0.5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"extauthz not ready within {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def decisions(self) -> list[dict[str, Any]]:
        # The sidecar flushes its decision log every LOG_FLUSH_INTERVAL (0.1 s).
        time.sleep(0.3)
        if not self.decision_log.exists():
            return []
        lines = self.decision_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def mtls_context(ca: Path, client: CertPair | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def https_request(
    port: int,
    ctx: ssl.SSLContext,
    *,
    method: str = "GET",
    path: str = "/",
    host: str = "localhost",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request to Envoy's mTLS listener, with ``host`` as the Host header. ``headers`` as
    (name, value) pairs are sent line by line, so a name may repeat (two Authorization lines)."""
    lines = headers.items() if isinstance(headers, Mapping) else headers or ()
    conn = http.client.HTTPSConnection(LOOPBACK, port, context=ctx, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in lines:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


# --- a whole mesh slice: PKI, issuer, sidecar, echo upstream and Envoy ----------------------

ISSUER = "https://idp.example.com"
ISSUER_JWKS = "issuers/corp-idp.json"
WORKLOADS = {
    "orders": "spiffe://cluster.local/ns/shop/sa/orders",
    "checkout": "spiffe://cluster.local/ns/shop/sa/checkout",
    "billing": "spiffe://cluster.local/ns/shop/sa/billing",
}


class Mesh(Started):
    """Everything the demo and the end-to-end tests run, started in dependency order and
    stopped in reverse. ``policy_text`` defaults to the shipped example policy; its JWKS path
    ``issuers/corp-idp.json`` is written next to it from a throwaway issuer."""

    def __init__(
        self,
        workdir: Path,
        *,
        policy_text: str | None = None,
        workloads: Mapping[str, str] = WORKLOADS,
        sidecar_args: Sequence[str] = (),
        front: str = "grpc",
    ) -> None:
        self.workdir = workdir
        self.front = front
        workdir.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(workdir / "certs", workloads)
        self.idp = Idp(ISSUER)
        self.idp.write_jwks(workdir / ISSUER_JWKS)
        if policy_text is None:
            policy_text = (resources.files("extauthz") / "assets" / "policy.yaml").read_text()
        self.policy = workdir / "policy.yaml"
        self.policy.write_text(policy_text)
        self.signing_key = generate_signing_key()
        self.signing_key_file = workdir / "signing-key.pem"
        write_private_key(self.signing_key, self.signing_key_file)
        self.echo = EchoServer()
        self.sidecar = SidecarProcess(
            self.policy,
            [self.signing_key_file],
            workdir / "sidecar",
            extra_args=sidecar_args,
            front=front,
        )
        self.listen_port = free_port()
        self._envoy: Envoy | None = None

    @property
    def envoy(self) -> Envoy | None:
        return self._envoy

    def start(self) -> None:
        try:
            self.echo.start()
            self.sidecar.start()
            config = render_config(
                load_base_config(self.front),
                listen_port=self.listen_port,
                authz_ports=[self.sidecar.authz_port],
                upstream_port=self.echo.port,
                admin_port=free_port(),
                cert_dir=self.pki.dir,
            )
            self._envoy = Envoy(config, self.workdir / "envoy")
            (self.workdir / "envoy").mkdir(exist_ok=True)
            self._envoy.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._envoy is not None:
            self._envoy.stop()
        self.sidecar.stop()
        self.echo.stop()

    def client(self, workload: str | None) -> ssl.SSLContext:
        pair = self.pki.workloads[workload] if workload is not None else None
        return mtls_context(self.pki.ca, pair)

    def request(self, workload: str | None, **kwargs: Any) -> Response:
        return https_request(self.listen_port, self.client(workload), **kwargs)
