"""The one algorithm registry: each recipe algorithm is one row naming its config class, the
stage it belongs to, the engine that runs it, the statistics it needs, its memory estimate and
its handler. The drivers (`engine.quantize`, `algorithms.blockwise`, `algorithms.layerwise`,
`engine.memory_plan`) look rows up by config type; adding an algorithm is one module with its
config and maths plus one row here.

Stages run in this order (a recipe lists its algorithms in it):

1. pre-transforms: function-preserving, in float, before calibration (bn_fold, cle);
2. block transforms: function-preserving, in float, from calibration statistics, block by block
   (smoothquant, awq);
3. one weight quantizer: how each targeted weight becomes integers (rtn at conversion, gptq
   block by block from each layer's Hessian, adaround layer by layer);
4. post-corrections after the weights are integers (bias_correction: layer by layer on
   calibration data, or data-free from the folded BatchNorms);
5. input decompositions: how inputs are quantized (llm_int8 per call on dynamic inputs;
   outlier_channels and input_smoothing from calibrated column ranges of static inputs).

A handler's signature is its engine's (see `Engine`).
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ptqkit.algorithms.adaround import AdaRoundConfig, adaround_weight
from ptqkit.algorithms.analytic_bias import analytic_bias_correct_
from ptqkit.algorithms.awq import AWQConfig, awq_block_
from ptqkit.algorithms.bias_correction import BiasCorrectionConfig, output_mean_correction
from ptqkit.algorithms.bn_fold import BNFoldConfig
from ptqkit.algorithms.cle import CLEConfig
from ptqkit.algorithms.gptq import GPTQConfig, gptq_quantize_weight
from ptqkit.algorithms.input_smoothing import InputSmoothingConfig
from ptqkit.algorithms.llm_int8 import LLMInt8Config
from ptqkit.algorithms.outlier_channels import OutlierChannelsConfig
from ptqkit.algorithms.rtn import RTNConfig, rtn_qparams
from ptqkit.algorithms.smoothquant import SmoothQuantConfig, smoothquant_block_
from ptqkit.algorithms.transforms import equalize_model, fold_model
from ptqkit.core.errors import ConfigError
from ptqkit.stats.input_stats import StatsRequest

__all__ = ["ALGORITHMS", "REGISTRY", "Algorithm", "Engine", "Stage", "algorithm_of"]

_FLOAT_BYTES = 4


class Stage(enum.IntEnum):
    """Where in a recipe an algorithm runs; recipes list algorithms in this order."""

    PRE_TRANSFORM = 0
    BLOCK_TRANSFORM = 1
    WEIGHT_QUANTIZER = 2
    POST_CORRECTION = 3
    INPUT_DECOMPOSITION = 4

    @property
    def phrase(self) -> str:
        return ("a pre-transform", "a block transform", "a weight quantizer", "a post-correction", "an input decomposition")[self]


class Engine(enum.Enum):
    """What runs an algorithm, and so its handler's signature.

    - MODEL: once on the whole model, no calibration pass. Pre-transforms:
      `handler(model, config, context)`; data-free post-corrections:
      `handler(model, targets, grids, gaussians)`.
    - BLOCKS (`algorithms.blockwise`): block by block on the statistics the row requests.
      Block transforms: `handler(config, modules, groups, stats, specs) -> details`; weight
      quantizers: `handler(weight, hessian, spec, config, name=...) -> WeightQuantResult`.
    - LAYERS (`algorithms.layerwise`): layer by layer on the layer's float and quantized inputs.
      Weight quantizers: `adaround_weight`'s signature; post-corrections:
      `handler(mean_fp, mean_quant) -> bias shift`.
    - CONVERSION (`engine.quantize.convert_layer`): when each layer is converted. Weight
      quantizers: `handler(weight, spec, config) -> QParams` (the data-free grid); input
      decompositions: none (their quantizers are built from the row's `inputs`).
    """

    MODEL = "model"
    BLOCKS = "blocks"
    LAYERS = "layers"
    CONVERSION = "conversion"


@dataclass(frozen=True)
class Algorithm:
    """One registry row.

    `group_stats(config)`: the statistics a block transform needs of each scale group's input;
    `layer_stats(config)`: those it (or a weight quantizer) needs of each targeted layer's input.
    `memory(config, input_widths, calls)`: bytes of one block's statistics, from the widths of
    the block's Linear inputs and the number of calibration calls. `inputs`: an input
    decomposition's input quantization, "static" or "dynamic". `rescales_weights`: the
    algorithm multiplies weight columns at conversion, after which no other algorithm may have
    computed weights from the unscaled ones. `engine_of(config)` picks the engine when the
    config decides it (bias_correction's mode)."""

    name: str
    config: type
    stage: Stage
    engine: Engine
    handler: Callable[..., Any] | None = None
    group_stats: Callable[[Any], StatsRequest] | None = None
    layer_stats: Callable[[Any], StatsRequest | None] | None = None
    memory: Callable[[Any, Sequence[int], int], int] | None = None
    inputs: str | None = None
    rescales_weights: bool = False
    choose_engine: Callable[[Any], Engine] | None = None
    choose_handler: Callable[[Any], Callable[..., Any]] | None = None

    def engine_of(self, config: Any) -> Engine:
        return self.choose_engine(config) if self.choose_engine is not None else self.engine

    def handler_of(self, config: Any) -> Callable[..., Any] | None:
        return self.choose_handler(config) if self.choose_handler is not None else self.handler


def _gptq_memory(config: GPTQConfig, widths: Sequence[int], calls: int) -> int:
    """One float64 [in, in] Gram sum per Linear (an upper bound: q/k/v share one) plus five
    working copies of the largest (damped copy, Cholesky factor, inverse and its factor, a
    permuted copy)."""
    return sum(width * width for width in widths) * 8 + 5 * max(widths, default=0) ** 2 * _FLOAT_BYTES


def _awq_memory(config: AWQConfig, widths: Sequence[int], calls: int) -> int:
    """The sampled rows of every call, per distinct input width."""
    return calls * config.rows_per_call * sum(set(widths)) * _FLOAT_BYTES


def _awq_layer_stats(config: AWQConfig) -> StatsRequest | None:
    return StatsRequest(rows_per_call=config.rows_per_call) if config.clip else None


def _bias_engine(config: BiasCorrectionConfig) -> Engine:
    return Engine.MODEL if config.mode == "analytic" else Engine.LAYERS


def _bias_handler(config: BiasCorrectionConfig) -> Callable[..., Any]:
    return analytic_bias_correct_ if config.mode == "analytic" else output_mean_correction


_ROWS = (
    Algorithm("rtn", RTNConfig, Stage.WEIGHT_QUANTIZER, Engine.CONVERSION, handler=rtn_qparams),
    Algorithm(
        "gptq", GPTQConfig, Stage.WEIGHT_QUANTIZER, Engine.BLOCKS, handler=gptq_quantize_weight,
        layer_stats=lambda config: StatsRequest(hessian=True), memory=_gptq_memory,
    ),
    Algorithm(
        "awq", AWQConfig, Stage.BLOCK_TRANSFORM, Engine.BLOCKS, handler=awq_block_,
        group_stats=AWQConfig.stats_request, layer_stats=_awq_layer_stats, memory=_awq_memory,
    ),
    Algorithm(
        "smoothquant", SmoothQuantConfig, Stage.BLOCK_TRANSFORM, Engine.BLOCKS,
        handler=lambda config, modules, groups, stats, specs: smoothquant_block_(config, modules, groups, stats),
        group_stats=SmoothQuantConfig.stats_request,
    ),
    Algorithm("llm_int8", LLMInt8Config, Stage.INPUT_DECOMPOSITION, Engine.CONVERSION, inputs="dynamic"),
    Algorithm("outlier_channels", OutlierChannelsConfig, Stage.INPUT_DECOMPOSITION, Engine.CONVERSION, inputs="static"),
    Algorithm(
        "input_smoothing", InputSmoothingConfig, Stage.INPUT_DECOMPOSITION, Engine.CONVERSION, inputs="static",
        rescales_weights=True,
    ),
    Algorithm("bn_fold", BNFoldConfig, Stage.PRE_TRANSFORM, Engine.MODEL, handler=fold_model),
    Algorithm("cle", CLEConfig, Stage.PRE_TRANSFORM, Engine.MODEL, handler=equalize_model),
    Algorithm(
        "bias_correction", BiasCorrectionConfig, Stage.POST_CORRECTION, Engine.LAYERS,
        choose_engine=_bias_engine, choose_handler=_bias_handler,
    ),
    Algorithm("adaround", AdaRoundConfig, Stage.WEIGHT_QUANTIZER, Engine.LAYERS, handler=adaround_weight),
)

REGISTRY: dict[type, Algorithm] = {row.config: row for row in _ROWS}
ALGORITHMS: dict[str, type] = {row.name: row.config for row in _ROWS}  # recipe name -> config class


def algorithm_of(config: Any) -> Algorithm:
    """The registry row of an algorithm config."""
    row = REGISTRY.get(type(config))
    if row is None:
        raise ConfigError(f"{type(config).__name__} is not a registered algorithm; registered: {sorted(ALGORITHMS)}")
    return row
