"""One regression test per published JOSE library advisory that touches how we use JOSE.

We never call ``jwt.decode``: our own strict parser (``jose.parse_compact``) reads the token,
``core`` picks the issuer, algorithm and key, and PyJWT's algorithm objects only do the
signature arithmetic. So most PyJWT advisories cannot reach us through the API they were
found in; each test here checks that the ATTACK behind the advisory fails against our
pipeline, whatever PyJWT version is installed. (PyJWT's own ``tests/test_advisory.py`` is the
model.) docs/security.md lists the advisories and why each does or does not apply.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import corekit as k
import pytest
from corekit import IDP_ISS, NOW, World, denied, hmac_token, public_key_secrets, sign_raw

from extauthz.decision import jose
from extauthz.decision.jose import generate_issuer_key, jwks_document
from extauthz.decision.reasons import Reason
from extauthz.demo.idp import Idp
from extauthz.errors import PolicyError

ROOT = Path(__file__).resolve().parent.parent


def claims(**overrides: Any) -> dict[str, Any]:
    """A good subject-token claim set at NOW (``None`` removes a claim)."""
    return k.subject_claims(NOW, **overrides)


def sidecar(keys: list[jose.SigningKey], algorithms: list[str]) -> World:
    """The test policy's one rule, for one issuer whose JWKS holds ``keys`` and who lists
    ``algorithms``; no subject cache, so every ask verifies afresh."""
    doc = k.policy_doc(issuers=[k.issuer_doc(algorithms=algorithms)])
    return k.make_world(doc, jwks=jwks_document(keys), cached=False)


# --- CVE-2022-29217: algorithm confusion through key formats ----------------------------------


@pytest.mark.parametrize("issuer_alg", ["ES256", "EdDSA", "RS256"])
@pytest.mark.parametrize("hmac_alg", ["HS256", "HS384", "HS512"])
def test_cve_2022_29217_public_key_as_hmac_secret(issuer_alg: str, hmac_alg: str) -> None:
    """CVE-2022-29217 (PyJWT < 2.4.0): with `algorithms=jwt.algorithms.get_default_algorithms()`
    an attacker signs HS256 using the issuer's public key (notably an OpenSSH ed25519 key) as
    the HMAC secret. Our pipeline: HMAC is in no issuer's list and not in our algorithm table,
    so every encoding of the public key, with or without kid, is refused before any key use."""
    idp = generate_issuer_key(issuer_alg)
    world = sidecar([idp], [issuer_alg])
    for name, secret in public_key_secrets(idp).items():
        for header in ({"alg": hmac_alg, "kid": idp.kid}, {"alg": hmac_alg}):
            decision = world.ask(hmac_token(hmac_alg, header, claims(), secret))
            assert decision.reason is Reason.ALGORITHM_NOT_ALLOWED, name
            assert decision.token is None


def test_cve_2022_29217_hmac_cannot_be_configured_or_verified() -> None:
    """The structural defence: no HMAC in the verification table, and a policy that names an
    HMAC algorithm (or none) for an issuer does not compile."""
    assert not any(a.startswith("HS") for a in jose.SUPPORTED_ALGORITHMS)
    assert "none" not in {a.lower() for a in jose.SUPPORTED_ALGORITHMS}
    for bad in (["HS256"], ["ES256", "HS256"], ["none"], ["ES256", "HS512"]):
        with pytest.raises(PolicyError) as info:
            k.compile_doc(k.policy_doc(issuers=[k.issuer_doc(algorithms=bad)]))
        assert any(p.field == "algorithms" for p in info.value.problems)


# --- CVE-2026-48526: public-key JWK accepted as an HMAC secret when families are mixed ---------


def test_cve_2026_48526_jwk_as_hmac_secret_with_mixed_families() -> None:
    """CVE-2026-48526 / GHSA-xgmm-8j9v-c9wx (PyJWT < 2.13.0): a verifier that allows both
    asymmetric and HMAC algorithms accepts the issuer's public JWK as an HMAC secret. Our
    strongest "mixed" configuration lists every asymmetric family; HMAC still cannot be
    listed, a JWK never becomes a secret, and the forged HS256 tokens are refused."""
    rsa, ec, ed = (
        generate_issuer_key("RS256"),
        generate_issuer_key("ES256"),
        generate_issuer_key("EdDSA"),
    )
    world = sidecar([rsa, ec, ed], ["RS256", "PS256", "ES256", "EdDSA"])
    for key in (rsa, ec, ed):
        for secret in (
            json.dumps(dict(key.public_jwk)).encode(),
            json.dumps(dict(key.public_jwk), separators=(",", ":")).encode(),
        ):
            token = hmac_token("HS256", {"alg": "HS256", "kid": key.kid}, claims(), secret)
            denied(world.ask(token), Reason.ALGORITHM_NOT_ALLOWED)
    # The same issuer's genuine tokens still verify, so the denies are not an accident.
    for key in (rsa, ec, ed):
        assert world.ask(sign_raw(key, {"alg": key.alg, "kid": key.kid}, claims())).allowed
    # And every published key is bound to the algorithms of its own type, never HMAC.
    for vk in world.snap.issuer_keys["corp-idp"].by_kid.values():
        assert vk.algorithms and not any(a.startswith("HS") for a in vk.algorithms)


# --- CVE-2026-48523: header alg checked, but the key's own algorithm used to verify ------------


def test_cve_2026_48523_header_alg_is_the_alg_that_verifies() -> None:
    """CVE-2026-48523 / GHSA-jq35-7prp-9v3f (PyJWT 2.9.0-2.12.x, with a PyJWK key): the header
    `alg` was checked against the allow-list but the signature was verified with the algorithm
    bound to the JWK. Here the header `alg` must be in the issuer's list AND allowed for the
    key's type, and it is the algorithm the signature is verified with: an RSA key whose issuer
    allows only PS256 does not accept an RS256 (PKCS#1 v1.5) signature labelled PS256."""
    rsa = generate_issuer_key("PS256")
    world = sidecar([rsa], ["PS256"])
    mislabelled = sign_raw(rsa, {"alg": "PS256", "kid": rsa.kid}, claims(), alg="RS256")
    denied(world.ask(mislabelled), Reason.SIGNATURE_INVALID)
    honest_rs256 = sign_raw(rsa, {"alg": "RS256", "kid": rsa.kid}, claims(), alg="RS256")
    denied(world.ask(honest_rs256), Reason.ALGORITHM_NOT_ALLOWED)
    assert world.ask(sign_raw(rsa, {"alg": "PS256", "kid": rsa.kid}, claims())).allowed


# --- CVE-2024-53861: partial issuer match ------------------------------------------------------


@pytest.mark.parametrize(
    "iss",
    [
        "idp.example",  # a substring of the trusted issuer (the PyJWT 2.10.0 `in` check)
        "https://idp.example.co",
        "ttps://idp.example.com",
        "_https://idp.example.com_",  # a superstring
        "https://idp.example.com/",
        "https://idp.example.com.attacker.net",
        "https://IDP.EXAMPLE.COM",
    ],
)
def test_cve_2024_53861_partial_issuer_match(iss: str) -> None:
    """CVE-2024-53861 (PyJWT 2.10.0): `iss` was compared with `in`, so a substring of the
    expected issuer passed. Our issuer is chosen by exact string equality (a dict lookup)."""
    idp = Idp(IDP_ISS)
    world = sidecar([idp.key], ["ES256"])
    denied(world.ask(idp.key.sign(claims(iss=iss), "at+jwt")), Reason.ISSUER_UNTRUSTED)


@pytest.mark.parametrize("iss", [[IDP_ISS], [IDP_ISS, "x"], ["idp.example"], {"iss": IDP_ISS}])
def test_cve_2024_53861_issuer_of_another_type(iss: Any) -> None:
    """The same class through types: an `iss` list "containing" the issuer is not a string."""
    idp = Idp(IDP_ISS)
    world = sidecar([idp.key], ["ES256"])
    denied(world.ask(idp.key.sign(claims(iss=iss), "at+jwt")), Reason.CLAIM_INVALID)


# --- CVE-2026-32597: crit not enforced --------------------------------------------------------


@pytest.mark.parametrize(
    "crit",
    [["b64"], ["exp"], ["urn:x:unknown"], [], "b64", None, {"b64": False}],
)
def test_cve_2026_32597_crit_header_is_refused(crit: Any) -> None:
    """CVE-2026-32597 / GHSA-752w-5fwx-jx9f (PyJWT < 2.12.0): tokens with `crit` listing
    extensions PyJWT does not understand were accepted, against RFC 7515 4.1.11. We understand
    no extension, so a `crit` member of any value (even null or empty) refuses the token."""
    idp = Idp(IDP_ISS)
    world = sidecar([idp.key], ["ES256"])
    header = {"alg": "ES256", "kid": idp.key.kid, "typ": "at+jwt", "crit": crit}
    if crit == ["b64"]:
        header["b64"] = False
    denied(world.ask(sign_raw(idp.key, header, claims())), Reason.HEADER_UNSUPPORTED)


# --- GHSA-hxm8-2xgr-2p9m: non-canonical signature segments -----------------------------------


@pytest.mark.parametrize("suffix", ["!!!!", "====", "==", " ", "%3D", "+/"])
def test_ghsa_hxm8_non_base64url_signature_characters(suffix: str) -> None:
    """GHSA-hxm8-2xgr-2p9m (PyJWT 2.13.0): characters outside the base64url alphabet appended
    to the signature were ignored, giving a second spelling of the same token (a revocation
    bypass for anyone keying state on the raw token). We accept only the base64url alphabet in
    every segment (our subject cache is keyed by the exact token text)."""
    idp = Idp(IDP_ISS)
    world = sidecar([idp.key], ["ES256"])
    token = idp.key.sign(claims(), "at+jwt")
    assert world.ask(token).allowed
    denied(world.ask(token + suffix), Reason.TOKEN_MALFORMED)


# --- dependencies --------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_installed_pyjwt_is_at_least_the_pinned_version() -> None:
    """pyproject.toml pins the PyJWT that has every advisory fixed; the environment running the
    sidecar must not hold an older one (a stale image or lock file)."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'"PyJWT>=([0-9][0-9.]*)', pyproject)
    assert found, "pyproject.toml must pin PyJWT with a lower bound"
    pinned = found.group(1)
    installed = importlib.metadata.version("PyJWT")
    assert _version_tuple(installed) >= _version_tuple(pinned), (installed, pinned)
    assert _version_tuple(pinned) >= (2, 13, 0), "the pin must include the 2026 fixes"


def test_python_jose_is_not_a_dependency() -> None:
    """python-jose CVE-2024-33663 (algorithm confusion with OpenSSH ECDSA keys) and
    CVE-2024-33664 (JWE decompression bomb): python-jose is not one of our dependencies, and
    no module of ours imports it."""
    requires = importlib.metadata.requires("extauthz") or []
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requires}
    assert not names & {"python-jose", "python_jose", "jose"}, names
    sources = (ROOT / "extauthz").rglob("*.py")
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+jose\b", text, re.M), path
