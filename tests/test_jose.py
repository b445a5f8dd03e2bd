"""The JOSE layer: strict parsing, signatures, key ids, JWKS and key files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from corekit import b64json, b64url, compact
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from extauthz.decision.jose import (
    MAX_JWKS_BYTES,
    TokenFormatError,
    generate_signing_key,
    jwks_document,
    parse_compact,
    parse_jwks,
    private_key_pem,
    thumbprint,
    verify_signature,
)
from extauthz.errors import KeyLoadError
from extauthz.policy.loader import load_signing_key, write_private_key

HEADER = {"alg": "ES256", "typ": "at+jwt"}
CLAIMS = {"iss": "https://idp.example.com", "sub": "u"}

# --- parse_compact --------------------------------------------------------------------------


def test_parse_compact_decodes_header_claims_and_signing_input() -> None:
    token = compact(HEADER, CLAIMS, b"\x01\x02")
    jws = parse_compact(token)
    assert jws.header == HEADER
    assert jws.claims == CLAIMS
    assert jws.signature == b"\x01\x02"
    assert jws.signing_input == token.rsplit(".", 1)[0].encode("ascii")


def _raw(header: bytes, claims: bytes, sig: bytes = b"sig") -> str:
    return f"{b64url(header)}.{b64url(claims)}.{b64url(sig)}"


@pytest.mark.parametrize(
    "token",
    [
        _raw(b'{"alg":"ES256","alg":"none"}', b"{}"),  # duplicate header member
        _raw(b'{"alg":"ES256"}', b'{"sub":"a","sub":"b"}'),  # duplicate claim
        _raw(b'{"alg":"ES256"}', b'{"a":{"x":1,"x":2}}'),  # duplicate nested member
    ],
)
def test_duplicate_json_members_are_rejected(token: str) -> None:
    """Parsers disagree on which duplicate wins; a verifier must not pick one silently."""
    with pytest.raises(TokenFormatError, match="duplicate"):
        parse_compact(token)


@pytest.mark.parametrize(
    "claims",
    [b'{"sub":"\xff"}', b'{"sub":"\xc3"}', '{"sub":"\u00e9"}'.encode("latin-1")],
)
def test_non_utf8_is_rejected(claims: bytes) -> None:
    with pytest.raises(TokenFormatError, match="UTF-8"):
        parse_compact(_raw(b'{"alg":"ES256"}', claims))


@pytest.mark.parametrize(
    "token",
    [
        "eyJ!.eyJ.AA",  # not base64url alphabet
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0=.AA",  # padding
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.A+/A",  # standard base64 alphabet
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.A",  # impossible length
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.\u00c0\u00c0",  # non-ASCII
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0 .AA",  # whitespace
    ],
)
def test_bad_base64url_is_rejected(token: str) -> None:
    with pytest.raises(TokenFormatError):
        parse_compact(token)


@pytest.mark.parametrize(
    "token",
    [
        "a.b",
        "onlyonepart",
        "a.b.c.d",
        "a.b.c.d.e",  # JWE compact has five parts
        "",
        "..",
        f"{b64json(HEADER)}.{b64json(CLAIMS)}.",  # unsecured JWS: empty signature
        f"{b64json(HEADER)}..AA",
    ],
)
def test_not_three_non_empty_parts_is_rejected(token: str) -> None:
    with pytest.raises(TokenFormatError):
        parse_compact(token)


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        (b'["ES256"]', b"{}"),
        (b'{"alg":"ES256"}', b'[{"sub":"u"}]'),
        (b'{"alg":"ES256"}', b'"a string"'),
        (b'{"alg":"ES256"}', b"42"),
        (b'{"alg":"ES256"}', b"null"),
        (b'{"alg":"ES256"}', b"not json"),
        (b'{"alg":"ES256"}', b""),
    ],
)
def test_non_object_json_is_rejected(header: bytes, claims: bytes) -> None:
    with pytest.raises(TokenFormatError):
        parse_compact(_raw(header, claims))


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_standard_json_numbers_are_rejected(constant: bytes) -> None:
    """NaN compares false with everything: 'exp <= now' must never be silently false."""
    with pytest.raises(TokenFormatError):
        parse_compact(_raw(b'{"alg":"ES256"}', b'{"exp":' + constant + b"}"))


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"1E400"])
def test_out_of_range_floats_are_rejected(literal: bytes) -> None:
    """1e999 parses as inf, which breaks every comparison and int() after it."""
    with pytest.raises(TokenFormatError):
        parse_compact(_raw(b'{"alg":"ES256"}', b'{"exp":' + literal + b"}"))


def test_huge_integer_literal_is_a_format_error() -> None:
    """Unauthenticated input must fail as TokenFormatError, never as another exception."""
    with pytest.raises(TokenFormatError):
        parse_compact(_raw(b'{"alg":"ES256"}', b'{"exp":' + b"9" * 5000 + b"}"))


def test_deeply_nested_json_is_rejected() -> None:
    claims = b'{"a":' * 100000 + b"1" + b"}" * 100000
    with pytest.raises(TokenFormatError):
        parse_compact(_raw(b'{"alg":"ES256"}', claims))


# --- signing and verifying ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_sign_verify_round_trip(alg: str) -> None:
    """What we mint, a downstream holding our JWKS can verify; a flipped bit cannot."""
    key = generate_signing_key(alg)
    token = key.sign({"sub": "u", "n": 1}, "at+jwt")
    jws = parse_compact(token)
    assert jws.header == {"alg": alg, "kid": key.kid, "typ": "at+jwt"}
    assert jws.claims == {"sub": "u", "n": 1}
    public = parse_jwks(json.dumps(jwks_document([key])).encode()).by_kid[key.kid]
    assert verify_signature(jws, public, alg)
    assert verify_signature(jws, key.public(), alg)

    head, body, sig = token.split(".")
    tampered = parse_compact(f"{head}.{b64json({'sub': 'v', 'n': 1})}.{sig}")
    assert not verify_signature(tampered, public, alg)
    other = generate_signing_key(alg)
    assert not verify_signature(jws, other.public(), alg)


def test_verify_refuses_an_algorithm_the_key_is_not_for() -> None:
    """One key, one algorithm: an ES256 key never verifies as ES384 or RS256."""
    key = generate_signing_key("ES256")
    jws = parse_compact(key.sign({"sub": "u"}, "at+jwt"))
    for alg in ("ES384", "ES512", "RS256", "EdDSA", "HS256", "none"):
        assert not verify_signature(jws, key.public(), alg)


def test_verify_with_garbage_signature_is_false_not_an_exception() -> None:
    key = generate_signing_key("ES256")
    jws = parse_compact(compact({"alg": "ES256"}, {"sub": "u"}, b"\x00" * 3))
    assert verify_signature(jws, key.public(), "ES256") is False


def test_generate_signing_key_refuses_other_algorithms() -> None:
    for alg in ("RS256", "HS256", "none", "ES384"):
        with pytest.raises(ValueError):
            generate_signing_key(alg)


# --- kid ------------------------------------------------------------------------------------


def test_thumbprint_rfc7638_example() -> None:
    """RFC 7638 section 3.1: the published example key and its thumbprint."""
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
            "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR"
            "0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTW"
            "hAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_kid_is_the_rfc7638_thumbprint(alg: str) -> None:
    """The kid is stable across restarts and replicas holding the same key."""
    key = generate_signing_key(alg)
    required = {"ES256": ("crv", "kty", "x", "y"), "EdDSA": ("crv", "kty", "x")}[alg]
    members = {k: key.public_jwk[k] for k in required}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    assert key.kid == b64url(hashlib.sha256(canonical).digest())
    assert key.public_jwk["kid"] == key.kid
    assert key.public_jwk["alg"] == alg
    assert key.public_jwk["use"] == "sig"
    assert "d" not in key.public_jwk


def test_kid_survives_a_reload(tmp_path: Path) -> None:
    key = generate_signing_key("ES256")
    write_private_key(key, tmp_path / "k.pem")
    assert load_signing_key(tmp_path / "k.pem").kid == key.kid


# --- JWKS -----------------------------------------------------------------------------------


def _ec_jwk(curve: ec.EllipticCurve | None = None, **extra: object) -> dict[str, object]:
    public = ec.generate_private_key(curve or ec.SECP256R1()).public_key()
    return {**json.loads(ECAlgorithm.to_jwk(public)), **extra}


def _rsa_jwk(bits: int, **extra: object) -> dict[str, object]:
    public = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    return {**json.loads(RSAAlgorithm.to_jwk(public)), **extra}


def _jwks(*keys: dict[str, object]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def test_jwks_p256_key_is_for_es256_only() -> None:
    """A key type fixes its algorithm: no ES384, no RSA/HMAC confusion."""
    keys = parse_jwks(_jwks(_ec_jwk(kid="k1")))
    assert keys.by_kid["k1"].algorithms == frozenset({"ES256"})
    assert keys.candidates("k1", "ES256")
    assert keys.candidates("k1", "ES384") == []
    assert keys.candidates("k1", "RS256") == []
    assert keys.candidates("k1", "HS256") == []
    assert keys.candidates("other", "ES256") == []


def test_jwks_p384_key_is_for_es384_only() -> None:
    keys = parse_jwks(_jwks(_ec_jwk(ec.SECP384R1(), kid="k")))
    assert keys.by_kid["k"].algorithms == frozenset({"ES384"})


def test_jwks_declared_alg_narrows_further() -> None:
    keys = parse_jwks(_jwks(_rsa_jwk(2048, kid="r", alg="PS256")))
    assert keys.by_kid["r"].algorithms == frozenset({"PS256"})


def test_jwks_key_without_kid_is_a_candidate_only_without_kid() -> None:
    keys = parse_jwks(_jwks(_ec_jwk()))
    assert len(keys) == 1
    assert keys.candidates(None, "ES256")
    assert keys.candidates("any", "ES256") == []


def test_jwks_ed25519_key_is_for_eddsa_only() -> None:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    jwk = {**json.loads(OKPAlgorithm.to_jwk(public)), "kid": "ed"}
    keys = parse_jwks(_jwks(jwk))
    assert keys.by_kid["ed"].algorithms == frozenset({"EdDSA"})


def test_rsa_key_below_2048_bits_is_unusable() -> None:
    """Small RSA keys are skipped; a JWKS with nothing usable is an error."""
    with pytest.raises(KeyLoadError, match="no usable"):
        parse_jwks(_jwks(_rsa_jwk(1024, kid="small")))
    keys = parse_jwks(_jwks(_rsa_jwk(1024, kid="small"), _rsa_jwk(2048, kid="big")))
    assert "small" not in keys.by_kid
    assert keys.candidates("small", "RS256") == []
    assert keys.by_kid["big"].algorithms >= {"RS256", "PS256"}


def test_jwks_rejects_private_keys() -> None:
    """A JWKS that leaks a private key is refused, not silently used."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(private))
    assert "d" in jwk
    with pytest.raises(KeyLoadError, match="public keys only"):
        parse_jwks(_jwks(jwk))
    rsa_private = json.loads(
        RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    with pytest.raises(KeyLoadError, match="public keys only"):
        parse_jwks(_jwks(rsa_private))


def test_jwks_rejects_duplicate_kids() -> None:
    """Two keys under one kid: which one verifies would be luck."""
    with pytest.raises(KeyLoadError, match="twice"):
        parse_jwks(_jwks(_ec_jwk(kid="same"), _ec_jwk(kid="same")))


def test_jwks_rejects_oversized_documents() -> None:
    jwk = _ec_jwk(kid="k")
    doc = json.dumps({"keys": [jwk], "pad": "x" * MAX_JWKS_BYTES}).encode()
    with pytest.raises(KeyLoadError, match="larger"):
        parse_jwks(doc)


@pytest.mark.parametrize(
    "doc",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"keys": {}}',
        b'{"keys": []}',
        b'{"keys": [], "keys": []}',
        b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}',
        b'{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "bad"}]}',
    ],
)
def test_jwks_malformed_documents(doc: bytes) -> None:
    with pytest.raises(KeyLoadError):
        parse_jwks(doc)


