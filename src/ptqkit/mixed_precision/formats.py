"""Candidate per-layer formats on the torch runtime: only formats with a real CPU kernel.

    fp32        the float nn.Linear (the reference)
    bf16        the float weights in bfloat16 (`CastLinear`)
    int8_wo     int8 symmetric per-channel weights on `torch._weight_int8pack_mm`
    int8_dyn    the same weights, activations quantized per tensor at run time (7 bits), on
                `torch.ops.quantized.linear_dynamic`: w8a8 dynamic, for many-row inputs (encoders)
    int4_g128   4-bit weights in groups of 128 on `torch._weight_int4pack_mm_for_cpu`
    int4_g64    the same in groups of 64 (for input widths that 128 does not divide)

Each quantized format is a recipe weight spec plus a kernel from the one torch kernel table
(`nn.packed.WEIGHT_ONLY_KERNELS`, `DYNAMIC_INT8_KERNEL`, which `export.pack` chooses from too).
`format_module(linear, name)` builds the layer in a format, or returns the kernel's refusal (for
example int4_g128 on SmolLM2's 576-wide inputs: 4.5 groups). Weights are on the engine's data-free
grid (`engine.quantize.weight_qparams`: round-to-nearest, min-max);
the search measures accuracy on the model, so better quantizers only move its points.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.quantize import weight_qparams
from ptqkit.nn.modules import QuantLinear
from ptqkit.nn.packed import DYNAMIC_INT8_KERNEL, WEIGHT_ONLY_KERNELS, CastLinear, TorchKernel
from ptqkit.nn.tree import replace_module

__all__ = ["FORMATS", "WEIGHT_BITS", "apply_assignment", "format_module", "weight_bytes"]

_FORMATS: dict[str, tuple[QuantSpec, TorchKernel]] = {  # name -> (recipe weight spec, kernel from the one table)
    "int8_wo": (QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True), WEIGHT_ONLY_KERNELS[8]),
    "int8_dyn": (QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True), DYNAMIC_INT8_KERNEL),
    "int4_g128": (QuantSpec(qtype="int4", granularity=PerGroup(128), symmetric=True), WEIGHT_ONLY_KERNELS[4]),
    "int4_g64": (QuantSpec(qtype="int4", granularity=PerGroup(64), symmetric=True), WEIGHT_ONLY_KERNELS[4]),
}
FORMATS = ("fp32", "bf16", *_FORMATS)
WEIGHT_BITS = {"fp32": 32, "bf16": 16, "int8_wo": 8, "int8_dyn": 8, "int4_g128": 4, "int4_g64": 4}
_SCALE_BYTES = {"int8_wo": lambda n, k: 4 * n, "int8_dyn": lambda n, k: 4 * n, "int4_g128": lambda n, k: 4 * n * (k // 128), "int4_g64": lambda n, k: 4 * n * (k // 64)}


def weight_bytes(linear: nn.Linear, fmt: str) -> int:
    """Stored bytes of the layer's weight in `fmt` (codes + scales/zero points; bias excluded)."""
    n, k = linear.out_features, linear.in_features
    scales: Callable[[int, int], int] = _SCALE_BYTES.get(fmt, lambda n, k: 0)
    return n * k * WEIGHT_BITS[fmt] // 8 + scales(n, k)


@torch.no_grad()
def format_module(linear: nn.Linear, fmt: str) -> nn.Module | str:
    """`linear` in format `fmt` on its kernel, or the reason no kernel takes it."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    if not isinstance(linear, nn.Linear):
        return f"a {type(linear).__name__}, not an nn.Linear"
    if fmt == "fp32":
        return linear
    if fmt == "bf16":
        return CastLinear(linear, torch.bfloat16)
    spec, kernel = _FORMATS[fmt]
    weight = linear.weight.detach()
    quantized = QuantLinear(weight, linear.bias, weight_qparams(weight, spec), spec)  # the engine's data-free grid
    refusal = kernel.refusal(quantized)
    return refusal if refusal is not None else kernel.build(quantized, torch.bfloat16)


def apply_assignment(model: nn.Module, assignment: dict[str, str]) -> nn.Module:
    """A copy of `model` with each named Linear in its assigned format (others unchanged).
    Raises ConfigError naming the layer when its format has no kernel for it."""
    import copy

    result = copy.deepcopy(model)
    for name, fmt in assignment.items():
        module = format_module(result.get_submodule(name), fmt)
        if isinstance(module, str):
            raise ConfigError(f"layer {name!r} cannot be {fmt}: {module}")
        replace_module(result, name, module)
    return result
