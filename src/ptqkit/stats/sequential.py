"""Sequential (block-by-block) capture for transformers.

An LLM is calibrated one block at a time: the inputs of block 0 are captured once for every
calibration batch (the model runs up to block 0 and stops), then each block runs on its captured
inputs, its algorithms run, and its (quantized) outputs become the next block's inputs. Memory is
one block's inputs and outputs plus its statistics, never the whole model's activations.

A `BlockCall` is one batch's positional and keyword arguments to a block (hidden states first,
plus whatever the model passes along: attention mask, position embeddings...). A model without
repeated blocks is handled as a single stage whose calls are the calibration batches.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ptqkit.core.errors import CalibrationDataError
from ptqkit.stats.hooks import StopForward, Taps, limited_batches, run_batch, tapped

__all__ = [
    "BlockCall",
    "calls_from_batches",
    "capture_block_inputs",
    "run_calls",
    "next_block_calls",
    "shared_inputs",
    "fused_attention",
    "StopForward",
    "run_batch",
]

logger = logging.getLogger(__name__)


@dataclass
class BlockCall:
    """One batch's arguments to a block (or to the whole model)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def with_hidden(self, hidden: torch.Tensor) -> "BlockCall":
        """The same call with new hidden states (the first argument)."""
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall((), {**self.kwargs, "hidden_states": hidden})


@contextmanager
def fused_attention(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model with PyTorch's fused attention (SDPA) inside the block, then
    restore its attention implementation.

    ptqkit loads models with eager attention (it exports to ONNX exactly), but eager attention
    materializes every [heads, T, T] score matrix, which SDPA does not. Calibration statistics
    change only by float rounding. Models that do not support SDPA keep
    their implementation. Only the block-by-block engine uses it: it observes Linear inputs,
    never the attention internals that SDPA fuses away.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before == "eager" and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError, NotImplementedError) as error:
            logger.info("keeping eager attention for calibration: %s", error)
            switch = False
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def calls_from_batches(batches: Iterable[Any], max_samples: int) -> list[BlockCall]:
    """Calibration batches as calls of the whole model (a dict batch becomes keywords)."""
    calls = []
    for batch, _ in limited_batches(batches, max_samples):
        if isinstance(batch, Mapping):
            calls.append(BlockCall((), dict(batch)))
        elif isinstance(batch, (tuple, list)):
            calls.append(BlockCall(tuple(batch), {}))
        else:
            calls.append(BlockCall((batch,), {}))
    return calls


def _without_cache(model: nn.Module) -> Any:
    """Turn off a Hugging Face model's KV cache (returns the old setting to restore)."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None and old:
        config.use_cache = False
    return old


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any], *, max_samples: int) -> list[BlockCall]:
    """Run each batch through `model` until `block` is called; record the block's arguments."""
    calls: list[BlockCall] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(BlockCall(tuple(args), dict(kwargs)))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    old_cache = _without_cache(model)
    was_training = model.training
    model.eval()
    try:
        for index, (batch, _) in enumerate(limited_batches(batches, max_samples)):
            before = len(calls)
            run_batch(model, batch, index)
            if len(calls) == before:
                raise CalibrationDataError(
                    f"calibration batch {index} ran through the model without reaching its first block; "
                    "the block list found is not on the forward path"
                )
    finally:
        handle.remove()
        model.train(was_training)
        if old_cache:
            model.config.use_cache = old_cache
    if not calls:
        raise CalibrationDataError("calibration data is empty: no sample reached the model")
    return calls


def _hidden_of(output: Any, where: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CalibrationDataError(f"{where} returned {type(output).__name__}; expected hidden states (a tensor or a tuple starting with one)")


@torch.inference_mode()
def run_calls(module: nn.Module, calls: list[BlockCall]) -> None:
    """Run `module` on every call (for the side effects of hooks)."""
    for call in calls:
        call.run(module)


@torch.inference_mode()
def next_block_calls(block: nn.Module, calls: list[BlockCall], where: str) -> list[BlockCall]:
    """Run `block` on every call; its outputs become the hidden states of the next block's calls."""
    return [call.with_hidden(_hidden_of(call.run(block), where)) for call in calls]


@torch.inference_mode()
def shared_inputs(root: nn.Module, call: BlockCall, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """For each of `modules` (by name), the first of them that receives the very same input
    tensor object in one run of `call` (itself when none does): q/k/v share their norm's
    output. Modules that are never called are left out (logged)."""
    seen: list[tuple[torch.Tensor, str]] = []
    leader: dict[str, str] = {}

    def received(name: str) -> Callable[[torch.Tensor], None]:
        def update(x: torch.Tensor) -> None:
            leader[name] = next((other for other_x, other in seen if other_x is x), name)
            if leader[name] == name:
                seen.append((x, name))

        return update

    with tapped(modules, Taps(inputs={name: received(name) for name in modules})):
        call.run(root)
    missing = [name for name in modules if name not in leader]
    if missing:
        logger.info("modules never called in a calibration run (no statistics): %s", missing)
    return leader
