"""Identify: who is calling. SPIFFE IDs, XFCC elements, certificate thumbprints, and the phase.

Pure parsing of outside input. Each parser returns None (or raises ValueError for XFCC) on
anything it does not fully understand; callers treat that as "unidentified" and deny.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass

from extauthz.decision.model import Policy
from extauthz.decision.reasons import Deny, Reason

__all__ = [
    "Caller",
    "SpiffeId",
    "certificate_thumbprint",
    "identify",
    "parse_spiffe_id",
    "parse_xfcc",
    "xfcc_hash_thumbprint",
]

_MAX_SPIFFE_ID = 2048
_MAX_TRUST_DOMAIN = 255
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PREFIX = "spiffe://"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID; ``str()`` gives its one canonical spelling."""

    trust_domain: str
    path: str  # "" or "/seg/seg"

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}{self.path}"


# Callers repeat: the same few principals and certificates arrive on every request of a
# connection. The parsers are pure and their results immutable, so a bounded memo is safe.
@functools.lru_cache(maxsize=4096)
def parse_spiffe_id(text: str) -> SpiffeId | None:
    """Parse a SPIFFE ID per the SPIFFE ID spec, or None if it is not a valid one.

    The scheme and trust domain are case-insensitive in the spec, but the trust-domain grammar
    only admits lower case, so an upper-case trust domain is rejected rather than folded: two
    spellings of one identity would make exact-match lookups ambiguous.
    """
    if len(text.encode("utf-8", "surrogatepass")) > _MAX_SPIFFE_ID:
        return None
    if text[: len(_PREFIX)].lower() != _PREFIX:
        return None
    rest = text[len(_PREFIX) :]
    domain, slash, path = rest.partition("/")
    if not domain or len(domain) > _MAX_TRUST_DOMAIN or not _TRUST_DOMAIN.fullmatch(domain):
        return None
    if not slash:
        return SpiffeId(domain, "")
    segments = path.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            return None
    return SpiffeId(domain, "/" + path)


@functools.lru_cache(maxsize=1024)
def certificate_thumbprint(cert_pem: str) -> str | None:
    """RFC 8705 ``x5t#S256`` of a PEM certificate: base64url SHA-256 of its DER.

    Envoy sends the peer certificate URL-decoded by the edge already; the DER is the base64
    body between the PEM armour lines, so no X.509 parsing is needed to hash it.
    """
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = cert_pem.find(begin)
    stop = cert_pem.find(end)
    if start < 0 or stop < start:
        return None
    body = "".join(cert_pem[start + len(begin) : stop].split())
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:
        return None
    if not der:
        return None
    digest = hashlib.sha256(der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def xfcc_hash_thumbprint(hex_digest: str) -> str | None:
    """XFCC ``Hash`` is the hex SHA-256 of the client certificate's DER; ``x5t#S256`` is the
    same digest in base64url."""
    if len(hex_digest) != 64:
        return None
    try:
        digest = bytes.fromhex(hex_digest)
    except ValueError:
        return None
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


_MAX_XFCC = 16384


def parse_xfcc(value: str) -> list[dict[str, list[str]]]:
    """Split an ``x-forwarded-client-cert`` header into elements of key -> values.

    Elements are separated by ``,`` and pairs by ``;``; values containing ``,;=`` are double
    quoted with ``\\"`` escapes. Keys are case-insensitive (returned lower-cased); ``URI`` and
    ``DNS`` may repeat. Raises ValueError on anything malformed: a caller must never act on a
    half-understood identity header.
    """
    if len(value) > _MAX_XFCC:
        raise ValueError("XFCC header too large")
    elements: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {}
    i, n = 0, len(value)
    while True:
        eq = value.find("=", i)
        if eq < 0:
            raise ValueError("XFCC pair without '='")
        key = value[i:eq].strip().lower()
        if not key or any(c in key for c in ',;"'):
            raise ValueError("XFCC key malformed")
        j = eq + 1
        if j < n and value[j] == '"':
            chars: list[str] = []
            j += 1
            while True:
                if j >= n:
                    raise ValueError("XFCC unterminated quote")
                c = value[j]
                if c == "\\" and j + 1 < n:
                    chars.append(value[j + 1])
                    j += 2
                elif c == '"':
                    j += 1
                    break
                else:
                    chars.append(c)
                    j += 1
            val = "".join(chars)
        else:
            k = j
            while k < n and value[k] not in ",;":
                if value[k] in '"=':
                    raise ValueError("XFCC unquoted value with a reserved character")
                k += 1
            val = value[j:k].strip()
            j = k
        current.setdefault(key, []).append(val)
        if j >= n:
            elements.append(current)
            return elements
        if value[j] == ";":
            i = j + 1
        elif value[j] == ",":
            elements.append(current)
            current = {}
            i = j + 1
        else:
            raise ValueError("XFCC garbage after a value")


# --- the identify phase ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """The calling workload, as the request proves it."""

    spiffe_id: str
    thumbprint: str | None  # x5t#S256 of the caller's own certificate, when known


def identify(
    principal: str, peer_certificate: str, xfcc: str, policy: Policy, certificate_hash: str = ""
) -> Caller | Deny:
    """The caller: the mTLS peer (its SPIFFE ID, and its certificate or the certificate's hash
    when Envoy sends either), or, only when that peer is a named trusted hop, the client that
    hop vouches for in its XFCC element (and that element's certificate hash)."""
    peer = parse_spiffe_id(principal) if principal else None
    if peer is None:
        return Deny(Reason.WORKLOAD_UNIDENTIFIED, "the mTLS peer is not a SPIFFE ID")
    if peer_certificate:
        thumbprint = certificate_thumbprint(peer_certificate)
    else:
        thumbprint = xfcc_hash_thumbprint(certificate_hash) if certificate_hash else None
    if str(peer) in policy.xfcc_trusted_hops:
        vouched = _from_trusted_hop(xfcc, str(peer))
        if vouched is None:
            return Deny(Reason.WORKLOAD_UNIDENTIFIED, "trusted hop sent no usable XFCC element")
        # The peer certificate is the hop's own: never bind the caller's token to it.
        peer, thumbprint = vouched
    if peer.trust_domain not in policy.trust_domains:
        return Deny(Reason.WORKLOAD_UNTRUSTED, "trust domain not trusted")
    return Caller(str(peer), thumbprint)


def _from_trusted_hop(xfcc: str, hop: str) -> tuple[SpiffeId, str | None] | None:
    if not xfcc:
        return None
    try:
        elements = parse_xfcc(xfcc)
    except ValueError:
        return None
    # The hop appends its own element last; what came before it is client-controlled.
    last = elements[-1]
    if last.get("by") != [hop]:
        return None
    uris = last.get("uri", [])
    if len(uris) != 1:
        return None
    caller = parse_spiffe_id(uris[0])
    if caller is None:
        return None
    hashes = last.get("hash", [])
    return caller, xfcc_hash_thumbprint(hashes[0]) if len(hashes) == 1 else None
