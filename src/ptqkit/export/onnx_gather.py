"""ONNX Runtime's `com.microsoft.GatherBlockQuantized` for quantized embeddings (`QuantEmbedding`).

A `QuantEmbedding` with integer codes c [V, D] and scales / zero points per group along D (or
per row, or per tensor) becomes one node

    Y = GatherBlockQuantized(data, indices, scales[, zero_points])   Y[..., :] = (u[i] - zp) · s

with gather_axis 0, quantize_axis 1 and the MatMulNBits layout of `onnx_nbits` (the same
`nbits_tensors`): u = c + 2^(bits-1) for signed qtypes, data uint8 [V, D · bits / 8] packed
low bits first along D, scales [V, D / block], zero points uint8 packed alike (absent when all
equal 2^(bits-1), the kernel's default). Containers are 4 or 8 bits (int2/int3 codes in 4,
int5..int7 in 8). The block is the largest power of two >= 16 that divides the group (the row
length for per-row or per-tensor scales, whose scales are then repeated) and D.

ORT's CPU kernel matches (u - zp) · s exactly for 4 and 8 bits, with and without zero points
(tests/unit/export/test_onnx_gather.py). A decoder's embedding is read one row per token, so this makes the file
smaller, not the step faster.

Embeddings with no such form (float formats, groups along the vocabulary, D not a multiple of
a block of >= 16) are refused with a reason: the export keeps them float and reports it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor
from ptqkit.export.onnx_graph import (
    MS_DOMAIN,
    LayerNode,
    initializer_map,
    node_module_name,
    replace_nodes_,
    use_ms_domain_,
)
from ptqkit.export.onnx_nbits import NBitsLayout, nbits_tensors, pow2_divisor
from ptqkit.export.onnx_qdq import LayerRewrite
from ptqkit.nn.modules import QuantEmbedding, QuantizedModule

__all__ = ["find_gather_nodes", "gather_layout", "gather_refusal", "insert_gather_block_quantized", "quantized_embeddings"]

logger = logging.getLogger(__name__)

_CONTAINER_BITS = {2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # code width -> bits; 2-bit rows were not measured here
_MIN_BLOCK = 16


def quantized_embeddings(qmodel: Any) -> dict[str, QuantEmbedding]:
    """name -> QuantEmbedding of a quantized model."""
    return {name: m for name, m in qmodel.named_modules() if isinstance(m, QuantEmbedding)}


def _block(length: int, dim: int) -> int:
    """Largest power of two dividing both `length` (a group or row) and `dim` (D)."""
    common = math.gcd(length, dim)
    return pow2_divisor(common, common)


def gather_refusal(module: QuantizedModule) -> str | None:
    """Why `module` has no GatherBlockQuantized form (None if it has one)."""
    if not isinstance(module, QuantEmbedding):
        return f"{type(module).__name__} is not an embedding; GatherBlockQuantized replaces Gather only"
    spec = module.weight_spec
    if not spec.qtype.is_integer or spec.qtype.bits not in _CONTAINER_BITS:
        return f"weights are {spec.qtype.name}; GatherBlockQuantized takes 2..8-bit integer codes"
    g, dim = spec.granularity, module.embedding_dim
    if isinstance(g, PerGroup):
        if g.axis not in (-1, 1):
            return f"groups along axis {g.axis}; GatherBlockQuantized blocks run along the embedding dimension (axis -1)"
        length = g.size
    elif isinstance(g, PerChannel):
        if g.axis not in (0, -2):
            return f"per-channel scales along axis {g.axis}; GatherBlockQuantized takes one scale per row and block"
        length = dim
    elif isinstance(g, PerTensor):
        length = dim
    else:
        return f"granularity {g.kind}; GatherBlockQuantized takes per-group (along D), per-row or per-tensor weights"
    if _block(length, dim) < _MIN_BLOCK:
        return f"no power-of-two block >= {_MIN_BLOCK} divides both the {g.kind} length {length} and the embedding dimension {dim}"
    return None


def gather_layout(module: QuantEmbedding) -> NBitsLayout:
    """The block layout of `module` (n = rows, k = D); ExportError naming the reason if it has none."""
    reason = gather_refusal(module)
    if reason is not None:
        raise ExportError(f"GatherBlockQuantized: {reason}")
    spec = module.weight_spec
    bits = _CONTAINER_BITS[int(spec.qtype.bits)]
    g, dim = spec.granularity, module.embedding_dim
    block = _block(g.size if isinstance(g, PerGroup) else dim, dim)
    notes = []
    if bits != spec.qtype.bits:
        notes.append(f"{spec.qtype.name} codes in a {bits}-bit container")
    if not isinstance(g, PerGroup) or block != g.size:
        notes.append(f"{g.kind} scales written per block of {block}")
    return NBitsLayout(bits, block, dim, module.num_embeddings, "; ".join(notes))


def find_gather_nodes(proto: Any, names: Sequence[str], prefix: str = "") -> tuple[dict[str, LayerNode], dict[str, str]]:
    """Each embedding's Gather node (constant table, gather axis 0), keyed by module name without `prefix`."""
    from onnx import helper

    graph = proto.graph
    inits = initializer_map(graph)
    wanted = {prefix + name: name for name in names}
    found: dict[str, LayerNode] = {}
    notes: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "Gather":
            continue
        name = wanted.get(node_module_name(node) or "")
        if name is None:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.input[0] not in inits or axis != 0:
            notes[name] = f"Gather node {node.name!r} reads a non-constant table or gathers along axis {axis}"
        elif name in found:
            notes[name] = "two Gather nodes trace back to it"
        else:
            found[name] = LayerNode(name, index, "Gather", node.input[0], "rows")
    for name in list(found):
        if name in notes:
            del found[name]
    missing = {name: notes.get(name, "no Gather node of the exported graph carries this module's name scope") for name in names if name not in found}
    return found, missing


