"""Simulated requests for offline tools (``policy test``, ``explain``).

A simulated request is signed by a throwaway key per trusted issuer and run through the very
same ``decide`` the server runs, against a Snapshot whose issuer keys are those throwaway
keys. Nothing here touches the policy's real JWKS files or signing keys.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from extauthz.decision.jose import IssuerKeys, SigningKey, generate_issuer_key, generate_signing_key
from extauthz.decision.model import SELF_ISSUER_ID, TXN_TOKEN_HEADER, TXN_TYP, Policy, TrustedIssuer
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.policy.loader import assemble


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request as a reviewer writes it: who calls what, carrying which token."""

    workload: str
    method: str = "GET"
    host: str = ""
    path: str = "/"
    # Trusted issuer id; None sends no token. In transaction_token mode "exchange" (ours) or
    # a transaction token service's id sends a Txn-Token in txn-token, as an inner hop gets.
    issuer: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)  # over the defaults below
    expires_in: int = 600
    token_type: str = "at+jwt"
    certificate: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


class Simulator:
    """Throwaway issuers for a policy and a Snapshot that trusts them."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.issuer_keys: dict[str, SigningKey] = {
            issuer.id: generate_issuer_key(_algorithm_for(issuer))
            for issuer in policy.issuers.values()
        }
        self.own_key = generate_signing_key()
        self.snapshot = assemble(
            policy,
            {
                ident: IssuerKeys({key.kid: key.public()}, ())
                for ident, key in self.issuer_keys.items()
            },
            [self.own_key],
        )

    def transaction_token(self, req: SimRequest, now: float) -> str | None:
        """The Txn-Token an inner hop receives, when ``req.issuer`` is a Txn-Token source:
        minted for the simulated caller (its may_act), so that it may present it."""
        exchange = self.policy.exchange
        ours = req.issuer == SELF_ISSUER_ID
        issuer = self.policy.issuers.get(req.issuer or "")
        if not exchange.transaction_tokens or not (
            ours or (issuer is not None and issuer.transaction_token_service)
        ):
            return None
        claims: dict[str, Any] = {
            "iss": exchange.issuer if ours or issuer is None else issuer.issuer,
            "sub": "user-1",
            "aud": exchange.trust_domain,
            "iat": int(now),
            "exp": int(now) + req.expires_in,
            "jti": secrets.token_urlsafe(8),
            "txn": secrets.token_urlsafe(8),
            "req_wl": req.workload,
            "may_act": {"sub": req.workload},
        }
        claims.update(req.claims)
        key = self.own_key if ours or issuer is None else self.issuer_keys[issuer.id]
        return key.sign(claims, TXN_TYP)

    def subject_token(self, req: SimRequest, now: float) -> str | None:
        if req.issuer is None:
            return None
        if req.issuer == SELF_ISSUER_ID:
            raise ValueError(f"{SELF_ISSUER_ID!r} names our own Txn-Tokens: transaction_token only")
        issuer = self.policy.issuers.get(req.issuer)
        if issuer is None:
            raise ValueError(f"{req.issuer!r} is not a trusted issuer id of the policy")
        claims: dict[str, Any] = {
            "iss": issuer.issuer,
            "sub": "user-1",
            "aud": sorted(issuer.audiences)[0],
            "iat": int(now),
            "exp": int(now) + req.expires_in,
            "jti": secrets.token_urlsafe(8),
        }
        claims.update(req.claims)
        return self.issuer_keys[issuer.id].sign(claims, req.token_type)

    def check_input(self, req: SimRequest, now: float) -> CheckInput:
        headers = {k.lower(): v for k, v in req.headers.items()}
        txn_token = self.transaction_token(req, now)
        token = None if txn_token is not None else self.subject_token(req, now)
        if txn_token is not None:
            headers[TXN_TOKEN_HEADER] = txn_token
        elif token is not None:
            headers["authorization"] = f"Bearer {token}"
        return CheckInput(
            method=req.method,
            host=req.host,
            path=req.path,
            headers=headers,
            principal=req.workload,
            peer_certificate=self_signed_pem(req.workload, now) if req.certificate else "",
            request_id="simulated",
        )

    def decide(self, inp: CheckInput, now: float) -> Decision:
        return decide(inp, self.snapshot, now, lambda: secrets.token_urlsafe(16))


def _algorithm_for(issuer: TrustedIssuer) -> str:
    """The issuer's algorithm the simulation signs with: ES256 when allowed, else the first."""
    preferred = ("ES256", "EdDSA", "PS256", "RS256")
    for alg in preferred:
        if alg in issuer.algorithms:
            return alg
    return sorted(issuer.algorithms)[0]


def self_signed_pem(spiffe_id: str, now: float) -> str:
    """A throwaway self-signed client certificate naming ``spiffe_id``, as PEM, for simulated
    requests that need a peer certificate to bind the minted token to."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "simulated-workload")])
    start = dt.datetime.fromtimestamp(now, dt.UTC) - dt.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
