"""A slow float64 GPTQ written straight from the paper, as an independent reference.

Frantar et al. 2022, section 3 / eq. (2)-(3): quantize one column q of W at a time; with
H_F⁻¹ the inverse Hessian restricted to the not-yet-quantized columns F,

    δ_F = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:, q}          (weight update)
    H_{F\\q}⁻¹ = H_F⁻¹ - (H_F⁻¹)_{:, q} (H_F⁻¹)_{q, :} / [H_F⁻¹]_qq     (Gaussian elimination of q)

No lazy batching, no Cholesky factor: the inverse is formed once with numpy and then updated
explicitly by the elimination formula after every column. Quantization grids are written here
from the textbook formulas, not from ptqkit: symmetric signed scale = 2·absmax/(qmax - qmin),
asymmetric scale = (max - min)/(qmax - qmin) with zero point qmin - round(min/scale), the range
always widened to contain 0. Scales are rounded to float32 because that is how ptqkit stores
them (QParams); `round_scales_to_float32=False` keeps them float64.

Conventions shared with ptqkit's GPTQ (they are choices, not the paper): dead inputs
(H_ii = 0) get H_ii = 1 and zero weights; damping λ = damp · mean(diag H) after that; with
act_order the order is by decreasing diag(H) (stable); dynamic groups take their grid from the
group's current weights when its first column (in the original order) is reached; static groups
take every grid from the original weights up front.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_gptq", "reference_grid"]


def reference_grid(
    w: np.ndarray, qmin: int, qmax: int, symmetric: bool, round_scales_to_float32: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero_point) of `w` [rows, cols] as float64 arrays [rows]."""
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    eps = float(np.finfo(np.float32).eps)
    if symmetric:
        scale = 2.0 * np.maximum(-lo, hi) / (qmax - qmin)
        if round_scales_to_float32:
            scale = scale.astype(np.float32).astype(np.float64)
        scale = np.maximum(scale, eps)
        zero = np.full_like(scale, 0.0 if qmin < 0 else (qmin + qmax + 1) // 2)
        return scale, zero
    scale = (hi - lo) / (qmax - qmin)
    if round_scales_to_float32:
        scale = scale.astype(np.float32).astype(np.float64)
    scale = np.maximum(scale, eps)
    zero = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    return scale, zero


def reference_gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    *,
    qmin: int,
    qmax: int,
    symmetric: bool,
    group_size: int | None = None,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    round_scales_to_float32: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of `weight` [out, in] with `hessian` [in, in]; returns (codes, dequantized), both
    float64 [out, in] in the original column order."""
    W = np.array(weight, dtype=np.float64)  # [out, in]
    H = np.array(hessian, dtype=np.float64)  # [in, in]
    out_f, in_f = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = np.empty((out_f, in_f))  # per element, filled as grids are decided
    zero = np.empty((out_f, in_f))
    dynamic = group_size is not None and not static_groups
    if not dynamic:
        size = group_size or in_f
        for start in range(0, in_f, size):
            s, z = reference_grid(
                W[:, start : start + size], qmin, qmax, symmetric, round_scales_to_float32
            )
            scale[:, start : start + size] = s[:, None]
            zero[:, start : start + size] = z[:, None]

    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(in_f)
    H = H + damp_percent * np.mean(np.diag(H)) * np.eye(in_f)
    Hinv = np.linalg.inv(H)  # [in, in], the inverse over all still-unquantized columns
    codes = np.empty((out_f, in_f))
    deq = np.empty((out_f, in_f))
    for q in order:
        if dynamic and q % group_size == 0:
            s, z = reference_grid(
                W[:, q : q + group_size], qmin, qmax, symmetric, round_scales_to_float32
            )
            scale[:, q : q + group_size] = s[:, None]
            zero[:, q : q + group_size] = z[:, None]
        w_q = W[:, q].copy()
        codes[:, q] = np.clip(np.round(w_q / scale[:, q]) + zero[:, q], qmin, qmax)
        deq[:, q] = (codes[:, q] - zero[:, q]) * scale[:, q]
        d = Hinv[q, q]
        # δ_F on the columns still to quantize (row q of the eliminated inverse is zero, up to
        # rounding, on columns already quantized; those are never read again: see codes/deq)
        W -= np.outer((w_q - deq[:, q]) / d, Hinv[q, :])
        # eliminate q from the inverse Hessian
        Hinv -= np.outer(Hinv[:, q], Hinv[q, :]) / d
    return codes, deq
