"""Hook-based forward passes: forward pre-hooks hand each named module's input to a callback
(`run_with_input_hooks`, the whole-model source of `stats.collect`), and batch helpers.

No tracing: any architecture works. Batches run under `torch.inference_mode()`; hooks are
always removed and the model's train/eval mode restored, whether calibration succeeds or not.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ptqkit.calibration.data import call_model
from ptqkit.core.errors import CalibrationDataError, NonFiniteError, PTQError
from ptqkit.core.progress import progress_bar

__all__ = ["run_with_input_hooks", "batch_length", "slice_batch", "limited_batches"]

logger = logging.getLogger(__name__)


def batch_length(batch: Any) -> int:
    """Number of samples in a model input (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return batch_length(value)
    raise CalibrationDataError(f"calibration batch of type {type(batch).__name__} holds no tensor")


def slice_batch(batch: Any, count: int) -> Any:
    """The first `count` samples of a model input."""
    if isinstance(batch, torch.Tensor):
        return batch[:count]
    if isinstance(batch, Mapping):
        return {k: v[:count] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(v[:count] if isinstance(v, torch.Tensor) else v for v in batch)


def limited_batches(batches: Iterable[Any], max_samples: int) -> Iterator[tuple[Any, int]]:
    """(batch, index of its first sample) for the batches holding the first `max_samples`
    samples; the last one is sliced to fit."""
    seen = 0
    for batch in batches:
        if seen >= max_samples:
            return
        count = batch_length(batch)
        if seen + count > max_samples:
            batch, count = slice_batch(batch, max_samples - seen), max_samples - seen
        yield batch, seen
        seen += count


def run_with_input_hooks(
    model: nn.Module, updates: Mapping[str, Callable[[torch.Tensor], None]], batches: Iterable[Any], label: str,
    max_samples: int, progress: bool, total_batches: int | None,
) -> int:
    """Run `batches` (the first `max_samples` samples) through `model` in inference mode with
    `updates[name](x)` called on each named module's first input; returns the samples run.
    Hooks are removed and the train/eval mode restored whatever happens."""
    modules = dict(model.named_modules())
    where = {"batch": 0, "first": 0, "last": 0}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            try:
                updates[name](x.detach())
            except NonFiniteError:
                raise CalibrationDataError(
                    f"NaN/Inf activation at the input of module {name!r} in calibration batch "
                    f"{where['batch']} (samples {where['first']}-{where['last']}); check that sample's "
                    "preprocessing, or the model's numerics in float"
                ) from None

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name), with_kwargs=True) for name in updates]
    was_training = model.training
    seen = 0
    try:
        model.eval()
        with torch.inference_mode(), progress_bar(label, total_batches, progress) as advance:
            for index, (batch, first) in enumerate(limited_batches(batches, max_samples)):
                count = batch_length(batch)
                where.update(batch=index, first=first, last=first + count - 1)
                try:
                    call_model(model, batch)
                except PTQError:
                    raise
                except Exception as exc:
                    raise CalibrationDataError(
                        f"calibration batch {index} (samples {first}-{first + count - 1}) does not fit the "
                        f"model: {type(exc).__name__}: {exc}"
                    ) from exc
                seen = first + count
                advance(1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise CalibrationDataError("calibration data is empty: no sample reached the model")
    return seen
