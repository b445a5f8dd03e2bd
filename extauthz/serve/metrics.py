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
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from extauthz import __version__
from extauthz.decision.pipeline import Decision
from extauthz.decision.reasons import Reason

if TYPE_CHECKING:
    from extauthz.serve.runtime import Runtime

__all__ = ["Collector", "RuntimeCollector", "TALLY", "Tally", "mark_process_dead", "render"]

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
        # Every series an alert may read starts at 0, so its first increase is seen.
        for reason in Reason:
            if reason is not Reason.ALLOWED:
                self.decisions[("deny", reason.code, "", "false")] = 0

    def expect(self, rules: Iterable[str], shadow: bool) -> None:
        """A policy was loaded: its rules' allow and mint counts start at 0 too."""
        flag = "true" if shadow else "false"
        for rule in rules:
            self.decisions.setdefault(("allow", Reason.ALLOWED.code, rule, flag), 0)
            self.minted.setdefault(rule, 0)

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
        # A key never published goes out even at 0: its series must exist from the start.
        news = [(k, n - published.get(k, 0)) for k, n in counts.items() if published.get(k) != n]
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
            cache.add_metric(["subject", result], count)
        yield cache


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


TALLY = Tally()
if not MULTIPROCESS:
    REGISTRY.register(TallyCollector(TALLY))


class RuntimeCollector(Collector):
    """The state of a Runtime's inputs and Snapshot, read at scrape time.

    Only the process that serves ``/metrics`` reports these (with ``--workers``, the
    supervisor, which loads the same files): a reload is counted once, not once per process,
    and no gauge carries a ``pid``."""

    def __init__(self, runtime: Runtime, ready: Callable[[], bool]) -> None:
        self.runtime = runtime
        self.ready = ready

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        labels = ["input", "issuer"]
        reloads = CounterMetricFamily(
            "extauthz_reloads",
            "Loads of each input (policy, signing_keys, jwks of an issuer; for a URL issuer its "
            "fetches), the first one included, by result (success, failure).",
            labels=[*labels, "result"],
        )
        ok = GaugeMetricFamily(
            "extauthz_input_ok",
            "1 while the latest load of the input succeeded, 0 while it fails (the last good "
            "content stays in use).",
            labels=labels,
        )
        stamp = GaugeMetricFamily(
            "extauthz_last_reload_success_timestamp_seconds",
            "Unix time of the input's last successful load.",
            labels=labels,
        )
        for (kind, ident), state in runtime.input_states():
            reloads.add_metric([kind, ident, "success"], state.successes)
            reloads.add_metric([kind, ident, "failure"], state.failures)
            ok.add_metric([kind, ident], 1 if state.ok else 0)
            if state.last_success is not None:
                stamp.add_metric([kind, ident], state.last_success)
        yield from (reloads, ok, stamp)
        fetches = CounterMetricFamily(
            "extauthz_jwks_fetches",
            "Background fetches of issuer JWKS URLs, by issuer id and result (success, failure).",
            labels=["issuer", "result"],
        )
        for (ident, result), count in sorted(runtime.remote.fetches.items()):
            fetches.add_metric([ident, result], count)
        yield fetches
        snap = runtime.snapshot
        yield GaugeMetricFamily(
            "extauthz_policy_generation",
            "How many snapshots (policy, keys, JWKS) this process has loaded; 0 before the first.",
            value=runtime.generation,
        )
        yield GaugeMetricFamily(
            "extauthz_policy_rules",
            "Rules in the policy in use.",
            value=len(snap.policy.rules) if snap is not None else 0,
        )
        info = GaugeMetricFamily(
            "extauthz_policy_info",
            "1, labelled with the revision of the policy in use (the first 16 hex digits of "
            "its sha256, as in the decision log).",
            labels=["revision"],
        )
        if snap is not None:
            info.add_metric([snap.policy.digest[:16]], 1)
        yield info
        keys = GaugeMetricFamily(
            "extauthz_signing_key_info",
            "1 for each published signing key; active=true for the one that signs.",
            labels=["kid", "active"],
        )
        for index, key in enumerate(snap.signing_keys if snap is not None else ()):
            keys.add_metric([key.kid, "true" if index == 0 else "false"], 1)
        yield keys
        yield GaugeMetricFamily(
            "extauthz_ready",
            "1 while checks are decided (a policy and a signing key are loaded; with "
            "--workers, every worker SERVING too).",
            value=1 if self.ready() else 0,
        )


class BuildCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "extauthz_build_info",
            "1, labelled with the extauthz version and the Python version running it.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


class _Together:
    def __init__(self, collectors: Sequence[Collector]) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def render(extra: Sequence[Collector] = ()) -> tuple[bytes, str]:
    """The exposition text: this process's registry (or, with workers, every worker's tally
    added up), the build, and ``extra`` (the Runtime's state; the workers' processes)."""
    base: Collector = REGISTRY
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        base = CollectorRegistry()
        multiprocess.MultiProcessCollector(base)  # type: ignore[no-untyped-call]
    together = _Together([base, BuildCollector(), *extra])
    return generate_latest(together), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
