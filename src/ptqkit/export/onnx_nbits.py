"""ONNX Runtime's `com.microsoft.MatMulNBits` for weight-only low-bit Linear layers (int4 decoders).

A weight-only `QuantLinear` with integer codes c (int2..int8, [N, K] = [out, in]) and scales /
zero points per group along K becomes one node

    Y = MatMulNBits(A, B, scales[, zero_points][, bias])    Y = A · ((u - zp) · s)ᵀ + bias

with, for a container of `bits` = 2, 4 or 8 (the widths ORT 1.32's CPU kernel accepts; int3 codes
go into a 4-bit container, int5..int7 into an 8-bit one, same values):

- u = c + 2^(bits-1) for signed qtypes (c itself for unsigned ones): unsigned codes in
  [0, 2^bits); zp = zero_point + the same shift. ptqkit's symmetric signed weights have zp =
  2^(bits-1), ORT's default, so no zero-point input is written for them.
- B: uint8 [N, k_blocks, block_size * bits / 8], codes packed low bits first along K
  (`primitives.pack_lowbit`), K padded with zp codes (weight 0) to k_blocks * block_size.
- scales: float [N, k_blocks]; zero_points: uint8 [N, ceil(k_blocks * bits / 8)], packed alike.
- block_size: a power of two >= 16 that divides ptqkit's group size, so every ORT block lies in
  one ptqkit group — also the ragged last group (SmolLM2's K = 576 = 4 x 128 + 64: block 128,
  5 blocks, the last one half padding). Per-channel and per-tensor scales are repeated per block.

At accuracy_level 0 ORT's kernel (1.32) equals a float64 computation to float rounding for
2/4/8 bits, any block size, ragged K, with and without zero points; accuracy_level 4 (int8
activations per block) does not. The CPU kernel refuses bits other than 2/4/8 and 2-bit blocks
above 256.

Layers that have no such form (float formats such as nf4/fp8, groups whose size has no
power-of-two divisor >= 16, quantized inputs) are refused with a reason; the export keeps
them float and reports them (an ExportError under strict).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch

from ptqkit.core.errors import ExportError
from ptqkit.core.fields import Interval, check_fields
from ptqkit.core.primitives import pack_lowbit
from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor
from ptqkit.export.onnx_graph import (
    MS_DOMAIN,
    LayerNode,
    bias_add_after,
    consumer_indices,
    initializer_map,
    replace_nodes_,
    use_ms_domain_,
)
from ptqkit.export.onnx_qdq import LayerRewrite, _check_float_weight
from ptqkit.nn.modules import QuantizedModule, QuantLinear

__all__ = [
    "ACCURACY_LEVELS",
    "NBitsLayout",
    "NBitsOptions",
    "insert_matmul_nbits",
    "nbits_layout",
    "nbits_refusal",
    "nbits_tensors",
    "pow2_divisor",
    "routes_to_nbits",
]

logger = logging.getLogger(__name__)

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # unset, fp32, fp16, bf16, int8 (activations per block)
_CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # code width -> MatMulNBits bits
_MIN_BLOCK = 16
_MAX_BLOCK = 256  # the largest block every container accepts (2-bit: <= 256 in ORT 1.32)
_CHANNEL_BLOCK = 128  # block used to repeat per-channel / per-tensor scales
_FLOAT_DTYPES = (np.float32, np.float16)


@dataclass(frozen=True, kw_only=True)
class NBitsOptions:
    """How `export(..., formats=["onnx"])` writes weight-only low-bit Linear layers.

    - `accuracy_level`: MatMulNBits' attribute. 0 (default) computes with float activations:
      ORT's output equals ptqkit's simulated layer to float rounding. 4 quantizes activations to
      int8 per block inside the kernel: faster on CPUs, but no longer the simulated model (it
      can flip greedy tokens; onnxruntime issue 29849).
    - `int8`: also write int8 per-channel / per-tensor weight-only layers (w8a16) as 8-bit
      MatMulNBits. Default False: they stay DequantizeLinear + MatMul (ORT folds that to a float
      MatMul); 8-bit MatMulNBits at accuracy_level 0 was ~20x slower than the float MatMul in
      ORT 1.32 at batch 1. Per-group int8 always goes to MatMulNBits (QDQ here has no
      per-group form).

    Level 0 stays the default because only it is the simulated model by construction; level 4
    is faster, markedly so for an 8-bit lm_head (`int8=True`): pass 4 for speed and check the
    agreement (`benchmarks/llm_decode_ort.py` measures both).
    """

    accuracy_level: Annotated[int, Interval(ACCURACY_LEVELS[0], ACCURACY_LEVELS[-1])] = 0
    int8: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "NBitsOptions", error=ExportError)


@dataclass(frozen=True)
class NBitsLayout:
    """How one module's weight is laid out for MatMulNBits."""

    bits: int  # container width: 2, 4 or 8
    block_size: int
    k: int
    n: int
    note: str = ""  # what differs from a plain copy (container widening, repeated scales)

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def blob_size(self) -> int:
        return self.block_size * self.bits // 8


