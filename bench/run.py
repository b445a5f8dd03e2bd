"""``python -m bench``: run the benchmark, write the JSON result and the PNG chart, and print one
JSON summary object as the last line on stdout (progress goes to stderr).

Modes: the full run (about 8 minutes on 2 cores), ``--quick`` (under 2 minutes: one repeat,
short windows, one concurrency) and ``--smoke`` (seconds: the in-process parts only, tiny
iterations; for the test suite). ``--only core,crypto,rss,direct,workers,envoy`` runs a subset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import SCHEMA
from bench.machine import describe, load_average
from bench.png import BLUE, GREEN, GREY, ORANGE, PURPLE, Bar, Panel, write_chart
from bench.scenarios import Plan

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
PARTS = ("core", "crypto", "rss", "direct", "workers", "envoy")

# The targets: (summary key, comparison, bound)
TARGETS = {
    "direct_warm_vs_floor": (">=", 0.9),
    "warm_vs_floor": (">=", 0.9),
    "direct_cold_vs_floor": (">=", 0.6),
    "cold_vs_floor": (">=", 0.6),
    "rules_10k_vs_10": ("<=", 1.1),
    "core_p50_us_warm": ("<", 50.0),
    "workers2_vs_1": (">=", 1.4),
    "rss_mb_10k_rules": ("<", 150.0),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settings(mode: str) -> dict[str, Any]:
    if mode == "full":
        return {
            "core": {"sizes": (10, 1000, 10000), "warm": 5000, "cold": 1500, "rounds": 5},
            "crypto": {"iterations": 2000, "rsa_iterations": 200},
            "plan": Plan(
                direct_concurrency=(8, 32, 64),
                envoy_concurrency=(8, 32),
                repeats=5,
                warmup=0.5,
                duration=2.5,
                direct_processes=2,
                envoy_processes=2,
                workers_processes=(1, 2, 3),
                workers_concurrency=64,
                workers_repeats=2,
                rss_tokens=10_000,
            ),
        }
    if mode == "quick":
        return {
            "core": {"sizes": (10, 1000, 10000), "warm": 2000, "cold": 400, "rounds": 3},
            "crypto": {"iterations": 300, "rsa_iterations": 30},
            "plan": Plan(
                direct_concurrency=(32,),
                envoy_concurrency=(16,),
                repeats=1,
                warmup=0.5,
                duration=2.0,
                direct_processes=2,
                envoy_processes=2,
                workers_processes=(2,),
                workers_concurrency=64,
                workers_repeats=1,
                rss_tokens=10_000,
            ),
        }
    return {  # smoke: the in-process parts, tiny
        "core": {"sizes": (10, 100), "warm": 200, "cold": 30, "rounds": 1},
        "crypto": {"iterations": 20, "rsa_iterations": 3},
        "plan": None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="under 2 minutes, fewer figures")
    mode.add_argument("--smoke", action="store_true", help="seconds; in-process parts only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--chart", type=Path, help="PNG chart (default: --out with .png)")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "smoke" if args.smoke else "full"
    parts = set(PARTS) if args.only is None else set(args.only.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if name == "smoke":
        parts &= {"core", "crypto"}
    chart_path = args.chart or args.out.with_suffix(".png")
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-bench-"))
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": name,
        "parts": sorted(parts),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": describe(),
    }
    try:
        result.update(measure(name, parts, workdir))
    finally:
        if args.keep:
            log(f"(work directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["machine"]["load_average_at_end"] = load_average()
    summary = summarise(result)
    result["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_chart(chart_path, *chart_content(result))
    log(human(summary))
    log(f"results: {args.out}\nchart:   {chart_path}")
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


def measure(name: str, parts: set[str], workdir: Path) -> dict[str, Any]:
    from bench.corebench import run_core, run_crypto
    from bench.fixtures import client_pki, write_setup

    conf = settings(name)
    plan: Plan | None = conf["plan"]
    out: dict[str, Any] = {"settings": {k: _jsonable(v) for k, v in conf.items()}}
    procs: list[Any] = []
    try:
        rss_serve = None
        server_parts = parts & {"rss", "direct", "workers", "envoy"}
        if server_parts and plan is not None:
            from bench.servers import Serve

            setup_small = write_setup(workdir / "setup-10", 10)
            pki = client_pki(workdir / "pki", setup_small.target)
            if "rss" in parts:
                setup_big = write_setup(workdir / "setup-10000", 10_000)
                # Started first: it compiles its 10,000 rules while we measure crypto and
                # compile the core's policies; it is idle before anything is timed.
                rss_serve = Serve(setup_big, workdir)
                procs.append(rss_serve)

        def wait_for_rss_server() -> None:
            if rss_serve is not None and not rss_serve.ready():
                log("  (waiting for the 10,000-rule server to finish loading before timing)")
                rss_serve.wait_ready(timeout=300)

        if "core" in parts:
            c = conf["core"]
            log(f"core: decide() with {', '.join(map(str, c['sizes']))} rules")
            out["core"] = run_core(
                c["sizes"],
                workdir,
                warm_iterations=c["warm"],
                cold_iterations=c["cold"],
                rounds=c["rounds"],
                log=log,
                before_timing=wait_for_rss_server,
                profile_calls=3000 if name != "smoke" else 100,
            )
        if "crypto" in parts:
            wait_for_rss_server()
            log("crypto: sign and verify per algorithm")
            c = conf["crypto"]
            out["crypto"] = run_crypto(c["iterations"], c["rsa_iterations"])
        if not server_parts or plan is None:
            return out
        out.update(measure_servers(parts, plan, workdir, setup_small, pki, rss_serve, procs))
        return out
    finally:
        for proc in reversed(procs):
            proc.stop()


def measure_servers(
    parts: set[str],
    plan: Plan,
    workdir: Path,
    setup_small: Any,
    pki: Any,
    rss_serve: Any,
    procs: list[Any],
) -> dict[str, Any]:
    from bench.loadgen import Generators, vm_status
    from bench.scenarios import Client, run_direct, run_envoy, run_rss, run_workers
    from bench.servers import Floor, Serve

    out: dict[str, Any] = {}
    client = Client(setup_small, pki)
    need = max(plan.direct_processes, plan.envoy_processes, *plan.workers_processes, 2)
    with Generators(need) as gens:
        if rss_serve is not None:
            log("rss: 10,000 rules, then 10,000 distinct subject tokens")
            big = Client(rss_serve.setup, pki)
            out["rss"] = run_rss(gens, big, rss_serve, plan, log)
            rss_serve.stop()
        floor = serve = None
        if parts & {"direct", "envoy", "workers"}:
            floor = Floor(workdir)
            serve = Serve(setup_small, workdir)
            procs += [floor, serve]
            floor.wait_ready()
            serve.wait_ready()
            out["rss_10_rules_idle_mb"] = vm_status(serve.pid).get("VmRSS")
        if "direct" in parts and floor and serve:
            log("direct gRPC: floor, warm, cold")
            out["direct"] = run_direct(gens, client, floor, serve, plan, log)
            out["rss_10_rules_after_direct_mb"] = vm_status(serve.pid).get("VmRSS")
        if "workers" in parts and serve:
            log("workers: --workers 1 vs --workers 2")
            two = Serve(setup_small, workdir, workers=2)
            procs.append(two)
            two.wait_ready()
            out["workers"] = run_workers(gens, client, serve, two, plan, log)
            two.stop()
        if "envoy" in parts and floor and serve:
            log("through Envoy: alone, floor, warm, cold")
            out["envoy"] = run_envoy(gens, client, floor, serve, workdir, plan, log)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Plan):
        from dataclasses import asdict

        return asdict(value)
    return value


# --- summary --------------------------------------------------------------------------------


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    sizes = _get(result, "core", "sizes") or {}
    warm_small = _get(sizes, "10", "warm", "p50_us")
    warm_big = _get(sizes, "10000", "warm", "p50_us")
    largest = max(sizes, key=int) if sizes else None
    s: dict[str, Any] = {
        "warm_vs_floor": _get(result, "envoy", "warm_vs_floor"),
        "cold_vs_floor": _get(result, "envoy", "cold_vs_floor"),
        "direct_warm_vs_floor": _get(result, "direct", "warm_vs_floor"),
        "direct_cold_vs_floor": _get(result, "direct", "cold_vs_floor"),
        "rules_10k_vs_10": (round(warm_big / warm_small, 3) if warm_big and warm_small else None),
        "core_p50_us_warm": _get(sizes, largest, "warm", "p50_us") if largest else None,
        "core_p50_us_warm_10_rules": warm_small,
        "core_p50_us_cold": _get(sizes, largest, "cold", "p50_us") if largest else None,
        "core_rules": int(largest) if largest else None,
        "workers2_vs_1": _get(result, "workers", "workers2_vs_1"),
        "rss_mb_10k_rules": _get(result, "rss", "after_fill_mb"),
        "rss_mb_10k_rules_loaded": _get(result, "rss", "after_load_mb"),
        "direct_floor_rps": _get(result, "direct", "scenarios", "floor", "capacity_rps"),
        "direct_warm_rps": _get(result, "direct", "scenarios", "warm", "capacity_rps"),
        "direct_cold_rps": _get(result, "direct", "scenarios", "cold", "capacity_rps"),
        "envoy_alone_rps": _get(result, "envoy", "scenarios", "envoy_alone", "capacity_rps"),
        "envoy_floor_rps": _get(result, "envoy", "scenarios", "floor", "capacity_rps"),
        "envoy_warm_rps": _get(result, "envoy", "scenarios", "warm", "capacity_rps"),
        "envoy_cold_rps": _get(result, "envoy", "scenarios", "cold", "capacity_rps"),
        "sign_es256_us": _get(result, "crypto", "ES256", "sign", "p50_us"),
        "verify_es256_us": _get(result, "crypto", "ES256", "verify", "p50_us"),
    }
    met = {}
    for key, (op, bound) in TARGETS.items():
        value = s.get(key)
        if value is None:
            met[key] = None
        elif op == ">=":
            met[key] = value >= bound
        elif op == "<=":
            met[key] = value <= bound
        else:
            met[key] = value < bound
    s["targets_met"] = met
    s["mode"] = result.get("mode")
    s["cores"] = _get(result, "machine", "cpu_count")
    return s


def human(summary: dict[str, Any]) -> str:
    lines = ["", "target                      value      goal      met"]
    for key, (op, bound) in TARGETS.items():
        value = summary.get(key)
        met = summary["targets_met"].get(key)
        shown = "-" if value is None else f"{value:g}"
        verdict = {True: "yes", False: "NO", None: "-"}[met]
        lines.append(f"{key:<27} {shown:<10} {op} {bound:<6g}  {verdict}")
    return "\n".join(lines)


# --- chart ----------------------------------------------------------------------------------


def chart_content(result: dict[str, Any]) -> tuple[str, list[Panel], list[str]]:
    panels: list[Panel] = []
    colors = {"floor": GREY, "warm": BLUE, "cold": ORANGE, "envoy_alone": GREEN}
    for part, title in (("direct", "DIRECT GRPC CHECK"), ("envoy", "THROUGH ENVOY")):
        scen = _get(result, part, "scenarios")
        if not scen:
            continue
        panel = Panel(f"{title}: THROUGHPUT, MEDIAN", "REQ/S; NX = VS FLOOR")
        concs = list(next(iter(scen.values()))["by_concurrency"])
        for conc in concs:
            floor = _get(scen, "floor", "by_concurrency", conc, "throughput_rps")
            for name, row in scen.items():
                value = _get(row, "by_concurrency", conc, "throughput_rps")
                note = ""
                if name in ("warm", "cold") and value and floor:
                    note = f"  {value / floor:.2f}X"
                label = {"envoy_alone": "ENVOY ALONE"}.get(name, name.upper())
                panel.bars.append(Bar(f"C={conc} {label}", value, colors.get(name, BLUE), note))
        panels.append(panel)
    sizes = _get(result, "core", "sizes")
    if sizes:
        panel = Panel("DECISION CORE decide() P50", "US")
        for temp, color in (("warm", BLUE), ("cold", ORANGE)):
            for n, row in sizes.items():
                label = f"{int(n):,} RULES {temp.upper()}"
                panel.bars.append(Bar(label, row[temp]["p50_us"], color))
        panels.append(panel)
    workers = _get(result, "workers", "scenarios")
    if workers:
        panel = Panel("WORKERS, WARM, DIRECT GRPC", "REQ/S")
        for name, row in workers.items():
            for procs, r in row["by_concurrency"].items():
                label = f"{name.replace('_', ' ').upper()} GEN={procs}"
                color = PURPLE if name.endswith("2") else GREY
                panel.bars.append(Bar(label, r["throughput_rps"], color))
        panels.append(panel)
    crypto = result.get("crypto")
    if crypto:
        panel = Panel("JOSE SIGN / VERIFY P50", "US")
        for alg, row in crypto.items():
            panel.bars.append(Bar(f"{alg} SIGN", row["sign"]["p50_us"], BLUE))
            panel.bars.append(Bar(f"{alg} VERIFY", row["verify"]["p50_us"], ORANGE))
        panels.append(panel)
    rss = result.get("rss")
    if rss:
        panel = Panel("RESIDENT MEMORY, ONE WORKER", "MB")
        panel.bars.append(Bar("10,000 RULES LOADED", rss["after_load_mb"], GREEN))
        panel.bars.append(Bar("+ 10,000 CACHED TOKENS", rss["after_fill_mb"], GREEN))
        if result.get("rss_10_rules_idle_mb"):
            panel.bars.append(Bar("10 RULES LOADED", result["rss_10_rules_idle_mb"], GREY))
        panels.append(panel)
    s = summarise(result)
    m = result["machine"]
    libs = m["libraries"]
    footer = [
        f"{result['mode'].upper()} RUN {result['started_at'][:16]}Z, {m['cpu_count']} CORES, "
        f"PYTHON {m['python']}, GRPCIO {libs.get('grpcio')}, PROTOBUF {libs.get('protobuf')}, "
        f"CRYPTOGRAPHY {libs.get('cryptography')}, PYJWT {libs.get('PyJWT')}, "
        f"ENVOY {(m.get('envoy') or '?').split('/')[1] if '/' in (m.get('envoy') or '') else '?'}",
        "RATIOS: "
        + ", ".join(
            f"{k}={s[k]}"
            for k in (
                "warm_vs_floor",
                "cold_vs_floor",
                "direct_warm_vs_floor",
                "direct_cold_vs_floor",
                "rules_10k_vs_10",
                "workers2_vs_1",
            )
        ),
    ]
    missed = [k for k, v in s["targets_met"].items() if v is False]
    if missed:
        footer.append("TARGETS MISSED: " + ", ".join(missed))
    return "EXTAUTHZ BENCHMARK", panels, footer
