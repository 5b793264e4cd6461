"""The one statistics collector: every statistic an algorithm, calibration or evaluation needs
of a layer is an object with `update(...)`, and `collect` feeds each named module's tensors to its
statistic over one source of forward passes. It is the one place data runs through a model with
hooks (`stats.hooks.tapped`).

What a statistic is fed, by its `tap` (default "input"): "input", the module's first input
before it runs, `update(x)`; "output", its first input and output after it ran, `update(x, y)`.
Paired sources (`stats.paired`) run a reference model (the float one) on the same data alongside
and hand the reference's tensor first: `update(x_ref, x)` for inputs, `update(y_ref, x, y)` for
outputs (the reference's output only: its inputs are not kept).

Statistics: observers (`ptqkit.observers`: ranges for static input quantization), `ColumnRange`
(per-column min/max: input smoothing, outlier channels), `InputStatistics` (absmax, mean |x|,
sampled rows, Hessians: SmoothQuant, AWQ, GPTQ), `Captured` (the inputs themselves), `Callback`
(a function). Sources: `ModelBatches` (whole-model forwards over calibration batches, in inference
mode, hooks removed and train/eval mode restored whatever happens; optionally stopped at the
tapped modules), `BlockCalls` (one block replayed on its captured inputs, `stats.sequential`) and
the paired ones. Statistics first, then apply: algorithms read what was collected and never run
data themselves (the layer engine's paired sources are the one exception: see `stats.paired`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ptqkit.core.errors import CalibrationDataError
from ptqkit.core.primitives import check_finite
from ptqkit.core.spec import QuantSpec
from ptqkit.stats.hooks import Taps, run_batches, tapped
from ptqkit.stats.sequential import BlockCall, run_calls

__all__ = [
    "BlockCalls",
    "Callback",
    "Captured",
    "ColumnRange",
    "ModelBatches",
    "Source",
    "Statistic",
    "Tap",
    "calibrate_inputs",
    "collect",
    "first_inputs",
    "input_column_ranges",
]

logger = logging.getLogger(__name__)

Tap = Literal["input", "output"]


class Statistic(Protocol):
    """Anything that streams a layer's tensors in: `update(x)`, or what its `tap` says."""

    def update(self, *tensors: Any) -> None: ...


class Source(Protocol):
    """A way of running data through `model` with `taps` on its modules; returns what it ran."""

    def run(self, model: nn.Module, taps: Taps) -> int: ...


@dataclass(frozen=True)
class Callback:
    """A statistic from a function: `update` is called with what `tap` hands out."""

    update: Callable[..., None]
    tap: Tap = "input"


class Captured:
    """A module's inputs themselves (a copy per batch), concatenated along the batch axis."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parts: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.parts.append(x.clone())

    def tensor(self) -> torch.Tensor:
        """[N, ...]; refuses when no sample reached the module."""
        if not self.parts:
            raise CalibrationDataError(f"calibration data is empty: no sample reached the layer {self.name!r}")
        return torch.cat(self.parts)


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
    """Whole-model forwards over the first `max_samples` samples of `batches`; with `stop`, each
    forward ends once every tapped module has handed out its tensors (the rest does not run)."""

    batches: Iterable[Any]
    max_samples: int
    label: str = "calibrating"
    progress: bool = True
    total_batches: int | None = None
    stop: bool = False

    def run(self, model: nn.Module, taps: Taps) -> int:
        return run_batches(model, taps, self.batches, self.label, self.max_samples, self.progress, self.total_batches, self.stop)


@dataclass(frozen=True)
class BlockCalls:
    """One block (the `model` given to `collect`) replayed on its captured calls; `modules`
    are its submodules by the names the statistics use (qualified with the block's prefix)."""

    calls: list[BlockCall]
    modules: Mapping[str, nn.Module]

    def run(self, model: nn.Module, taps: Taps) -> int:
        with tapped(self.modules, taps):
            run_calls(model, self.calls)
        return len(self.calls)


def _fed(statistic: Any, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[..., None]:
    update = statistic.update
    return update if transform is None else (lambda x: update(transform(x)))


def collect(
    model: nn.Module,
    statistics: Mapping[str, Statistic],
    source: Source,
    *,
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> int:
    """Feed each module named in `statistics` to its statistic over `source`, what its `tap`
    says (see the module docstring); an input tap of a module named in `transforms` feeds
    transform(input) instead (what its quantizer will see; single-model sources only).
    Returns what the source ran (samples, or calls)."""
    transforms = dict(transforms or {})
    taps: dict[str, dict[str, Callable[..., None]]] = {"input": {}, "output": {}}
    for name, statistic in statistics.items():
        tap = getattr(statistic, "tap", "input")
        if tap not in taps:
            raise ValueError(f"statistic of module {name!r} taps {tap!r}; valid taps: {sorted(taps)}")
        if name in transforms and (tap != "input" or getattr(source, "paired", False)):
            raise ValueError(f"transforms apply to single-model input taps; module {name!r} taps {tap!r} on {type(source).__name__}")
        taps[tap][name] = _fed(statistic, transforms.get(name))
    return source.run(model, Taps(taps["input"], taps["output"]))


def first_inputs(model: nn.Module, name: str, batches: Iterable[Any], max_samples: int) -> torch.Tensor:
    """The first input of module `name` on every batch (the first `max_samples` samples),
    concatenated along the batch axis [N, ...]; each forward stops at the module."""
    captured = Captured(name)
    with torch.inference_mode():
        collect(model, {name: captured}, ModelBatches(batches, max_samples, progress=False, stop=True))
        return captured.tensor()


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
