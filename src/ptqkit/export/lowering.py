"""The ONNX lowerings of quantized modules, one protocol for all of them.

A `Lowering` says for one kind of quantized module how it becomes integer ONNX:

- route by type: `modules`, the quantized module types it lowers, and `when(module, options)`, a
  further condition (the first lowering in `LOWERINGS` that takes a module gets it);
- refuse with a reason: `refusal(module)`, why this module has no integer form here (it then stays
  a float MatMul/Gather with its dequantized weight, and the export report says why), and
  `check(name, module)`, raised before the graph capture for a module that cannot be exported at all;
- rewrite: `find(proto, names, prefix)` locates the modules' nodes in the float graph and
  `rewrite(proto, nodes, modules, options)` replaces them.

Adding a lowering (a new ONNX Runtime kernel) is one module with these functions and one entry
in `LOWERINGS`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ptqkit.nn.modules import QuantConv, QuantEmbedding, QuantLinear

__all__ = ["LOWERINGS", "Lowering", "LoweringOptions", "lowering_of"]


@dataclass(frozen=True)
class LoweringOptions:
    """What rewrites read beside the modules: `nbits` (onnx_nbits.NBitsOptions), whether int8
    weights are stored as uint8 + 128 (`uint8_weights`) and the model's output quantizers
    (`outputs`: module name -> quantizer, `nn.output_quant`; the qdq lowering writes them)."""

    nbits: Any
    uint8_weights: bool
    outputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lowering:
    """One lowering (see the module docstring); `form` names it in routes and export reports,
    `what` names its modules in messages."""

    form: str
    what: str
    modules: tuple[type, ...]
    find: Callable[[Any, list[str], str], tuple[dict[str, Any], dict[str, str]]]
    rewrite: Callable[[Any, dict[str, Any], dict[str, Any], LoweringOptions], tuple[Any, list[Any]]]
    when: Callable[[Any, LoweringOptions], bool] = lambda module, options: True
    refusal: Callable[[Any], str | None] = lambda module: None
    check: Callable[[str, Any], None] = lambda name, module: None

    def takes(self, module: Any, options: LoweringOptions) -> bool:
        """Whether `module` is this lowering's: one of its types, and `when` accepts it."""
        return type(module) in self.modules and self.when(module, options)


def _routes_to_nbits(module: Any, options: LoweringOptions) -> bool:
    from ptqkit.export.onnx_nbits import routes_to_nbits

    return routes_to_nbits(module, options.nbits)


def _find_layers(proto: Any, names: list[str], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """`onnx_graph.find_layer_nodes` for module names under `prefix` in the graph, keyed without it."""
    from dataclasses import replace

    from ptqkit.export.onnx_graph import find_layer_nodes

    found, missing = find_layer_nodes(proto, [prefix + name for name in names])
    n = len(prefix)
    return {k[n:]: replace(ln, module=k[n:]) for k, ln in found.items()}, {k[n:]: why for k, why in missing.items()}


def _find_gathers(proto: Any, names: list[str], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    from ptqkit.export.onnx_gather import find_gather_nodes

    return find_gather_nodes(proto, names, prefix)


def _nbits_rewrite(proto: Any, nodes: dict[str, Any], modules: dict[str, Any], options: LoweringOptions) -> tuple[Any, list[Any]]:
    from ptqkit.export.onnx_nbits import insert_matmul_nbits

    return insert_matmul_nbits(proto, nodes, modules, options.nbits)


def _qdq_rewrite(proto: Any, nodes: dict[str, Any], modules: dict[str, Any], options: LoweringOptions) -> tuple[Any, list[Any]]:
    from ptqkit.export.onnx_qdq import insert_qdq

    return insert_qdq(proto, nodes, modules, uint8_weights=options.uint8_weights, outputs=options.outputs)


def _gather_rewrite(proto: Any, nodes: dict[str, Any], modules: dict[str, Any], options: LoweringOptions) -> tuple[Any, list[Any]]:
    from ptqkit.export.onnx_gather import insert_gather_block_quantized

    return insert_gather_block_quantized(proto, nodes, modules)


def _nbits_refusal(module: Any) -> str | None:
    from ptqkit.export.onnx_nbits import nbits_refusal

    return nbits_refusal(module)


def _gather_refusal(module: Any) -> str | None:
    from ptqkit.export.onnx_gather import gather_refusal

    return gather_refusal(module)


def _qdq_check(name: str, module: Any) -> None:
    from ptqkit.export.onnx_qdq import check_exportable

    check_exportable(name, module)


LOWERINGS: tuple[Lowering, ...] = (
    Lowering(
        "matmul_nbits", "quantized module(s)", (QuantLinear, QuantConv), _find_layers, _nbits_rewrite,
        when=_routes_to_nbits, refusal=_nbits_refusal,
    ),
    Lowering("qdq", "quantized module(s)", (QuantLinear, QuantConv), _find_layers, _qdq_rewrite, check=_qdq_check),
    Lowering("gather_block_quantized", "quantized embedding(s)", (QuantEmbedding,), _find_gathers, _gather_rewrite, refusal=_gather_refusal),
)


def lowering_of(module: Any, options: LoweringOptions) -> Lowering | None:
    """The first lowering that takes `module`, or None (not a module any lowering knows)."""
    return next((lowering for lowering in LOWERINGS if lowering.takes(module, options)), None)
