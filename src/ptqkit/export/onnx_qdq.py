"""ONNX QDQ export: ptqkit's integer weights and calibrated activation QParams in an ONNX graph
that ONNX Runtime runs on integer kernels.

The float graph comes from the dynamo exporter (`onnx_graph.export_float_onnx`) run on
`dequantize_model(qmodel)`; this module rewrites it, one quantized module at a time:

- MatMul / Gemm (Linear, GPT-2 Conv1D): weight -> int8 initializer [in, out] + DequantizeLinear
  (per-channel axis=1: the output channel is MatMul B's last axis); input -> QuantizeLinear +
  DequantizeLinear with ptqkit's scale/zero point (static) or DynamicQuantizeLinear +
  DequantizeLinear (dynamic). Gemm becomes MatMul + Add. ONNX Runtime fuses these into
  MatMulIntegerToFloat (static) and DynamicQuantizeMatMul (dynamic) — measured with ORT 1.32.
  A static layer's bias Add is written into that MatMulIntegerToFloat itself unless ORT folds
  it into SkipLayerNormalization (`kernel_bias_add`).
- Static inputs with input smoothing (algorithms.input_smoothing): Div(divisors) before the
  QuantizeLinear, shared by the layers reading one tensor with the same divisors.
- Static inputs with calibrated outlier columns (algorithms.outlier_channels): the per-tensor
  codes with each outlier column appended m times (Gather -> Div(m) -> QuantizeLinear ->
  Concat) and the weight's rows for them repeated, its original rows at the zero point.
- Conv with static inputs whose output reaches other quantized layers only through Relu/Clip
  (MobileNetV2: expand -> ReLU6 -> depthwise -> ReLU6 -> project): Q -> DQ -> Conv(DQ(w),
  DQ(int32 bias)) -> Q -> DQ, the output Q carrying the reading layers' own input parameters.
  ORT fuses it into QLinearConv and drops the Relu/Clip and the repeated Q/DQ. This is what
  the simulated model computes: a ReLU/ReLU6 output has minimum 0, so its zero point is 0 and
  its top code lies at or below 6, where quantizing before or after the clip is the same; the
  bias is rounded to int32 at scale x_scale·w_scale (an error far below one output step).
- Other convs (ORT leaves DQ -> Conv in float unless an output Q follows): the integer form
  written directly, (Dynamic)QuantizeLinear -> ConvInteger(u8, s8) -> Cast -> Mul(x_scale *
  w_scale) -> Add(bias), exact for symmetric weights (ConvInteger takes one weight zero point).
- Weight-only layers get int8 weights + DequantizeLinear before the float MatMul/Conv (a smaller
  file, float kernel: reported as such).

Every number comes from the qmodel: `weight_codes`, `weight_qparams`, `input_quantizer.qparams`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerChannel, PerTensor, PerToken
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.export.onnx_graph import (
    MS_DOMAIN,
    LayerNode,
    bias_add_after,
    consumer_indices,
    initializer_map,
    replace_nodes_,
    use_ms_domain_,
)
from ptqkit.export.integer_cnn import output_plan, output_rewrites
from ptqkit.export.onnx_pertoken import per_token_matmul_nodes
from ptqkit.nn.act_quant import OutlierColumnsQuantizer, SmoothedInputQuantizer
from ptqkit.nn.modules import QuantConv, QuantizedModule, QuantLinear

__all__ = ["LayerRewrite", "quantized_modules", "check_exportable", "insert_qdq"]

logger = logging.getLogger(__name__)

_WEIGHT_QTYPES = ("int8", "uint8")
_INPUT_QTYPES = ("uint8", "int8")


@dataclass(frozen=True)
class LayerRewrite:
    """How one module was written: `form` is "static", "dynamic" or "weight_only"."""

    module: str
    op_type: str  # the float op it replaced: MatMul, Gemm or Conv
    form: str
    weight_initializer: str  # name of the int8 weight initializer (found again in ORT's optimized graph)


def quantized_modules(qmodel: nn.Module) -> dict[str, QuantizedModule]:
    """name -> QuantLinear/QuantConv of a quantized model (embeddings are not weight products)."""
    return {name: m for name, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantConv))}


def _spec_text(spec: QuantSpec) -> str:
    kind = type(spec.granularity).__name__
    return f"{spec.qtype.name} {kind}{' dynamic' if spec.dynamic else ''}{'' if spec.symmetric else ' asymmetric'}"


def check_exportable(name: str, module: QuantizedModule) -> None:
    """Raise ExportError naming the module if its specs have no ONNX QDQ form here."""
    wspec = module.weight_spec
    if wspec.qtype.name not in _WEIGHT_QTYPES or not isinstance(wspec.granularity, (PerTensor, PerChannel)):
        raise ExportError(
            f"module {name!r}: weights {_spec_text(wspec)} have no ONNX QDQ form in this exporter; "
            f"valid: {'/'.join(_WEIGHT_QTYPES)} per-tensor or per-channel(axis=0) (int4 groups go to MatMulNBits)"
        )
    if isinstance(wspec.granularity, PerChannel) and wspec.granularity.axis not in (0, -module.weight_codes.dim()):
        raise ExportError(f"module {name!r}: per-channel weights along axis {wspec.granularity.axis}; valid: axis 0 (output channels)")
    quantizer = module.input_quantizer
    if quantizer is None:
        return
    if isinstance(quantizer, OutlierColumnsQuantizer) and not isinstance(module, QuantLinear):
        raise ExportError(f"module {name!r}: calibrated outlier input columns are exported for Linear layers only (got {module.float_type})")
    if getattr(quantizer, "outlier_threshold", None) is not None:
        raise ExportError(
            f"module {name!r}: LLM.int8 outlier decomposition (float columns where |x| > {quantizer.outlier_threshold:g}) "
            "is a simulated scheme with no ONNX form; export a w8a8_dynamic model without llm_int8"
        )
    ispec = quantizer.spec
    per_token_form = ispec.qtype.name == "uint8" or (ispec.qtype.name == "int8" and ispec.symmetric)
    if isinstance(ispec.granularity, PerToken) and per_token_form:
        if isinstance(module, QuantConv) or bool((module.weight_zero_point != 0).any()):
            raise ExportError(
                f"module {name!r}: per-token inputs are exported for Linear layers with symmetric weights only "
                f"(got {module.float_type} with weights {_spec_text(wspec)})"
            )
        return
    if ispec.qtype.name not in _INPUT_QTYPES or not isinstance(ispec.granularity, PerTensor):
        raise ExportError(
            f"module {name!r}: inputs {_spec_text(ispec)} have no ONNX QDQ form; valid: uint8/int8 per-tensor "
            "(static); uint8 asymmetric per-tensor, uint8 per-token or int8 symmetric per-token (dynamic)"
        )
    if ispec.dynamic and (ispec.qtype.name != "uint8" or ispec.symmetric):
        raise ExportError(
            f"module {name!r}: dynamic inputs {_spec_text(ispec)}; ONNX DynamicQuantizeLinear computes uint8 "
            "asymmetric per-tensor parameters only"
        )


class _Builder:
    """Accumulates new nodes/initializers with unique names."""

    def __init__(self, graph: Any, uint8_weights: bool) -> None:
        self.graph = graph
        self.uint8_weights = uint8_weights
        self.names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        self.initializers: list[Any] = []

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(base)
        array = np.asarray(array)  # a 0-d array stays a scalar (np.ascontiguousarray makes it [1]): QLinearAdd needs scalars
        self.initializers.append(numpy_helper.from_array(array if array.ndim == 0 else np.ascontiguousarray(array), name))
        return name


def _np_dtype(qparams: QParams) -> type:
    return np.uint8 if qparams.qtype.name == "uint8" else np.int8


def _weight_tensors(
    module: QuantizedModule, layout: str, uint8: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """(codes in the node's layout, scale, zero point, DequantizeLinear axis or None).

    `uint8=True` stores int8 codes shifted by +128 with zero point +128: the same real values,
    but ORT then runs its u8u8 kernels, which do not saturate on AVX2 machines without VNNI
    (u8s8 there sums pairs in int16 with saturation).
    """
    qp = module.weight_qparams
    codes = module.weight_codes.detach().cpu().numpy().astype(np.int16)  # [out, in, *k]
    zero = qp.zero_point.detach().cpu().numpy().astype(np.int16).reshape(-1)
    dtype = _np_dtype(qp)
    if uint8 and dtype == np.int8:
        codes, zero, dtype = codes + 128, zero + 128, np.uint8
    codes, zero = codes.astype(dtype), zero.astype(dtype)
    scale = qp.scale.detach().cpu().float().numpy().reshape(-1)  # [out] or [1]
    per_channel = isinstance(qp.granularity, PerChannel)
    if not per_channel:
        scale, zero = scale.reshape(()), zero.reshape(())
    if layout == "in_out":
        return codes.T, scale, zero, (1 if per_channel else None)  # [in, out]
    return codes, scale, zero, (0 if per_channel else None)  # [out, in] or [out, in/g, *k]


def _check_float_weight(name: str, float_w: np.ndarray, module: QuantizedModule, layout: str) -> None:
    """The exported float weight must be the module's dequantized weight: proves the mapping."""
    expected = module.to_float().weight.detach().cpu().float().numpy()  # [out, in, *k]
    if layout == "in_out":
        expected = expected.T
    if float_w.shape != expected.shape:
        raise ExportError(
            f"module {name!r}: exported weight has shape {float_w.shape}, the module's is {expected.shape} "
            f"in {layout} layout; the node-to-module map is wrong"
        )
    err = float(np.max(np.abs(float_w - expected))) if expected.size else 0.0
    if err > 1e-6 * max(1.0, float(np.max(np.abs(expected)))):
        raise ExportError(f"module {name!r}: exported weight differs from the dequantized weight by {err:.3g}")


def _make_node(op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=name, **{k: v for k, v in attrs.items() if v is not None})


def _quantized_input(b: _Builder, x: str, module: str, quantizer: Any, cache: dict) -> tuple[str, str, str, list[Any]]:
    """Nodes that quantize activation `x` (divided by a smoothing quantizer's divisors first):
    returns (codes, scale, zero point, new nodes); shared per (x, divisors, params)."""
    smoothing: list[Any] = []
    if isinstance(quantizer, SmoothedInputQuantizer):
        x, smoothing = _smoothed_input(b, x, module, quantizer.divisors.cpu().numpy(), cache)
    q, s, z, nodes = _quantize_linear(b, x, module, quantizer, cache)
    return q, s, z, smoothing + nodes


def _smoothed_input(b: _Builder, x: str, module: str, divisors: np.ndarray, cache: dict) -> tuple[str, list[Any]]:
    """x / divisors (input_smoothing; the same division as the simulation's, so the same codes):
    (output, new nodes), shared per (x, divisors)."""
    key = (x, "smoothed", divisors.astype(np.float32).tobytes())
    if key in cache:
        return cache[key], []
    out = b.unique(f"{module}.input_smoothed")
    divisor = b.const(f"{module}.input_divisors", divisors.astype(np.float32))
    cache[key] = out
    return out, [_make_node("Div", [x, divisor], [out], b.unique(f"{module}.input_smoothing"))]


def _quantize_linear(b: _Builder, x: str, module: str, quantizer: Any, cache: dict) -> tuple[str, str, str, list[Any]]:
    if quantizer.spec.dynamic:
        key: tuple = (x, "dynamic")
    else:
        qp = quantizer.qparams
        key = (x, float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0]), qp.qtype.name)
    if key in cache:
        return (*cache[key], [])
    if quantizer.spec.dynamic:
        q, s, z = b.unique(f"{module}.input_q"), b.unique(f"{module}.input_scale"), b.unique(f"{module}.input_zero_point")
        nodes = [_make_node("DynamicQuantizeLinear", [x], [q, s, z], b.unique(f"{module}.input_dynamic_quantize"))]
    else:
        qp = quantizer.qparams
        s = b.const(f"{module}.input_scale", np.array(float(qp.scale.reshape(-1)[0]), np.float32))
        z = b.const(f"{module}.input_zero_point", np.array(int(qp.zero_point.reshape(-1)[0]), _np_dtype(qp)))
        q = b.unique(f"{module}.input_q")
        nodes = [_make_node("QuantizeLinear", [x, s, z], [q], b.unique(f"{module}.input_quantize"))]
    cache[key] = (q, s, z)
    return q, s, z, nodes


