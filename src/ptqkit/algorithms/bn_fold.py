"""Batch-norm folding: merge an eval-mode BatchNorm into the Conv/Linear layer before it.

For a layer y = W x + b followed by BN(y) = γ (y - μ) / sqrt(σ² + ε) + β, per output channel c:

    k_c  = γ_c / sqrt(σ²_c + ε)
    W'_c = k_c · W_c          (the whole slice of W producing output channel c)
    b'_c = k_c · (b_c - μ_c) + β_c

Output channels are dimension 0 of the weight for Linear [out, in] and for Conv1d/2d/3d
[out, in / groups, *kernel] — grouped and depthwise convolutions included — so one formula
covers them all. The maths runs in float64 and is cast back to the weight's dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.core.primitives import check_finite
from ptqkit.models.mappings import resolve_fold_pairs
from ptqkit.nn.tree import replace_module

__all__ = ["BNFoldConfig", "FoldedPair", "fold_batchnorm", "fold_batchnorm_", "find_fold_pairs"]

logger = logging.getLogger(__name__)

_FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True, kw_only=True)
class BNFoldConfig:
    """Fold every eval-mode BatchNorm into the layer before it (no options: the transform is
    exact). Registered so that recipes can list it among their pre-transforms."""


@dataclass(frozen=True, kw_only=True)
class FoldedPair:
    """A layer and the BatchNorm folded into it (full module names)."""

    layer: str
    bn: str


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_gamma: torch.Tensor | None,
    bn_beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the layer with the BatchNorm after it folded in.

    `weight` is [out, ...] (Linear or any Conv, grouped included); `bias` [out] or None
    (zero); the BN statistics are [out]; `bn_gamma` / `bn_beta` None mean an affine-free BN
    (γ = 1, β = 0). Returns (weight [out, ...], bias [out]) in `weight`'s dtype.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim < 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"fold_batchnorm: weight must be a floating tensor [out, ...] with >= 2 dims, got {shape}")
    out = weight.shape[0]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ConfigError(f"fold_batchnorm: eps must be a number >= 0, got {eps!r}")
    named = {"bias": bias, "bn_mean": bn_mean, "bn_var": bn_var, "bn_gamma": bn_gamma, "bn_beta": bn_beta}
    for name, t in named.items():
        if t is None:
            if name in ("bn_mean", "bn_var"):
                raise ConfigError(f"fold_batchnorm: {name} is required (a BN without running statistics cannot be folded)")
            continue
        if t.shape != (out,):
            raise ConfigError(
                f"fold_batchnorm: {name} has shape {tuple(t.shape)}, expected ({out},) — one value per "
                f"output channel of the weight {tuple(weight.shape)}"
            )
        check_finite(t, f"fold_batchnorm {name}")
    check_finite(weight, "fold_batchnorm weight")
    if (bn_var < 0).any():
        raise ConfigError(f"fold_batchnorm: bn_var must be >= 0, got min {bn_var.min().item()!r}")
    if eps == 0 and (bn_var == 0).any():
        raise ConfigError("fold_batchnorm: bn_var has zeros and eps is 0: the BN divides by zero")
    f64 = torch.float64
    gamma = bn_gamma.to(f64) if bn_gamma is not None else torch.ones(out, dtype=f64)
    beta = bn_beta.to(f64) if bn_beta is not None else torch.zeros(out, dtype=f64)
    b = bias.to(f64) if bias is not None else torch.zeros(out, dtype=f64)
    k = gamma / torch.sqrt(bn_var.to(f64) + eps)  # [out]
    w = weight.to(f64) * k.reshape((out,) + (1,) * (weight.ndim - 1))  # [out, ...] * [out, 1, ...]
    new_bias = k * (b - bn_mean.to(f64)) + beta  # [out]
    return w.to(weight.dtype), new_bias.to(weight.dtype)


def find_fold_pairs(model: nn.Module) -> list[FoldedPair]:
    """(layer, bn) pairs that can be folded: consecutive children of every `nn.Sequential`
    (a Conv/Linear directly followed by a BatchNorm, as in torchvision's Conv2dNormActivation)
    and the pairs the mapping table lists for blocks that keep them as attributes."""
    pairs: list[FoldedPair] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (n1, m1), (n2, m2) in zip(children, children[1:]):
            if isinstance(m1, _FOLDABLE_LAYERS) and isinstance(m2, _BATCH_NORMS):
                prefix = f"{name}." if name else ""
                pairs.append(FoldedPair(layer=prefix + n1, bn=prefix + n2))
    seen = set(pairs)
    for row in resolve_fold_pairs(model):
        pair = FoldedPair(layer=row.layer, bn=row.bn)
        if pair not in seen and isinstance(model.get_submodule(row.bn), _BATCH_NORMS):
            pairs.append(pair)
            seen.add(pair)
    return pairs


def _check_pair(layer: nn.Module, bn: nn.Module, pair: FoldedPair) -> None:
    if not isinstance(layer, _FOLDABLE_LAYERS):
        raise ConfigError(
            f"cannot fold {pair.bn!r} into {pair.layer!r}: it is a {type(layer).__name__}; "
            "valid layers: Linear, Conv1d, Conv2d, Conv3d"
        )
    if bn.training:
        raise ConfigError(
            f"cannot fold {pair.bn!r}: it is in training mode (it would normalize with batch "
            "statistics); call model.eval() first"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(
            f"cannot fold {pair.bn!r}: it has no running statistics (track_running_stats=False)"
        )
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise ConfigError(
            f"cannot fold {pair.bn!r} ({bn.num_features} features) into {pair.layer!r} with {out} "
            "output channels: the pair does not match"
        )


def fold_batchnorm_(model: nn.Module, pairs: list[FoldedPair] | None = None) -> list[FoldedPair]:
    """Fold BatchNorms into the layers before them, in place; each folded BN is replaced by
    `nn.Identity`. `pairs` defaults to `find_fold_pairs(model)`. Returns the pairs folded.

    The model must be in eval mode (folding uses the running statistics)."""
    pairs = find_fold_pairs(model) if pairs is None else list(pairs)
    bns = [p.bn for p in pairs]
    if len(set(bns)) != len(bns):
        twice = sorted({b for b in bns if bns.count(b) > 1})
        raise ConfigError(f"fold pairs name the BatchNorm(s) {twice} more than once; each BN folds into one layer")
    for pair in pairs:
        try:
            layer, bn = model.get_submodule(pair.layer), model.get_submodule(pair.bn)
        except AttributeError as exc:
            raise ConfigError(f"fold pair {pair}: {exc}") from None
        _check_pair(layer, bn, pair)
    folded = []
    for pair in pairs:
        layer, bn = model.get_submodule(pair.layer), model.get_submodule(pair.bn)
        with torch.no_grad():
            w, b = fold_batchnorm(
                layer.weight,
                layer.bias,
                bn.running_mean,
                bn.running_var,
                bn.weight if bn.affine else None,
                bn.bias if bn.affine else None,
                float(bn.eps),
            )
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(b)
        replace_module(model, pair.bn, nn.Identity())
        folded.append(pair)
        logger.debug("folded %s into %s", pair.bn, pair.layer)
    logger.info("folded %d BatchNorm layer(s)", len(folded))
    return folded
