"""The only module that touches JOSE and crypto libraries.

Parsing is ours and strict (duplicate JSON keys, bad base64, non-UTF-8 all fail); signature
arithmetic is PyJWT's algorithm objects over ``cryptography`` keys. Nothing here reads the
clock, a file or the policy: the phases decide with what these functions return.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, RSAPSSAlgorithm
from jwt.exceptions import InvalidKeyError

from extauthz.errors import KeyLoadError

# Asymmetric algorithms only. HMAC is absent on purpose: with it a public key becomes a secret.
_ALGORITHMS: dict[str, Any] = {
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
    "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
    "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
    "PS384": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384),
    "PS512": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512),
    "ES256": ECAlgorithm(ECAlgorithm.SHA256),
    "ES384": ECAlgorithm(ECAlgorithm.SHA384),
    "ES512": ECAlgorithm(ECAlgorithm.SHA512),
    "EdDSA": OKPAlgorithm(),
}
__all__ = [
    "MAX_JWKS_BYTES",
    "SIGNING_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "CompactJWS",
    "IssuerKeys",
    "SigningKey",
    "TokenFormatError",
    "VerifyKey",
    "b64encode",
    "generate_issuer_key",
    "generate_signing_key",
    "jwks_document",
    "parse_compact",
    "parse_jwks",
    "private_key_pem",
    "signing_key_from_pem",
    "thumbprint",
    "verify_signature",
]

SUPPORTED_ALGORITHMS = frozenset(_ALGORITHMS)
SIGNING_ALGORITHMS = frozenset({"ES256", "EdDSA"})
_EC_CURVE_FOR = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_EC_CURVE_NAME = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 256 * 1024
MAX_KID = 256


class TokenFormatError(ValueError):
    """The compact serialisation is not one we accept. The message is safe to log."""


@dataclass(frozen=True, slots=True)
class CompactJWS:
    """A parsed, not yet verified, JWS in compact form."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes


def _b64decode(part: str) -> bytes:
    if len(part) % 4 == 1 or not part.isascii():
        raise TokenFormatError("bad base64url")
    try:
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenFormatError("bad base64url") from exc
    # One spelling per value: a last character with unused bits set decodes to the same bytes
    # as the canonical one, and a second spelling of a token is a second cache key.
    if b64encode(data) != part:
        raise TokenFormatError("base64url not in canonical form")
    return data


