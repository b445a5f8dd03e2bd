"""What extauthz mints, verified as a downstream service would, by two JOSE implementations of
no relation to ours: joserfc, and PyJWT's own ``jwt.decode`` (our code uses PyJWT only for
the signature arithmetic). Both token types, from the published JWKS, at the real time."""

from __future__ import annotations

import json
import time
from typing import Any

import corekit as k
import jwt as pyjwt
import pytest
from joserfc import jwt as josejwt
from joserfc.jwk import KeySet

from extauthz.decision.jose import jwks_document, parse_compact
from extauthz.decision.pipeline import decide

A = "spiffe://cluster.local/ns/shop/sa/a"


def _minted(token_type: str) -> tuple[str, dict[str, Any], str]:
    """A token minted now for orders -> profile (an access token, or the first Txn-Token
    of a transaction), the JWKS that publishes our key, and the audience to expect."""
    now = time.time()
    doc = k.policy_doc(token_type=token_type)
    world = k.make_world(doc)
    bearer = world.idp.key.sign(k.subject_claims(now, scope="profile.read email"), "at+jwt")
    decision = world.ask(bearer, now=now)
    assert decision.token is not None, (decision.reason, decision.detail)
    audience = k.TD if token_type == "transaction_token" else k.PROFILE
    return decision.token, jwks_document(world.snap.signing_keys), audience


TYPES = [("access_token", "at+jwt"), ("transaction_token", "txntoken+jwt")]


@pytest.mark.parametrize(("token_type", "typ"), TYPES)
def test_joserfc_verifies_what_we_mint(token_type: str, typ: str) -> None:
    token, jwks, audience = _minted(token_type)
    keys = KeySet.import_key_set(jwks)
    verified = josejwt.decode(token, keys, algorithms=["ES256"])
    assert verified.header["typ"] == typ
    registry = josejwt.JWTClaimsRegistry(
        iss={"essential": True, "value": k.EXCHANGE_ISS},
        aud={"essential": True, "value": audience},
        sub={"essential": True, "value": "user-1"},
        exp={"essential": True},
        iat={"essential": True},
        jti={"essential": True},
    )
    registry.validate(verified.claims)
    assert verified.claims == dict(parse_compact(token).claims)


@pytest.mark.parametrize("token_type", ["access_token", "transaction_token"])
def test_pyjwt_verifies_what_we_mint(token_type: str) -> None:
    token, jwks, audience = _minted(token_type)
    key = pyjwt.PyJWK.from_json(json.dumps(jwks["keys"][0]))
    claims = pyjwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience,
        issuer=k.EXCHANGE_ISS,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )
    assert claims["scope"] == "profile.read"
    if token_type == "transaction_token":
        assert {"txn", "req_wl", "tctx", "rctx", "may_act"} <= set(claims)
    else:
        assert claims["authorization_details"][0]["type"] == "http_request"


def test_a_replacement_txn_token_verifies_too() -> None:
    now = time.time()
    rules = [
        k.rule_doc(),
        k.rule_doc(
            "profile-to-a",
            workloads=[k.PROFILE],
            host="a.shop.svc.cluster.local",
            issuers=["exchange"],
            require=None,
            audience=A,
            txnToken="replace",
        ),
    ]
    world = k.make_world(k.policy_doc(rules, token_type="transaction_token"))
    bearer = world.idp.key.sign(k.subject_claims(now), "at+jwt")
    first = world.ask(bearer, now=now)
    assert first.token is not None
    inp = k.request(
        host="a.shop.svc.cluster.local", principal=k.PROFILE, headers={"txn-token": first.token}
    )
    second = decide(inp, world.snap, now, k.Ids())
    assert second.token is not None, (second.reason, second.detail)
    keys = KeySet.import_key_set(jwks_document(world.snap.signing_keys))
    claims = josejwt.decode(second.token, keys, algorithms=["ES256"]).claims
    josejwt.JWTClaimsRegistry(aud={"essential": True, "value": k.TD}).validate(claims)
    assert claims["txn"] == (first.claims or {})["txn"]
