"""AdaRound: learned rounding of a layer's weights (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization").

Each weight is rounded either down or up on the quantization grid: W̃ = s · (clamp(⌊W/s⌋ + h(V)
+ z, qmin, qmax) - z), where h(V) = clamp(sigmoid(V)·(ζ - γ) + γ, 0, 1) is the rectified sigmoid
(ζ = 1.1, γ = -0.1). V is optimized with Adam (β = 0.9, 0.999; ε = 1e-8) to minimize, on cached inputs x of the layer,

    ‖f(W x + b) - f(W̃ x + b)‖² (summed over output channels, averaged over samples and
                                positions)  +  λ · Σ (1 - |2 h(V) - 1|^β)

where f is an optional activation (the paper's "asymmetric reconstruction" through the
non-linearity) and the regularizer, switched on after a warm-up fraction of the iterations,
drives every h(V) to 0 or 1 while β is annealed linearly from beta_range[0] (20) to
beta_range[1] (2). V starts where h(V) equals the fractional part of W/s (so the soft weights
start at W itself). The final codes use hard rounding: up where h(V) ≥ 0.5, i.e. V ≥ 0.
Convolutions on large feature maps train on random conv_patch × conv_patch windows of the output
(one window per step, the same for the batch), computed exactly from the matching window of the
zero-padded input: at 112 × 112 on MobileNetV2 a step is about 10x cheaper, with the same loss
in expectation.
The quantization grid (scale and zero point) is fixed beforehand, e.g. by RTN's min-max or
MSE search (`ptqkit.core.primitives` / `ptqkit.algorithms.rtn`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.algorithms.weight_quant import WeightQuantResult
from ptqkit.core.errors import CalibrationDataError, ConfigError
from ptqkit.core.fields import Above, AtLeast, Interval, check_fields
from ptqkit.core.optim import adam_step_
from ptqkit.core.primitives import check_finite
from ptqkit.core.spec import QParams

__all__ = ["AdaRoundConfig", "ConvGeometry", "ACTIVATIONS", "rectified_sigmoid", "adaround_weight", "layer_output"]

logger = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
ACTIVATIONS = ("identity", "relu", "relu6")


@dataclass(frozen=True, kw_only=True)
class AdaRoundConfig:
    """Adaptive rounding.

    - `iterations`: Adam steps per layer (the paper uses 10,000; 1,000-2,000 is usually enough).
    - `lr`: Adam learning rate on V.
    - `reg_weight`: λ, the weight of the rounding regularizer.
    - `beta_range`: (start, end) of the annealed regularizer exponent β.
    - `warmup`: fraction of the iterations without the regularizer, in [0, 1).
    - `batch_size`: samples of the cached inputs per step.
    - `conv_patch`: side of the random output window convolutions train on per step (0: the
      whole feature map).
    - `seed`: seeds the batch sampling; the result is deterministic for a seed.
    """

    iterations: Annotated[int, Interval(1, 1_000_000)] = 2000
    lr: Annotated[float, Above(0)] = 1e-2
    reg_weight: Annotated[float, AtLeast(0)] = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warmup: Annotated[float, Interval(0, 1, "[)")] = 0.2
    batch_size: Annotated[int, Interval(1, 1_000_000)] = 32
    conv_patch: Annotated[int, Interval(0, 1_000_000)] = 16
    seed: Annotated[int, Interval(0, 2**63 - 1)] = 0

    def __post_init__(self) -> None:
        check_fields(self, "adaround")
        beta = tuple(self.beta_range) if isinstance(self.beta_range, (tuple, list)) else None
        if (
            beta is None
            or len(beta) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < math.inf for b in beta)
            or beta[0] < beta[1]
        ):
            raise ConfigError(
                f"adaround.beta_range: {self.beta_range!r} must be two positive numbers (start, end) with start >= end"
            )
        object.__setattr__(self, "beta_range", (float(beta[0]), float(beta[1])))


@dataclass(frozen=True, kw_only=True)
class ConvGeometry:
    """How a convolution weight is applied (torch.nn.functional.conv2d's arguments)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V)·(ζ - γ) + γ, 0, 1) with ζ = 1.1, γ = -0.1."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in [0, 1) (the warm start): V = -log((ζ - γ)/(h - γ) - 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def _activation(y: torch.Tensor, activation: str | nn.Module) -> torch.Tensor:
    if isinstance(activation, nn.Module):  # e.g. CLE's per-channel clipped ReLU
        return activation(y)
    if activation == "relu":
        return torch.relu(y)
    if activation == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    return y


def layer_output(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, conv: ConvGeometry | None) -> torch.Tensor:
    """W x + b of a Linear [N, ..., out], or of a 2-D convolution [N, out, H', W'] when `conv` is given."""
    if conv is None:
        return F.linear(x, w, bias)  # [B, ..., out]
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)  # [B, out, H', W']


