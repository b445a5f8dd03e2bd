"""The processes under test: ``extauthz serve``, the allow-all floor, and Envoy in front.

Each is a child process on loopback with its log in the run's work directory. We keep the pid
(for CPU and memory from /proc) and stop what we started, by that pid, on the way out.
"""

from __future__ import annotations

import copy
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.fixtures import Setup

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    from extauthz.demo.stack import free_port as _free

    return _free()


def free_port_pair() -> int:
    """A port P with P+1 free too (``--workers 2`` listens on both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports on loopback")


class Proc:
    """A child process we started; ``stop`` sends SIGTERM to it (never to anything else)."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, stdout: Any = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with log.open("ab") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else err,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _http_status(port: int, path: str) -> int | None:
    from extauthz.demo.stack import http_get

    try:
        status, _ = http_get(port, path, timeout=1.0)
        return status
    except OSError:
        return None


class Serve(Proc):
    """``extauthz serve`` on a generated policy. The decision log stays on (as in
    production) and goes to /dev/null; stderr to ``serve-*.log``."""

    def __init__(
        self,
        setup: Setup,
        workdir: Path,
        *,
        workers: int = 1,
        extra: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self.grpc_port = free_port_pair() if workers > 1 else free_port()
        self.admin_port = free_port()
        self.workers = workers
        self.setup = setup
        argv = [
            sys.executable, "-m", "extauthz", "serve",
            "--policy", str(setup.policy),
            "--signing-key", str(setup.signing_key_file),
            "--grpc-address", f"{LOOPBACK}:{self.grpc_port}",
            "--admin-address", f"{LOOPBACK}:{self.admin_port}",
            "--workers", str(workers),
            "--drain-delay", "0",
            "--grace", "1",
            "--log-level", "WARNING",
            *extra,
        ]  # fmt: skip
        name = name or f"serve-{setup.rules}r-{workers}w"
        super().__init__(name, argv, workdir / f"{name}.log", stdout=subprocess.DEVNULL)
        self.ready_s: float | None = None

    @property
    def grpc_targets(self) -> list[str]:
        return [f"{LOOPBACK}:{self.grpc_port + i}" for i in range(self.workers)]

    def ready(self) -> bool:
        self.check_alive()
        if _http_status(self.admin_port, "/readyz") == 200:
            if self.ready_s is None:
                self.ready_s = round(time.monotonic() - self.started, 2)
            return True
        return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s:\n{self.tail()}")

    def metrics(self) -> str:
        from extauthz.demo.stack import http_get

        status, body = http_get(self.admin_port, "/metrics", timeout=5)
        return body.decode("utf-8", "replace") if status == 200 else ""

    def worker_pids(self) -> list[int]:
        from bench.loadgen import children_of

        return children_of(self.pid) if self.workers > 1 else [self.pid]


class Floor(Proc):
    """``python -m bench.floor``: the same GrpcFront around an allow-all Sidecar."""

    def __init__(self, workdir: Path) -> None:
        self.grpc_port = free_port()
        self.out = workdir / "floor.out"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.out.open("wb")
        argv = [sys.executable, "-m", "bench.floor", "--port", str(self.grpc_port)]
        super().__init__("floor", argv, workdir / "floor.log", stdout=self._out)

    @property
    def grpc_targets(self) -> list[str]:
        return [f"{LOOPBACK}:{self.grpc_port}"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.out.read_text(errors="replace").startswith("READY"):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"floor not ready within {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        self._out.close()


# --- Envoy ------------------------------------------------------------------------------------


def envoy_config(
    pki: Any, *, listen_port: int, admin_port: int, authz_ports: Sequence[int], ext_authz: bool
) -> dict[str, Any]:
    """The shipped envoy.yaml rendered onto our ports and PKI, with the route answering 200
    itself (``direct_response``), so no upstream is measured; without ``ext_authz`` the filter
    is removed too (Envoy alone)."""
    from extauthz.demo.envoy import load_base_config, render_config

    config = render_config(
        load_base_config(),
        listen_port=listen_port,
        authz_ports=list(authz_ports),
        upstream_port=free_port(),
        admin_port=admin_port,
        cert_dir=pki.dir,
    )
    config = copy.deepcopy(config)
    listener = next(
        x for x in config["static_resources"]["listeners"] if x.get("name") == "ingress"
    )
    for chain in listener["filter_chains"]:
        for flt in chain["filters"]:
            hcm = flt["typed_config"]
            for vhost in hcm["route_config"]["virtual_hosts"]:
                vhost["routes"] = [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                    }
                ]
            if not ext_authz:
                hcm["http_filters"] = [
                    f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"
                ]
    return config


class EnvoyProc(Proc):
    """Envoy as the project runs it (``--concurrency 1``), from ``extauthz.demo.envoy``."""

    def __init__(self, name: str, pki: Any, workdir: Path, *, authz_ports: Sequence[int],
                 ext_authz: bool) -> None:  # fmt: skip
        import yaml

        from extauthz.demo.envoy import envoy_binary

        self.listen_port = free_port()
        self.admin_port = free_port()
        config = envoy_config(
            pki,
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            authz_ports=authz_ports,
            ext_authz=ext_authz,
        )
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "envoy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        argv = [
            envoy_binary(), "-c", str(path),
            "--base-id", str(1 + secrets.randbelow(1 << 20)),
            "--log-level", "warning", "--concurrency", "1", "--disable-hot-restart",
        ]  # fmt: skip
        super().__init__(name, argv, directory / "envoy.log")

    def wait_live(self, timeout: float = 30.0) -> None:
        from extauthz.demo.stack import http_get

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, body = http_get(self.admin_port, "/ready", timeout=1.0)
                if status == 200 and body.strip() == b"LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy {self.name} not LIVE within {timeout:.0f}s:\n{self.tail()}")
