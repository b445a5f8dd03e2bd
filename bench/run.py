"""``python -m bench``: run the benchmark, write the JSON result and the chart beside it, and
print one JSON summary object as the last line on stdout (progress goes to stderr).

Modes: the full run (5 repeats, 2-3 concurrencies), ``--quick`` (one repeat, short windows, one
concurrency: 3.4 minutes on this 2-core machine while it was shared, of which the wrk parts
took 39 s; less on idle cores) and ``--smoke`` (seconds: the in-process
parts only, tiny iterations; for the test suite). ``--only`` runs a subset of the parts:
core, lint, rss, direct, workers, envoy, fronts, http_workers. fronts and http_workers need wrk
(``apt-get install wrk``). ``KEYS`` below says what every key of the summary line means; the
result JSON carries it too (``summary_keys``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import operator
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import SCHEMA
from bench.inprocess import run_core, run_lint
from bench.loadgen import wrk_binary, wrk_version
from bench.review import run_review
from bench.scenarios import Plan, run_servers
from extauthz.demo.envoy import envoy_binary

PARTS = ("core", "lint", "review", "rss", "direct", "workers", "envoy", "fronts", "http_workers")
IN_PROCESS = {"core", "lint", "review"}
WRK_PARTS = {"fronts", "http_workers"}
# The issues' targets: summary key -> (comparison, bound)
TARGETS = {
    "direct_warm_vs_floor": (">=", 0.9),
    "warm_vs_floor": (">=", 0.9),
    "direct_cold_vs_floor": (">=", 0.6),
    "cold_vs_floor": (">=", 0.6),
    "rules_10k_vs_10": ("<=", 1.1),
    "core_p50_us_warm": ("<", 50.0),
    "workers2_vs_1": (">=", 1.4),
    "rss_mb_10k_rules": ("<", 150.0),
    "review_lines_per_s": (">=", 200_000.0),
    "review_rss_mb": ("<", 200.0),
    # through the same client-side Envoy + wrk and server-side Envoy, in one run
    "grpc_warm_vs_grpc_floor": (">=", 0.8),
    "grpc_cold_vs_grpc_floor": (">=", 0.6),
    "http_warm_vs_grpc_floor": (">=", 2.0),
    "http_cold_vs_grpc_floor": (">=", 1.5),
    "envoy_cpu_warm_vs_floor": ("<=", 1.1),
}
FRONT_SCENARIOS = ("envoy_alone", "grpc_floor", "grpc_warm", "grpc_cold", "http_floor",
                   "http_warm", "http_cold")  # fmt: skip
_WRK = (
    "part `fronts`: wrk -> client-side Envoy -mTLS-> server-side Envoy (the shipped config of "
    "that front, the route answering 200 itself) -> extauthz, every scenario through the same "
    "client-side Envoy and wrk"
)
_AT = (
    "median over repeats at the load (wrk connections) where that scenario reached its "
    "capacity; null when not measured or invalid"
)
_CPU = (
    "user+system CPU time from /proc/<pid>/stat over the measured window divided by the checks "
    "completed in it (a completed check: a 200 answered inside the window)"
)
_FRONT_NAMES = {
    "grpc_floor": "gRPC floor (allow-all bench.floor on the gRPC front)",
    "grpc_warm": "gRPC warm (extauthz serve, repeated subject tokens)",
    "grpc_cold": "gRPC cold (extauthz serve, a fresh subject token every request)",
    "http_floor": "HTTP floor (allow-all bench.floor on the HTTP front)",
    "http_warm": "HTTP warm",
    "http_cold": "HTTP cold",
}
# What every summary key means; the result JSON carries it as ``summary_keys``.
KEYS: dict[str, str] = {
    "warm_vs_floor": "part `envoy` (Python mTLS generators straight to the gRPC-front Envoy): "
    "warm capacity over the floor's",
    "cold_vs_floor": "part `envoy`: cold (a fresh subject token every request) capacity over "
    "the floor's",
    "direct_warm_vs_floor": "part `direct` (gRPC, no Envoy): warm capacity over the floor's",
    "direct_cold_vs_floor": "part `direct`: cold capacity over the floor's",
    "rules_10k_vs_10": "warm decide() p50 with 10,000 rules over 10 rules",
    "core_p50_us_warm": "warm decide() p50 in µs at the largest policy (core_rules)",
    "core_p50_us_warm_10_rules": "warm decide() p50 in µs, 10 rules",
    "core_p50_us_cold": "cold decide() p50 in µs at the largest policy",
    "core_rules": "the largest policy decide() was timed with",
    "workers2_vs_1": "part `workers`, direct gRPC, warm: --workers 2 capacity over --workers 1",
    "rss_mb_10k_rules": "VmRSS MB of one worker with 10,000 rules and a full subject cache",
    "rss_mb_10k_rules_loaded": "VmRSS MB of one worker with 10,000 rules, once ready",
    "lint_2000_vs_200": "policy lint time, 2,000 rules over 200 rules, all on one host",
    "review_lines_per_s": "extauthz review over a generated plain decision log (1,000,000 lines "
    "in full and quick runs, against a 1,000-rule policy), lines per second in its child",
    "review_rss_mb": "peak RSS of that review child, MB",
    "lint_s_2000_rules": "policy lint seconds, 2,000 rules on one host",
    "sign_es256_us": "p50 µs of signing the narrowed token alone",
    "verify_es256_us": "p50 µs of verifying a subject token's signature alone",
    "envoy_alone_rps": "part `envoy`: capacity req/s of Envoy without the ext_authz filter",
    **{
        f"{part}_{scen}_rps": f"part `{part}`: capacity req/s (best median over loads), {scen}"
        for part in ("direct", "envoy")
        for scen in ("floor", "warm", "cold")
    },
    "grpc_warm_vs_grpc_floor": f"{_WRK}: gRPC warm capacity over the gRPC floor's",
    "grpc_cold_vs_grpc_floor": f"{_WRK}: gRPC cold capacity over the gRPC floor's",
    "http_warm_vs_grpc_floor": f"{_WRK}: HTTP warm capacity over the gRPC floor's",
    "http_cold_vs_grpc_floor": f"{_WRK}: HTTP cold capacity over the gRPC floor's",
    "http_warm_vs_http_floor": f"{_WRK}: HTTP warm capacity over the HTTP floor's",
    "http_cold_vs_http_floor": f"{_WRK}: HTTP cold capacity over the HTTP floor's",
    "http_floor_vs_grpc_floor": f"{_WRK}: the HTTP floor's capacity over the gRPC floor's",
    **{
        f"cpu_us_{name}": f"{what}: CPU µs of the extauthz process(es) per completed check "
        "(the floor's process for a floor; with --workers the supervisor and every worker), "
        f"{_CPU}; {_WRK}; {_AT}"
        for name, what in _FRONT_NAMES.items()
    },
    **{
        f"envoy_cpu_us_{name.removeprefix('grpc_')}": f"{what}: the server-side Envoy's CPU µs "
        f"per completed check (its process alone), {_CPU}; {_WRK}; {_AT}"
        for name, what in _FRONT_NAMES.items()
    },
    "envoy_cpu_warm_vs_floor": "the server-side Envoy's CPU per completed check, gRPC warm "
    "over gRPC floor: median of the per-repeat ratios at gRPC warm's capacity load (each pair "
    "measured back to back at the same load)",
    "envoy_cpu_http_warm_vs_http_floor": "the same ratio for HTTP warm over the HTTP floor",
    **{
        f"{proc}_cpu_us_{name}": f"{_FRONT_NAMES[name]}: {who}'s CPU µs per completed check, "
        f"{_CPU}; {_AT}. Recorded for every run and scenario, apart from the server side's "
        f"(result: fronts.scenarios.<name>.by_load.<load>.runs[].cpu_us_per_check.{proc})"
        for proc, who in (("client_envoy", "the client-side Envoy"), ("wrk", "wrk"))
        for name in ("grpc_floor", "http_warm")
    },
    "generator_cpu_cores_max": "the most the generator (wrk + the client-side Envoy) used in "
    "any run of part `fronts`, in cores (CPU seconds per second of window)",
    **{
        f"fronts_{name}_rps": f"{_WRK}: capacity req/s (200s per second inside the window, "
        f"best median over loads), {name}"
        for name in FRONT_SCENARIOS
    },
    "http_workers2_vs_1": "part `http_workers`: the HTTP front, warm, through the client-side "
    "Envoy and wrk: --workers 2 (both workers on one port the supervisor opens) capacity over "
    "--workers 1; no target",
    "invalid": "runs whose figures do not hold (a cold run that reused tokens after one retry "
    "with twice the pool; a run without warm-up), as 'scenario load: why'; the ratios and CPU "
    "figures of such a scenario are null",
    "targets_met": "each target in TARGETS: true, false, or null when not measured",
    "mode": "full, quick or smoke",
    "cores": "os.cpu_count() of the machine",
}


SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "core": {"sizes": (10, 1000, 10000), "warm": 5000, "cold": 1500, "rounds": 5},
        "lint": {"sizes": (200, 2000), "repeats": 5},
        "review": {"lines": 1_000_000},
        "plan": Plan((8, 32, 64), (8, 32), repeats=5, warmup=0.5, duration=2.5, processes=2,
                     front_concurrency=(16, 48)),
    },
    "quick": {
        "core": {"sizes": (10, 1000, 10000), "warm": 2000, "cold": 400, "rounds": 3},
        "lint": {"sizes": (200, 2000), "repeats": 3},
        "review": {"lines": 1_000_000},
        "plan": Plan((32,), (16,), repeats=1, warmup=0.5, duration=2.0, processes=2,
                     front_concurrency=(32,)),
    },
    "smoke": {  # lint below the sizes the summary compares: seconds whatever lint costs
        "core": {"sizes": (10, 100), "warm": 200, "cold": 30, "rounds": 1},
        "lint": {"sizes": (20, 200), "repeats": 1},
        "review": {"lines": 2_000},
        "plan": None,
    },
}  # fmt: skip


LIBRARIES = ("grpcio", "protobuf", "cryptography", "PyJWT", "xds-protos", "prometheus-client")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes, one repeat")
    mode.add_argument("--smoke", action="store_true", help="seconds; in-process parts only")
    default = Path(__file__).resolve().parent / "results" / "latest.json"
    parser.add_argument("--out", type=Path, default=default, help="JSON result; .png beside it")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(PARTS))
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "smoke" if args.smoke else "full"
    parts = set(PARTS if args.only is None else args.only.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if name == "smoke":
        parts &= IN_PROCESS
    if parts & WRK_PARTS:
        try:
            wrk_binary()
        except RuntimeError as exc:
            parser.error(str(exc))
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": name,
        "parts": sorted(parts),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": describe(),
    }
    with tempfile.TemporaryDirectory(prefix="extauthz-bench-") as workdir:
        result.update(measure(SETTINGS[name], parts, Path(workdir)))
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summary = summarise(result)
    result["summary_keys"] = KEYS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log(f"results: {args.out}")
    if draw_chart(args.out.with_suffix(".png"), result):
        log(f"chart:   {args.out.with_suffix('.png')}")
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


def describe() -> dict[str, Any]:
    """What the figures were measured on, recorded next to them."""
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    try:  # "envoy  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL"
        argv = [envoy_binary(), "--version"]
        envoy = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        envoy_version: str | None = envoy.stdout.split("version:")[-1].strip()
    except (OSError, RuntimeError, subprocess.SubprocessError):
        envoy_version = None
    libraries: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": models[0] if models else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": libraries,
        "envoy": envoy_version,
        "wrk": wrk_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def measure(conf: dict[str, Any], parts: set[str], workdir: Path) -> dict[str, Any]:
    plan: Plan | None = conf["plan"]
    out: dict[str, Any] = {"settings": conf | {"plan": plan and asdict(plan)}}
    elapsed: dict[str, float] = {}  # seconds per part
    started = time.monotonic()
    if "core" in parts:
        log(f"core: decide() with {', '.join(map(str, conf['core']['sizes']))} rules")
        out["core"] = run_core(workdir=workdir, log=log, **conf["core"])
        elapsed["core"], started = round(time.monotonic() - started, 1), time.monotonic()
    if "lint" in parts:
        log(f"lint: {' and '.join(map(str, conf['lint']['sizes']))} rules on one host")
        out["lint"] = run_lint(workdir=workdir, log=log, **conf["lint"])
        elapsed["lint"] = round(time.monotonic() - started, 1)
    if "review" in parts:
        log(f"review: {conf['review']['lines']:,} decision log lines")
        out["review"] = run_review(workdir / "review", conf["review"]["lines"])
        elapsed["review"] = round(time.monotonic() - started, 1)
    if plan is not None and parts - IN_PROCESS:
        servers = run_servers(parts, plan, workdir, log)
        elapsed |= servers.pop("elapsed_s_by_part")
        out.update(servers)
    return out | {"elapsed_s_by_part": elapsed}


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets and docs/performance.md quote; null when not measured."""
    sizes = _get(result, "core", "sizes") or {}
    largest = max(sizes, key=int) if sizes else ""
    warm_small, warm_big = (_get(sizes, n, "warm", "p50_us") for n in ("10", "10000"))
    s: dict[str, Any] = {
        "warm_vs_floor": _get(result, "envoy", "warm_vs_floor"),
        "cold_vs_floor": _get(result, "envoy", "cold_vs_floor"),
        "direct_warm_vs_floor": _get(result, "direct", "warm_vs_floor"),
        "direct_cold_vs_floor": _get(result, "direct", "cold_vs_floor"),
        "rules_10k_vs_10": round(warm_big / warm_small, 3) if warm_big and warm_small else None,
        "core_p50_us_warm": _get(sizes, largest, "warm", "p50_us"),
        "core_p50_us_warm_10_rules": warm_small,
        "core_p50_us_cold": _get(sizes, largest, "cold", "p50_us"),
        "core_rules": int(largest) if largest else None,
        "workers2_vs_1": _get(result, "workers", "workers2_vs_1"),
        "rss_mb_10k_rules": _get(result, "rss", "after_fill_mb"),
        "rss_mb_10k_rules_loaded": _get(result, "rss", "after_load_mb"),
        "lint_2000_vs_200": _get(result, "lint", "ratio_2000_vs_200"),
        "review_lines_per_s": _get(result, "review", "review_lines_per_s"),
        "review_rss_mb": _get(result, "review", "review_rss_mb"),
        "lint_s_2000_rules": _get(result, "lint", "sizes", "2000", "median_s"),
        "sign_es256_us": _get(result, "core", "es256", "sign", "p50_us"),
        "verify_es256_us": _get(result, "core", "es256", "verify", "p50_us"),
        "envoy_alone_rps": _get(result, "envoy", "scenarios", "envoy_alone", "capacity_rps"),
    }
    for part in ("direct", "envoy"):
        for scen in ("floor", "warm", "cold"):
            s[f"{part}_{scen}_rps"] = _get(result, part, "scenarios", scen, "capacity_rps")
    s |= front_figures(result)
    compare = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
    s["targets_met"] = {
        key: None if s[key] is None else compare[op](s[key], bound)
        for key, (op, bound) in TARGETS.items()
    }
    return s | {"mode": result["mode"], "cores": result["machine"]["cpu_count"]}


