"""Per-token dynamic uint8 activations in ONNX, exact to ptqkit's simulation.

ONNX's DynamicQuantizeLinear computes one (scale, zero point) per tensor, and ONNX Runtime's
MatMulInteger takes only a scalar activation zero point (ORT 1.32: "input1 zero point must be
a scalar or 1D tensor of size 1", measured). So per-token quantization is written out and the
zero point is moved to the output side, where it is a rank-1 correction:

    s, z   = per-row scale / zero point of x            [..., 1]
    xq     = clip(round(x / s) + z, 0, 255)  (uint8)     [..., K]
    acc    = MatMulInteger(xq, Wq, 0, w_z)   (int32)     [..., N]   (xq · (Wq - w_z))
    y      = s · w_s · acc  −  (s · z) · (w_s · colsum(Wq))  + b    [..., N]

which equals (s · (xq − z)) · (w_s · Wq) + b: the simulated fake-quant product, computed
with an integer matmul. Weights must be symmetric (zero point 0), as ptqkit's int8 presets are.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ptqkit.primitives import MIN_SCALE

__all__ = ["per_token_matmul_nodes"]


def per_token_matmul_nodes(
    b: Any, make_node: Callable[..., Any], name: str, x: str, codes_in_out: np.ndarray, w_scale: np.ndarray,
    w_zero: Any, outputs: list[str], node_name: str, bias: str | None,
) -> tuple[list[Any], str]:
    """Nodes computing `outputs[0] = fq_per_token(x) @ dequant(W) (+ bias)`; returns (nodes, weight initializer).

    `codes_in_out` is the weight in MatMul layout [in, out] (int8, or uint8 shifted by `w_zero`
    = 128); `w_scale` has shape [out] or []; `w_zero` is the one weight zero point.
    """
    n_out = codes_in_out.shape[1]
    ws = np.broadcast_to(w_scale.astype(np.float32), (n_out,))  # [out]
    colsum = (codes_in_out.astype(np.int64) - int(w_zero)).sum(axis=0)  # [out]: Σ_k (Wq[k, n] - w_zero)
    wq = b.const(f"{name}.weight_quantized", codes_in_out)
    wz = b.const(f"{name}.weight_zero_point", np.array(w_zero, codes_in_out.dtype))
    c_ws = b.const(f"{name}.weight_scale", ws)
    c_corr = b.const(f"{name}.weight_colsum_scaled", (ws.astype(np.float64) * colsum).astype(np.float32))
    c_zero, c_255 = b.const(f"{name}.zero", np.array(0.0, np.float32)), b.const(f"{name}.q255", np.array(255.0, np.float32))
    c_min = b.const(f"{name}.min_scale", np.array(MIN_SCALE, np.float32))
    axes = b.const(f"{name}.reduce_axes", np.array([-1], np.int64))
    t = {k: b.unique(f"{name}.{k}") for k in (
        "min", "max", "lo", "hi", "range", "scale_raw", "scale", "lo_div", "lo_round", "zp_raw", "zp",
        "x_div", "x_round", "x_shift", "x_clip", "xq", "acc", "acc_f", "acc_s", "acc_ws", "zs", "corr", "mm",
    )}

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> Any:
        return make_node(op, ins, [out], b.unique(f"{name}.{op.lower()}"), **attrs)

    nodes = [
        node("ReduceMin", [x, axes], t["min"], keepdims=1),  # [..., 1]
        node("ReduceMax", [x, axes], t["max"], keepdims=1),  # [..., 1]
        node("Min", [t["min"], c_zero], t["lo"]),  # the range always holds 0
        node("Max", [t["max"], c_zero], t["hi"]),
        node("Sub", [t["hi"], t["lo"]], t["range"]),
        node("Div", [t["range"], c_255], t["scale_raw"]),
        node("Max", [t["scale_raw"], c_min], t["scale"]),
        node("Div", [t["lo"], t["scale"]], t["lo_div"]),
        node("Round", [t["lo_div"]], t["lo_round"]),
        node("Sub", [c_zero, t["lo_round"]], t["zp_raw"]),  # qmin - round(lo / s), qmin = 0
        node("Clip", [t["zp_raw"], c_zero, c_255], t["zp"]),
        node("Div", [x, t["scale"]], t["x_div"]),  # [..., K]
        node("Round", [t["x_div"]], t["x_round"]),  # half to even, as ptqkit
        node("Add", [t["x_round"], t["zp"]], t["x_shift"]),
        node("Clip", [t["x_shift"], c_zero, c_255], t["x_clip"]),
        node("Cast", [t["x_clip"]], t["xq"], to=2),  # uint8
        make_node("MatMulInteger", [t["xq"], wq, "", wz], [t["acc"]], node_name),  # int32 [..., N]
        node("Cast", [t["acc"]], t["acc_f"], to=1),
        node("Mul", [t["acc_f"], t["scale"]], t["acc_s"]),
        node("Mul", [t["acc_s"], c_ws], t["acc_ws"]),
        node("Mul", [t["scale"], t["zp"]], t["zs"]),  # [..., 1]
        node("Mul", [t["zs"], c_corr], t["corr"]),  # [..., N]
    ]
    if bias is None:
        nodes.append(node("Sub", [t["acc_ws"], t["corr"]], outputs[0]))
    else:
        nodes.append(node("Sub", [t["acc_ws"], t["corr"]], t["mm"]))
        nodes.append(node("Add", [t["mm"], bias], outputs[0]))
    return nodes, wq
