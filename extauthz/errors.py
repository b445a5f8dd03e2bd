"""The one exception tree for load-time faults.

Request-time problems are never exceptions that escape: they become a Decision with a reason
code (see ``reasons``). These exceptions are for things an operator must fix before the sidecar
can serve: a policy that does not compile, a key file that does not load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ExtauthzError(Exception):
    """Root of every error extauthz raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy document, located as precisely as we can."""

    file: str
    where: str  # "rules[2] (orders-read)" or "trustedIssuers[0] (corp-idp)"; "" for the top
    field: str  # dotted path of the offending field, "" when the whole entry is at fault
    message: str
    line: int | None = None
    code: str = "invalid-policy"  # the lint check id this problem belongs to
    fix: str = ""  # how to correct this kind of problem, one line ("" : the check id's fix)

    def __str__(self) -> str:
        loc = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [loc]
        if self.where:
            parts.append(self.where)
        if self.field:
            parts.append(self.field)
        return ": ".join(parts) + ": " + self.message


class PolicyError(ExtauthzError):
    """The policy document cannot be used. Carries every problem found, not only the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class KeyLoadError(ExtauthzError):
    """A signing key or an issuer's JWKS cannot be loaded."""
