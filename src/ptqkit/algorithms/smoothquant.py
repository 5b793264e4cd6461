"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"): activation outliers live in a few input channels, which makes
per-tensor/per-token int8 activations lossy; dividing channel c of the activation by

    s_c = max|X_c|^α / max|W_c|^(1-α)        (W_c: column c of every projection reading X)

and multiplying the weights' column c by s_c moves part of the difficulty into the weights,
which per-channel int8 absorbs easily. α = 0.5 balances the two; larger α migrates more.
The division is folded into the preceding norm (or Linear), so the float model is unchanged.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ptqkit.algorithms.channel_scaling import input_columns, rescale_group_
from ptqkit.core.errors import ConfigError
from ptqkit.models.mappings import ScaleGroup
from ptqkit.stats.input_stats import InputStatistics, StatsRequest

__all__ = ["SmoothQuantConfig", "smoothing_scales", "smoothquant_block_"]

logger = logging.getLogger(__name__)


def _check_alpha(alpha: Any, where: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{where}: alpha must be a number in [0, 1], got {alpha!r}")


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
    """SmoothQuant migration strength.

    - `alpha`: the migration exponent in [0, 1] (0.5 in the paper for most models).
    - `alpha_overrides`: (glob on the source module's name, alpha) pairs; the first match wins,
      e.g. `[["*.post_attention_layernorm", 0.8]]`.
    - `min_scale`: scales are clamped to at least this (channels that never fire).
    """

    alpha: float = 0.5
    alpha_overrides: tuple[tuple[str, float], ...] = ()
    min_scale: float = 1e-5
    name: ClassVar[str] = "smoothquant"

    def __post_init__(self) -> None:
        _check_alpha(self.alpha, "smoothquant.alpha")
        pairs = []
        for i, pair in enumerate(self.alpha_overrides):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
                raise ConfigError(f"smoothquant.alpha_overrides[{i}]: expected [glob, alpha], got {pair!r}")
            _check_alpha(pair[1], f"smoothquant.alpha_overrides[{i}]")
            pairs.append((pair[0], float(pair[1])))
        object.__setattr__(self, "alpha_overrides", tuple(pairs))
        if not 0.0 < self.min_scale < 1.0:
            raise ConfigError(f"smoothquant.min_scale must lie in (0, 1), got {self.min_scale!r}")

    def alpha_for(self, source: str) -> float:
        for pattern, alpha in self.alpha_overrides:
            if fnmatch.fnmatchcase(source, pattern):
                return alpha
        return self.alpha

    def stats_request(self) -> StatsRequest:
        return StatsRequest(absmax=True)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, min_scale: float = 1e-5) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per channel [C]; channels with a zero range get s = 1."""
    act = act_absmax.double()  # [C]
    weight = weight_absmax.double()  # [C]
    scales = act.pow(alpha) / weight.pow(1.0 - alpha)  # [C]
    dead = (act == 0) | (weight == 0) | ~torch.isfinite(scales)
    scales = torch.where(dead, torch.ones_like(scales), scales).clamp(min=min_scale)
    return scales.float()


def weight_column_absmax(projections: Sequence[nn.Module]) -> torch.Tensor:
    """max |W_c| over the columns c of every projection [C]."""
    return torch.stack([input_columns(p).detach().abs().amax(0).float() for p in projections]).amax(0)  # [C]


@torch.no_grad()
def smoothquant_block_(
    config: SmoothQuantConfig,
    modules: dict[str, nn.Module],
    groups: Sequence[ScaleGroup],
    stats: dict[str, InputStatistics],
) -> dict[str, Any]:
    """Smooth every scale group of one block in place; `stats[p]` (the projections' input
    statistics) are updated to the smoothed inputs. Returns {source: {alpha, max scale}}."""
    details = {}
    for group in groups:
        first = stats[group.projections[0]]
        alpha = config.alpha_for(group.source)
        scales = smoothing_scales(first.absmax, weight_column_absmax([modules[p] for p in group.projections]), alpha, config.min_scale)
        rescale_group_(modules, group, scales, stats)
        details[group.source] = {"alpha": alpha, "max_scale": float(scales.max()), "min_scale": float(scales.min())}
        logger.debug("smoothquant %s: alpha %.2f, scales in [%.3g, %.3g]", group.source, alpha, scales.min(), scales.max())
    return details
