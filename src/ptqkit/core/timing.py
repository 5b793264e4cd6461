"""Timing two callables side by side: calls alternate after a warm-up, so drift of the machine
(another process, frequency changes) hits both alike."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptqkit.core.progress import current_rss_bytes

__all__ = ["Timing", "time_alternating"]


@dataclass(frozen=True)
class Timing:
    """One model's measurements: per-call latency (ms) median and 90th percentile, samples per
    second at the median, the highest resident set seen after its calls."""

    median_ms: float
    p90_ms: float
    throughput_per_s: float
    rss_peak_bytes: int
    calls: int


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def time_alternating(float_call: Callable[[], Any], quant_call: Callable[[], Any], warmup: int, reps: int, batch: int) -> tuple[Timing, Timing]:
    """Time `float_call` and `quant_call` (each one call of `batch` samples): `warmup` calls of
    each, then `reps` rounds of one call each; medians and 90th percentiles of the rounds."""
    for _ in range(warmup):
        float_call()
        quant_call()
    times: dict[str, list[float]] = {"float": [], "quantized": []}
    rss = {"float": 0, "quantized": 0}
    for _ in range(reps):
        for key, call in (("float", float_call), ("quantized", quant_call)):
            start = time.perf_counter()
            call()
            times[key].append(1000 * (time.perf_counter() - start))
            rss[key] = max(rss[key], current_rss_bytes())
    timings = []
    for key in ("float", "quantized"):
        median = statistics.median(times[key])
        timings.append(Timing(median, _percentile(times[key], 0.9), 1000 * batch / median, rss[key], reps))
    return timings[0], timings[1]