def _dequantized_operands(
    b: _Builder, x: str, name: str, module: QuantizedModule, weights: tuple[np.ndarray, np.ndarray, np.ndarray, int | None], cache: dict
) -> tuple[str, str, str, list[Any]]:
    """The integer weight behind a DequantizeLinear and, if the module quantizes its input, `x`
    through QuantizeLinear -> DequantizeLinear: (input to use, weight initializer, dequantized
    weight, new nodes) — the QDQ operands ORT fuses into its integer kernels."""
    codes, scale, zero, axis = weights
    wq = b.const(f"{name}.weight_quantized", codes)
    ws, wz = b.const(f"{name}.weight_scale", scale), b.const(f"{name}.weight_zero_point", zero)
    wdq = b.unique(f"{name}.weight_dequantized")
    nodes = [_make_node("DequantizeLinear", [wq, ws, wz], [wdq], b.unique(f"{name}.weight_dq"), axis=axis)]
    if module.input_quantizer is not None:
        if isinstance(module.input_quantizer, OutlierColumnsQuantizer):
            q, s, z, qnodes = _outlier_extended_input(b, x, name, module.input_quantizer, module.in_features, cache)
        else:
            q, s, z, qnodes = _quantized_input(b, x, name, module.input_quantizer, cache)
        x = b.unique(f"{name}.input_dequantized")
        nodes += qnodes + [_make_node("DequantizeLinear", [q, s, z], [x], b.unique(f"{name}.input_dq"))]
    return x, wq, wdq, nodes


