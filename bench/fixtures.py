"""What every benchmark needs: generated policies, keys, tokens and Envoy-shaped requests.

The generated policy has one rule per distinct workload, host (``hosts`` of them, shared
round-robin) and path, so the table really holds N rules; the benchmark's request matches
the last rule.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from extauthz.decision.jose import SigningKey, generate_signing_key, jwks_document
from extauthz.policy.loader import write_private_key

ISSUER = "https://idp.example.com"
AUDIENCE = "https://shop.example.com"
TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class Target:
    """The one rule the benchmark's requests match, and how to call it."""

    workload: str
    host: str
    method: str
    path: str  # a concrete request path matching the rule's template


# Every rule is context-bound, as real exchange paths are: two claim conditions (one bound to
# the path parameter) and an active window, which also takes the lookup through the windowed
# path. The tokens meet them.
# (Spelt short: 10,000 of them must fit in the 4 MiB a policy file may have.)
CONTEXT = (
    '    require: {scopes: [bench.read], claims: {azp: b, tid: "{id}"}}\n'
    "    active: {until: 2099-01-01T00:00Z}\n"
)
PLAIN = "    require: {scopes: [bench.read]}\n"


def policy_text(rules: int, hosts: int = 100, *, context: bool = True) -> tuple[str, Target]:
    """A valid policy of ``rules`` disjoint rules and the request that matches the last one;
    ``context=False`` leaves out the claim conditions and windows."""
    head = f"""apiVersion: extauthz/v1
kind: ExchangePolicy
exchange: {{issuer: "https://exchange.bench.svc", tokenType: access_token, maxTtl: 300s}}
trustedIssuers:
  - {{id: corp-idp, issuer: "{ISSUER}", jwks: {{file: issuers/corp-idp.json}},
     audiences: ["{AUDIENCE}"], algorithms: [ES256]}}
workloads: {{trustDomains: [{TRUST_DOMAIN}]}}
rules:
"""
    rows = [
        f"  - id: r{i:05d}\n"
        f"    purpose: bench rule {i}\n"
        f'    match: {{workloads: ["{_workload(i)}"], host: svc{i % hosts}.bench.svc.cluster.local,'
        f' methods: [GET], paths: ["/v1/r{i}/{{id}}"], issuers: [corp-idp]}}\n'
        + (CONTEXT if context else PLAIN)
        + f'    grant: {{audience: "spiffe://{TRUST_DOMAIN}/ns/bench/sa/up{i % 100}",'
        " scopes: [bench.read], ttl: 30s}\n"
        for i in range(rules)
    ]
    last = rules - 1
    host = f"svc{last % hosts}.bench.svc.cluster.local"
    target = Target(_workload(last), host, "GET", f"/v1/r{last}/42?view=full")
    return head + "".join(rows), target


def _workload(i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/w{i}"


@dataclass(frozen=True, slots=True)
class Setup:
    """A policy on disk with its issuer JWKS, an issuer key and an exchange signing key."""

    policy: Path
    target: Target
    issuer_key_file: Path  # the simulated identity provider's private key (ES256)
    signing_key_file: Path  # the exchange's key, for ``extauthz serve --signing-key``
    rules: int


def write_setup(directory: Path, rules: int, hosts: int = 100, *, context: bool = True) -> Setup:
    (directory / "issuers").mkdir(parents=True, exist_ok=True)
    text, target = policy_text(rules, hosts, context=context)
    (directory / "policy.yaml").write_text(text, encoding="utf-8")
    issuer_key = generate_signing_key("ES256")
    (directory / "issuers" / "corp-idp.json").write_text(json.dumps(jwks_document([issuer_key])))
    issuer_key_file, signing_key_file = directory / "issuer-key.pem", directory / "signing-key.pem"
    for path, key in ((issuer_key_file, issuer_key), (signing_key_file, generate_signing_key())):
        path.unlink(missing_ok=True)  # write_private_key refuses to overwrite
        write_private_key(key, path)
    return Setup(directory / "policy.yaml", target, issuer_key_file, signing_key_file, rules)


def sign_tokens(key: SigningKey, count: int) -> list[str]:
    """``count`` distinct subject tokens (each has its own jti) signed by the issuer key."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600,
              "scope": "bench.read profile.read orders.read email",
              "azp": "b", "tid": "42"}  # fmt: skip
    return [
        key.sign(claims | {"sub": f"user-{i}", "jti": secrets.token_urlsafe(12)}, "at+jwt")
        for i in range(count)
    ]


def check_request(target: Target, token: str, cert_pem: str) -> CheckRequest:
    """A CheckRequest as Envoy 1.40 builds it for an mTLS downstream with
    ``include_peer_certificate`` (the shipped envoy.yaml): principal, URL-encoded PEM, lower-case
    headers with pseudo-headers, the raw path with its query."""
    request_id = str(uuid.uuid4())
    headers = {
        ":authority": target.host,
        ":method": target.method,
        ":path": target.path,
        ":scheme": "https",
        "authorization": f"Bearer {token}",
        "user-agent": "extauthz-bench/1",
        "x-request-id": request_id,
        "x-forwarded-proto": "https",
        "accept": "*/*",
    }
    http = AttributeContext.HttpRequest(id=request_id, method=target.method, host=target.host,
                                        path=target.path, headers=headers, scheme="https",
                                        protocol="HTTP/1.1")  # fmt: skip
    peer = urllib.parse.quote(cert_pem, safe="")
    return CheckRequest(
        attributes=AttributeContext(
            source=AttributeContext.Peer(principal=target.workload, certificate=peer),
            destination=AttributeContext.Peer(
                principal=f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/envoy"
            ),
            request=AttributeContext.Request(http=http),
        )
    )