def _qdq_handles(module: QuantizedModule) -> bool:
    """True for the weight-only layers `onnx_qdq` writes as int8 DequantizeLinear + MatMul."""
    spec = module.weight_spec
    return spec.qtype.name in ("int8", "uint8") and isinstance(spec.granularity, (PerTensor, PerChannel))


def routes_to_nbits(module: QuantizedModule, options: NBitsOptions) -> bool:
    """True if the export writes `module` as MatMulNBits (or reports why it cannot).

    Weight-only Linear layers whose weights the QDQ path has no form for (int2..int7, per-group
    int8, non-integer formats), and int8 weight-only layers when `options.int8`.
    """
    if not isinstance(module, QuantLinear) or module.input_quantizer is not None:
        return False
    return options.int8 or not _qdq_handles(module)


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides `n` and is <= `cap`."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def nbits_refusal(module: QuantizedModule) -> str | None:
    """Why `module` has no MatMulNBits form (None if it has one)."""
    if not isinstance(module, QuantLinear):
        return f"{type(module).__name__} is not a Linear layer; MatMulNBits replaces MatMul only"
    if module.input_quantizer is not None:
        return "inputs are quantized too; MatMulNBits is weight-only (its int8 accuracy level is not ptqkit's input quantizer)"
    spec = module.weight_spec
    if not spec.qtype.is_integer:
        return f"weights are {spec.qtype.name}; MatMulNBits takes integer codes (2..8 bits)"
    if spec.qtype.bits not in _CONTAINER_BITS:
        return f"weights are {spec.qtype.name}; MatMulNBits takes 2..8-bit codes"
    g = spec.granularity
    if isinstance(g, PerGroup):
        if g.axis not in (-1, 1):
            return f"groups along axis {g.axis}; MatMulNBits blocks run along the input dimension (axis -1)"
        bits = _CONTAINER_BITS[spec.qtype.bits]
        if pow2_divisor(g.size, _MAX_BLOCK) < _MIN_BLOCK:
            return (
                f"group size {g.size} has no power-of-two divisor between {_MIN_BLOCK} and {_MAX_BLOCK}; "
                f"MatMulNBits blocks (powers of two >= 16{', <= 256 for 2 bits' if bits == 2 else ''}) cannot tile it"
            )
    elif isinstance(g, PerChannel):
        if g.axis not in (0, -2):
            return f"per-channel scales along axis {g.axis}; MatMulNBits takes one scale per output channel and block"
    elif not isinstance(g, PerTensor):
        return f"granularity {g.kind}; MatMulNBits takes per-group (along the input dim), per-channel or per-tensor weights"
    return None


def nbits_layout(module: QuantLinear) -> NBitsLayout:
    """The MatMulNBits layout of `module`; raises ExportError naming the reason if it has none."""
    reason = nbits_refusal(module)
    if reason is not None:
        raise ExportError(f"MatMulNBits: {reason}")
    spec = module.weight_spec
    code_bits = int(spec.qtype.bits)
    bits = _CONTAINER_BITS[code_bits]
    notes = []
    if bits != code_bits:
        notes.append(f"{spec.qtype.name} codes in a {bits}-bit container")
    g = spec.granularity
    if isinstance(g, PerGroup):
        block = pow2_divisor(g.size, _MAX_BLOCK)
        if block != g.size:
            notes.append(f"group {g.size} written as {g.size // block} blocks of {block}")
    else:
        block = _CHANNEL_BLOCK
        notes.append(f"{g.kind} scales repeated over blocks of {block}")
    if module.in_features % block:
        notes.append(f"K={module.in_features} padded to {-(-module.in_features // block) * block}")
    return NBitsLayout(bits, block, module.in_features, module.out_features, "; ".join(notes))


