"""A throwaway PKI for the demo and the tests: one CA, an Envoy server cert, workload certs.

Nothing here is fit for production: keys sit unencrypted on disk and live for a day.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=1)
# Backdated so a peer whose clock is slightly behind still accepts the certs.
_BACKDATE = dt.timedelta(minutes=1)
_KEY_MODE = 0o600


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path
    spiffe_id: str | None


@dataclass(frozen=True, slots=True)
class Pki:
    dir: Path
    ca: Path
    envoy: CertPair
    workloads: dict[str, CertPair]


@dataclass(frozen=True, slots=True)
class _Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def make_pki(
    directory: Path,
    workloads: Mapping[str, str],
    *,
    trust_domain: str = "cluster.local",
) -> Pki:
    """Write a CA, an Envoy server cert and one client cert per workload into `directory`.

    `workloads` maps a file stem to the SPIFFE ID put in that cert's only URI SAN.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    issuer = _make_ca(directory, now)
    envoy_id = f"spiffe://{trust_domain}/ns/edge/sa/envoy"
    envoy = _issue(
        directory,
        "envoy",
        issuer,
        now,
        sans=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.UniformResourceIdentifier(envoy_id),
        ],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        spiffe_id=envoy_id,
    )
    issued = {
        name: _issue(
            directory,
            name,
            issuer,
            now,
            sans=[x509.UniformResourceIdentifier(spiffe_id)],
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            spiffe_id=spiffe_id,
        )
        for name, spiffe_id in workloads.items()
    }
    return Pki(dir=directory, ca=directory / "ca.crt", envoy=envoy, workloads=issued)


def x5t_s256(cert_pem: bytes) -> str:
    """RFC 8705 `x5t#S256`: base64url, unpadded, of SHA-256 over the certificate's DER."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _make_ca(directory: Path, now: dt.datetime) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("extauthz demo CA")
    cert = (
        _builder(name, name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(directory / "ca.crt", cert)
    _write_key(directory / "ca.key", key)
    return _Issuer(name=name, key=key)


def _issue(
    directory: Path,
    stem: str,
    issuer: _Issuer,
    now: dt.datetime,
    *,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    spiffe_id: str | None,
) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(stem), issuer.name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    pair = CertPair(
        cert=directory / f"{stem}.crt", key=directory / f"{stem}.key", spiffe_id=spiffe_id
    )
    _write_cert(pair.cert, cert)
    _write_key(pair.key, key)
    return pair


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now - _BACKDATE + _VALIDITY)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "extauthz demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start so the key is never briefly world-readable;
    # unlink first because os.open's mode is ignored for an existing file.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _KEY_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    # The umask could have cleared bits, never added them; chmod makes the mode exact.
    os.chmod(path, _KEY_MODE)
