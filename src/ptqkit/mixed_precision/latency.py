"""Per-layer latency measured on this machine, cached on disk, and the model latency it predicts.

`LatencyTable.layer_ms(linear, fmt, tokens)` times one Linear in one format (`mixed_precision.formats`)
on a [tokens, in_features] input: warm-up calls, then the median of `reps` calls, at a fixed
thread count. Successive calls go to different copies of the layer (64 MiB of them at least), so
its weights come from memory as they do inside a model. (With its weights in cache, a decode
step's float layers, one row each and memory-bound, timed faster than in the model, so the
savings of smaller formats were underestimated: SmolLM2 predictions were up to 75% too slow.) Results are cached in a JSON file keyed by everything that changes them: runtime
and torch version, CPU model, threads, format, shape, bias and tokens. A key from another machine
or thread count never matches, so a cache copied elsewhere is simply re-measured.

`predict_ms(model, assignment, rows)`: the model's latency with each Linear in its assigned
format = measured float model + for each assigned Linear (its latency in the format - in fp32;
the fp32 term timed inside the model when `linear_ms_inside` is given),
each measured alone on as many input rows as it sees in the model (`linear_rows`: an encoder's
pooler sees one row per sequence, its other Linears one per token). `measure_ms` times a whole model
the same way, so predictions can be checked against measurements.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.calibration.samples import call_model
from ptqkit.core.errors import ConfigError
from ptqkit.core.machine import cpu_name
from ptqkit.core.threads import torch_threads
from ptqkit.mixed_precision.formats import format_module

__all__ = ["LatencyTable", "linear_ms_inside", "linear_rows", "measure_ms"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: layers timed with their weights out of the CPU caches
_EVICTING_BYTES = 64 << 20  # more than the last-level cache of the CPUs measured here


def _median_ms(call: Callable[[], Any], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.inference_mode()
def measure_ms(model: nn.Module, example: Any, *, threads: int, warmup: int = 3, reps: int = 10) -> float:
    """Median latency (ms) of one call of `model` on `example` at `threads` threads."""
    with torch_threads(threads):
        return _median_ms(lambda: call_model(model, example), warmup, reps)


@torch.inference_mode()
def linear_rows(model: nn.Module, example: Any) -> dict[str, int]:
    """Input rows (all dimensions but the last) each nn.Linear of `model` sees in one call on
    `example` (summed over calls; Linears never called are absent)."""
    rows: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                rows[name] = rows.get(name, 0) + args[0].numel() // args[0].shape[-1]
            handles.append(module.register_forward_pre_hook(hook))
    try:
        call_model(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _copies_for(module: nn.Module) -> int:
    """How many copies of a layer to cycle through so that each call reads its weights from
    memory, not from a cache that still holds them from the previous call: in a model every
    layer's weights are evicted by the other layers' before the next call."""
    stored = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return max(1, min(64, -(-_EVICTING_BYTES // max(1, stored))))


@torch.inference_mode()
def linear_ms_inside(model: nn.Module, example: Any, *, threads: int, warmup: int = 2, reps: int = 5) -> dict[str, float]:
    """Median time (ms) each nn.Linear of `model` takes inside one call on `example`, timed with
    forward hooks. A float Linear can be several times slower inside the model than alone, so
    predictions subtract these."""
    times: dict[str, list[float]] = {}
    current: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def before(mod: nn.Module, args: tuple, name: str = name) -> None:
                started[name] = time.perf_counter()

            def after(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                current[name] = current.get(name, 0.0) + 1000 * (time.perf_counter() - started[name])

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch_threads(threads):
            for index in range(warmup + reps):
                current.clear()
                call_model(model, example)
                if index >= warmup:
                    for name, value in current.items():
                        times.setdefault(name, []).append(value)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(values) for name, values in times.items()}


class LatencyTable:
    """Measured per-layer latencies for one machine and thread count, cached in `path`."""

    def __init__(self, path: str | Path, *, threads: int = 1, warmup: int = 3, reps: int = 15) -> None:
        for name, value, low in (("threads", threads, 1), ("warmup", warmup, 0), ("reps", reps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"LatencyTable: {name}={value!r} must be an integer >= {low}")
        self.path = Path(path)
        self.threads, self.warmup, self.reps = threads, warmup, reps
        self.measured = 0  # micro-benchmarks run by this table (cache misses)
        self._entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            logger.warning("latency cache %s is unreadable (%s); measuring again", self.path, str(exc)[:200] or type(exc).__name__)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        if entries is None or data.get("version") != CACHE_VERSION or not isinstance(entries, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in entries.values()
        ):  # a timing that is not a finite number >= 0 would rank every configuration wrongly
            logger.warning("latency cache %s has another format; measuring again", self.path)
            return {}
        return {str(k): float(v) for k, v in entries.items()}

    def _write(self) -> None:
        from ptqkit.core.atomic import write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": self._entries}, indent=1, sort_keys=True))

    def key(self, linear: nn.Linear, fmt: str, tokens: int) -> str:
        return (
            f"torch {torch.__version__}|{cpu_name()}|threads {self.threads}|{fmt}|"
            f"{linear.in_features}x{linear.out_features}|bias {linear.bias is not None}|tokens {tokens}"
        )

    def layer_ms(self, linear: nn.Linear, fmt: str, tokens: int) -> float | None:
        """Median latency of `linear` in `fmt` on `tokens` input rows; None if no kernel takes it."""
        key = self.key(linear, fmt, tokens)
        if key in self._entries:
            return self._entries[key]
        module = format_module(linear, fmt)
        if isinstance(module, str):
            return None
        copies = [module] + [format_module(linear, fmt) for _ in range(_copies_for(module) - 1)]
        x = torch.randn(tokens, linear.in_features, generator=torch.Generator().manual_seed(0))
        turn = iter(range(1 << 62))
        with torch.inference_mode(), torch_threads(self.threads):
            value = _median_ms(lambda: copies[next(turn) % len(copies)](x), self.warmup, self.reps)
        self._entries[key] = value
        self.measured += 1
        self._write()
        return value

    def predict_ms(
        self,
        model: nn.Module,
        assignment: Mapping[str, str],
        example: Any,
        rows: Mapping[str, int],
        *,
        float_ms: float | None = None,
        inside: Mapping[str, float] | None = None,
    ) -> float:
        """Predicted latency of `model` with the Linears of `assignment` (name -> format) in those
        formats and every other Linear in fp32; `rows[name]` is how many input rows each Linear
        sees per call (`linear_rows`); `float_ms` (measured on `example` if None) is the float
        model's latency; `inside` (`linear_ms_inside`), each float Linear's time inside the
        model, replaces its time alone in what is subtracted."""
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(assignment) - set(linears))
        if unknown:
            raise ConfigError(f"predict_ms: {unknown} are not nn.Linear modules of {type(model).__name__}")
        if float_ms is None:
            float_ms = measure_ms(model, example, threads=self.threads, warmup=self.warmup, reps=self.reps)
        total = float_ms
        for name, fmt in assignment.items():
            if name not in rows:
                continue  # never called on the example: costs nothing there
            new = self.layer_ms(linears[name], fmt, rows[name])
            old = inside[name] if inside is not None and name in inside else self.layer_ms(linears[name], "fp32", rows[name])
            if new is None:
                raise ConfigError(f"predict_ms: {name} has no {fmt} kernel ({format_module(linears[name], fmt)})")
            total += new - (old or 0.0)
        return total