def insert_gather_block_quantized(
    proto: Any, layer_nodes: dict[str, LayerNode], modules: dict[str, QuantEmbedding]
) -> tuple[Any, list[LayerRewrite]]:
    """Rewrite `proto` in place: each mapped embedding's Gather becomes GatherBlockQuantized.

    The float table is dropped when nothing else reads it. Returns (proto, rewrites) whose
    `weight_initializer` is the packed data (found again in ORT's optimized graph)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    replacements: dict[int, list[Any]] = {}
    new_inits: list[Any] = []
    rewrites: list[LayerRewrite] = []
    for name, ln in layer_nodes.items():
        module = modules[name]
        layout = gather_layout(module)
        data, scales, zero_points = nbits_tensors(module, layout)  # [V, D/block, blob], [V, D/block], packed or None
        node = graph.node[ln.node_index]
        inputs = [f"{name}.weight_gbq", node.input[1], f"{name}.weight_gbq_scales"]
        if inputs[0] in names:
            raise ExportError(f"module {name!r}: the graph already has a tensor named {inputs[0]!r}")
        new_inits += [
            numpy_helper.from_array(data.reshape(layout.n, -1), inputs[0]),
            numpy_helper.from_array(scales, inputs[2]),
        ]
        if zero_points is not None:
            inputs.append(f"{name}.weight_gbq_zero_points")
            new_inits.append(numpy_helper.from_array(zero_points, inputs[3]))
        new = helper.make_node(
            "GatherBlockQuantized", inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
            bits=layout.bits, block_size=layout.block_size, gather_axis=0, quantize_axis=1,
        )
        new.metadata_props.extend(node.metadata_props)
        replacements[ln.node_index] = [new]
        rewrites.append(LayerRewrite(name, "Gather", "gather_block_quantized", inputs[0]))
    replace_nodes_(graph, replacements, new_inits)
    if rewrites:
        use_ms_domain_(proto)
    logger.info("wrote %d GatherBlockQuantized node(s)", len(rewrites))
    return proto, rewrites
