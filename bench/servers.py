"""The processes under test: ``extauthz serve``, the allow-all floor, and Envoy in front.

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

from bench.fixtures import Setup
from bench.loadgen import children_of
from extauthz.demo.envoy import Envoy, load_base_config, render_config
from extauthz.demo.pki import Pki
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
    """``extauthz serve`` on a generated policy, with the decision log on, as in production."""

    def __init__(self, setup: Setup, workdir: Path, *, workers: int = 1) -> None:
        self.setup, self.workers = setup, workers
        port = free_port_pair() if workers > 1 else free_port()
        extra = ["--workers", str(workers), "--drain-delay", "0", "--grace", "1"]
        name = f"serve-{setup.rules}-rules-{workers}-workers"
        super().__init__(setup.policy, [setup.signing_key_file], workdir / name, grpc_port=port,
                         extra_args=extra)  # fmt: skip
        self.decision_log = Path(os.devnull)  # a long run would fill the disk otherwise


class Floor(_Child):
    """``python -m bench.floor``: the same GrpcFront around an allow-all Sidecar; no policy."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(Path(os.devnull), [], workdir / "floor")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.floor",
                "--grpc-address", f"{LOOPBACK}:{self.grpc_port}",
                "--admin-address", f"{LOOPBACK}:{self.admin_port}"]  # fmt: skip


class BenchEnvoy(Envoy):
    """The shipped envoy.yaml on our ports and PKI, with the route answering 200 itself
    (``direct_response``) so that no upstream is measured; without ``ext_authz`` the filter is
    removed too (Envoy alone)."""

    def __init__(self, name: str, pki: Pki, workdir: Path, *, authz_ports: Sequence[int],
                 ext_authz: bool = True) -> None:  # fmt: skip
        self.listen_port, self.pid = free_port(), 0
        config = render_config(load_base_config(), listen_port=self.listen_port,
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