def nbits_tensors(
    module: QuantLinear, layout: NBitsLayout, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, k_blocks, blob], scales `dtype` [N, k_blocks], zero points uint8 packed or None).

    Zero points are None when every one equals 2^(bits-1), MatMulNBits' default.
    """
    spec, qp = module.weight_spec, module.weight_qparams
    n, k, block, kb = layout.n, layout.k, layout.block_size, layout.k_blocks
    shift = 2 ** (layout.bits - 1) if spec.qtype.signed else 0
    codes = module.weight_codes.detach().cpu().to(torch.int32) + shift  # [N, K] unsigned
    g = spec.granularity
    scale = torch.broadcast_to(g.expand(qp.scale.detach().cpu().float(), codes.shape), codes.shape)  # [N, K]
    zero = torch.broadcast_to(g.expand(qp.zero_point.detach().cpu().to(torch.int32), codes.shape), codes.shape) + shift
    starts = torch.arange(0, k, block)  # first K index of every block  [k_blocks]
    block_scale, block_zero = scale[:, starts], zero[:, starts]  # [N, k_blocks]
    # every block must lie in one ptqkit group: its parameters are constant over the block
    per_elem = block_scale.repeat_interleave(block, dim=1)[:, :k]  # [N, K]
    per_zero = block_zero.repeat_interleave(block, dim=1)[:, :k]
    if not (torch.equal(per_elem, scale) and torch.equal(per_zero, zero)):
        raise ExportError(
            f"MatMulNBits: blocks of {block} do not tile the weight's {g.kind} parameters {g.to_dict()} (internal layout error)"
        )
    lo, hi = int(codes.min()) if codes.numel() else 0, int(codes.max()) if codes.numel() else 0
    if lo < 0 or hi >= 2**layout.bits:
        raise ExportError(f"MatMulNBits: shifted codes span [{lo}, {hi}], outside {layout.bits}-bit [0, {2**layout.bits - 1}]")
    padded = torch.cat([codes, per_zero[:, -1:].expand(n, kb * block - k)], dim=1) if kb * block > k else codes  # [N, kb*block]
    if layout.bits == 8:
        b = padded.to(torch.uint8).numpy()  # [N, kb*block]
    else:
        b = pack_lowbit(padded, layout.bits).numpy()  # [N, kb*block*bits/8], low bits first
    b = b.reshape(n, kb, layout.blob_size)  # [N, k_blocks, blob]
    scales = block_scale.numpy().astype(dtype)  # [N, k_blocks]
    if bool((block_zero == 2 ** (layout.bits - 1)).all()):
        return b, scales, None
    if layout.bits == 8:
        zp = block_zero.to(torch.uint8).numpy()  # [N, k_blocks]
    else:
        zp = pack_lowbit(block_zero, layout.bits).numpy()  # [N, ceil(k_blocks * bits / 8)]
    return b, scales, zp


def _fusable_bias_add(graph: Any, node: Any, consumers: dict, inits: dict, module: QuantLinear) -> int | None:
    """Index of the Add that adds `module.bias` to the MatMul's output (None if there is none)."""
    from onnx import numpy_helper

    found = bias_add_after(graph, node, consumers, inits) if module.bias is not None else None
    if found is None:
        return None
    add_index, name = found
    value = numpy_helper.to_array(inits[name])
    bias = module.bias.detach().cpu().float().numpy()
    if value.shape != bias.shape or not np.array_equal(value.astype(np.float32), bias):
        return None
    return add_index


class _FreshNames:
    """Names no initializer, node output or graph input uses yet: `base`, else base_1, base_2, ..."""

    def __init__(self, graph: Any) -> None:
        self.used = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


@dataclass(frozen=True)
class _Graph:
    """The graph being rewritten and its lookups, shared by every module's rewrite."""

    graph: Any
    inits: dict[str, Any]  # initializer by name
    consumers: dict[str, list[int]]  # value name -> indices of the nodes that read it
    fresh: _FreshNames


@dataclass(frozen=True)
class _NBitsNode:
    """One module's MatMulNBits node: its new initializers, the graph nodes it replaces (node
    index -> replacement; [] drops a fused bias Add) and the record of the rewrite."""

    initializers: list[Any]
    replaced: dict[int, list[Any]]
    rewrite: LayerRewrite


