"""The processes under test: ``extauthz serve``, the allow-all floor, Envoy in front of them,
and the client-side Envoy that wrk's requests go through.

They are the demo's own helpers (``SidecarProcess``, ``Envoy``), so the benchmark starts,
awaits and stops them as the demo and the end-to-end tests do; the pid of each (for CPU and
memory from /proc) is found among our children by an argument only it has.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.fixtures import Setup
from bench.loadgen import children_of
from extauthz.demo.envoy import Envoy, load_base_config, outbound_config, render_config
from extauthz.demo.pki import CertPair, Pki
from extauthz.demo.stack import LOOPBACK, SidecarProcess, free_port


def child_pid(argument: str) -> int:
    for pid in children_of(os.getpid()):
        with contextlib.suppress(OSError):  # a child that has just exited
            if argument.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
    raise RuntimeError(f"no child process with {argument!r} in its command line")


def free_port_pair() -> int:
    """A port P with P+1 free too (``--workers 2`` listens on both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind((LOOPBACK, port + 1))
            return port
    raise RuntimeError("no two adjacent free ports on loopback")


class _Child(SidecarProcess):
    workers, pid = 1, 0

    def start(self, timeout: float = 300.0) -> None:
        super().start(timeout)
        self.pid = child_pid(f"{LOOPBACK}:{self.grpc_port}")

    @property
    def grpc_targets(self) -> list[str]:
        return [f"{LOOPBACK}:{self.grpc_port + i}" for i in range(self.workers)]


class Serve(_Child):
    """``extauthz serve`` on a generated policy, with the decision log on, as in production.
    ``front="http"`` serves the HTTP front (``http_port``) besides gRPC; with ``--workers``
    the supervisor opens that one port and every worker inherits it."""

    def __init__(self, setup: Setup, workdir: Path, *, workers: int = 1,
                 front: str = "grpc") -> None:  # fmt: skip
        self.setup, self.workers = setup, workers
        port = free_port_pair() if workers > 1 else free_port()
        extra = ["--workers", str(workers), "--drain-delay", "0", "--grace", "1"]
        name = f"serve-{setup.rules}-rules-{workers}-workers-{front}"
        super().__init__(setup.policy, [setup.signing_key_file], workdir / name, grpc_port=port,
                         extra_args=extra, front=front)  # fmt: skip
        self.decision_log = Path(os.devnull)  # a long run would fill the disk otherwise


class Floor(_Child):
    """``python -m bench.floor``: the same GrpcFront and HttpFront around an allow-all
    Sidecar; no policy."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(Path(os.devnull), [], workdir / "floor", front="http")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.floor",
                "--grpc-address", f"{LOOPBACK}:{self.grpc_port}",
                "--http-address", f"{LOOPBACK}:{self.http_port}",
                "--admin-address", f"{LOOPBACK}:{self.admin_port}"]  # fmt: skip


class BenchEnvoy(Envoy):
    """The shipped envoy.yaml (``front="http"``: envoy-http.yaml) on our ports and PKI, with the
    route answering 200 itself (``direct_response``) so that no upstream is measured; without
    ``ext_authz`` the filter is removed too (Envoy alone)."""

    def __init__(self, name: str, pki: Pki, workdir: Path, *, authz_ports: Sequence[int],
                 ext_authz: bool = True, front: str = "grpc") -> None:  # fmt: skip
        self.listen_port, self.pid = free_port(), 0
        config = render_config(load_base_config(front), listen_port=self.listen_port,
                               authz_ports=authz_ports, upstream_port=free_port(),
                               admin_port=free_port(), cert_dir=pki.dir)  # fmt: skip
        answer = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
        for listener in config["static_resources"]["listeners"]:
            for hcm in (f["typed_config"] for c in listener["filter_chains"] for f in c["filters"]):
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    vhost["routes"] = [answer]
                if not ext_authz:
                    filters = hcm["http_filters"]
                    hcm["http_filters"] = [f for f in filters if "ext_authz" not in f["name"]]
        self.config_file = workdir / name / "envoy.yaml"
        super().__init__(config, self.config_file.parent)

    def start(self, timeout: float = 30) -> None:
        super().start(timeout)
        self.pid = child_pid(str(self.config_file))


class ClientEnvoy(Envoy):
    """The client side of the wrk path: wrk cannot present a client certificate, so it sends
    plain HTTP/1.1 to this Envoy (``--concurrency 1``, like the server side), which originates
    mTLS with a workload certificate to a server-side Envoy. One plain listener on loopback per
    server-side Envoy (``upstreams``: name -> that Envoy's port), each with its own cluster:
    HTTP/1.1 upstream (one TLS keep-alive connection per request in flight, as the Python
    generator keeps), no request id generated, no ``x-envoy-*`` headers added, circuit
    breakers out of the way. ``listen_ports`` maps the same names to the plain ports."""

    def __init__(self, pki: Pki, pair: CertPair, workdir: Path,
                 upstreams: dict[str, int]) -> None:  # fmt: skip
        self.listen_ports, self.pid = {name: free_port() for name in upstreams}, 0
        self.config_file = workdir / "client-envoy" / "envoy.yaml"
        config = client_config(pki, pair, upstreams, self.listen_ports, free_port())
        super().__init__(config, self.config_file.parent)

    def start(self, timeout: float = 30) -> None:
        super().start(timeout)
        self.pid = child_pid(str(self.config_file))


def client_config(pki: Pki, pair: CertPair, upstreams: dict[str, int],
                  listen_ports: dict[str, int], admin_port: int) -> dict[str, Any]:  # fmt: skip
    """The client-side Envoy's bootstrap (see ``ClientEnvoy``): the demo's outbound Envoy,
    presenting ``pair``'s certificate and trusting ``pki``'s CA."""
    return outbound_config(ca=pki.ca, client=pair, upstreams=upstreams,
                           listen_ports=listen_ports, admin_port=admin_port)  # fmt: skip
