"""`bench`: latency, throughput and memory of the float and the quantized model, measured side by
side in one process: same inputs, same thread count, calls alternating (float, quantized, float,
...) after a warm-up, so that drift of the machine hits both equally.

Runtimes:
- "torch": the float model against `ptqkit.export.pack(qmodel)` (weight-only layers on packed int8/int4
  CPU kernels; whatever no kernel takes stays on the simulated dequantize-then-matmul path, and
  the result lists it). A W8A8 model has no torch integer kernel here: it runs simulated, which
  is a measurement of the simulation, not of a deployment, and the result says so.
- "onnxruntime": ONNX Runtime on a float export against the int8 export (`ptqkit.export`), intra-op
  threads set and spinning off; the kernels are those ORT ran (QLinearConv, MatMulInteger...).
Memory: the resident set sampled after every call (`rss_peak_bytes`: the highest value seen while
that model ran; both models are loaded throughout, so it bounds rather than isolates each one).
A quantized model slower than the float one gets a headline that says so first.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.calibration.samples import call_model
from ptqkit.core.errors import ConfigError
from ptqkit.core.progress import current_rss_bytes
from ptqkit.core.threads import torch_threads
from ptqkit.core.timing import Timing, time_alternating
from ptqkit.stats.hooks import batch_length

__all__ = ["BenchResult", "Timing", "bench", "bench_onnx", "current_rss_bytes", "time_alternating"]

RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class BenchResult:
    """Float vs quantized, measured in one run. `speedup` = float median / quantized median."""

    runtime: str
    float: Timing
    quantized: Timing
    batch: int
    threads: int
    kernels: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.float.median_ms / self.quantized.median_ms

    def headline(self) -> str:
        verdict = (
            f"the quantized model is SLOWER than float here ({self.speedup:.2f}x the speed)"
            if self.speedup < 1 else f"the quantized model is {self.speedup:.2f}x faster than float"
        )
        return f"{self.runtime}, batch {self.batch}, {self.threads} thread(s): {verdict}"

    def to_dict(self) -> dict[str, Any]:
        from ptqkit.core.machine import describe

        return {
            "runtime": self.runtime, "batch": self.batch, "threads": self.threads, "speedup": self.speedup,
            "float": asdict(self.float), "quantized": asdict(self.quantized), "kernels": self.kernels,
            "note": self.note, "headline": self.headline(), "machine": describe(),
        }


def _check(warmup: int, reps: int, threads: int) -> None:
    for name, value, low in (("warmup", warmup, 0), ("reps", reps, 1), ("threads", threads, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"bench: {name}={value!r} must be an integer >= {low}")


def bench(model: nn.Module, qmodel: nn.Module, example: Any, *, threads: int | None = None, warmup: int = 3, reps: int = 20) -> BenchResult:
    """Time `model` against `qmodel` in torch on `example` (one batch), alternating calls."""
    from ptqkit.export.pack import pack

    threads = threads or torch.get_num_threads()
    _check(warmup, reps, threads)
    with torch_threads(threads):
        packed = pack(qmodel)
        report = packed.ptqkit_pack_report
        kernels = dict(Counter(layer.kernel for layer in report.layers))
        simulated = len(report.simulated)
        note = (
            f"{simulated} of {len(report.layers)} quantized layer(s) have no torch kernel and run simulated "
            "(dequantize, then float matmul): this measures the simulation, not a deployment; export to ONNX Runtime "
            "for integer kernels" if simulated else "every quantized layer runs on a packed torch kernel"
        )
        with torch.inference_mode():
            float_timing, quant_timing = time_alternating(
                lambda: call_model(model, example), lambda: call_model(packed, example), warmup, reps, batch_length(example)
            )
    return BenchResult("torch", float_timing, quant_timing, batch_length(example), threads, kernels, note)


def bench_onnx(
    float_onnx: str | Path, quant_onnx: str | Path, example: Any, *, threads: int = 1, warmup: int = 3, reps: int = 20, kernels: dict[str, Any] | None = None
) -> BenchResult:
    """Time two ONNX files in ONNX Runtime (same threads, spinning off) on `example`, alternating."""
    from ptqkit.export.ort_check import make_session, run_session

    _check(warmup, reps, threads)
    float_session = make_session(float_onnx, threads=threads)
    quant_session = make_session(quant_onnx, threads=threads)
    float_timing, quant_timing = time_alternating(
        lambda: run_session(float_session, example), lambda: run_session(quant_session, example), warmup, reps, batch_length(example)
    )
    return BenchResult("onnxruntime", float_timing, quant_timing, batch_length(example), threads, dict(kernels or {}), "")
