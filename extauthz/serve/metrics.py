"""Prometheus metrics. Names and labels are part of the operator interface (docs/operations.md).

With ``--workers N`` every process writes to a shared multiprocess directory (the supervisor
sets ``PROMETHEUS_MULTIPROC_DIR`` before any process imports prometheus_client), and the
supervisor's ``/metrics`` adds them up, so counters count every worker's decisions.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# Sub-millisecond resolution: a warm decision takes tens of microseconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip

DECISIONS = Counter(
    "extauthz_decisions_total",
    "Decisions by result (allow, deny), reason code, rule id ('' when none) and shadow.",
    ["decision", "reason", "rule", "shadow"],
)
DECISION_SECONDS = Histogram(
    "extauthz_decision_duration_seconds",
    "Time to answer one Check, from request to response, in seconds.",
    buckets=LATENCY_BUCKETS,
)
TOKENS_MINTED = Counter(
    "extauthz_tokens_minted_total", "Narrowed tokens signed and injected, by rule.", ["rule"]
)
CACHE = Counter(
    "extauthz_cache_requests_total",
    "Cache lookups by cache (subject: verified subject tokens) and result (hit, miss).",
    ["cache", "result"],
)
RELOADS = Counter(
    "extauthz_reloads_total",
    "Attempts to load changed policy, keys or JWKS files, by result (success, failure).",
    ["result"],
)
JWKS_FETCHES = Counter(
    "extauthz_jwks_fetches_total",
    "Background fetches of issuer JWKS URLs, by issuer id and result (success, failure).",
    ["issuer", "result"],
)
POLICY_GENERATION = Gauge(
    "extauthz_policy_generation",
    "How many snapshots (policy, keys, JWKS) this process has loaded; 0 before the first.",
    multiprocess_mode="max",
)
POLICY_RULES = Gauge(
    "extauthz_policy_rules", "Rules in the loaded policy.", multiprocess_mode="max"
)
SIGNING_KEYS = Gauge(
    "extauthz_signing_key_info",
    "Signing keys: 1 while published (active=true for the one that signs), 0 once not.",
    ["kid", "active"],
    multiprocess_mode="liveall",
)
READY = Gauge(
    "extauthz_ready",
    "1 while a policy and a signing key are loaded.",
    multiprocess_mode="livemin",
)


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's added up."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


_published: set[tuple[str, str]] = set()


def set_signing_keys(kids: list[str]) -> None:
    """``kids``: published key ids, the active one first. Keys no longer published (or no
    longer active) drop to 0: multiprocess mode cannot remove a label set."""
    current = {(kid, "true" if index == 0 else "false") for index, kid in enumerate(kids)}
    for kid, active in _published - current:
        SIGNING_KEYS.labels(kid=kid, active=active).set(0)
    for kid, active in current:
        SIGNING_KEYS.labels(kid=kid, active=active).set(1)
    _published.clear()
    _published.update(current)


def mark_process_dead(pid: int) -> None:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
