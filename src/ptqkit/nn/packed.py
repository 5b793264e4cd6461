"""Packed weight-only Linear modules that run on PyTorch's CPU low-bit kernels.

- `Int8WeightOnlyLinear`: `torch._weight_int8pack_mm(x, W_int8 [N, K], scales [N])`, int8
  symmetric per-channel (or per-tensor) weights.
- `Int4WeightOnlyLinear`: `torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`
  with weights packed by `torch._convert_weight_to_int4pack_for_cpu`; grouped 4-bit weights.
  The kernel dequantizes w = (q - 8) * scale + zero with q in [0, 15]; ptqkit's
  w = (c - zero_point) * scale with c in [qmin, qmax] maps to q = c - qmin and
  zero = (qmin + 8 - zero_point) * scale (0 for signed symmetric int4).
- `Int8DynamicLinear`: `torch.ops.quantized.linear_dynamic` (fbgemm / oneDNN), int8 symmetric
  per-channel weights and activations quantized per tensor at run time (w8a8 dynamic). The
  activations take 7 bits ("reduce_range"): with 8 bits, the AVX2 kernel's u8 x s8 pair sums
  saturate int16 and the output is silently wrong; with 7 bits it equals an exact float64
  emulation of the same quantization.
- `CastLinear`: a float Linear run in another dtype (the LLM's kept lm_head in bf16).

Kernel constraints (torch 2.13):
- both kernels take 2-D activations only (inputs are flattened to [M, K] and reshaped back);
- `_weight_int8pack_mm` crashes the process (segfault) when K is not a multiple of 8 on AVX2,
  and with bf16 activations on AVX512-BF16 CPUs when K is not a multiple of 16, so layers with
  K % 16 != 0 are refused before the kernel is called;
- the int4 kernel needs N % 16 == 0, a group size of 32, 64, 128 or 256, and K % group == 0
  (SmolLM2's K = 576 is 4.5 x 128: g128 cannot run there, g64 can);
- activations in float32 made both kernels 8-15x slower than bf16, so bf16 activations are the
  default. Kernel scales are held in the activation dtype, so bf16 rounds them (relative error
  <= 2^-9).
`int8_refusal` / `int4_refusal` say why a module cannot take a kernel (None when it can).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor
from ptqkit.nn.modules import QuantLinear

__all__ = [
    "INT4_GROUP_SIZES",
    "ACTIVATION_DTYPES",
    "Int8WeightOnlyLinear",
    "Int4WeightOnlyLinear",
    "CastLinear",
    "Int8DynamicLinear",
    "int8_dynamic_refusal",
    "int8_refusal",
    "int4_refusal",
    "TorchKernel",
    "WEIGHT_ONLY_KERNELS",
    "DYNAMIC_INT8_KERNEL",
]

INT4_GROUP_SIZES = (32, 64, 128, 256)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _common_refusal(module: QuantLinear) -> str | None:
    if module.input_quantizer is not None:
        return "inputs are quantized too (not weight-only); run W8A8 models through the ONNX exporter"
    if not module.weight_spec.qtype.is_integer:
        return f"weights are {module.weight_spec.qtype.name}, not an integer format"
    return None


def _symmetric_int8_refusal(module: QuantLinear, kernel: str) -> str | None:
    """Why `module`'s weights are not signed int8, symmetric, per channel or per tensor."""
    common = _common_refusal(module)
    if common:
        return common
    spec = module.weight_spec
    if spec.qtype.bits != 8 or not spec.qtype.signed:
        return f"weights are {spec.qtype.name}; the {kernel} kernel takes signed 8-bit codes"
    g = spec.granularity
    if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis in (0, -2))):
        return f"granularity {g.kind} {g.to_dict()}; the {kernel} kernel takes per-channel (axis 0) or per-tensor scales"
    if bool((module.weight_zero_point != 0).any()):
        return f"asymmetric weights (non-zero zero points); the {kernel} kernel has scales only"
    return None


def int8_refusal(module: QuantLinear) -> str | None:
    """Why `module` cannot run on `_weight_int8pack_mm` (None if it can)."""
    reason = _symmetric_int8_refusal(module, "int8")
    if reason is None and module.in_features % 16:
        return f"in_features={module.in_features} is not a multiple of 16 (the int8 kernel crashes on it)"
    return reason


def int8_dynamic_refusal(module: QuantLinear) -> str | None:
    """Why `module`'s weights cannot run on `torch.ops.quantized.linear_dynamic` (None if they can)."""
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return f"torch {torch.__version__} has no torch.ops.quantized.linear_dynamic"
    return _symmetric_int8_refusal(module, "dynamic int8")


def int4_refusal(module: QuantLinear) -> str | None:
    """Why `module` cannot run on `_weight_int4pack_mm_for_cpu` (None if it can)."""
    common = _common_refusal(module)
    if common:
        return common
    spec = module.weight_spec
    if spec.qtype.bits != 4:
        return f"weights are {spec.qtype.name}; the int4 kernel takes 4-bit codes"
    g = spec.granularity
    if not isinstance(g, PerGroup) or g.axis not in (-1, 1):
        return f"granularity {g.kind}; the int4 kernel takes groups along the input dimension (per_group)"
    if g.size not in INT4_GROUP_SIZES:
        return f"group size {g.size}; the int4 kernel takes {', '.join(map(str, INT4_GROUP_SIZES))}"
    if module.in_features % g.size:
        return (
            f"in_features={module.in_features} is not a multiple of the group size {g.size} "
            f"({module.in_features / g.size:g} groups); the int4 kernel needs whole groups"
        )
    if module.out_features % 16:
        return f"out_features={module.out_features} is not a multiple of 16 (int4 kernel packing)"
    return None


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype {dtype} is not supported; valid: {ACTIVATION_DTYPES}")


