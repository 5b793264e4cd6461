"""Hooks on named modules and the whole-model forward passes of `stats.collect`.

`Taps` say what a forward hands out, by module name: a module's first input before it runs, or
its first input and output after it ran; `tapped` hooks them on and always takes them off.
`run_batches` (the `ModelBatches` source) runs calibration batches under taps. No tracing: any
architecture works. Batches run under `torch.inference_mode()` (nothing records a graph, so
tensors are handed out as the model has them: identity comparisons work); hooks are always
removed and the model's train/eval mode restored, whether calibration succeeds or not.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ptqkit.calibration.data import call_model
from ptqkit.core.errors import CalibrationDataError, NonFiniteError, PTQError
from ptqkit.core.progress import progress_bar

__all__ = ["StopForward", "Taps", "batch_length", "limited_batches", "run_batch", "run_batches", "slice_batch", "tapped"]

logger = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


@dataclass(frozen=True)
class Taps:
    """Callbacks by module name: `inputs[name](x)` gets the module's first input before it runs;
    `outputs[name](x, y)` its first input and its output after it ran."""

    inputs: Mapping[str, Callable[..., None]] = field(default_factory=dict)
    outputs: Mapping[str, Callable[..., None]] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.inputs) | set(self.outputs)

    def wrapped(self, wrap: Callable[[str, str, Callable[..., None]], Callable[..., None]]) -> "Taps":
        """The same taps with each callback replaced by wrap(name, "input"/"output", callback)."""
        return Taps(
            {name: wrap(name, "input", f) for name, f in self.inputs.items()},
            {name: wrap(name, "output", f) for name, f in self.outputs.items()},
        )


def _first_input(args: tuple, kwargs: dict) -> Any:
    """A module call's first argument: the first positional one, else the first keyword one."""
    return args[0] if args else next(iter(kwargs.values()), None)


@contextmanager
def tapped(modules: Mapping[str, nn.Module], taps: Taps) -> Iterator[None]:
    """`taps` hooked on `modules` (by name) while the block runs; removed on any exit."""
    with ExitStack() as stack:
        for name, update in taps.inputs.items():
            hook = lambda module, args, kwargs, update=update: update(_first_input(args, kwargs))  # noqa: E731
            stack.callback(modules[name].register_forward_pre_hook(hook, with_kwargs=True).remove)
        for name, update in taps.outputs.items():
            hook = lambda module, args, kwargs, y, update=update: update(_first_input(args, kwargs), y)  # noqa: E731
            stack.callback(modules[name].register_forward_hook(hook, with_kwargs=True).remove)
        yield


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


class _Guard:
    """Wraps tap callbacks: a NaN/Inf a statistic meets names the module and the batch, and with
    `stop` the forward ends once every tapped module of the batch has handed out its tensors."""

    def __init__(self, taps: Taps, stop: bool) -> None:
        self.where = {"batch": 0, "first": 0, "last": 0}
        self.expected, self.stop, self.reached = taps.names(), stop, set()
        self.taps = taps.wrapped(self._wrap)

    def start(self, batch: int, first: int, count: int) -> None:
        self.where.update(batch=batch, first=first, last=first + count - 1)
        self.reached = set()

    def _wrap(self, name: str, point: str, update: Callable[..., None]) -> Callable[..., None]:
        def guarded(*tensors: Any) -> None:
            try:
                update(*tensors)
            except NonFiniteError:
                where = self.where
                raise CalibrationDataError(
                    f"NaN/Inf activation at the {point} of module {name!r} in calibration batch "
                    f"{where['batch']} (samples {where['first']}-{where['last']}); check that sample's "
                    "preprocessing, or the model's numerics in float"
                ) from None
            self.reached.add(name)
            if self.stop and self.reached >= self.expected:
                raise StopForward

        return guarded


def run_batch(model: nn.Module, batch: Any, index: int, samples: tuple[int, int] | None = None) -> None:
    """`model` on calibration batch number `index` (holding `samples`, first and count, when
    known), until a hook raises StopForward; an error of the model's own becomes a
    CalibrationDataError naming the batch."""
    try:
        call_model(model, batch)
    except StopForward:
        pass
    except PTQError:
        raise
    except Exception as exc:
        where = "" if samples is None else f" (samples {samples[0]}-{samples[0] + samples[1] - 1})"
        raise CalibrationDataError(
            f"calibration batch {index}{where} does not fit the model: {type(exc).__name__}: {exc}"
        ) from exc


def run_batches(
    model: nn.Module, taps: Taps, batches: Iterable[Any], label: str, max_samples: int, progress: bool,
    total_batches: int | None, stop: bool = False,
) -> int:
    """Run `batches` (the first `max_samples` samples) through `model` in inference mode with
    `taps` on its modules; with `stop`, each forward ends once every tapped module has handed out
    its tensors. Returns the samples run. Hooks are removed and the train/eval mode restored
    whatever happens."""
    guard = _Guard(taps, stop)
    was_training = model.training
    seen = 0
    try:
        model.eval()
        with tapped(dict(model.named_modules()), guard.taps), torch.inference_mode(), progress_bar(label, total_batches, progress) as advance:
            for index, (batch, first) in enumerate(limited_batches(batches, max_samples)):
                count = batch_length(batch)
                guard.start(index, first, count)
                run_batch(model, batch, index, (first, count))
                seen = first + count
                advance(1)
    finally:
        model.train(was_training)
    if seen == 0:
        raise CalibrationDataError("calibration data is empty: no sample reached the model")
    return seen
