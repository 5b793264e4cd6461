"""Which recipe algorithms the engine runs, and where: one explicit dict per stage.

1. Pre-transforms (function-preserving, in float, before calibration): bn_fold, cle. They see a
   `TransformContext`: one example batch (CLE's chain capture for models torch.fx cannot trace)
   and the output model of each folded layer that they record and update (for analytic bias
   correction).
2. Block transforms (function-preserving, in float, from calibration statistics, block by block;
   see `algorithms.blockwise`): smoothquant, awq.
3. The weight quantizer (how each targeted weight becomes integers): rtn (the default, min-max),
   gptq (from each layer's Hessian, block by block) or adaround (learned rounding, layer by
   layer; see `algorithms.layerwise`).
4. Post-corrections after the weights are integers: bias_correction, "empirical" (layer by layer
   on calibration data) or "analytic" (data-free, from the folded BatchNorms; `analytic_bias`).
5. Input decomposition: llm_int8 (outlier input columns stay float per call, dynamic inputs) or
   outlier_channels (calibrated outlier input columns stay float, static inputs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ptqkit.algorithms.adaround import AdaRoundConfig
from ptqkit.algorithms.analytic_bias import (
    ChannelGaussian,
    batchnorm_gaussians,
    equalized_gaussians,
)
from ptqkit.algorithms.awq import AWQConfig
from ptqkit.algorithms.bias_correction import BiasCorrectionConfig
from ptqkit.algorithms.bn_fold import BNFoldConfig, find_fold_pairs, fold_batchnorm_
from ptqkit.algorithms.cle import CLEConfig, equalize_
from ptqkit.algorithms.gptq import GPTQConfig, gptq_quantize_weight
from ptqkit.algorithms.input_smoothing import InputSmoothingConfig
from ptqkit.algorithms.llm_int8 import LLMInt8Config
from ptqkit.algorithms.outlier_channels import OutlierChannelsConfig
from ptqkit.algorithms.rtn import RTNConfig, rtn_qparams, rtn_quantize_weight
from ptqkit.algorithms.smoothquant import SmoothQuantConfig
from ptqkit.algorithms.weight_quant import WeightQuantResult
from ptqkit.core.errors import ConfigError
from ptqkit.core.spec import QParams, QuantSpec

logger = logging.getLogger(__name__)

__all__ = [
    "PRE_TRANSFORMS",
    "BLOCK_TRANSFORMS",
    "WEIGHT_QUANTIZERS",
    "Stages",
    "TransformContext",
    "apply_pre_transforms",
    "split_algorithms",
    "quantize_weight_params",
    "quantize_weight",
]

@dataclass(frozen=True)
class TransformContext:
    """What pre-transforms read and record: `example`, one calibration batch or None, and
    `gaussians`, each folded layer's output model (filled by bn_fold, rescaled by cle)."""

    example: Any = None
    gaussians: dict[str, ChannelGaussian] = field(default_factory=dict)


def _fold(model: nn.Module, config: BNFoldConfig, context: TransformContext) -> None:
    pairs = find_fold_pairs(model)
    context.gaussians.update(batchnorm_gaussians(model, pairs))
    fold_batchnorm_(model, pairs)


def _equalize(model: nn.Module, config: CLEConfig, context: TransformContext) -> None:
    results = equalize_(model, config=config, example=context.example)
    context.gaussians.update(equalized_gaussians(context.gaussians, results))


PRE_TRANSFORMS: dict[type, Callable[[nn.Module, Any, TransformContext], None]] = {
    BNFoldConfig: _fold,
    CLEConfig: _equalize,
}
def apply_pre_transforms(model: nn.Module, configs: Sequence[Any], context: TransformContext | None = None) -> None:
    """Run the pre-transforms `configs` on `model` in order, in place (no autograd). Replaying
    them on a fresh copy of the float model gives the quantized model's module structure and
    its float equivalent: they are deterministic (an example batch only finds CLE chains)."""
    context = context if context is not None else TransformContext()
    with torch.no_grad():
        for config in configs:
            PRE_TRANSFORMS[type(config)](model, config, context)
            logger.info("pre-transform %s applied", type(config).__name__)


