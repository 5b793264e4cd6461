"""Hook-based calibration: forward pre-hooks feed each targeted module's input to its observer.

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
from ptqkit.core.primitives import check_finite
from ptqkit.core.progress import progress_bar
from ptqkit.core.spec import QuantSpec

__all__ = ["calibrate_inputs", "input_column_ranges", "run_with_input_hooks", "batch_length", "slice_batch", "limited_batches"]

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


def calibrate_inputs(
    model: nn.Module,
    specs: Mapping[str, QuantSpec],
    batches: Iterable[Any],
    *,
    max_samples: int,
    progress: bool = True,
    total_batches: int | None = None,
    input_transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Run `batches` through `model` and return one filled observer per module name in `specs`
    (observing that module's first input). Stops after `max_samples` samples. A module named
    in `input_transforms` is observed on transform(input): what its quantizer will see (its
    input with calibrated outlier columns zeroed, or divided by its smoothing divisors)."""
    from ptqkit.observers import make_observer

    observers = {name: make_observer(spec) for name, spec in specs.items()}
    transforms = dict(input_transforms or {})

    def update(name: str, x: torch.Tensor) -> None:
        observers[name].update(transforms[name](x) if name in transforms else x)

    seen = run_with_input_hooks(model, {name: update for name in observers}, batches, "calibrating", max_samples, progress, total_batches)
    logger.info("calibrated %d module input(s) on %d sample(s)", len(observers), seen)
    return observers


def input_column_ranges(
    model: nn.Module, names: Iterable[str], batches: Iterable[Any], *, max_samples: int, progress: bool = True,
    total_batches: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) per input column (last dimension) of each named module over the calibration
    batches: {name: ([C], [C])}."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(name: str, x: torch.Tensor) -> None:
        check_finite(x, f"input of module {name!r}")
        rows = x.reshape(-1, x.shape[-1]).float()  # [N, C]
        low, high = rows.amin(0), rows.amax(0)
        if name in ranges:
            low, high = torch.minimum(ranges[name][0], low), torch.maximum(ranges[name][1], high)
        ranges[name] = (low, high)

    run_with_input_hooks(model, {name: update for name in names}, batches, "input column ranges", max_samples, progress, total_batches)
    return ranges


def run_with_input_hooks(
    model: nn.Module, updates: Mapping[str, Callable[[str, torch.Tensor], None]], batches: Iterable[Any], label: str,
    max_samples: int, progress: bool, total_batches: int | None,
) -> int:
    """Run `batches` (the first `max_samples` samples) through `model` in inference mode with
    `updates[name](name, x)` called on each named module's first input; returns the samples run.
    Hooks are removed and the train/eval mode restored whatever happens."""
    modules = dict(model.named_modules())
    where = {"batch": 0, "first": 0, "last": 0}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            try:
                updates[name](name, x.detach())
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
