"""`bench`: latency, throughput and memory of the float and the quantized model, measured side by
side in one process: same inputs, same thread count, calls alternating (float, quantized, float,
...) after a warm-up, so that drift of the machine hits both equally.

Runtimes (`runtime=`; the default "auto" times the form a user deploys and names it):
- "auto": ONNX Runtime when the model quantizes layer inputs (W8A8: ORT has the integer kernels,
  torch has none), torch's packed kernels when it is weight-only.
- "simulated": the float model against the simulated quantized model in eager torch
  (dequantize, then float ops): a measurement of the simulation, labelled as such, never the
  default.
- "torch": the float model against `ptqkit.export.pack(qmodel)` (weight-only layers on packed int8/int4
  CPU kernels; whatever no kernel takes stays on the simulated dequantize-then-matmul path, and
  the result lists it). A W8A8 model has no torch integer kernel here: it runs simulated, which
  is a measurement of the simulation, not of a deployment, and the result says so.
- "onnxruntime": ONNX Runtime on a float export against the int8 export (`ptqkit.export`, into a
  temporary directory for `bench`; a run's own export for `ptqkit bench`), intra-op threads set
  and spinning off; the kernels are those ORT ran (QLinearConv, MatMulInteger...).
Memory: the resident set sampled after every call (`rss_peak_bytes`: the highest value seen while
that model ran; both models are loaded throughout, so it bounds rather than isolates each one).
A quantized model slower than the float one gets a headline that says so first.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ptqkit.calibration.samples import call_model
from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import check_value, literal_values
from ptqkit.core.progress import current_rss_bytes
from ptqkit.core.threads import torch_threads
from ptqkit.core.timing import Timing, time_alternating
from ptqkit.stats.hooks import batch_length

__all__ = ["BenchResult", "Runtime", "Timing", "bench", "bench_onnx", "current_rss_bytes", "deployable_runtime", "time_alternating"]

Runtime = Literal["auto", "onnxruntime", "torch", "simulated"]
RUNTIMES: tuple[str, ...] = literal_values(Runtime)


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
        if self.runtime == "simulated":
            return (
                f"simulated in eager torch (not a deployment), batch {self.batch}, {self.threads} thread(s): "
                f"{self.speedup:.2f}x the float model's speed"
            )
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


def deployable_runtime(qmodel: nn.Module) -> str:
    """Where `qmodel` is deployed fast: "onnxruntime" when it quantizes layer inputs (integer
    matmuls and convolutions), "torch" (packed weight-only kernels) otherwise."""
    quantized_inputs = any(getattr(module, "input_quantizer", None) is not None for module in qmodel.modules())
    return "onnxruntime" if quantized_inputs else "torch"


def bench(
    model: nn.Module, qmodel: nn.Module, example: Any, *, runtime: Runtime = "auto", threads: int | None = None,
    warmup: int = 3, reps: int = 20,
) -> BenchResult:
    """Time `model` against `qmodel` on `example` (one batch), alternating calls, in `runtime`
    (module docstring; "auto": the deployable form, `deployable_runtime`)."""
    check_value(runtime, Runtime, "bench.runtime")
    threads = threads or torch.get_num_threads()
    _check(warmup, reps, threads)
    runtime = deployable_runtime(qmodel) if runtime == "auto" else runtime
    if runtime == "onnxruntime":
        return _bench_exported(qmodel, example, threads, warmup, reps)
    with torch_threads(threads):
        if runtime == "simulated":
            candidate, kernels, note = qmodel, {"simulated": _count_quantized(qmodel)}, "the simulated model in eager torch: not a deployment"
        else:
            candidate, kernels, note = _packed(qmodel)
        with torch.inference_mode():
            float_timing, quant_timing = time_alternating(
                lambda: call_model(model, example), lambda: call_model(candidate, example), warmup, reps, batch_length(example)
            )
    return BenchResult(runtime, float_timing, quant_timing, batch_length(example), threads, kernels, note)


def _count_quantized(qmodel: nn.Module) -> int:
    return sum(1 for module in qmodel.modules() if hasattr(module, "weight_codes") or hasattr(module, "input_quantizer"))


def _packed(qmodel: nn.Module) -> tuple[nn.Module, dict[str, Any], str]:
    """`qmodel` on torch's packed kernels, the kernels it runs, and what stays simulated."""
    from ptqkit.export.pack import pack

    packed = pack(qmodel)
    report = packed.ptqkit_pack_report
    simulated = len(report.simulated)
    note = (
        f"{simulated} of {len(report.layers)} quantized layer(s) have no torch kernel and run simulated "
        "(dequantize, then float matmul): this measures the simulation, not a deployment; export to ONNX Runtime "
        "for integer kernels" if simulated else "every quantized layer runs on a packed torch kernel"
    )
    return packed, dict(Counter(layer.kernel for layer in report.layers)), note


def _bench_exported(qmodel: nn.Module, example: Any, threads: int, warmup: int, reps: int) -> BenchResult:
    """Export `qmodel` (and its float graph) to ONNX in a temporary directory and time both in ORT."""
    from ptqkit.export import export

    with tempfile.TemporaryDirectory(prefix="ptqkit-bench-") as tmp:
        result = export(qmodel, Path(tmp) / "onnx", example_inputs=example, keep_float=True)
        kernels = dict(Counter(layer.kernel or "none" for layer in result.layers))
        return bench_onnx(result.files["onnx_fp32"], result.files["onnx"], example, threads=threads, warmup=warmup, reps=reps, kernels=kernels)


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
