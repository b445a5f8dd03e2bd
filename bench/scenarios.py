"""The multi-process measurements: direct gRPC, through Envoy, workers, resident memory, and
both fronts (gRPC and HTTP) through a client-side Envoy driven by wrk.

Scenarios are interleaved (floor, warm, cold, floor, warm, cold, ...) so that noise on this
shared machine spreads over all of them, and each figure is the median over repeats. Every
run also reads the CPU time the server processes and the generator processes used during the
window, so a reader can see which side was saturated.

``fronts`` (wrk -> client-side Envoy -mTLS-> server-side Envoy -> ext_authz -> sidecar): Envoy
alone, then the gRPC floor, warm and cold, then the HTTP floor, warm and cold, every scenario
through the same client-side Envoy and wrk, each server-side Envoy the shipped config of its
front. ``http_workers``: ``--workers 1`` against ``--workers 2`` on the HTTP front, warm, the
same way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.fixtures import Setup, sign_tokens, write_setup
from bench.loadgen import (
    WRK_LAUNCH_S,
    Generators,
    children_of,
    run_wrk,
    split,
    too_many_bad,
    vm_status,
    write_tokens,
    wrk_version,
)
from bench.servers import BenchEnvoy, ClientEnvoy, Floor, Serve
from extauthz.demo.pki import Pki, make_pki
from extauthz.policy.loader import load_signing_key

Log = Callable[[str], None]
REPEAT_POOL = 16  # tokens per generator process in warm runs: all cached after first use
WRK_WARM_POOL = 32  # tokens wrk cycles in warm runs (as the two Python generators' 16 each)
COLD_MARGIN = 1.4  # cold pools: the warm rate x wrk's whole run x this


@dataclass(frozen=True, slots=True)
class Plan:
    direct_concurrency: tuple[int, ...]
    envoy_concurrency: tuple[int, ...]
    repeats: int
    warmup: float
    duration: float
    processes: int  # generator processes
    rss_tokens: int = 10_000
    front_concurrency: tuple[int, ...] = (32,)  # wrk connections, through the client Envoy


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


@dataclass(frozen=True, slots=True)
class WrkScenario:
    name: str
    port: int  # the client-side Envoy's plain listener for this scenario's server-side Envoy
    sample: dict[str, int]  # name -> pid; "extauthz*" are the server's, see loadgen.run_wrk
    fresh: bool = False  # cold: every token once
    warm_of: str = ""  # cold: the warm scenario whose rate sizes the token pool


def compare_wrk(scenarios: list[WrkScenario], setup: Setup, loads: list[int], plan: Plan,
                workdir: Path, log: Log) -> dict[str, Any]:  # fmt: skip
    """``compare`` for wrk: every scenario at every load (connections), interleaved,
    ``plan.repeats`` times; medians per load and each scenario's capacity. A cold run signs a
    fresh pool first, sized from its warm scenario's last rate (rate x wrk's whole run x 1.4);
    one that still had to reuse tokens is run once more with twice the pool, and if it again
    reuses, it stays marked ``invalid``. Many non-200s fail the run."""
    key = load_signing_key(setup.issuer_key_file)
    warm_tokens = write_tokens(workdir / "tokens-warm.txt", sign_tokens(key, WRK_WARM_POOL))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in scenarios}
    span = WRK_LAUNCH_S + plan.warmup + plan.duration + 0.2
    for rep in range(plan.repeats):
        for load in loads:
            label = f"c={load}"
            for scen in scenarios:
                tokens, pool = warm_tokens, WRK_WARM_POOL
                if scen.fresh:
                    rate = runs[scen.warm_of][label][-1]["throughput_rps"]
                    pool = int(min(200_000, max(1000, math.ceil(rate * span * COLD_MARGIN))))
                for attempt in (1, 2):
                    if scen.fresh:
                        tokens = write_tokens(workdir / "tokens-cold.txt", sign_tokens(key, pool))
                    run = run_wrk(scen.port, setup.target, tokens, fresh=scen.fresh,
                                  connections=load, warmup=plan.warmup, duration=plan.duration,
                                  sample=scen.sample)  # fmt: skip
                    _report_wrk(log, f"{scen.name} {label} rep {rep + 1}", run)
                    if not (scen.fresh and run["reused"] and attempt == 1):
                        break
                    pool *= 2
                    log(f"  {scen.name}: the pool ran out; once more with {pool} tokens")
                if too_many_bad(run):
                    raise RuntimeError(f"{scen.name} {label}: {run['not_200']} not 200 "
                                       f"{run['statuses']}, socket errors {run['socket_errors']},"
                                       f" {run['completed']} completed")  # fmt: skip
                runs[scen.name].setdefault(label, []).append(run)
    return aggregate_wrk(runs)


def aggregate_wrk(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Scenario -> load -> runs (``run_wrk``'s figures) into the medians per load and each
    scenario's capacity: its best median throughput, and the load it was reached at."""
    out: dict[str, Any] = {}
    for name, by_load in runs.items():
        rows: dict[str, Any] = {}
        for label, results in by_load.items():
            row: dict[str, Any] = {
                key: statistics.median([r[key] for r in results])
                for key in ("throughput_rps", "p50_us", "p99_us", "generator_cpu_cores")
            }
            row["extauthz_cpu_us_per_check"] = _median_of(results, "extauthz_cpu_us_per_check")
            row["cpu_us_per_check"] = {
                proc: _median_of([r["cpu_us_per_check"] for r in results], proc)
                for proc in results[0]["cpu_us_per_check"]
            }
            row["invalid_runs"] = sum(1 for r in results if r["invalid"])
            rows[label] = row | {"runs": results}
        best = max(rows, key=lambda label: rows[label]["throughput_rps"])
        out[name] = {"by_load": rows, "capacity_rps": rows[best]["throughput_rps"],
                     "capacity_load": best}  # fmt: skip
    return out


