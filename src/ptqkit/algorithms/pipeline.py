"""Sorting a recipe's algorithms into the engine's stages (`Stages`, `split_algorithms`), the
pre-transform pass, and the weight quantizers' common entry points. What each algorithm is
lives in its registry row (`algorithms.registry`); nothing here branches on config classes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ptqkit.algorithms.registry import REGISTRY, Engine, Stage, algorithm_of
from ptqkit.algorithms.rtn import round_to_grid, rtn_quantize_weight
from ptqkit.algorithms.transforms import TransformContext
from ptqkit.algorithms.weight_quant import WeightQuantResult
from ptqkit.core.errors import ConfigError
from ptqkit.core.spec import QuantSpec

logger = logging.getLogger(__name__)

__all__ = [
    "Stages",
    "TransformContext",
    "apply_pre_transforms",
    "split_algorithms",
    "is_data_free",
    "quantize_weight",
]


def apply_pre_transforms(model: nn.Module, configs: Sequence[Any], context: TransformContext | None = None) -> None:
    """Run the pre-transforms `configs` on `model` in order, in place (no autograd). Replaying
    them on a fresh copy of the float model gives the quantized model's module structure and
    its float equivalent: they are deterministic (an example batch only finds CLE chains)."""
    context = context if context is not None else TransformContext()
    with torch.no_grad():
        for config in configs:
            algorithm_of(config).handler(model, config, context)
            logger.info("pre-transform %s applied", type(config).__name__)


def _engine(config: Any) -> Engine | None:
    return algorithm_of(config).engine_of(config) if config is not None else None


@dataclass(frozen=True)
class Stages:
    """A recipe's algorithms sorted into the engine's stages (each keeps recipe order)."""

    pre_transforms: tuple[Any, ...] = ()
    block_transforms: tuple[Any, ...] = ()
    weight_quantizer: Any = None
    post_corrections: tuple[Any, ...] = ()
    input_decompositions: tuple[Any, ...] = ()  # at most one of each kind

    def input_decomposition(self, name: str) -> Any:
        """The recipe's input decomposition registered as `name`, or None."""
        return next((c for c in self.input_decompositions if algorithm_of(c).name == name), None)

    @property
    def blockwise(self) -> bool:
        """Whether the model must be run block by block on calibration data."""
        return bool(self.block_transforms) or _engine(self.weight_quantizer) is Engine.BLOCKS

    @property
    def layerwise(self) -> bool:
        """Whether the model must be run layer by layer on calibration data."""
        return bool(self.data_corrections) or _engine(self.weight_quantizer) is Engine.LAYERS

    @property
    def data_corrections(self) -> tuple[Any, ...]:
        """The post-corrections computed from calibration data (layer by layer)."""
        return tuple(c for c in self.post_corrections if _engine(c) is Engine.LAYERS)

    @property
    def analytic_correction(self) -> Any:
        """The data-free bias correction, or None."""
        return next((c for c in self.post_corrections if _engine(c) is Engine.MODEL), None)


_ORDER = (
    "pre-transforms (bn_fold, cle), block transforms (smoothquant, awq), one weight quantizer (rtn, gptq, adaround), "
    "post-corrections (bias_correction), input decompositions (llm_int8, or outlier_channels and input_smoothing)"
)


def split_algorithms(algorithms: Sequence[Any]) -> Stages:
    """Sort `algorithms` into stages; they must be listed in stage order."""
    by_stage: tuple[list[Any], ...] = tuple([] for _ in Stage)
    for index, config in enumerate(algorithms):
        row = REGISTRY.get(type(config))
        if row is None:
            runnable = sorted(c.__name__ for c in REGISTRY)
            raise ConfigError(
                f"algorithms[{index}]: {type(config).__name__} is not run by the engine yet; runnable: {runnable}"
            )
        later = [s for s in Stage if s > row.stage and by_stage[s]]
        if later:
            raise ConfigError(
                f"algorithms[{index}] ({type(config).__name__}) is {row.stage.phrase}; list it before "
                f"{type(by_stage[later[0]][0]).__name__} ({later[0].phrase}). Order: {_ORDER}"
            )
        by_stage[row.stage].append(config)
    for stage, what in ((Stage.WEIGHT_QUANTIZER, "weight quantizers"), (Stage.POST_CORRECTION, "post-corrections")):
        if len(by_stage[stage]) > 1:
            raise ConfigError(f"algorithms: {len(by_stage[stage])} {what} given; use one")
    kinds = [type(c).__name__ for c in by_stage[Stage.INPUT_DECOMPOSITION]]
    if len(set(kinds)) < len(kinds):
        raise ConfigError(f"algorithms: input decompositions {kinds} repeat one; give each at most once (with its `layers`)")
    stages = Stages(
        pre_transforms=tuple(by_stage[Stage.PRE_TRANSFORM]),
        block_transforms=tuple(by_stage[Stage.BLOCK_TRANSFORM]),
        weight_quantizer=by_stage[Stage.WEIGHT_QUANTIZER][0] if by_stage[Stage.WEIGHT_QUANTIZER] else None,
        post_corrections=tuple(by_stage[Stage.POST_CORRECTION]),
        input_decompositions=tuple(by_stage[Stage.INPUT_DECOMPOSITION]),
    )
    if stages.blockwise and stages.layerwise:
        runs = [(type(c).__name__, _engine(c)) for c in (*stages.block_transforms, stages.weight_quantizer, *stages.post_corrections) if c is not None]
        block = [name for name, engine in runs if engine is Engine.BLOCKS]
        layer = [name for name, engine in runs if engine is Engine.LAYERS]
        raise ConfigError(f"algorithms: {block} run block by block and {layer} layer by layer; one recipe uses one of the two")
    if stages.analytic_correction is not None:
        _check_analytic(stages)
    return stages


def _check_analytic(stages: Stages) -> None:
    if not any(algorithm_of(c).name == "bn_fold" for c in stages.pre_transforms):
        raise ConfigError(
            "bias_correction mode 'analytic' models each layer's input from the BatchNorm folded into the layer "
            "before it: list bn_fold (and optionally cle) before it, or use mode 'empirical' with calibration data"
        )
    if stages.weight_quantizer is not None and _engine(stages.weight_quantizer) is not Engine.CONVERSION:
        raise ConfigError(
            f"bias_correction mode 'analytic' corrects data-free weight rounding (rtn); "
            f"{type(stages.weight_quantizer).__name__} learns from calibration data: use mode 'empirical' with it"
        )


def is_data_free(config: Any) -> bool:
    """Whether `config` is a weight quantizer that computes grids at conversion, without data."""
    return config is not None and algorithm_of(config).stage is Stage.WEIGHT_QUANTIZER and _engine(config) is Engine.CONVERSION


def quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, config: Any, hessian: torch.Tensor | None = None, *, name: str | None = None
) -> WeightQuantResult:
    """Integer weights of a Linear weight [out, in] by the configured quantizer (RTN when
    `config` is None); a block-engine quantizer (GPTQ) needs the layer's Hessian [in, in]."""
    if _engine(config) is Engine.BLOCKS:
        if hessian is None:
            raise ConfigError(f"layer {name!r}: {type(config).__name__} needs the layer's Hessian")
        return algorithm_of(config).handler(weight, hessian, spec, config, name=name)
    if is_data_free(config):
        return round_to_grid(weight, algorithm_of(config).handler(weight, spec, config), spec)
    return rtn_quantize_weight(weight, spec)  # min-max grid
