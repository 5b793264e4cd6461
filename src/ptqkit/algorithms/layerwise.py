"""The layer-by-layer driver for algorithms that reconstruct each layer's output on calibration
data: AdaRound (learned rounding) and empirical bias correction.

For each targeted layer, in the order the model first calls them:
1. its inputs on the calibration data are taken twice: from a float copy of the model (the
   reference) and from the model being quantized, whose earlier layers already hold their
   quantized weights. Both come from one `stats.collect` request with a paired source: a model
   torch.fx traces runs once, node by node, both sides in lockstep (`stats.paired.Lockstep`);
   otherwise two forwards per layer, each stopped at the layer (`stats.paired.LayerForwards`);
2. its weight becomes integers on the spec's grid: AdaRound's learned rounding, reconstructing
   f(W x + b) through the activation module that directly consumes the layer's output (ReLU,
   ReLU6, CLE's clipped ReLU; identity otherwise), or round-to-nearest;
3. bias correction adds c = μ_fp − μ_q per output channel: the output mean of the float layer on
   the float inputs minus that of the quantized layer on the quantized model's inputs (the
   seeds' b_new = b_old + (μ_fp − μ_int)). It removes the mean shift of this layer's weight
   error and of the weight errors upstream; with padding the means are exact, not modelled;
4. the dequantized weight and the corrected bias replace the float ones, so later layers see
   them.
Memory: a float copy of the model, one layer's inputs twice (N × C × H × W floats each), and in
the graph pass the live intermediate values of all calibration samples, twice.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ptqkit.algorithms.adaround import ConvGeometry, layer_output
from ptqkit.algorithms.cle import ChannelClippedReLU
from ptqkit.algorithms.registry import Engine, algorithm_of
from ptqkit.algorithms.rtn import round_to_grid
from ptqkit.algorithms.weight_quant import WeightQuantResult
from ptqkit.core.errors import CalibrationDataError, ConfigError
from ptqkit.core.progress import progress_bar
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.stats.collect import Callback, ModelBatches, collect
from ptqkit.stats.graph_pass import trace
from ptqkit.stats.hooks import batch_length, limited_batches
from ptqkit.stats.paired import LayerForwards, Lockstep
from ptqkit.stats.sequential import calls_from_batches

__all__ = ["LAYER_KINDS", "RECONSTRUCT_THROUGH", "call_order", "quantize_layers_"]

logger = logging.getLogger(__name__)

LAYER_KINDS = ("Linear", "Conv2d")  # what the layer-by-layer algorithms handle
RECONSTRUCT_THROUGH = (nn.ReLU, nn.ReLU6, ChannelClippedReLU)  # activations AdaRound reconstructs through
Batches = Callable[[], Iterable[Any]]  # a fresh iterator over the calibration batches per call


def call_order(model: nn.Module, names: Iterable[str], batch: Any) -> tuple[list[str], dict[str, nn.Module]]:
    """The modules among `names` in the order one forward of `batch` first calls them (modules
    never called are left out), and for each the activation module that directly consumes its
    output (the very same tensor), where that activation is one AdaRound reconstructs through."""
    order: list[str] = []
    outputs: list[tuple[torch.Tensor, str]] = []  # (output, layer): kept alive, so identity is exact
    activation: dict[str, nn.Module] = {}

    def ran(name: str, x: Any, y: Any) -> None:
        if name not in order:
            order.append(name)
            if isinstance(y, torch.Tensor):
                outputs.append((y, name))

    def consumed(module: nn.Module, x: Any) -> None:
        producer = next((name for output, name in outputs if output is x), None)
        if producer is not None and producer not in activation:
            activation[producer] = module

    statistics = {name: Callback(partial(consumed, m)) for name, m in model.named_modules() if isinstance(m, RECONSTRUCT_THROUGH)}
    statistics.update({name: Callback(partial(ran, name), "output") for name in names})
    collect(model, statistics, ModelBatches([batch], batch_length(batch), progress=False))
    return order, activation


def _conv_geometry(module: nn.Module) -> ConvGeometry | None:
    if not isinstance(module, nn.Conv2d):
        return None
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ConfigError(f"conv {module}: layer-by-layer algorithms need numeric zero padding, got {module.padding!r}")
    return ConvGeometry(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)


def _channel_means(y: torch.Tensor, conv: ConvGeometry | None) -> torch.Tensor:
    """Per-output-channel mean of a layer output (axis 1 of a conv's, the last of a Linear's)."""
    if conv is None:
        return y.reshape(-1, y.shape[-1]).mean(dim=0, dtype=torch.float64)  # [..., out] -> [out]
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(dim=1, dtype=torch.float64)  # [N, out, H, W] -> [out]


@torch.no_grad()
def quantize_layers_(
    model: nn.Module,
    targets: Mapping[str, tuple[str, QuantSpec]],
    grids: Callable[[torch.Tensor, QuantSpec], QParams],
    weight_quantizer: Any,
    corrections: tuple[Any, ...],
    batches: Batches,
    *,
    max_samples: int,
    progress: bool = True,
) -> tuple[dict[str, WeightQuantResult], dict[str, dict[str, Any]]]:
    """Quantize the weights of `targets` (name -> (module type, weight spec)) one layer at a
    time, in place, with AdaRound (`weight_quantizer` an AdaRoundConfig) or round-to-nearest,
    then bias-correct them (`corrections` holding a BiasCorrectionConfig). `grids(weight, spec)`
    gives each layer's quantization grid. Returns the weight results (the model's float
    weights now hold the dequantized values, its biases the corrected ones) and per-layer
    details. Targets of other kinds (embeddings, 1-D convolutions) are left to conversion."""
    for config in corrections:
        if algorithm_of(config).engine_of(config) is not Engine.LAYERS:
            raise ConfigError(f"{algorithm_of(config).name} {config!r} is data-free; it runs on the whole model, not layer by layer")
    correction = corrections[0] if corrections else None  # one post-correction per recipe
    reconstruct = weight_quantizer if weight_quantizer is not None and algorithm_of(weight_quantizer).engine is Engine.LAYERS else None
    skipped = sorted(name for name, (kind, _) in targets.items() if kind not in LAYER_KINDS)
    if skipped:
        logger.info("layer-by-layer algorithms skip %d layer(s) of other kinds (quantized at conversion): %s", len(skipped), skipped)
    first = next(iter(limited_batches(batches(), max_samples)), None)
    if first is None:
        raise CalibrationDataError("calibration data is empty")
    order, activations = call_order(model, [n for n in targets if n not in skipped], first[0])
    never = sorted(set(targets) - set(skipped) - set(order))
    if never:
        logger.warning("%d targeted layer(s) never ran on calibration data; round-to-nearest at conversion: %s", len(never), never)
    logger.info("layer-by-layer: a float copy of the model is kept as the reference")
    reference = copy.deepcopy(model)
    results: dict[str, WeightQuantResult] = {}
    details: dict[str, dict[str, Any]] = {}
    graph = trace(model)
    source = Lockstep(reference, graph, calls_from_batches(batches(), max_samples)) if graph is not None else LayerForwards(reference, batches, max_samples)
    with progress_bar(f"quantizing {len(order)} layer(s) one by one", len(order), progress) as advance:

        def visit(name: str, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
            module = model.get_submodule(name)
            results[name], details[name] = _quantize_layer(
                name, module, targets[name][1], grids, reconstruct, correction, x_fp, x_q, activations.get(name)
            )
            advance(1, current=name)

        collect(model, {name: Callback(partial(visit, name)) for name in order}, source)  # paired inputs, layer by layer
    return results, details


def _quantize_layer(
    name: str,
    module: nn.Module,
    spec: QuantSpec,
    grids: Callable[[torch.Tensor, QuantSpec], QParams],
    reconstruct: Any,
    correction: Any,
    x_fp: torch.Tensor,
    x_q: torch.Tensor,
    activation: nn.Module | None,
) -> tuple[WeightQuantResult, dict[str, Any]]:
    """One layer: its integer weight by `reconstruct` (a layer-engine weight quantizer, learning
    the rounding from its inputs) or round-to-nearest, then the output shift of `correction`."""
    conv = _conv_geometry(module)
    weight = module.weight.detach()
    qparams = grids(weight, spec)
    if reconstruct is not None:
        with torch.enable_grad():
            result = algorithm_of(reconstruct).handler(
                weight, x_fp, qparams, reconstruct, bias=module.bias, conv=conv,
                activation=activation if activation is not None else "identity", quant_inputs=x_q,
            )
        detail = dict(result.details)
        detail["activation"] = type(activation).__name__ if activation is not None else "identity"
    else:
        result, detail = round_to_grid(weight, qparams, spec), {}
    if correction is not None:
        mean_fp = _channel_means(layer_output(weight, x_fp, None, conv), conv)
        mean_q = _channel_means(layer_output(result.dequantized, x_q, None, conv), conv)
        shift = algorithm_of(correction).handler_of(correction)(mean_fp, mean_q)  # [out]
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype), requires_grad=False)
        module.bias.add_(shift.to(module.bias.dtype))
        detail["bias_shift_max"] = float(shift.abs().max())
    module.weight.copy_(result.dequantized.to(module.weight.dtype))
    logger.debug("layer %s: %s", name, detail)
    return result, detail
