"""Float ONNX export with the dynamo exporter, and the map from ONNX nodes back to module names.

Measured with transformers 5.23 / torch 2.13: the TorchScript exporter (`dynamo=False`) gave a
wrong BERT graph, the dynamo exporter (opset 18) an exact one. The dynamo exporter keeps
parameter names as initializer names where it can, constant-folds a Linear's transposed weight
into a fresh initializer ("val_87", layout [in, out]) and records the module stack of every node
in its metadata (`pkg.torch.onnx.name_scopes`: ['', 'encoder', 'encoder.layer.0', ...,
'encoder.layer.0.attention.self.query', 'linear']). The module that issued a node is the
second-to-last scope. onnx and torch.onnx are imported lazily.
"""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ptqkit.core.errors import ExportError
from ptqkit.core.quiet import quiet_third_party

__all__ = [
    "ExampleInputs",
    "LayerNode",
    "MS_DOMAIN",
    "bias_add_after",
    "consumer_indices",
    "export_float_onnx",
    "find_layer_nodes",
    "gelu_in_fusable_order_",
    "flatten_example_inputs",
    "initializer_map",
    "node_module_name",
    "use_ms_domain_",
]

logger = logging.getLogger(__name__)

# A tensor, a tuple/list of tensors (positional arguments) or a mapping (keyword arguments).
ExampleInputs = Any
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MatMulNBits, MatMulIntegerToFloat, ...)


def _split_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for `model(*args, **kwargs)`; raises ExportError on anything else."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)]
        if bad or not example_inputs:
            raise ExportError(
                f"example_inputs: every value of the mapping must be a torch.Tensor; got {bad or 'an empty mapping'} "
                "(pass e.g. dict(tokenizer(texts, return_tensors='pt')))"
            )
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs), {}
    raise ExportError(
        f"example_inputs must be a tensor, a non-empty tuple/list of tensors or a mapping name -> tensor, "
        f"got {type(example_inputs).__name__}"
    )


def flatten_example_inputs(example_inputs: ExampleInputs) -> list[tuple[str | None, np.ndarray]]:
    """The inputs in graph order as (keyword name or None, numpy array) pairs, for ONNX Runtime feeds."""
    args, kwargs = _split_inputs(example_inputs)
    return [(None, t.detach().cpu().numpy()) for t in args] + [(k, v.detach().cpu().numpy()) for k, v in kwargs.items()]


