"""Stable reason codes: the same string goes into the deny body, the decision log and metrics.

Renaming a code is a breaking change for dashboards and alerts; add new codes instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from extauthz.decision.model import Rule

__all__ = ["Challenge", "Deny", "Reason"]


class Challenge(enum.Enum):
    """What the deny tells the client in ``WWW-Authenticate`` (RFC 6750 section 3)."""

    NONE = ""
    BEARER = 'Bearer realm="extauthz"'
    INVALID_TOKEN = 'Bearer realm="extauthz", error="invalid_token"'
    INSUFFICIENT_SCOPE = 'Bearer realm="extauthz", error="insufficient_scope"'


class Reason(enum.Enum):
    """Why a request was allowed or denied. ``value`` is the stable code."""

    def __init__(self, code: str, http_status: int, challenge: Challenge) -> None:
        self.code = code
        self.http_status = http_status
        self.challenge = challenge

    ALLOWED = ("allowed", 200, Challenge.NONE)

    # authenticate: 401, the caller's token is missing or cannot be trusted
    TOKEN_MISSING = ("token_missing", 401, Challenge.BEARER)
    TOKEN_MALFORMED = ("token_malformed", 401, Challenge.INVALID_TOKEN)
    TOKEN_TOO_LARGE = ("token_too_large", 401, Challenge.INVALID_TOKEN)
    ISSUER_UNTRUSTED = ("issuer_untrusted", 401, Challenge.INVALID_TOKEN)
    ALGORITHM_NOT_ALLOWED = ("algorithm_not_allowed", 401, Challenge.INVALID_TOKEN)
    HEADER_UNSUPPORTED = ("header_unsupported", 401, Challenge.INVALID_TOKEN)
    TOKEN_TYPE_INVALID = ("token_type_invalid", 401, Challenge.INVALID_TOKEN)
    KEY_UNKNOWN = ("key_unknown", 401, Challenge.INVALID_TOKEN)
    SIGNATURE_INVALID = ("signature_invalid", 401, Challenge.INVALID_TOKEN)
    TOKEN_EXPIRED = ("token_expired", 401, Challenge.INVALID_TOKEN)
    TOKEN_NOT_YET_VALID = ("token_not_yet_valid", 401, Challenge.INVALID_TOKEN)
    AUDIENCE_MISMATCH = ("audience_mismatch", 401, Challenge.INVALID_TOKEN)
    CLAIM_INVALID = ("claim_invalid", 401, Challenge.INVALID_TOKEN)

    # the request as a whole
    REQUEST_TOO_LARGE = ("request_too_large", 431, Challenge.NONE)
    REQUEST_INVALID = ("request_invalid", 400, Challenge.NONE)  # not an HTTP request we read

    # identify: 403, the calling workload is not who may call
    WORKLOAD_UNIDENTIFIED = ("workload_unidentified", 403, Challenge.NONE)
    WORKLOAD_UNTRUSTED = ("workload_untrusted", 403, Challenge.NONE)

    # authorize: 403, no rule lets this caller do this with this token
    PATH_INVALID = ("path_invalid", 400, Challenge.NONE)
    HOST_INVALID = ("host_invalid", 400, Challenge.NONE)
    NO_RULE = ("no_rule", 403, Challenge.NONE)
    REEXCHANGE_DENIED = ("reexchange_denied", 403, Challenge.INVALID_TOKEN)
    ACTOR_NOT_PERMITTED = ("actor_not_permitted", 403, Challenge.NONE)
    INSUFFICIENT_SCOPE = ("insufficient_scope", 403, Challenge.INSUFFICIENT_SCOPE)
    CLAIM_MISMATCH = ("claim_mismatch", 403, Challenge.NONE)  # a require.claims condition
    RULE_INACTIVE = ("rule_inactive", 403, Challenge.NONE)  # the rule's window is not now

    # faults of our own: still a deny, never an aborted RPC
    NOT_READY = ("not_ready", 503, Challenge.NONE)
    INTERNAL_ERROR = ("internal_error", 500, Challenge.NONE)


@dataclass(frozen=True, slots=True)
class Deny:
    """What a phase returns instead of its result when the request must be denied."""

    reason: Reason
    detail: str = ""  # for the decision log only; never a token or key material
    rule: Rule | None = None  # the rule that was found, when the deny came after finding it
    issuer_id: str | None = None  # on key_unknown: whose keys the sidecar should fetch again
