"""Percentiles of timing samples; plain Python, no numpy."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank."""
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary_us(values_ns: Sequence[int]) -> dict[str, Any]:
    """Count, p50, p99, mean and max in microseconds from nanosecond samples."""
    ordered = sorted(values_ns)
    if not ordered:
        return {"n": 0, "p50_us": None, "p99_us": None, "mean_us": None, "max_us": None}
    return {
        "n": len(ordered),
        "p50_us": round(percentile(ordered, 50) / 1000, 2),
        "p99_us": round(percentile(ordered, 99) / 1000, 2),
        "mean_us": round(statistics.fmean(ordered) / 1000, 2),
        "max_us": round(ordered[-1] / 1000, 2),
    }
