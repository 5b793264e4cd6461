"""`pack(qmodel)`: swap simulated weight-only layers for packed modules on real CPU kernels.

Every module `ptqkit.engine.quantize` produced is accounted for in a `PackReport` (attached to the
result as `ptqkit_pack_report` and logged): which kernel it runs on, or why it stays on the
simulated (dequantize-then-matmul) path. Nothing is left behind silently; `strict=True` turns any
layer left on the simulated path into a ConfigError.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.nn.modules import QuantizedModule, QuantLinear
from ptqkit.nn.packed import ACTIVATION_DTYPES, WEIGHT_ONLY_KERNELS, CastLinear
from ptqkit.nn.tree import replace_module

__all__ = ["BACKENDS", "FASTEST", "PackedLayer", "PackReport", "fastest_float_dtype", "pack"]

logger = logging.getLogger(__name__)

BACKENDS = ("torch",)
SIMULATED = "simulated"
FASTEST = "fastest"  # float_linear_dtype: time bf16 and fp16 on this CPU and take the faster
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PackedLayer:
    """What `pack` did with one module: the kernel it runs on, or "simulated" and why."""

    name: str
    kernel: str  # "int8_weight_only", "int4_grouped", "float_linear" or "simulated"
    reason: str = ""


@dataclass(frozen=True)
class PackReport:
    """Per-layer outcome of `pack`."""

    backend: str
    activation_dtype: str
    layers: tuple[PackedLayer, ...]

    @property
    def simulated(self) -> tuple[PackedLayer, ...]:
        """Quantized layers left on the simulated path (with the reason)."""
        return tuple(layer for layer in self.layers if layer.kernel == SIMULATED)

    @property
    def packed(self) -> tuple[PackedLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kernel != SIMULATED)

    def render(self) -> str:
        """A plain-text table: module, kernel, reason."""
        rows = [(layer.name, layer.kernel, layer.reason) for layer in self.layers]
        width = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("module", "kernel"))]
        lines = [f"{'module'.ljust(width[0])}  {'kernel'.ljust(width[1])}  why"]
        lines += [f"{n.ljust(width[0])}  {k.ljust(width[1])}  {r}".rstrip() for n, k, r in rows]
        lines.append(f"{len(self.packed)} module(s) on kernels, {len(self.simulated)} on the simulated path")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "activation_dtype": self.activation_dtype,
            "layers": [{"name": l.name, "kernel": l.kernel, "reason": l.reason} for l in self.layers],
        }


def _choose(module: QuantizedModule, activation_dtype: torch.dtype) -> tuple[nn.Module | None, str]:
    """(packed replacement or None, reason when None)."""
    if not isinstance(module, QuantLinear):
        if module.float_type == "Embedding":
            return None, "embedding: a lookup reads one row per token, no matmul kernel applies"
        return None, f"{module.float_type}: no packed torch kernel for convolutions"
    kernel = WEIGHT_ONLY_KERNELS.get(module.weight_spec.qtype.bits)
    if kernel is None:
        return None, f"{module.weight_spec.qtype.name} weights: torch has 8- and 4-bit kernels only"
    reason = kernel.refusal(module)
    return (kernel.build(module, activation_dtype), "") if reason is None else (None, reason)


def fastest_float_dtype(linear: nn.Linear, reps: int = 20) -> tuple[torch.dtype, dict[str, float]]:
    """(the 16-bit dtype in which `linear` runs one row fastest on this CPU, median ms per call of each).

    One row is a decode step's shape; the two formats' calls alternate (`time_alternating`) so
    that the machine's drift hits both alike. Which format wins is a property of the machine:
    CPUs with AMX run bf16 natively, others can run fp16 faster."""
    from ptqkit.core.timing import time_alternating

    calls = []
    for dtype in SIXTEEN_BIT:
        weight = linear.weight.detach().to(dtype)  # [N, K]
        row = torch.ones(1, linear.in_features, dtype=dtype)  # [1, K]
        calls.append(functools.partial(torch.nn.functional.linear, row, weight))
    with torch.inference_mode():
        timings = time_alternating(*calls, warmup=3, reps=reps, batch=1)  # warm-up: first calls pick the kernel
    medians = {dtype: timing.median_ms for dtype, timing in zip(SIXTEEN_BIT, timings)}
    best = min(medians, key=medians.__getitem__)
    return best, {str(dtype).removeprefix("torch."): ms for dtype, ms in medians.items()}


def _float_linear_dtype(model: nn.Module, requested: torch.dtype | str | None) -> tuple[torch.dtype | None, str]:
    """(dtype for the float Linears, why): `FASTEST` is decided on the largest float Linear."""
    if requested != FASTEST:
        return requested, f"float layer run in {requested}"
    floats = [m for m in model.modules() if type(m) is nn.Linear]
    if not floats:
        return None, ""
    largest = max(floats, key=lambda m: m.weight.numel())
    dtype, timings = fastest_float_dtype(largest)
    measured = ", ".join(f"{name} {ms:.3f} ms" for name, ms in timings.items())
    logger.info("pack: float Linears run in %s (one row through a %d x %d Linear: %s)", dtype, largest.out_features, largest.in_features, measured)
    return dtype, f"float layer run in {dtype}, the faster here (one row, {largest.out_features} x {largest.in_features}: {measured})"


def _check_pack_options(qmodel: nn.Module, backend: str, activation_dtype: torch.dtype, float_linear_dtype: torch.dtype | str | None) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"pack: backend {backend!r} is unknown; valid: {', '.join(BACKENDS)}")
    if activation_dtype not in ACTIVATION_DTYPES:
        raise ConfigError(f"pack: activation_dtype={activation_dtype!r} is not supported; valid: {', '.join(map(str, ACTIVATION_DTYPES))}")
    if float_linear_dtype is not None and float_linear_dtype != FASTEST and float_linear_dtype not in ACTIVATION_DTYPES:
        raise ConfigError(
            f"pack: float_linear_dtype={float_linear_dtype!r} is not supported; "
            f"valid: None, {FASTEST!r}, {', '.join(map(str, ACTIVATION_DTYPES))}"
        )
    if not any(isinstance(m, QuantizedModule) for m in qmodel.modules()):
        raise ConfigError(
            f"pack: {type(qmodel).__name__} has no ptqkit quantized modules; pass the model returned by ptqkit.engine.quantize(...)"
        )


@dataclass(frozen=True)
class _Swap:
    """One module's outcome: its report row and the module that replaces it (None: stays simulated)."""

    layer: PackedLayer
    replacement: nn.Module | None = None


