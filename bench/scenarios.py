"""The multi-process measurements: direct gRPC, through Envoy, workers, resident memory.

Scenarios are interleaved (floor, warm, cold, floor, warm, cold, ...) so that noise on this
shared machine spreads over all of them, and each figure is the median over repeats. Every
run also reads the CPU time the server processes and the generator processes used during the
window, so a reader can see which side was saturated.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.fixtures import Setup
from bench.loadgen import Generators, split, vm_status
from bench.servers import EnvoyProc, Floor, Serve
from bench.stats import median, ratio

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Plan:
    direct_concurrency: tuple[int, ...]
    envoy_concurrency: tuple[int, ...]
    repeats: int
    warmup: float
    duration: float
    direct_processes: int  # generator processes for direct gRPC
    envoy_processes: int  # generator processes for HTTPS through Envoy
    workers_processes: tuple[int, ...]  # generator process counts tried for --workers
    workers_concurrency: int  # total in flight for --workers runs
    workers_repeats: int
    rss_tokens: int


class Client:
    """How the generators build requests for one setup."""

    def __init__(self, setup: Setup, pki: Any) -> None:
        self.setup = setup
        self.pki = pki
        pair = pki.workloads["client"]
        self.cert_pem = pair.cert.read_text(encoding="ascii")

    def spec(
        self, kind: str, targets: Sequence[str | int], concurrency: int, mode: str, pool: int
    ) -> dict[str, Any]:
        pair = self.pki.workloads["client"]
        return {
            "kind": kind,
            "targets": [str(t) for t in targets],
            "concurrency": concurrency,
            "mode": "once" if mode == "once" else "wrap",
            "pool": pool,
            "target": asdict(self.setup.target),
            "issuer_key_file": str(self.setup.issuer_key_file),
            "cert_pem": self.cert_pem,
            "ca": str(self.pki.ca),
            "cert": str(pair.cert),
            "key": str(pair.key),
        }


REPEAT_POOL = 16  # tokens per generator process in "repeat" runs: all cached after first use


def fresh_pool(expected_rps: float, plan: Plan, processes: int) -> int:
    """Tokens per process so that no request of a fresh-token run has to reuse one."""
    need = expected_rps * (plan.warmup + plan.duration + 0.5) * 1.4 / processes
    return int(min(60_000, max(500, math.ceil(need))))


def _probe(gens: Generators, spec: dict[str, Any], what: str, tries: int = 1) -> None:
    last = None
    for attempt in range(tries):
        load = gens.run([spec], warmup=0.0, duration=10.0)
        if load.completed == 1:
            return
        last = load
        if attempt + 1 < tries:
            time.sleep(0.5)
    detail = ", ".join(last.error_samples) if last else ""
    raise RuntimeError(f"{what}: a probe request was not allowed ({detail or 'denied'})")


def _specs(
    client: Client, kind: str, targets: list[str | int], total: int, procs: int, mode: str,
    pool: int,
) -> list[dict[str, Any]]:  # fmt: skip
    return [client.spec(kind, targets, c, mode, pool) for c in split(total, procs)]


def _summarise(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, by_conc in runs.items():
        rows = {}
        for conc, results in by_conc.items():
            rows[str(conc)] = {
                "throughput_rps": median([r["throughput_rps"] for r in results]),
                "p50_us": median([r["p50_us"] for r in results]),
                "p99_us": median([r["p99_us"] for r in results]),
                "server_cpu_us_per_request": median(
                    [r["server_cpu_us_per_request"] for r in results]
                ),
                "runs": results,
            }
        best = max(rows.values(), key=lambda r: r["throughput_rps"] or 0) if rows else None
        out[name] = {
            "by_concurrency": rows,
            "capacity_rps": best["throughput_rps"] if best else None,
        }
    return out


def _ratios(summary: dict[str, Any], floor: str, pairs: dict[str, str]) -> dict[str, Any]:
    """Capacity ratios (best median throughput over concurrencies) and, per concurrency, the
    median of the per-repeat ratios (each pair measured back to back)."""
    out: dict[str, Any] = {}
    for key, name in pairs.items():
        out[key] = ratio(summary[name]["capacity_rps"], summary[floor]["capacity_rps"])
        per: dict[str, Any] = {}
        for conc, row in summary[name]["by_concurrency"].items():
            base = summary[floor]["by_concurrency"].get(conc)
            if base is None:
                continue
            paired = [
                ratio(a["throughput_rps"], b["throughput_rps"])
                for a, b in zip(row["runs"], base["runs"], strict=False)
            ]
            per[conc] = median(paired)
        out[key + "_by_concurrency"] = per
    return out


def _line(log: Log, what: str, conc: int, rep: int, result: dict[str, Any]) -> None:
    gen = "+".join(f"{c:.2f}" for c in result["generator_cpu_cores"])
    srv = "+".join(f"{c:.2f}" for c in result["server_cpu_cores"].values())
    bad = result["denied"] + result["errors"]
    log(
        f"  {what:<14} c={conc:<3} rep {rep + 1}: {result['throughput_rps']:8.0f}/s "
        f"p50 {result['p50_us'] or 0:7.0f}us p99 {result['p99_us'] or 0:7.0f}us "
        f"cpu: server {srv} gen {gen} other {result['other_cpu_cores']}"
        + (f"  NOT ALLOWED: {bad}" if bad else "")
    )


# --- direct gRPC ---------------------------------------------------------------------------


def run_direct(
    gens: Generators, client: Client, floor: Floor, serve: Serve, plan: Plan, log: Log
) -> dict[str, Any]:
    procs = plan.direct_processes
    targets: dict[str, list[str | int]] = {
        "floor": list(floor.grpc_targets),
        "warm": list(serve.grpc_targets),
        "cold": list(serve.grpc_targets),
    }
    pids = {"floor": floor.pid, "warm": serve.pid, "cold": serve.pid}
    _probe(gens, client.spec("grpc", targets["floor"], 1, "once", 1), "floor")
    _probe(gens, client.spec("grpc", targets["warm"], 1, "once", 1), "extauthz serve")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in targets}
    for rep in range(plan.repeats):
        for conc in plan.direct_concurrency:
            for name in ("floor", "warm", "cold"):
                if name == "cold":
                    warm = runs["warm"][conc][-1]["throughput_rps"]
                    pool = fresh_pool(warm, plan, procs)
                    mode = "fresh"
                else:
                    pool, mode = REPEAT_POOL, "repeat"
                specs = _specs(client, "grpc", targets[name], conc, procs, mode, pool)
                load = gens.run(
                    specs,
                    warmup=plan.warmup,
                    duration=plan.duration,
                    sample={"server": pids[name]},
                )
                result = load.to_json()
                runs[name].setdefault(conc, []).append(result)
                _line(log, f"direct {name}", conc, rep, result)
    summary = _summarise(runs)
    return {
        "method": (
            f"grpc.aio clients in {procs} processes, N requests in flight in total, one HTTP/2 "
            "connection per process; floor = bench.floor (GrpcFront + allow-all Sidecar); "
            "warm = extauthz serve, repeated subject tokens (cached); cold = extauthz serve, a "
            f"fresh pre-signed subject token every request. Warm-up {plan.warmup}s, window "
            f"{plan.duration}s, {plan.repeats} repeat(s) interleaved; medians."
        ),
        "scenarios": summary,
        **_ratios(summary, "floor", {"warm_vs_floor": "warm", "cold_vs_floor": "cold"}),
    }


# --- through Envoy --------------------------------------------------------------------------


def run_envoy(
    gens: Generators,
    client: Client,
    floor: Floor,
    serve: Serve,
    workdir: Path,
    plan: Plan,
    log: Log,
) -> dict[str, Any]:
    procs = plan.envoy_processes
    envoys = {
        "envoy_alone": EnvoyProc(
            "envoy-alone", client.pki, workdir, authz_ports=[floor.grpc_port], ext_authz=False
        ),
        "floor": EnvoyProc(
            "envoy-floor", client.pki, workdir, authz_ports=[floor.grpc_port], ext_authz=True
        ),
        "serve": EnvoyProc(
            "envoy-serve", client.pki, workdir, authz_ports=[serve.grpc_port], ext_authz=True
        ),
    }
    try:
        for envoy in envoys.values():
            envoy.wait_live()
        for name, envoy in envoys.items():
            spec = client.spec("https", [envoy.listen_port], 1, "once", 1)
            _probe(gens, spec, f"Envoy ({name})", tries=30)
        which = {"envoy_alone": "envoy_alone", "floor": "floor", "warm": "serve", "cold": "serve"}
        sidecar = {"envoy_alone": None, "floor": floor.pid, "warm": serve.pid, "cold": serve.pid}
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in which}
        for rep in range(plan.repeats):
            for conc in plan.envoy_concurrency:
                for name in which:
                    envoy = envoys[which[name]]
                    if name == "cold":
                        warm = runs["warm"][conc][-1]["throughput_rps"]
                        pool, mode = fresh_pool(warm, plan, procs), "fresh"
                    else:
                        pool, mode = REPEAT_POOL, "repeat"
                    specs = _specs(client, "https", [envoy.listen_port], conc, procs, mode, pool)
                    sample = {"envoy": envoy.pid}
                    if sidecar[name] is not None:
                        sample["sidecar"] = sidecar[name]  # type: ignore[assignment]
                    load = gens.run(
                        specs, warmup=plan.warmup, duration=plan.duration, sample=sample
                    )
                    result = load.to_json()
                    runs[name].setdefault(conc, []).append(result)
                    _line(log, f"envoy {name}", conc, rep, result)
    finally:
        for envoy in envoys.values():
            envoy.stop()
    summary = _summarise(runs)
    return {
        "method": (
            f"HTTPS/1.1 keep-alive clients (asyncio, one mTLS connection per in-flight request) "
            f"in {procs} processes, presenting a workload certificate, to Envoy "
            "(--concurrency 1, the shipped envoy.yaml) whose route answers 200 itself "
            "(direct_response); envoy_alone = ext_authz filter removed; floor/warm/cold = "
            "ext_authz to bench.floor / extauthz serve as in the direct runs. Warm-up "
            f"{plan.warmup}s, window {plan.duration}s, {plan.repeats} repeat(s); medians."
        ),
        "scenarios": summary,
        **_ratios(summary, "floor", {"warm_vs_floor": "warm", "cold_vs_floor": "cold"}),
        "floor_vs_envoy_alone": ratio(
            summary["floor"]["capacity_rps"], summary["envoy_alone"]["capacity_rps"]
        ),
    }


# --- --workers 1 vs 2 -----------------------------------------------------------------------


def run_workers(
    gens: Generators, client: Client, one: Serve, two: Serve, plan: Plan, log: Log
) -> dict[str, Any]:
    for serve in (one, two):
        _probe(gens, client.spec("grpc", serve.grpc_targets, 1, "once", 1), serve.name)
    worker_pids = two.worker_pids()
    if len(worker_pids) != 2:
        raise RuntimeError(f"--workers 2 runs {len(worker_pids)} worker processes")
    servers = {1: one, 2: two}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {"workers_1": {}, "workers_2": {}}
    conc = plan.workers_concurrency
    for rep in range(plan.workers_repeats):
        for procs in plan.workers_processes:
            for count, serve in servers.items():
                targets: list[str | int] = list(serve.grpc_targets)
                specs = _specs(client, "grpc", targets, conc, procs, "repeat", REPEAT_POOL)
                sample = (
                    {"server": serve.pid}
                    if count == 1
                    else {
                        "supervisor": serve.pid,
                        **{f"worker{i}": p for i, p in enumerate(worker_pids)},
                    }
                )
                load = gens.run(specs, warmup=plan.warmup, duration=plan.duration, sample=sample)
                result = load.to_json()
                result["generator_processes"] = procs
                runs[f"workers_{count}"].setdefault(procs, []).append(result)
                _line(log, f"workers {count} g{procs}", conc, rep, result)
    by_procs = _summarise(runs)
    best1 = by_procs["workers_1"]["capacity_rps"]
    best2 = by_procs["workers_2"]["capacity_rps"]
    return {
        "method": (
            f"extauthz serve --workers 1 and --workers 2, warm (repeated tokens), {conc} "
            "requests in flight in total, spread evenly over every worker port (one channel "
            "per worker per generator process), with 1..N generator processes: if throughput "
            "rises with more generator processes the generator was the bottleneck; the figure "
            "is the best median over generator counts. 'by_concurrency' keys here are "
            "generator process counts."
        ),
        "scenarios": by_procs,
        "workers2_vs_1": ratio(best2, best1),
        "cores": os.cpu_count(),
    }


# --- resident memory ------------------------------------------------------------------------

_MISS = re.compile(r'extauthz_cache_requests_total\{cache="subject",result="miss"\} ([0-9.e+]+)')


def run_rss(gens: Generators, client: Client, serve: Serve, plan: Plan, log: Log) -> dict[str, Any]:
    serve.wait_ready(timeout=300)
    after_load = vm_status(serve.pid)
    log(f"  rss: {serve.name} ready after {serve.ready_s}s, {after_load}")
    procs = 2
    per = math.ceil(plan.rss_tokens / procs)
    specs = [client.spec("grpc", serve.grpc_targets, 16, "once", per) for _ in range(procs)]
    started = time.monotonic()
    load = gens.run(specs, warmup=0.0, duration=300.0)
    filled_s = round(time.monotonic() - started, 2)
    time.sleep(0.5)
    after_fill = vm_status(serve.pid)
    found = _MISS.search(serve.metrics())
    misses = int(float(found.group(1))) if found else None
    log(
        f"  rss: sent {load.completed} distinct tokens ({load.denied + load.errors} not allowed) "
        f"in {filled_s}s, cache misses {misses}: {after_fill}"
    )
    return {
        "method": (
            "VmRSS/VmHWM from /proc/<pid>/status of an `extauthz serve` process (one worker) "
            f"with a {serve.name} policy: after it reports ready, and after {plan.rss_tokens} "
            "requests each carrying a distinct subject token (SubjectCache default size "
            "10,000, so the cache ends full)."
        ),
        "rules": client.setup.rules,
        "startup_to_ready_s": serve.ready_s,
        "after_load_mb": after_load.get("VmRSS"),
        "after_fill_mb": after_fill.get("VmRSS"),
        "peak_mb": after_fill.get("VmHWM"),
        "tokens_sent": load.completed,
        "not_allowed": load.denied + load.errors,
        "cache_misses": misses,
    }
