"""The multi-process measurements: direct gRPC, through Envoy, workers, resident memory.

Scenarios are interleaved (floor, warm, cold, floor, warm, cold, ...) so that noise on this
shared machine spreads over all of them, and each figure is the median over repeats. Every
run also reads the CPU time the server processes and the generator processes used during the
window, so a reader can see which side was saturated.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.fixtures import Setup, write_setup
from bench.loadgen import Generators, children_of, split, vm_status
from bench.servers import BenchEnvoy, Floor, Serve
from extauthz.demo.pki import Pki, make_pki

Log = Callable[[str], None]
REPEAT_POOL = 16  # tokens per generator process in warm runs: all cached after first use


@dataclass(frozen=True, slots=True)
class Plan:
    direct_concurrency: tuple[int, ...]
    envoy_concurrency: tuple[int, ...]
    repeats: int
    warmup: float
    duration: float
    processes: int  # generator processes
    rss_tokens: int = 10_000


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: str  # "grpc" (direct) or "https" (through Envoy)
    targets: list[str]
    sample: dict[str, int]  # the processes whose CPU counts as the server's: name -> pid
    fresh: bool = False  # a fresh subject token every request (cold)


def client_spec(setup: Setup, pki: Pki) -> dict[str, Any]:
    """What every generator process needs to build its requests for ``setup``."""
    pair = pki.workloads["client"]
    return {
        "target": asdict(setup.target),
        "issuer_key_file": str(setup.issuer_key_file),
        "cert_pem": pair.cert.read_text(encoding="ascii"),
        "ca": str(pki.ca),
        "cert": str(pair.cert),
        "key": str(pair.key),
    }


def compare(
    gens: Generators,
    client: dict[str, Any],
    scenarios: list[Scenario],
    loads: list[tuple[str, int, int]],  # (label, requests in flight, generator processes)
    plan: Plan,
    repeats: int,
    log: Log,
) -> dict[str, Any]:
    """Every scenario at every load, interleaved, ``repeats`` times: medians per load, and the
    capacity (the best median over loads) per scenario."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in scenarios}
    for rep in range(repeats):
        for label, in_flight, procs in loads:
            for i, scen in enumerate(scenarios):
                pool = REPEAT_POOL
                if scen.fresh:  # enough tokens that none is reused, from the warm run just before
                    warm = runs[scenarios[i - 1].name][label][-1]["throughput_rps"]
                    need = warm * (plan.warmup + plan.duration + 0.5) * 1.4 / procs
                    pool = int(min(60_000, max(500, math.ceil(need))))
                base = {**client, "kind": scen.kind, "targets": scen.targets, "pool": pool}
                mode = "fresh" if scen.fresh else "repeat"
                specs = [base | {"concurrency": c, "mode": mode} for c in split(in_flight, procs)]
                run = gens.run(
                    specs, warmup=plan.warmup, duration=plan.duration, sample=scen.sample
                )
                _report(log, f"{scen.name} {label} rep {rep + 1}", run)
                if not run["completed"]:
                    raise RuntimeError(f"{scen.name}: nothing was allowed: {run['error_samples']}")
                runs[scen.name].setdefault(label, []).append(run)
    out: dict[str, Any] = {}
    for name, by_load in runs.items():
        rows: dict[str, Any] = {
            label: {
                key: statistics.median([r[key] for r in results])
                for key in ("throughput_rps", "p50_us", "p99_us", "server_cpu_us_per_request")
            }
            | {"runs": results}
            for label, results in by_load.items()
        }
        best = max(r["throughput_rps"] for r in rows.values())
        out[name] = {"by_load": rows, "capacity_rps": best}
    return out


def _report(log: Log, what: str, run: dict[str, Any]) -> None:
    server = "+".join(f"{c:.2f}" for c in run["server_cpu_cores"].values())
    generators = "+".join(f"{c:.2f}" for c in run["generator_cpu_cores"])
    bad = run["denied"] + run["errors"]
    log(
        f"  {what:<24} {run['throughput_rps']:7.0f}/s p50 {run['p50_us'] or 0:6.0f}us "
        f"{run['server_cpu_us_per_request']}us cpu/request; cores: server {server}, "
        f"generators {generators}, other {run['other_cpu_cores']}"
        + (f"  NOT ALLOWED: {bad} {run['error_samples']}" if bad else "")
    )


def ratios(summary: dict[str, Any], pairs: dict[str, str], base: str = "floor") -> dict[str, Any]:
    """Capacity ratios and, per load, the median of the per-repeat ratios (each pair measured
    back to back)."""
    out: dict[str, Any] = {}
    for key, name in pairs.items():
        out[key] = round(summary[name]["capacity_rps"] / summary[base]["capacity_rps"], 3)
        out[key + "_by_load"] = {}
        for label, row in summary[name]["by_load"].items():
            pairs_run = zip(row["runs"], summary[base]["by_load"][label]["runs"], strict=True)
            paired = [a["throughput_rps"] / b["throughput_rps"] for a, b in pairs_run]
            out[key + "_by_load"][label] = round(statistics.median(paired), 3)
    return out


def direct(gens: Generators, client: dict[str, Any], floor: Floor, serve: Serve, plan: Plan,
           log: Log) -> dict[str, Any]:  # fmt: skip
    scenarios = [
        Scenario("floor", "grpc", floor.grpc_targets, {"server": floor.pid}),
        Scenario("warm", "grpc", serve.grpc_targets, {"server": serve.pid}),
        Scenario("cold", "grpc", serve.grpc_targets, {"server": serve.pid}, fresh=True),
    ]
    loads = [(f"c={c}", c, plan.processes) for c in plan.direct_concurrency]
    summary = compare(gens, client, scenarios, loads, plan, plan.repeats, log)
    return {
        "scenarios": summary,
        **ratios(summary, {"warm_vs_floor": "warm", "cold_vs_floor": "cold"}),
    }