def _check_inputs(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    quant_inputs: torch.Tensor | None,
    qparams: QParams,
    conv: ConvGeometry | None,
    activation: str | nn.Module,
) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ConfigError(f"adaround: weight must be a floating tensor, got {type(weight).__name__}")
    want = 4 if conv is not None else 2
    if weight.ndim != want:
        kind = "Conv2d [out, in/groups, kh, kw]" if conv is not None else "Linear [out, in]"
        raise ConfigError(f"adaround: expected a {kind} weight, got shape {tuple(weight.shape)}")
    check_finite(weight, "adaround weight")
    if not qparams.qtype.is_integer:
        raise ConfigError(f"adaround: rounds onto integer grids only, got {qparams.qtype.name}; valid: int2..int8, uint2..uint8")
    if not isinstance(activation, nn.Module) and activation not in ACTIVATIONS:
        raise ConfigError(f"adaround: activation {activation!r} is unknown; valid: {', '.join(ACTIVATIONS)} or an nn.Module")
    for name, x in (("inputs", inputs), ("quant_inputs", quant_inputs)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CalibrationDataError(f"adaround: {name} must be a non-empty batch [N, ...], got {shape}")
        check_finite(x, f"adaround {name}")
        if conv is None and x.shape[-1] != weight.shape[1]:
            raise CalibrationDataError(
                f"adaround: {name} have {x.shape[-1]} features, the Linear weight {tuple(weight.shape)} needs {weight.shape[1]}"
            )
        if conv is not None and (x.ndim != 4 or x.shape[1] != weight.shape[1] * conv.groups):
            raise CalibrationDataError(
                f"adaround: {name} {tuple(x.shape)} must be [N, {weight.shape[1] * conv.groups}, H, W] "
                f"for the conv weight {tuple(weight.shape)} with groups={conv.groups}"
            )
    if quant_inputs is not None and quant_inputs.shape != inputs.shape:
        raise CalibrationDataError(
            f"adaround: quant_inputs {tuple(quant_inputs.shape)} must match inputs {tuple(inputs.shape)}"
        )


class _Windows:
    """Training inputs and targets per step: whole samples, or for a convolution whose output is
    larger than `patch`, one random patch × patch output window and the input window that
    produces it exactly (the input is zero-padded once, so the window's conv needs no padding)."""

    def __init__(self, x_q: torch.Tensor, target: torch.Tensor, conv: ConvGeometry | None, kernel: tuple[int, ...], patch: int) -> None:
        self.x_q, self.target, self.conv, self.patch = x_q, target, conv, patch
        self.windowed = conv is not None and patch > 0 and max(target.shape[-2:]) > patch
        if self.windowed:
            assert conv is not None
            (ph, pw), (self.kh, self.kw) = conv.padding, kernel
            self.padded = F.pad(x_q, (pw, pw, ph, ph))  # [N, C, H + 2ph, W + 2pw]
            self.geometry = ConvGeometry(stride=conv.stride, padding=(0, 0), dilation=conv.dilation, groups=conv.groups)

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, ConvGeometry | None]:
        if not self.windowed:
            return self.x_q[idx], self.target[idx], self.conv
        out_h, out_w = self.target.shape[-2:]
        ph, pw = min(self.patch, out_h), min(self.patch, out_w)
        oy = int(torch.randint(0, out_h - ph + 1, (1,), generator=gen))
        ox = int(torch.randint(0, out_w - pw + 1, (1,), generator=gen))
        (sh, sw), (dh, dw) = self.geometry.stride, self.geometry.dilation
        span_h = (ph - 1) * sh + dh * (self.kh - 1) + 1  # input rows one output window reads
        span_w = (pw - 1) * sw + dw * (self.kw - 1) + 1
        x = self.padded[idx, :, oy * sh : oy * sh + span_h, ox * sw : ox * sw + span_w]  # [B, C, span_h, span_w]
        return x, self.target[idx, :, oy : oy + ph, ox : ox + pw], self.geometry