def _median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _report_wrk(log: Log, what: str, run: dict[str, Any]) -> None:
    per = run["cpu_us_per_check"]
    cpu = ", ".join(f"{k} {per[k]}" for k in per)
    cores = "+".join(f"{c:.2f}" for c in run["cpu_cores"].values())
    bad = run["not_200"] + sum(run["socket_errors"].values())
    log(
        f"  {what:<26} {run['throughput_rps']:7.0f}/s p50 {run['p50_us'] or 0:6.0f}us; "
        f"cpu us/check: {cpu}; cores {cores}, other {run['other_cpu_cores']}"
        + (f"; saturated: {', '.join(run['saturated'])}" if run["saturated"] else "")
        + (f"  NOT 200: {bad} {run['statuses']} {run['socket_errors']}" if bad else "")
        + (f"  INVALID: {run['invalid']}" if run["invalid"] else "")
    )


def fronts(floor: Floor, serve: Serve, setup: Setup, pki: Pki, workdir: Path, plan: Plan,
           log: Log) -> dict[str, Any]:  # fmt: skip
    """Both fronts through the same client-side Envoy and wrk: see the module's docstring."""
    envoys = {
        "envoy_alone": BenchEnvoy("wrk-envoy-alone", pki, workdir, authz_ports=[floor.grpc_port],
                                  ext_authz=False),
        "grpc_floor": BenchEnvoy("wrk-envoy-grpc-floor", pki, workdir,
                                 authz_ports=[floor.grpc_port]),
        "grpc_serve": BenchEnvoy("wrk-envoy-grpc-serve", pki, workdir,
                                 authz_ports=[serve.grpc_port]),
        "http_floor": BenchEnvoy("wrk-envoy-http-floor", pki, workdir,
                                 authz_ports=[floor.http_port or 0], front="http"),
        "http_serve": BenchEnvoy("wrk-envoy-http-serve", pki, workdir,
                                 authz_ports=[serve.http_port or 0], front="http"),
    }  # fmt: skip
    with _started(envoys, pki, setup, workdir) as client:

        def scen(name: str, via: str, server: int | None, **kw: Any) -> WrkScenario:
            sample = {"extauthz": server} if server else {}
            sample |= {"envoy": envoys[via].pid, "client_envoy": client.pid}
            return WrkScenario(name, client.listen_ports[via], sample, **kw)

        scenarios = [
            scen("envoy_alone", "envoy_alone", None),
            scen("grpc_floor", "grpc_floor", floor.pid),
            scen("grpc_warm", "grpc_serve", serve.pid),
            scen("grpc_cold", "grpc_serve", serve.pid, fresh=True, warm_of="grpc_warm"),
            scen("http_floor", "http_floor", floor.pid),
            scen("http_warm", "http_serve", serve.pid),
            scen("http_cold", "http_serve", serve.pid, fresh=True, warm_of="http_warm"),
        ]
        summary = compare_wrk(scenarios, setup, list(plan.front_concurrency), plan, workdir, log)
    return fronts_result(summary)


