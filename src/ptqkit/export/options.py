"""`ExportOptions`: how `export` writes and checks its formats, as one frozen typed config.

`export(...)` takes these as keyword arguments and builds the options first, so a bad value is
an ExportError naming the option, the value and what is valid before anything is written; the
ONNX driver (`onnx_export.export_onnx`) receives the built options. Fields are checked from their
annotations (`core.fields.check_fields`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from ptqkit.core.errors import ExportError
from ptqkit.core.fields import AtLeast, check_fields, literal_values
from ptqkit.export.onnx_nbits import NBitsOptions

__all__ = ["ONNX_WEIGHT_DTYPES", "ExportOptions", "FloatType", "GGUFOptions", "OnnxWeightDtype"]

OnnxWeightDtype = Literal["auto", "int8", "uint8"]
ONNX_WEIGHT_DTYPES: tuple[str, ...] = literal_values(OnnxWeightDtype)
FloatType = Literal["f16", "f32"]


@dataclass(frozen=True)
class GGUFOptions:
    """How the "gguf" format stores float tensors (`float_type`: "f16" like llama.cpp's
    converter, or "f32"), and whether scales fp16 cannot hold exactly are rounded to fp16
    (`requantize`, which checks that no code changes) or refused."""

    float_type: FloatType = "f16"
    requantize: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "export gguf", error=ExportError)


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How the ONNX format is written and checked (see `ptqkit.export.export`).

    - `strict`: raise ExportError if a quantized module did not run on an integer kernel (or has
      no integer form), instead of reporting it.
    - `opset`: the ONNX opset of the captured float graph.
    - `dynamic_shapes`: batch (and sequence) dimensions stay symbolic in the graph.
    - `keep_float`: also keep the float graph, `model.fp32.onnx`.
    - `fp32_tolerance`: the float graph may differ from torch by this much times max(1, |output|).
    - `onnx_weight_dtype`: "auto" (uint8 storage on x86 CPUs without VNNI, where ORT's u8s8
      kernels saturate; int8 elsewhere), "int8" or "uint8".
    - `matmul_nbits`: how weight-only low-bit Linear layers become MatMulNBits (`NBitsOptions`).
    - `kv_cache`: capture a Hugging Face causal LM as the KV-cached decoder step.
    - `gguf`: how the "gguf" format is written (`GGUFOptions`).
    """

    strict: bool = False
    opset: Annotated[int, AtLeast(1)] = 18
    dynamic_shapes: bool = True
    keep_float: bool = False
    fp32_tolerance: Annotated[float, AtLeast(0)] = 1e-4
    onnx_weight_dtype: OnnxWeightDtype = "auto"
    matmul_nbits: NBitsOptions = field(default_factory=NBitsOptions)
    kv_cache: bool = False
    gguf: GGUFOptions = field(default_factory=GGUFOptions)

    def __post_init__(self) -> None:
        check_fields(self, "export", error=ExportError)
        if self.kv_cache and not self.dynamic_shapes:
            raise ExportError("export: kv_cache=True needs dynamic_shapes=True (one graph for any prompt and cache length)")
