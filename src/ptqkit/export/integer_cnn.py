"""Fully integer CNN graphs for ONNX Runtime: output scales where no quantized layer gives one.

ONNX Runtime runs a convolution on QLinearConv only when a QuantizeLinear follows it, a residual
Add on QLinearAdd only when both inputs come through DequantizeLinear and a QuantizeLinear
follows, global average pooling on QLinearGlobalAveragePool likewise. A conv whose output a
quantized layer reads takes that layer's input parameters (`onnx_qdq.output_quantizers`); the
tensors no quantized layer reads alone — a conv's output before a residual add, the residual
stream, the last activation before pooling — need their own, and the simulated model has to
quantize them at the same place (`nn.output_quant`). This module finds those tensors in the
float graph (`integer_points`), calibrates them (`calibrate_outputs_`: a tensor that a quantized
layer also reads takes that layer's input parameters, the others are observed with ptqkit's
observers on calibration data through the statistics collector) and writes them into the
integer graph (`insert_output_qdq`), ReduceMean over H, W becoming GlobalAveragePool.

Relu, Clip and MaxPool between a producer and its readers are walked through: quantizing with a
zero point of 0 and a top code at or below the clip's maximum is the same before or after them
(MaxPool commutes with any monotone rounding), and ORT drops them into the integer kernels.
"""
from __future__ import annotations

import ast
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerTensor
from ptqkit.core.spec import QuantSpec

__all__ = [
    "OutputPoint",
    "PASS_THROUGH",
    "calibrate_outputs_",
    "float_op_share",
    "insert_output_qdq",
    "integer_points",
    "module_outputs",
]

logger = logging.getLogger(__name__)

PASS_THROUGH = ("Relu", "Clip", "MaxPool")  # ops a QuantizeLinear after them can absorb
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class OutputPoint:
    """One tensor of the graph that gets its own QuantizeLinear: `producer` is "conv" or "add",
    `reader` the quantized layer whose input parameters it takes (None: observed), `module` the
    torch module whose output it is (where the simulated model quantizes it)."""

    tensor: str
    producer: str
    reader: str | None
    module: str = ""


def _readers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def chain_end(tensor: str, readers: Mapping[str, list[Any]], outputs: set[str]) -> str:
    """`tensor` followed through single-reader Relu/Clip/MaxPool nodes (one output used)."""
    while tensor not in outputs:
        users = readers.get(tensor, [])
        if len(users) != 1 or users[0].op_type not in PASS_THROUGH or users[0].input[0] != tensor:
            return tensor
        if users[0].op_type == "MaxPool" and len(users[0].output) > 1 and users[0].output[1]:
            return tensor
        tensor = users[0].output[0]
    return tensor


def _static_plain(module: Any) -> bool:
    """A module whose input is a plain static per-tensor quantizer (what QLinear ops take)."""
    from ptqkit.nn.act_quant import InputQuantizer

    quantizer = module.input_quantizer
    return (
        type(quantizer) is InputQuantizer and not quantizer.spec.dynamic
        and isinstance(quantizer.spec.granularity, PerTensor)
    )


def _qlinear_conv(module: Any) -> bool:
    return _static_plain(module) and not bool((module.weight_zero_point != 0).any())


def _params_key(module: Any) -> tuple[float, int, str]:
    qp = module.input_quantizer.qparams
    return float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0]), qp.qtype.name


def spatial_mean(node: Any, inits: Mapping[str, Any]) -> bool:
    """A ReduceMean over the last two axes of an NCHW tensor, or a GlobalAveragePool."""
    from onnx import helper, numpy_helper

    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    if len(node.input) > 1 and node.input[1] in inits:
        axes = numpy_helper.to_array(inits[node.input[1]]).reshape(-1).tolist()
    else:
        axes = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axes"), [])
    return sorted(int(a) for a in axes) in ([2, 3], [-2, -1])