def _rewrite_matmul(
    b: _Builder, node: Any, ln: LayerNode, module: QuantizedModule, cache: dict, kernel_bias: tuple[str, str] | None = None
) -> tuple[list[Any], str]:
    """The integer form of a MatMul/Gemm layer; `kernel_bias` = (bias initializer, output) of the
    bias Add after a static layer's MatMul that goes into the kernel (see `kernel_bias_add`):
    then one MatMulIntegerToFloat with the bias writes that Add's output."""
    name = ln.module
    codes, scale, zero, axis = _weight_tensors(module, ln.weight_layout, b.uint8_weights)
    if ln.weight_layout == "out_in":  # Gemm transB=1 -> MatMul needs [in, out]
        codes, axis = codes.T, (1 if axis is not None else None)
    quantizer = module.input_quantizer
    if quantizer is not None and isinstance(quantizer.spec.granularity, PerToken):
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        return per_token_matmul_nodes(
            b, _make_node, name, node.input[0], codes, scale, zero.reshape(-1)[0], list(node.output), node.name, bias,
            symmetric=quantizer.spec.symmetric, cache=cache,
        )
    outliers = _outlier_columns(module)
    if outliers is not None:
        codes = _with_outlier_rows(codes, zero, *outliers)
    if kernel_bias is not None:
        return _matmul_integer_to_float(b, node, name, module, (codes, scale, zero), kernel_bias, cache)
    x, wq, wdq, nodes = _dequantized_operands(b, node.input[0], name, module, (codes, scale, zero, axis), cache)
    if node.op_type == "MatMul":
        nodes.append(_make_node("MatMul", [x, wdq], list(node.output), node.name))
    else:  # Gemm (alpha = beta = 1, transA = 0): MatMul + Add(C)
        has_bias = len(node.input) > 2 and node.input[2]
        mm = b.unique(f"{name}.matmul_out") if has_bias else node.output[0]
        nodes.append(_make_node("MatMul", [x, wdq], [mm], node.name))
        if has_bias:
            nodes.append(_make_node("Add", [mm, node.input[2]], list(node.output), b.unique(f"{name}.bias_add")))
    return nodes, wq


