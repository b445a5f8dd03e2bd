"""A throwaway identity provider: a key pair, its JWKS, and subject tokens signed with it.

For the demo, the tests and policy test cases. It signs whatever claims it is given (that is
its job), so it must never be wired into a serving path.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from extauthz.decision.jose import SigningKey, generate_signing_key, jwks_document


class Idp:
    def __init__(self, issuer: str, *, alg: str = "ES256", key: SigningKey | None = None) -> None:
        self.issuer = issuer
        self.key = key or generate_signing_key(alg)

    def jwks(self) -> dict[str, Any]:
        return jwks_document([self.key])

    def write_jwks(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.jwks(), indent=2))
        return path

    def token(
        self,
        *,
        sub: str = "user-1",
        aud: str | list[str] = "https://shop.example.com",
        scope: str | None = "profile.read",
        now: float,
        ttl: int = 600,
        typ: str = "at+jwt",
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "iat": int(now),
            "exp": int(now) + ttl,
            "jti": secrets.token_urlsafe(8),
        }
        if scope is not None:
            claims["scope"] = scope
        claims.update(extra or {})
        return self.key.sign(claims, typ)
