"""A run directory: what `ptqkit quantize --out DIR` writes, and what later commands read.

    model.safetensors, quantization.json (+ config.json)  the ptqkit artifact (export.artifact)
    recipe.yaml                  the effective recipe (after --set), as validated
    source.json                  how the float model was loaded (sources.LoadedModel.source)
    example_inputs.safetensors   one calibration batch: the inputs of ONNX export and its checks
    summary.json                 what the quantize command measured
    onnx/model.onnx, onnx/export_report.json   after an ONNX export

`open_run` rebuilds the float model from source.json (a Hugging Face directory, or a factory
whose structure-changing pre-transforms, BN folding and CLE, are replayed on it) and loads the
quantized one, so `ptqkit export DIR` and `ptqkit inspect DIR` work on a run alone.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.core.errors import ArtifactError, ConfigError
from ptqkit.engine.quantize import quantize
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.size import model_size
from ptqkit.export import export
from ptqkit.export.artifact import save_artifact
from ptqkit.export.load import load_artifact
from ptqkit.workflows.sources import LoadedModel, load_model

__all__ = ["RunFiles", "bench_run", "describe_run", "export_run", "open_run", "output_sqnr_on", "quantize_run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """The paths of a run directory."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def source(self) -> Path:
        return self.root / "source.json"

    @property
    def example(self) -> Path:
        return self.root / "example_inputs.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def onnx_dir(self) -> Path:
        return self.root / "onnx"


@torch.no_grad()
def output_sqnr_on(model: nn.Module, qmodel: nn.Module, example: Any) -> float:
    """SQNR (dB) of the quantized model's main output against the float model's, on `example`."""
    from ptqkit.calibration.samples import call_model
    from ptqkit.core.primitives import sqnr_db
    from ptqkit.eval.evaluate import main_tensor

    reference = main_tensor(call_model(model, example)).float()
    candidate = main_tensor(call_model(qmodel, example)).float()
    return float(sqnr_db(reference, candidate))


def _save_example(path: Path, example: Any) -> None:
    from safetensors.torch import save_file

    tensors = dict(example) if isinstance(example, dict) else {"input": example}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _load_example(path: Path) -> Any:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ArtifactError(f"{path} is missing: this run directory was not written by `ptqkit quantize`")
    tensors = load_file(str(path))
    return tensors["input"] if list(tensors) == ["input"] else tensors


def quantize_run(
    loaded: LoadedModel,
    recipe: Recipe,
    calib: Any,
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] = (),
    progress: bool = True,
    distributed: bool = False,
) -> dict[str, Any]:
    """Quantize `loaded.model` with `recipe` on `calib`, write the run directory, and return the
    summary (also written to summary.json). With `distributed` every rank calibrates on its
    share of the data and rank 0 alone writes; the other ranks wait for it and return
    {"rank": r, "written_by": 0}."""

    files = RunFiles(Path(out_dir))
    start = time.perf_counter()
    qmodel = quantize(loaded.model, recipe, calib, progress=progress, distributed=distributed)
    seconds = time.perf_counter() - start
    if distributed:
        from ptqkit.stats.distributed import DataParallel

        parallel = DataParallel.current()
        if not parallel.is_writer:
            parallel.barrier()  # rank 0 writes, then meets the others here
            return {"rank": parallel.rank, "written_by": 0}
        try:
            return _write_run(files, loaded, recipe, calib, qmodel, seconds, formats, ranks=parallel.world_size)
        finally:
            parallel.barrier()
    return _write_run(files, loaded, recipe, calib, qmodel, seconds, formats)


def _write_run(
    files: RunFiles,
    loaded: LoadedModel,
    recipe: Recipe,
    calib: Any,
    qmodel: nn.Module,
    seconds: float,
    formats: tuple[str, ...],
    *,
    ranks: int = 1,
) -> dict[str, Any]:

    example = next(iter(calib.batches())) if calib is not None and len(calib) else None
    size = model_size(qmodel)
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "quantize_seconds": round(seconds, 3),
        "quantized_layers": size.quantized_layers,
        "skipped_modules": len(qmodel.ptqkit_info.plan.skipped),
        "calibration_samples": len(calib) if calib is not None else 0,
        "calibration_ranks": ranks,
        "model_float_bytes": size.total_float_bytes,
        "model_quantized_bytes": size.total_quantized_bytes,
        "output_sqnr_db": output_sqnr_on(loaded.model, qmodel, example) if example is not None else None,
    }
    save_artifact(qmodel, files.root, metrics=summary)
    recipe.save(files.recipe)
    files.source.write_text(json.dumps(loaded.source, indent=2) + "\n", encoding="utf-8")
    if example is not None:
        _save_example(files.example, example)
    summary["artifact_bytes"] = (files.root / "model.safetensors").stat().st_size
    if "onnx" in formats:
        summary["onnx"] = export_run(files.root, qmodel=qmodel)
    files.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def onload_run(
    model_dir: str | Path, recipe: Recipe, calib: Any, out_dir: str | Path, *, progress: bool = True, memory_check: bool = True
) -> dict[str, Any]:
    """Quantize the Hugging Face model in `model_dir` with layer onloading (its weights stay on
    disk; `ptqkit.engine.onloading`) and write the run directory; returns the summary."""
    from ptqkit.core.progress import peak_rss_bytes
    from ptqkit.engine.onloading import quantize_onloaded
    from ptqkit.export.load import read_manifest

    files = RunFiles(Path(out_dir))
    start = time.perf_counter()
    save_artifact(quantize_onloaded(model_dir, recipe, calib, progress=progress, memory_check=memory_check), files.root)
    seconds = time.perf_counter() - start
    manifest = read_manifest(files.root)
    recipe.save(files.recipe)
    files.source.write_text(json.dumps({"kind": "hf", "path": str(Path(model_dir).resolve())}, indent=2) + "\n", encoding="utf-8")
    _save_example(files.example, next(iter(calib.batches())))
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "onload": True,
        "quantize_seconds": round(seconds, 3),
        "quantized_layers": len(manifest["layers"]),
        "skipped_modules": len(manifest["skipped"]),
        "calibration_samples": len(calib),
        "calibration_ranks": 1,
        "artifact_bytes": (files.root / "model.safetensors").stat().st_size,
        "peak_rss_bytes": peak_rss_bytes(),
        "output_sqnr_db": None,  # the float and quantized models are never both in memory
    }
    files.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _float_model(files: RunFiles, recipe: Recipe) -> LoadedModel:
    if not files.source.is_file():
        raise ArtifactError(f"{files.source} is missing: this run directory was not written by `ptqkit quantize`")
    source = json.loads(files.source.read_text(encoding="utf-8"))
    if source.get("kind") == "hf":
        return load_model(source["path"])
    loaded = load_model(source["factory"], source.get("weights"))
    from ptqkit.algorithms.pipeline import apply_pre_transforms, split_algorithms

    apply_pre_transforms(loaded.model, split_algorithms(recipe.algorithms).pre_transforms)  # the artifact's module structure
    return loaded


