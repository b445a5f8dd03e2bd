"""Three hops of transaction tokens through real processes, for tests/test_txn_hops.py.

A test client holding the ``gateway`` certificate calls the edge's inbound Envoy. Each hop is
an inbound Envoy (the shipped config, ext_authz to that hop's own sidecar) in front of a
relay: a small HTTP server that records the header lines it received and calls the next hop
through its workload's outbound Envoy (plain HTTP in, mTLS with the workload's certificate
out), passing on only the ``txn-token`` lines it received and the next hop's Host::

    client(gateway) -> [edge Envoy -> X_E] -> relay edge -> edge outbound Envoy
                    -> [A Envoy -> X_A]    -> relay a    -> a outbound Envoy
                    -> [B Envoy -> X_B]    -> relay b (the leaf)

The three sidecars share one policy file and one signing key: they are one exchange. Each
relay answers with what it received and what the next hop answered, so one response shows
what arrived at every hop. Everything listens on 127.0.0.1 only.

Token texts stay out of reprs (``repr=False``), so a failing assertion never prints one.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opskit import verifies, wait_for

from extauthz.decision.jose import generate_signing_key, parse_compact
from extauthz.demo.echo import ReceivedRequest
from extauthz.demo.envoy import Envoy, load_base_config, outbound_config, render_config
from extauthz.demo.idp import Idp
from extauthz.demo.lifecycle import Started
from extauthz.demo.pki import make_pki
from extauthz.demo.stack import (
    ISSUER,
    ISSUER_JWKS,
    LOOPBACK,
    Response,
    SidecarProcess,
    free_port,
    http_get,
    https_request,
    mtls_context,
)
from extauthz.policy.loader import write_private_key

TXN_TOKEN_HEADER = "txn-token"
PATH = "/v1/orders/7"
USER = "alice"
USER_AUDIENCE = "https://shop.example.com"
USER_SCOPE = "orders.read payments.charge profile.read email"


def spiffe(name: str) -> str:
    return f"spiffe://cluster.local/ns/shop/sa/{name}"


WORKLOADS = {name: spiffe(name) for name in ("gateway", "edge", "a", "b", "checkout")}
# The hops in call order, each with the Host its caller names.
HOSTS = {
    "edge": "edge.shop.svc.cluster.local",
    "a": "a.shop.svc.cluster.local",
    "b": "b.shop.svc.cluster.local",
}
HOPS = tuple(HOSTS)
# Sidecars whose shutdown is not under test: no drain delay, a short grace.
SIDECAR_ARGS = ("--drain-delay", "0", "--grace", "1")
_CALL_TIMEOUT_S = 10.0


# --- the relay -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NextHop:
    port: int  # the plain listener of the caller's outbound Envoy
    host: str  # the Host header the next hop is called with


class _RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        super().__init__((LOOPBACK, 0), _RelayHandler)


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RelayServer

    def do_GET(self) -> None:
        self.server.relay.answer(self)

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes request lines to stderr; headers here carry tokens.
        return


class Relay(Started):
    """An upstream that records every header line it received (repeats too, names lower-case)
    and, unless it is the leaf, calls ``next_hop`` with the ``txn-token`` lines exactly as
    received and nothing else but Host. It answers JSON ``{"hop", "headers": [[name, value],
    ...], "next": {"status", "body"} | null}`` with the next hop's status (502 when the next hop
    could not be reached), or 200 as the leaf."""

    def __init__(self, name: str, next_hop: NextHop | None = None) -> None:
        self.name = name
        self.next_hop = next_hop
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._server: _RelayServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"relay {self.name} is not started")
        return int(self._server.server_address[1])

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"relay {self.name} is already started")
        self._server = _RelayServer(self)
        threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"relay-{self.name}",
            daemon=True,
        ).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def answer(self, handler: _RelayHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        if length > 0:
            handler.rfile.read(length)
        raw = tuple((name.lower(), value) for name, value in handler.headers.items())
        received = ReceivedRequest(
            method=handler.command,
            path=handler.path,
            headers=dict(raw),
            raw_headers=raw,
            at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(received)
        status, after = 200, None
        if self.next_hop is not None:
            after = self._call_next(handler.path, received.values(TXN_TOKEN_HEADER))
            status = after["status"] if isinstance(after["status"], int) else 502
        body = json.dumps(
            {"hop": self.name, "headers": [list(line) for line in raw], "next": after}
        ).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _call_next(self, path: str, txn_tokens: list[str]) -> dict[str, Any]:
        assert self.next_hop is not None
        conn = http.client.HTTPConnection(LOOPBACK, self.next_hop.port, timeout=_CALL_TIMEOUT_S)
        try:
            conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.next_hop.host)
            for value in txn_tokens:
                conn.putheader(TXN_TOKEN_HEADER, value)
            conn.endheaders()
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return {"status": None, "body": None, "error": type(exc).__name__}
        finally:
            conn.close()
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        return {"status": response.status, "body": body}


# --- what came back --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """What one relay received, and the status its caller got from that hop's Envoy."""

    hop: str
    status: int
    headers: tuple[tuple[str, str], ...] = field(repr=False)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.headers]

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def __repr__(self) -> str:
        return f"Arrival(hop={self.hop!r}, status={self.status}, header_names={self.names})"


