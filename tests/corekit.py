"""Shared helpers for the tests of the decision core: policies, snapshots, tokens made by hand,
and a ``World`` to ask for decisions (imported as ``import corekit``).

pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path`` for the test files
that live there, so this module needs no package and no conftest.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import hmac
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import get_default_algorithms

from extauthz.decision.authenticate import LruSubjectCache
from extauthz.decision.jose import (
    IssuerKeys,
    SigningKey,
    generate_signing_key,
    jwks_document,
    parse_compact,
    parse_jwks,
)
from extauthz.decision.model import Policy, Snapshot
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp
from extauthz.errors import PolicyError
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
    {
        "iss",
        "sub",
        "aud",
        "iat",
        "exp",
        "jti",
        "scope",
        "client_id",
        "act",
        "authorization_details",
        "cnf",
    }
)
TXN_KEYS = frozenset({"txn", "req_wl", "tctx", "rctx", "may_act"})


# --- JOSE by hand ---------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"sig") -> str:
    """A JWS compact serialisation with any header and any (usually bogus) signature."""
    return f"{b64json(header)}.{b64json(claims)}.{b64url(signature)}"


def sign_parts(key: SigningKey, head: str, body: str, *, alg: str | None = None) -> str:
    """Validly sign already-encoded header and payload segments with ``key``; ``alg`` does the
    arithmetic of another algorithm than the key's own (a signature under a false label)."""
    signing_input = f"{head}.{body}".encode("ascii")
    signature = get_default_algorithms()[alg or key.alg].sign(signing_input, key.private_key)
    return f"{head}.{body}.{b64url(signature)}"


def sign_raw(
    key: SigningKey,
    header: Mapping[str, Any],
    claims: Mapping[str, Any],
    *,
    alg: str | None = None,
) -> str:
    """Validly signed with ``key`` but with an arbitrary header (crit, odd typ, no kid...)."""
    return sign_parts(key, b64json(header), b64json(claims), alg=alg)


def sign_bytes(key: SigningKey, header: Mapping[str, Any], payload: bytes) -> str:
    """Validly signed with ``key`` over any payload bytes (JSON no encoder would produce)."""
    return sign_parts(key, b64json(header), b64url(payload))


HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def hmac_token(
    alg: str, header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes
) -> str:
    """An HMAC-signed token (``alg`` one of HMAC_DIGESTS), as an algorithm-confusion attacker
    makes it with whatever bytes they hope the verifier uses as the secret."""
    head, body = b64json(header), b64json(claims)
    mac = hmac.new(secret, f"{head}.{body}".encode("ascii"), HMAC_DIGESTS[alg]).digest()
    return f"{head}.{body}.{b64url(mac)}"


def public_key_secrets(key: SigningKey) -> dict[str, bytes]:
    """Every way an attacker might serialise an issuer's PUBLIC key to use it as an HMAC
    secret, by name; OpenSSH and PKCS#1 only where the key type has them."""
    public = key.private_key.public_key()
    fmt, enc = serialization.PublicFormat, serialization.Encoding
    out = {
        "pem-spki": public.public_bytes(enc.PEM, fmt.SubjectPublicKeyInfo),
        "der-spki": public.public_bytes(enc.DER, fmt.SubjectPublicKeyInfo),
        "jwk": json.dumps(dict(key.public_jwk)).encode(),
        "jwk-compact": json.dumps(dict(key.public_jwk), separators=(",", ":")).encode(),
        "jwks": json.dumps(jwks_document([key])).encode(),
    }
    with contextlib.suppress(ValueError):  # OpenSSH has no encoding for some curves
        out["openssh"] = public.public_bytes(enc.OpenSSH, fmt.OpenSSH)
    with contextlib.suppress(ValueError):  # PKCS#1 is for RSA keys only
        out["pem-pkcs1"] = public.public_bytes(enc.PEM, fmt.PKCS1)
    return out


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


