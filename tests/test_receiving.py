"""The receiving side: a service verifies the tokens extauthz mints, through real processes.

A real `extauthz serve` with a key directory; the shipped sidecar Envoy (deploy/envoy/
sidecar.yaml) in front of it, with its mTLS ingress and its public listener; and a receiving
Envoy with the shipped jwt_authn config (deploy/envoy/receiving.yaml) in front of an echo
upstream. Only ports are moved, so the tests cannot drift from the shipped files. The receiving
Envoy fetches the exchange's JWKS through the public listener, across a signing key rotation.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import http.client
import ipaddress
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from extauthz.decision.identity import parse_xfcc, xfcc_hash_thumbprint
from extauthz.decision.jose import generate_signing_key, parse_compact
from extauthz.demo.echo import EchoServer
from extauthz.demo.envoy import Envoy
from extauthz.demo.idp import Idp
from extauthz.demo.pki import Pki, make_pki
from extauthz.demo.stack import SidecarProcess, free_port, https_request, mtls_context
from extauthz.policy.loader import write_private_key

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "deploy" / "envoy"
POLICY_DIR = ROOT / "deploy" / "kubernetes" / "base" / "policy"
RECEIVING_ISTIO = ROOT / "deploy" / "istio" / "receiving"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
PROFILE_HOST = "profile.shop.svc.cluster.local"
PUBLIC_PATHS = ("/.well-known/jwks.json", "/metrics", "/stats/prometheus")
# extauthz serve's default --key-activation-delay, which the shipped cache settings are for.
DEFAULT_ACTIVATION_DELAY = 60.0
# Short for the test; the receiving cache is scaled by the shipped ratio.
ACTIVATION_DELAY = 8.0

T = TypeVar("T")


# --- the shipped files ------------------------------------------------------------------------


def shipped(name: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ENVOY_DIR / name).read_text())
    return config


def named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [item for item in items if item["name"] == name]
    return found


def hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    config: dict[str, Any] = network_filter["typed_config"]
    return config


def endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (address["address"], address["port_value"])
        for group in cluster["load_assignment"]["endpoints"]
        for lb in group["lb_endpoints"]
        for address in [lb["endpoint"]["address"]["socket_address"]]
    ]


def set_endpoints(cluster: dict[str, Any], ports: list[int]) -> None:
    template = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    fresh = []
    for port in ports:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"]["socket_address"].update(
            address="127.0.0.1", port_value=port
        )
        fresh.append(endpoint)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": fresh}]


def listen_on(config: dict[str, Any], listener: str, port: int) -> None:
    """Tests listen on loopback only."""
    address = named(config["static_resources"]["listeners"], listener)["address"]
    address["socket_address"].update(address="127.0.0.1", port_value=port)


def jwt_provider(config: dict[str, Any]) -> dict[str, Any]:
    listener = named(config["static_resources"]["listeners"], "receiving")
    authn = named(hcm(listener)["http_filters"], "envoy.filters.http.jwt_authn")
    (provider,) = authn["typed_config"]["providers"].values()
    result: dict[str, Any] = provider
    return result


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def shipped_policy() -> dict[str, Any]:
    policy: dict[str, Any] = yaml.safe_load((POLICY_DIR / "policy.yaml").read_text())
    return policy


def profile_audience() -> str:
    (audience,) = {
        rule["grant"]["audience"]
        for rule in shipped_policy()["rules"]
        if rule["match"]["host"] == PROFILE_HOST
    }
    return str(audience)


# --- configuration, offline ------------------------------------------------------------------


def test_receiving_config_verifies_the_shipped_exchange_tokens() -> None:
    """The receiving provider names the policy's issuer, the service's own audience only, the
    header extauthz writes, and a JWKS cache shorter than the key activation delay."""
    provider = jwt_provider(shipped("receiving.yaml"))
    assert provider["issuer"] == shipped_policy()["exchange"]["issuer"]
    assert provider["audiences"] == [profile_audience()]
    assert shipped_policy()["exchange"].get("tokenType", "access_token") == "access_token"
    assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]
    assert "from_params" not in provider and "from_cookies" not in provider
    remote = provider["remote_jwks"]
    assert remote["http_uri"]["uri"].endswith(":9090/.well-known/jwks.json")
    assert 2 * seconds(remote["cache_duration"]) <= DEFAULT_ACTIVATION_DELAY
    assert remote["async_fetch"] and remote["retry_policy"]["num_retries"] >= 1
    # The cluster is the extauthz pod's Service at its public port, never the admin port.
    clusters = shipped("receiving.yaml")["static_resources"]["clusters"]
    jwks = named(clusters, remote["http_uri"]["cluster"])
    assert endpoints(jwks) == [(PROFILE_HOST, 9090)]


def test_public_listener_serves_three_paths_with_a_short_cache() -> None:
    config = shipped("sidecar.yaml")
    public = named(config["static_resources"]["listeners"], "public")
    # Every interface: receiving services in other pods, and istiod, fetch from here.
    address = public["address"]["socket_address"]
    assert ipaddress.ip_address(address["address"]).is_unspecified
    assert address["port_value"] == 9090
    routes = hcm(public)["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = {r["match"]["path"]: r for r in routes if "route" in r}
    assert set(forwarded) == set(PUBLIC_PATHS)
    for route in forwarded.values():
        assert route["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    admin = config["admin"]["address"]["socket_address"]
    assert endpoints(clusters[forwarded["/stats/prometheus"]["route"]["cluster"]]) == [
        ("127.0.0.1", admin["port_value"])
    ]
    assert endpoints(clusters[forwarded["/metrics"]["route"]["cluster"]]) == [("127.0.0.1", 9102)]
    jwks = forwarded["/.well-known/jwks.json"]
    assert endpoints(clusters[jwks["route"]["cluster"]]) == [("127.0.0.1", 9102)]
    (header,) = jwks["response_headers_to_add"]
    assert header["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    max_age = int(header["header"]["value"].split("max-age=")[1])
    assert max_age < DEFAULT_ACTIVATION_DELAY
    assert [r["direct_response"]["status"] for r in routes if "direct_response" in r] == [405, 404]


def test_receiving_istio_resources() -> None:
    """RequestAuthentication and AuthorizationPolicy for the receiving workload: the same
    issuer, audience, header and JWKS address as the plain Envoy config."""
    docs = {
        doc["kind"]: doc
        for path in sorted(RECEIVING_ISTIO.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    }
    assert set(docs) == {"RequestAuthentication", "AuthorizationPolicy"}
    authn = docs["RequestAuthentication"]
    assert authn["apiVersion"] == "security.istio.io/v1"
    assert set(authn["spec"]) == {"selector", "jwtRules"}
    (rule,) = authn["spec"]["jwtRules"]
    provider = jwt_provider(shipped("receiving.yaml"))
    assert set(rule) <= {
        "issuer",
        "audiences",
        "jwksUri",
        "fromHeaders",
        "forwardOriginalToken",
        "outputClaimToHeaders",
    }
    assert rule["issuer"] == provider["issuer"]
    assert rule["audiences"] == provider["audiences"]
    assert rule["jwksUri"] == provider["remote_jwks"]["http_uri"]["uri"]
    assert rule["fromHeaders"] == [{"name": "authorization", "prefix": "Bearer "}]
    assert rule["forwardOriginalToken"] is True
    # RequestAuthentication alone lets a request without a token through: the ALLOW policy
    # requires a principal from this issuer, for the same workload.
    authz = docs["AuthorizationPolicy"]
    assert authz["apiVersion"] == "security.istio.io/v1"
    assert authz["spec"]["selector"] == authn["spec"]["selector"]
    assert authz["spec"]["action"] == "ALLOW"
    (allow,) = authz["spec"]["rules"]
    (source,) = allow["from"]
    assert source == {"source": {"requestPrincipals": [f"{rule['issuer']}/*"]}}
    (condition,) = allow["when"]
    assert condition == {"key": "request.auth.audiences", "values": rule["audiences"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
def test_istio_front_serves_the_jwks_on_the_public_port() -> None:
    """Under Istio the same jwksUri works: the Service's public port leads through the proxy to
    extauthz's admin address, only GET of the JWKS and metrics is let through, without the
    extauthz check and with plain HTTP allowed (istiod has no mesh certificate)."""
    rendered = subprocess.run(
        [
            "kubectl",
            "kustomize",
            str(ROOT / "deploy" / "kubernetes" / "overlays" / "example-istio"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]

    def kind(name: str) -> list[dict[str, Any]]:
        return [d for d in docs if d["kind"] == name]

    (deployment,) = kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (extauthz,) = [c for c in pod["initContainers"] if c["name"] == "extauthz"]
    args = extauthz["args"]
    admin = next(
        a.split("=", 1)[1] if "=" in a else args[i + 1]
        for i, a in enumerate(args)
        if a.startswith("--admin-address")
    )
    (service,) = kind("Service")
    (public,) = [p for p in service["spec"]["ports"] if p["name"] == "http-public"]
    (sidecar,) = kind("Sidecar")
    (ingress,) = [i for i in sidecar["spec"]["ingress"] if i["port"]["number"] == 9090]
    assert public["targetPort"] == ingress["port"]["number"] == 9090
    assert ingress["defaultEndpoint"] == admin
    assert ingress["port"]["protocol"] == "HTTP"
    policies = {p["spec"]["action"]: p["spec"] for p in kind("AuthorizationPolicy")}
    assert policies["CUSTOM"]["rules"] == [{"to": [{"operation": {"notPorts": ["9090"]}}]}]
    deny = policies["DENY"]["rules"]
    assert {"ports": ["9090"], "notPaths": ["/.well-known/jwks.json", "/metrics"]} in [
        r["to"][0]["operation"] for r in deny
    ]
    assert {"ports": ["9090"], "notMethods": ["GET"]} in [r["to"][0]["operation"] for r in deny]
    (peer,) = kind("PeerAuthentication")
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert peer["spec"]["portLevelMtls"] == {"9090": {"mode": "PERMISSIVE"}}
    # The receiving side's jwksUri names this Service and port.
    (rule,) = yaml.safe_load((RECEIVING_ISTIO / "requestauthentication.yaml").read_text())["spec"][
        "jwtRules"
    ]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert rule["jwksUri"] == f"http://{host}:{public['port']}/.well-known/jwks.json"


# --- through real processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("receiving-pki"), {"orders": ORDERS})


@dataclass
class Stack:
    pki: Pki
    idp: Idp
    keys: Path
    sidecar: SidecarProcess
    front: Envoy
    front_port: int
    public_port: int
    receiving: Envoy
    receiving_port: int
    receiving_config: dict[str, Any]
    app: EchoServer
    service: EchoServer

    def mint(self) -> tuple[str, dict[str, str]]:
        """One checked request from `orders` through the sidecar Envoy: the minted token and
        the headers the application received with it."""
        subject = self.idp.token(sub="alice", scope="profile.read", now=time.time())
        response = https_request(
            self.front_port,
            mtls_context(self.pki.ca, self.pki.workloads["orders"]),
            path="/v1/customers/42",
            host=PROFILE_HOST,
            headers={"authorization": f"Bearer {subject}"},
        )
        assert response.status == 200, response.body
        headers: dict[str, str] = response.json()["headers"]
        scheme, _, token = headers["authorization"].partition(" ")
        assert scheme == "Bearer" and token != subject
        return token, headers

    def present(self, token: str) -> int:
        """The receiving Envoy's answer to a request with this token."""
        return plain_request(
            self.receiving_port, "GET", "/v1/customers/42", {"authorization": f"Bearer {token}"}
        )[0]


