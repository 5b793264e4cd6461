"""One pass over a traced model (torch.fx) for the layer-by-layer algorithms: every calibration
batch runs node by node, twice in lockstep — through the float reference's modules and through
the model being quantized — and just before the first call of each selected layer a callback
gets that layer's inputs from both (all batches concatenated) and may change the layer in place;
the quantized side then runs the changed layer, so later layers see its effect.

Cost: two forwards of the calibration data in all, instead of two per layer for the hook-based
capture (`stats.paired.LayerForwards`), which remains the fallback for models torch.fx cannot trace.
The layer engine reaches it through `stats.collect` with the `stats.paired.Lockstep` source.
Memory: the live intermediate values of all calibration samples at once, twice (values are freed
after their last reader runs).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.fx
from torch import nn

from ptqkit.core.errors import CalibrationDataError, PTQError
from ptqkit.stats.sequential import BlockCall

__all__ = ["run_lockstep", "trace"]

logger = logging.getLogger(__name__)

Visit = Callable[[str, torch.Tensor, torch.Tensor], None]


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with ptqkit's own modules (CLE's clipped ReLU, quantized modules) as
    leaves: they are called as modules, never traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith(_LEAF_PACKAGES) or super().is_leaf_module(m, module_qualified_name)


_LEAF_PACKAGES = ("ptqkit.algorithms.", "ptqkit.nn.")


def trace(model: nn.Module) -> Any | None:
    """The model's torch.fx graph, or None (logged) when it does not trace."""
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        logger.info("%s does not trace with torch.fx (%s: %s); capturing layer inputs with hooks", type(model).__name__, type(exc).__name__, exc)
        return None


def _placeholder_values(graph: Any, call: BlockCall, index: int) -> dict[Any, Any]:
    values: dict[Any, Any] = {}
    positional = list(call.args)
    for node in (n for n in graph.nodes if n.op == "placeholder"):
        if positional:
            values[node] = positional.pop(0)
        elif node.target in call.kwargs:
            values[node] = call.kwargs[node.target]
        elif node.args:
            values[node] = node.args[0]  # the forward's default
        else:
            raise CalibrationDataError(f"calibration batch {index} gives no value for the model's input {node.target!r}")
    return values


def _attribute(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _execute(node: Any, root: nn.Module, modules: dict[str, nn.Module], env: dict[Any, Any]) -> Any:
    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return _attribute(root, node.target)
    raise AssertionError(f"unexpected fx node op {node.op!r}")


@torch.no_grad()
def run_lockstep(
    graph: Any, model: nn.Module, reference: nn.Module, calls: list[BlockCall], layers: Collection[str], visit: Visit
) -> list[str]:
    """Run `graph` (traced from `model`; `reference` has the same module names) on every call,
    float and quantized side by side; call `visit(name, x_fp, x_q)` before the first call of
    each module named in `layers` ([N, ...] inputs, batches concatenated). Returns the visited
    names in order."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    last_use = {}
    for position, node in enumerate(nodes):
        for source in node.all_input_nodes:
            last_use[source] = position
    sides = {
        "fp": (reference, dict(reference.named_modules())),
        "q": (model, dict(model.named_modules())),
    }
    envs = {side: [_placeholder_values(graph, call, i) for i, call in enumerate(calls)] for side in sides}
    visited: list[str] = []
    for position, node in enumerate(nodes):
        if node.op == "placeholder":
            continue
        if node.op == "call_module" and node.target in layers and node.target not in visited:
            first = node.args[0] if node.args else None
            if isinstance(first, torch.fx.Node):
                x_fp = torch.cat([env[first] for env in envs["fp"]])
                x_q = torch.cat([env[first] for env in envs["q"]])
                visit(node.target, x_fp, x_q)
                del x_fp, x_q
                visited.append(node.target)
        for side, (root, modules) in sides.items():
            for index, env in enumerate(envs[side]):
                try:
                    env[node] = _execute(node, root, modules, env)
                except PTQError:
                    raise
                except Exception as exc:
                    raise CalibrationDataError(
                        f"calibration batch {index} does not fit the model at {node.op} {node.target}: {type(exc).__name__}: {exc}"
                    ) from exc
                for source in node.all_input_nodes:
                    if last_use.get(source) == position:
                        del env[source]
    return visited
