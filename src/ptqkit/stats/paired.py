"""Paired sources of `stats.collect`: the same data runs through a reference model (the float one)
and the model under study, and each statistic gets the reference's tensor first.

- `PairedBatches` (evaluate): each batch through the reference, then the model; an output tap
  gets `update(y_ref, x, y)` when the model's module has run: the reference module's output on
  the reference's own activations (kept from its forward, dropped after the batch), and the
  model module's first input and output. A statistic may call the reference's modules itself
  (evaluate runs the float layer on the model's inputs); that does not overwrite `y_ref`.
- `Lockstep` and `LayerForwards` (the layer engine): an input tap gets `update(x_ref, x)` once
  per module, all samples concatenated [N, ...], before the model's module first runs, and may
  change that module in place (the layer engine quantizes it there): the model then runs the
  changed module, so later modules see its effect. This is the one place a statistic applies
  something mid-pass: each layer's inputs depend on the layers quantized before it.
  `Lockstep` runs a torch.fx graph of the model node by node, both models side by side (two
  forwards of the data in all); `LayerForwards`, the fallback for models torch.fx cannot trace,
  takes two collector passes per module (reference, then model), each forward stopped at it.
Memory: `PairedBatches` holds one batch's reference outputs of the tapped modules;
`LayerForwards` one module's inputs twice; `Lockstep` the live intermediate values of all
samples, twice.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ptqkit.calibration.samples import call_on_batch
from ptqkit.stats.collect import first_inputs
from ptqkit.stats.graph_pass import run_lockstep
from ptqkit.stats.hooks import Taps, batch_length, limited_batches, tapped
from ptqkit.stats.sequential import BlockCall

__all__ = ["LayerForwards", "Lockstep", "PairedBatches"]

Outputs = Callable[[Any, Any, Any, int], None]  # (reference output, model output, batch, index of its first sample)


def _refuse(source: Any, taps: Taps, point: str) -> None:
    names = sorted(taps.inputs if point == "input" else taps.outputs)
    if names:
        raise ValueError(f"{type(source).__name__} does not feed {point} taps; modules {names} tap their {point}")


@dataclass(frozen=True)
class PairedBatches:
    """The first `max_samples` samples of `batches` through `reference` and then the model,
    batch by batch, without changing either's train/eval mode; `outputs` (optional) gets both
    models' outputs after each batch. `where` names a batch in errors."""

    reference: nn.Module
    batches: Iterable[Any]
    max_samples: int
    outputs: Outputs | None = None
    where: str = "evaluation batch"
    paired: ClassVar[bool] = True

    @torch.no_grad()
    def run(self, model: nn.Module, taps: Taps) -> int:
        _refuse(self, taps, "input")
        pending: dict[str, torch.Tensor] = {}  # the reference's module outputs of this batch
        reading = [False]  # True while the reference model runs (not when a statistic calls its modules)

        def keep(name: str) -> Callable[[Any, Any], None]:
            def update(x: Any, y: Any) -> None:
                if reading[0] and isinstance(y, torch.Tensor):
                    pending[name] = y
            return update

        def compare(name: str) -> Callable[[Any, Any], None]:
            def update(x: Any, y: Any) -> None:
                if isinstance(y, torch.Tensor):
                    taps.outputs[name](pending.pop(name, None), x, y)
            return update

        samples = 0
        with tapped(dict(self.reference.named_modules()), Taps(outputs={name: keep(name) for name in taps.outputs})), \
                tapped(dict(model.named_modules()), Taps(outputs={name: compare(name) for name in taps.outputs})):
            for batch, first in limited_batches(self.batches, self.max_samples):
                n = batch_length(batch)
                where = f"{self.where} (samples {first}-{first + n - 1})"
                reading[0] = True
                try:
                    reference_output = call_on_batch(self.reference, batch, where)
                finally:
                    reading[0] = False
                output = call_on_batch(model, batch, where)
                if self.outputs is not None:
                    self.outputs(reference_output, output, batch, first)
                pending.clear()
                samples += n
        return samples


@dataclass(frozen=True)
class Lockstep:
    """`graph` (torch.fx, traced from the model) run on every call node by node, on `reference`
    (same module names) and on the model side by side. Returns the calls run."""

    reference: nn.Module
    graph: Any
    calls: list[BlockCall]
    paired: ClassVar[bool] = True

    def run(self, model: nn.Module, taps: Taps) -> int:
        _refuse(self, taps, "output")
        run_lockstep(self.graph, model, self.reference, self.calls, set(taps.inputs), lambda name, x_ref, x: taps.inputs[name](x_ref, x))
        return len(self.calls)


@dataclass(frozen=True)
class LayerForwards:
    """For each module tapped, in the order the statistics are given: its first inputs from
    `reference` and then from the model, over the first `max_samples` samples of a fresh
    `batches()` each, every forward stopped at the module. Returns the samples per pass."""

    reference: nn.Module
    batches: Callable[[], Iterable[Any]]
    max_samples: int
    paired: ClassVar[bool] = True

    def run(self, model: nn.Module, taps: Taps) -> int:
        _refuse(self, taps, "output")
        samples = 0
        for name, update in taps.inputs.items():
            x_ref = first_inputs(self.reference, name, self.batches(), self.max_samples)
            x = first_inputs(model, name, self.batches(), self.max_samples)
            samples = x.shape[0]
            update(x_ref, x)
            del x_ref, x
        return samples