def fronts_result(summary: dict[str, Any]) -> dict[str, Any]:
    """The part's result from its scenarios (``aggregate_wrk``): capacity ratios over each
    floor and over Envoy alone, the server-side Envoy's CPU ratios, the invalid runs."""
    pairs = {
        "grpc_warm_vs_grpc_floor": "grpc_warm", "grpc_cold_vs_grpc_floor": "grpc_cold",
        "http_floor_vs_grpc_floor": "http_floor",
        "http_warm_vs_grpc_floor": "http_warm", "http_cold_vs_grpc_floor": "http_cold",
    }  # fmt: skip
    over_http = {"http_warm_vs_http_floor": "http_warm", "http_cold_vs_http_floor": "http_cold"}
    return {
        "generator": generator_description(),
        "scenarios": summary,
        **ratios(summary, pairs, base="grpc_floor"),
        **ratios(summary, over_http, base="http_floor"),
        **ratios(summary, {"grpc_floor_vs_envoy_alone": "grpc_floor"}, base="envoy_alone"),
        "envoy_cpu_warm_vs_floor": envoy_cpu_ratio(summary, "grpc_warm", "grpc_floor"),
        "envoy_cpu_http_warm_vs_http_floor": envoy_cpu_ratio(summary, "http_warm", "http_floor"),
        "invalid": invalid_runs(summary),
    }


def http_workers(serve: Serve, two: Serve, setup: Setup, pki: Pki, workdir: Path, plan: Plan,
                 log: Log) -> dict[str, Any]:  # fmt: skip
    """``--workers 1`` against ``--workers 2`` on the HTTP front (the supervisor opens the one
    port, both workers accept on it), warm, through the client-side Envoy and wrk, at the
    highest front concurrency. No target: reported only."""
    pids = children_of(two.pid)
    if len(pids) != 2:
        raise RuntimeError(f"--workers 2 runs {len(pids)} worker processes")
    envoys = {
        "http_workers_1": BenchEnvoy("wrk-envoy-http-workers-1", pki, workdir,
                                     authz_ports=[serve.http_port or 0], front="http"),
        "http_workers_2": BenchEnvoy("wrk-envoy-http-workers-2", pki, workdir,
                                     authz_ports=[two.http_port or 0], front="http"),
    }  # fmt: skip
    with _started(envoys, pki, setup, workdir) as client:
        one_sample = {"extauthz": serve.pid}
        two_sample = {"extauthz_supervisor": two.pid}
        two_sample |= {f"extauthz_worker{i}": p for i, p in enumerate(pids)}
        scenarios = [
            WrkScenario(name, client.listen_ports[name],
                        server | {"envoy": envoys[name].pid, "client_envoy": client.pid})
            for name, server in (("http_workers_1", one_sample), ("http_workers_2", two_sample))
        ]  # fmt: skip
        loads = list(plan.front_concurrency[-1:])
        summary = compare_wrk(scenarios, setup, loads, plan, workdir, log)
    return {
        "generator": generator_description(),
        "scenarios": summary,
        **ratios(summary, {"http_workers2_vs_1": "http_workers_2"}, base="http_workers_1"),
        "invalid": invalid_runs(summary),
    }


