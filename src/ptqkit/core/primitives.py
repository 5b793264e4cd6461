"""Pure tensor maths of quantization: parameters from ranges, quantize, dequantize,
fake-quantize, rounding, low-bit packing and error metrics. No modules, no global state.

Integer formats follow ONNX QuantizeLinear: q = clamp(round(x / scale) + zero_point, qmin, qmax)
and x̂ = (q - zero_point) * scale. Float formats (fp8, fp4_e2m1, nf4) are symmetric:
q = nearest representable value of x / scale (saturating), x̂ = q * scale.
"""
from __future__ import annotations

import math

import torch

from ptqkit.core.errors import ConfigError, NonFiniteError
from ptqkit.core.qtypes import FP4_E2M1_MAGNITUDES, Granularity, PerTensor, QType
from ptqkit.core.spec import ROUNDING_MODES, QParams, QuantSpec

__all__ = [
    "check_finite",
    "qparams_from_range",
    "qparams_from_tensor",
    "round_values",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_lowbit",
    "unpack_lowbit",
    "sqnr_db",
    "mse",
]

# Smallest scale ever produced (PyTorch's observers use the same floor): an all-zero or
# constant tensor still gets a valid, positive, finite scale.
MIN_SCALE = float(torch.finfo(torch.float32).eps)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming `what` if `x` holds NaN or Inf."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{what} holds {bad} NaN/Inf value(s) out of {x.numel()}; inputs must be finite")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


# ---- parameters ---------------------------------------------------------------------------
def qparams_from_range(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    qtype: QType,
    *,
    symmetric: bool,
    granularity: Granularity | None = None,
) -> QParams:
    """Scale and zero point that map [min_val, max_val] onto `qtype`.

    The range is first widened to contain 0 so that zero is exactly representable.
    Asymmetric: scale = (max - min) / (qmax - qmin), zero_point = qmin - round(min / scale).
    Symmetric integers: scale = 2·absmax / (qmax - qmin), zero_point = 0 for signed types and
    the mid code (qmin + qmax + 1) // 2 for unsigned ones (PyTorch's convention).
    Float formats: scale = absmax / max_value, zero_point = 0.
    """
    granularity = granularity or PerTensor()
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    check_finite(lo, "range minimum")
    check_finite(hi, "range maximum")
    if (lo > hi).any():
        raise ConfigError(f"range minimum exceeds maximum: min={lo.flatten()[:4].tolist()} max={hi.flatten()[:4].tolist()}")
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if not qtype.is_integer and not symmetric:
        raise ConfigError(f"{qtype.name} is symmetric-only; asymmetric ranges need an integer qtype")
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        if qtype.is_integer:
            scale = 2.0 * absmax / float(qtype.qmax - qtype.qmin)
            mid = 0 if qtype.signed else (int(qtype.qmin) + int(qtype.qmax) + 1) // 2
            zero_point = torch.full_like(scale, mid, dtype=torch.int32)
        else:
            scale = absmax / qtype.max_value
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        scale = torch.clamp(scale, min=MIN_SCALE)
        return QParams(scale, zero_point, qtype, granularity)
    scale = torch.clamp((hi - lo) / float(qtype.qmax - qtype.qmin), min=MIN_SCALE)
    zero_point = torch.clamp(qtype.qmin - torch.round(lo / scale), qtype.qmin, qtype.qmax).to(torch.int32)
    return QParams(scale, zero_point, qtype, granularity)


def qparams_from_tensor(x: torch.Tensor, spec: QuantSpec) -> QParams:
    """Min-max parameters of `x` under `spec`'s qtype, granularity and symmetry."""
    check_finite(x, "tensor to quantize")
    g = spec.granularity
    return qparams_from_range(
        g.reduce(x.detach(), torch.amin),
        g.reduce(x.detach(), torch.amax),
        spec.qtype,
        symmetric=spec.symmetric,
        granularity=g,
    )


