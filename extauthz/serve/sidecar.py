"""The sidecar: one check from a front's request to its response, whatever happens.

A front (the gRPC service today) turns its wire request into a ``CheckInput`` (or a deny, for
a request too large to look at) and a ``Decision`` back into its wire response. Between the
two, ``Sidecar.check`` runs ``decide`` on the current Snapshot, counts, logs, and turns any
fault into a deny inside the response, never an aborted call that ``failure_mode_allow``
could turn into an allow.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from extauthz.decision.authenticate import LruSubjectCache
from extauthz.decision.model import Snapshot
from extauthz.decision.pipeline import CheckInput, Decision, decide
from extauthz.decision.reasons import Deny, Reason
from extauthz.serve import metrics
from extauthz.serve.decision_log import Context, DecisionLog

__all__ = ["Edge", "Sidecar", "new_jti"]

log = logging.getLogger("extauthz")

RequestT = TypeVar("RequestT", contravariant=True)
ResponseT = TypeVar("ResponseT", covariant=True)


def new_jti() -> str:
    """A fresh token id: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


class Edge(Protocol[RequestT, ResponseT]):
    """What a front knows: its wire format in and out."""

    def parse(self, request: RequestT) -> CheckInput | Deny: ...
    def request_id(self, request: RequestT) -> str: ...
    def respond(self, decision: Decision, decision_id: str = "") -> ResponseT: ...
    def internal_error(self) -> ResponseT: ...


@dataclass(frozen=True, slots=True)
class _Loaded:
    snapshot: Snapshot
    # Belongs to this snapshot only: nothing verified under old keys or an old policy
    # survives a reload.
    cache: LruSubjectCache


class Sidecar:
    """Holds the current Snapshot. Replacing it is one attribute store: a request sees either
    the old snapshot (and its subject cache) or the new one, never a mix."""

    def __init__(
        self,
        decision_log: DecisionLog,
        *,
        clock: Callable[[], float] = time.time,
        subject_cache_size: int = 10_000,
        on_unknown_kid: Callable[[str], None] | None = None,
    ) -> None:
        self.decision_log = decision_log
        self.clock = clock
        self.subject_cache_size = subject_cache_size
        self.on_unknown_kid = on_unknown_kid
        self._loaded: _Loaded | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        """What decisions read now; None until a policy and a key are loaded."""
        loaded = self._loaded
        return loaded.snapshot if loaded is not None else None

    def install(self, snapshot: Snapshot | None) -> None:
        """Decide from ``snapshot`` from the next check on, with an empty subject cache."""
        if snapshot is not None:
            metrics.TALLY.expect((r.id for r in snapshot.policy.rules), snapshot.policy.shadow)
        self._loaded = (
            _Loaded(snapshot, LruSubjectCache(self.subject_cache_size))
            if snapshot is not None
            else None
        )

    def check(self, request: RequestT, edge: Edge[RequestT, ResponseT]) -> ResponseT:
        """Decide one request and answer it in the front's wire format."""
        started = time.perf_counter()
        now = self.clock()
        request_id = ""
        # Its own id, in the log line and in Envoy's dynamic metadata (so its access log can
        # carry it): one decision found from either side.
        decision_id = secrets.token_urlsafe(12)
        loaded = self._loaded
        parsed: CheckInput | Deny | None = None
        try:
            parsed = edge.parse(request)
            if isinstance(parsed, Deny):
                request_id = edge.request_id(request)  # a request refused before reading
                decision = Decision(parsed.reason, parsed.detail)
            elif loaded is None:
                request_id = parsed.request_id
                decision = Decision(Reason.NOT_READY, "no policy or key loaded")
            else:
                request_id = parsed.request_id
                decision = decide(parsed, loaded.snapshot, now, new_jti, loaded.cache)
            response = edge.respond(decision, decision_id)
        except Exception:
            log.exception("internal error while deciding; denying")
            decision = Decision(Reason.INTERNAL_ERROR, "internal error")
            response = edge.internal_error()
        elapsed = time.perf_counter() - started
        try:
            # A key we do not know may be one the issuer just rotated in: fetch its JWKS again
            # (rate-limited by the fetcher).
            issuer_id = decision.issuer_id if decision.reason is Reason.KEY_UNKNOWN else None
            if issuer_id and self.on_unknown_kid is not None:
                self.on_unknown_kid(issuer_id)
            metrics.TALLY.record(decision, elapsed)
            snapshot = loaded.snapshot if loaded is not None else None
            context = Context(
                decision_id,
                snapshot.policy.digest[:16] if snapshot is not None else None,
                snapshot.generation if snapshot is not None else None,
                parsed if isinstance(parsed, CheckInput) else None,
            )
            self.decision_log.write(decision, elapsed, request_id, now, context)
        except Exception:
            log.exception("recording the decision failed")
        return response
