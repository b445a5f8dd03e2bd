"""The host a decision is made for is the host Envoy routes by.

Unit: how ``Host`` / ``:authority`` values are read (strictly; anything a lenient parser would
fold onto another host is ``host_invalid``). End to end: a real Envoy with an exact, a wildcard
and a default virtual host, each routing to its own upstream, and tricky Host values; every
request is either refused or reaches the upstream of the host its token was minted for. The end
to end tests run once per front (ids ``grpc`` and ``http``): over gRPC the host is
``:authority`` in the CheckRequest, over HTTP the ``Host`` of Envoy's authorization request.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import corekit as k
import pytest

from extauthz.decision.jose import generate_signing_key, parse_compact
from extauthz.decision.model import normalise_host
from extauthz.decision.reasons import Reason
from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import FRONTS, Envoy, load_base_config, render_config
from extauthz.demo.idp import Idp
from extauthz.demo.pki import make_pki
from extauthz.demo.stack import (
    ISSUER,
    ISSUER_JWKS,
    WORKLOADS,
    SidecarProcess,
    free_port,
    https_request,
    mtls_context,
)
from extauthz.policy.loader import write_private_key

HOST = k.HOST
EXAMPLE_POLICY = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"
PATH = "/v1/customers/42"
MARK = "x-test-id"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (HOST, HOST),
        ("Profile.Shop.SVC.cluster.local", HOST),
        (f"{HOST}:8080", HOST),
        (f"{HOST.upper()}:443", HOST),
        (f"{HOST}.", HOST),
        (f"{HOST}.:443", HOST),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
        ("127.0.0.1:9191", "127.0.0.1"),
        (f"{HOST}:65535", HOST),
    ],
)
def test_hosts_that_are_read(raw: str, expected: str) -> None:
    """Rules name hosts without port; Host/:authority may carry one, a trailing dot, any case."""
    assert normalise_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        f"{HOST}:abc",  # a "port" that is no number
        f"{HOST}:evil.example",  # ... that Envoy would route by (to *.example)
        f"{HOST}:80:80",  # two ports
        f"{HOST}:",  # an empty one
        f"{HOST}:0",
        f"{HOST}:65536",
        f"{HOST}:+80",
        f"{HOST}:\u0663",  # an Arabic-Indic digit
        f"{HOST}..",  # two trailing dots: an empty label
        f"a..{HOST}",
        f".{HOST}",
        f"{HOST}@evil.example",  # userinfo-looking suffixes and prefixes
        f"user@{HOST}",
        f"evil.example:{HOST}",
        f"evil.example/{HOST}",
        f" {HOST}",  # surrounding whitespace
        f"{HOST} ",
        f"{HOST}\t",
        "prof\u0456le.shop.svc.cluster.local",  # Cyrillic i
        "\u212aelvin.example",  # Kelvin sign, which case folding would turn into k
        "[::1",
        "[::1]x",
        "[::1]:",
        "[fe80::1%eth0]",  # a zone
        "[not-v6]",
        "",
    ],
)
def test_hosts_that_are_refused(raw: str) -> None:
    """Attack: a Host that a lenient parser would fold onto a rule's host while Envoy routes
    by the raw value (to another virtual host). Defence: refused, never repaired."""
    assert normalise_host(raw) is None
    world = k.make_world()
    k.denied(world.ask(world.token(), host=raw), Reason.HOST_INVALID)


def test_host_header_and_authority_must_agree() -> None:
    """Attack: HTTP/2 allows both ``:authority`` and a ``host`` header; a proxy could route by
    one while we decide by the other. Defence: both present means both name one host."""
    world = k.make_world()
    same = {":authority": f"{HOST}:443", "host": HOST.upper()}
    k.allowed(world.ask(world.token(), headers=same), "orders-read-profile")
    for headers in ({"host": "other.example"}, {":authority": "other.example"}):
        k.denied(world.ask(world.token(), headers=headers), Reason.HOST_INVALID)


# --- end to end: several virtual hosts ----------------------------------------------------------

UPSTREAMS = ("profile", "wildcard", "default")
# The rule's host with the spellings extauthz folds onto it (a port, one trailing dot), as an
# Envoy with several virtual hosts must list them (Istio lists the ports it serves).
VIRTUAL_HOSTS = {
    "profile": [HOST, f"{HOST}.", f"{HOST}:*", f"{HOST}.:*"],
    "wildcard": ["*.example"],
    "default": ["*"],
}


class VirtualHosts:
    """PKI, issuer, sidecar, three echo upstreams and an Envoy routing to them by host, with
    the shipped config of ``front``."""

    def __init__(self, workdir: Path, front: str) -> None:
        self.workdir = workdir
        self.front = front
        self.pki = make_pki(workdir / "certs", WORKLOADS)
        self.idp = Idp(ISSUER)
        self.idp.write_jwks(workdir / ISSUER_JWKS)
        (workdir / "policy.yaml").write_text(EXAMPLE_POLICY.read_text())
        key_file = workdir / "signing-key.pem"
        write_private_key(generate_signing_key(), key_file)
        self.sidecar = SidecarProcess(
            workdir / "policy.yaml", [key_file], workdir / "sidecar", front=front
        )
        self.echo = {name: EchoServer() for name in UPSTREAMS}
        self.port = free_port()
        self.envoy: Envoy | None = None

    def __enter__(self) -> VirtualHosts:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        for echo in self.echo.values():
            echo.start()
        self.sidecar.start()
        config = render_config(
            load_base_config(self.front),
            listen_port=self.port,
            authz_ports=[self.sidecar.authz_port],
            upstream_port=self.echo["profile"].port,
            admin_port=free_port(),
            cert_dir=self.pki.dir,
        )
        _route_by_host(config, {name: echo.port for name, echo in self.echo.items()})
        (self.workdir / "envoy").mkdir()
        self.envoy = Envoy(config, self.workdir / "envoy")
        self.envoy.start()

    def __exit__(self, *exc: object) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        self.sidecar.stop()
        for echo in self.echo.values():
            echo.stop()

    def send(self, host: str) -> tuple[int, str | None, dict[str, Any] | None]:
        """The status, the upstream that received the request (if any) and the claims of the
        token it received."""
        mark = uuid.uuid4().hex
        token = self.idp.token(now=time.time())
        response = https_request(
            self.port,
            mtls_context(self.pki.ca, self.pki.workloads["orders"]),
            path=PATH,
            host=host,
            headers={"authorization": f"Bearer {token}", MARK: mark},
        )
        for name, echo in self.echo.items():
            for received in echo.requests:
                if received.headers.get(MARK) == mark:
                    bearer = received.headers.get("authorization", "")
                    claims = dict(parse_compact(bearer.removeprefix("Bearer ")).claims)
                    return response.status, name, claims
        return response.status, None, None


def _route_by_host(config: dict[str, Any], ports: dict[str, int]) -> None:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    template = manager["route_config"]["virtual_hosts"][0]
    manager["route_config"]["virtual_hosts"] = [
        {
            **copy.deepcopy(template),
            "name": name,
            "domains": VIRTUAL_HOSTS[name],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"upstream-{name}"}}],
        }
        for name in UPSTREAMS
    ]
    clusters = config["static_resources"]["clusters"]
    upstream = next(c for c in clusters if c["name"] == "upstream")
    for name, port in ports.items():
        cluster = copy.deepcopy(upstream)
        cluster["name"] = f"upstream-{name}"
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
        cluster["load_assignment"]["cluster_name"] = cluster["name"]
        clusters.append(cluster)


@pytest.fixture(scope="module", params=FRONTS)
def hosts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VirtualHosts]:
    front: str = request.param
    with VirtualHosts(tmp_path_factory.mktemp(f"hosts-{front}"), front) as mesh:
        yield mesh


# Each tricky Host and the status it gets, the same through either front: 200 (the rule's
# host, folded), 400 (``host_invalid``, or Envoy refusing the authority itself) or 403 (a host
# no rule names).
TRICKY = {
    HOST: 200,
    f"{HOST}:8443": 200,
    f"{HOST.upper()}:443": 200,
    f"{HOST}.": 200,
    f"{HOST}:abc": 400,
    f"{HOST}:evil.example": 400,
    f"{HOST}:80:80": 400,
    f"{HOST}:99999": 400,
    f"{HOST}..": 400,
    f"{HOST}@evil.example": 400,
    f"user@{HOST}": 400,
    f"evil.example:{HOST}": 400,
    f"{HOST}.evil.example": 403,
    "api.example": 403,
    "api.example:443": 403,
}


@pytest.mark.envoy
@pytest.mark.parametrize("host", TRICKY)
def test_tokens_reach_only_the_virtual_host_they_were_minted_for(
    hosts: VirtualHosts, host: str
) -> None:
    """Attack: a Host that Envoy routes to one virtual host (by its raw value) while a lenient
    sidecar decides for another, so that an upstream receives a token minted for someone
    else's audience. Defence: extauthz folds only a port and one trailing dot (which the
    rule's virtual host lists), and refuses every other spelling. So a request is refused, or
    it reaches exactly the upstream of the host its token was minted for."""
    status, upstream, claims = hosts.send(host)
    assert status == TRICKY[host], (hosts.front, host)
    if upstream is None:
        assert status != 200
        return
    assert status == 200
    assert claims is not None
    served = {"profile": HOST}.get(upstream)
    assert claims["authorization_details"][0]["host"] == served, (
        host,
        upstream,
        claims["authorization_details"][0],
    )


@pytest.mark.envoy
def test_the_rules_host_is_reached_through_the_shipped_normalisation(hosts: VirtualHosts) -> None:
    """The folding the policy reference promises really happens through Envoy."""
    for host in (HOST, f"{HOST}:8443", f"{HOST}."):
        status, upstream, claims = hosts.send(host)
        assert (status, upstream) == (200, "profile"), host
        assert claims is not None and claims["authorization_details"][0]["host"] == HOST
