"""Bias correction: remove the mean shift that weight quantization adds to a layer's output.

With quantized weights W̃ = W + ΔW, the output error is ΔW x, whose expectation E[ΔW x] =
ΔW E[x] is a systematic per-output-channel shift (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", section 4.2; the seeds' b_new = b_old +
(μ_fp − μ_int)). Adding

    c = -ΔW · E[x]                                   (one value per output channel)

to the bias makes the expected output error zero. E[x] comes either from calibration data
(empirical: the per-input-channel mean of the layer's inputs) or, data-free, from the
BatchNorm before the layer: its output is modelled as N(β, γ²) per channel, passed through the
activation (ReLU / ReLU6 / identity), whose expectation has a closed form (clipped normal).

Convolutions: E[x] is one mean per input channel (assumed the same at every spatial position),
so ΔW is summed over kernel positions: c_o = -Σ_j (Σ_k ΔW[o, j, k]) E[x_{group(o), j}]. With zero
padding this is exact for output positions whose window lies inside the input; at the border
some taps read padding zeros instead of E[x], so the true mean shift there is smaller — the
correction slightly overcorrects border outputs (the usual approximation; exact with padding=0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import check_fields, literal_values
from ptqkit.core.primitives import check_finite

__all__ = [
    "BiasCorrectionConfig",
    "ACTIVATIONS",
    "empirical_bias_correction",
    "output_mean_correction",
    "clipped_normal_mean",
    "expected_activation_from_bn",
    "analytic_bias_correction",
]

ACTIVATIONS = ("identity", "relu", "relu6")
BiasCorrectionMode = Literal["empirical", "analytic"]
BIAS_CORRECTION_MODES: tuple[str, ...] = literal_values(BiasCorrectionMode)


@dataclass(frozen=True, kw_only=True)
class BiasCorrectionConfig:
    """Bias correction after weight quantization.

    - `mode`: "empirical" (E[x] from calibration data) or "analytic" (E[x] from the preceding
      BatchNorm's β, γ and activation; data-free)."""

    mode: BiasCorrectionMode = "empirical"

    def __post_init__(self) -> None:
        check_fields(self, "bias_correction")


def empirical_bias_correction(
    delta_w: torch.Tensor, mean_input: torch.Tensor, *, groups: int = 1
) -> torch.Tensor:
    """The bias correction c = -ΔW · E[x], one value per output channel [out].

    `delta_w` = W̃ - W: [out, in] for Linear or [out, in / groups, *kernel] for a convolution
    (grouped and depthwise included). `mean_input` [in]: the expected input per input channel
    (the last axis of a Linear's input, axis 1 of a convolution's). Computed in float64,
    returned as float32."""
    if not isinstance(delta_w, torch.Tensor) or not delta_w.is_floating_point() or delta_w.ndim < 2:
        shape = tuple(delta_w.shape) if isinstance(delta_w, torch.Tensor) else type(delta_w).__name__
        raise ConfigError(f"bias correction: delta_w must be a floating weight [out, in, ...], got {shape}")
    out, per_group = delta_w.shape[0], delta_w.shape[1]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or out % groups:
        raise ConfigError(f"bias correction: groups={groups!r} must be a positive integer dividing {out} output channels")
    if mean_input.shape != (per_group * groups,):
        raise ConfigError(
            f"bias correction: mean_input has shape {tuple(mean_input.shape)}, expected "
            f"({per_group * groups},) for delta_w {tuple(delta_w.shape)} with groups={groups}"
        )
    check_finite(delta_w, "bias correction delta_w")
    check_finite(mean_input, "bias correction mean_input")
    dw = delta_w.to(torch.float64).reshape(out, per_group, -1).sum(dim=2)  # [out, in/g] summed over kernel taps
    dw = dw.reshape(groups, out // groups, per_group)  # [g, out/g, in/g]
    ex = mean_input.to(torch.float64).reshape(groups, per_group, 1)  # [g, in/g, 1]
    shift = torch.bmm(dw, ex).reshape(out)  # [g, out/g, 1] -> [out]
    return (-shift).to(torch.float32)


def output_mean_correction(mean_fp: torch.Tensor, mean_quant: torch.Tensor) -> torch.Tensor:
    """The seeds' form: c = μ_fp - μ_int, from per-channel output means of the FP and the
    quantized layer on the same data (equal to -ΔW·E[x] for a layer without padding)."""
    if mean_fp.shape != mean_quant.shape:
        raise ConfigError(
            f"bias correction: output means have shapes {tuple(mean_fp.shape)} and {tuple(mean_quant.shape)}"
        )
    check_finite(mean_fp, "FP output mean")
    check_finite(mean_quant, "quantized output mean")
    return (mean_fp.to(torch.float64) - mean_quant.to(torch.float64)).to(torch.float32)


def _normal_pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def clipped_normal_mean(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    lower: float | torch.Tensor = 0.0,
    upper: float | torch.Tensor = math.inf,
) -> torch.Tensor:
    """E[clamp(X, lower, upper)] for X ~ N(mu, sigma²), elementwise, in float64. The bounds are
    numbers or per-element tensors (CLE's clipped ReLU has one upper bound per channel); ±inf
    means unbounded.

    With a = (lower - mu)/σ, b = (upper - mu)/σ, Φ the normal CDF and φ its density:
    E = lower·Φ(a) + upper·(1 - Φ(b)) + mu·(Φ(b) - Φ(a)) + σ·(φ(a) - φ(b)); for ReLU
    (lower 0, upper ∞) this is mu·Φ(mu/σ) + σ·φ(mu/σ), the DFQ paper's expression. σ = 0
    gives clamp(mu, lower, upper)."""
    f64 = torch.float64
    mu = torch.as_tensor(mu, dtype=f64)
    sigma = torch.as_tensor(sigma, dtype=f64).abs()
    check_finite(mu, "clipped_normal_mean mu")
    check_finite(sigma, "clipped_normal_mean sigma")
    low = torch.as_tensor(lower, dtype=f64).expand_as(mu)
    high = torch.as_tensor(upper, dtype=f64).expand_as(mu)
    if not bool((low < high).all()):  # NaN bounds fail here too
        where = "" if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) else " (per element)"
        raise ConfigError(f"clipped_normal_mean: lower={lower!r} must be below upper={upper!r}{where}")
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    a, b = (low - mu) / safe, (high - mu) / safe  # ±inf at unbounded sides
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    low_term = torch.where(low.isinf(), 0.0, low * cdf_a)  # Φ(-inf) = 0 takes the -inf bound's term
    high_term = torch.where(high.isinf(), 0.0, high * (1.0 - cdf_b))
    result = low_term + high_term + mu * (cdf_b - cdf_a) + safe * (_normal_pdf(a) - _normal_pdf(b))
    return torch.where(sigma > 0, result, torch.minimum(torch.maximum(mu, low), high))


def expected_activation_from_bn(
    bn_beta: torch.Tensor, bn_gamma: torch.Tensor, activation: str
) -> torch.Tensor:
    """E[act(y)] per channel with y ~ N(β, γ²), the BatchNorm's output model: [C] float64."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"analytic bias correction: activation {activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")
    if bn_beta.shape != bn_gamma.shape or bn_beta.ndim != 1:
        raise ConfigError(
            f"analytic bias correction: bn_beta {tuple(bn_beta.shape)} and bn_gamma "
            f"{tuple(bn_gamma.shape)} must be equal 1-D shapes [C]"
        )
    if activation == "identity":
        check_finite(bn_beta, "bn_beta")
        return bn_beta.to(torch.float64)
    upper = 6.0 if activation == "relu6" else math.inf
    return clipped_normal_mean(bn_beta, bn_gamma, 0.0, upper)


def analytic_bias_correction(
    delta_w: torch.Tensor,
    bn_beta: torch.Tensor,
    bn_gamma: torch.Tensor,
    activation: str,
    *,
    groups: int = 1,
) -> torch.Tensor:
    """Data-free bias correction: -ΔW · E[act(N(β, γ²))], with β, γ of the BatchNorm that
    feeds this layer through `activation` ("identity", "relu", "relu6"). Returns [out] float32."""
    expected = expected_activation_from_bn(bn_beta, bn_gamma, activation)
    return empirical_bias_correction(delta_w, expected, groups=groups)