def front_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The summary's keys from the parts through the client-side Envoy and wrk (see KEYS)."""
    fronts = result.get("fronts") or {}
    scenarios = fronts.get("scenarios") or {}
    invalid = list(fronts.get("invalid") or [])
    bad = {entry.split(" ", 1)[0] for entry in invalid}

    def ratio(key: str, *names: str) -> Any:
        return None if bad & set(names) else fronts.get(key)

    def at_capacity(name: str, *keys: str) -> Any:
        if name in bad:
            return None
        row = _get(scenarios, name, "by_load", str(_get(scenarios, name, "capacity_load")))
        return _get(row, *keys)

    s: dict[str, Any] = {}
    for temp in ("warm", "cold"):
        s[f"grpc_{temp}_vs_grpc_floor"] = ratio(f"grpc_{temp}_vs_grpc_floor", f"grpc_{temp}",
                                                "grpc_floor")  # fmt: skip
        for base in ("grpc_floor", "http_floor"):
            key = f"http_{temp}_vs_{base}"
            s[key] = ratio(key, f"http_{temp}", base)
    s["http_floor_vs_grpc_floor"] = ratio("http_floor_vs_grpc_floor", "http_floor", "grpc_floor")
    for name in FRONT_SCENARIOS[1:]:
        s[f"cpu_us_{name}"] = at_capacity(name, "extauthz_cpu_us_per_check")
    for name in FRONT_SCENARIOS[1:]:  # envoy_cpu_us_floor/_warm/_cold: the gRPC path
        short = name.removeprefix("grpc_")
        s[f"envoy_cpu_us_{short}"] = at_capacity(name, "cpu_us_per_check", "envoy")
    s["envoy_cpu_warm_vs_floor"] = ratio("envoy_cpu_warm_vs_floor", "grpc_warm", "grpc_floor")
    s["envoy_cpu_http_warm_vs_http_floor"] = ratio("envoy_cpu_http_warm_vs_http_floor",
                                                   "http_warm", "http_floor")  # fmt: skip
    for proc in ("client_envoy", "wrk"):
        for name in ("grpc_floor", "http_warm"):
            s[f"{proc}_cpu_us_{name}"] = at_capacity(name, "cpu_us_per_check", proc)
    runs = [
        run
        for row in scenarios.values()
        for by_load in row["by_load"].values()
        for run in by_load["runs"]
    ]
    s["generator_cpu_cores_max"] = max((r["generator_cpu_cores"] for r in runs), default=None)
    for name in FRONT_SCENARIOS:
        s[f"fronts_{name}_rps"] = _get(scenarios, name, "capacity_rps")
    s["http_workers2_vs_1"] = _get(result, "http_workers", "http_workers2_vs_1")
    s["invalid"] = invalid + list(_get(result, "http_workers", "invalid") or [])
    return s


