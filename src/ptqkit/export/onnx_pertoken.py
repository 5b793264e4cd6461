"""Per-token dynamic activations in ONNX, exact to ptqkit's simulation.

ONNX's DynamicQuantizeLinear computes one (scale, zero point) per tensor, and ONNX Runtime's
integer matmuls take only a scalar activation zero point and scale (ORT 1.32: "input1 zero point
must be a scalar or 1D tensor of size 1", measured). So the per-row parameters are computed with
reductions, the codes with one per-axis QuantizeLinear over the rows, and the per-row scale and
zero point are applied on the output side:

    s, z   = per-row scale / zero point of x              [..., 1]
    xq     = QuantizeLinear(x, s, z)  (per row, uint8)     [..., K]
    A      = MatMulIntegerToFloat(xq, Wq, 1, w_s, z0, w_z) = w_s · ((xq − z0) · (Wq − w_z))
    y      = s · A  (+ b)                                   symmetric: z = z0 = 128, a constant
    y      = s · A − (s · z) · (w_s · colsum(Wq − w_z))  (+ b)   asymmetric: z0 = 0

which equals (s · (xq − z)) · (w_s · (Wq − w_z)) + b: the simulated fake-quant product. Symmetric
int8 codes c in [-128, 127] are stored as uint8 c + 128, so ORT runs its u8 kernels in both cases.
ORT fuses the integer matmul, the cast and the weight scale into one MatMulIntegerToFloat kernel
(com.microsoft), which replaced MatMulInteger -> Cast -> Mul -> Mul and five elementwise passes
over the input (Div, Round, Add, Clip, Cast) that the first version of this graph used.
Weights must be symmetric (zero point 0, or 128 when stored as uint8), as ptqkit's int8 presets are.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ptqkit.core.primitives import MIN_SCALE
from ptqkit.export.onnx_graph import MS_DOMAIN

__all__ = ["per_token_matmul_nodes"]

_SYMMETRIC_ZERO = 128  # uint8 code of a symmetric int8 zero (c + 128)


def per_token_matmul_nodes(
    b: Any, make_node: Callable[..., Any], name: str, x: str, codes_in_out: np.ndarray, w_scale: np.ndarray,
    w_zero: Any, outputs: list[str], node_name: str, bias: str | None, *, symmetric: bool = False, cache: dict | None = None,
) -> tuple[list[Any], str]:
    """Nodes computing `outputs[0] = fq_per_token(x) @ dequant(W) (+ bias)`; returns (nodes, weight initializer).

    `codes_in_out` is the weight in MatMul layout [in, out] (int8, or uint8 shifted by `w_zero`
    = 128); `w_scale` has shape [out] or []; `w_zero` is the one weight zero point. `symmetric`
    selects int8 symmetric activations (scale 2·absmax/255, zero 0) over uint8 asymmetric ones.
    `cache` shares the quantized input between layers reading the same tensor (query/key/value).
    """
    k, n_out = codes_in_out.shape
    ws = np.broadcast_to(w_scale.astype(np.float32), (n_out,))  # [out]
    wq = b.const(f"{name}.weight_quantized", codes_in_out)
    wz = b.const(f"{name}.weight_zero_point", np.array(w_zero, codes_in_out.dtype))
    c_ws = b.const(f"{name}.weight_scale", ws)
    c_one = b.const(f"{name}.unit_scale", np.array(1.0, np.float32))
    cache = {} if cache is None else cache
    key = (x, "per_token", symmetric)
    nodes: list[Any] = []
    if key not in cache:
        cache[key], nodes = _quantized_rows(b, make_node, name, x, k, symmetric)
    xq, scale, zp, a_zero = cache[key]
    acc, scaled = b.unique(f"{name}.acc"), b.unique(f"{name}.acc_scaled")

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> Any:
        return make_node(op, ins, [out], b.unique(f"{name}.{op.lower()}"), **attrs)

    nodes += [
        make_node("MatMulIntegerToFloat", [xq, wq, c_one, c_ws, a_zero, wz], [acc], node_name, domain=MS_DOMAIN),
        node("Mul", [acc, scale], scaled),
    ]
    last = scaled
    if not symmetric:  # the zero point's share, a rank-1 term: (s · z) ⊗ (w_s · colsum(Wq − w_z))
        colsum = (codes_in_out.astype(np.int64) - int(w_zero)).sum(axis=0)  # [out]
        c_corr = b.const(f"{name}.weight_colsum_scaled", (ws.astype(np.float64) * colsum).astype(np.float32))
        zs, corr, mm = b.unique(f"{name}.zs"), b.unique(f"{name}.corr"), b.unique(f"{name}.mm")
        nodes += [
            node("Mul", [scale, zp], zs),  # [..., 1]
            node("Mul", [zs, c_corr], corr),  # [..., N]
            node("Sub", [last, corr], mm),
        ]
        last = mm
    if bias is None:
        nodes[-1].output[0] = outputs[0]
    else:
        nodes.append(node("Add", [last, bias], outputs[0]))
    return nodes, wq


def _quantized_rows(
    b: Any, make_node: Callable[..., Any], name: str, x: str, k: int, symmetric: bool
) -> tuple[tuple[str, str, str, str], list[Any]]:
    """Nodes quantizing each row of `x` [..., K]: ((codes, scale [..., 1], float zero point [..., 1]
    or "", the MatMul's activation zero point or ""), nodes)."""
    c_zero, c_255 = b.const(f"{name}.zero", np.array(0.0, np.float32)), b.const(f"{name}.q255", np.array(255.0, np.float32))
    c_min = b.const(f"{name}.min_scale", np.array(MIN_SCALE, np.float32))
    axes = b.const(f"{name}.reduce_axes", np.array([-1], np.int64))
    rows_k, flat = b.const(f"{name}.rows_shape", np.array([-1, k], np.int64)), b.const(f"{name}.flat_shape", np.array([-1], np.int64))
    t = {key: b.unique(f"{name}.{key}") for key in (
        "min", "max", "lo", "hi", "range", "scale_raw", "scale", "scale_rows", "zp_rows", "x_rows", "xq_rows",
        "x_shape", "n_rows", "xq", "neg_lo", "absmax", "twice", "lo_div", "lo_round", "zp_raw", "zp", "zp_u8",
    )}

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> Any:
        return make_node(op, ins, [out], b.unique(f"{name}.{op.lower()}"), **attrs)

    nodes = [
        node("ReduceMin", [x, axes], t["min"], keepdims=1),  # [..., 1]
        node("ReduceMax", [x, axes], t["max"], keepdims=1),  # [..., 1]
        node("Min", [t["min"], c_zero], t["lo"]),  # the range always holds 0
        node("Max", [t["max"], c_zero], t["hi"]),
    ]
    if symmetric:  # scale = 2·absmax / 255 in ptqkit's float32 order; codes stored as c + 128
        z_const = b.const(f"{name}.input_zero_point", np.array(_SYMMETRIC_ZERO, np.uint8))
        nodes += [
            node("Neg", [t["lo"]], t["neg_lo"]),
            node("Max", [t["neg_lo"], t["hi"]], t["absmax"]),
            node("Add", [t["absmax"], t["absmax"]], t["twice"]),  # 2·absmax, exact
            node("Div", [t["twice"], c_255], t["scale_raw"]),
            node("Max", [t["scale_raw"], c_min], t["scale"]),
            node("Reshape", [t["scale"], flat], t["scale_rows"]),  # [rows]
            node("Shape", [t["scale_rows"]], t["n_rows"]),
            node("Expand", [z_const, t["n_rows"]], t["zp_rows"]),
        ]
        a_zero = z_const
    else:
        nodes += [
            node("Sub", [t["hi"], t["lo"]], t["range"]),
            node("Div", [t["range"], c_255], t["scale_raw"]),
            node("Max", [t["scale_raw"], c_min], t["scale"]),
            node("Div", [t["lo"], t["scale"]], t["lo_div"]),
            node("Round", [t["lo_div"]], t["lo_round"]),
            node("Sub", [c_zero, t["lo_round"]], t["zp_raw"]),  # qmin - round(lo / s), qmin = 0
            node("Clip", [t["zp_raw"], c_zero, c_255], t["zp"]),
            node("Cast", [t["zp"]], t["zp_u8"], to=2),
            node("Reshape", [t["scale"], flat], t["scale_rows"]),
            node("Reshape", [t["zp_u8"], flat], t["zp_rows"]),
        ]
        a_zero = ""
    nodes += [
        node("Reshape", [x, rows_k], t["x_rows"]),  # [rows, K]: one scale per row for QuantizeLinear's axis 0
        node("QuantizeLinear", [t["x_rows"], t["scale_rows"], t["zp_rows"]], t["xq_rows"], axis=0),
        node("Shape", [x], t["x_shape"]),
        node("Reshape", [t["xq_rows"], t["x_shape"]], t["xq"]),
    ]
    return (t["xq"], t["scale"], "" if symmetric else t["zp"], a_zero), nodes
