"""The benchmark's plumbing, not its figures: ``python -m bench --smoke`` runs, writes a result
file of the documented shape and a PNG chart, and prints one JSON object as its last line.
No timing is asserted (this machine is shared and noisy)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fixtures import Target, policy_text  # noqa: E402
from bench.loadgen import run_wrk, too_many_bad, write_tokens, wrk_figures  # noqa: E402
from bench.run import TARGETS, chart_panels, summarise  # noqa: E402
from bench.scenarios import aggregate_wrk, fronts_result, ratios  # noqa: E402
from bench.servers import client_config  # noqa: E402
from bench.stats import percentile, summary_us  # noqa: E402
from extauthz.demo.envoy import validate_config  # noqa: E402
from extauthz.demo.pki import make_pki  # noqa: E402
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
    assert all(summary[key] is None for key in FRONT_KEYS) and summary["invalid"] == []
    assert summary["lint_2000_vs_200"] is None  # smoke lints 20 and 200 rules only

    result = json.loads(out.read_text())
    assert result["schema"] == "extauthz-bench/2"
    assert result["summary"] == summary
    assert summary.keys() == result["summary_keys"].keys()  # every key is explained
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


# --- the parts through a client-side Envoy and wrk: their plumbing, on synthetic figures ------

FRONT_KEYS = {
    "http_warm_vs_grpc_floor",
    "http_cold_vs_grpc_floor",
    "http_warm_vs_http_floor",
    "http_cold_vs_http_floor",
    "envoy_cpu_us_floor",
    "envoy_cpu_us_warm",
    "cpu_us_grpc_floor",
    "cpu_us_grpc_warm",
    "cpu_us_grpc_cold",
    "cpu_us_http_floor",
    "cpu_us_http_warm",
    "cpu_us_http_cold",
}
SUMMARY_KEYS |= FRONT_KEYS | {"grpc_warm_vs_grpc_floor", "grpc_cold_vs_grpc_floor"}


def _run(rps: float, extauthz: float | None, envoy: float, *, client_envoy: float = 0.30,
         wrk: float = 0.05) -> dict[str, Any]:  # fmt: skip
    """A run as ``loadgen.wrk_figures`` makes it: ``extauthz``/``envoy``/... are cores."""
    cores = {"extauthz": extauthz} if extauthz is not None else {}
    cores |= {"envoy": envoy, "client_envoy": client_envoy, "wrk": wrk}
    reply = {"completed": int(rps * 2), "not_200": 0, "statuses": [], "reused": 0, "pool": 32,
             "first_response_ns": 1, "socket_errors": {"connect": 0, "read": 0, "write": 0,
             "timeout": 0}, "p50_us": 1000.0, "p99_us": 2000.0}  # fmt: skip
    return wrk_figures(reply, cores, 1.9, begin_ns=10, duration=2.0)


def _synthetic(cold_invalid: bool = False) -> dict[str, Any]:
    """Two repeats at one load; every figure chosen so the expected values are exact."""
    rows = {  # scenario: (rps, extauthz cores, server-side Envoy cores)
        "envoy_alone": (8000.0, None, 0.8),
        "grpc_floor": (1000.0, 0.4, 0.3),
        "grpc_warm": (850.0, 0.68, 0.306),
        "grpc_cold": (500.0, 0.6, 0.2),
        "http_floor": (4000.0, 0.2, 0.8),
        "http_warm": (2500.0, 0.75, 0.5),
        "http_cold": (1600.0, 0.8, 0.32),
    }
    runs = {
        name: {"c=32": [_run(rps, ext, env) for _ in range(2)]}
        for name, (rps, ext, env) in rows.items()
    }
    if cold_invalid:
        runs["http_cold"]["c=32"][1]["invalid"] = "9 requests reused one of 1000 tokens"
    workers = {
        "http_workers_1": {"c=32": [_run(2500.0, 0.75, 0.5)]},
        "http_workers_2": {"c=32": [_run(3000.0, 1.2, 0.6)]},
    }
    workers_summary = aggregate_wrk(workers)
    return {
        "mode": "quick",
        "machine": {"cpu_count": 2},
        "fronts": fronts_result(aggregate_wrk(runs)),
        "http_workers": {
            "scenarios": workers_summary,
            **ratios(workers_summary, {"http_workers2_vs_1": "http_workers_2"}, "http_workers_1"),
        },
    }


def test_the_summary_computes_the_front_keys_from_the_runs() -> None:
    summary = summarise(_synthetic())
    assert summary.keys() >= SUMMARY_KEYS
    expected = {
        "grpc_warm_vs_grpc_floor": 0.85,
        "grpc_cold_vs_grpc_floor": 0.5,
        "http_warm_vs_grpc_floor": 2.5,
        "http_cold_vs_grpc_floor": 1.6,
        "http_warm_vs_http_floor": 0.625,
        "http_cold_vs_http_floor": 0.4,
        "http_floor_vs_grpc_floor": 4.0,
        # CPU µs per completed check = cores / (checks per second) * 1e6
        "cpu_us_grpc_floor": 400.0,
        "cpu_us_grpc_warm": 800.0,
        "cpu_us_grpc_cold": 1200.0,
        "cpu_us_http_floor": 50.0,
        "cpu_us_http_warm": 300.0,
        "cpu_us_http_cold": 500.0,
        "envoy_cpu_us_floor": 300.0,
        "envoy_cpu_us_warm": 360.0,
        "envoy_cpu_us_cold": 400.0,
        "envoy_cpu_us_http_floor": 200.0,
        "envoy_cpu_us_http_warm": 200.0,
        "envoy_cpu_us_http_cold": 200.0,
        "envoy_cpu_warm_vs_floor": 1.2,
        "envoy_cpu_http_warm_vs_http_floor": 1.0,
        "client_envoy_cpu_us_grpc_floor": 300.0,
        "client_envoy_cpu_us_http_warm": 120.0,
        "wrk_cpu_us_grpc_floor": 50.0,
        "wrk_cpu_us_http_warm": 20.0,
        "generator_cpu_cores_max": 0.35,
        "fronts_envoy_alone_rps": 8000.0,
        "fronts_http_warm_rps": 2500.0,
        "http_workers2_vs_1": 1.2,
    }
    assert {key: summary[key] for key in expected} == pytest.approx(expected)
    assert summary["invalid"] == []
    met = summary["targets_met"]
    assert met["grpc_warm_vs_grpc_floor"] is True and met["grpc_cold_vs_grpc_floor"] is False
    assert met["http_warm_vs_grpc_floor"] is True and met["http_cold_vs_grpc_floor"] is True
    assert met["envoy_cpu_warm_vs_floor"] is False
    assert set(TARGETS) <= met.keys()
    # each run keeps the client-side Envoy's and wrk's CPU apart from the server side's
    run = _synthetic()["fronts"]["scenarios"]["http_warm"]["by_load"]["c=32"]["runs"][0]
    assert run["cpu_us_per_check"] == {"extauthz": 300.0, "envoy": 200.0, "client_envoy": 120.0,
                                       "wrk": 20.0}  # fmt: skip
    assert run["generator_cpu_cores"] == 0.35
    # the through-Envoy alone scenario has no extauthz process
    assert (
        _synthetic()["fronts"]["scenarios"]["envoy_alone"]["by_load"]["c=32"][
            "extauthz_cpu_us_per_check"
        ]
        is None
    )


def test_an_invalid_cold_run_nulls_its_figures_and_is_reported() -> None:
    summary = summarise(_synthetic(cold_invalid=True))
    assert summary["invalid"] == ["http_cold c=32: 9 requests reused one of 1000 tokens"]
    for key in ("http_cold_vs_grpc_floor", "http_cold_vs_http_floor", "cpu_us_http_cold"):
        assert summary[key] is None
    assert summary["targets_met"]["http_cold_vs_grpc_floor"] is None
    assert summary["http_warm_vs_grpc_floor"] == 2.5  # the rest stands


def test_chart_panels_show_the_front_scenarios() -> None:
    result = _synthetic()
    panels = chart_panels(result)
    throughput = next(bars for title, bars in panels.items() if "HTTP front: requests" in title)
    assert {"c=32 grpc_floor", "c=32 http_warm", "c=32 http_cold"} <= throughput.keys()
    cpu = next(bars for title, bars in panels.items() if title.startswith("CPU µs per"))
    assert cpu["http_warm: extauthz"] == 300.0 and cpu["grpc_floor: wrk"] == 50.0
    assert any("--workers" in title for title in panels)


def test_too_many_non_200s_fail_a_run() -> None:
    run = _run(1000.0, 0.4, 0.3)
    assert not too_many_bad(run)
    assert too_many_bad(run | {"not_200": 100})  # 5% of 2,000
    assert not too_many_bad(run | {"not_200": 10})
    assert too_many_bad(run | {"completed": 0})
    errors = {"connect": 0, "read": 30, "write": 0, "timeout": 0}
    assert too_many_bad(run | {"socket_errors": errors})


@pytest.mark.envoy
def test_the_client_envoy_bootstrap_is_valid(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", {"client": "spiffe://cluster.local/ns/bench/sa/w0"})
    config = client_config(pki, pki.workloads["client"], {"a": 20001, "b": 20002},
                           {"a": 20003, "b": 20004}, 20005)  # fmt: skip
    validate_config(config, tmp_path / "envoy")


class _Answers(http.server.BaseHTTPRequestHandler):
    """200 unless the bearer token is ``deny`` (then 403); keep-alive."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
        denied = self.headers.get("Authorization") == "Bearer deny"
        self.send_response(403 if denied else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(60)
def test_wrk_counts_200s_in_the_window_and_notices_reused_tokens(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = int(server.server_address[1])
    target = Target("spiffe://x", "svc.example", "GET", "/v1/r/42?view=full")
    try:
        tokens = write_tokens(tmp_path / "t.txt", ["a", "deny", "b", "c"])
        run = run_wrk(port, target, tokens, fresh=False, connections=2, warmup=0.2,
                      duration=0.5, sample={})  # fmt: skip
        assert run["completed"] > 0 and run["not_200"] > 0
        assert set(run["statuses"]) == {"403"} and run["pool"] == 4
        assert run["reused"] == 0 and run["invalid"] is None  # cycling is what warm does
        assert run["cpu_us_per_check"].keys() == {"wrk"} and too_many_bad(run)
        fresh = run_wrk(port, target, write_tokens(tmp_path / "f.txt", ["a", "b"]), fresh=True,
                        connections=2, warmup=0.2, duration=0.5, sample={})  # fmt: skip
        assert fresh["reused"] > 0 and "reused" in fresh["invalid"]
    finally:
        server.shutdown()
        server.server_close()
