"""Shared helpers for the core, policy and invariant tests (imported as ``import corekit``).

pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path`` for the test files
that live there, so this module needs no package and no conftest.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from jwt.algorithms import get_default_algorithms

from extauthz.decision.jose import IssuerKeys, SigningKey, generate_signing_key, parse_jwks
from extauthz.decision.model import Policy, Snapshot
from extauthz.decision.pipeline import CheckInput
from extauthz.demo.idp import Idp
from extauthz.policy import yamlsrc
from extauthz.policy.compiler import compile_policy
from extauthz.policy.loader import assemble, load_issuer_keys, own_keys

NOW = 1_700_000_000.0
EXCHANGE_ISS = "https://exchange.shop.svc"
IDP_ISS = "https://idp.example.com"
IDP_ID = "corp-idp"
IDP_AUD = "https://shop.example.com"
TD = "cluster.local"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
PROFILE = "spiffe://cluster.local/ns/shop/sa/profile"
PAYMENTS = "spiffe://cluster.local/ns/shop/sa/payments"
HOST = "profile.shop.svc.cluster.local"
PROFILE_HOST = "profile.shop.svc.cluster.local"
PAYMENTS_HOST = "payments.shop.svc.cluster.local"
JWKS_FILE = "issuers/corp-idp.json"

# Every key a minted token may carry (DESIGN.md "Tokens"; core.narrow).
MINTED_KEYS = frozenset(
    {"iss", "sub", "aud", "iat", "exp", "jti", "scope", "client_id", "act", "req", "cnf"}
)
TXN_KEYS = frozenset({"txn", "req_wl", "tctx"})


# --- JOSE by hand ---------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"sig") -> str:
    """A JWS compact serialisation with any header and any (usually bogus) signature."""
    return f"{b64json(header)}.{b64json(claims)}.{b64url(signature)}"


def sign_raw(key: SigningKey, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """Validly signed with ``key`` but with an arbitrary header (crit, odd typ, no kid...)."""
    return sign_bytes(key, header, json.dumps(claims, separators=(",", ":")).encode("utf-8"))


def sign_bytes(key: SigningKey, header: Mapping[str, Any], payload: bytes) -> str:
    """Validly signed with ``key`` over any payload bytes (JSON no encoder would produce)."""
    head, body = b64json(header), b64url(payload)
    signing_input = f"{head}.{body}".encode("ascii")
    signature = get_default_algorithms()[key.alg].sign(signing_input, key.private_key)
    return f"{head}.{body}.{b64url(signature)}"


def hs256(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    head, body = b64json(header), b64json(claims)
    mac = hmac.new(secret, f"{head}.{body}".encode("ascii"), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


def subject_claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    """A good subject-token claim set from the test issuer; ``None`` values remove a claim."""
    claims: dict[str, Any] = {
        "iss": IDP_ISS,
        "sub": "user-1",
        "aud": IDP_AUD,
        "iat": int(now),
        "exp": int(now) + 600,
        "jti": "subject-jti",
        "scope": "profile.read",
    }
    for key, value in overrides.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


# --- policies -------------------------------------------------------------------------------


def rule_doc(
    rule_id: str = "orders-read-profile",
    *,
    workloads: Sequence[str] = (ORDERS,),
    host: str = HOST,
    methods: Sequence[str] = ("GET",),
    paths: Sequence[str] = ("/v1/customers/{id}",),
    issuers: Sequence[str] = (IDP_ID,),
    require: Sequence[str] | None = ("profile.read",),
    audience: str = PROFILE,
    scopes: Sequence[str] = ("profile.read",),
    ttl: str | int = "30s",
    **extra: Any,
) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "id": rule_id,
        "purpose": f"test rule {rule_id}",
        "match": {
            "workloads": list(workloads),
            "host": host,
            "methods": list(methods),
            "paths": list(paths),
            "issuers": list(issuers),
        },
        "grant": {"audience": audience, "scopes": list(scopes), "ttl": ttl},
    }
    if require is not None:
        rule["require"] = {"scopes": list(require)}
    rule.update(extra)
    return rule


def policy_doc(
    rules: Sequence[Mapping[str, Any]] | None = None,
    *,
    token_type: str = "access_token",  # noqa: S107 - a token type, not a secret
    max_ttl: str | int = "300s",
    trusted_hops: Sequence[str] = (),
    trust_domains: Sequence[str] = (TD,),
    issuers: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    if issuers is None:
        issuers = [
            {
                "id": IDP_ID,
                "issuer": IDP_ISS,
                "jwks": {"file": JWKS_FILE},
                "audiences": [IDP_AUD],
                "algorithms": ["ES256"],
            }
        ]
    workloads: dict[str, Any] = {"trustDomains": list(trust_domains)}
    if trusted_hops:
        workloads["xfcc"] = {"trustedHops": list(trusted_hops)}
    return {
        "apiVersion": "extauthz/v1",
        "kind": "ExchangePolicy",
        "exchange": {"issuer": EXCHANGE_ISS, "tokenType": token_type, "maxTtl": max_ttl},
        "trustedIssuers": copy.deepcopy(list(issuers)),
        "workloads": workloads,
        "rules": copy.deepcopy(list(rules if rules is not None else [rule_doc()])),
        "default": "deny",
    }


def dump(doc: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(doc), sort_keys=False)


def compile_doc(doc: Mapping[str, Any], base_dir: Path | None = None) -> Policy:
    return compile_policy(dump(doc), source="policy.yaml", base_dir=base_dir)


def _located(pairs: list[tuple[str, Any]]) -> yamlsrc.Located:
    out = yamlsrc.Located(pairs)
    out.line = 1
    out.key_lines = {}
    return out


def load_json_as_yaml(text: str) -> Any:
    """JSON is YAML: parse it into the same ``Located`` mappings, ~100x faster than PyYAML's
    pure-Python parser. Duplicate-key and line-number handling are not exercised this way."""
    return json.loads(text, object_pairs_hook=_located)


@contextmanager
def fast_yaml() -> Iterator[None]:
    """Swap the policy loader's YAML parser for ``load_json_as_yaml`` (the compiler under test
    is unchanged); for generated and very large documents only."""
    original = yamlsrc.load
    yamlsrc.load = load_json_as_yaml
    try:
        yield
    finally:
        yamlsrc.load = original


def compile_fast(doc: Mapping[str, Any], base_dir: Path | None = None) -> Policy:
    with fast_yaml():
        return compile_policy(json.dumps(doc), source="policy.json", base_dir=base_dir)


# --- snapshots ------------------------------------------------------------------------------


def issuer_keys(idp: Idp) -> IssuerKeys:
    return parse_jwks(json.dumps(idp.jwks()).encode("utf-8"))


def snapshot_in_memory(
    policy: Policy, idps: Mapping[str, Idp], signing: Sequence[SigningKey]
) -> Snapshot:
    """A Snapshot without touching the disk (for hypothesis, which dislikes tmp_path)."""
    return Snapshot(
        policy=policy,
        issuer_keys={ident: issuer_keys(idp) for ident, idp in idps.items()},
        signing_keys=tuple(signing),
        own_keys=own_keys(signing),
    )


def snapshot_on_disk(
    tmp_path: Path, doc: Mapping[str, Any], idp: Idp, signing: SigningKey
) -> Snapshot:
    """The loader's way: policy file compiled, issuer JWKS read from the file Idp wrote."""
    idp.write_jwks(tmp_path / JWKS_FILE)
    policy = compile_policy(dump(doc), source=str(tmp_path / "policy.yaml"), base_dir=tmp_path)
    return assemble(policy, load_issuer_keys(policy), [signing])


class Ids:
    """A deterministic jti source that remembers what it handed out."""

    def __init__(self, prefix: str = "jti") -> None:
        self.prefix = prefix
        self.issued: list[str] = []
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        value = f"{self.prefix}-{next(self._counter)}"
        self.issued.append(value)
        return value


def request(
    token: str | None = None,
    *,
    method: str = "GET",
    host: str = HOST,
    path: str = "/v1/customers/42",
    principal: str = ORDERS,
    headers: Mapping[str, str] | None = None,
    cert: str = "",
) -> CheckInput:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return CheckInput(
        method=method,
        host=host,
        path=path,
        headers=all_headers,
        principal=principal,
        peer_certificate=cert,
    )


def new_signing_key(alg: str = "ES256") -> SigningKey:
    return generate_signing_key(alg)