COLOURS = {"floor": "#8c8c8c", "warm": "#3b75af", "cold": "#ef8636", "envoy_alone": "#519e3e"}


def chart_panels(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Title -> bar label -> value, for the parts the result has."""
    panels: dict[str, dict[str, float | None]] = {}

    def bar(title: str, label: str, value: float | None) -> None:
        panels.setdefault(title, {})[label] = value

    titles = {
        "fronts": "wrk -> client Envoy -> Envoy -> gRPC or HTTP front",
        "http_workers": "HTTP front, --workers 1 vs 2 (wrk -> client Envoy -> Envoy)",
    }
    for part in ("direct", "envoy", "workers", "fronts", "http_workers"):
        for name, row in (_get(result, part, "scenarios") or {}).items():
            for load, r in row["by_load"].items():
                title = titles.get(part, part)
                bar(f"{title}: requests/s, median", f"{load} {name}", r["throughput_rps"])
    for name, row in (_get(result, "fronts", "scenarios") or {}).items():
        r = row["by_load"][row["capacity_load"]]
        for proc, label in (("extauthz", "extauthz"), ("envoy", "server Envoy"),
                            ("client_envoy", "client Envoy"), ("wrk", "wrk")):  # fmt: skip
            per = r["cpu_us_per_check"]
            value = r["extauthz_cpu_us_per_check"] if proc == "extauthz" else per.get(proc)
            if value is not None:
                bar("CPU µs per allowed check, by process (fronts, at capacity)",
                    f"{name}: {label}", value)  # fmt: skip
    for n, row in (_get(result, "core", "sizes") or {}).items():
        for temp in ("warm", "cold"):
            bar("decide() p50, µs", f"{int(n):,} rules {temp}", row[temp]["p50_us"])
    for step, row in (_get(result, "core", "es256") or {}).items():
        bar("decide() p50, µs", f"ES256 {step} alone", row["p50_us"])
    for n, row in (_get(result, "lint", "sizes") or {}).items():
        bar("policy lint, rules on one host: seconds, median", f"{int(n):,} rules", row["median_s"])
    if memory := result.get("rss"):
        bar("one worker, 10,000 rules: RSS MB", "loaded", memory["after_load_mb"])
        bar("one worker, 10,000 rules: RSS MB", "+ 10,000 cached tokens", memory["after_fill_mb"])
    return panels


def draw_chart(path: Path, result: dict[str, Any]) -> bool:
    try:
        # Here, not at the top: matplotlib is an optional extra that only the chart needs.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("chart: skipped, matplotlib is not installed (pip install -e '.[bench]')")
        return False
    panels = chart_panels(result)
    if not panels:
        log("chart: skipped, the parts run have nothing to draw")
        return False
    heights = [0.6 + 0.22 * len(bars) for bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 1), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for ax, (title, bars) in zip(axes[:, 0], panels.items(), strict=True):
        values = [v or 0 for v in bars.values()]
        colours = [next((c for k, c in COLOURS.items() if k in label), "#3b75af") for label in bars]
        ax.barh(list(bars), values, color=colours)
        ax.bar_label(
            ax.containers[0],
            [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values],
            padding=3,
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.2 or 1)
        ax.set_title(title, loc="left", fontsize=10)
        ax.tick_params(labelsize=8)
    m, envoy = result["machine"], (result["machine"]["envoy"] or "?/?").split("/")
    fig.suptitle(
        f"extauthz benchmark, {result['mode']} run {result['started_at'][:16]}Z: "
        f"{m['cpu_count']} cores, Python {m['python']}, grpcio {m['libraries']['grpcio']}, "
        f"Envoy {envoy[1] if len(envoy) > 1 else envoy[0]}",
        x=0.01, ha="left", fontsize=9,
    )  # fmt: skip
    ratios = [f"{k}={v}" for k, v in result["summary"].items() if "_vs_" in k and v is not None]
    footer = textwrap.fill(", ".join(ratios), 170)
    fig.text(0.01, 0.005, footer, fontsize=7, va="bottom")
    lines = footer.count("\n") + 1
    fig.tight_layout(rect=(0, min(0.2, 0.012 * lines + 0.02), 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
