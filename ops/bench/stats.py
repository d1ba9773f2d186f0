"""Percentiles and summaries, computed the way the peer benchmarks compute them.

Percentiles are nearest-rank on the sorted samples (the same formula as the
peer scripts' ``perfutil.pct``), so a p99 here and a p99 of the PostgreSQL
peer mean the same thing. A figure measured in several runs is reported as
its median with the min and max, never as a mean: one disturbed run moves a
mean but not a median.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def pct(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``p`` in 0..100)."""
    if not sorted_values:
        return math.nan
    n = len(sorted_values)
    k = max(0, min(n - 1, round(p / 100.0 * n + 0.5) - 1))
    return sorted_values[k]


def latency_summary(samples: Iterable[float]) -> dict[str, float]:
    """Milliseconds from a list of seconds: min, p50, p90, p99, p99.9, max, mean."""
    s = sorted(samples)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "min_ms": s[0] * 1e3,
        "p50_ms": pct(s, 50) * 1e3,
        "p90_ms": pct(s, 90) * 1e3,
        "p99_ms": pct(s, 99) * 1e3,
        "p999_ms": pct(s, 99.9) * 1e3,
        "max_ms": s[-1] * 1e3,
        "mean_ms": statistics.fmean(s) * 1e3,
    }


def across_runs(values: Iterable[float | None]) -> dict[str, Any] | None:
    """Median, min, max and count of one figure over runs (missing values skipped)."""
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    if not v:
        return None
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "runs": len(v)}