def b64encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TokenFormatError("duplicate JSON member")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise TokenFormatError("non-standard JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise TokenFormatError("JSON number out of range")
    return value


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except TokenFormatError:
        raise
    except UnicodeDecodeError as exc:
        raise TokenFormatError("not UTF-8") from exc
    except RecursionError as exc:
        raise TokenFormatError("JSON nested too deep") from exc
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python will parse
        raise TokenFormatError("not JSON") from exc
    if not isinstance(value, dict):
        raise TokenFormatError("not a JSON object")
    return value


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def parse_compact(token: str) -> CompactJWS:
    """Split and decode a JWS compact serialisation without verifying it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenFormatError("not three dot-separated parts")
    if not all(parts) or not all(_B64URL.issuperset(p) for p in parts):
        raise TokenFormatError("bad base64url")
    header = _json_object(_b64decode(parts[0]))
    claims = _json_object(_b64decode(parts[1]))
    signature = _b64decode(parts[2])
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    return CompactJWS(header, claims, signing_input, signature)


# --- verification keys -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One public key of a trusted issuer, with the algorithms its type permits."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the key's SubjectPublicKeyInfo, base64url: the key itself, whatever its
        kid says."""
        der = self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return b64encode(hashlib.sha256(der).digest())


def _algorithms_for_public_key(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            return frozenset()
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = _EC_CURVE_NAME.get(key.curve.name)
        return frozenset(a for a, c in _EC_CURVE_FOR.items() if c == crv)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def _public_key_from_jwk(jwk: Mapping[str, Any]) -> Any:
    kty = jwk.get("kty")
    if "d" in jwk or "p" in jwk:
        raise KeyLoadError("a JWKS must hold public keys only")
    raw = json.dumps(jwk)
    try:
        if kty == "RSA":
            return RSAAlgorithm.from_jwk(raw)
        if kty == "EC":
            return ECAlgorithm.from_jwk(raw)
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            return OKPAlgorithm.from_jwk(raw)
    except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise KeyLoadError(f"key {jwk.get('kid')!r}: not a valid {kty} JWK") from exc
    raise KeyLoadError(f"key {jwk.get('kid')!r}: unsupported key type {kty!r}")


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """A trusted issuer's published keys, indexed by kid."""

    by_kid: Mapping[str, VerifyKey]
    without_kid: tuple[VerifyKey, ...]
    # Every algorithm some key here permits, worked out once rather than per request.
    algorithms: frozenset[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        keys = [*self.by_kid.values(), *self.without_kid]
        object.__setattr__(self, "algorithms", frozenset(a for k in keys for a in k.algorithms))

    def candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        """The keys a token with this ``kid`` (or none) and ``alg`` may be verified with."""
        if kid is not None:
            found = self.by_kid.get(kid)
            return [found] if found is not None and alg in found.algorithms else []
        keys = list(self.by_kid.values()) + list(self.without_kid)
        return [k for k in keys if alg in k.algorithms]

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.without_kid)


def parse_jwks(data: bytes) -> IssuerKeys:
    """Load a JWKS document. Keys for encryption, or unusable ones, are skipped; none usable
    at all is an error."""
    if len(data) > MAX_JWKS_BYTES:
        raise KeyLoadError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    try:
        doc = _json_object(data)
    except TokenFormatError as exc:
        raise KeyLoadError(f"JWKS is not valid JSON: {exc}") from exc
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise KeyLoadError("JWKS has no 'keys' list")
    by_kid: dict[str, VerifyKey] = {}
    without: list[VerifyKey] = []
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID):
            raise KeyLoadError("JWKS key with an invalid kid")
        public = _public_key_from_jwk(jwk)
        algorithms = _algorithms_for_public_key(public)
        declared = jwk.get("alg")
        if declared is not None:
            algorithms = algorithms & {declared} if isinstance(declared, str) else frozenset()
        if not algorithms:
            continue
        vk = VerifyKey(kid, algorithms, public)
        if kid is None:
            without.append(vk)
        elif kid in by_kid:
            raise KeyLoadError(f"JWKS has kid {kid!r} twice")
        else:
            by_kid[kid] = vk
    if not by_kid and not without:
        raise KeyLoadError("JWKS has no usable signature key")
    return IssuerKeys(by_kid, tuple(without))


def verify_signature(token: CompactJWS, key: VerifyKey, alg: str) -> bool:
    """Whether ``key`` signed ``token`` with ``alg``; False for an algorithm the key's type
    does not permit."""
    if alg not in key.algorithms:
        return False
    try:
        return bool(_ALGORITHMS[alg].verify(token.signing_input, key.key, token.signature))
    except (ValueError, TypeError):
        return False


# --- signing keys ----------------------------------------------------------------------------


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256), base64url: the kid we give our keys."""
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
        "RSA": ("e", "kty", "n"),
    }
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return b64encode(hashlib.sha256(canonical).digest())


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key of the exchange. ``kid`` is the RFC 7638 thumbprint of its public JWK, so
    it is the same on every restart and every replica holding the same key."""

    kid: str
    alg: str
    public_jwk: Mapping[str, Any]
    private_key: Any = field(repr=False)

    def public(self) -> VerifyKey:
        """The public half, as a verifier holds it."""
        return VerifyKey(self.kid, frozenset({self.alg}), self.private_key.public_key())

    def sign(self, claims: Mapping[str, Any], typ: str) -> str:
        """A compact JWS of ``claims`` with this key's ``alg`` and ``kid`` and ``typ``."""
        head = _encoded_header(self.alg, self.kid, typ)
        body = b64encode(_compact_json(claims))
        signing_input = f"{head}.{body}".encode("ascii")
        return f"{head}.{body}.{b64encode(_raw_signature(self, signing_input))}"