@dataclass(frozen=True)
class _Grid:
    """The weight on its fixed quantization grid: ⌊W/s⌋ and the rest in [0, 1) that is rounded
    down (0) or up (1), soft (h(V)) while learning."""

    scale: torch.Tensor  # [weight shape]
    zero: torch.Tensor  # [weight shape]
    qmin: float
    qmax: float
    floor: torch.Tensor  # ⌊W/s⌋ [weight shape]
    rest: torch.Tensor  # W/s - ⌊W/s⌋, in [0, 1)

    def codes(self, up: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.floor + up + self.zero, self.qmin, self.qmax)

    def soft_weight(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.codes(h) - self.zero)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero) * self.scale


def _grid(w: torch.Tensor, qparams: QParams) -> _Grid:
    qtype, g = qparams.qtype, qparams.granularity
    try:
        scale = g.expand(qparams.scale, w.shape).to(torch.float32).expand(w.shape)  # [weight shape]
        zero = g.expand(qparams.zero_point, w.shape).to(torch.float32).expand(w.shape)  # [weight shape]
    except (RuntimeError, ConfigError) as exc:
        raise ConfigError(f"adaround: qparams {g!r} with scale {tuple(qparams.scale.shape)} do not fit weight {tuple(w.shape)}: {exc}") from None
    w_floor = torch.floor(w / scale)  # [weight shape]
    return _Grid(scale, zero, float(qtype.qmin), float(qtype.qmax), w_floor, w / scale - w_floor)