BLOCK_TRANSFORMS: tuple[type, ...] = (SmoothQuantConfig, AWQConfig)  # run by algorithms.blockwise
WEIGHT_QUANTIZERS: dict[type, Callable[[torch.Tensor, QuantSpec, Any], QParams]] = {
    RTNConfig: lambda weight, spec, config: rtn_qparams(weight, spec, config),
}
HESSIAN_QUANTIZERS: tuple[type, ...] = (GPTQConfig,)  # need each layer's Hessian: block by block
LAYER_QUANTIZERS: tuple[type, ...] = (AdaRoundConfig,)  # reconstruct each layer's output: layer by layer
POST_CORRECTIONS: tuple[type, ...] = (BiasCorrectionConfig,)  # after the weights are integers, layer by layer
INPUT_DECOMPOSITIONS: tuple[type, ...] = (LLMInt8Config, OutlierChannelsConfig, InputSmoothingConfig)  # change how inputs are quantized


@dataclass(frozen=True)
class Stages:
    """A recipe's algorithms sorted into the engine's stages (each keeps recipe order)."""

    pre_transforms: tuple[Any, ...] = ()
    block_transforms: tuple[Any, ...] = ()
    weight_quantizer: Any = None
    post_corrections: tuple[Any, ...] = ()
    input_decompositions: tuple[Any, ...] = ()  # at most one of each kind

    def input_decomposition(self, kind: type) -> Any:
        """The recipe's input decomposition of type `kind`, or None."""
        return next((c for c in self.input_decompositions if isinstance(c, kind)), None)

    @property
    def blockwise(self) -> bool:
        """Whether the model must be run block by block on calibration data."""
        return bool(self.block_transforms) or isinstance(self.weight_quantizer, HESSIAN_QUANTIZERS)

    @property
    def layerwise(self) -> bool:
        """Whether the model must be run layer by layer on calibration data."""
        return bool(self.data_corrections) or isinstance(self.weight_quantizer, LAYER_QUANTIZERS)

    @property
    def data_corrections(self) -> tuple[Any, ...]:
        """The post-corrections computed from calibration data (layer by layer)."""
        return tuple(c for c in self.post_corrections if not _is_analytic(c))

    @property
    def analytic_correction(self) -> Any:
        """The data-free bias correction, or None."""
        return next((c for c in self.post_corrections if _is_analytic(c)), None)


def _is_analytic(config: Any) -> bool:
    return isinstance(config, BiasCorrectionConfig) and config.mode == "analytic"


def _stage_of(config: Any) -> int:
    if type(config) in PRE_TRANSFORMS:
        return 0
    if type(config) in BLOCK_TRANSFORMS:
        return 1
    if type(config) in WEIGHT_QUANTIZERS or type(config) in HESSIAN_QUANTIZERS or type(config) in LAYER_QUANTIZERS:
        return 2
    if type(config) in POST_CORRECTIONS:
        return 3
    if type(config) in INPUT_DECOMPOSITIONS:
        return 4
    return -1


_STAGE_NAMES = ("a pre-transform", "a block transform", "a weight quantizer", "a post-correction", "an input decomposition")
_ALL = (
    *PRE_TRANSFORMS, *BLOCK_TRANSFORMS, *WEIGHT_QUANTIZERS, *HESSIAN_QUANTIZERS, *LAYER_QUANTIZERS, *POST_CORRECTIONS,
    *INPUT_DECOMPOSITIONS,
)


