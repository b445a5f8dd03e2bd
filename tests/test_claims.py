"""Time claims of any size and type in validly signed subject tokens: a documented reason,
never an exception (a 400-digit ``nbf`` once overflowed ``float()`` inside ``decide``)."""

from __future__ import annotations

from typing import Any

import corekit as k
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.decision.reasons import Reason

HUGE = 10**400

# What a time claim may do to a decision: nothing else may come out, and nothing may raise.
TIME_REASONS = {
    Reason.ALLOWED,
    Reason.CLAIM_INVALID,  # not a number (a string, a boolean, a list...)
    Reason.TOKEN_EXPIRED,
    Reason.TOKEN_NOT_YET_VALID,
    Reason.TOKEN_MALFORMED,  # NaN and infinities are not JSON numbers
}

WORLD = k.make_world(cached=False)

time_values = st.one_of(
    st.none(),  # absent
    st.integers(),
    st.integers(min_value=-(10**600), max_value=10**600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
    st.just([1]),
)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"nbf": HUGE}, Reason.TOKEN_NOT_YET_VALID),
        ({"iat": HUGE}, Reason.TOKEN_NOT_YET_VALID),
        ({"nbf": -HUGE, "iat": -HUGE}, Reason.ALLOWED),
        ({"exp": HUGE}, Reason.ALLOWED),
        ({"exp": -HUGE}, Reason.TOKEN_EXPIRED),
        ({"exp": 1e308, "nbf": 1.5}, Reason.ALLOWED),
        ({"iat": True}, Reason.CLAIM_INVALID),
    ],
)
def test_huge_and_odd_time_claims(claims: dict[str, Any], reason: Reason) -> None:
    decision = WORLD.ask(WORLD.token(**claims))
    assert decision.reason is reason, decision.detail
    if decision.allowed:
        minted = k.allowed(decision, "orders-read-profile")
        # Whatever the subject says, the minted lifetime is the rule's at most.
        assert minted["exp"] - minted["iat"] <= 30


@settings(max_examples=300, deadline=None)
@given(exp=time_values, nbf=time_values, iat=time_values)
def test_time_claims_yield_documented_reasons_only(exp: Any, nbf: Any, iat: Any) -> None:
    # None removes the claim: a token without exp is claim_invalid.
    decision = WORLD.ask(WORLD.token(exp=exp, nbf=nbf, iat=iat))
    assert decision.reason in TIME_REASONS, (decision.reason, decision.detail)
    if not decision.allowed:
        k.denied(decision, decision.reason)