@dataclass(frozen=True)
class _Reconstruction:
    """The objective: f(W̃ x + b) against the float layer's f(W x + b) (`target`), summed over
    output channels and averaged over samples and positions."""

    x_q: torch.Tensor  # the quantized layer's inputs
    target: torch.Tensor  # [N, ...]
    bias: torch.Tensor | None
    conv: ConvGeometry | None
    activation: str | nn.Module

    def output(self, w: torch.Tensor, x: torch.Tensor, conv: ConvGeometry | None) -> torch.Tensor:
        return _activation(layer_output(w, x, self.bias, conv), self.activation)

    def error(self, out: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        return (out - goal).pow(2).sum(dim=1 if self.conv is not None else -1).mean()

    def loss(self, wq: torch.Tensor) -> float:
        """On all inputs, `wq` fixed (no gradient)."""
        with torch.no_grad():
            return float(self.error(self.output(wq, self.x_q, self.conv), self.target))


def _regularizer_beta(it: int, warm: int, config: AdaRoundConfig) -> float:
    """β annealed linearly from beta_range[0] after the warm-up to beta_range[1] at the end."""
    beta_start, beta_end = config.beta_range
    progress = (it - warm) / max(config.iterations - warm, 1)
    return beta_end + (beta_start - beta_end) * (1.0 - progress)


def _learn_rounding(grid: _Grid, problem: _Reconstruction, window: _Windows, n: int, config: AdaRoundConfig) -> torch.Tensor:
    """V after `config.iterations` Adam steps on random batches (and windows) of the `n` inputs."""
    v = _inverse_rectified_sigmoid(grid.rest).clone().requires_grad_(True)
    adam_m, adam_v = torch.zeros_like(v), torch.zeros_like(v)  # Adam moments (β1 0.9, β2 0.999)
    gen = torch.Generator().manual_seed(config.seed)
    warm = int(config.warmup * config.iterations)
    for it in range(config.iterations):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
        x_step, goal, geometry = window.sample(idx, gen)
        h = rectified_sigmoid(v)
        loss = problem.error(problem.output(grid.soft_weight(h), x_step, geometry), goal)
        if it >= warm and config.reg_weight > 0:
            beta = _regularizer_beta(it, warm, config)
            loss = loss + config.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        (grad,) = torch.autograd.grad(loss, v)
        adam_step_(v, grad, adam_m, adam_v, step=it + 1, lr=config.lr)
    return v


def adaround_weight(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    qparams: QParams,
    config: AdaRoundConfig,
    *,
    bias: torch.Tensor | None = None,
    conv: ConvGeometry | None = None,
    activation: str | nn.Module = "identity",
    quant_inputs: torch.Tensor | None = None,
) -> WeightQuantResult:
    """Learn the rounding of `weight` on the grid `qparams` (whose granularity must broadcast
    over the weight: PerTensor or PerChannel(0), or PerGroup along the last axis).

    `inputs` [N, ..., in] (Linear) or [N, C, H, W] (`conv` given) are the layer's cached
    inputs; the target is f(W x + b) with f = `activation` (a name, or the model's own
    activation module, e.g. CLE's per-channel clipped ReLU). `quant_inputs` (same shape), if
    given, feed the quantized layer instead — the outputs of the already-quantized layers
    before it. Returns codes (storage dtype), qparams, dequantized weights and `details`:
    {"loss_nearest", "loss_adaround"} (reconstruction MSE on all inputs with hard rounding),
    {"flipped"} (fraction of codes that differ from round-to-nearest-even's)."""
    if not isinstance(config, AdaRoundConfig):
        raise ConfigError(f"adaround: config must be an AdaRoundConfig, got {type(config).__name__}")
    _check_inputs(weight, inputs, quant_inputs, qparams, conv, activation)
    w = weight.detach().to(torch.float32)
    grid = _grid(w, qparams)
    b = None if bias is None else bias.detach().to(torch.float32)
    x_fp = inputs.detach().to(torch.float32)
    x_q = x_fp if quant_inputs is None else quant_inputs.detach().to(torch.float32)
    with torch.no_grad():
        target = _activation(layer_output(w, x_fp, b, conv), activation)  # [N, ...]
    problem = _Reconstruction(x_q, target, b, conv, activation)
    window = _Windows(x_q, target, conv, tuple(w.shape[-2:]), config.conv_patch)
    v = _learn_rounding(grid, problem, window, x_fp.shape[0], config)

    with torch.no_grad():
        nearest_codes = grid.codes(torch.round(grid.rest))  # half-even, as RTN
        codes_f = grid.codes((v >= 0).to(torch.float32))  # [weight shape]
        dequantized = grid.dequantize(codes_f)
        details = {
            "loss_nearest": problem.loss(grid.dequantize(nearest_codes)),
            "loss_adaround": problem.loss(dequantized),
            "flipped": float((codes_f != nearest_codes).float().mean()),
            "iterations": config.iterations,
        }
    logger.debug("adaround: loss nearest %.4g -> adaround %.4g", details["loss_nearest"], details["loss_adaround"])
    return WeightQuantResult(
        codes=codes_f.to(qparams.qtype.storage_dtype),
        qparams=qparams,
        dequantized=dequantized.to(weight.dtype),
        details=details,
    )
