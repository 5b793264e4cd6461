"""The one statistics collector: every statistic an algorithm or calibration needs of a layer's
input is an object with `update(x)`, and `collect` feeds each named module's first input to its
statistic over one source of forward passes.

Statistics: observers (`ptqkit.observers`: ranges for static input quantization), `ColumnRange`
(per-column min/max: input smoothing, outlier channels), `InputStatistics` (absmax, mean |x|,
sampled rows, Hessians: SmoothQuant, AWQ, GPTQ). Sources: `ModelBatches` (whole-model forwards
over calibration batches, in inference mode, hooks removed and train/eval mode restored whatever
happens) and `BlockCalls` (one block replayed on its captured inputs, `stats.sequential`).
Statistics first, then apply: algorithms read what was collected and never run data themselves.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ptqkit.core.primitives import check_finite
from ptqkit.core.spec import QuantSpec
from ptqkit.stats.hooks import run_with_input_hooks
from ptqkit.stats.sequential import BlockCall, observe_inputs

__all__ = [
    "BlockCalls",
    "ColumnRange",
    "ModelBatches",
    "Statistic",
    "calibrate_inputs",
    "collect",
    "input_column_ranges",
]

logger = logging.getLogger(__name__)


class Statistic(Protocol):
    """Anything that streams a layer's inputs in."""

    def update(self, x: torch.Tensor) -> None: ...


class ColumnRange:
    """(min, max) per input column (the last dimension) of one layer's input."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.low: torch.Tensor | None = None  # [C]
        self.high: torch.Tensor | None = None  # [C]

    def update(self, x: torch.Tensor) -> None:
        check_finite(x, f"input of module {self.name!r}")
        rows = x.reshape(-1, x.shape[-1]).float()  # [N, C]
        low, high = rows.amin(0), rows.amax(0)
        if self.low is not None:
            low, high = torch.minimum(self.low, low), torch.maximum(self.high, high)
        self.low, self.high = low, high


@dataclass(frozen=True)
class ModelBatches:
    """Whole-model forwards over the first `max_samples` samples of `batches`."""

    batches: Iterable[Any]
    max_samples: int
    label: str = "calibrating"
    progress: bool = True
    total_batches: int | None = None

    def run(self, model: nn.Module, hooks: Mapping[str, Callable[[torch.Tensor], None]]) -> int:
        return run_with_input_hooks(model, hooks, self.batches, self.label, self.max_samples, self.progress, self.total_batches)


@dataclass(frozen=True)
class BlockCalls:
    """One block (the `model` given to `collect`) replayed on its captured calls; `modules`
    are its submodules by the names the statistics use (qualified with the block's prefix)."""

    calls: list[BlockCall]
    modules: Mapping[str, nn.Module]

    def run(self, model: nn.Module, hooks: Mapping[str, Callable[[torch.Tensor], None]]) -> int:
        observe_inputs(model, self.calls, {name: self.modules[name] for name in hooks}, hooks)
        return len(self.calls)


def collect(
    model: nn.Module,
    statistics: Mapping[str, Statistic],
    source: ModelBatches | BlockCalls,
    *,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> int:
    """Feed the first input of each module named in `statistics` to its statistic over `source`;
    a module named in `transforms` feeds transform(input) instead (what its quantizer will see).
    Returns what the source ran (samples, or block calls)."""
    transforms = dict(transforms or {})

    def hook_of(name: str) -> Callable[[torch.Tensor], None]:
        update = statistics[name].update
        if name in transforms:
            transform = transforms[name]
            return lambda x: update(transform(x))
        return update

    return source.run(model, {name: hook_of(name) for name in statistics})


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
    """One filled observer per module name in `specs` (observing that module's first input, or
    input_transforms[name] of it: the input with calibrated outlier columns zeroed, or divided by
    its smoothing divisors) over the first `max_samples` samples of `batches`."""
    from ptqkit.observers import make_observer

    observers = {name: make_observer(spec) for name, spec in specs.items()}
    source = ModelBatches(batches, max_samples, "calibrating", progress, total_batches)
    seen = collect(model, observers, source, transforms=input_transforms)
    logger.info("calibrated %d module input(s) on %d sample(s)", len(observers), seen)
    return observers


def input_column_ranges(
    model: nn.Module, names: Iterable[str], batches: Iterable[Any], *, max_samples: int, progress: bool = True,
    total_batches: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) per input column of each named module that ran: {name: ([C], [C])}."""
    ranges = {name: ColumnRange(name) for name in names}
    collect(model, ranges, ModelBatches(batches, max_samples, "input column ranges", progress, total_batches))
    return {name: (r.low, r.high) for name, r in ranges.items() if r.low is not None}
