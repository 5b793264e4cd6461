"""The ONNX export driver: float graph -> check vs torch -> integer rewrite -> check in ONNX Runtime.

Thin on purpose: graph capture and the module map live in `onnx_graph`, the rewrite in
`onnx_qdq` / `onnx_pertoken`, the ORT checks in `ort_check`.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.errors import ExportError

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)


def _torch_outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    from ptqkit.export.onnx_qdq import simulated_outputs

    return simulated_outputs(model, example_inputs)


def export_onnx(
    qmodel: nn.Module,
    out_dir: Path,
    example_inputs: Any,
    *,
    strict: bool = False,
    opset: int = 18,
    dynamic: bool = True,
    keep_float: bool = False,
    fp32_tolerance: float = 1e-4,
    weight_dtype: str = "auto",
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Write `model.onnx` (and optionally `model.fp32.onnx`) into `out_dir`; return (layers, checks).

    `weight_dtype`: "int8", "uint8" (int8 codes + 128, zero point + 128: the same values) or
    "auto" (uint8 on x86 CPUs without VNNI, where ORT's u8s8 kernels saturate; else int8).
    """
    import onnx

    from ptqkit.export import FLOAT_ONNX_FILE, ONNX_FILE, LayerExport
    from ptqkit.export.onnx_graph import export_float_onnx, find_layer_nodes
    from ptqkit.export.onnx_qdq import check_exportable, insert_qdq, quantized_modules
    from ptqkit.export.ort_check import compare_outputs, cpu_has_vnni, layer_kernels, make_session, run_session
    from ptqkit.quantize import dequantize_model

    if weight_dtype not in ("auto", "int8", "uint8"):
        raise ExportError(f"export: onnx_weight_dtype={weight_dtype!r} is unknown; valid: auto, int8, uint8")
    uint8_weights = weight_dtype == "uint8" or (weight_dtype == "auto" and not cpu_has_vnni())
    modules = quantized_modules(qmodel)
    if not modules:
        raise ExportError("export: the model has no QuantLinear/QuantConv modules; nothing to write as integer ONNX")
    for name, module in modules.items():
        check_exportable(name, module)  # fail before the (slow) graph capture
    float_model = dequantize_model(qmodel).eval()
    float_path = out_dir / FLOAT_ONNX_FILE
    proto = export_float_onnx(float_model, example_inputs, float_path, opset=opset, dynamic=dynamic)

    checks: dict[str, Any] = {}
    reference = _torch_outputs(float_model, example_inputs)
    fp32 = compare_outputs(reference, run_session(make_session(float_path), example_inputs))
    checks["fp32_ort_vs_torch"] = fp32
    if fp32["max_abs"] > fp32_tolerance * max(1.0, fp32["ref_absmax"]):
        raise ExportError(
            f"export: the float ONNX graph disagrees with torch (max abs difference {fp32['max_abs']:.3g}, "
            f"tolerance {fp32_tolerance:g} x max(1, |output| max {fp32['ref_absmax']:.3g})); the graph capture is wrong"
        )
    if not keep_float:
        float_path.unlink()

    found, missing = find_layer_nodes(proto, list(modules))
    if missing and strict:
        raise ExportError(f"export (strict): {len(missing)} quantized module(s) not found in the ONNX graph: {missing}")
    proto, rewrites = insert_qdq(proto, found, modules, uint8_weights=uint8_weights)
    checks["weight_dtype"] = "uint8" if uint8_weights else "int8"
    onnx_path = out_dir / ONNX_FILE
    onnx.save_model(proto, str(onnx_path))

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        session = make_session(onnx_path, optimized_path=optimized)
        kernels = {k.module: k for k in layer_kernels(optimized, {r.module: r.weight_initializer for r in rewrites})}
        int8 = compare_outputs(_torch_outputs(qmodel, example_inputs), run_session(session, example_inputs))
    checks["int8_ort_vs_simulated"] = int8

    layers = []
    for r in rewrites:
        k = kernels[r.module]
        note = "" if k.integer else ("weight-only: DequantizeLinear + float kernel" if r.form == "weight_only" else "fused to a float kernel")
        layers.append(LayerExport(r.module, r.form, k.op_type, k.integer, note))
    layers += [LayerExport(name, "not_found", "", False, why) for name, why in missing.items()]
    stayed_float = [f"{l.module} ({l.kernel or 'no kernel'}: {l.note})" for l in layers if not l.integer]
    if stayed_float:
        logger.warning("%d of %d quantized module(s) stayed float in ONNX Runtime: %s", len(stayed_float), len(layers), stayed_float)
        if strict:
            raise ExportError(f"export (strict): {len(stayed_float)} quantized module(s) did not run on an integer kernel: {stayed_float}")
    counts: dict[str, int] = {}
    for l in layers:
        counts[l.kernel or "none"] = counts.get(l.kernel or "none", 0) + 1
    checks["kernels"] = counts
    logger.info("ONNX export: %s; int8 vs simulated max abs %.3g", counts, int8["max_abs"])
    return tuple(layers), checks