# ---- rounding -----------------------------------------------------------------------------
def round_values(
    v: torch.Tensor, mode: str = "half_even", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round to integers: "half_even" (ties to even), "half_away" (ties away from zero) or
    "stochastic" (up with probability equal to the fractional part; unbiased)."""
    if mode == "half_even":
        return torch.round(v)
    if mode == "half_away":
        return torch.sign(v) * torch.floor(torch.abs(v) + 0.5)
    if mode == "stochastic":
        noise = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
        return torch.floor(v + noise)
    raise ConfigError(f"rounding {mode!r} is unknown; valid: {', '.join(ROUNDING_MODES)}")


def _nearest_level_code(v: torch.Tensor, qtype: QType) -> torch.Tensor:
    """Code of the nearest fp4_e2m1 / nf4 level to each element of `v` (already scaled)."""
    if qtype.format == "fp4_e2m1":
        # Sign-magnitude: the code is sign << 3 | magnitude index; ties go to the even index,
        # i.e. the even mantissa, as IEEE round-to-nearest-even does.
        mags = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=v.dtype, device=v.device)
        idx = _nearest_index(v.abs(), mags)
        sign = (v < 0) & (idx > 0)
        return (idx | (sign.to(torch.int64) << 3)).to(torch.uint8)
    levels = qtype.levels().to(dtype=v.dtype, device=v.device)
    return _nearest_index(v, levels).to(torch.uint8)


def _nearest_index(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending `levels`; exact ties go to the even index."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(v, midpoints, right=False)  # midpoint[i-1] < v <= midpoint[i] -> i
    tie = (idx < len(midpoints)) & (v == midpoints[idx.clamp_max(len(midpoints) - 1)])
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def _code_values(qtype: QType, device: torch.device) -> torch.Tensor:
    """Value of every code 0..15 of a 4-bit float format."""
    if qtype.format == "fp4_e2m1":
        mags = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=torch.float32, device=device)
        return torch.cat([mags, -mags])
    return qtype.levels().to(dtype=torch.float32, device=device)


# ---- quantize / dequantize ----------------------------------------------------------------
def quantize(
    x: torch.Tensor,
    qparams: QParams,
    rounding: str = "half_even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize `x`; returns `qparams.qtype.storage_dtype` values (codes for fp4/nf4)."""
    check_finite(x, "tensor to quantize")
    qtype, g = qparams.qtype, qparams.granularity
    work = x.to(_work_dtype(x))
    scale = g.expand(qparams.scale, x.shape).to(work.dtype)
    if not qtype.is_integer:
        if rounding != "half_even":
            raise ConfigError(f"{qtype.name} rounds to nearest-even only, got rounding={rounding!r}")
        v = torch.clamp(work / scale, -qtype.max_value, qtype.max_value)
        if qtype.storage_dtype.is_floating_point:  # fp8: torch's cast rounds to nearest even
            return v.to(torch.float32).to(qtype.storage_dtype)
        return _nearest_level_code(v, qtype)
    zero_point = g.expand(qparams.zero_point, x.shape).to(work.dtype)
    q = round_values(work / scale, rounding, generator) + zero_point
    return torch.clamp(q, qtype.qmin, qtype.qmax).to(qtype.storage_dtype)


def dequantize(q: torch.Tensor, qparams: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map quantized values (as returned by `quantize`) back to real numbers."""
    qtype, g = qparams.qtype, qparams.granularity
    scale = g.expand(qparams.scale, q.shape).to(torch.float32)
    if qtype.is_integer:
        zero_point = g.expand(qparams.zero_point, q.shape).to(torch.float32)
        return ((q.to(torch.float32) - zero_point) * scale).to(dtype)
    if qtype.storage_dtype.is_floating_point:
        return (q.to(torch.float32) * scale).to(dtype)
    values = _code_values(qtype, q.device)[q.to(torch.int64)]
    return (values * scale).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    qparams: QParams,
    rounding: str = "half_even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize, returned in `x`'s dtype (the simulated, "fake-quant" value)."""
    return dequantize(quantize(x, qparams, rounding, generator), qparams, dtype=x.dtype)


# ---- packing ------------------------------------------------------------------------------
def pack_lowbit(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of `bits` (1, 2 or 4) bits into uint8 along the last axis.

    Element i of a byte group goes to bits [i*bits, (i+1)*bits) (low bits first). Signed
    codes are stored in two's complement. The last axis is zero-padded to a whole byte;
    `unpack_lowbit` needs the original length back.
    """
    if bits not in (1, 2, 4):
        raise ConfigError(f"pack_lowbit packs 1, 2 or 4 bits per value, got bits={bits}")
    if codes.is_floating_point():
        raise ConfigError(f"pack_lowbit takes integer codes, got {codes.dtype}")
    per_byte = 8 // bits
    lo, hi = -(2 ** (bits - 1)), 2**bits - 1
    wide = codes.to(torch.int32)
    if wide.numel() and (wide.min() < lo or wide.max() > hi):
        raise ConfigError(
            f"codes in [{wide.min().item()}, {wide.max().item()}] do not fit {bits} bits "
            f"(valid [{lo}, {hi}])"
        )
    length = codes.shape[-1]
    pad = (-length) % per_byte
    unsigned = wide & (2**bits - 1)
    unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    groups = unsigned.unflatten(-1, (-1, per_byte))  # [..., n_bytes, per_byte]
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (groups << shifts).sum(dim=-1).to(torch.uint8)  # [..., n_bytes]


def unpack_lowbit(packed: torch.Tensor, bits: int, length: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_lowbit`: int8 codes (sign-extended if `signed`), last axis `length`."""
    if bits not in (1, 2, 4):
        raise ConfigError(f"unpack_lowbit unpacks 1, 2 or 4 bits per value, got bits={bits}")
    per_byte = 8 // bits
    if packed.dtype != torch.uint8:
        raise ConfigError(f"packed data must be uint8, got {packed.dtype}")
    if not (packed.shape[-1] - 1) * per_byte < length <= packed.shape[-1] * per_byte:
        raise ConfigError(
            f"length {length} does not match {packed.shape[-1]} packed bytes of {per_byte} values each"
        )
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., n_bytes, per_byte]
    values = values.flatten(-2)[..., :length]
    if signed:
        values = torch.where(values >= 2 ** (bits - 1), values - 2**bits, values)
    return values.to(torch.int8 if signed else torch.uint8)


# ---- error metrics ------------------------------------------------------------------------
def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error, computed in float64."""
    diff = reference.detach().to(torch.float64) - approx.detach().to(torch.float64)
    return float(diff.pow(2).mean())


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σ ref² / Σ (ref - approx)²), float64.
    +inf when identical; -inf when the reference is all zeros but the approximation is not, or
    when either holds NaN/Inf (a comparison that cannot pass on NaN)."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - approx.detach().to(torch.float64)).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if not (math.isfinite(noise) and math.isfinite(signal)):
        return -math.inf
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