def kernel_bias_add(graph: Any, node: Any, readers: dict[str, list[int]], inits: dict[str, Any]) -> tuple[int, str, str] | None:
    """(index, bias initializer, output) of the Add that adds a 1-D constant bias to a MatMul's
    only output, unless ORT folds that bias into SkipLayerNormalization (the sum goes on into a
    residual Add that a LayerNormalization reads); else None. ORT leaves the bias Add after the
    MatMulIntegerToFloat its QDQ pass makes alone (BERT's query/key/value), and fuses it with a
    GELU into BiasGelu, which is slower than MatMulIntegerToFloat's own bias and a Gelu; both
    cases are faster with the bias inside the kernel."""
    found = bias_add_after(graph, node, readers, inits) if node.op_type == "MatMul" else None
    if found is None:
        return None
    add_index, bias = found
    out = graph.node[add_index].output[0]
    if out in {o.name for o in graph.output}:
        return None
    after = [graph.node[i] for i in readers.get(out, [])]
    if not after or any(_feeds_layer_norm(graph, n, readers) for n in after if n.op_type == "Add"):
        return None
    return add_index, bias, out


def _feeds_layer_norm(graph: Any, node: Any, readers: dict[str, list[int]]) -> bool:
    return any(graph.node[i].op_type == "LayerNormalization" for i in readers.get(node.output[0], []))


