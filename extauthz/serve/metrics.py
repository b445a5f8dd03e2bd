"""Prometheus metrics. Names and labels are part of the operator interface (docs/operations.md).

With ``--workers N`` every process writes to a shared multiprocess directory (the supervisor
sets ``PROMETHEUS_MULTIPROC_DIR`` before any process imports prometheus_client), and the
supervisor's ``/metrics`` adds them up, so counters count every worker's decisions.

What every check counts (its decision, the token minted, the cache, its latency) is a few
integer increments in ``TALLY``: prometheus_client's objects take a lock and a label lookup per
update. One process reports the tally at scrape time through a collector; a worker moves it
into the shared files in a batch, from the same periodic task that flushes the decision log.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from extauthz.decision.pipeline import Decision

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# Sub-millisecond resolution: a warm decision takes tens of microseconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip

_DECISIONS_HELP = (
    "Decisions by result (allow, deny), reason code, rule id ('' when none) and shadow."
)
_DECISIONS_LABELS = ("decision", "reason", "rule", "shadow")
_SECONDS_HELP = "Time to answer one Check, from request to response, in seconds."
_MINTED_HELP = "Narrowed tokens signed and injected, by rule."
_CACHE_HELP = "Cache lookups by cache (subject: verified subject tokens) and result (hit, miss)."

# Where a worker's tally goes (registry=None: in one process the collector below reports it).
DECISIONS = Counter("extauthz_decisions_total", _DECISIONS_HELP, _DECISIONS_LABELS, registry=None)
DECISION_SECONDS = Histogram(
    "extauthz_decision_duration_seconds", _SECONDS_HELP, buckets=LATENCY_BUCKETS, registry=None
)
TOKENS_MINTED = Counter("extauthz_tokens_minted_total", _MINTED_HELP, ["rule"], registry=None)
CACHE = Counter("extauthz_cache_requests_total", _CACHE_HELP, ["cache", "result"], registry=None)


class Tally:
    """The request path's counts as plain integers."""

    def __init__(self, shared: bool = MULTIPROCESS) -> None:
        self.decisions: dict[tuple[str, str, str, str], int] = {}
        self.minted: dict[str, int] = {}
        self.cache = {"hit": 0, "miss": 0}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.seconds = 0.0
        # A worker's: latencies not yet observed, and the counts already published.
        self._latencies: list[float] | None = [] if shared else None
        self._published: dict[str, dict[Any, int]] = {"decisions": {}, "minted": {}, "cache": {}}

    def record(self, decision: Decision, elapsed: float) -> None:
        rule = decision.rule.id if decision.rule is not None else ""
        key = (
            "allow" if decision.allowed else "deny",
            decision.reason.code,
            rule,
            "true" if decision.shadow else "false",
        )
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if decision.token is not None:
            self.minted[rule] = self.minted.get(rule, 0) + 1
        if decision.cache_hit is not None:
            self.cache["hit" if decision.cache_hit else "miss"] += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        self.seconds += elapsed
        if self._latencies is not None:
            self._latencies.append(elapsed)

    def publish(self) -> None:
        """A worker: add what was counted since the last call to the shared files."""
        if self._latencies is None:
            return
        for key, delta in self._news("decisions", self.decisions):
            DECISIONS.labels(*key).inc(delta)
        for rule, delta in self._news("minted", self.minted):
            TOKENS_MINTED.labels(rule=rule).inc(delta)
        for result, delta in self._news("cache", self.cache):
            CACHE.labels(cache="subject", result=result).inc(delta)
        latencies, self._latencies = self._latencies, []
        for elapsed in latencies:
            DECISION_SECONDS.observe(elapsed)

    def _news(self, name: str, counts: dict[Any, int]) -> list[tuple[Any, int]]:
        published = self._published[name]
        news = [(k, n - published.get(k, 0)) for k, n in counts.items() if n != published.get(k, 0)]
        published.update((k, counts[k]) for k, _delta in news)
        return news


class TallyCollector(Collector):
    """One process: the tally in Prometheus's terms, read at scrape time."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def collect(self) -> Iterator[Metric]:
        tally = self.tally
        decisions = CounterMetricFamily(
            "extauthz_decisions", _DECISIONS_HELP, labels=_DECISIONS_LABELS
        )
        for key, count in list(tally.decisions.items()):
            decisions.add_metric(key, count)
        yield decisions
        seconds = HistogramMetricFamily("extauthz_decision_duration_seconds", _SECONDS_HELP)
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), tally.buckets, strict=True):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        seconds.add_metric([], buckets, tally.seconds)
        yield seconds
        minted = CounterMetricFamily("extauthz_tokens_minted", _MINTED_HELP, labels=["rule"])
        for rule, count in list(tally.minted.items()):
            minted.add_metric([rule], count)
        yield minted
        cache = CounterMetricFamily(
            "extauthz_cache_requests", _CACHE_HELP, labels=["cache", "result"]
        )
        for result, count in tally.cache.items():
            if count:
                cache.add_metric(["subject", result], count)
        yield cache


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


TALLY = Tally()
if not MULTIPROCESS:
    REGISTRY.register(TallyCollector(TALLY))

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