def export_float_onnx(
    model: nn.Module, example_inputs: ExampleInputs, path: str | Path, *, opset: int = 18, dynamic: bool = True
) -> Any:
    """Export `model` (float) with the dynamo exporter; returns the `onnx.ModelProto` (also saved at `path`).

    `dynamic=True` lets every input dimension vary (`torch.export.Dim.AUTO`: the exporter keeps
    static what the model needs static); use example inputs whose sizes are >= 2 so they are not
    specialized as 0/1.
    """
    import onnx  # noqa: F401  (fail early with a clear ImportError)
    from torch.export import Dim

    args, kwargs = _split_inputs(example_inputs)
    dynamic_shapes = None
    if dynamic:
        arg_shapes = tuple({i: Dim.AUTO for i in range(t.dim())} for t in args)
        kw_shapes = {k: {i: Dim.AUTO for i in range(v.dim())} for k, v in kwargs.items()}
        dynamic_shapes = {**kw_shapes} if not args else (arg_shapes if not kwargs else None)
        if dynamic_shapes is None:
            raise ExportError("example_inputs: pass either positional tensors or keyword tensors, not both")
    model = model.eval()
    try:  # the example must run in torch first: the exporter's errors on a misfit input are pages long
        with torch.no_grad():
            model(*args, **kwargs)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's forward raises anything on bad input
        raise ExportError(
            f"example_inputs ({', '.join(str(tuple(t.shape)) for t in [*args, *kwargs.values()])}) do not fit "
            f"{type(model).__name__}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    try:
        with torch.no_grad(), quiet_third_party():  # the exporter's notes on optional torchvision ops say nothing here
            program = torch.onnx.export(
                model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
            )
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many types; name the model and keep the cause
        raise ExportError(f"torch.onnx.export(dynamo=True, opset={opset}) failed for {type(model).__name__}: {exc}") from exc
    proto = program.model_proto
    gelu_in_fusable_order_(proto.graph)
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    onnx.save_model(proto, str(path))
    logger.info("float ONNX graph: %d nodes, %d initializers -> %s", len(proto.graph.node), len(proto.graph.initializer), path)
    return proto


def _scalar_initializers(graph: Any) -> dict[str, float]:
    from onnx import numpy_helper

    return {i.name: float(numpy_helper.to_array(i).reshape(-1)[0]) for i in graph.initializer if int(np.prod(i.dims)) == 1}


def gelu_in_fusable_order_(graph: Any) -> int:
    """Reorder the exporter's erf GELU so that ONNX Runtime fuses it into one Gelu kernel; returns how many.

    The dynamo exporter writes GELU as `x * (0.5 * (1 + erf(x / sqrt(2))))`; ORT's GeluFusion
    (ORT 1.32) matches `(x * (1 + erf(x / sqrt(2)))) * 0.5` but not this order, so each GELU ran
    as five elementwise kernels. Multiplying by 0.5 is exact in binary floating point, so both
    orders give the same bits; only the two Mul nodes change inputs (in place).
    """
    scalars = _scalar_initializers(graph)
    consumers = consumer_indices(graph)
    producer = {o: node for node in graph.node for o in node.output}

    def only_consumer(name: str, op_type: str) -> Any:
        found = [graph.node[i] for i in consumers.get(name, [])]
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    def other_input(node: Any, known: str) -> str:
        return node.input[1] if node.input[0] == known else node.input[0]

    count = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        add = only_consumer(erf.output[0], "Add")
        half = add and only_consumer(add.output[0], "Mul")
        outer = half and only_consumer(half.output[0], "Mul")
        if div is None or div.op_type != "Div" or outer is None:
            continue
        x, half_const = div.input[0], other_input(half, add.output[0])
        constants_match = (
            abs(scalars.get(div.input[1], 0.0) - 2**0.5) < 1e-6
            and scalars.get(other_input(add, erf.output[0])) == 1.0
            and scalars.get(half_const) == 0.5
            and other_input(outer, half.output[0]) == x
        )
        if not constants_match:
            continue
        half.input[:] = [x, add.output[0]]  # x * (1 + erf)
        outer.input[:] = [half.output[0], half_const]  # ... * 0.5
        count += 1
    if count:
        logger.debug("GELU: %d erf patterns put in the order ONNX Runtime fuses", count)
    return count


def node_module_name(node: Any) -> str | None:
    """The qualified name of the module that issued `node` (from the dynamo exporter's metadata)."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2:
                return str(scopes[-2])
    return None


def initializer_map(graph: Any) -> dict[str, Any]:
    """name -> TensorProto of every initializer (and of Constant nodes' values)."""
    out = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = node.attribute[0].t
    return out


@dataclass(frozen=True)
class LayerNode:
    """The ONNX node that computes one quantized module's weight product.

    `weight_layout` is "in_out" (MatMul B, or Gemm with transB=0), "out_in" (Gemm with
    transB=1) or "conv" ([out, in/groups, *kernel]).
    """

    module: str
    node_index: int
    op_type: str
    weight_name: str
    weight_layout: str


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_layer_nodes(proto: Any, modules: Sequence[str]) -> tuple[dict[str, LayerNode], dict[str, str]]:
    """Match each module name to its MatMul/Gemm/Conv node whose weight is a constant.

    Returns (found, missing) where `missing` maps a module name to why it was not found.
    """
    graph = proto.graph
    inits = initializer_map(graph)
    wanted = set(modules)
    found: dict[str, LayerNode] = {}
    notes: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        module = node_module_name(node)
        if module not in wanted:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            notes.setdefault(module, f"{node.op_type} node {node.name!r} has a non-constant weight input")
            continue
        if module in found:
            notes[module] = f"two weight products ({found[module].op_type}, {node.op_type}) trace back to it"
            continue
        if node.op_type == "MatMul":
            layout = "in_out"
        elif node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                notes[module] = f"Gemm node {node.name!r} has transA/alpha/beta the rewriter does not handle"
                continue
            layout = "out_in" if _attr(node, "transB", 0) else "in_out"
        else:
            layout = "conv"
        found[module] = LayerNode(module, index, node.op_type, node.input[1], layout)
    for module in modules:
        if module in notes and module in found and notes[module].startswith("two"):
            del found[module]
        if module not in found:
            notes.setdefault(module, "no MatMul/Gemm/Conv node of the exported graph carries this module's name scope")
    return found, {m: notes[m] for m in modules if m not in found}


def consumer_indices(graph: Any) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it."""
    out: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            out.setdefault(name, []).append(index)
    return out


def bias_add_after(graph: Any, node: Any, readers: dict[str, list[int]], inits: dict[str, Any]) -> tuple[int, str] | None:
    """(index, bias initializer) of the Add that is the only reader of `node`'s first output and
    adds a 1-D constant to it — a layer's bias a fused kernel can take in; else None (also when
    that output is a graph output, which folding the Add would remove)."""
    users = readers.get(node.output[0], [])
    if len(users) != 1 or graph.node[users[0]].op_type != "Add" or node.output[0] in {o.name for o in graph.output}:
        return None
    add = graph.node[users[0]]
    others = [name for name in add.input if name != node.output[0]]
    if len(others) != 1 or others[0] not in inits or len(inits[others[0]].dims) != 1:
        return None
    return users[0], others[0]


def use_ms_domain_(proto: Any) -> None:
    """Declare ONNX Runtime's com.microsoft opset (version 1) if the model does not yet."""
    if not any(op.domain == MS_DOMAIN for op in proto.opset_import):
        from onnx import helper

        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def replace_nodes_(graph: Any, replacements: dict[int, list[Any]], new_initializers: list[Any]) -> None:
    """Swap graph nodes by index for their replacement lists (in place, order kept), add
    `new_initializers`, and drop initializers no node or output reads any more."""
    new_nodes: list[Any] = []
    for index, node in enumerate(graph.node):
        new_nodes.extend(replacements.get(index, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + list(new_initializers))