def split_algorithms(algorithms: Sequence[Any]) -> Stages:
    """Sort `algorithms` into stages; they must be listed in stage order."""
    by_stage: tuple[list[Any], ...] = ([], [], [], [], [])
    for index, config in enumerate(algorithms):
        stage = _stage_of(config)
        if stage < 0:
            runnable = sorted(c.__name__ for c in _ALL)
            raise ConfigError(
                f"algorithms[{index}]: {type(config).__name__} is not run by the engine yet; runnable: {runnable}"
            )
        later = [s for s in range(stage + 1, len(by_stage)) if by_stage[s]]
        if later:
            raise ConfigError(
                f"algorithms[{index}] ({type(config).__name__}) is {_STAGE_NAMES[stage]}; list it before "
                f"{type(by_stage[later[0]][0]).__name__} ({_STAGE_NAMES[later[0]]}). Order: pre-transforms "
                "(bn_fold, cle), block transforms (smoothquant, awq), one weight quantizer (rtn, gptq, adaround), "
                "post-corrections (bias_correction), input decompositions (llm_int8, or outlier_channels and input_smoothing)"
            )
        by_stage[stage].append(config)
    for stage, what in ((2, "weight quantizers"), (3, "post-corrections")):
        if len(by_stage[stage]) > 1:
            raise ConfigError(f"algorithms: {len(by_stage[stage])} {what} given; use one")
    kinds = [type(c).__name__ for c in by_stage[4]]
    if len(set(kinds)) < len(kinds):
        raise ConfigError(f"algorithms: input decompositions {kinds} repeat one; give each at most once (with its `layers`)")
    stages = Stages(
        pre_transforms=tuple(by_stage[0]),
        block_transforms=tuple(by_stage[1]),
        weight_quantizer=by_stage[2][0] if by_stage[2] else None,
        post_corrections=tuple(by_stage[3]),
        input_decompositions=tuple(by_stage[4]),
    )
    if stages.blockwise and stages.layerwise:
        block = [type(c).__name__ for c in (*stages.block_transforms, stages.weight_quantizer) if type(c) in (*BLOCK_TRANSFORMS, *HESSIAN_QUANTIZERS)]
        layer = [type(c).__name__ for c in (stages.weight_quantizer, *stages.post_corrections) if type(c) in (*LAYER_QUANTIZERS, *POST_CORRECTIONS)]
        raise ConfigError(f"algorithms: {block} run block by block and {layer} layer by layer; one recipe uses one of the two")
    if stages.analytic_correction is not None:
        _check_analytic(stages)
    return stages


def _check_analytic(stages: Stages) -> None:
    if not any(isinstance(c, BNFoldConfig) for c in stages.pre_transforms):
        raise ConfigError(
            "bias_correction mode 'analytic' models each layer's input from the BatchNorm folded into the layer "
            "before it: list bn_fold (and optionally cle) before it, or use mode 'empirical' with calibration data"
        )
    if stages.weight_quantizer is not None and type(stages.weight_quantizer) not in WEIGHT_QUANTIZERS:
        raise ConfigError(
            f"bias_correction mode 'analytic' corrects data-free weight rounding (rtn); "
            f"{type(stages.weight_quantizer).__name__} learns from calibration data: use mode 'empirical' with it"
        )


def quantize_weight_params(weight: torch.Tensor, spec: QuantSpec, config: Any) -> QParams:
    """QParams of a weight [out, ...] by a data-free weight quantizer (on its [out, -1] view
    for convolutions, whose per-channel parameters are the same)."""
    if type(config) not in WEIGHT_QUANTIZERS:
        raise ConfigError(f"{type(config).__name__} needs calibration data and runs block or layer by layer, not here")
    flat = weight.reshape(weight.shape[0], -1) if weight.ndim > 2 else weight  # [out, in·k·k]
    return WEIGHT_QUANTIZERS[type(config)](flat, spec, config)


def quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, config: Any, hessian: torch.Tensor | None = None, *, name: str | None = None
) -> WeightQuantResult:
    """Integer weights of a Linear weight [out, in] by the configured quantizer (RTN when
    `config` is None); GPTQ needs the layer's Hessian [in, in]."""
    if isinstance(config, GPTQConfig):
        if hessian is None:
            raise ConfigError(f"layer {name!r}: GPTQ needs the layer's Hessian")
        return gptq_quantize_weight(weight, hessian, spec, config, name=name)
    return rtn_quantize_weight(weight, spec, config if isinstance(config, RTNConfig) else None)
