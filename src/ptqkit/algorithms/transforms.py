"""The pre-transforms' handlers: function-preserving rewrites of the float model before
calibration (BatchNorm folding, cross-layer equalization), and the context they share.

`TransformContext` carries one example batch (CLE's chain capture for models torch.fx cannot
trace) and the output model of each folded layer, which bn_fold records and cle rescales (for
analytic bias correction)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ptqkit.algorithms.analytic_bias import (
    ChannelGaussian,
    batchnorm_gaussians,
    equalized_gaussians,
)
from ptqkit.algorithms.bn_fold import BNFoldConfig, find_fold_pairs, fold_batchnorm_
from ptqkit.algorithms.cle import CLEConfig, equalize_

__all__ = ["TransformContext", "equalize_model", "fold_model"]


@dataclass(frozen=True)
class TransformContext:
    """What pre-transforms read and record: `example`, one calibration batch or None, and
    `gaussians`, each folded layer's output model (filled by bn_fold, rescaled by cle)."""

    example: Any = None
    gaussians: dict[str, ChannelGaussian] = field(default_factory=dict)


def fold_model(model: nn.Module, config: BNFoldConfig, context: TransformContext) -> None:
    """Fold every BatchNorm into the layer before it, recording each folded layer's output model."""
    pairs = find_fold_pairs(model)
    context.gaussians.update(batchnorm_gaussians(model, pairs))
    fold_batchnorm_(model, pairs)


def equalize_model(model: nn.Module, config: CLEConfig, context: TransformContext) -> None:
    """Cross-layer equalization, rescaling the recorded output models with the layers."""
    results = equalize_(model, config=config, example=context.example)
    context.gaussians.update(equalized_gaussians(context.gaussians, results))