def _reader_kinds(tensor: str, readers: Mapping[str, list[Any]], layer_of: Mapping[str, str], modules: Mapping[str, Any], inits: Mapping[str, Any]) -> tuple[list[str], bool, bool]:
    """(quantized static layers reading `tensor` as input 0, whether an Add or pooling reads it,
    whether every reader is one of those)."""
    layers, integer_other, all_integer = [], False, True
    for node in readers.get(tensor, []):
        name = layer_of.get(node.name)
        if name is not None and node.input[0] == tensor and _static_plain(modules[name]):
            layers.append(name)
        elif (node.op_type == "Add" and len(node.input) == 2) or spatial_mean(node, inits):
            integer_other = True
        else:
            all_integer = False
    return layers, integer_other, all_integer


def _point(tensor: str, producer: str, readers: Any, layer_of: Any, modules: Any, inits: Any, always: bool) -> OutputPoint | None:
    """The point for `tensor` if it needs one: read by an Add or a pooling (or `always`), every
    reader integer, the quantized readers sharing one set of input parameters."""
    layers, integer_other, all_integer = _reader_kinds(tensor, readers, layer_of, modules, inits)
    if not all_integer or not (integer_other or always) or not readers.get(tensor):
        return None
    if len({_params_key(modules[name]) for name in layers}) > 1:
        return None
    return OutputPoint(tensor, producer, layers[0] if layers else None)


def integer_points(proto: Any, layer_nodes: Mapping[str, Any], modules: Mapping[str, Any]) -> list[OutputPoint]:
    """The tensors of the float graph `proto` that need their own output parameters for an
    integer graph: the ends (through Relu/Clip/MaxPool) of static-input convs and of Adds whose
    two inputs are such tensors, read by an Add or a spatial mean (and by quantized layers with
    one set of input parameters, which the tensor then takes), never by a float op."""
    from ptqkit.export.onnx_graph import initializer_map

    graph = proto.graph
    readers, inits = _readers(graph), initializer_map(graph)
    outputs = {o.name for o in graph.output}
    layer_of = {graph.node[ln.node_index].name: name for name, ln in layer_nodes.items()}
    points: list[OutputPoint] = []
    integer: set[str] = set()
    for node in graph.node:
        name = layer_of.get(node.name)
        if node.op_type == "Conv" and name is not None and _qlinear_conv(modules[name]):
            point = _point(chain_end(node.output[0], readers, outputs), "conv", readers, layer_of, modules, inits, False)
        elif node.op_type == "Add" and len(node.input) == 2 and all(i in integer for i in node.input):
            point = _point(chain_end(node.output[0], readers, outputs), "add", readers, layer_of, modules, inits, True)
        else:
            continue
        if point is not None and point.tensor not in outputs:
            points.append(point)
            integer.add(point.tensor)
    return points


def _scopes(node: Any) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes[1:-1]] if isinstance(scopes, list) else []
    return []


def output_candidates(proto: Any, tensors: list[str]) -> dict[str, list[str]]:
    """For each tensor, the modules (innermost first) whose last node in the graph produces it:
    the modules whose output it is, if each runs once per forward."""
    last: dict[str, int] = {}
    for index, node in enumerate(proto.graph.node):
        for scope in _scopes(node):
            last[scope] = index
    producer = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    found: dict[str, list[str]] = {}
    for tensor in tensors:
        index = producer.get(tensor)
        scopes = _scopes(proto.graph.node[index]) if index is not None else []
        found[tensor] = [s for s in reversed(scopes) if last.get(s) == index]
    return found


def module_outputs(proto: Any, names: list[str]) -> dict[str, str]:
    """Module name -> the graph tensor its output is (the output of the last node in its scope)."""
    last: dict[str, Any] = {}
    for node in proto.graph.node:
        for scope in _scopes(node):
            last[scope] = node
    return {name: last[name].output[0] for name in names if name in last}