def envoy(gens: Generators, client: dict[str, Any], floor: Floor, serve: Serve, pki: Pki,
          workdir: Path, plan: Plan, log: Log) -> dict[str, Any]:  # fmt: skip
    envoys = [
        BenchEnvoy("envoy-alone", pki, workdir, authz_ports=[floor.grpc_port], ext_authz=False),
        BenchEnvoy("envoy-floor", pki, workdir, authz_ports=[floor.grpc_port]),
        BenchEnvoy("envoy-serve", pki, workdir, authz_ports=[serve.grpc_port]),
    ]
    try:
        for proxy in envoys:
            proxy.start()
        alone, to_floor, to_serve = ([str(e.listen_port)] for e in envoys)
        via_serve = {"envoy": envoys[2].pid, "sidecar": serve.pid}
        scenarios = [
            Scenario("envoy_alone", "https", alone, {"envoy": envoys[0].pid}),
            Scenario("floor", "https", to_floor, {"envoy": envoys[1].pid, "sidecar": floor.pid}),
            Scenario("warm", "https", to_serve, via_serve),
            Scenario("cold", "https", to_serve, via_serve, fresh=True),
        ]
        loads = [(f"c={c}", c, plan.processes) for c in plan.envoy_concurrency]
        summary = compare(gens, client, scenarios, loads, plan, plan.repeats, log)
    finally:
        for proxy in envoys:
            proxy.stop()
    return {
        "scenarios": summary,
        **ratios(summary, {"warm_vs_floor": "warm", "cold_vs_floor": "cold"}),
        **ratios(summary, {"floor_vs_envoy_alone": "floor"}, base="envoy_alone"),
    }


def workers(gens: Generators, client: dict[str, Any], one: Serve, two: Serve, plan: Plan,
            log: Log) -> dict[str, Any]:  # fmt: skip
    pids = children_of(two.pid)
    if len(pids) != 2:
        raise RuntimeError(f"--workers 2 runs {len(pids)} worker processes")
    sample = {"supervisor": two.pid} | {f"worker{i}": p for i, p in enumerate(pids)}
    scenarios = [
        Scenario("workers_1", "grpc", one.grpc_targets, {"server": one.pid}),
        Scenario("workers_2", "grpc", two.grpc_targets, sample),
    ]
    # at the highest direct concurrency; the generators' CPU shows whether they kept up
    loads = [(f"c={c}", c, plan.processes) for c in plan.direct_concurrency[-1:]]
    summary = compare(gens, client, scenarios, loads, plan, plan.repeats, log)
    return {"scenarios": summary, **ratios(summary, {"workers2_vs_1": "workers_2"}, "workers_1")}


def rss(
    gens: Generators, client: dict[str, Any], serve: Serve, plan: Plan, log: Log
) -> dict[str, Any]:
    """Every distinct subject token allowed has been verified and cached: with 10,000 of them
    the cache (10,000 entries) ends full."""
    loaded = vm_status(serve.pid)
    spec = {**client, "kind": "grpc", "targets": serve.grpc_targets, "concurrency": 16}
    each = {"mode": "once", "pool": math.ceil(plan.rss_tokens / 2)}
    run = gens.run([spec | each] * 2, warmup=0, duration=300)
    time.sleep(0.5)
    filled = vm_status(serve.pid)
    log(f"  rss: loaded {loaded}, after {run['completed']} distinct tokens {filled}")
    return {
        "rules": serve.setup.rules,
        "after_load_mb": loaded["VmRSS"],
        "after_fill_mb": filled["VmRSS"],
        "peak_mb": filled["VmHWM"],
        "tokens_allowed": run["completed"],
        "not_allowed": run["denied"] + run["errors"],
    }


def run_servers(parts: set[str], plan: Plan, workdir: Path, log: Log) -> dict[str, Any]:
    """Every multi-process part asked for; each process is stopped on the way out."""
    small = write_setup(workdir / "setup-10", 10)
    pki = make_pki(workdir / "pki", {"client": small.target.workload})
    client = client_spec(small, pki)
    out: dict[str, Any] = {}
    with Generators(max(plan.processes, 2)) as gens:  # rss uses two
        if "rss" in parts:
            log("rss: 10,000 rules, then 10,000 distinct subject tokens")
            big = write_setup(workdir / "setup-10000", 10_000)
            with Serve(big, workdir) as serve:
                out["rss"] = rss(gens, client_spec(big, pki), serve, plan, log)
        if not parts & {"direct", "envoy", "workers"}:
            return out
        with Floor(workdir) as floor, Serve(small, workdir) as serve:
            if "direct" in parts:
                log("direct gRPC: floor, warm, cold")
                out["direct"] = direct(gens, client, floor, serve, plan, log)
            if "workers" in parts:
                log("workers: --workers 1 vs --workers 2")
                with Serve(small, workdir, workers=2) as two:
                    out["workers"] = workers(gens, client, serve, two, plan, log)
            if "envoy" in parts:
                log("through Envoy: alone, floor, warm, cold")
                out["envoy"] = envoy(gens, client, floor, serve, pki, workdir, plan, log)
    return out