def _compact_json(value: Mapping[str, Any]) -> bytes:
    """Compact JSON, UTF-8 kept as is. orjson takes a twentieth of json.dumps's time for our
    claims (1.5 us against 26 us); it refuses integers beyond 64 bits, which the exchange never
    mints but a test issuer may sign, and those go the slow way."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@functools.lru_cache(maxsize=64)
def _encoded_header(alg: str, kid: str, typ: str) -> str:
    header = {"alg": alg, "kid": kid, "typ": typ}
    return b64encode(json.dumps(header, separators=(",", ":")).encode())


_EC_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
}
_EC_SIZE = {"ES256": 32, "ES384": 48, "ES512": 66}


def _raw_signature(key: SigningKey, message: bytes) -> bytes:
    if key.alg in _EC_HASH:
        # JWS wants r || s at fixed width; cryptography returns DER. Converting here is a few
        # integer operations, where PyJWT's generic path costs as much as the signing itself.
        der = key.private_key.sign(message, ec.ECDSA(_EC_HASH[key.alg]()))
        return _raw_ecdsa(der, _EC_SIZE[key.alg])
    return bytes(_ALGORITHMS[key.alg].sign(message, key.private_key))


def _raw_ecdsa(der: bytes, size: int) -> bytes:
    """r || s from OpenSSL's DER ``SEQUENCE {INTEGER r, INTEGER s}``. For P-256 the sequence is
    at most 72 bytes, so every length is one byte and slicing reads it (a third of the time of
    the library's decoder); anything else goes through the decoder."""
    if size == 32 and der[0] == 0x30 and der[1] == len(der) - 2 and der[2] == 0x02:
        r_len = der[3]
        r, tag, s_len, s = der[4 : 4 + r_len], der[4 + r_len], der[5 + r_len], der[6 + r_len :]
        if tag == 0x02 and s_len == len(s) and r_len <= 33 and s_len <= 33:
            return r[-32:].rjust(32, b"\0") + s[-32:].rjust(32, b"\0")
    r_int, s_int = decode_dss_signature(der)
    return r_int.to_bytes(size, "big") + s_int.to_bytes(size, "big")


def _signing_key_from_private(private: Any) -> SigningKey:
    if isinstance(private, ec.EllipticCurvePrivateKey):
        if private.curve.name != "secp256r1":
            raise KeyLoadError("EC signing keys must be P-256 (ES256)")
        alg = "ES256"
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
        jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    else:
        raise KeyLoadError("signing keys must be EC P-256 (ES256) or Ed25519 (EdDSA)")
    kid = thumbprint(jwk)
    public_jwk = {**jwk, "kid": kid, "alg": alg, "use": "sig"}
    return SigningKey(kid, alg, public_jwk, private)


def generate_signing_key(alg: str = "ES256") -> SigningKey:
    """A new signing key of ours (ES256 or EdDSA)."""
    if alg == "ES256":
        return _signing_key_from_private(ec.generate_private_key(ec.SECP256R1()))
    if alg == "EdDSA":
        return _signing_key_from_private(ed25519.Ed25519PrivateKey.generate())
    raise ValueError(f"unsupported signing algorithm {alg!r}; use ES256 or EdDSA")


def generate_issuer_key(alg: str) -> SigningKey:
    """A throwaway key in any accepted algorithm, for simulated issuers (policy tests, explain,
    the demo). Never a key of the exchange itself: those are ES256 or EdDSA only."""
    if alg in SIGNING_ALGORITHMS:
        return generate_signing_key(alg)
    private: Any
    if alg[:2] in ("RS", "PS"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    elif alg in _EC_CURVE_FOR:
        curve = {"ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private = ec.generate_private_key(curve)
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    else:
        raise ValueError(f"unsupported algorithm {alg!r}")
    kid = thumbprint(jwk)
    return SigningKey(kid, alg, {**jwk, "kid": kid, "alg": alg, "use": "sig"}, private)


def signing_key_from_pem(data: bytes) -> SigningKey:
    """Our signing key from an unencrypted PEM private key (PKCS#8 or traditional)."""
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The library's message can quote key material; ours must not.
        raise KeyLoadError("not an unencrypted PEM private key") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure is the same to the operator
        raise KeyLoadError("not a usable PEM private key") from exc
    return _signing_key_from_private(private)


def private_key_pem(key: SigningKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM, for the key file."""
    return bytes(
        key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def jwks_document(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """The JWKS that publishes the public halves of ``keys``."""
    return {"keys": [dict(k.public_jwk) for k in keys]}
