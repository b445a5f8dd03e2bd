"""In-process measurements: ``decide`` alone, its ES256 steps, and ``policy lint``.

No gRPC, no sockets: each call is timed with ``time.perf_counter_ns`` around exactly the
function under test. Sizes are interleaved (every ``CHUNK`` decisions, every lint repeat) so
that a burst of noise on this shared machine hits every size alike; the figure reported per
size is the median over rounds.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.fixtures import Setup, check_request, sign_tokens, write_setup
from bench.stats import summary_us
from extauthz.decision.authenticate import LruSubjectCache
from extauthz.decision.jose import parse_compact, verify_signature
from extauthz.decision.pipeline import CheckInput, decide
from extauthz.policy.compiler import load_policy
from extauthz.policy.loader import assemble, load_issuer_keys, load_signing_key
from extauthz.serve.edge import check_input
from extauthz.serve.sidecar import new_jti
from extauthz.tools.lint import ERROR, lint_file
from extauthz.tools.simulate import self_signed_pem

Log = Callable[[str], None]
CHUNK = 100


class CoreFixture:
    """A compiled policy of N rules, its Snapshot and subject cache, and inputs matching its
    last rule, translated from an Envoy-shaped CheckRequest by the real edge."""

    def __init__(self, setup: Setup) -> None:
        started = time.perf_counter()
        policy = load_policy(setup.policy)
        self.compile_s = round(time.perf_counter() - started, 3)
        self.setup, self.issuer_key = setup, load_signing_key(setup.issuer_key_file)
        signing = [load_signing_key(setup.signing_key_file)]
        self.snapshot = assemble(policy, load_issuer_keys(policy), signing)
        self.cache = LruSubjectCache(10_000)
        self.cert_pem = self_signed_pem(setup.target.workload, time.time())

    def inputs(self, count: int) -> list[CheckInput]:
        """One input per fresh subject token."""
        tokens = sign_tokens(self.issuer_key, count)
        out = [check_input(check_request(self.setup.target, t, self.cert_pem)) for t in tokens]
        assert all(isinstance(x, CheckInput) for x in out)
        return out  # type: ignore[return-value]

    def time(self, inputs: Sequence[CheckInput]) -> tuple[list[int], int]:
        """Nanoseconds per decision, and how many were not allowed (there should be none)."""
        clock, pc = time.time, time.perf_counter_ns
        snapshot, cache = self.snapshot, self.cache
        samples, denied = [], 0
        for one in inputs:
            now = clock()
            t0 = pc()
            decision = decide(one, snapshot, now, new_jti, cache)
            samples.append(pc() - t0)
            denied += decision.token is None
        return samples, denied


def run_core(sizes: Sequence[int], workdir: Path, *, warm: int, cold: int, rounds: int,
             log: Log) -> dict[str, Any]:  # fmt: skip
    """warm: the same subject token every time, verified once before timing (a cache hit);
    cold: a fresh pre-signed token every time (a miss: parse and verify). Both sign."""
    fixtures = {n: CoreFixture(write_setup(workdir / f"core-{n}", n)) for n in sizes}
    log("  core: compiled in " + ", ".join(f"{fx.compile_s}s" for fx in fixtures.values()))
    samples: dict[tuple[str, int], list[list[int]]] = {}
    denied = dict.fromkeys(((k, n) for k in ("warm", "cold") for n in sizes), 0)
    for _ in range(rounds):
        batches: dict[tuple[str, int], list[CheckInput]] = {}
        for n, fx in fixtures.items():
            one = fx.inputs(1)
            fx.time(one * 100)
            batches["warm", n], batches["cold", n] = one * warm, fx.inputs(cold)
            for kind in ("warm", "cold"):
                samples.setdefault((kind, n), []).append([])
        gc.collect()
        for kind, total in (("warm", warm), ("cold", cold)):
            for chunk, start in enumerate(range(0, total, CHUNK)):
                turn = chunk % len(sizes)
                for n in [*sizes[turn:], *sizes[:turn]]:
                    got, bad = fixtures[n].time(batches[kind, n][start : start + CHUNK])
                    samples[kind, n][-1].extend(got)
                    denied[kind, n] += bad

    def summary(kind: str, n: int) -> dict[str, Any]:
        per_round = [summary_us(s) for s in samples[kind, n]]
        return {
            "p50_us": statistics.median([s["p50_us"] for s in per_round]),
            "p99_us": statistics.median([s["p99_us"] for s in per_round]),
            "rounds_p50_us": [s["p50_us"] for s in per_round],
            "iterations": sum(s["n"] for s in per_round),
            "denied": denied[kind, n],
        }

    sizes_out = {
        str(n): {"compile_s": fx.compile_s, "warm": summary("warm", n), "cold": summary("cold", n)}
        for n, fx in fixtures.items()
    }
    return {"sizes": sizes_out, "es256": es256(fixtures[sizes[0]], max(warm, 100))}


def es256(fx: CoreFixture, iterations: int) -> dict[str, Any]:
    """The two signature steps of a decision, alone: signing the narrowed token (every allow)
    and verifying the subject token's signature (every cache miss)."""
    decision = decide(fx.inputs(1)[0], fx.snapshot, time.time(), new_jti, fx.cache)
    assert decision.claims is not None
    claims, typ, key = decision.claims, fx.snapshot.policy.exchange.typ, fx.snapshot.signing_key
    jws, public = parse_compact(sign_tokens(fx.issuer_key, 1)[0]), fx.issuer_key.public()
    return {
        "sign": summary_us(_samples(lambda: key.sign(claims, typ), iterations)),
        "verify": summary_us(_samples(lambda: verify_signature(jws, public, "ES256"), iterations)),
    }


def _samples(fn: Callable[[], Any], n: int) -> list[int]:
    for _ in range(min(50, n)):
        fn()
    gc.collect()
    pc, out = time.perf_counter_ns, []
    for _ in range(n):
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out


def run_lint(sizes: Sequence[int], workdir: Path, *, repeats: int, log: Log) -> dict[str, Any]:
    """``lint_file`` (compile and every check) on policies whose rules all share one host: the
    worst case for a check that compares rules with each other."""
    setups = {n: write_setup(workdir / f"lint-{n}", n, hosts=1) for n in sizes}
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(repeats):
        for n in sizes if rep % 2 == 0 else reversed(sizes):
            gc.collect()
            started = time.perf_counter()
            findings = lint_file(setups[n].policy)
            seconds[n].append(time.perf_counter() - started)
            # an error means the policy did not compile: a fast and meaningless figure
            if errors := [f.render() for f in findings if f.severity == ERROR]:
                raise RuntimeError(f"lint of the {n}-rule policy failed:\n" + "\n".join(errors))
        log("  lint: " + ", ".join(f"{n} rules {seconds[n][-1]:.2f}s" for n in sizes))
    out: dict[str, Any] = {
        str(n): {"median_s": round(statistics.median(s), 4), "runs_s": [round(x, 4) for x in s]}
        for n, s in seconds.items()
    }
    small, big = min(sizes), max(sizes)
    return {
        "sizes": out,
        f"ratio_{big}_vs_{small}": round(
            statistics.median(seconds[big]) / statistics.median(seconds[small]), 1
        ),
    }
