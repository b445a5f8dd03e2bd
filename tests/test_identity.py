"""Who is calling: SPIFFE IDs, XFCC and certificate thumbprints are parsed strictly or refused."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extauthz.decision.identity import SpiffeId, certificate_thumbprint, parse_spiffe_id, parse_xfcc

# --- SPIFFE IDs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://cluster.local/ns/shop/sa/orders", "cluster.local", "/ns/shop/sa/orders"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://td-1_x.y/a.b-c_D/E", "td-1_x.y", "/a.b-c_D/E"),
        ("SPIFFE://cluster.local/x", "cluster.local", "/x"),
    ],
)
def test_valid_spiffe_ids(text: str, domain: str, path: str) -> None:
    """The SPIFFE grammar; the scheme is case-insensitive and comes back lower-case."""
    parsed = parse_spiffe_id(text)
    assert parsed == SpiffeId(domain, path)
    assert str(parsed) == f"spiffe://{domain}{path}"


def test_path_is_case_sensitive() -> None:
    """Paths compare case-sensitively: '/SA/Orders' is another workload."""
    a = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/orders")
    b = parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/Orders")
    assert a is not None and b is not None and a != b


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://Cluster.local/ns/a",  # upper-case trust domain: refused, not folded
        "spiffe://CLUSTER.LOCAL",
        "spiffe://cluster.local/ns//a",  # empty segment
        "spiffe://cluster.local/ns/./a",  # dot segments
        "spiffe://cluster.local/ns/../a",
        "spiffe://cluster.local/ns/a/",  # trailing slash
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/%61",  # percent-encoding
        "spiffe://cluster.local/ns/a?x=1",  # query
        "spiffe://cluster.local/ns/a#f",  # fragment
        "spiffe://cluster.local:8443/ns/a",  # port
        "spiffe://user@cluster.local/ns/a",  # userinfo
        "spiffe:///ns/a",  # empty trust domain
        "spiffe://",
        "https://cluster.local/ns/a",  # other scheme
        "cluster.local/ns/a",  # no scheme (the Istio principal spelling)
        "spiffe:/cluster.local/ns/a",
        "spiffe://cluster.local/ns/caf\u00e9",  # non-ASCII
        "spiffe://cluster.local/ns/a b",
        "spiffe://cluster\u2024local/ns/a",
        "",
    ],
)
def test_invalid_spiffe_ids(text: str) -> None:
    """Anything the spec does not allow is not an identity."""
    assert parse_spiffe_id(text) is None


def test_spiffe_id_length_limits() -> None:
    """At most 2048 bytes in all, 255 for the trust domain."""
    base = "spiffe://cluster.local/"
    exact = base + "a" * (2048 - len(base))
    assert parse_spiffe_id(exact) is not None
    assert parse_spiffe_id(exact + "a") is None
    assert parse_spiffe_id("spiffe://" + "a" * 255 + "/x") is not None
    assert parse_spiffe_id("spiffe://" + "a" * 256 + "/x") is None


# --- XFCC -----------------------------------------------------------------------------------


def test_xfcc_single_element() -> None:
    """Keys are case-insensitive (returned lower-case), values keep their case."""
    got = parse_xfcc("By=spiffe://td/ns/a/sa/hop;Hash=AbC123;URI=spiffe://td/ns/b/sa/client")
    assert got == [
        {
            "by": ["spiffe://td/ns/a/sa/hop"],
            "hash": ["AbC123"],
            "uri": ["spiffe://td/ns/b/sa/client"],
        }
    ]


def test_xfcc_quoted_values_with_reserved_characters() -> None:
    """',', ';', '=' inside quotes belong to the value; '\\"' is a literal quote."""
    value = 'By=spiffe://td/hop;Subject="CN=client,OU=a;b=c";URI=spiffe://td/c;DNS="x\\"y"'
    got = parse_xfcc(value)
    assert len(got) == 1
    assert got[0]["subject"] == ["CN=client,OU=a;b=c"]
    assert got[0]["dns"] == ['x"y']
    assert got[0]["uri"] == ["spiffe://td/c"]


def test_xfcc_multiple_elements_in_order() -> None:
    """One element per hop, in the order the hops appended them."""
    got = parse_xfcc('By=spiffe://td/h1;URI=spiffe://td/a,BY=spiffe://td/h2;uri="spiffe://td/b"')
    assert [e["by"] for e in got] == [["spiffe://td/h1"], ["spiffe://td/h2"]]
    assert [e["uri"] for e in got] == [["spiffe://td/a"], ["spiffe://td/b"]]


def test_xfcc_quoted_comma_does_not_split_elements() -> None:
    got = parse_xfcc('Subject="a,b";URI=spiffe://td/x,URI=spiffe://td/y')
    assert len(got) == 2
    assert got[0]["subject"] == ["a,b"]


def test_xfcc_repeated_uri_is_kept_as_a_list() -> None:
    """A cert with two URI SANs must be visible as two, so the core can refuse it."""
    got = parse_xfcc("By=spiffe://td/hop;URI=spiffe://td/a;URI=spiffe://td/b;DNS=x;DNS=y")
    assert got[0]["uri"] == ["spiffe://td/a", "spiffe://td/b"]
    assert got[0]["dns"] == ["x", "y"]


@pytest.mark.parametrize(
    "value",
    [
        "",  # nothing
        "By",  # pair without '='
        "=x",  # empty key
        "By=a;",  # dangling separator
        "By=a,",
        "By=a;;URI=b",
        'By="unterminated',
        'By="a"b',  # garbage after a quoted value
        'By=a"b',  # quote inside an unquoted value
        "By=a=b",  # '=' inside an unquoted value
        'B"y=a',  # quote in a key
        "x" * 20000,  # too large
        "By=a;" * 4000 + "By=a",
    ],
)
def test_xfcc_malformed_raises(value: str) -> None:
    """A half-understood identity header is never acted on."""
    with pytest.raises(ValueError):
        parse_xfcc(value)


# --- certificate thumbprints ----------------------------------------------------------------


def _self_signed() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _x5t(cert: x509.Certificate) -> str:
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def test_thumbprint_is_base64url_sha256_of_der() -> None:
    """RFC 8705 x5t#S256: what a downstream verifier computes from the same certificate."""
    cert = _self_signed()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    got = certificate_thumbprint(pem)
    assert got == _x5t(cert)
    assert got is not None and "=" not in got and "+" not in got and "/" not in got
    assert len(got) == 43


def test_thumbprint_of_a_chain_is_the_first_certificate() -> None:
    leaf, other = _self_signed(), _self_signed()
    pem = (
        leaf.public_bytes(serialization.Encoding.PEM)
        + other.public_bytes(serialization.Encoding.PEM)
    ).decode()
    assert certificate_thumbprint(pem) == _x5t(leaf)


def test_thumbprint_tolerates_crlf() -> None:
    cert = _self_signed()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode().replace("\n", "\r\n")
    assert certificate_thumbprint(pem) == _x5t(cert)


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nQUJD\n",  # no end line
        "-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nQUJD\n",  # armour reversed
        "-----BEGIN CERTIFICATE-----\nQUJ\n-----END CERTIFICATE-----\n",  # bad padding
    ],
)
def test_thumbprint_of_garbage_is_none(pem: str) -> None:
    """No thumbprint rather than a thumbprint of something else."""
    assert certificate_thumbprint(pem) is None