def _call_counts(model: nn.Module, names: set[str], example_inputs: Any) -> dict[str, int]:
    from ptqkit.export.onnx_graph import _split_inputs

    counts = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: counts.__setitem__(n, counts[n] + 1)) for n in names if n in modules]
    args, kwargs = _split_inputs(example_inputs)
    try:
        with torch.inference_mode():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _with_modules(points: list[OutputPoint], proto: Any, model: nn.Module, example_inputs: Any) -> tuple[list[OutputPoint], list[str]]:
    """Each point with the module whose output it is (innermost one that runs once); the tensors
    no module outputs exactly once are returned as refused (they stay float)."""
    from dataclasses import replace

    candidates = output_candidates(proto, [p.tensor for p in points])
    counts = _call_counts(model, {m for ms in candidates.values() for m in ms}, example_inputs)
    kept, refused = [], []
    for point in points:
        module = next((m for m in candidates[point.tensor] if counts.get(m) == 1), None)
        if module is None:
            refused.append(point.tensor)
        else:
            kept.append(replace(point, module=module))
    return kept, refused


class _Tap(nn.Module):
    """Identity: the statistics collector observes its input, the output of the module it sits on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _default_spec(modules: Mapping[str, Any]) -> QuantSpec:
    spec = next((m.input_quantizer.spec for m in modules.values() if _static_plain(m)), None)
    if spec is None:
        raise ExportError("calibrate_outputs_: the model has no layer with static per-tensor input quantization to take a spec from")
    return spec


@dataclass(frozen=True)
class OutputCalibration:
    """What `calibrate_outputs_` did: the points set (with the module each sits on) and the
    tensors it left float because no module outputs them exactly once."""

    points: tuple[OutputPoint, ...]
    refused: tuple[str, ...]


def calibrate_outputs_(
    qmodel: nn.Module, data: Any, example_inputs: Any, *, spec: QuantSpec | None = None, max_samples: int | None = None
) -> OutputCalibration:
    """Give `qmodel` the output quantizers a fully integer ONNX Runtime graph needs (in place).

    `data`: `CalibrationData` (its batches are run through the quantized model); `example_inputs`
    capture the graph the points are found in; `spec`: the observers' spec for tensors no
    quantized layer reads (default: the model's own static input spec); `max_samples`: at most
    this many calibration samples (default all).
    """
    from ptqkit.engine.quantize import dequantize_model
    from ptqkit.export.onnx_graph import export_float_onnx, find_layer_nodes
    from ptqkit.nn.act_quant import InputQuantizer
    from ptqkit.nn.modules import QuantConv, QuantLinear
    from ptqkit.nn.output_quant import set_output_quantizer_
    from ptqkit.stats.collect import calibrate_inputs

    modules = {name: m for name, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantConv))}
    spec = spec or _default_spec(modules)
    with tempfile.TemporaryDirectory() as scratch:
        proto = export_float_onnx(dequantize_model(qmodel).eval(), example_inputs, Path(scratch) / "float.onnx", dynamic=False)
    layer_nodes, _ = find_layer_nodes(proto, list(modules))
    points, refused = _with_modules(integer_points(proto, layer_nodes, modules), proto, qmodel, example_inputs)
    tree = dict(qmodel.named_modules())
    for point in points:
        if point.reader is not None:
            reader = modules[point.reader].input_quantizer
            set_output_quantizer_(tree[point.module], InputQuantizer(reader.spec, reader.qparams))
    observed = [p for p in points if p.reader is None]
    for point in observed:
        set_output_quantizer_(tree[point.module], _Tap())
    if observed:
        count = max_samples or len(data)
        observers = calibrate_inputs(
            qmodel, {f"{p.module}.output_quantizer": spec for p in observed}, data.batches(), max_samples=count, progress=False
        )
        for point in observed:
            set_output_quantizer_(tree[point.module], InputQuantizer(spec, observers[f"{point.module}.output_quantizer"].qparams()))
    logger.info("output quantizers: %d from readers, %d observed; %d tensor(s) left float", len(points) - len(observed), len(observed), len(refused))
    return OutputCalibration(tuple(points), tuple(refused))


def _qdq_pair(b: Any, make: Any, tensor: str, out: str, quantizer: Any, label: str) -> list[Any]:
    qp = quantizer.qparams
    dtype = np.uint8 if qp.qtype.name == "uint8" else np.int8
    scale = b.const(f"{label}.output_scale", np.array(float(qp.scale.reshape(-1)[0]), np.float32))
    zero = b.const(f"{label}.output_zero_point", np.array(int(qp.zero_point.reshape(-1)[0]), dtype))
    q = b.unique(f"{label}.output_q")
    return [
        make("QuantizeLinear", [tensor, scale, zero], [q], b.unique(f"{label}.output_quantize")),
        make("DequantizeLinear", [q, scale, zero], [out], b.unique(f"{label}.output_dq")),
    ]


def insert_output_qdq(
    graph: Any, b: Any, make: Any, tensors: Mapping[str, Any], skip: set[str]
) -> dict[int, list[Any]]:
    """QuantizeLinear -> DequantizeLinear on each tensor in `tensors` (tensor -> output quantizer)
    but those in `skip` (already written so by a QLinearConv rewrite): the producing node writes
    a fresh name and the pair writes the tensor, so every reader takes the dequantized value.
    Returns node index -> replacement nodes (for `onnx_graph.replace_nodes_`)."""
    replacements: dict[int, list[Any]] = {}
    for index, node in enumerate(graph.node):
        for k, tensor in enumerate(node.output):
            if tensor in tensors and tensor not in skip:
                raw = b.unique(f"{tensor}.float")
                node.output[k] = raw
                replacements[index] = replacements.get(index, [node]) + _qdq_pair(b, make, raw, tensor, tensors[tensor], tensor)
    return replacements


def pool_rewrites(graph: Any, b: Any, make: Any, integer: set[str], reader_quantizer: Mapping[str, Any]) -> dict[int, list[Any]]:
    """Each spatial ReduceMean over an integer tensor becomes GlobalAveragePool (+ Flatten when it
    dropped the axes); followed by QuantizeLinear -> DequantizeLinear with the input parameters
    of the quantized layer that reads the pooled values (`reader_quantizer`: pooled tensor ->
    quantizer), which ORT fuses into QLinearGlobalAveragePool."""
    from onnx import helper

    from ptqkit.export.onnx_graph import initializer_map

    inits = initializer_map(graph)
    replacements: dict[int, list[Any]] = {}
    for index, node in enumerate(graph.node):
        if not spatial_mean(node, inits) or node.input[0] not in integer:
            continue
        out = node.output[0]
        keep = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "keepdims"), 1)
        pooled = b.unique(f"{out}.pooled") if (not keep or out in reader_quantizer) else out
        nodes = [make("GlobalAveragePool", [node.input[0]], [pooled], node.name)]
        if out in reader_quantizer:
            after = b.unique(f"{out}.pooled_dq") if not keep else out
            nodes += _qdq_pair(b, make, pooled, after, reader_quantizer[out], out)
            pooled = after
        if not keep:
            nodes.append(make("Flatten", [pooled], [out], b.unique(f"{out}.flatten"), axis=1))
        replacements[index] = nodes
    return replacements


def pooled_readers(graph: Any, layer_of: Mapping[str, str], modules: Mapping[str, Any]) -> dict[str, Any]:
    """Spatial-mean output -> the input quantizer of the one static quantized layer that reads
    it, directly or through Reshape/Flatten/Squeeze."""
    from ptqkit.export.onnx_graph import initializer_map

    readers, inits = _readers(graph), initializer_map(graph)
    found: dict[str, Any] = {}
    for node in graph.node:
        if not spatial_mean(node, inits):
            continue
        tensor = node.output[0]
        users = readers.get(tensor, [])
        while len(users) == 1 and users[0].op_type in ("Reshape", "Flatten", "Squeeze") and users[0].input[0] == tensor:
            tensor = users[0].output[0]
            users = readers.get(tensor, [])
        names = [layer_of.get(u.name) for u in users]
        if len(users) == 1 and names[0] is not None and users[0].input[0] == tensor and _static_plain(modules[names[0]]):
            found[node.output[0]] = modules[names[0]].input_quantizer
    return found


_LAYOUT_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
     "Transpose", "Shape", "Gather", "Concat", "Constant", "Cast", "Identity", "Slice"}
)


def float_op_share(optimized_path: str | Path) -> dict[str, Any]:
    """Compute ops of ORT's optimized graph that run in float vs on integers: QLinear*, the ops
    in `ort_check.INTEGER_OPS`, and MaxPool on an integer tensor count as integer; quantize,
    dequantize and layout ops are not counted. Returns counts, the share and the float op types."""
    import onnx

    from ptqkit.export.ort_check import INTEGER_OPS

    graph = onnx.load(str(optimized_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}

    def integer(node: Any) -> bool:
        if node.op_type.startswith("QLinear") or node.op_type in INTEGER_OPS:
            return True
        source = producer.get(node.input[0]) if node.input else None
        quantized_input = source is not None and (source.op_type.startswith("QLinear") or source.op_type == "QuantizeLinear")
        return node.op_type.endswith("MaxPool") and quantized_input  # MaxPool, NhwcMaxPool on uint8

    compute = [n for n in graph.node if n.op_type not in _LAYOUT_OPS]
    floats = [n.op_type for n in compute if not integer(n)]
    counts: dict[str, int] = {}
    for op in floats:
        counts[op] = counts.get(op, 0) + 1
    return {"compute_ops": len(compute), "float_ops": len(floats), "float_share": len(floats) / max(1, len(compute)), "float_op_types": counts}


@dataclass(frozen=True)
class OutputPlan:
    """Where the model's output quantizers go in the graph: `tensors` (tensor -> quantizer) get a
    QuantizeLinear -> DequantizeLinear, `convs` (conv module -> quantizer) are written as
    QLinearConv with those output parameters, `direct` are the tensors such a conv writes itself."""

    tensors: dict[str, Any]
    convs: dict[str, Any]
    direct: frozenset[str]


def output_plan(proto: Any, layer_nodes: Mapping[str, Any], modules: Mapping[str, Any], outputs: Mapping[str, Any]) -> OutputPlan:
    """The `OutputPlan` of `outputs` (module name -> its output quantizer, `nn.output_quant`): an
    Add's output followed by Relu/Clip/MaxPool is quantized before them as well (the same codes,
    see the module docstring), since ORT fuses an Add into QLinearAdd only with Q right after it;
    an output quantizer the graph has no place for is an ExportError (the simulated model would
    quantize a tensor the integer graph does not)."""
    graph = proto.graph
    where = module_outputs(proto, list(outputs))
    missing = sorted(set(outputs) - set(where))
    if missing:
        raise ExportError(f"export: modules {missing} have output quantizers but no node of the ONNX graph carries their name scope")
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    conv_of = {ln.node_index: name for name, ln in layer_nodes.items()}
    tensors, convs, direct = {}, {}, set()
    for module, tensor in where.items():
        index = producer[tensor]
        while graph.node[index].op_type in PASS_THROUGH and graph.node[index].input[0] in producer:
            index = producer[graph.node[index].input[0]]
        conv = conv_of.get(index)
        if graph.node[index].op_type == "Add" and graph.node[index].output[0] != tensor:
            tensors[graph.node[index].output[0]] = outputs[module]  # before the Relu too: ORT fuses Add -> Q
        if conv is not None and _qlinear_conv(modules[conv]):
            convs[conv] = outputs[module]
            if graph.node[index].output[0] == tensor:
                direct.add(tensor)
        elif producer[tensor] in conv_of:
            raise ExportError(f"export: module {module!r} has an output quantizer, but its conv {conv_of[producer[tensor]]!r} has no QLinearConv form (static per-tensor input, zero weight zero points)")
        tensors[tensor] = outputs[module]
    return OutputPlan(tensors, convs, frozenset(direct))


def output_rewrites(proto: Any, b: Any, make: Any, plan: OutputPlan, layer_nodes: Mapping[str, Any], modules: Mapping[str, Any]) -> dict[int, list[Any]]:
    """The node replacements that write `plan`'s tensors and the pooling over them (mutates the
    producing nodes' output names; call before the layers are rewritten)."""
    graph = proto.graph
    layer_of = {graph.node[ln.node_index].name: name for name, ln in layer_nodes.items()}
    pooled = pooled_readers(graph, layer_of, modules)
    replacements = insert_output_qdq(graph, b, make, plan.tensors, set(plan.direct))
    replacements.update(pool_rewrites(graph, b, make, set(plan.tensors), pooled))
    return replacements
