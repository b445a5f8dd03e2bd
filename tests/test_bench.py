"""The benchmark's plumbing, not its figures: ``python -m bench --smoke`` runs, writes a result
file of the documented shape and a PNG chart, and prints one JSON object as its last line.
No timing is asserted (this machine is shared and noisy)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fixtures import policy_text  # noqa: E402
from bench.stats import percentile, summary_us  # noqa: E402
from extauthz.policy.compiler import compile_policy  # noqa: E402

SUMMARY_KEYS = {
    "warm_vs_floor",
    "cold_vs_floor",
    "rules_10k_vs_10",
    "workers2_vs_1",
    "rss_mb_10k_rules",
    "direct_warm_vs_floor",
    "direct_cold_vs_floor",
    "core_p50_us_warm",
    "lint_2000_vs_200",
    "targets_met",
}


def test_percentiles() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile([7], 50) == 7
    assert summary_us([1000, 2000, 3000]) == {
        "n": 3,
        "p50_us": 2.0,
        "p99_us": 3.0,
        "mean_us": 2.0,
        "max_us": 3.0,
    }


def test_the_lint_policy_puts_every_rule_on_one_host() -> None:
    text, target = policy_text(50, hosts=1)
    policy = compile_policy(text, source="bench")
    assert len(policy.rules) == 50
    assert {rule.host for rule in policy.rules} == {target.host}


@pytest.mark.timeout(60)
def test_smoke_run_writes_json_chart_and_a_summary_line(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict) and summary.keys() >= SUMMARY_KEYS
    assert summary["mode"] == "smoke"
    assert isinstance(summary["core_p50_us_warm"], float)
    # what the smoke run does not measure is present and null, never missing
    assert summary["warm_vs_floor"] is None and summary["rss_mb_10k_rules"] is None
    assert summary["lint_2000_vs_200"] is None  # smoke lints 20 and 200 rules only

    result = json.loads(out.read_text())
    assert result["schema"] == "extauthz-bench/2"
    assert result["summary"] == summary
    machine = result["machine"]
    assert machine["cpu_count"] and machine["python"] and machine["platform"]
    assert {"grpcio", "protobuf", "cryptography", "PyJWT"} <= machine["libraries"].keys()
    assert "envoy" in machine
    for size in result["core"]["sizes"].values():
        for temp in ("warm", "cold"):
            assert {"p50_us", "p99_us", "iterations"} <= size[temp].keys()
            assert size[temp]["denied"] == 0
    assert {"sign", "verify"} <= result["core"]["es256"].keys()
    assert set(result["lint"]["sizes"]) == {"20", "200"} and result["lint"]["ratio_200_vs_20"]

    chart = out.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is None:
        assert not chart.exists()
    else:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