class _started:  # noqa: N801 (a context manager used like a function)
    """Start the server-side Envoys and one client-side Envoy with a listener for each; stop
    them all on the way out."""

    def __init__(self, envoys: dict[str, BenchEnvoy], pki: Pki, setup: Setup,
                 workdir: Path) -> None:  # fmt: skip
        self.envoys = envoys
        ports = {name: e.listen_port for name, e in envoys.items()}
        self.client = ClientEnvoy(pki, pki.workloads["client"], workdir / next(iter(envoys)),
                                  ports)  # fmt: skip

    def __enter__(self) -> ClientEnvoy:
        try:
            for proxy in self.envoys.values():
                proxy.start()
            self.client.start()
        except BaseException:
            self.__exit__()
            raise
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.stop()
        for proxy in self.envoys.values():
            proxy.stop()


def generator_description() -> str:
    return f"{wrk_version() or 'wrk'} -t 1 + client-side Envoy --concurrency 1"


def envoy_cpu_ratio(summary: dict[str, Any], name: str, base: str) -> float | None:
    """The server-side Envoy's CPU per check in ``name`` over ``base``: the median of the
    per-repeat ratios at the load where ``name`` reached its capacity (each pair measured back
    to back, at the same load)."""
    label = summary[name]["capacity_load"]
    pairs = zip(summary[name]["by_load"][label]["runs"], summary[base]["by_load"][label]["runs"],
                strict=True)  # fmt: skip
    cpu = [(a["cpu_us_per_check"].get("envoy"), b["cpu_us_per_check"].get("envoy"))
           for a, b in pairs]  # fmt: skip
    paired = [a / b for a, b in cpu if a and b]
    return round(statistics.median(paired), 3) if paired else None


def invalid_runs(summary: dict[str, Any]) -> list[str]:
    return [
        f"{name} {label}: {run['invalid']}"
        for name, row in summary.items()
        for label, by_load in row["by_load"].items()
        for run in by_load["runs"]
        if run["invalid"]
    ]


def run_servers(parts: set[str], plan: Plan, workdir: Path, log: Log) -> dict[str, Any]:
    """Every multi-process part asked for; each process is stopped on the way out."""
    small = write_setup(workdir / "setup-10", 10)
    pki = make_pki(workdir / "pki", {"client": small.target.workload})
    client = client_spec(small, pki)
    out: dict[str, Any] = {}
    elapsed: dict[str, float] = {}  # seconds each part took, its processes' start included
    mark = [time.monotonic()]

    def took(part: str) -> None:
        now = time.monotonic()
        elapsed[part], mark[0] = round(now - mark[0], 1), now

    with Generators(max(plan.processes, 2)) as gens:  # rss uses two
        if "rss" in parts:
            log("rss: 10,000 rules, then 10,000 distinct subject tokens")
            big = write_setup(workdir / "setup-10000", 10_000)
            with Serve(big, workdir) as serve:
                out["rss"] = rss(gens, client_spec(big, pki), serve, plan, log)
            took("rss")
        if not parts & {"direct", "envoy", "workers", "fronts", "http_workers"}:
            return out | {"elapsed_s_by_part": elapsed}
        with Floor(workdir) as floor, Serve(small, workdir, front="http") as serve:
            if "direct" in parts:
                log("direct gRPC: floor, warm, cold")
                out["direct"] = direct(gens, client, floor, serve, plan, log)
                took("direct")
            if "workers" in parts:
                log("workers: --workers 1 vs --workers 2")
                with Serve(small, workdir, workers=2) as two:
                    out["workers"] = workers(gens, client, serve, two, plan, log)
                took("workers")
            if "envoy" in parts:
                log("through Envoy: alone, floor, warm, cold")
                out["envoy"] = envoy(gens, client, floor, serve, pki, workdir, plan, log)
                took("envoy")
            if "fronts" in parts:
                log("through a client-side Envoy and wrk: Envoy alone; gRPC and HTTP fronts: "
                    "floor, warm, cold")  # fmt: skip
                out["fronts"] = fronts(floor, serve, small, pki, workdir, plan, log)
                took("fronts")
            if "http_workers" in parts:
                log("HTTP front, through the client-side Envoy: --workers 1 vs --workers 2")
                with Serve(small, workdir, workers=2, front="http") as two:
                    out["http_workers"] = http_workers(serve, two, small, pki, workdir, plan, log)
                took("http_workers")
    return out | {"elapsed_s_by_part": elapsed}
