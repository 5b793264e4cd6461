"""Export a quantized model: ONNX (int8 QDQ and, for weight-only low-bit Linear layers, ONNX
Runtime's MatMulNBits; verified to run on ORT's integer kernels) and the ptqkit safetensors artifact.

`export(qmodel, out_dir, formats=("onnx",), example_inputs=...)` writes into a temporary
directory next to `out_dir` and swaps it into place at the end (`ptqkit.core.atomic`), so a failed
or killed export never leaves a half-written `out_dir`. Files of an existing `out_dir` that the
export does not write (e.g. a saved artifact) are kept; a non-empty directory holding no ptqkit
artifact or export is refused (OutputPathError). export_report.json records the SHA-256 of every
ONNX file and, when known, of the artifact the export was made from (`artifact_sha256`), so that
stale exports are recognised. onnx / onnxruntime are imported only when "onnx" is asked for.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ptqkit.core import atomic
from ptqkit.core.errors import ExportError
from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE, REPORT_FILE, LayerExport
from ptqkit.export.onnx_nbits import NBitsOptions
from ptqkit.export.options import ONNX_WEIGHT_DTYPES, ExportOptions, GGUFOptions, OnnxWeightDtype

__all__ = [
    "FORMATS", "ONNX_WEIGHT_DTYPES", "TARGETS", "ExportOptions", "ExportResult", "ExportTarget", "GGUFOptions", "LayerExport",
    "NBitsOptions", "OnnxWeightDtype", "export",
]

logger = logging.getLogger(__name__)

_EXPORT_FILES = (ONNX_FILE, FLOAT_ONNX_FILE, REPORT_FILE)
_ARTIFACT_FILES = ("model.safetensors", "quantization.json", "config.json")  # ptqkit.export.artifact.ARTIFACT_FILES
_SERVING_MARKER = "ptqkit_export.json"  # the serving formats (compressed-tensors, gguf) the last export wrote here


def _written_by_ptqkit(directory: Path) -> bool:
    """Whether `directory` holds a ptqkit artifact or export (ptqkit.export.artifact.written_by_ptqkit)."""
    return any((directory / name).is_file() for name in (_ARTIFACT_FILES[1], REPORT_FILE, _SERVING_MARKER))


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
    onnx_weight_dtype: OnnxWeightDtype = "auto",
    matmul_nbits: NBitsOptions | None = None,
    kv_cache: bool = False,
    gguf: GGUFOptions | None = None,
    artifact_sha256: str | None = None,
) -> ExportResult:
    """Export `qmodel` (from `ptqkit.engine.quantize`) to `out_dir` in the given formats.

    - "onnx": `model.onnx` with int8 weights and ptqkit's activation QParams (see
      `ptqkit.export.onnx_qdq`), plus `export_report.json`. The float graph is checked against
      torch first (max abs difference <= `fp32_tolerance` x max |output|, else ExportError); then
      the quantized graph is loaded in ONNX Runtime and the kernel of every quantized module is
      read from the optimized graph. `strict=True` raises ExportError if any stayed float.
      `keep_float=True` also keeps `model.fp32.onnx`. `example_inputs`: a tensor, a tuple of
      tensors or a mapping name -> tensor (e.g. a tokenizer's output), batch size >= 2.
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
    - "safetensors": the ptqkit artifact (`export.artifact`); "compressed-tensors": the checkpoint
      transformers/vLLM load (`export.compressed_tensors`); "gguf": `model.gguf` for llama.cpp
      (`export.gguf_format`, written as `gguf: GGUFOptions` says).
    `artifact_sha256`: the SHA-256 of the model.safetensors `qmodel` was loaded from, recorded
    in export_report.json (with "safetensors", the artifact written alongside is recorded).
    The keywords become one `ExportOptions` (each option described there), checked first.
    """
    onnx_options = ExportOptions(
        strict=strict, opset=opset, dynamic_shapes=dynamic_shapes, keep_float=keep_float, fp32_tolerance=fp32_tolerance,
        onnx_weight_dtype=onnx_weight_dtype, matmul_nbits=NBitsOptions() if matmul_nbits is None else matmul_nbits,
        kv_cache=kv_cache, gguf=GGUFOptions() if gguf is None else gguf,
    )
    formats = _check_arguments(qmodel, formats, example_inputs, kv_cache)
    out_dir = Path(out_dir)
    with atomic.build_directory(out_dir, owned=_written_by_ptqkit) as build:
        result, artifact_sha256 = _write_formats(qmodel, build.path, out_dir, formats, example_inputs, onnx_options, artifact_sha256)
        if "onnx" in formats:
            _write_report(build.path, result, artifact_sha256)
        replaced = tuple(name for f in formats for name in TARGETS[f].files)
        build.carry(lambda entry: entry.name not in replaced)
        build.commit()
    return result


def _check_arguments(qmodel: nn.Module, formats: Sequence[str], example_inputs: Any, kv_cache: bool) -> tuple[str, ...]:
    formats = _check_formats(formats)
    if not hasattr(qmodel, "ptqkit_info"):
        raise ExportError(
            f"export: {type(qmodel).__name__} has no ptqkit_info; pass the model returned by ptqkit.engine.quantize(...)"
        )
    if kv_cache and "onnx" not in formats:
        raise ExportError(f"export: kv_cache=True applies to the 'onnx' format only; formats are {list(formats)}")
    if "onnx" in formats and example_inputs is None:
        raise ExportError("export: formats include 'onnx' but example_inputs is None; pass the inputs of one forward call")
    return formats


@dataclass(frozen=True)
class _Written:
    """What one target wrote: files (named under `out_dir`), per-layer records and checks, and the
    SHA-256 of the artifact it wrote (None if it wrote none)."""

    files: dict[str, Path]
    layers: tuple[LayerExport, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)
    artifact_sha256: str | None = None


@dataclass(frozen=True)
class ExportTarget:
    """One export format: `write(qmodel, tmp, out_dir, example_inputs, options)` writes it
    into the temporary directory `tmp`; `files` are the names it owns in `out_dir` (replaced by a
    new export, every other file is kept). Adding a format is one write function and one row of
    `TARGETS`."""

    name: str
    files: tuple[str, ...]
    write: Callable[[nn.Module, Path, Path, Any, ExportOptions], _Written]


def _write_onnx(qmodel: nn.Module, tmp: Path, out_dir: Path, example_inputs: Any, options: ExportOptions) -> _Written:
    from ptqkit.export.onnx_export import export_onnx

    layers, checks = export_onnx(qmodel, tmp, example_inputs, options)
    files = {"onnx": out_dir / ONNX_FILE, "report": out_dir / REPORT_FILE}
    if options.keep_float:
        files["onnx_fp32"] = out_dir / FLOAT_ONNX_FILE
    return _Written(files, layers, checks)


def _write_safetensors(qmodel: nn.Module, tmp: Path, out_dir: Path, example_inputs: Any, options: ExportOptions) -> _Written:
    try:
        from ptqkit.export.artifact import write_artifact_files
    except ModuleNotFoundError as exc:
        raise ExportError(
            "export: format 'safetensors' needs ptqkit.export.artifact.save_artifact, which is not "
            f"available in this installation ({exc}); export formats=('onnx',) instead"
        ) from exc
    sha256 = write_artifact_files(qmodel, tmp)
    return _Written({"safetensors": out_dir / "model.safetensors"}, artifact_sha256=sha256)


def _write_compressed_tensors(qmodel: nn.Module, tmp: Path, out_dir: Path, example_inputs: Any, options: Any) -> _Written:
    from ptqkit.export.compressed_tensors import write_compressed_tensors

    if (tmp / "model.safetensors").exists():
        raise ExportError(
            "export: formats 'safetensors' and 'compressed-tensors' both write model.safetensors and config.json; "
            "export them into different directories"
        )
    return _serving_written(tmp, out_dir, "compressed-tensors", write_compressed_tensors(qmodel, tmp))


def _write_gguf(qmodel: nn.Module, tmp: Path, out_dir: Path, example_inputs: Any, options: Any) -> _Written:
    """The "gguf" format, written as `options.gguf` (`GGUFOptions`) says."""
    from ptqkit.export.gguf_format import write_gguf

    return _serving_written(tmp, out_dir, "gguf", write_gguf(qmodel, tmp, options.gguf))


def _serving_written(tmp: Path, out_dir: Path, name: str, files: list[str]) -> _Written:
    """Record a serving format in ptqkit_export.json (so that a later export may rebuild the directory)."""
    marker = tmp / _SERVING_MARKER
    formats = json.loads(marker.read_text(encoding="utf-8"))["formats"] if marker.is_file() else []
    atomic.write_text(marker, json.dumps({"formats": sorted({*formats, name})}, indent=2) + "\n")
    return _Written({file: out_dir / file for file in files})


TARGETS: dict[str, ExportTarget] = {  # written in this order
    "onnx": ExportTarget("onnx", _EXPORT_FILES, _write_onnx),
    "safetensors": ExportTarget("safetensors", _ARTIFACT_FILES, _write_safetensors),
    # compressed_tensors.FILES / gguf_format.FILES, spelled out so that importing export loads neither module
    "compressed-tensors": ExportTarget("compressed-tensors", (
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
        "chat_template.jinja", "chat_template.json", _SERVING_MARKER,
    ), _write_compressed_tensors),
    "gguf": ExportTarget("gguf", ("model.gguf", _SERVING_MARKER), _write_gguf),
}
FORMATS = tuple(TARGETS)


def _write_formats(
    qmodel: nn.Module, tmp: Path, out_dir: Path, formats: tuple[str, ...], example_inputs: Any, onnx_options: ExportOptions,
    artifact_sha256: str | None,
) -> tuple[ExportResult, str | None]:
    """Write the formats' targets into the temporary directory `tmp`; (the result, naming files
    under `out_dir`, and the SHA-256 of the artifact the export comes from or was written with)."""
    files: dict[str, Path] = {}
    layers: tuple[LayerExport, ...] = ()
    checks: dict[str, Any] = {}
    for name, target in TARGETS.items():
        if name in formats:
            written = target.write(qmodel, tmp, out_dir, example_inputs, onnx_options)
            files.update(written.files)
            layers, checks = layers + written.layers, checks | written.checks
            artifact_sha256 = written.artifact_sha256 or artifact_sha256
    return ExportResult(out_dir=out_dir, files=files, layers=layers, checks=checks), artifact_sha256


def _write_report(tmp: Path, result: ExportResult, artifact_sha256: str | None) -> None:
    """export_report.json: the result, the SHA-256 of each ONNX file, and of the source artifact."""
    report = result.to_dict()
    report["files_sha256"] = {
        name: atomic.file_sha256(tmp / name) for name in (ONNX_FILE, FLOAT_ONNX_FILE) if (tmp / name).is_file()
    }
    report["artifact_sha256"] = artifact_sha256
    atomic.write_text(tmp / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True))


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"export: unknown format(s) {unknown or 'none given'}; valid: {', '.join(FORMATS)}")
    return formats
