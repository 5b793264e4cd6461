"""Shared pieces of the weight-quantization algorithms (RTN, GPTQ): the result type, the
validation of a Linear weight against a `QuantSpec`, quantization parameters with a clip ratio
and an explicit *scale rule*, and integer fake-quantization with per-element parameters.

Scale rules (symmetric, signed integer qtypes only; `absmax = max(|min|, |max|)` after clipping):

| rule     | scale                                | int4 example     | codes used          |
|----------|--------------------------------------|------------------|---------------------|
| "range"  | 2·absmax / (qmax - qmin)             | absmax / 7.5     | [-8, 7], +absmax clipped to 7 |
| "qmax"   | absmax / qmax                        | absmax / 7       | [-7, 7] (never clips)          |
| "qmin"   | absmax / -qmin                       | absmax / 8       | [-8, 7], +absmax clipped to 7 |
| "signed" | max(max / qmax, min / qmin)          | absmax/8 if the extreme is negative, else absmax/7 | never clips |

"range" is what `QuantSpec(symmetric=True)` means everywhere else in ptqkit; with a narrow
qtype (`int4_narrow`, codes [-7, 7]) all four rules coincide at absmax / 7. "signed" is the
positive-scale form of llama.cpp's Q4_0 rule (the largest-magnitude element lands exactly on the
end of the range on its own side). Asymmetric and unsigned specs use "range" only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import literal_values
from ptqkit.core.primitives import MIN_SCALE, check_finite, qparams_from_range, round_values
from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor
from ptqkit.core.spec import QParams, QuantSpec

__all__ = [
    "SCALE_RULES",
    "ScaleRule",
    "WeightQuantResult",
    "check_scale_rule",
    "check_weight_spec",
    "expand_qparams",
    "quant_dequant",
    "clipped_weight_qparams",
]

ScaleRule = Literal["range", "qmax", "qmin", "signed"]
SCALE_RULES: tuple[str, ...] = literal_values(ScaleRule)
_DETERMINISTIC_ROUNDING = ("half_even", "half_away")


@dataclass(frozen=True, kw_only=True)
class WeightQuantResult:
    """Integer weights and their parameters, as a weight algorithm produces them.

    - `codes`: integer codes [out, in] in the original column order (`qtype.storage_dtype`).
    - `qparams`: scale / zero point with `qparams.granularity`'s parameter shape.
    - `dequantized`: (codes - zero_point) · scale [out, in], in the input weight's dtype.
    - `details`: numbers the algorithm wants on record (e.g. the damping GPTQ finally used).
    """

    codes: torch.Tensor
    qparams: QParams
    dequantized: torch.Tensor
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))


def check_weight_spec(w: torch.Tensor, spec: QuantSpec, where: str = "weight") -> None:
    """Validate a Linear weight [out, in] and a spec that weight algorithms can handle:
    an integer qtype, deterministic rounding, and PerTensor, PerChannel(axis=0) or
    PerGroup(size, axis=-1) granularity."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.ndim != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ConfigError(
            f"{where}: expected a floating-point Linear weight [out, in], got {shape}"
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ConfigError(f"{where}: weight of shape {tuple(w.shape)} is empty")
    check_finite(w, where)
    if not isinstance(spec, QuantSpec):
        raise ConfigError(f"{where}: spec must be a QuantSpec, got {type(spec).__name__}")
    if not spec.qtype.is_integer:
        raise ConfigError(
            f"{where}: weight algorithms quantize to integer qtypes, got {spec.qtype.name}; "
            "valid: int2..int8, uint2..uint8 (and their _narrow variants)"
        )
    if spec.rounding not in _DETERMINISTIC_ROUNDING:
        raise ConfigError(
            f"{where}: rounding {spec.rounding!r} is not supported by weight algorithms; "
            f"valid: {', '.join(_DETERMINISTIC_ROUNDING)}"
        )
    g = spec.granularity
    ok = (
        isinstance(g, PerTensor)
        or (isinstance(g, PerChannel) and g.axis in (0, -2))
        or (isinstance(g, PerGroup) and g.axis in (1, -1))
    )
    if not ok:
        raise ConfigError(
            f"{where}: granularity {g!r} is not supported for a Linear weight [out, in]; valid: "
            "PerTensor(), PerChannel(axis=0), PerGroup(size, axis=-1)"
        )