def _matmul_integer_to_float(
    b: _Builder, node: Any, name: str, module: QuantizedModule, weights: tuple[np.ndarray, np.ndarray, np.ndarray],
    kernel_bias: tuple[str, str], cache: dict,
) -> tuple[list[Any], str]:
    """A static layer as one com.microsoft MatMulIntegerToFloat with its bias: the kernel ORT
    would make of QuantizeLinear -> DequantizeLinear -> MatMul, with the following bias Add inside."""
    codes, scale, zero = weights  # [in, out] codes, [out] or scalar parameters
    quantizer = module.input_quantizer
    make = _outlier_extended_input if isinstance(quantizer, OutlierColumnsQuantizer) else _quantized_input
    args = (module.in_features,) if make is _outlier_extended_input else ()
    q, s, z, nodes = make(b, node.input[0], name, quantizer, *args, cache)
    wq = b.const(f"{name}.weight_quantized", codes)
    ws, wz = b.const(f"{name}.weight_scale", scale.reshape(-1)), b.const(f"{name}.weight_zero_point", zero.reshape(-1))
    bias, out = kernel_bias
    nodes.append(_make_node("MatMulIntegerToFloat", [q, wq, s, ws, z, wz, bias], [out], node.name, domain=MS_DOMAIN))
    return nodes, wq


def _outlier_columns(module: QuantizedModule) -> tuple[np.ndarray, np.ndarray] | None:
    """(columns, multiples) of a module's calibrated outlier input columns (outlier_channels), or None."""
    quantizer = module.input_quantizer
    if not isinstance(quantizer, OutlierColumnsQuantizer):
        return None
    return quantizer.columns.cpu().numpy().astype(np.int64), quantizer.multiples.cpu().numpy().astype(np.int64)


def _with_outlier_rows(codes: np.ndarray, zero: np.ndarray, columns: np.ndarray, multiples: np.ndarray) -> np.ndarray:
    """Weight codes [in, out] for an input whose outlier columns come again at the end, column c
    `multiples[c]` times at multiples[c] x the step: their rows there, m copies each, and the
    zero point in their original rows (those input codes saturate), then zero-point rows up to a
    multiple of 16 rows (the padding inputs `_outlier_extended_input` appends)."""
    extra = np.repeat(codes[columns, :], multiples, axis=0)  # [Σm, out]
    kept = codes.copy()
    kept[columns, :] = zero.reshape(1, -1)
    padding = np.broadcast_to(zero.reshape(1, -1), (_padding(codes.shape[0] + extra.shape[0]), codes.shape[1]))
    return np.concatenate([kept, extra, padding.astype(codes.dtype)], axis=0)


_K_ALIGN = 16  # ORT's integer GEMM ran slower on a reduction length that is not a multiple of 16


def _padding(rows: int) -> int:
    return -rows % _K_ALIGN


def _outlier_extended_input(
    b: _Builder, x: str, module: str, quantizer: Any, width: int, cache: dict
) -> tuple[str, str, str, list[Any]]:
    """Codes of `x` (the per-tensor QuantizeLinear) with each outlier column c appended m_c times,
    divided by m_c and quantized with the tensor's parameters (the grid of step m_c x scale),
    then columns up to a multiple of 16 (their weight rows are zero): (codes, scale, zero point,
    new nodes); shared per (x, parameters, columns)."""
    q, s, z, nodes = _quantized_input(b, x, module, quantizer, cache)
    columns, multiples = quantizer.columns.cpu().numpy().astype(np.int64), quantizer.multiples.cpu().numpy().astype(np.int64)
    key = (q, "outlier_columns", tuple(columns.tolist()), tuple(multiples.tolist()))
    if key in cache:
        return (cache[key], s, z, nodes)
    repeated = np.repeat(columns, multiples)  # [Σm]
    pad = _padding(width + repeated.size)  # `width`: the layer's input columns
    index = b.const(f"{module}.outlier_columns", np.concatenate([repeated, np.full(pad, columns[0])]))
    divisor = b.const(f"{module}.outlier_multiples", np.concatenate([np.repeat(multiples, multiples), np.ones(pad)]).astype(np.float32))
    gathered, divided, outlier_q, extended = (
        b.unique(f"{module}.{what}") for what in ("outlier_input", "outlier_divided", "outlier_q", "input_q_extended")
    )
    nodes += [
        _make_node("Gather", [x, index], [gathered], b.unique(f"{module}.outlier_gather"), axis=-1),
        _make_node("Div", [gathered, divisor], [divided], b.unique(f"{module}.outlier_divide")),
        _make_node("QuantizeLinear", [divided, s, z], [outlier_q], b.unique(f"{module}.outlier_quantize")),
        _make_node("Concat", [q, outlier_q], [extended], b.unique(f"{module}.outlier_concat"), axis=-1),
    ]
    cache[key] = extended
    return extended, s, z, nodes


