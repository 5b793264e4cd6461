"""The files of an ONNX export and the per-layer record of how each quantized module was written."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FLOAT_ONNX_FILE", "ONNX_FILE", "REPORT_FILE", "LayerExport"]

ONNX_FILE = "model.onnx"
FLOAT_ONNX_FILE = "model.fp32.onnx"
REPORT_FILE = "export_report.json"


@dataclass(frozen=True)
class LayerExport:
    """One quantized module in the ONNX export: how it was written and what ORT ran it on."""

    module: str
    form: str  # "static", "dynamic", "dynamic_per_token", "weight_only", "matmul_nbits", "float" or "not_found"
    kernel: str  # op that consumed the quantized (or kept float) weight in ORT's optimized graph ("" if none)
    integer: bool
    note: str = ""