def _checked_layer(g: _Graph, name: str, ln: LayerNode, module: QuantizedModule) -> tuple[NBitsLayout, Any, np.ndarray]:
    """(layout, float node, float weight) of a module MatMulNBits can take; else an ExportError."""
    from onnx import numpy_helper

    if not isinstance(module, QuantLinear):
        raise ExportError(f"module {name!r}: MatMulNBits: {nbits_refusal(module)}")
    layout = nbits_layout(module)
    node = g.graph.node[ln.node_index]
    if ln.op_type not in ("MatMul", "Gemm"):
        raise ExportError(f"module {name!r}: its weight product is a {ln.op_type} node; MatMulNBits replaces MatMul/Gemm")
    float_w = numpy_helper.to_array(g.inits[ln.weight_name])
    _check_float_weight(name, float_w, module, ln.weight_layout)
    if float_w.dtype.type not in _FLOAT_DTYPES:
        raise ExportError(f"module {name!r}: float weight is {float_w.dtype}; MatMulNBits here takes float32/float16 graphs")
    return layout, node, float_w


def _bias_and_outputs(g: _Graph, node: Any, ln: LayerNode, module: QuantLinear) -> tuple[str, list[str], int | None]:
    """MatMulNBits' bias input ("" if none) and outputs: a Gemm's C, or the bias Add after a
    MatMul fused in (its index returned, to drop it)."""
    if ln.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        return node.input[2], list(node.output), None
    if ln.op_type == "MatMul":
        add_index = _fusable_bias_add(g.graph, node, g.consumers, g.inits, module)
        if add_index is not None:
            add = g.graph.node[add_index]
            other = next(i for i in add.input if i != node.output[0])
            return other, list(add.output), add_index
    return "", list(node.output), None


def _matmul_nbits_node(g: _Graph, name: str, ln: LayerNode, module: QuantizedModule, options: NBitsOptions) -> _NBitsNode:
    from onnx import helper, numpy_helper

    layout, node, float_w = _checked_layer(g, name, ln, module)
    b, scales, zp = nbits_tensors(module, layout, float_w.dtype.type)
    b_name = g.fresh(f"{name}.weight_nbits")
    initializers = [numpy_helper.from_array(b, b_name)]
    s_name = g.fresh(f"{name}.weight_scales")
    initializers.append(numpy_helper.from_array(scales, s_name))
    inputs = [node.input[0], b_name, s_name, "", "", ""]
    if zp is not None:
        inputs[3] = g.fresh(f"{name}.weight_zero_points")
        initializers.append(numpy_helper.from_array(zp, inputs[3]))
    inputs[5], outputs, add_index = _bias_and_outputs(g, node, ln, module)
    while inputs[-1] == "":
        inputs.pop()
    attrs: dict[str, Any] = {"K": layout.k, "N": layout.n, "bits": layout.bits, "block_size": layout.block_size}
    if options.accuracy_level:
        attrs["accuracy_level"] = options.accuracy_level
    new = helper.make_node("MatMulNBits", inputs, outputs, name=node.name or g.fresh(f"{name}.matmul_nbits"), domain=MS_DOMAIN, **attrs)
    new.metadata_props.extend(node.metadata_props)
    replaced: dict[int, list[Any]] = {} if add_index is None else {add_index: []}
    replaced[ln.node_index] = [new]
    return _NBitsNode(initializers, replaced, LayerRewrite(name, ln.op_type, "matmul_nbits", b_name))


def insert_matmul_nbits(
    proto: Any, layer_nodes: dict[str, LayerNode], modules: dict[str, QuantizedModule], options: NBitsOptions
) -> tuple[Any, list[LayerRewrite]]:
    """Rewrite `proto` in place: each mapped module's MatMul/Gemm becomes one MatMulNBits node.

    The module's bias is folded in (a Gemm's C, or the one Add of the bias after a MatMul).
    Float weight initializers nothing uses any more are dropped. Returns (proto, rewrites) whose
    `weight_initializer` is the packed B (found again in ORT's optimized graph).
    """
    graph = proto.graph
    g = _Graph(graph, initializer_map(graph), consumer_indices(graph), _FreshNames(graph))
    new_inits: list[Any] = []
    replacements: dict[int, list[Any]] = {}
    rewrites: list[LayerRewrite] = []
    for name, ln in layer_nodes.items():
        rewritten = _matmul_nbits_node(g, name, ln, modules[name], options)
        new_inits += rewritten.initializers
        replacements.update(rewritten.replaced)
        rewrites.append(rewritten.rewrite)
    replace_nodes_(graph, replacements, new_inits)
    if rewrites:
        use_ms_domain_(proto)
    logger.info("wrote %d MatMulNBits node(s) (accuracy_level %d)", len(rewrites), options.accuracy_level)
    return proto, rewrites