def _static(module: QuantizedModule) -> bool:
    quantizer = module.input_quantizer
    return quantizer is not None and not quantizer.spec.dynamic and getattr(quantizer, "qparams", None) is not None


def output_quantizers(graph: Any, layer_nodes: dict[str, LayerNode], modules: dict[str, QuantizedModule]) -> dict[str, Any]:
    """For each static-input conv whose output reaches only quantized layers with static inputs
    and one set of input parameters, through Relu/Clip/MaxPool nodes only: that input quantizer."""
    from ptqkit.export.integer_cnn import chain_end

    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    module_of = {graph.node[ln.node_index].name: name for name, ln in layer_nodes.items()}
    outputs = {o.name for o in graph.output}
    found: dict[str, Any] = {}
    for name, ln in layer_nodes.items():
        if ln.op_type != "Conv" or not _static(modules[name]):
            continue
        tensor = chain_end(graph.node[ln.node_index].output[0], readers, outputs)
        users = readers.get(tensor, [])
        targets = [module_of.get(u.name) for u in users]
        if not users or tensor in outputs or None in targets or any(u.input[0] != tensor for u in users):
            continue
        if any(_outlier_columns(modules[t]) is not None for t in targets):  # they gather from the float tensor
            continue
        quantizers = [modules[t].input_quantizer for t in targets if _static(modules[t])]
        keys = {(float(q.qparams.scale.reshape(-1)[0]), int(q.qparams.zero_point.reshape(-1)[0]), q.qparams.qtype.name) for q in quantizers}
        if len(quantizers) == len(targets) and len(keys) == 1:
            found[name] = quantizers[0]
    return found


