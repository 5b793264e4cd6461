"""Quantize a Hugging Face model whose weights do not fit in memory: layer onloading.

`quantize_onloaded(model_dir, recipe, calib)` runs the same driver as `pq.quantize`
(`engine.quantize.run`) with a weight residency that leaves the weights on disk, so the
block-by-block engine (`algorithms.blockwise`: SmoothQuant, AWQ, GPTQ or round-to-nearest) sees:

1. the model is built as a skeleton whose parameters live on the `meta` device (no memory;
   buffers such as rotary frequencies are real);
2. the weights outside the repeated blocks (embeddings, final norm, output head) are read from
   the safetensors file(s) (plain reads, no memory map: see `WeightStore`);
3. each block is materialised from disk just before the engine runs it, its targeted Linears
   are quantized, and right after its outputs are computed they are replaced by quantized
   modules that hold integer codes only: the block's float weights are released;
4. the quantized model is returned; `pq.save` writes it (`pq.load(out_dir, model_dir)` reads it).

Peak memory is the outside weights + one float block + the integer codes so far + the
calibration activations, not the float model (`ptqkit.engine.memory_plan` predicts it). Static input
activations need observers over the whole forward pass and are refused; weight-only and
dynamic-activation recipes run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.calibration.data import CalibrationData
from ptqkit.core.errors import ArtifactError, ConfigError
from ptqkit.engine.memory_plan import check_memory, plan_memory
from ptqkit.engine.quantize import convert_layer, run
from ptqkit.engine.recipe import Recipe
from ptqkit.engine.weight_store import (
    WeightStore,
    build_skeleton,
    materialize_,
    tensor_of,
    tensors_of,
    tokens_per_sample,
)
from ptqkit.nn.tree import replace_module

__all__ = ["quantize_onloaded"]

logger = logging.getLogger(__name__)


class _BlockOnloader:
    """The driver's weight residency with weights on disk (`engine.quantize.Residency`):
    refuse what cannot run block by block, read the weights outside the blocks once, then read
    each block before it runs, swap in its quantized layers and drop its float weights once its
    outputs are computed."""

    def __init__(self, store: WeightStore, memory_check: bool) -> None:
        self.store, self.memory_check = store, memory_check
        self.bytes_read = self.outside_bytes = 0
        self.converted: set[str] = set()
        self.model: nn.Module | None = None
        self.layers: dict[str, Any] = {}
        self.stages: Any = None

    def prepare(self, model: nn.Module, recipe: Recipe, the_plan: Any, stages: Any, data: Any) -> None:
        _check_recipe(recipe, stages)
        static = [layer.name for layer in the_plan.layers if layer.inputs is not None and not layer.inputs.dynamic]
        if static:
            raise ConfigError(
                f"recipe {recipe.name!r} quantizes the inputs of {len(static)} layer(s) statically (e.g. {static[0]!r}); "
                "onloading runs weight-only and dynamic-activation recipes (w4a16, w8a16, w8a8_dynamic)"
            )
        if self.memory_check:
            check_memory(plan_memory(
                model, recipe, samples=min(len(data), recipe.calibration.samples), seq_len=tokens_per_sample(data),
                batch_size=recipe.calibration.batch_size, onload=True,
            ))
        self.model, self.layers, self.stages = model, {layer.name: layer for layer in the_plan.layers}, stages
        self.outside_bytes = _materialize_outside(model, self.store)

    def load(self, prefix: str, block: nn.Module) -> None:
        self.bytes_read += materialize_(block, prefix, self.store)

    def release(self, prefix: str, block: nn.Module, results: dict[str, Any]) -> None:
        for name, result in results.items():
            module = self.model.get_submodule(name)
            quantized = convert_layer(module, self.layers[name], None, self.stages, result)
            quantized.drop_float_weight_()
            replace_module(self.model, name, quantized)
            self.converted.add(name)


def quantize_onloaded(
    model_dir: str | Path, recipe: Recipe, calib: Any, *, progress: bool = True, memory_check: bool = True
) -> nn.Module:
    """Quantize the Hugging Face causal LM in `model_dir` block by block with its weights on
    disk (see the module docstring); the result holds integer codes only and saves with
    `ptqkit.save`. `calib` is a CalibrationData (required: the block engine runs on it). The
    memory plan is checked first unless `memory_check` is False."""
    if not isinstance(calib, CalibrationData) or len(calib) == 0:
        raise ConfigError("quantize_onloaded: calib must be a non-empty CalibrationData (the block engine runs on it)")
    store = WeightStore(model_dir)
    onloader = _BlockOnloader(store, memory_check)
    model = run(build_skeleton(model_dir), recipe, calib, progress=progress, residency=onloader)
    logger.info("onloading read %.1f MB outside the blocks and %.1f MB of blocks", onloader.outside_bytes / 1e6, onloader.bytes_read / 1e6)
    return model


def _check_recipe(recipe: Recipe, stages: Any) -> None:
    if stages.layerwise or stages.pre_transforms or stages.analytic_correction is not None:
        raise ConfigError(
            f"recipe {recipe.name!r}: onloading runs the block-by-block engine (smoothquant, awq, gptq, rtn) on "
            "transformer blocks; bn_fold/cle/adaround/bias_correction are for models that fit in memory"
        )


def _materialize_outside(model: nn.Module, store: WeightStore) -> int:
    """Read every weight outside the repeated blocks, then re-tie tied embeddings."""
    from ptqkit.models.mappings import require_block_list

    list_name, _ = require_block_list(model, "onloading materialises one block at a time")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in store and hasattr(model, "lm_head"):
        model.lm_head.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # re-tied below
    loaded = materialize_(model, "", store, skip=list_name)
    if tied:
        model.tie_weights()
    meta = [
        name for name, owner, attr, is_param in tensors_of(model)
        if not name.startswith(list_name + ".") and tensor_of(owner, attr, is_param).device.type == "meta"
    ]
    if meta:
        raise ArtifactError(f"{store.root}: no weights for {meta}")
    return loaded
