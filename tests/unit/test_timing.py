"""Round-robin timing: every call takes its turn in each round, and the statistics are those of
the rounds (checked against calls of known duration)."""
from __future__ import annotations

import time

import pytest

from ptqkit.core.timing import time_alternating, time_round_robin


def test_calls_take_turns_and_the_medians_order_the_calls() -> None:
    order: list[str] = []

    def call(name: str, seconds: float):
        def run() -> None:
            order.append(name)
            time.sleep(seconds)
        return run

    timings = time_round_robin({"a": call("a", 0.001), "b": call("b", 0.004), "c": call("c", 0.008)}, warmup=1, reps=4, batch=2)
    assert order == ["a", "b", "c"] * 5  # one warm-up round, then four timed rounds, always in turn
    assert timings["a"].median_ms < timings["b"].median_ms < timings["c"].median_ms
    assert timings["b"].median_ms >= 4.0 and all(t.calls == 4 and t.median_ms <= t.p90_ms for t in timings.values())
    assert timings["c"].throughput_per_s == pytest.approx(1000 * 2 / timings["c"].median_ms)


def test_alternating_is_the_two_call_round_robin() -> None:
    float_timing, quant_timing = time_alternating(lambda: time.sleep(0.003), lambda: None, warmup=0, reps=3, batch=1)
    assert float_timing.median_ms >= 3.0 > quant_timing.median_ms and float_timing.calls == quant_timing.calls == 3
