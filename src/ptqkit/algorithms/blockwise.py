"""The block-by-block driver for algorithms that need calibration statistics of each layer's
input (SmoothQuant, AWQ, GPTQ).

For each repeated block of the model (`mappings.find_block_list`), in order:
1. one pass of the block over its captured inputs collects every statistic the recipe's
   algorithms declared (`stats_request`), once per distinct input tensor (q/k/v share one);
2. block transforms (SmoothQuant, AWQ) rescale the float block in place, updating the
   statistics exactly instead of re-running the data;
3. every targeted Linear of the block is quantized (RTN, or GPTQ from its Hessian), and its
   float weight is replaced by the dequantized one;
4. the block runs again on its inputs: these outputs, computed with quantized weights, are the
   next block's inputs (so later blocks learn to compensate earlier blocks' errors).
Layers outside the blocks (e.g. an output head that is not kept in float) are left to the
data-free weight quantizer at conversion, and logged. A model without a repeated block list is
one single stage run on the calibration batches themselves (GPTQ works; SmoothQuant and AWQ
need the scale-group table of a block class and raise UnsupportedModelError).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn

from ptqkit.algorithms.channel_scaling import input_columns, set_input_columns_
from ptqkit.algorithms.pipeline import Stages, quantize_weight
from ptqkit.algorithms.registry import Engine, algorithm_of
from ptqkit.algorithms.weight_quant import WeightQuantResult
from ptqkit.core.errors import UnsupportedModelError
from ptqkit.core.progress import progress_bar
from ptqkit.core.spec import QuantSpec
from ptqkit.models.mappings import ScaleGroup, find_block_list, resolve_scale_groups
from ptqkit.stats.collect import BlockCalls, collect
from ptqkit.stats.input_stats import InputStatistics, StatsRequest
from ptqkit.stats.sequential import (
    BlockCall,
    calls_from_batches,
    capture_block_inputs,
    fused_attention,
    next_block_calls,
    shared_inputs,
)

__all__ = ["quantize_blocks_", "transform_blocks_"]

logger = logging.getLogger(__name__)

_LINEAR_TYPES = ("Linear", "Conv1D")
Reduce = Callable[[Mapping[str, InputStatistics]], Mapping[str, InputStatistics]]


class BlockOnloader(Protocol):
    """Materialises a block's weights before the engine runs it, releases them after."""

    def load(self, prefix: str, block: nn.Module) -> None: ...

    def release(self, prefix: str, block: nn.Module, results: dict[str, WeightQuantResult]) -> None: ...


def quantize_blocks_(
    model: nn.Module,
    targets: Mapping[str, tuple[str, QuantSpec]],
    stages: Stages,
    batches: Iterable[Any],
    *,
    max_samples: int,
    progress: bool = True,
    quantize_weights: bool = True,
    reduce: Reduce | None = None,
    onload: BlockOnloader | None = None,
) -> tuple[dict[str, WeightQuantResult], dict[str, Any]]:
    """Run the block transforms and the weight quantizer block by block, in place.

    `targets` maps module names to (module type, weight spec). Returns the weight results of
    the layers quantized here (their float weights now hold the dequantized values) and the
    algorithms' details per block. With `quantize_weights=False` only the (function-preserving)
    block transforms run and the model stays float. `reduce` combines each block's statistics
    with other processes' (data-parallel calibration: `DataParallel.merge_statistics`).
    `onload` reads each block's weights before it runs and receives its results after (layer
    onloading: `ptqkit.engine.onloading`); they are then not returned."""
    with fused_attention(model):
        return _quantize_blocks(model, targets, stages, batches, max_samples, progress, quantize_weights, reduce, onload)


def _quantize_blocks(
    model: nn.Module,
    targets: Mapping[str, tuple[str, QuantSpec]],
    stages: Stages,
    batches: Iterable[Any],
    max_samples: int,
    progress: bool,
    quantize_weights: bool,
    reduce: Reduce | None,
    onload: BlockOnloader | None,
) -> tuple[dict[str, WeightQuantResult], dict[str, Any]]:
    linear_targets = {name: spec for name, (kind, spec) in targets.items() if kind in _LINEAR_TYPES}
    found = find_block_list(model)
    if found is None:
        if stages.block_transforms:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no repeated block list (an nn.ModuleList of same-class blocks); "
                "SmoothQuant and AWQ run per transformer block and need one, with a scale-group row in ptqkit/mappings.py"
            )
        stage_list = [("", model)]
        calls = calls_from_batches(batches, max_samples)
    else:
        list_name, blocks = found
        stage_list = [(f"{list_name}.{i}", block) for i, block in enumerate(blocks)]
        calls = capture_block_inputs(model, blocks[0], batches, max_samples=max_samples)
    results: dict[str, WeightQuantResult] = {}
    details: dict[str, Any] = {}
    with progress_bar(f"quantizing {len(stage_list)} block(s)", len(stage_list), progress) as advance:
        for index, (prefix, block) in enumerate(stage_list):
            inside = {n: s for n, s in linear_targets.items() if not prefix or n.startswith(prefix + ".")}
            if onload is not None:
                onload.load(prefix, block)
            block_results, details[prefix or "model"] = _quantize_stage(block, prefix, calls, inside, stages, quantize_weights, reduce)
            if index + 1 < len(stage_list):
                calls = next_block_calls(block, calls, prefix)
            if onload is not None:  # the onloader keeps what it needs; the float results go with the block
                onload.release(prefix, block, block_results)
            else:
                results.update(block_results)
            advance(1, current=stage_list[index + 1][0] if index + 1 < len(stage_list) else None)
    outside = sorted(set(targets) - set(results))
    if outside and onload is None:
        logger.info("%d targeted layer(s) outside the blocks use the data-free quantizer: %s", len(outside), outside)
    return results, details