@dataclass(frozen=True, slots=True)
class Chain:
    """The client's status, the hops reached in order, and the body of the first answer that
    did not come from a relay (an Envoy or sidecar deny: ``{"error": ...}``), if any."""

    status: int
    arrivals: tuple[Arrival, ...]
    end: Any = None

    @property
    def hops(self) -> list[str]:
        return [arrival.hop for arrival in self.arrivals]

    def at(self, hop: str) -> Arrival:
        for arrival in self.arrivals:
            if arrival.hop == hop:
                return arrival
        raise AssertionError(f"hop {hop} was not reached: {self!r}")


def chain_of(response: Response) -> Chain:
    status = response.status
    try:
        body: Any = response.json()
    except ValueError:
        return Chain(status, (), None)
    arrivals = []
    while isinstance(body, dict) and "hop" in body:
        headers = tuple((str(name), str(value)) for name, value in body["headers"])
        arrivals.append(Arrival(str(body["hop"]), status, headers))
        after = body.get("next")
        if after is None:
            return Chain(response.status, tuple(arrivals))
        status, body = after["status"], after["body"]
    return Chain(response.status, tuple(arrivals), body)


@dataclass(frozen=True, slots=True)
class HopToken:
    """The one Txn-Token a relay received: its JOSE header and claims, and whether its
    signature verifies against the JWKS of each hop's sidecar."""

    hop: str
    header: dict[str, Any]
    claims: dict[str, Any]
    verifies_with: dict[str, bool]
    text: str = field(repr=False, compare=False)

    @property
    def scopes(self) -> set[str]:
        return set(str(self.claims.get("scope", "")).split())


def hop_token(arrival: Arrival, jwks: Mapping[str, Mapping[str, Any]]) -> HopToken:
    values = arrival.values(TXN_TOKEN_HEADER)
    if len(values) != 1:
        raise AssertionError(f"{arrival.hop} received {len(values)} {TXN_TOKEN_HEADER} lines")
    jws = parse_compact(values[0])
    checked = {hop: verifies(jws, document) for hop, document in jwks.items()}
    return HopToken(arrival.hop, dict(jws.header), dict(jws.claims), checked, values[0])


# --- the mesh --------------------------------------------------------------------------------


@dataclass(slots=True)
class Hop:
    name: str
    host: str
    sidecar: SidecarProcess
    relay: Relay
    inbound_port: int
    outbound_port: int | None  # the plain listener to the next hop, None for the leaf
    inbound: Envoy | None = None
    outbound: Envoy | None = None


def together(calls: Iterable[Callable[[], object]]) -> None:
    """Run the calls at once (process start-up and shutdown are waits); raise the first error
    once every call has ended."""
    calls = list(calls)
    if not calls:
        return
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        errors = [exc for exc in (future.exception() for future in futures) if exc is not None]
    if errors:
        raise errors[0]


