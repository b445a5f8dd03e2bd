"""``python -m bench``: run the benchmark, write the JSON result and the chart beside it, and
print one JSON summary object as the last line on stdout (progress goes to stderr).

Modes: the full run (5 repeats, 3 concurrencies), ``--quick`` (about a minute on 2 cores: one
repeat, short windows, one concurrency) and ``--smoke`` (seconds: the in-process parts only, tiny
iterations; for the test suite). ``--only core,lint,rss,direct,workers,envoy`` runs a subset.
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
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import SCHEMA
from bench.inprocess import run_core, run_lint
from bench.scenarios import Plan, run_servers
from extauthz.demo.envoy import envoy_binary

PARTS = ("core", "lint", "rss", "direct", "workers", "envoy")
IN_PROCESS = {"core", "lint"}
# The targets: summary key -> (comparison, bound)
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
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "core": {"sizes": (10, 1000, 10000), "warm": 5000, "cold": 1500, "rounds": 5},
        "lint": {"sizes": (200, 2000), "repeats": 5},
        "plan": Plan((8, 32, 64), (8, 32), repeats=5, warmup=0.5, duration=2.5, processes=2),
    },
    "quick": {
        "core": {"sizes": (10, 1000, 10000), "warm": 2000, "cold": 400, "rounds": 3},
        "lint": {"sizes": (200, 2000), "repeats": 3},
        "plan": Plan((32,), (16,), repeats=1, warmup=0.5, duration=2.0, processes=2),
    },
    "smoke": {  # lint below the sizes the summary compares: seconds whatever lint costs
        "core": {"sizes": (10, 100), "warm": 200, "cold": 30, "rounds": 1},
        "lint": {"sizes": (20, 200), "repeats": 1},
        "plan": None,
    },
}  # fmt: skip


LIBRARIES = ("grpcio", "protobuf", "cryptography", "PyJWT", "xds-protos", "prometheus-client")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about a minute, one repeat")
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
        envoy_version = envoy.stdout.split("version:")[-1].strip()
    except (OSError, RuntimeError, subprocess.SubprocessError):
        envoy_version = None
    libraries = {}
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
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def measure(conf: dict[str, Any], parts: set[str], workdir: Path) -> dict[str, Any]:
    plan: Plan | None = conf["plan"]
    out: dict[str, Any] = {"settings": conf | {"plan": plan and asdict(plan)}}
    if "core" in parts:
        log(f"core: decide() with {', '.join(map(str, conf['core']['sizes']))} rules")
        out["core"] = run_core(workdir=workdir, log=log, **conf["core"])
    if "lint" in parts:
        log(f"lint: {' and '.join(map(str, conf['lint']['sizes']))} rules on one host")
        out["lint"] = run_lint(workdir=workdir, log=log, **conf["lint"])
    if plan is not None and parts - IN_PROCESS:
        out.update(run_servers(parts, plan, workdir, log))
    return out


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
        "lint_s_2000_rules": _get(result, "lint", "sizes", "2000", "median_s"),
        "sign_es256_us": _get(result, "core", "es256", "sign", "p50_us"),
        "verify_es256_us": _get(result, "core", "es256", "verify", "p50_us"),
        "envoy_alone_rps": _get(result, "envoy", "scenarios", "envoy_alone", "capacity_rps"),
    }
    for part in ("direct", "envoy"):
        for scen in ("floor", "warm", "cold"):
            s[f"{part}_{scen}_rps"] = _get(result, part, "scenarios", scen, "capacity_rps")
    compare = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
    s["targets_met"] = {
        key: None if s[key] is None else compare[op](s[key], bound)
        for key, (op, bound) in TARGETS.items()
    }
    return s | {"mode": result["mode"], "cores": result["machine"]["cpu_count"]}


COLOURS = {"floor": "#8c8c8c", "warm": "#3b75af", "cold": "#ef8636", "envoy_alone": "#519e3e"}


def chart_panels(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Title -> bar label -> value, for the parts the result has."""
    panels: dict[str, dict[str, float | None]] = {}

    def bar(title: str, label: str, value: float | None) -> None:
        panels.setdefault(title, {})[label] = value

    for part in ("direct", "envoy", "workers"):
        for name, row in (_get(result, part, "scenarios") or {}).items():
            for load, r in row["by_load"].items():
                bar(f"{part}: requests/s, median", f"{load} {name}", r["throughput_rps"])
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
    fig.text(0.01, 0.005, ", ".join(ratios), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