def plain_request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, http.client.HTTPException, ssl.SSLError):
            value = None
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def kid_of(token: str) -> str:
    return str(parse_compact(token).header["kid"])


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = parse_compact(token).claims
    return claims


def public_kids(port: int) -> set[str]:
    status, _, body = plain_request(port, "GET", "/.well-known/jwks.json")
    assert status == 200
    return {key["kid"] for key in json.loads(body)["keys"]}


@pytest.fixture
def stack(tmp_path: Path, pki: Pki) -> Iterator[Stack]:
    with running(tmp_path, pki) as started:
        yield started


@contextlib.contextmanager
def running(tmp_path: Path, pki: Pki, *, cache_factor: float | None = None) -> Iterator[Stack]:
    """The whole stack. The receiving JWKS cache is the shipped ratio of the activation
    delay, or `cache_factor` times the delay for the control that shows the ratio matters."""
    idp = Idp("https://idp.example.com")
    policy_dir = tmp_path / "policy"
    (policy_dir / "issuers").mkdir(parents=True)
    (policy_dir / "policy.yaml").write_text((POLICY_DIR / "policy.yaml").read_text())
    idp.write_jwks(policy_dir / "issuers" / "corp-idp.json")
    keys = tmp_path / "keys"
    keys.mkdir()
    write_private_key(generate_signing_key(), keys / "key-1.pem")

    # The sidecar Envoy: the shipped bootstrap and SDS files, ports and paths moved.
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, source in (
        ("tls.crt", pki.envoy.cert),
        ("tls.key", pki.envoy.key),
        ("ca.crt", pki.ca),
    ):
        (tls / name).write_bytes(source.read_bytes())
    config_dir = tmp_path / "front-config"
    config_dir.mkdir()
    for sds in ENVOY_DIR.glob("sds-*.yaml"):
        (config_dir / sds.name).write_text(sds.read_text().replace("/etc/envoy/tls", str(tls)))
    bootstrap = (ENVOY_DIR / "sidecar.yaml").read_text()
    front_config: dict[str, Any] = yaml.safe_load(
        bootstrap.replace("/etc/envoy/config", str(config_dir))
    )

    with (
        EchoServer() as app,
        EchoServer() as service,
        SidecarProcess(
            policy_dir / "policy.yaml",
            [keys],
            tmp_path / "sidecar",
            extra_args=[
                "--key-activation-delay",
                str(ACTIVATION_DELAY),
                "--poll-interval",
                "0.2",
            ],
        ) as sidecar,
    ):
        front_port, public_port, front_admin = free_port(), free_port(), free_port()
        front_config["admin"]["address"]["socket_address"]["port_value"] = front_admin
        listen_on(front_config, "ingress", front_port)
        listen_on(front_config, "public", public_port)
        clusters = {c["name"]: c for c in front_config["static_resources"]["clusters"]}
        set_endpoints(clusters["extauthz"], [sidecar.grpc_port])
        set_endpoints(clusters["upstream"], [app.port])
        set_endpoints(clusters["extauthz-admin"], [sidecar.admin_port])
        set_endpoints(clusters["envoy-admin"], [front_admin])

        # The receiving Envoy: the shipped jwt_authn config; its JWKS cluster on the public
        # listener, and its cache scaled by the shipped ratio to the test's activation delay.
        receiving_config = shipped("receiving.yaml")
        receiving_port = free_port()
        receiving_config["admin"]["address"]["socket_address"]["port_value"] = free_port()
        listen_on(receiving_config, "receiving", receiving_port)
        remote = jwt_provider(receiving_config)["remote_jwks"]
        ratio = seconds(remote["cache_duration"]) / DEFAULT_ACTIVATION_DELAY
        if cache_factor is not None:
            ratio = cache_factor
        remote["cache_duration"] = f"{ACTIVATION_DELAY * ratio}s"
        receiving_clusters = {
            c["name"]: c for c in receiving_config["static_resources"]["clusters"]
        }
        set_endpoints(receiving_clusters["app"], [service.port])
        set_endpoints(receiving_clusters[remote["http_uri"]["cluster"]], [public_port])

        with Envoy(front_config, tmp_path / "front") as front:
            wait_for(lambda: public_kids(public_port) or None, "the JWKS on the public listener")
            with Envoy(receiving_config, tmp_path / "receiving") as receiving:
                yield Stack(
                    pki=pki,
                    idp=idp,
                    keys=keys,
                    sidecar=sidecar,
                    front=front,
                    front_port=front_port,
                    public_port=public_port,
                    receiving=receiving,
                    receiving_port=receiving_port,
                    receiving_config=receiving_config,
                    app=app,
                    service=service,
                )