def transform_blocks_(
    model: nn.Module, targets: Mapping[str, tuple[str, QuantSpec]], transforms: tuple[Any, ...], batches: Iterable[Any], *, max_samples: int, progress: bool = True
) -> dict[str, Any]:
    """Only the block transforms (SmoothQuant, AWQ scaling and clipping), in place, on a float
    model: its float function is unchanged except for AWQ's clipping. Returns their details."""
    _, details = quantize_blocks_(
        model, targets, Stages(block_transforms=transforms), batches, max_samples=max_samples, progress=progress, quantize_weights=False
    )
    return details


def _requests(stages: Stages, groups: list[ScaleGroup], targets: Mapping[str, QuantSpec], quantize_weights: bool) -> dict[str, StatsRequest]:
    """Per module name, the statistics the stage's algorithms declared in their registry rows:
    each block transform's of its scale groups' projections and of every target, and the
    weight quantizer's of every target."""
    requests: dict[str, StatsRequest] = {}

    def ask(names: Iterable[str], request: StatsRequest | None) -> None:
        for name in names if request is not None else ():
            requests[name] = requests.get(name, StatsRequest()) | request

    for config in stages.block_transforms:
        row = algorithm_of(config)
        ask([name for group in groups for name in group.projections], row.group_stats(config) if row.group_stats else None)
        ask(targets, row.layer_stats(config) if row.layer_stats else None)
    quantizer = stages.weight_quantizer
    if quantize_weights and quantizer is not None and algorithm_of(quantizer).engine_of(quantizer) is Engine.BLOCKS:
        ask(targets, algorithm_of(quantizer).layer_stats(quantizer))
    return requests


def _collect(
    root: nn.Module, calls: list[BlockCall], modules: Mapping[str, nn.Module], requests: Mapping[str, StatsRequest]
) -> dict[str, InputStatistics]:
    """One pass: the requested statistics, one object per distinct input (shared by name)."""
    if not requests:
        return {}
    leaders = shared_inputs(root, calls[0], {name: modules[name] for name in requests})
    merged: dict[str, StatsRequest] = {}
    for name, leader in leaders.items():
        merged[leader] = merged.get(leader, StatsRequest()) | requests[name]
    by_leader = {
        leader: InputStatistics(input_columns(modules[leader]).shape[1], request, leader) for leader, request in merged.items()
    }
    collect(root, by_leader, BlockCalls(calls, modules))
    return {name: by_leader[leader] for name, leader in leaders.items()}


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


@torch.no_grad()
def _quantize_stage(
    block: nn.Module,
    prefix: str,
    calls: list[BlockCall],
    targets: Mapping[str, QuantSpec],
    stages: Stages,
    quantize_weights: bool,
    reduce: Reduce | None,
) -> tuple[dict[str, WeightQuantResult], dict[str, Any]]:
    modules = {_qualified(prefix, n): m for n, m in block.named_modules()}
    groups = resolve_scale_groups(block, prefix) if stages.block_transforms else []
    stats = _collect(block, calls, modules, _requests(stages, groups, targets, quantize_weights))
    if reduce is not None:
        stats = dict(reduce(stats))
    details: dict[str, Any] = {}
    for config in stages.block_transforms:
        row = algorithm_of(config)
        details[row.name] = row.handler(config, modules, groups, stats, dict(targets))
    results: dict[str, WeightQuantResult] = {}
    quantizer = stages.weight_quantizer
    needs_hessian = quantizer is not None and algorithm_of(quantizer).engine_of(quantizer) is Engine.BLOCKS
    quantizer_name = algorithm_of(quantizer).name.upper() if needs_hessian else ""
    for name, spec in targets.items() if quantize_weights else ():
        module = modules[name]
        hessian = stats[name].hessian.hessian() if name in stats and stats[name].hessian is not None else None
        if needs_hessian and hessian is None:
            logger.warning("layer %r was never called on calibration data: round-to-nearest instead of %s", name, quantizer_name)
            result = quantize_weight(input_columns(module).detach(), spec, None, name=name)
        else:
            result = quantize_weight(input_columns(module).detach(), spec, stages.weight_quantizer, hessian, name=name)
        set_input_columns_(module, result.dequantized.to(module.weight.dtype))
        results[name] = result
    return results, details