def _rewrite_qlinear_conv(b: _Builder, node: Any, ln: LayerNode, module: QuantizedModule, cache: dict, out_quantizer: Any) -> tuple[list[Any], str]:
    """Q -> DQ -> Conv(DQ(w), DQ(int32 bias)) -> Q -> DQ: ORT's QLinearConv pattern."""
    name = ln.module
    codes, scale, zero, axis = _weight_tensors(module, "conv", b.uint8_weights)
    x, wq, wdq, nodes = _dequantized_operands(b, node.input[0], name, module, (codes, scale, zero, axis), cache)
    inputs = [x, wdq]
    if module.bias is not None:
        x_scale = float(module.input_quantizer.qparams.scale.reshape(-1)[0])
        bias_scale = (np.broadcast_to(scale, (codes.shape[0],)).astype(np.float64) * x_scale).astype(np.float32)  # [out]
        bias = module.bias.detach().cpu().double().numpy()
        bias_codes = np.clip(np.round(bias / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)  # [out]
        bq, bs = b.const(f"{name}.bias_quantized", bias_codes), b.const(f"{name}.bias_scale", bias_scale)
        bz = b.const(f"{name}.bias_zero_point", np.zeros(codes.shape[0], np.int32))
        bdq = b.unique(f"{name}.bias_dequantized")
        nodes.append(_make_node("DequantizeLinear", [bq, bs, bz], [bdq], b.unique(f"{name}.bias_dq"), axis=0))
        inputs.append(bdq)
    y = b.unique(f"{name}.output_float")
    conv = _make_node("Conv", inputs, [y], node.name)
    conv.attribute.extend(node.attribute)
    oq = out_quantizer.qparams
    os_ = b.const(f"{name}.output_scale", np.array(float(oq.scale.reshape(-1)[0]), np.float32))
    oz = b.const(f"{name}.output_zero_point", np.array(int(oq.zero_point.reshape(-1)[0]), _np_dtype(oq)))
    yq = b.unique(f"{name}.output_q")
    nodes += [
        conv,
        _make_node("QuantizeLinear", [y, os_, oz], [yq], b.unique(f"{name}.output_quantize")),
        _make_node("DequantizeLinear", [yq, os_, oz], list(node.output), b.unique(f"{name}.output_dq")),
    ]
    return nodes, wq


def _rewrite_conv(b: _Builder, node: Any, ln: LayerNode, module: QuantizedModule, cache: dict) -> tuple[list[Any], str]:
    name = ln.module
    codes, scale, zero, axis = _weight_tensors(module, "conv", b.uint8_weights)
    attrs = {a.name: a for a in node.attribute}
    quantizer = module.input_quantizer
    if quantizer is None or np.any(zero != zero.reshape(-1)[0]):  # weight-only, or per-channel zero points: DQ -> float Conv
        x, wq, wdq, nodes = _dequantized_operands(b, node.input[0], name, module, (codes, scale, zero, axis), cache)
        conv = _make_node("Conv", [x, wdq, *node.input[2:]], list(node.output), node.name)
        conv.attribute.extend(attrs.values())
        return nodes + [conv], wq
    # integer form: ConvInteger(u8 x, s8 w) -> int32; y = acc * (x_scale * w_scale) + bias
    wq = b.const(f"{name}.weight_quantized", codes)  # [out, in/g, *k]
    w0 = b.const(f"{name}.weight_zero_point", np.array(zero.reshape(-1)[0], codes.dtype))  # one zero point
    q, s, z, nodes = _quantized_input(b, node.input[0], name, quantizer, cache)
    bshape = (1, -1) + (1,) * (codes.ndim - 2)  # [1, out, 1, ...] broadcasts over [N, out, *spatial]
    acc, accf, out = b.unique(f"{name}.acc_int32"), b.unique(f"{name}.acc_float"), b.unique(f"{name}.scaled")
    conv = _make_node("ConvInteger", [q, wq, z, w0], [acc], node.name)
    conv.attribute.extend(attrs.values())
    nodes += [conv, _make_node("Cast", [acc], [accf], b.unique(f"{name}.cast"), to=1)]
    ws = np.broadcast_to(scale, (codes.shape[0],)).astype(np.float32).reshape(bshape)
    if quantizer.spec.dynamic:
        wsn = b.const(f"{name}.weight_scale", ws)
        total = b.unique(f"{name}.output_scale")
        nodes.append(_make_node("Mul", [s, wsn], [total], b.unique(f"{name}.scale_mul")))
    else:
        x_scale = float(quantizer.qparams.scale.reshape(-1)[0])
        total = b.const(f"{name}.output_scale", (ws.astype(np.float64) * x_scale).astype(np.float32))
    has_bias = len(node.input) > 2 and node.input[2]
    mul_out = out if has_bias else node.output[0]
    nodes.append(_make_node("Mul", [accf, total], [mul_out], b.unique(f"{name}.rescale")))
    if has_bias:
        bias = b.unique(f"{name}.bias_reshaped")
        shape = b.const(f"{name}.bias_shape", np.array(bshape, np.int64))
        nodes.append(_make_node("Reshape", [node.input[2], shape], [bias], b.unique(f"{name}.bias_reshape")))
        nodes.append(_make_node("Add", [out, bias], list(node.output), b.unique(f"{name}.bias_add")))
    return nodes, wq


def _gemm_bias(node: Any, module: QuantizedModule, inits: dict[str, Any]) -> tuple[str, str] | None:
    """(bias, output) of a static layer's Gemm with a constant 1-D bias: MatMulIntegerToFloat
    takes them (ORT would otherwise leave a float Gemm after the dequantized input)."""
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2] or not _static(module):
        return None
    bias = inits.get(node.input[2])
    return (node.input[2], node.output[0]) if bias is not None and len(bias.dims) == 1 else None


