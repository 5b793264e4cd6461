"""Which recipe algorithms the engine runs, and where: one explicit dict per stage.

- Pre-transforms (function-preserving, in float, before calibration): bn_fold, cle.
- Weight quantizers (how each targeted weight becomes integers): rtn (the default, min-max).
Algorithms that need captured layer inputs or Hessians (gptq, adaround, bias_correction) have
their maths in this package but are not run by the engine yet: a recipe naming them is refused
with a ConfigError rather than silently ignored.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ptqkit.algorithms.bn_fold import BNFoldConfig, fold_batchnorm_
from ptqkit.algorithms.cle import CLEConfig, equalize_
from ptqkit.algorithms.rtn import RTNConfig, rtn_qparams
from ptqkit.errors import ConfigError
from ptqkit.spec import QParams, QuantSpec

__all__ = ["PRE_TRANSFORMS", "WEIGHT_QUANTIZERS", "split_algorithms", "quantize_weight_params"]

PRE_TRANSFORMS: dict[type, Callable[[nn.Module, Any], Any]] = {
    BNFoldConfig: lambda model, config: fold_batchnorm_(model),
    CLEConfig: lambda model, config: equalize_(model, config=config),
}
WEIGHT_QUANTIZERS: dict[type, Callable[[torch.Tensor, QuantSpec, Any], QParams]] = {
    RTNConfig: lambda weight, spec, config: rtn_qparams(weight, spec, config),
}


def split_algorithms(algorithms: Sequence[Any]) -> tuple[list[Any], Any | None]:
    """(pre-transforms in recipe order, the weight quantizer config or None)."""
    pre, weights = [], []
    for index, config in enumerate(algorithms):
        if type(config) in PRE_TRANSFORMS:
            if weights:
                raise ConfigError(f"algorithms[{index}] ({type(config).__name__}) is a pre-transform; list it before the weight quantizer")
            pre.append(config)
        elif type(config) in WEIGHT_QUANTIZERS:
            weights.append(config)
        else:
            runnable = sorted(c.__name__ for c in (*PRE_TRANSFORMS, *WEIGHT_QUANTIZERS))
            raise ConfigError(
                f"algorithms[{index}]: {type(config).__name__} is not run by the engine yet; "
                f"runnable: {runnable}"
            )
    if len(weights) > 1:
        raise ConfigError(f"algorithms: {len(weights)} weight quantizers given; use one")
    return pre, (weights[0] if weights else None)


def quantize_weight_params(weight: torch.Tensor, spec: QuantSpec, config: Any) -> QParams:
    """QParams of a weight [out, ...] by the configured weight quantizer (on its [out, -1] view
    for convolutions, whose per-channel parameters are the same)."""
    flat = weight.reshape(weight.shape[0], -1) if weight.ndim > 2 else weight  # [out, in·k·k]
    return WEIGHT_QUANTIZERS[type(config)](flat, spec, config)