def until_minted(stack: Stack) -> tuple[str, dict[str, str]]:
    """The first check goes through once Envoy has health-checked the extauthz worker."""

    def attempt() -> tuple[str, dict[str, str]] | None:
        try:
            return stack.mint()
        except AssertionError:
            return None

    return wait_for(attempt, "a first minted token")


@pytest.mark.envoy
@pytest.mark.timeout(180)
def test_tokens_minted_across_a_key_rotation_are_accepted(stack: Stack) -> None:
    before, _ = until_minted(stack)
    old_kid = kid_of(before)
    assert stack.present(before) == 200

    # A new key file: published at once, signing only after the activation delay.
    new_key = generate_signing_key()
    write_private_key(new_key, stack.keys / "key-2.pem")
    wait_for(lambda: public_kids(stack.public_port) >= {new_key.kid} or None, "the new key")
    during, _ = stack.mint()
    assert kid_of(during) == old_kid
    assert stack.present(during) == 200

    # Every token minted until (and after) the new key signs is accepted.
    minted = [before, during]

    def signed_with_new_key() -> str | None:
        token, _ = stack.mint()
        minted.append(token)
        assert stack.present(token) == 200, kid_of(token)
        return token if kid_of(token) == new_key.kid else None

    after = wait_for(signed_with_new_key, "the new key to sign", timeout=ACTIVATION_DELAY * 4)
    assert stack.present(after) == 200
    # Tokens signed with the old key stay valid for their lifetime: the old key is still
    # published.
    assert [stack.present(token) for token in minted] == [200] * len(minted)
    assert {kid_of(t) for t in minted} == {old_kid, new_key.kid}
    assert [r.headers["authorization"] for r in stack.service.requests[-len(minted) :]] == [
        f"Bearer {token}" for token in minted
    ]

    # Signed by a key the exchange never published: refused, and nothing reaches the service.
    seen = len(stack.service.requests)
    forged = generate_signing_key().sign(claims_of(after), typ="at+jwt")
    assert stack.present(forged) == 401
    # The exchange's own key, but minted for another service's audience: refused (jwt_authn
    # answers 403 for a valid token with the wrong audience).
    other = {**claims_of(after), "aud": "spiffe://cluster.local/ns/shop/sa/payments"}
    assert stack.present(new_key.sign(other, typ="at+jwt")) == 403
    assert plain_request(stack.receiving_port, "GET", "/v1/customers/42")[0] == 401
    assert len(stack.service.requests) == seen

    # The receiving Envoy fetched the JWKS through the public listener only, more than once
    # (it refreshed across the rotation), and the public listener served those fetches.
    remote = jwt_provider(stack.receiving_config)["remote_jwks"]
    clusters = stack.receiving_config["static_resources"]["clusters"]
    assert endpoints(named(clusters, remote["http_uri"]["cluster"])) == [
        ("127.0.0.1", stack.public_port)
    ]
    assert stack.sidecar.admin_port != stack.public_port
    fetched = stack.receiving.stat("cluster.exchange-jwks.upstream_rq_200")
    assert fetched >= 2
    assert stack.front.stat("cluster.extauthz-admin.upstream_rq_200") >= fetched
    log = stack.front.log_path.read_text()
    assert (
        log.count('public "GET /.well-known/jwks.json HTTP/1.1" 200 - upstream=extauthz-admin')
        >= fetched
    )


