"""What every benchmark needs: generated policies, keys, tokens and Envoy-shaped requests.

Nothing here measures anything. The generated policy has one rule per distinct workload, host
(100 hosts shared round-robin) and path, so the table really holds N rules; the request the
benchmarks send matches the last rule.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ISSUER = "https://idp.example.com"
AUDIENCE = "https://shop.example.com"
EXCHANGE_ISSUER = "https://exchange.bench.svc"
TRUST_DOMAIN = "cluster.local"
HOSTS = 100
SCOPE = "bench.read profile.read orders.read email"
TOKEN_TTL = 3600
ENVOY_PRINCIPAL = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/envoy"


@dataclass(frozen=True, slots=True)
class Target:
    """The one rule the benchmark requests match, and how to call it."""

    rule_id: str
    workload: str
    host: str
    method: str
    path: str  # a concrete request path matching the rule's template


def workload_of(i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/w{i}"


def policy_text(rules: int) -> tuple[str, Target]:
    """A valid policy of ``rules`` disjoint rules and the request that matches the last one."""
    if rules < 1:
        raise ValueError("a policy needs at least one rule")
    head = (
        "apiVersion: extauthz/v1\n"
        "kind: ExchangePolicy\n"
        f'exchange: {{issuer: "{EXCHANGE_ISSUER}", tokenType: access_token, maxTtl: 300s}}\n'
        "trustedIssuers:\n"
        "  - id: corp-idp\n"
        f"    issuer: {ISSUER}\n"
        "    jwks: {file: issuers/corp-idp.json}\n"
        f"    audiences: [{AUDIENCE}]\n"
        "    algorithms: [ES256]\n"
        f"workloads: {{trustDomains: [{TRUST_DOMAIN}]}}\n"
        "rules:\n"
    )
    rows = []
    for i in range(rules):
        host = f"svc{i % HOSTS}.bench.svc.cluster.local"
        rows.append(
            f"  - id: r{i:05d}\n"
            f"    purpose: generated benchmark rule {i}\n"
            f'    match: {{workloads: ["{workload_of(i)}"], host: {host}, methods: [GET],'
            f' paths: ["/v1/r{i}/{{id}}"], issuers: [corp-idp]}}\n'
            "    require: {scopes: [bench.read]}\n"
            f'    grant: {{audience: "spiffe://{TRUST_DOMAIN}/ns/bench/sa/up{i % HOSTS}",'
            " scopes: [bench.read], ttl: 30s}\n"
        )
    last = rules - 1
    target = Target(
        rule_id=f"r{last:05d}",
        workload=workload_of(last),
        host=f"svc{last % HOSTS}.bench.svc.cluster.local",
        method="GET",
        path=f"/v1/r{last}/42?view=full",
    )
    return head + "".join(rows), target


@dataclass(frozen=True, slots=True)
class Setup:
    """A policy on disk with its issuer JWKS, an issuer key and an exchange signing key."""

    dir: Path
    policy: Path
    target: Target
    issuer_key_file: Path  # the simulated identity provider's private key (ES256)
    signing_key_file: Path  # the exchange's key, for ``extauthz serve --signing-key``
    rules: int


def write_setup(directory: Path, rules: int) -> Setup:
    from extauthz.decision.jose import generate_signing_key, jwks_document
    from extauthz.policy.loader import write_private_key

    directory.mkdir(parents=True, exist_ok=True)
    text, target = policy_text(rules)
    policy = directory / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    issuer_key = generate_signing_key("ES256")
    (directory / "issuers").mkdir(exist_ok=True)
    (directory / "issuers" / "corp-idp.json").write_text(json.dumps(jwks_document([issuer_key])))
    issuer_key_file = directory / "issuer-key.pem"
    signing_key_file = directory / "signing-key.pem"
    for path in (issuer_key_file, signing_key_file):
        path.unlink(missing_ok=True)
    write_private_key(issuer_key, issuer_key_file)
    write_private_key(generate_signing_key("ES256"), signing_key_file)
    return Setup(directory, policy, target, issuer_key_file, signing_key_file, rules)


def subject_claims(now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "iss": ISSUER,
        "sub": "user-" + secrets.token_hex(4),
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now) + TOKEN_TTL,
        "jti": secrets.token_urlsafe(12),
        "scope": SCOPE,
    }


def sign_tokens(key: Any, count: int) -> list[str]:
    """``count`` distinct subject tokens (each has its own jti) signed by the issuer key."""
    now = time.time()
    return [key.sign(subject_claims(now), "at+jwt") for _ in range(count)]


def check_request(
    target: Target, token: str | None, cert_pem: str, *, request_id: str | None = None
) -> Any:
    """A CheckRequest as Envoy 1.40 builds it for an mTLS downstream with
    ``include_peer_certificate`` (the shipped envoy.yaml): principal, URL-encoded PEM, lower-case
    headers with pseudo-headers, the raw path with its query."""
    from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

    request_id = request_id or str(uuid.uuid4())
    headers = {
        ":authority": target.host,
        ":method": target.method,
        ":path": target.path,
        ":scheme": "https",
        "user-agent": "extauthz-bench/1",
        "x-request-id": request_id,
        "x-forwarded-proto": "https",
        "accept": "*/*",
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    ctx = attribute_context_pb2.AttributeContext
    source = ctx.Peer(principal=target.workload, certificate=urllib.parse.quote(cert_pem, safe=""))
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=source,
            destination=ctx.Peer(principal=ENVOY_PRINCIPAL),
            request=ctx.Request(
                http=ctx.HttpRequest(
                    id=request_id,
                    method=target.method,
                    host=target.host,
                    path=target.path,
                    headers=headers,
                    scheme="https",
                    protocol="HTTP/1.1",
                )
            ),
        )
    )


def client_pki(directory: Path, target: Target) -> Any:
    """A CA, Envoy's server certificate and one client certificate naming the target workload."""
    from extauthz.demo.pki import make_pki

    return make_pki(directory, {"client": target.workload})