class HopMesh(Started):
    """The three hops, their sidecars, relays and Envoys, the PKI and the user's issuer."""

    def __init__(self, workdir: Path, policy_text: str, *, front: str = "grpc") -> None:
        self.workdir = workdir
        self.front = front
        workdir.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(workdir / "certs", WORKLOADS)
        self.idp = Idp(ISSUER)
        self.idp.write_jwks(workdir / ISSUER_JWKS)
        self.policy = workdir / "policy.yaml"
        self.policy.write_text(policy_text)
        self.signing_key_file = workdir / "signing-key.pem"
        write_private_key(generate_signing_key(), self.signing_key_file)
        inbound = {name: free_port() for name in HOPS}
        self.hops: dict[str, Hop] = {}
        for index, name in enumerate(HOPS):
            following = HOPS[index + 1] if index + 1 < len(HOPS) else None
            out_port = free_port() if following is not None else None
            next_hop = None
            if following is not None and out_port is not None:
                next_hop = NextHop(out_port, HOSTS[following])
            sidecar = SidecarProcess(
                self.policy,
                [self.signing_key_file],
                workdir / f"sidecar-{name}",
                extra_args=SIDECAR_ARGS,
                front=front,
            )
            self.hops[name] = Hop(
                name, HOSTS[name], sidecar, Relay(name, next_hop), inbound[name], out_port
            )

    def start(self) -> None:
        try:
            for hop in self.hops.values():
                hop.relay.start()
            together(hop.sidecar.start for hop in self.hops.values())
            envoys = []
            for index, hop in enumerate(self.hops.values()):
                hop.inbound = Envoy(self._inbound_config(hop), self.workdir / f"envoy-{hop.name}")
                envoys.append(hop.inbound)
                if hop.outbound_port is not None:
                    following = self.hops[HOPS[index + 1]]
                    config = outbound_config(
                        ca=self.pki.ca,
                        client=self.pki.workloads[hop.name],
                        upstreams={following.name: following.inbound_port},
                        listen_ports={following.name: hop.outbound_port},
                        admin_port=free_port(),
                    )
                    hop.outbound = Envoy(config, self.workdir / f"envoy-{hop.name}-outbound")
                    envoys.append(hop.outbound)
            together(envoy.start for envoy in envoys)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        hops = list(self.hops.values())
        envoys = [e for hop in hops for e in (hop.inbound, hop.outbound) if e is not None]
        together(envoy.stop for envoy in envoys)
        together(hop.sidecar.stop for hop in hops)
        for hop in hops:
            hop.relay.stop()

    def _inbound_config(self, hop: Hop) -> dict[str, Any]:
        return render_config(
            load_base_config(self.front),
            listen_port=hop.inbound_port,
            authz_ports=[hop.sidecar.authz_port],
            upstream_port=hop.relay.port,
            admin_port=free_port(),
            cert_dir=self.pki.dir,
        )

    # --- calls -------------------------------------------------------------------------------

    def context(self, workload: str) -> ssl.SSLContext:
        return mtls_context(self.pki.ca, self.pki.workloads[workload])

    def send(
        self, workload: str, hop: str, headers: Mapping[str, str], *, path: str = PATH
    ) -> Response:
        """One request as ``workload`` (its certificate) straight to ``hop``'s inbound Envoy."""
        target = self.hops[hop]
        return https_request(
            target.inbound_port, self.context(workload), path=path, host=target.host,
            headers=headers,
        )  # fmt: skip

    def user_token(self, *, scope: str = USER_SCOPE, ttl: int = 600) -> str:
        return self.idp.token(sub=USER, aud=USER_AUDIENCE, scope=scope, now=time.time(), ttl=ttl)

    def chain(self, bearer: str) -> Chain:
        """The user's request from the gateway to the edge, and everything it set off."""
        return chain_of(self.send("gateway", "edge", {"authorization": f"Bearer {bearer}"}))

    def jwks(self, hop: str) -> dict[str, Any]:
        status, body = http_get(self.hops[hop].sidecar.admin_port, "/.well-known/jwks.json")
        assert status == 200, f"{hop}'s sidecar answered {status} for its JWKS"
        document: dict[str, Any] = json.loads(body)
        return document

    # --- decision logs -----------------------------------------------------------------------

    def decision_lines(self, hop: str) -> list[dict[str, Any]]:
        """The complete lines of ``hop``'s sidecar's decision log so far (a line still being
        written is left for the next read)."""
        log = self.hops[hop].sidecar.decision_log
        try:
            text = log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def decision_for(self, hop: str, request_id: str) -> dict[str, Any]:
        """The one line ``hop``'s sidecar logged for the request with this x-request-id."""

        def found() -> list[dict[str, Any]]:
            return [d for d in self.decision_lines(hop) if d.get("request_id") == request_id]

        lines = wait_for(found, 5, what=f"{hop}'s decision for request {request_id}")
        assert len(lines) == 1, f"{hop} logged {len(lines)} decisions for one request"
        return lines[0]

    def decisions_after(self, hop: str, mark: int, count: int = 1) -> list[dict[str, Any]]:
        """The ``count`` lines ``hop``'s sidecar logged after the first ``mark`` lines."""

        def found() -> list[dict[str, Any]]:
            lines = self.decision_lines(hop)[mark:]
            return lines if len(lines) >= count else []

        lines = wait_for(found, 5, what=f"{count} new decision(s) of {hop}")
        assert len(lines) == count, f"{hop} logged {len(lines)} decisions, not {count}"
        return lines