@pytest.mark.envoy
@pytest.mark.timeout(180)
def test_a_cache_longer_than_the_activation_delay_refuses_the_new_key(
    tmp_path: Path, pki: Pki
) -> None:
    """The control for the test above: with the JWKS cached for ten activation delays, the
    receiving Envoy still holds the old key set when the new key starts signing."""
    with running(tmp_path, pki, cache_factor=10.0) as stack:
        before, _ = until_minted(stack)
        assert stack.present(before) == 200
        new_key = generate_signing_key()
        write_private_key(new_key, stack.keys / "key-2.pem")

        def signed_with_new_key() -> str | None:
            token, _ = stack.mint()
            return token if kid_of(token) == new_key.kid else None

        after = wait_for(signed_with_new_key, "the new key to sign", timeout=ACTIVATION_DELAY * 4)
        assert stack.present(after) == 401
        assert stack.present(before) == 200


@pytest.mark.envoy
@pytest.mark.timeout(120)
def test_the_application_checks_the_certificate_binding(stack: Stack) -> None:
    """The sidecar forwards the caller's certificate hash (XFCC); the application turns it
    into the token's cnf x5t#S256 and compares."""
    token, headers = until_minted(stack)
    (element,) = parse_xfcc(headers["x-forwarded-client-cert"])
    assert element["uri"] == [ORDERS]
    (hex_hash,) = element["hash"]
    # What a receiving service computes, written out: hex digest -> bytes -> base64url.
    computed = base64.urlsafe_b64encode(bytes.fromhex(hex_hash)).rstrip(b"=").decode()
    assert computed == xfcc_hash_thumbprint(hex_hash)
    assert claims_of(token)["cnf"] == {"x5t#S256": computed}
    # And it is the caller's certificate, not the proxy's or anyone's else.
    der = ssl.PEM_cert_to_DER_cert(stack.pki.workloads["orders"].cert.read_text())
    assert hex_hash == hashlib.sha256(der).hexdigest()
    # A client-sent XFCC never reaches the application.
    subject = stack.idp.token(sub="alice", scope="profile.read", now=time.time())
    response = https_request(
        stack.front_port,
        mtls_context(stack.pki.ca, stack.pki.workloads["orders"]),
        path="/v1/customers/42",
        host=PROFILE_HOST,
        headers={
            "authorization": f"Bearer {subject}",
            "x-forwarded-client-cert": "Hash=" + "0" * 64 + ";URI=spiffe://cluster.local/ns/x",
        },
    )
    assert response.status == 200
    (forwarded,) = parse_xfcc(response.json()["headers"]["x-forwarded-client-cert"])
    assert forwarded["hash"] == [hex_hash]


