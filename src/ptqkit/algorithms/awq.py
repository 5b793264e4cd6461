"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): the weight channels that meet large activations matter most; scaling those
input channels up before quantization (and the activations down, folded into the previous
norm/linear) shrinks their relative rounding error.

Scale search, per scale group (a source and the projections reading it), with X [n, C] the
calibration inputs and x̄ = mean |X| per channel:

    s(α) = x̄^α / sqrt(max x̄^α · min x̄^α),   α ∈ {0, 1/grid, …, (grid-1)/grid}
    loss(α) = Σ_projections ‖X · (Q(W·s)/s − W)ᵀ‖²

and the α with the smallest loss wins (α = 0 is s = 1, plain RTN, so AWQ never does worse on
the calibration inputs than RTN). The loss is the projections' own output error (the paper
measures the enclosing module's output; this keeps the search local and cheap).

Clip search, per targeted layer: for each quantization group (or output channel) the weight
range is shrunk by r ∈ {1, 1 − max_shrink/clip_grid, …, 1 − max_shrink}, and the r minimising
that group's partial output error Σ_n (X_g (W_g − Q(clip_r(W_g)))ᵀ)² is kept; the weights are
then clamped to it in place, so any later weight quantizer (RTN, GPTQ) sees the clipped range.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Sequence

import torch
from torch import nn

from ptqkit.algorithms.channel_scaling import input_columns, rescale_group_, set_input_columns_
from ptqkit.algorithms.weight_quant import clipped_weight_qparams, expand_qparams, quant_dequant
from ptqkit.core.fields import Interval, check_fields
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.models.mappings import ScaleGroup
from ptqkit.stats.input_stats import InputStatistics, StatsRequest

__all__ = ["AWQConfig", "awq_scales", "awq_search_scales", "awq_clip_ratios", "awq_block_"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """AWQ scale (and clip) search.

    - `grid`: number of exponents α tried (0, 1/grid, …).
    - `clip`: run the clip search after scaling.
    - `clip_grid` / `max_shrink`: clip ratios 1 − max_shrink·k/clip_grid, k = 0..clip_grid.
    - `rows_per_call`: input rows kept from each calibration call for the scale-search loss.
    - `clip_rows`: input rows (of those) used by the clip search.
    """

    grid: Annotated[int, Interval(1, 1000)] = 20
    clip: bool = True
    clip_grid: Annotated[int, Interval(1, 1000)] = 20
    max_shrink: Annotated[float, Interval(0, 1, "[)")] = 0.5
    rows_per_call: Annotated[int, Interval(1, 1 << 20)] = 256
    clip_rows: Annotated[int, Interval(1, 1 << 20)] = 1024
    name: ClassVar[str] = "awq"

    def __post_init__(self) -> None:
        check_fields(self, "awq")

    def stats_request(self) -> StatsRequest:
        return StatsRequest(mean_abs=True, rows_per_call=self.rows_per_call)


def _fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight [out, in] with min-max parameters."""
    qparams = clipped_weight_qparams(w, spec)
    scale, zero = expand_qparams(qparams, w.shape)  # [out, in] each
    return quant_dequant(w, scale, zero, float(spec.qtype.qmin), float(spec.qtype.qmax), spec.rounding)[1]


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x̄^α normalised so that max(s)·min(s) = 1 [C]."""
    s = mean_abs.clamp(min=1e-4).pow(alpha)  # [C]
    return s / (s.max() * s.min()).sqrt()


def awq_search_scales(
    x: torch.Tensor, mean_abs: torch.Tensor, weights: Sequence[torch.Tensor], specs: Sequence[QuantSpec], grid: int
) -> tuple[torch.Tensor, float, list[float]]:
    """The best scales [C] for projections `weights` (each [out_i, C]) reading `x` [n, C];
    returns (scales, best α, loss per α)."""
    losses, best = [], (float("inf"), 0.0, torch.ones_like(mean_abs))
    for k in range(grid):
        alpha = k / grid
        s = awq_scales(mean_abs, alpha)  # [C]
        loss = 0.0
        for w, spec in zip(weights, specs):
            error = _fake_quant(w * s[None, :], spec) / s[None, :] - w  # [out, C]
            loss += float((x @ error.T).pow(2).sum())  # ‖X · errorᵀ‖², X [n, C]
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


def _group_size(spec: QuantSpec, channels: int) -> int | None:
    g = spec.granularity
    if isinstance(g, PerGroup):
        return g.size
    if isinstance(g, PerChannel):
        return channels
    return None


def awq_clip_ratios(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, clip_grid: int, max_shrink: float) -> torch.Tensor | None:
    """Per (output row, group) clip ratio [out, G] minimising the group's partial output error,
    for `w` [out, C] reading `x` [n, C]; None for per-tensor weights (no per-group range)."""
    size = _group_size(spec, w.shape[1])
    if size is None:
        return None
    out, channels = w.shape
    groups = -(-channels // size)
    pad = groups * size - channels
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], groups, size)  # [n, G, size]
    lo, hi = _group_range(w, size)  # [out, G] each
    best_err, best_ratio = None, torch.ones(out, groups)
    for k in range(clip_grid + 1):
        ratio = 1.0 - max_shrink * k / clip_grid
        clipped = _clamp_groups(w, lo * ratio, hi * ratio, size)  # [out, C]
        diff = torch.nn.functional.pad(w - _fake_quant(clipped, spec), (0, pad)).reshape(out, groups, size)  # [out, G, size]
        err = torch.einsum("ngk,ogk->nog", xg, diff).pow(2).sum(0)  # [out, G]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def _group_range(w: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) min and max of `w` [out, C] (a ragged last group allowed): [out, G] each."""
    starts = range(0, w.shape[1], size)
    lo = torch.stack([w[:, i : i + size].amin(1) for i in starts], 1)  # [out, G]
    hi = torch.stack([w[:, i : i + size].amax(1) for i in starts], 1)  # [out, G]
    return lo, hi


