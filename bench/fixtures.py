"""What every benchmark needs: generated policies, keys, tokens and Envoy-shaped requests.

The generated policy has one rule per distinct workload, host (``hosts`` of them, shared
round-robin) and path, so the table really holds N rules; the benchmark's request matches
the last rule. Up to ``ONE_FILE_RULES`` rules are one file spelt short; more are a policy
directory as a multi-team deployment has it: the shared sections in one file and the rules,
spelt as docs/policy.md and the examples spell them, in files that each fit a ConfigMap.
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
CONTEXT = (
    '    require: {scopes: [bench.read], claims: {azp: b, tid: "{id}"}}\n'
    "    active: {until: 2099-01-01T00:00Z}\n"
)
PLAIN = "    require: {scopes: [bench.read]}\n"


RULES_PER_FILE = 1500  # about 770 kB in the documented spelling: one ConfigMap each
ONE_FILE_RULES = 2000  # up to this many, the policy is one file spelt short


def policy_text(rules: int, hosts: int = 100, *, context: bool = True) -> tuple[str, Target]:
    """A valid policy of ``rules`` disjoint rules and the request that matches the last one;
    ``context=False`` leaves out the claim conditions and windows."""
    rows = [_short_rule(i, hosts, context) for i in range(rules)]
    return _HEAD + "".join(rows), _target(rules, hosts)


def policy_files(
    rules: int, hosts: int = 100, *, context: bool = True
) -> tuple[dict[str, str], Target]:
    """The same rules as a policy directory, file name -> text: ``00-shared.yaml`` and
    ``rules-NN.yaml`` of at most ``RULES_PER_FILE`` rules each, in the documented spelling."""
    files = {"00-shared.yaml": _HEAD.removesuffix("rules:\n")}
    for start in range(0, rules, RULES_PER_FILE):
        stop = min(start + RULES_PER_FILE, rules)
        body = "".join(_documented_rule(i, hosts, context) for i in range(start, stop))
        files[f"rules-{start // RULES_PER_FILE:02d}.yaml"] = "rules:\n" + body
    return files, _target(rules, hosts)


def _short_rule(i: int, hosts: int, context: bool) -> str:
    return (
        f"  - id: r{i:05d}\n"
        f"    purpose: bench rule {i}\n"
        f'    match: {{workloads: ["{_workload(i)}"], host: svc{i % hosts}.bench.svc.cluster.local,'
        f' methods: [GET], paths: ["/v1/r{i}/{{id}}"], issuers: [corp-idp]}}\n'
        + (CONTEXT if context else PLAIN)
        + f'    grant: {{audience: "spiffe://{TRUST_DOMAIN}/ns/bench/sa/up{i % 100}",'
        " scopes: [bench.read], ttl: 30s}\n"
    )


def _documented_rule(i: int, hosts: int, context: bool) -> str:
    require = (
        '    require:\n      scopes: [bench.read]\n      claims: {azp: b, tid: "{id}"}\n'
        '    active: {until: "2099-01-01T00:00:00Z"}\n'
        if context
        else "    require: {scopes: [bench.read]}\n"
    )
    return (
        f"\n  - id: r{i:05d}\n"
        f"    purpose: Bench caller {i} reads its tenant's records on service {i % hosts}\n"
        "    match:\n"
        f"      workloads: [{_workload(i)}]\n"
        f"      host: svc{i % hosts}.bench.svc.cluster.local\n"
        "      methods: [GET]\n"
        f'      paths: ["/v1/r{i}/{{id}}"]\n'
        "      issuers: [corp-idp]\n" + require + "    grant:\n"
        f"      audience: spiffe://{TRUST_DOMAIN}/ns/bench/sa/up{i % 100}\n"
        "      scopes: [bench.read]\n"
        "      ttl: 30s\n"
    )


def _target(rules: int, hosts: int) -> Target:
    last = rules - 1
    host = f"svc{last % hosts}.bench.svc.cluster.local"
    return Target(_workload(last), host, "GET", f"/v1/r{last}/42?view=full")


_HEAD = f"""apiVersion: extauthz/v1
kind: ExchangePolicy
exchange: {{issuer: "https://exchange.bench.svc", tokenType: access_token, maxTtl: 300s}}
trustedIssuers:
  - {{id: corp-idp, issuer: "{ISSUER}", jwks: {{file: issuers/corp-idp.json}},
     audiences: ["{AUDIENCE}"], algorithms: [ES256]}}
workloads: {{trustDomains: [{TRUST_DOMAIN}]}}
rules:
"""


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
    """``policy.yaml``, or for more than ``ONE_FILE_RULES`` rules the directory ``policy``
    (its JWKS path is then relative to that directory: ``../issuers``)."""
    (directory / "issuers").mkdir(parents=True, exist_ok=True)
    if rules <= ONE_FILE_RULES:
        text, target = policy_text(rules, hosts, context=context)
        policy = directory / "policy.yaml"
        policy.write_text(text, encoding="utf-8")
    else:
        files, target = policy_files(rules, hosts, context=context)
        policy = directory / "policy"
        policy.mkdir(exist_ok=True)
        for name, body in files.items():
            body = body.replace("{file: issuers/", "{file: ../issuers/")
            (policy / name).write_text(body, encoding="utf-8")
    issuer_key = generate_signing_key("ES256")
    (directory / "issuers" / "corp-idp.json").write_text(json.dumps(jwks_document([issuer_key])))
    issuer_key_file, signing_key_file = directory / "issuer-key.pem", directory / "signing-key.pem"
    for path, key in ((issuer_key_file, issuer_key), (signing_key_file, generate_signing_key())):
        path.unlink(missing_ok=True)  # write_private_key refuses to overwrite
        write_private_key(key, path)
    return Setup(policy, target, issuer_key_file, signing_key_file, rules)


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