def open_run(out_dir: str | Path) -> tuple[LoadedModel, nn.Module, Any]:
    """(the float model, the quantized model, the example inputs) of a run directory. For a
    factory model the float model has the recipe's pre-transforms applied (same function)."""
    import copy


    files = RunFiles(Path(out_dir))
    manifest = _read_manifest(files.root)
    recipe = Recipe.from_dict(manifest["recipe"])
    loaded = _float_model(files, recipe)
    qmodel = load_artifact(files.root, copy.deepcopy(loaded.model))
    return loaded, qmodel, _load_example(files.example)


def _read_manifest(root: Path) -> dict[str, Any]:
    from ptqkit.export.load import read_manifest

    return read_manifest(root)


def export_run(out_dir: str | Path, *, qmodel: nn.Module | None = None, strict: bool = False, keep_float: bool = False) -> dict[str, Any]:
    """Export a run directory's quantized model to ONNX: onnx/model.onnx + onnx/export_report.json
    (+ onnx/model.fp32.onnx with `keep_float`); the onnx/ folder is replaced as a whole, atomically."""

    files = RunFiles(Path(out_dir))
    if qmodel is None:
        _, qmodel, example = open_run(files.root)
    else:
        example = _load_example(files.example)
    result = export(qmodel, files.onnx_dir, ("onnx",), example_inputs=example, strict=strict, keep_float=keep_float)
    integer = sum(layer.integer for layer in result.layers)
    return {
        "file": str(result.files["onnx"]), "integer_layers": integer, "float_layers": list(result.float_layers),
        "kernels": dict(Counter(layer.kernel or "none" for layer in result.layers)), "checks": result.checks,
    }


def bench_run(out_dir: str | Path, *, runtime: str = "onnxruntime", threads: int | None = None, warmup: int = 3, reps: int = 20) -> Any:
    """Float vs quantized speed of a run directory on its example batch (`eval.bench`): in ONNX
    Runtime (exported again with the float graph kept, when onnx/model.fp32.onnx is missing) or in
    torch (the float model against the packed quantized one)."""
    from ptqkit.eval.bench import RUNTIMES, bench, bench_onnx

    files = RunFiles(Path(out_dir))
    if runtime not in RUNTIMES:
        raise ConfigError(f"bench: runtime {runtime!r} is unknown; valid: {', '.join(RUNTIMES)}")
    loaded, qmodel, example = open_run(files.root)
    if runtime == "torch":
        return bench(loaded.model, qmodel, example, threads=threads, warmup=warmup, reps=reps)
    float_onnx, report = files.onnx_dir / "model.fp32.onnx", files.onnx_dir / "export_report.json"
    if not float_onnx.is_file() or not report.is_file():
        export_run(files.root, qmodel=qmodel, keep_float=True)
    kernels = Counter(layer["kernel"] or "none" for layer in json.loads(report.read_text(encoding="utf-8"))["layers"])
    return bench_onnx(float_onnx, files.onnx_dir / "model.onnx", example, threads=threads or 1, warmup=warmup, reps=reps, kernels=dict(kernels))


def describe_run(out_dir: str | Path) -> dict[str, Any]:
    """What a run directory or artifact holds, read from its JSON files (no model is loaded)."""
    root = Path(out_dir)
    manifest = _read_manifest(root)
    files = RunFiles(root)
    layers = manifest["layers"]
    kinds = Counter(f"{layer.get('plan_type')} {(layer.get('weights') or {}).get('qtype', 'float')}" for layer in layers)
    return {
        "artifact": str(root),
        "recipe": manifest["recipe"].get("name"),
        "model_class": manifest["model"]["class"],
        "quantized_layers": len(layers),
        "layers_by_kind": dict(kinds),
        "skipped_modules": len(manifest["skipped"]),
        "calibration": manifest.get("calibration"),
        "versions": manifest.get("versions"),
        "metrics": manifest.get("metrics"),
        "files": sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
        "source": json.loads(files.source.read_text(encoding="utf-8")) if files.source.is_file() else None,
    }