@pytest.mark.envoy
@pytest.mark.timeout(120)
def test_the_public_listener_serves_nothing_else(stack: Stack) -> None:
    port = stack.public_port
    status, headers, body = plain_request(port, "GET", "/.well-known/jwks.json")
    assert status == 200 and json.loads(body)["keys"]
    assert headers["cache-control"] == "public, max-age=30"
    status, _, body = plain_request(port, "GET", "/metrics")
    assert status == 200 and b"extauthz_" in body
    status, _, body = plain_request(port, "GET", "/stats/prometheus")
    assert status == 200 and b"envoy_" in body
    # extauthz's other admin pages, Envoy's admin pages, and ways around the path match.
    for path in (
        "/",
        "/statusz",
        "/readyz",
        "/healthz",
        "/stats",
        "/config_dump",
        "/clusters",
        "/quitquitquit",
        "/.well-known/jwks.json/x",
        "/metrics/../statusz",
        "/stats/prometheus/../../config_dump",
        "//statusz",
        "/%2e%2e/statusz",
        "/METRICS",
    ):
        status, _, body = plain_request(port, "GET", path)
        assert status == 404, (path, status)
        assert b"extauthz" not in body and b"envoy" not in body.lower(), path
    assert plain_request(port, "GET", "/a%2Fb")[0] == 400
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        for path in PUBLIC_PATHS:
            assert plain_request(port, method, path)[0] == 405, (method, path)
        assert plain_request(port, method, "/quitquitquit")[0] == 404
    # Envoy is still running after all that (POST /quitquitquit never reached its admin).
    assert plain_request(port, "GET", "/stats/prometheus")[0] == 200