def issuer_doc(
    *,
    ident: str = IDP_ID,
    issuer: str = IDP_ISS,
    jwks_file: str = JWKS_FILE,
    audiences: Sequence[str] = (IDP_AUD,),
    algorithms: Sequence[str] = ("ES256",),
    token_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One ``trustedIssuers`` entry; by default the test IdP with ES256 keys from a file."""
    doc: dict[str, Any] = {
        "id": ident,
        "issuer": issuer,
        "jwks": {"file": jwks_file},
        "audiences": list(audiences),
        "algorithms": list(algorithms),
    }
    if token_types is not None:
        doc["tokenTypes"] = list(token_types)
    return doc


def policy_doc(
    rules: Sequence[Mapping[str, Any]] | None = None,
    *,
    token_type: str = "access_token",  # noqa: S107 - a token type, not a secret
    max_ttl: str | int = "300s",
    trusted_hops: Sequence[str] = (),
    trust_domains: Sequence[str] = (TD,),
    issuers: Sequence[Mapping[str, Any]] | None = None,
    exchange: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A policy document; ``exchange`` adds or overrides fields of its ``exchange`` section."""
    if issuers is None:
        issuers = [issuer_doc()]
    workloads: dict[str, Any] = {"trustDomains": list(trust_domains)}
    if trusted_hops:
        workloads["xfcc"] = {"trustedHops": list(trusted_hops)}
    return {
        "apiVersion": "extauthz/v1",
        "kind": "ExchangePolicy",
        "exchange": {
            "issuer": EXCHANGE_ISS,
            "tokenType": token_type,
            **({"trustDomain": TD} if token_type == "transaction_token" else {}),
            "maxTtl": max_ttl,
            **(exchange or {}),
        },
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


def compile_lenient(doc: dict[str, Any]) -> Policy:
    """Compile the generated document, dropping rules that make it ambiguous (those are a
    compile error by design, tested elsewhere); at least one rule always survives."""
    try:
        return compile_fast(doc)
    except PolicyError:
        pass
    kept: list[dict[str, Any]] = []
    for rule in doc["rules"]:
        try:
            compile_fast({**doc, "rules": [*kept, rule]})
        except PolicyError as exc:
            assert all("overlap" in p.message for p in exc.problems), exc
            continue
        kept.append(rule)
    doc["rules"] = kept
    return compile_fast(doc)


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


# --- asking for decisions -------------------------------------------------------------------


@dataclass
class World:
    """One sidecar's state (a Snapshot and, unless ``None``, its subject cache) and the identity
    provider it trusts. Its subject tokens carry ``scope`` unless told otherwise."""

    idp: Idp
    signing: SigningKey
    snap: Snapshot
    cache: LruSubjectCache | None = field(default_factory=LruSubjectCache)
    scope: str = "profile.read"

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """``subject_claims`` at NOW with this world's scope (``None`` removes a claim)."""
        return subject_claims(NOW, **{"scope": self.scope, **overrides})

    def token(self, typ: str = "at+jwt", **claims: Any) -> str:
        return self.idp.key.sign(self.claims(**claims), typ)

    def raw(self, header: Mapping[str, Any], **claims: Any) -> str:
        """Validly signed by the trusted IdP, with an arbitrary header."""
        return sign_raw(self.idp.key, header, self.claims(**claims))

    def header(self, **extra: Any) -> dict[str, Any]:
        return {"alg": self.idp.key.alg, "kid": self.idp.key.kid, "typ": "at+jwt", **extra}

    def ask(
        self,
        token: str | None = None,
        *,
        authorization: str | None = None,
        headers: Mapping[str, str] | None = None,
        now: float = NOW,
        **where: Any,
    ) -> Decision:
        """decide() for ``request(**where)`` carrying ``token`` as a bearer token, or the whole
        ``authorization`` value as given."""
        all_headers = dict(headers or {})
        if authorization is not None:
            all_headers["authorization"] = authorization
        elif token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        return decide(request(headers=all_headers, **where), self.snap, now, Ids(), self.cache)


def make_world(
    doc: Mapping[str, Any] | None = None,
    *,
    idp: Idp | None = None,
    jwks: Mapping[str, Any] | None = None,
    issuer_keys: Mapping[str, IssuerKeys] | None = None,
    cached: bool = True,
    scope: str = "profile.read",
) -> World:
    """A World for ``doc`` (default ``policy_doc()``), in memory: the trusted issuer's keys are
    ``jwks`` (default the IdP's own) unless ``issuer_keys`` gives every issuer's."""
    idp = idp or Idp(IDP_ISS)
    policy = compile_doc(doc if doc is not None else policy_doc())
    if issuer_keys is None:
        issuer_keys = {IDP_ID: parse_jwks(json.dumps(jwks or idp.jwks()).encode("utf-8"))}
    signing = new_signing_key()
    snap = assemble(policy, issuer_keys, [signing])
    return World(idp, signing, snap, LruSubjectCache() if cached else None, scope)


def denied(decision: Decision, reason: Reason) -> None:
    """A deny, for the documented reason, with nothing minted or signed, and not waved through
    in shadow mode."""
    assert decision.reason is reason, (decision.reason, decision.detail)
    assert not decision.allowed
    assert decision.token is None
    assert decision.claims is None
    assert not decision.shadow


def allowed(decision: Decision, rule_id: str) -> dict[str, Any]:
    """An allow by ``rule_id`` whose token carries exactly the decision's claims; those claims."""
    assert decision.allowed, (decision.reason, decision.detail)
    assert decision.rule is not None and decision.rule.id == rule_id
    assert decision.token is not None and decision.claims is not None
    assert dict(parse_compact(decision.token).claims) == dict(decision.claims)
    return dict(decision.claims)