def check_scale_rule(rule: str, spec: QuantSpec | None = None, where: str = "scale_rule") -> None:
    """Raise ConfigError unless `rule` is known and (given a spec) applicable to it."""
    if rule not in SCALE_RULES:
        raise ConfigError(f"{where}: {rule!r} is unknown; valid: {', '.join(SCALE_RULES)}")
    if spec is not None and rule != "range" and not (spec.symmetric and spec.qtype.signed):
        raise ConfigError(
            f"{where}: {rule!r} applies to symmetric signed integer specs only, got "
            f"{spec.qtype.name} symmetric={spec.symmetric}; use scale_rule='range'"
        )


def clipped_weight_qparams(
    w: torch.Tensor,
    spec: QuantSpec,
    clip_ratio: float | torch.Tensor = 1.0,
    *,
    scale_rule: str = "range",
) -> QParams:
    """Quantization parameters of a Linear weight `w` [out, in] under `spec`.

    The per-parameter range [min, max] (one per tensor, output channel or group; a ragged last
    group is allowed) is shrunk by `clip_ratio` (a float, or a tensor broadcastable to the
    parameter shape, in (0, 1]) and turned into scale / zero point by `scale_rule` (see the
    module docstring). Returns float32 scales and int32 zero points of the parameter shape.
    """
    check_weight_spec(w, spec)
    check_scale_rule(scale_rule, spec)
    g = spec.granularity
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32)
    if not torch.isfinite(ratio).all() or (ratio <= 0).any() or (ratio > 1).any():
        raise ConfigError(f"clip_ratio must lie in (0, 1], got {ratio.flatten()[:4].tolist()}")
    lo = g.reduce(w.detach(), torch.amin).to(torch.float32) * ratio  # [param_shape]
    hi = g.reduce(w.detach(), torch.amax).to(torch.float32) * ratio  # [param_shape]
    if scale_rule == "range":
        return qparams_from_range(lo, hi, spec.qtype, symmetric=spec.symmetric, granularity=g)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    qmin, qmax = float(spec.qtype.qmin), float(spec.qtype.qmax)
    absmax = torch.maximum(-lo, hi)
    if scale_rule == "qmax":
        scale = absmax / qmax
    elif scale_rule == "qmin":
        scale = absmax / -qmin
    else:  # "signed": the larger-magnitude extreme lands on its own end of the range
        scale = torch.maximum(hi / qmax, lo / qmin)
    scale = torch.clamp(scale, min=MIN_SCALE)
    return QParams(scale, torch.zeros_like(scale, dtype=torch.int32), spec.qtype, g)


def expand_qparams(qparams: QParams, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (scale, zero_point) as float32 tensors of exactly `shape` [out, in]."""
    g = qparams.granularity
    scale = g.expand(qparams.scale, shape).to(torch.float32).expand(shape)  # [out, in]
    zero = g.expand(qparams.zero_point, shape).to(torch.float32).expand(shape)  # [out, in]
    return scale, zero


def quant_dequant(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: float,
    qmax: float,
    rounding: str = "half_even",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer quantize-dequantize with per-element (broadcastable) parameters, the same
    formula as `primitives.quantize`: q = clamp(round(w / s) + z, qmin, qmax), ŵ = (q - z)·s.
    Returns (q as floats, ŵ) in `w`'s dtype; used inside loops where building QParams
    objects per column would be wasteful."""
    scale = scale.to(w.dtype)
    zero_point = zero_point.to(w.dtype)
    q = torch.clamp(round_values(w / scale, rounding) + zero_point, qmin, qmax)
    return q, (q - zero_point) * scale