class _PackedLinear(nn.Module):
    in_features: int
    out_features: int
    activation_dtype: torch.dtype

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.activation_dtype)  # [M, K]
        y = self._run(x2)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # [..., N]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activations={self.activation_dtype}"


class Int8WeightOnlyLinear(_PackedLinear):
    """y = x · (W_int8 · diag(scale))ᵀ + b on `torch._weight_int8pack_mm`."""

    kernel = "int8_weight_only"

    def __init__(self, module: QuantLinear, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        reason = int8_refusal(module)
        if reason is not None:
            raise ValueError(f"{module!r} cannot use the int8 kernel: {reason}")
        _check_dtype(activation_dtype)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.activation_dtype = activation_dtype
        scales = module.weight_scale.reshape(-1).expand(self.out_features)  # [N] (per-tensor broadcast)
        self.register_buffer("weight_int8", module.weight_codes.contiguous().clone())  # [N, K] int8
        self.register_buffer("scales", scales.to(activation_dtype).contiguous())
        bias = module.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(activation_dtype).clone())

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)


class Int4WeightOnlyLinear(_PackedLinear):
    """Grouped 4-bit weights on `torch._weight_int4pack_mm_for_cpu`."""

    kernel = "int4_grouped"

    def __init__(self, module: QuantLinear, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        reason = int4_refusal(module)
        if reason is not None:
            raise ValueError(f"{module!r} cannot use the int4 kernel: {reason}")
        _check_dtype(activation_dtype)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.activation_dtype = activation_dtype
        qtype = module.weight_spec.qtype
        self.group_size = module.weight_spec.granularity.size
        unsigned = (module.weight_codes.to(torch.int32) - int(qtype.qmin)).contiguous()  # [N, K] in [0, 15]
        self.register_buffer("weight_packed", torch._convert_weight_to_int4pack_for_cpu(unsigned, 1))  # [N, K/2] uint8
        scale = module.weight_scale.to(torch.float32)  # [N, G]
        zero = (int(qtype.qmin) + 8 - module.weight_zero_point.to(torch.float32)) * scale  # [N, G]
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [G, N, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(activation_dtype).contiguous())
        bias = module.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(activation_dtype).clone())

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2, self.weight_packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class CastLinear(_PackedLinear):
    """A float Linear whose weight and computation are in `dtype` (e.g. a bf16 lm_head)."""

    kernel = "float_linear"

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_dtype(dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation_dtype = dtype
        self.register_buffer("weight", linear.weight.detach().to(dtype).contiguous().clone())  # [N, K]
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def _run(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x2, self.weight)


class Int8DynamicLinear(nn.Module):
    """y = dequant(quant7(x) · W_int8ᵀ) + b on `torch.ops.quantized.linear_dynamic`: int8 per-channel
    weights, activations quantized per tensor (asymmetric, 7 bits) at every call. Float in, float out."""

    kernel = "int8_dynamic"
    reduce_range = True  # 7-bit activations: 8 bits saturate the AVX2 kernel (module docstring)

    def __init__(self, module: QuantLinear) -> None:
        super().__init__()
        reason = int8_dynamic_refusal(module)
        if reason is not None:
            raise ValueError(f"{module!r} cannot use the dynamic int8 kernel: {reason}")
        self.in_features, self.out_features = module.in_features, module.out_features
        scales = module.weight_scale.reshape(-1).expand(self.out_features).to(torch.float64).contiguous()  # [N]
        codes = module.weight_codes.to(torch.int8).contiguous()  # [N, K]
        with warnings.catch_warnings():  # torch 2.13 warns that quantized tensors will go; the kernel is still the one here
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(codes, scales, torch.zeros(self.out_features, dtype=torch.long), 0)
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        self._packed = torch.ops.quantized.linear_prepack(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # [M, K]
        y = torch.ops.quantized.linear_dynamic(x2, self._packed, self.reduce_range)  # [M, N]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activations=int8 per tensor (7 bits, dynamic)"


@dataclass(frozen=True)
class TorchKernel:
    """One packed torch CPU kernel for a QuantLinear: `refusal(module)` says why it cannot take a
    layer (None when it can), `build(module, activation_dtype)` packs the layer onto it. The one
    kernel table: `export.pack` and the mixed-precision formats both choose from it."""

    name: str
    refusal: Callable[[QuantLinear], str | None]
    build: Callable[[QuantLinear, torch.dtype], nn.Module]


WEIGHT_ONLY_KERNELS: dict[int, TorchKernel] = {  # weight bits -> kernel; activations stay float
    8: TorchKernel("int8_weight_only", int8_refusal, Int8WeightOnlyLinear),
    4: TorchKernel("int4_weight_only", int4_refusal, Int4WeightOnlyLinear),
}
DYNAMIC_INT8_KERNEL = TorchKernel("int8_dynamic", int8_dynamic_refusal, lambda module, activation_dtype: Int8DynamicLinear(module))