def test_jwks_skips_encryption_keys() -> None:
    keys = parse_jwks(_jwks(_ec_jwk(kid="enc", use="enc"), _ec_jwk(kid="sig")))
    assert set(keys.by_kid) == {"sig"}


@pytest.mark.parametrize("kid", [123, "k" * 257, ["k"]])
def test_jwks_rejects_invalid_kids(kid: object) -> None:
    with pytest.raises(KeyLoadError):
        parse_jwks(_jwks(_ec_jwk(kid=kid)))


# --- key files ------------------------------------------------------------------------------


def test_write_private_key_mode_0600_and_no_overwrite(tmp_path: Path) -> None:
    """A private key is never world-readable, and an existing key is never clobbered."""
    old_umask = os.umask(0)
    try:
        key = generate_signing_key("ES256")
        path = tmp_path / "signing.pem"
        write_private_key(key, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == private_key_pem(key)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_private_key(generate_signing_key("ES256"), path)
    assert path.read_bytes() == before


def test_load_signing_key_round_trip(tmp_path: Path) -> None:
    for alg in ("ES256", "EdDSA"):
        key = generate_signing_key(alg)
        path = tmp_path / f"{alg}.pem"
        write_private_key(key, path)
        loaded = load_signing_key(path)
        assert (loaded.kid, loaded.alg) == (key.kid, key.alg)
        token = loaded.sign({"a": 1}, "at+jwt")
        assert verify_signature(parse_compact(token), key.public(), alg)


def _pem(private: object, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


SECRET_MARKER = "TOP-SECRET-MARKER-7f3a"


@pytest.mark.parametrize(
    "content",
    [
        b"-----BEGIN PRIVATE KEY-----\n"
        + SECRET_MARKER.encode()
        + b"\n-----END PRIVATE KEY-----\n",
        SECRET_MARKER.encode() + b" not a key at all",
        b"-----BEGIN EC PRIVATE KEY-----\nTU9SRS1TRUNSRVQ=\n-----END EC PRIVATE KEY-----\n",
    ],
)
def test_load_signing_key_errors_never_quote_the_file(tmp_path: Path, content: bytes) -> None:
    """An operator's log must not receive key material from a broken key file."""
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(KeyLoadError) as info:
        load_signing_key(path)
    message = str(info.value)
    assert str(path) in message
    assert SECRET_MARKER not in message
    assert "TU9SRS1TRUNSRVQ" not in message
    assert content.decode("latin-1") not in message


@pytest.mark.parametrize(
    "private",
    [
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
)
def test_load_signing_key_refuses_unsupported_keys_without_quoting_them(
    tmp_path: Path, private: object
) -> None:
    """Only P-256 and Ed25519 sign; the refusal names the file, not the key."""
    path = tmp_path / "other.pem"
    data = _pem(private)
    path.write_bytes(data)
    with pytest.raises(KeyLoadError) as info:
        load_signing_key(path)
    body = b"".join(data.splitlines()[1:-1]).decode()
    assert body[:40] not in str(info.value)
    assert str(path) in str(info.value)


def test_load_signing_key_refuses_encrypted_keys(tmp_path: Path) -> None:
    path = tmp_path / "enc.pem"
    path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1()), b"pw"))
    with pytest.raises(KeyLoadError):
        load_signing_key(path)


def test_load_signing_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyLoadError, match="missing.pem"):
        load_signing_key(tmp_path / "missing.pem")


def test_es256_signatures_convert_to_r_and_s_exactly_as_the_decoder_does() -> None:
    """The fast DER slicing must agree with cryptography's decoder on every signature,
    including those whose r or s is shorter than 32 bytes (about 1 in 128 signatures)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from extauthz.decision.jose import _raw_ecdsa

    private = ec.generate_private_key(ec.SECP256R1())
    short = 0
    for i in range(3000):
        der = private.sign(i.to_bytes(4, "big"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        assert _raw_ecdsa(der, 32) == r.to_bytes(32, "big") + s.to_bytes(32, "big")
        short += r < 1 << 248 or s < 1 << 248
    assert short > 0  # the short case was exercised
