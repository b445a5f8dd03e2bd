"""The decision layer: pure, and the whole of the request path's logic.

``decide(CheckInput, Snapshot, now, new_id, cache)`` runs the phases in order (``pipeline``):
authenticate the subject token, identify the calling workload, authorize against the compiled
rule table, mint the narrowed token. Nothing here does I/O, reads the clock or knows a wire
format; the import contracts in pyproject.toml keep it that way.
"""

from extauthz.decision.authenticate import LruSubjectCache, Subject, SubjectCache
from extauthz.decision.model import Policy, Rule, Snapshot
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Deny, Reason

__all__ = [
    "CheckInput",
    "Decision",
    "Deny",
    "LruSubjectCache",
    "Policy",
    "Reason",
    "Rule",
    "Snapshot",
    "Subject",
    "SubjectCache",
    "decide",
]