def _rewrite_layer(
    b: _Builder, graph: Any, ln: LayerNode, module: QuantizedModule, cache: dict, maps: tuple[dict, dict],
    out_quantizer: Any, replacements: dict[int, list[Any]], integer_graph: bool,
) -> tuple[list[Any], str, bool]:
    """One layer's integer nodes: QLinearConv (a conv with output parameters), MatMulIntegerToFloat
    with the bias (static Linear; a Gemm's own bias in an integer CNN graph), else the QDQ or
    ConvInteger form. Returns (nodes, weight initializer, whether a bias went into the kernel)."""
    readers, inits = maps
    node = graph.node[ln.node_index]
    if out_quantizer is not None and not np.any(module.weight_zero_point.numpy() != 0):
        return (*_rewrite_qlinear_conv(b, node, ln, module, cache, out_quantizer), False)
    kernel_bias = kernel_bias_add(graph, node, readers, inits) if _static(module) and isinstance(module, QuantLinear) else None
    if kernel_bias is not None:
        add_index, bias, out = kernel_bias
        replacements[add_index] = []
        return (*_rewrite_matmul(b, node, ln, module, cache, (bias, out)), True)
    gemm_bias = _gemm_bias(node, module, inits) if integer_graph and isinstance(module, QuantLinear) else None
    if gemm_bias is not None:
        return (*_rewrite_matmul(b, node, ln, module, cache, gemm_bias), True)
    rewrite = _rewrite_conv if ln.op_type == "Conv" else _rewrite_matmul
    return (*rewrite(b, node, ln, module, cache), False)


def insert_qdq(
    proto: Any, layer_nodes: dict[str, LayerNode], modules: dict[str, QuantizedModule], *, uint8_weights: bool = True,
    outputs: Mapping[str, Any] | None = None,
) -> tuple[Any, list[LayerRewrite]]:
    """Rewrite the float graph `proto` in place: each mapped module's node gets its integer form.

    `uint8_weights`: store int8 weights as uint8 + 128 (exact on AVX2 without VNNI; see `_weight_tensors`).
    `outputs`: module name -> output quantizer (`nn.output_quant`): those tensors get
    QuantizeLinear -> DequantizeLinear and their convs QLinearConv (`integer_cnn`).

    Float weight initializers that nothing uses any more are dropped. Returns (proto, rewrites).
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = initializer_map(graph)
    b = _Builder(graph, uint8_weights)
    cache: dict = {}
    replacements: dict[int, list[Any]] = {}
    rewrites: list[LayerRewrite] = []
    for name, ln in layer_nodes.items():
        check_exportable(name, modules[name])
    out_quantizers = output_quantizers(graph, layer_nodes, modules)
    if outputs:
        plan = output_plan(proto, layer_nodes, modules, outputs)
        out_quantizers.update(plan.convs)
        replacements.update(output_rewrites(proto, b, _make_node, plan, layer_nodes, modules))
    readers = consumer_indices(graph)
    fused_bias = False
    for name, ln in layer_nodes.items():
        module = modules[name]
        _check_float_weight(name, numpy_helper.to_array(inits[ln.weight_name]), module, ln.weight_layout)
        nodes, wq, fused = _rewrite_layer(b, graph, ln, module, cache, (readers, inits), out_quantizers.get(name), replacements, bool(outputs))
        fused_bias = fused_bias or fused
        replacements[ln.node_index] = nodes
        quantizer = module.input_quantizer
        form = "weight_only" if quantizer is None else ("dynamic" if quantizer.spec.dynamic else "static")
        if quantizer is not None and isinstance(quantizer.spec.granularity, PerToken):
            form = "dynamic_per_token"
        rewrites.append(LayerRewrite(name, ln.op_type, form, wq))
    replace_nodes_(graph, replacements, b.initializers)
    if fused_bias or any(r.form == "dynamic_per_token" for r in rewrites):
        use_ms_domain_(proto)  # MatMulIntegerToFloat
    if not any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in proto.opset_import):
        raise ExportError(f"the float graph's opset {[op.version for op in proto.opset_import]} is below 13 (per-channel DequantizeLinear)")
    logger.info("inserted integer forms for %d module(s)", len(rewrites))
    return proto, rewrites


def simulated_outputs(qmodel: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """The qmodel's (simulated) outputs on `example_inputs`, flattened to a list of tensors."""
    from torch.utils._pytree import tree_leaves

    from ptqkit.export.onnx_graph import _split_inputs

    args, kwargs = _split_inputs(example_inputs)
    with torch.inference_mode():
        out = qmodel(*args, **kwargs)
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