def _clamp_groups(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:
    """Clamp `w` [out, C] to per-(row, group) limits lo, hi [out, G]."""
    channels = w.shape[1]
    lo_full = lo.repeat_interleave(size, dim=1)[:, :channels]  # [out, C]
    hi_full = hi.repeat_interleave(size, dim=1)[:, :channels]  # [out, C]
    return torch.minimum(torch.maximum(w, lo_full), hi_full)


@torch.no_grad()
def awq_block_(
    config: AWQConfig,
    modules: dict[str, nn.Module],
    groups: Sequence[ScaleGroup],
    stats: dict[str, InputStatistics],
    specs: dict[str, QuantSpec],
) -> dict[str, Any]:
    """Search and fold AWQ scales for every scale group of one block, then (optionally) clip
    every targeted layer's weights; `stats` follow the rescaled inputs. `specs` holds the
    weight spec of each targeted layer. Returns per-group α and per-layer mean clip ratio."""
    details: dict[str, Any] = {}
    for group in groups:
        targeted = [p for p in group.projections if p in specs]
        if not targeted:
            continue
        first = stats[group.projections[0]]
        weights = [input_columns(modules[p]).detach().float() for p in targeted]
        scales, alpha, _ = awq_search_scales(first.samples, first.mean_abs, weights, [specs[p] for p in targeted], config.grid)
        rescale_group_(modules, group, scales, stats)
        details[group.source] = {"alpha": alpha}
        logger.debug("awq %s: alpha %.2f", group.source, alpha)
    if config.clip:
        for name, spec in specs.items():
            x = stats[name].samples[: config.clip_rows]  # [n, C]
            w = input_columns(modules[name]).detach().float()  # [out, C]
            ratios = awq_clip_ratios(x, w, spec, config.clip_grid, config.max_shrink)
            if ratios is None:
                continue
            size = _group_size(spec, w.shape[1])
            lo, hi = _group_range(w, size)  # [out, G] each
            clipped = _clamp_groups(w, lo * ratios, hi * ratios, size)  # [out, C]
            set_input_columns_(modules[name], clipped.to(modules[name].weight.dtype))
            details[name] = {"mean_clip_ratio": float(ratios.mean())}
    return details
