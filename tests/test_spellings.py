"""Second spellings of one token: what is refused, what is accepted, and why (see
docs/security.md, "Decisions the tests pin down")."""

from __future__ import annotations

import base64

import corekit as k
import pytest

from extauthz.decision.jose import TokenFormatError, parse_compact
from extauthz.decision.reasons import Reason

# The order of the P-256 group: s and n - s both verify.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _with_unused_bits(part: str) -> str:
    """The same bytes, spelt with a non-zero unused bit in the last character."""
    assert len(part) % 4 in (2, 3), "this part has no unused bits"
    last = B64.index(part[-1])
    return part[:-1] + B64[last | 1]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_non_canonical_base64url_is_refused(index: int) -> None:
    """Attack: the same token spelt again (a set unused bit decodes to the same bytes), so that
    it is a new cache key or passes a check on the exact text. Defence: canonical form only."""
    world = k.make_world()
    token = world.token()
    parts = token.split(".")
    if len(parts[index]) % 4 not in (2, 3):
        pytest.skip("this part of this token has no unused bits")  # a length multiple of 3
    parts[index] = _with_unused_bits(parts[index])
    twin = ".".join(parts)
    decoded = base64.urlsafe_b64decode(parts[index] + "=" * (-len(parts[index]) % 4))
    original = token.split(".")[index]
    assert decoded == base64.urlsafe_b64decode(original + "=" * (-len(original) % 4))
    with pytest.raises(TokenFormatError):
        parse_compact(twin)
    k.denied(world.ask(twin), Reason.TOKEN_MALFORMED)
    k.allowed(world.ask(token), "orders-read-profile")


def test_high_s_ecdsa_signature_is_accepted() -> None:
    """DECISION: an ES256 signature (r, n - s) verifies as (r, s) does, and is accepted.
    ECDSA signers produce either half, so refusing high s would refuse valid tokens; the
    second spelling carries the same claims the issuer signed, so it widens nothing."""
    world = k.make_world()
    token = world.token()
    head, body, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin_sig = r.to_bytes(32, "big") + (P256_N - s).to_bytes(32, "big")
    twin = f"{head}.{body}." + base64.urlsafe_b64encode(twin_sig).rstrip(b"=").decode()
    assert twin != token
    first = k.allowed(world.ask(token), "orders-read-profile")
    second = k.allowed(world.ask(twin), "orders-read-profile")
    assert {key: v for key, v in first.items() if key != "jti"} == {
        key: v for key, v in second.items() if key != "jti"
    }
