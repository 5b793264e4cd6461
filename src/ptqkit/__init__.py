"""ptqkit: post-training quantization for PyTorch models.

Importing ptqkit loads torch and numpy only; onnx, onnxruntime, transformers and the other
optional dependencies are imported lazily by the functions that need them.
"""
from ptqkit.calibration import CalibrationData
from ptqkit.core.errors import (
    ArtifactError,
    CalibrationDataError,
    ConfigError,
    ExportError,
    NonFiniteError,
    PTQError,
    UnsupportedModelError,
)
from ptqkit.core.primitives import (
    dequantize,
    fake_quantize,
    mse,
    pack_lowbit,
    qparams_from_range,
    qparams_from_tensor,
    sqnr_db,
    unpack_lowbit,
)
from ptqkit.core.primitives import quantize as quantize_tensor  # `pq.quantize` quantizes models
from ptqkit.core.qtypes import (
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    INT4,
    INT8,
    INT8_NARROW,
    NF4,
    UINT8,
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QType,
)
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.core.version import __version__
from ptqkit.engine.quantize import dequantize_model, plan, quantize, quantize_
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.bench import bench
from ptqkit.eval.doctor import doctor
from ptqkit.eval.evaluate import QuantReport, evaluate
from ptqkit.eval.report import write_report as report
from ptqkit.eval.sensitivity import sensitivity, suggest
from ptqkit.eval.size import model_size
from ptqkit.export import export
from ptqkit.export.artifact import save_artifact as save
from ptqkit.export.load import load_artifact as load
from ptqkit.export.pack import pack
from ptqkit.mixed_precision.search import search

__all__ = [
    "__version__",
    "ArtifactError",
    "CalibrationDataError",
    "ConfigError",
    "ExportError",
    "NonFiniteError",
    "PTQError",
    "UnsupportedModelError",
    "dequantize",
    "fake_quantize",
    "mse",
    "pack_lowbit",
    "qparams_from_range",
    "qparams_from_tensor",
    "quantize_tensor",
    "sqnr_db",
    "unpack_lowbit",
    "FP4_E2M1",
    "FP8_E4M3",
    "FP8_E5M2",
    "INT4",
    "INT8",
    "INT8_NARROW",
    "NF4",
    "UINT8",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QType",
    "QParams",
    "QuantSpec",
    "Recipe",
    "CalibrationData",
    "dequantize_model",
    "plan",
    "quantize",
    "quantize_",
    "model_size",
    "QuantReport",
    "evaluate",
    "report",
    "doctor",
    "bench",
    "sensitivity",
    "suggest",
    "export",
    "save",
    "load",
    "pack",
    "search",
]
