"""Find cross-layer-equalization chains by running the model once on an example batch, for
models torch.fx cannot trace (the fallback of `cle_graph`).

Forward hooks record every call of a leaf module (its name, first input and output tensors,
in execution order), and a torch function mode records which module read each of those
outputs: every torch operation reading a tensor is attributed to the leaf module running at
that moment, or to none when plain code outside any module runs it (`x + f(x)`, `torch.flatten`).
Module hooks alone would miss such functional readers, and rescaling a tensor that a residual
add also reads changes the model; counting reads at the operation level closes that hole.

A link is layer A → [at most one BatchNorm] → [at most one activation] → layer B where every
tensor on the way is read by exactly one module (all its reads happen inside that module),
each module runs once, and a module that returns its input unchanged (Identity, eval Dropout)
is transparent. The rules are those of `cle_graph`, so `equalize_` judges the same chains.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ptqkit.algorithms.cle_graph import BATCHNORMS, LAYERS, join_links, passes_through
from ptqkit.models.mappings import CLEChain
from ptqkit.stats.sequential import run_batch

__all__ = ["captured_cle_chains"]

logger = logging.getLogger(__name__)

_OUTSIDE = ""  # the reader name for plain code outside every leaf module


@dataclass(frozen=True)
class _Call:
    name: str
    input: Any
    output: Any


class _ReadRecorder(TorchFunctionMode):
    """Attributes every torch operation's tensor arguments to the running leaf module."""

    def __init__(self, running: list[str], watched: dict[int, torch.Tensor], readers: dict[int, list[str]]) -> None:
        super().__init__()
        self.running, self.watched, self.readers = running, watched, readers

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        reader = self.running[-1] if self.running else _OUTSIDE
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, torch.Tensor) and id(item) in self.watched:
                    self.readers[id(item)].append(reader)
        return func(*args, **kwargs)


def _record(model: nn.Module, batch: Any) -> tuple[list[_Call], dict[int, list[str]]]:
    leaves = {name: m for name, m in model.named_modules() if not any(True for _ in m.children())}
    calls: list[_Call] = []
    running: list[str] = []
    watched: dict[int, torch.Tensor] = {}  # kept alive, so ids stay unique
    readers: dict[int, list[str]] = {}

    def before(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            running.append(name)
        return hook

    def after(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            running.pop()
            first = args[0] if args else None
            calls.append(_Call(name, first, output))
            if isinstance(output, torch.Tensor) and id(output) not in watched:
                watched[id(output)] = output
                readers[id(output)] = []
        return hook

    handles = []
    for name, module in leaves.items():
        handles.append(module.register_forward_pre_hook(before(name)))
        handles.append(module.register_forward_hook(after(name)))
    try:
        with torch.inference_mode(), _ReadRecorder(running, watched, readers):
            run_batch(model, batch, 0)
    finally:
        for handle in handles:
            handle.remove()
    return calls, readers


def captured_cle_chains(model: nn.Module, example: Any) -> list[CLEChain]:
    """CLE chains seen while `model` runs on `example` (one calibration batch)."""
    calls, readers = _record(model, example)
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for call in calls:
        counts[call.name] = counts.get(call.name, 0) + 1
    transparent = {c.name for c in calls if c.output is c.input}
    by_input: dict[int, _Call] = {}
    for call in calls:
        if counts[call.name] == 1 and call.name not in transparent and isinstance(call.input, torch.Tensor):
            by_input.setdefault(id(call.input), call)

    def sole_reader(tensor: Any) -> _Call | None:
        """The one module call that reads `tensor`, if there is one (modules that return their
        input unchanged are skipped: the tensor passes through them as it is)."""
        if not isinstance(tensor, torch.Tensor) or id(tensor) not in readers:
            return None
        call = by_input.get(id(tensor))
        names = {r for r in readers[id(tensor)] if r not in transparent}
        return call if call is not None and names == {call.name} else None

    links: dict[str, tuple[str | None, str]] = {}
    for call in calls:
        if counts[call.name] != 1 or not isinstance(modules[call.name], LAYERS):
            continue
        activation = batchnorm = None
        current = sole_reader(call.output)
        while current is not None:
            module = modules[current.name]
            if isinstance(module, LAYERS):
                links[call.name] = (batchnorm or activation, current.name)
                break
            if passes_through(module):
                pass  # transparent in eval mode, even where it returns a new tensor
            elif isinstance(module, BATCHNORMS) and batchnorm is None and activation is None:
                batchnorm = current.name
            elif activation is None:
                activation = current.name
            else:
                break
            current = sole_reader(current.output)
    chains = join_links(links, [c.name for c in calls])
    logger.info("cle: %d chain(s) captured from one forward with hooks", len(chains))
    return chains
