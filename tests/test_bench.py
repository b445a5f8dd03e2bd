"""The benchmark's plumbing, not its figures: ``python -m bench --smoke`` runs, writes a result
file of the documented shape and a valid PNG, and prints one JSON object as its last line.
No timing is asserted (this machine is shared and noisy)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.png import PNG_SIGNATURE, Bar, Canvas, Panel, chart, read_png_header  # noqa: E402
from bench.stats import percentile, summary_us  # noqa: E402

SUMMARY_KEYS = {
    "warm_vs_floor",
    "cold_vs_floor",
    "rules_10k_vs_10",
    "workers2_vs_1",
    "rss_mb_10k_rules",
    "direct_warm_vs_floor",
    "direct_cold_vs_floor",
    "core_p50_us_warm",
    "targets_met",
}


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (type, payload) of a PNG, checking each chunk's CRC on the way."""
    assert data[:8] == PNG_SIGNATURE
    out, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind, payload = data[i + 4 : i + 8], data[i + 8 : i + 8 + length]
        (crc,) = struct.unpack(">I", data[i + 8 + length : i + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        out.append((kind, payload))
        i += 12 + length
    return out


def assert_valid_png(data: bytes) -> tuple[int, int]:
    found = chunks(data)
    assert [k for k, _ in found][0] == b"IHDR" and found[-1][0] == b"IEND"
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", found[0][1])
    assert (depth, colour) == (8, 2)  # 8-bit truecolour
    pixels = zlib.decompress(b"".join(p for k, p in found if k == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    assert (width, height) == read_png_header(data)
    return width, height


def test_png_writer_writes_what_it_was_asked_to() -> None:
    canvas = Canvas(7, 3)
    canvas.rect(1, 1, 2, 1, (255, 0, 0))
    data = canvas.png()
    assert assert_valid_png(data) == (7, 3)
    rows = zlib.decompress(b"".join(p for k, p in chunks(data) if k == b"IDAT"))
    middle = rows[1 * 22 : 2 * 22]  # 1 filter byte + 7 RGB pixels per row
    assert middle[0] == 0 and middle[1 + 3 : 1 + 9] == bytes((255, 0, 0)) * 2
    assert middle[1:4] == bytes((255, 255, 255))


def test_chart_is_a_png_with_room_for_every_bar() -> None:
    few = chart("T", [Panel("A", "X", [Bar("ONE", 1.0)])])
    many = chart(
        "T", [Panel("A", "X", [Bar(str(i), float(i)) for i in range(9)] + [Bar("N", None)])]
    )
    w1, h1 = assert_valid_png(few)
    w2, h2 = assert_valid_png(many)
    assert w1 == w2 and h2 > h1


def test_not_a_png_is_refused() -> None:
    with pytest.raises(ValueError):
        read_png_header(b"GIF89a" + bytes(30))


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


@pytest.mark.timeout(60)
def test_smoke_run_writes_json_png_and_a_summary_line(tmp_path: Path) -> None:
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
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert isinstance(summary, dict) and summary.keys() >= SUMMARY_KEYS
    assert summary["mode"] == "smoke"
    assert isinstance(summary["core_p50_us_warm"], float)
    # what the smoke run does not measure is present and null, never missing
    assert summary["warm_vs_floor"] is None and summary["rss_mb_10k_rules"] is None

    result = json.loads(out.read_text())
    assert result["schema"] == "extauthz-bench/1"
    assert result["summary"] == summary
    machine = result["machine"]
    assert machine["cpu_count"] and machine["python"] and machine["platform"]
    assert {"grpcio", "protobuf", "cryptography", "PyJWT"} <= machine["libraries"].keys()
    assert "envoy" in machine
    for size in result["core"]["sizes"].values():
        for temp in ("warm", "cold"):
            assert {"p50_us", "p99_us", "mean_us", "iterations"} <= size[temp].keys()
            assert size[temp]["denied"] == 0
    for alg in ("ES256", "EdDSA", "RS256"):
        assert {"sign", "verify"} <= result["crypto"][alg].keys()

    width, height = assert_valid_png(out.with_suffix(".png").read_bytes())
    assert width > 100 and height > 100
