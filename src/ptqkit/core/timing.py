"""Timing callables side by side: calls take turns after a warm-up, so drift of the machine
(another process, frequency changes) hits them alike."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ptqkit.core.progress import current_rss_bytes

__all__ = ["Timing", "time_alternating", "time_round_robin"]


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


def time_round_robin(calls: Mapping[str, Callable[[], Any]], warmup: int, reps: int, batch: int) -> dict[str, Timing]:
    """Time each of `calls` (one call of `batch` samples each): `warmup` calls of each, then `reps`
    rounds of one call of each in turn, so drift of the machine hits every call alike; medians
    and 90th percentiles of the rounds."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {key: [] for key in calls}
    rss = dict.fromkeys(calls, 0)
    for _ in range(reps):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(1000 * (time.perf_counter() - start))
            rss[key] = max(rss[key], current_rss_bytes())
    return {
        key: Timing(statistics.median(values), _percentile(values, 0.9), 1000 * batch / statistics.median(values), rss[key], reps)
        for key, values in times.items()
    }


def time_alternating(float_call: Callable[[], Any], quant_call: Callable[[], Any], warmup: int, reps: int, batch: int) -> tuple[Timing, Timing]:
    """`time_round_robin` of a float and a quantized call: (float timing, quantized timing)."""
    timings = time_round_robin({"float": float_call, "quantized": quant_call}, warmup, reps, batch)
    return timings["float"], timings["quantized"]
