"""The driver: resolve targets, calibrate, convert. Thin on purpose: the maths lives in
primitives/observers/algorithms, the architecture knowledge in recipes and mappings.

`quantize(model, recipe, calib)` returns a quantized copy; `quantize_` works in place and leaves
the model untouched if anything fails before conversion (conversion builds every new module
first, then swaps them in).
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ptqkit.algorithms.input_smoothing import smoothing_divisors
from ptqkit.algorithms.llm_int8 import LLMInt8Config
from ptqkit.algorithms.outlier_channels import (
    OutlierChannelsConfig,
    choose_outlier_columns,
    column_multiples,
    zero_columns,
)
from ptqkit.algorithms.registry import algorithm_of
from ptqkit.core.errors import CalibrationDataError, ConfigError
from ptqkit.core.primitives import qparams_from_tensor
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.engine.recipe import Recipe
from ptqkit.engine.targets import LayerPlan, Plan, resolve_plan
from ptqkit.nn.act_quant import (
    InputQuantizer,
    make_input_quantizer,
    smoothed,
)
from ptqkit.nn.modules import InputOnly, QuantConv, QuantEmbedding, QuantizedModule, QuantLinear
from ptqkit.nn.tree import replace_module

__all__ = ["QuantizationInfo", "Residency", "plan", "quantize", "quantize_", "run", "dequantize_model", "weight_qparams", "convert_layer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizationInfo:
    """What was done to a quantized model; attached as `model.ptqkit_info`."""

    recipe: Recipe
    plan: Plan
    calibration: dict[str, Any] = field(default_factory=dict)  # description + fingerprint, or {} if none
    input_ranges: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # per-batch history


def plan(model: nn.Module, recipe: Recipe) -> Plan:
    """The per-module plan `quantize` would follow (print it, or `str(plan)`)."""
    return resolve_plan(model, recipe)


def quantize(
    model: nn.Module, recipe: Recipe, calib: Any = None, *, progress: bool = True, distributed: bool = False
) -> nn.Module:
    """Return a quantized copy of `model` (the original is not modified)."""
    return quantize_(copy.deepcopy(model), recipe, calib, progress=progress, distributed=distributed)


def quantize_(
    model: nn.Module, recipe: Recipe, calib: Any = None, *, progress: bool = True, distributed: bool = False
) -> nn.Module:
    """Quantize `model` in place and return it.

    `calib` is a CalibrationData (or anything CalibrationData.from_iterable accepts); it is
    required when the recipe has static (calibrated) input activations.

    With `distributed=True` (every rank of a torch.distributed job calls it with the same
    model, recipe and data; see `ptqkit.stats.distributed`) each rank calibrates on its share of the
    batches and the statistics are merged, so every rank returns the same model.
    """
    return run(model, recipe, calib, progress=progress, distributed=distributed)


class Residency(Protocol):
    """Where the weights live while the block engine runs, when not all in memory
    (`engine.onloading`): `prepare` runs once the plan is known and before any calibration;
    `load`/`release` wrap each block; `converted` names the layers `release` already converted."""

    converted: set[str]

    def prepare(self, model: nn.Module, recipe: Recipe, the_plan: Plan, stages: Any, data: Any) -> None: ...

    def load(self, prefix: str, block: nn.Module) -> None: ...

    def release(self, prefix: str, block: nn.Module, results: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class _Calibrated:
    """What the data-driven steps computed for conversion, per layer name."""

    observers: dict[str, Any] = field(default_factory=dict)
    outliers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (columns, min, max)
    divisors: dict[str, torch.Tensor] = field(default_factory=dict)  # input smoothing divisors [in]
    weight_results: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # description + fingerprint of the data used

    def convert(self, model: nn.Module, layer: LayerPlan, stages: Any) -> nn.Module:
        name = layer.name
        return convert_layer(
            model.get_submodule(name), layer, self.observers.get(name), stages, self.weight_results.get(name),
            self.outliers.get(name), self.divisors.get(name),
        )


def run(
    model: nn.Module, recipe: Recipe, calib: Any = None, *, progress: bool = True, distributed: bool = False,
    residency: Residency | None = None,
) -> nn.Module:
    """The one quantization driver, in place: plan, stages, calibration and the algorithms,
    conversion, info. `residency` None keeps every weight in memory (and restores the model if
    anything fails before conversion); `engine.onloading` passes one that reads each block from
    disk and converts its layers as soon as the block is done."""
    from ptqkit.algorithms.pipeline import split_algorithms

    the_plan = resolve_plan(model, recipe)
    logger.info("quantization plan:\n%s", the_plan.render())
    stages = split_algorithms(recipe.algorithms)
    static_inputs = {layer.name: layer.inputs for layer in the_plan.layers if layer.inputs is not None and not layer.inputs.dynamic}
    _check_input_decomposition(stages, the_plan, static_inputs, recipe)
    _require_calibration(recipe, stages, static_inputs, calib)
    parallel = _data_parallel(stages) if distributed else None
    progress = progress and (parallel is None or parallel.is_writer)
    changes_model = stages.pre_transforms or stages.blockwise or stages.layerwise or stages.analytic_correction is not None
    backup = copy.deepcopy(model.__dict__) if changes_model and residency is None else None  # restored on failure
    try:
        data = _as_calibration_data(calib, recipe) if calib is not None else None
        if residency is not None:
            residency.prepare(model, recipe, the_plan, stages, data)
        calibrated = _calibrate_and_run(model, the_plan, stages, static_inputs, data, recipe, progress, parallel, residency)
        done = residency.converted if residency is not None else set()
        replacements = {layer.name: calibrated.convert(model, layer, stages) for layer in the_plan.layers if layer.name not in done}
    except BaseException:
        if backup is not None:
            model.__dict__.clear()
            model.__dict__.update(backup)
        raise
    for name, module in replacements.items():
        replace_module(model, name, module)
    model.ptqkit_info = QuantizationInfo(
        recipe=recipe,
        plan=the_plan,
        calibration=calibrated.calibration,
        input_ranges={name: list(obs.history) for name, obs in calibrated.observers.items()},
    )
    return model


def _require_calibration(recipe: Recipe, stages: Any, static_inputs: dict[str, QuantSpec], calib: Any) -> None:
    if calib is not None or not (static_inputs or stages.blockwise or stages.layerwise):
        return
    algorithms = (*stages.block_transforms, stages.weight_quantizer, *stages.post_corrections)
    needs = f"quantizes input activations statically ({len(static_inputs)} module(s))" if static_inputs else (
        f"runs {[type(c).__name__ for c in algorithms if c is not None]} from calibration data"
    )
    raise ConfigError(
        f"recipe {recipe.name!r} {needs} but no calibration data was given: pass calib=CalibrationData..., "
        "or use a data-free recipe such as 'w8a8_dynamic' (or a weight-only one: 'w8a16', 'w4a16') "
        "without gptq/awq/smoothquant/adaround/bias_correction"
    )


def _calibrate_and_run(
    model: nn.Module, the_plan: Plan, stages: Any, static_inputs: dict[str, QuantSpec], data: Any, recipe: Recipe,
    progress: bool, parallel: Any, residency: Residency | None,
) -> _Calibrated:
    """Pre-transforms, the data-driven weight algorithms, the data-free correction, then the
    static input decompositions and observers, in that order."""
    from ptqkit.algorithms.pipeline import TransformContext, apply_pre_transforms

    context = TransformContext(example=_first_batch(data, recipe) if stages.pre_transforms else None)
    apply_pre_transforms(model, stages.pre_transforms, context)
    needs_data = stages.blockwise or stages.layerwise or residency is not None  # an on-disk model runs block by block
    weight_results = _run_weight_algorithms(model, the_plan, stages, data, recipe, progress, parallel, residency) if needs_data else {}
    if stages.analytic_correction is not None:
        _run_analytic_correction(model, the_plan, stages, context)
    divisors, outliers, observers = {}, {}, {}
    if static_inputs:
        divisors, outliers = _static_decompositions(model, the_plan, stages, data, recipe, progress, parallel)
        observers = _calibrate(model, static_inputs, data, recipe, progress, parallel, _observed_inputs(outliers, divisors))
    used = data is not None and (static_inputs or needs_data)
    calibration = {"description": data.description, "fingerprint": data.fingerprint} if used else {}
    return _Calibrated(observers, outliers, divisors, weight_results, calibration)


def _as_calibration_data(calib: Any, recipe: Recipe) -> Any:
    from ptqkit.calibration.data import CalibrationData

    if isinstance(calib, CalibrationData):
        return calib
    return CalibrationData.from_iterable(calib, limit=recipe.calibration.samples, seed=recipe.calibration.seed, batch_size=recipe.calibration.batch_size)


def _data_parallel(stages: Any) -> Any:
    from ptqkit.stats.distributed import DataParallel

    if stages.layerwise:
        algorithms = [type(c).__name__ for c in (stages.weight_quantizer, *stages.data_corrections) if c is not None]
        raise ConfigError(
            f"distributed=True: {algorithms} run layer by layer and are not data-parallel; run them in one process "
            "(observers, SmoothQuant, AWQ and GPTQ are data-parallel)"
        )
    return DataParallel.current()


def _calibration_batches(data: Any, recipe: Recipe, parallel: Any) -> tuple[Any, int, int]:
    """(batches, max_samples, number of batches) this process runs: all of them, or this
    rank's share of them."""
    if len(data) == 0:
        raise CalibrationDataError("calibration data is empty")
    batch_size = recipe.calibration.batch_size
    samples = min(len(data), recipe.calibration.samples)
    total = -(-samples // batch_size)
    if parallel is None:
        return data.batches(batch_size), samples, total
    return parallel.shard(data.batches(batch_size), samples, total), samples, len(parallel.my_batches(total))


def _check_input_decomposition(stages: Any, the_plan: Plan, static_inputs: dict[str, QuantSpec], recipe: Recipe) -> None:
    """Each input decomposition needs the input quantization its registry row names: llm_int8
    splits dynamically quantized inputs per call; outlier_channels and input_smoothing change
    statically quantized ones from calibration data (input_smoothing also rescales the float
    weights, so no other algorithm may have quantized them from the originals)."""
    for decomposition in stages.input_decompositions:
        row = algorithm_of(decomposition)
        if row.inputs == "static" and not static_inputs:
            raise ConfigError(
                f"{row.name} works on a static activation range, but recipe {recipe.name!r} has no static input "
                "quantization; use it with 'w8a8' or recipes/w8a8-encoder.yaml"
            )
        if row.rescales_weights and (stages.blockwise or stages.layerwise or stages.analytic_correction is not None):
            others = [type(c).__name__ for c in (*stages.block_transforms, stages.weight_quantizer, *stages.post_corrections) if c is not None]
            raise ConfigError(
                f"{row.name} scales the weights' input columns at conversion, after {others} would have computed "
                f"weights or biases from the unscaled ones; recipe {recipe.name!r}: drop one of them"
            )
        if row.inputs == "dynamic" and (static_inputs or not any(layer.inputs for layer in the_plan.layers)):
            raise ConfigError(
                f"{row.name} decomposes dynamically quantized inputs, but recipe {recipe.name!r} has "
                f"{'static' if static_inputs else 'no'} input quantization; use it with 'w8a8_dynamic'"
            )


def _observed_inputs(outliers: dict[str, Any], divisors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per layer, what its static input quantizer sees of its input x: x with its outlier
    columns zeroed (they get their own grids), or x / divisors (input smoothing)."""
    transforms: dict[str, Any] = {name: functools.partial(zero_columns, columns=columns) for name, (columns, _, _) in outliers.items()}
    transforms.update({name: functools.partial(smoothed, divisors=d) for name, d in divisors.items()})
    return transforms


def _check_disjoint(divisors: dict[str, torch.Tensor], outliers: dict[str, Any]) -> None:
    both = sorted(set(divisors) & set(outliers))
    if both:
        raise ConfigError(
            f"input_smoothing and outlier_channels both apply to {both[:4]}{' ...' if len(both) > 4 else ''}; "
            "give them disjoint `layers` patterns (one input quantizer per layer)"
        )


def _static_decompositions(
    model: nn.Module, the_plan: Plan, stages: Any, data: Any, recipe: Recipe, progress: bool, parallel: Any
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(input smoothing divisors, calibrated outlier columns) of the layers each selects, from
    one pass over the calibration data for the input column ranges both need."""
    smoothing, outlier_channels = stages.input_decomposition("input_smoothing"), stages.input_decomposition("outlier_channels")
    smoothed_layers = _decomposition_layers(the_plan, smoothing.layers, "input_smoothing", with_weights=True) if smoothing else []
    outlier_layers = _decomposition_layers(the_plan, outlier_channels.layers, "outlier_channels", with_weights=False) if outlier_channels else []
    if not smoothed_layers and not outlier_layers:
        return {}, {}
    ranges = _static_column_ranges(model, list(dict.fromkeys(smoothed_layers + outlier_layers)), data, recipe, progress, parallel)
    divisors = _smoothing_divisors({n: ranges[n] for n in smoothed_layers if n in ranges}, smoothing.alpha) if smoothing else {}
    outliers = _outlier_columns({n: ranges[n] for n in outlier_layers if n in ranges}, outlier_channels) if outlier_channels else {}
    _check_disjoint(divisors, outliers)
    return divisors, outliers


def _decomposition_layers(the_plan: Plan, patterns: tuple[str, ...], algorithm: str, *, with_weights: bool) -> list[str]:
    """The Linear (or GPT-2 Conv1D) layers with static inputs (and quantized weights if
    `with_weights`) that `patterns` select, all of them if empty; a pattern matching none is an error."""
    from ptqkit.engine.targets import no_match_error, pattern_matches

    candidates = [
        layer.name for layer in the_plan.layers
        if layer.inputs is not None and not layer.inputs.dynamic and layer.module_type in ("Linear", "Conv1D")
        and (layer.weights is not None or not with_weights)
    ]
    for pattern in patterns:
        if not any(pattern_matches(pattern, name) for name in candidates):
            raise no_match_error(f"{algorithm}.layers", pattern, candidates, "no Linear with static inputs")
    return [name for name in candidates if not patterns or any(pattern_matches(p, name) for p in patterns)]


def _static_column_ranges(
    model: nn.Module, names: list[str], data: Any, recipe: Recipe, progress: bool, parallel: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) per input column of each named layer, from one pass over the calibration data,
    merged over ranks."""
    from ptqkit.stats.collect import input_column_ranges

    batches, samples, total = _calibration_batches(data, recipe, parallel)
    ranges = input_column_ranges(model, names, batches, max_samples=samples, progress=progress, total_batches=total)
    if parallel is not None:
        gathered = parallel.gather(ranges)
        ranges = {
            name: (torch.stack([rank[name][0] for rank in gathered]).amin(0), torch.stack([rank[name][1] for rank in gathered]).amax(0))
            for name in ranges
        }
    return ranges


def _smoothing_divisors(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """Input smoothing divisors [in] of each layer from its input column ranges."""
    divisors = {}
    for name, (low, high) in ranges.items():
        try:
            divisors[name] = smoothing_divisors(torch.maximum(low.abs(), high.abs()), alpha)
        except ValueError as exc:
            raise CalibrationDataError(f"input_smoothing: layer {name!r}: {exc}") from None
    logger.info("input_smoothing: %d layer(s), alpha %g", len(divisors), alpha)
    return divisors


def _outlier_columns(
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], config: OutlierChannelsConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The calibrated outlier input columns of each layer and their calibration ranges,
    (columns, min, max), from its input column ranges; layers without outliers are left out."""
    found = {}
    for name, (low, high) in ranges.items():
        columns = choose_outlier_columns(torch.maximum(low.abs(), high.abs()), config.ratio, config.max_columns)
        if columns.numel():
            found[name] = (columns, low[columns], high[columns])
    logger.info(
        "outlier_channels: %d outlier input column(s) in %d of %d layer(s)",
        sum(c.numel() for c, _, _ in found.values()), len(found), len(ranges),
    )
    return found


def _calibrate(
    model: nn.Module, specs: dict[str, QuantSpec], data: Any, recipe: Recipe, progress: bool, parallel: Any,
    transforms: dict[str, Any],
) -> dict[str, Any]:
    from ptqkit.stats.collect import calibrate_inputs

    batches, samples, total = _calibration_batches(data, recipe, parallel)
    observers = calibrate_inputs(
        model, specs, batches, max_samples=samples, progress=progress, total_batches=total,
        input_transforms=transforms,
    )
    return parallel.merge_observers(observers) if parallel is not None else observers


def _run_weight_algorithms(
    model: nn.Module, the_plan: Plan, stages: Any, data: Any, recipe: Recipe, progress: bool, parallel: Any,
    residency: Residency | None = None,
) -> dict[str, Any]:
    """Weights by the data-driven engines: block by block (SmoothQuant, AWQ, GPTQ) or layer by
    layer (AdaRound, bias correction)."""
    from ptqkit.algorithms.blockwise import quantize_blocks_
    from ptqkit.algorithms.layerwise import quantize_layers_

    batches, max_samples, _ = _calibration_batches(data, recipe, parallel)
    targets = {layer.name: (layer.module_type, layer.weights) for layer in the_plan.layers if layer.weights is not None}
    batch_size = recipe.calibration.batch_size
    was_training = model.training
    model.eval()
    try:
        if stages.blockwise or residency is not None:
            results, _ = quantize_blocks_(
                model, targets, stages, batches, max_samples=max_samples, progress=progress,
                reduce=parallel.merge_statistics if parallel is not None else None, onload=residency,
            )
        else:
            results, _ = quantize_layers_(
                model, targets, weight_qparams, stages.weight_quantizer,
                stages.data_corrections, lambda: data.batches(batch_size), max_samples=max_samples, progress=progress,
            )
    finally:
        model.train(was_training)
    return results


def _first_batch(data: Any, recipe: Recipe) -> Any:
    """One calibration batch, or None without data (CLE's chain capture for untraceable models)."""
    if data is None:
        return None
    return next(iter(data.batches(recipe.calibration.batch_size)), None)


def _run_analytic_correction(model: nn.Module, the_plan: Plan, stages: Any, context: Any) -> None:
    """Data-free bias correction of every targeted Conv2d/Linear fed by a folded layer, on the
    grid conversion will quantize its weight on."""
    correction = stages.analytic_correction
    targets = {layer.name: (layer.module_type, layer.weights) for layer in the_plan.layers if layer.weights is not None}
    algorithm_of(correction).handler_of(correction)(
        model, targets, lambda weight, spec: weight_qparams(weight, spec, stages.weight_quantizer), context.gaussians
    )


def weight_qparams(weight: torch.Tensor, spec: QuantSpec, quantizer: Any = None) -> QParams:
    """Parameters of a weight (layout [out, in, ...]): the recipe's weight quantizer (e.g. RTN
    with an MSE clip search) if it has one, else the spec's observer (min-max by default)."""
    from ptqkit.algorithms.pipeline import is_data_free

    if is_data_free(quantizer):  # GPTQ runs block by block, AdaRound layer by layer; elsewhere: the observer
        flat = weight.detach().reshape(weight.shape[0], -1) if weight.ndim > 2 else weight.detach()  # convs: [out, in·k·k]
        qparams = algorithm_of(quantizer).handler(flat, spec, quantizer)
        return QParams(qparams.scale, qparams.zero_point, qparams.qtype, spec.granularity)
    if spec.observer == "minmax":
        return qparams_from_tensor(weight.detach(), spec)
    from ptqkit.observers import make_observer

    observer = make_observer(spec)
    observer.update(weight.detach())
    return observer.qparams()


def _input_quantizer(
    layer: LayerPlan, observer: Any, llm_int8: LLMInt8Config | None = None, outliers: Any = None, divisors: torch.Tensor | None = None
) -> InputQuantizer | None:
    if layer.inputs is None:
        return None
    if llm_int8 is not None or layer.inputs.dynamic:  # llm_int8 is checked up front to need dynamic inputs
        return make_input_quantizer(layer.inputs, outlier_threshold=llm_int8.threshold if llm_int8 is not None else None)
    qparams = observer.qparams()
    if outliers is None:
        return make_input_quantizer(layer.inputs, qparams, divisors=divisors)
    columns, low, high = outliers
    qtype = layer.inputs.qtype
    multiples = column_multiples(low, high, float(qparams.scale), int(qparams.zero_point), int(qtype.qmin), int(qtype.qmax))
    return make_input_quantizer(layer.inputs, qparams, columns=columns, multiples=multiples)


def convert_layer(
    module: nn.Module, layer: LayerPlan, observer: Any, stages: Any, result: Any = None, outliers: Any = None,
    divisors: torch.Tensor | None = None,
) -> nn.Module:
    """The quantized replacement of one module (weights stay float if the layer has no weight
    spec); `result` holds integer weights an algorithm already computed for it; `outliers` are
    the layer's calibrated outlier input columns and their ranges (outlier_channels);
    `divisors` its input smoothing divisors (input_smoothing: the weight's input column c is
    multiplied by divisors[c] before it is quantized)."""
    inputs = _input_quantizer(layer, observer, stages.input_decomposition("llm_int8"), outliers, divisors)
    if layer.weights is None:
        return InputOnly(module, inputs)
    quantizer = stages.weight_quantizer
    if result is not None and layer.module_type in ("Conv1d", "Conv2d"):
        return QuantConv(module, result.qparams, layer.weights, inputs, codes=result.codes)
    if result is not None:
        weight = module.weight.t() if layer.module_type == "Conv1D" else module.weight
        return QuantLinear(weight, module.bias, result.qparams, layer.weights, inputs, codes=result.codes)
    if layer.module_type == "Embedding":
        return QuantEmbedding(module, weight_qparams(module.weight, layer.weights, quantizer), layer.weights)
    if layer.module_type in ("Linear", "Conv1D"):
        weight = module.weight.t() if layer.module_type == "Conv1D" else module.weight  # Conv1D keeps [in, out]
        if divisors is not None:
            weight = weight * divisors.to(weight.dtype)  # [out, in] x [in]
        return QuantLinear(weight, module.bias, weight_qparams(weight, layer.weights, quantizer), layer.weights, inputs)
    return QuantConv(module, weight_qparams(module.weight, layer.weights, quantizer), layer.weights, inputs)


def dequantize_model(qmodel: nn.Module) -> nn.Module:
    """A float copy of a quantized model: dequantized weights, no input or output quantization."""
    from ptqkit.nn.output_quant import remove_output_quantizer_

    model = copy.deepcopy(qmodel)
    for module in list(model.modules()):
        remove_output_quantizer_(module)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedModule):
            replace_module(model, name, module.to_float())
        elif isinstance(module, InputOnly):
            replace_module(model, name, module.module)
    if hasattr(model, "ptqkit_info"):
        del model.ptqkit_info
    return model
