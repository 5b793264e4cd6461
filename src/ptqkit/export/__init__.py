"""Export a quantized model: ONNX (int8 QDQ and, for weight-only low-bit Linear layers, ONNX
Runtime's MatMulNBits; verified to run on ORT's integer kernels) and the ptqkit safetensors artifact.

`export(qmodel, out_dir, formats=("onnx",), example_inputs=...)` writes into a temporary
directory next to `out_dir` and renames it into place at the end, so a failed or killed export
never leaves a half-written `out_dir`. onnx / onnxruntime are imported only when "onnx" is asked for.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ptqkit.core.errors import ExportError
from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE, REPORT_FILE, LayerExport
from ptqkit.export.onnx_nbits import NBitsOptions

__all__ = ["FORMATS", "ExportResult", "LayerExport", "NBitsOptions", "export"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "safetensors")
@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote and what it verified."""

    out_dir: Path
    files: dict[str, Path]
    layers: tuple[LayerExport, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)  # fp32 ORT vs torch, quantized ORT vs simulated

    @property
    def float_layers(self) -> tuple[str, ...]:
        """Targeted modules that did not run on an integer kernel in ONNX Runtime."""
        return tuple(layer.module for layer in self.layers if not layer.integer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "files": {k: str(v) for k, v in self.files.items()},
            "layers": [asdict(layer) for layer in self.layers],
            "float_layers": list(self.float_layers),
            "checks": self.checks,
        }


def export(
    qmodel: nn.Module,
    out_dir: str | Path,
    formats: Sequence[str] = ("onnx",),
    *,
    example_inputs: Any = None,
    strict: bool = False,
    opset: int = 18,
    dynamic_shapes: bool = True,
    keep_float: bool = False,
    fp32_tolerance: float = 1e-4,
    onnx_weight_dtype: str = "auto",
    matmul_nbits: NBitsOptions | None = None,
    kv_cache: bool = False,
) -> ExportResult:
    """Export `qmodel` (from `ptqkit.engine.quantize`) to `out_dir` in the given formats.

    - "onnx": `model.onnx` with int8 weights and ptqkit's activation QParams (see
      `ptqkit.export.onnx_qdq`), plus `export_report.json`. The float graph is checked against
      torch first (max abs difference <= `fp32_tolerance` x max |output|, else ExportError); then
      the quantized graph is loaded in ONNX Runtime and the kernel of every quantized module is
      read from the optimized graph. `strict=True` raises ExportError if any stayed float.
      `keep_float=True` also keeps `model.fp32.onnx`. `example_inputs`: a tensor, a tuple of
      tensors or a mapping name -> tensor (e.g. a tokenizer's output), batch size >= 2.
      `onnx_weight_dtype`: "auto" (default: uint8 storage, codes + 128, on x86 CPUs without
      VNNI, where ORT's u8s8 kernels saturate; int8 elsewhere), "int8" or "uint8".
      Weight-only Linear layers with int2..int7 codes or per-group weights (w4a16) become
      `com.microsoft.MatMulNBits` nodes (`ptqkit.export.onnx_nbits`); `matmul_nbits`
      (`NBitsOptions`, default accuracy_level 0: ORT equals the simulated model to float
      rounding) sets how. Such layers without a MatMulNBits form stay float, reported per layer
      (ExportError under `strict`). HF decoders are exported without their KV cache (logits
      only) unless `kv_cache=True`: then a Hugging Face causal LM becomes one graph for the
      prefill and the one-token decode steps, batch 1, with inputs `input_ids`,
      `attention_mask`, `past_key_values.{i}.key` / `.value` and outputs `logits`,
      `present.{i}.key` / `.value` (`ptqkit.export.onnx_decoder`; run it with its
      `OrtDecoder`). `example_inputs` is then one prompt, input_ids [1, T] (a tensor or a
      mapping with input_ids); the checks run it as a prefill and then one decode step. A model
      that is not a causal LM with a KV cache raises ExportError naming what it lacks.
    - "safetensors": the ptqkit artifact (`ptqkit.export.artifact.save_artifact`).
    """
    formats = _check_formats(formats)
    if not hasattr(qmodel, "ptqkit_info"):
        raise ExportError(
            f"export: {type(qmodel).__name__} has no ptqkit_info; pass the model returned by ptqkit.engine.quantize(...)"
        )
    if kv_cache and "onnx" not in formats:
        raise ExportError(f"export: kv_cache=True applies to the 'onnx' format only; formats are {list(formats)}")
    if "onnx" in formats and example_inputs is None:
        raise ExportError("export: formats include 'onnx' but example_inputs is None; pass the inputs of one forward call")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files: dict[str, Path] = {}
        layers: tuple[LayerExport, ...] = ()
        checks: dict[str, Any] = {}
        if "onnx" in formats:
            from ptqkit.export.onnx_export import export_onnx

            layers, checks = export_onnx(
                qmodel, tmp, example_inputs, strict=strict, opset=opset, dynamic=dynamic_shapes,
                keep_float=keep_float, fp32_tolerance=fp32_tolerance, weight_dtype=onnx_weight_dtype,
                nbits=matmul_nbits, kv_cache=kv_cache,
            )
            files["onnx"] = out_dir / ONNX_FILE
            files["report"] = out_dir / REPORT_FILE
            if keep_float:
                files["onnx_fp32"] = out_dir / FLOAT_ONNX_FILE
        if "safetensors" in formats:
            try:
                from ptqkit.export.artifact import save_artifact
            except ModuleNotFoundError as exc:
                raise ExportError(
                    "export: format 'safetensors' needs ptqkit.export.artifact.save_artifact, which is not "
                    f"available in this installation ({exc}); export formats=('onnx',) instead"
                ) from exc
            save_artifact(qmodel, tmp)
            files["safetensors"] = out_dir / "model.safetensors"
        result = ExportResult(out_dir=out_dir, files=files, layers=layers, checks=checks)
        if "onnx" in formats:
            (tmp / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        _replace_dir(tmp, out_dir)
        return result
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"export: unknown format(s) {unknown or 'none given'}; valid: {', '.join(FORMATS)}")
    return formats


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move `tmp` to `out_dir`; an existing `out_dir` is swapped out first and removed after."""
    old = None
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"export: {out_dir} exists and is not a directory")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "previous")
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