def _swaps(model: nn.Module, activation_dtype: torch.dtype, float_dtype: torch.dtype | None, float_reason: str) -> list[_Swap]:
    """Every quantized module (on a kernel, or simulated and why) and, with `float_dtype`, every float nn.Linear cast to it."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            packed, reason = _choose(module, activation_dtype)
            swaps.append(_Swap(PackedLayer(name, SIMULATED, reason)) if packed is None else _Swap(PackedLayer(name, packed.kernel), packed))
        elif float_dtype is not None and type(module) is nn.Linear:
            swaps.append(_Swap(PackedLayer(name, CastLinear.kernel, float_reason), CastLinear(module, float_dtype)))
    return swaps


def _report_simulated(report: PackReport, strict: bool) -> None:
    """Layers left on the simulated path: a ConfigError with `strict`, else one warning each."""
    if report.simulated:
        summary = "; ".join(f"{l.name}: {l.reason}" for l in report.simulated)
        if strict:
            raise ConfigError(f"pack(strict=True): {len(report.simulated)} layer(s) cannot run on a kernel: {summary}")
        for layer in report.simulated:
            logger.warning("pack: %s stays on the simulated path: %s", layer.name, layer.reason)


def pack(
    qmodel: nn.Module,
    backend: str = "torch",
    *,
    activation_dtype: torch.dtype = torch.bfloat16,
    float_linear_dtype: torch.dtype | str | None = None,
    strict: bool = False,
) -> nn.Module:
    """A copy of `qmodel` whose weight-only QuantLinear layers run on packed CPU kernels.

    - int8 symmetric per-channel weights -> `torch._weight_int8pack_mm`;
    - 4-bit grouped weights (group 32/64/128/256 dividing in_features) -> `torch._weight_int4pack_mm_for_cpu`.
    Activations are cast to `activation_dtype` (bf16 default: fp32 activations made both kernels
    8-15x slower) and outputs back to the input dtype.
    `float_linear_dtype` (torch.bfloat16 or torch.float16): also run the float `nn.Linear` layers
    the recipe left unquantized (an LLM's kept lm_head) in that dtype — a tied FP32 lm_head
    otherwise caps decode speed-ups. Which 16-bit format is faster depends on the CPU
    (`fastest_float_dtype`); fp16 keeps 3 more mantissa bits.
    `float_linear_dtype="fastest"` times both on the largest float Linear (one row) and takes the
    faster; the report says what it measured. fp16 holds values up to 65504 only: keep bf16 for
    layers whose outputs can exceed that. Layers no kernel can take stay simulated and are listed in
    `result.ptqkit_pack_report`; with `strict=True` they raise ConfigError instead.
    """
    _check_pack_options(qmodel, backend, activation_dtype, float_linear_dtype)
    model = copy.deepcopy(qmodel)
    float_dtype, float_reason = _float_linear_dtype(model, float_linear_dtype)
    swaps = _swaps(model, activation_dtype, float_dtype, float_reason)
    report = PackReport(backend=backend, activation_dtype=str(activation_dtype), layers=tuple(swap.layer for swap in swaps))
    _report_simulated(report, strict)
    for swap in swaps:
        if swap.replacement is not None:
            replace_module(model, swap.layer.name, swap.replacement)
    logger.info("pack report:\n%s", report.render())
    model.ptqkit_pack_report = report
    return model
