"""A run directory: what `ptqkit quantize --out DIR` writes, and what later commands read.

    model.safetensors, quantization.json (+ config.json)  the ptqkit artifact (export.artifact)
    recipe.yaml                  the effective recipe (after --set), as validated
    source.json                  how the float model was loaded (sources.LoadedModel.source)
    example_inputs.safetensors   one calibration batch: the inputs of ONNX export and its checks
    summary.json                 what the quantize command measured
    onnx/model.onnx, onnx/export_report.json   after an ONNX export
    bench.json                   after `ptqkit bench`; report/ after `ptqkit report`

`open_run` rebuilds the float model from source.json (a Hugging Face directory, or a factory
whose structure-changing pre-transforms, BN folding and CLE, are replayed on it) and loads the
quantized one, so `ptqkit export DIR` and `ptqkit inspect DIR` work on a run alone.

Trust (docs/trust-model.md): a run directory is data. A factory named in source.json is called
only when the user allows it (`trust_factory=True`, `--trust-factory`) or passes the model
(`model=`); the float weights' SHA-256 recorded at quantization is checked before they are used.
The run is written as one transaction: built aside next to `out_dir` under an exclusive lock and
swapped in once (`ptqkit.core.atomic`). Derived files (onnx/, bench.json, summary.json, report/)
record the SHA-256 of the model.safetensors they came from; one that does not match is dropped
when the run is rewritten and never used or reported.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.core import atomic
from ptqkit.core.errors import ArtifactError, ConfigError, UntrustedCodeError
from ptqkit.engine.quantize import quantize
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.size import model_size
from ptqkit.export import export
from ptqkit.export.artifact import (
    ARTIFACT_FILES,
    ARTIFACT_SHA_KEY,
    MODEL_FILE,
    recorded_artifact_sha,
    write_artifact_files,
    written_by_ptqkit,
)
from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE, REPORT_FILE
from ptqkit.export.load import load_artifact, read_manifest
from ptqkit.workflows.sources import LoadedModel, load_model, source_with_hashes, verify_source

__all__ = [
    "RunFiles", "bench_run", "current_bench", "describe_run", "export_run", "open_run", "output_sqnr_on", "quantize_run",
    "run_artifact_sha", "write_bench",
]

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

    @property
    def bench(self) -> Path:
        return self.root / "bench.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


RUN_FILES = (*ARTIFACT_FILES, "recipe.yaml", "source.json", "example_inputs.safetensors", "summary.json")


@torch.no_grad()
def output_sqnr_on(model: nn.Module, qmodel: nn.Module, example: Any) -> float:
    """SQNR (dB) of the quantized model's main output against the float model's, on `example`."""
    from ptqkit.calibration.samples import call_on_batch
    from ptqkit.core.primitives import sqnr_db
    from ptqkit.eval.evaluate import main_tensor

    reference = main_tensor(call_on_batch(model, example, "the first calibration batch")).float()
    candidate = main_tensor(call_on_batch(qmodel, example, "the first calibration batch")).float()
    return float(sqnr_db(reference, candidate))


def _save_example(path: Path, example: Any) -> None:
    from safetensors.torch import save

    tensors = dict(example) if isinstance(example, dict) else {"input": example}
    atomic.write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))


def _load_example(path: Path) -> Any:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ArtifactError(f"{path} is missing: this run directory was not written by `ptqkit quantize`")
    tensors = load_file(str(path))
    return tensors["input"] if list(tensors) == ["input"] else tensors


@contextlib.contextmanager
def _building(out_dir: str | Path, writer: bool = True) -> Iterator[atomic.DirectoryBuild | None]:
    """The run directory built aside under an exclusive lock on `out_dir` (checked and locked
    before any work, so that an unwritable or busy output fails first); None off the writer rank."""
    if not writer:
        yield None
        return
    with atomic.build_directory(out_dir, owned=written_by_ptqkit) as build:
        yield build


def quantize_run(
    loaded: LoadedModel,
    recipe: Recipe,
    calib: Any,
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] = (),
    progress: bool = True,
    distributed: bool = False,
    keep_float: bool = False,
) -> dict[str, Any]:
    """Quantize `loaded.model` with `recipe` on `calib`, write the run directory, and return the
    summary (also written to summary.json); `keep_float` keeps the float ONNX graph beside the
    quantized one (onnx/model.fp32.onnx) for side-by-side timing. With `distributed` every rank calibrates on its
    share of the data and rank 0 alone writes; the other ranks wait for it and return
    {"rank": r, "written_by": 0}. The run directory is written as one transaction (see the
    module docstring): killed at any step, `out_dir` holds the previous run or the new one."""
    parallel = None
    if distributed:
        from ptqkit.stats.distributed import DataParallel

        parallel = DataParallel.current()
    with _building(out_dir, parallel is None or parallel.is_writer) as build:
        start = time.perf_counter()
        qmodel = quantize(loaded.model, recipe, calib, progress=progress, distributed=distributed)
        seconds = time.perf_counter() - start
        if parallel is None:
            return _write_run(build, loaded, recipe, calib, qmodel, seconds, formats, keep_float=keep_float)
        if not parallel.is_writer:
            parallel.barrier()  # rank 0 writes, then meets the others here
            return {"rank": parallel.rank, "written_by": 0}
        try:
            return _write_run(build, loaded, recipe, calib, qmodel, seconds, formats, ranks=parallel.world_size, keep_float=keep_float)
        finally:
            parallel.barrier()


def _write_run(
    build: Any,
    loaded: LoadedModel,
    recipe: Recipe,
    calib: Any,
    qmodel: nn.Module,
    seconds: float,
    formats: tuple[str, ...],
    *,
    ranks: int = 1,
    keep_float: bool = False,
) -> dict[str, Any]:
    files, tmp = RunFiles(build.target), RunFiles(build.path)
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
    sha = write_artifact_files(qmodel, tmp.root, metrics=summary)
    recipe.save(tmp.recipe)
    atomic.write_json(tmp.source, source_with_hashes(loaded.source))
    if example is not None:
        _save_example(tmp.example, example)
    summary["artifact_bytes"] = (tmp.root / MODEL_FILE).stat().st_size
    if "onnx" in formats:
        summary["onnx"] = _export_into(tmp, qmodel, example, sha, files, keep_float=keep_float)
    _finish(build, summary, sha)
    return summary


def _finish(build: Any, summary: dict[str, Any], sha: str) -> None:
    """summary.json (with the artifact's SHA-256), the previous run's files that are still valid
    (the user's own files; derived files of the same artifact), then the swap."""
    summary[ARTIFACT_SHA_KEY] = sha
    atomic.write_json(RunFiles(build.path).summary, summary)
    build.carry(lambda entry: _keep_from_previous(entry, sha))
    build.commit()


def _keep_from_previous(entry: Path, sha: str) -> bool:
    """Whether an entry of the run directory being replaced is carried into the new one: never a
    run file (rewritten), a derived file only if it was made from the same artifact, anything
    else (the user's own files) always."""
    if entry.name in RUN_FILES:
        return False
    run = RunFiles(entry.parent)
    if entry.name == run.onnx_dir.name and entry.is_dir():
        return _onnx_is_current(run, sha)
    if entry.name == run.bench.name:
        return recorded_artifact_sha(entry) == sha
    if entry.name == run.report_dir.name and (entry / "report.json").is_file():
        return _report_sha(entry / "report.json") == sha
    return True


def _report_sha(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["provenance"]["evaluation"][ARTIFACT_SHA_KEY]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _onnx_is_current(files: RunFiles, sha: str) -> bool:
    """Whether onnx/ was exported from the artifact with SHA-256 `sha` and its files are the ones
    its export_report.json records."""
    report = files.onnx_dir / REPORT_FILE
    if recorded_artifact_sha(report) != sha:
        return False
    try:
        recorded = json.loads(report.read_text(encoding="utf-8")).get("files_sha256") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    if ONNX_FILE not in recorded:
        return False
    for name, digest in recorded.items():
        path = files.onnx_dir / str(name)
        if path.is_symlink() or not path.is_file() or atomic.file_sha256(path) != digest:
            return False
    return True


def onload_run(
    model_dir: str | Path, recipe: Recipe, calib: Any, out_dir: str | Path, *, progress: bool = True, memory_check: bool = True
) -> dict[str, Any]:
    """Quantize the Hugging Face model in `model_dir` with layer onloading (its weights stay on
    disk; `ptqkit.engine.onloading`) and write the run directory (one transaction); returns the summary."""
    from ptqkit.core.progress import peak_rss_bytes
    from ptqkit.engine.onloading import quantize_onloaded

    with _building(out_dir) as build:
        tmp = RunFiles(build.path)
        start = time.perf_counter()
        sha = write_artifact_files(quantize_onloaded(model_dir, recipe, calib, progress=progress, memory_check=memory_check), tmp.root)
        seconds = time.perf_counter() - start
        manifest = read_manifest(tmp.root)
        recipe.save(tmp.recipe)
        atomic.write_json(tmp.source, source_with_hashes({"kind": "hf", "path": str(Path(model_dir).resolve())}))
        _save_example(tmp.example, next(iter(calib.batches())))
        summary: dict[str, Any] = {
            "recipe": recipe.name,
            "onload": True,
            "quantize_seconds": round(seconds, 3),
            "quantized_layers": len(manifest.layers),
            "skipped_modules": len(manifest.skipped),
            "calibration_samples": len(calib),
            "calibration_ranks": 1,
            "artifact_bytes": (tmp.root / MODEL_FILE).stat().st_size,
            "peak_rss_bytes": peak_rss_bytes(),
            "output_sqnr_db": None,  # the float and quantized models are never both in memory
        }
        _finish(build, summary, sha)
    return summary


def _read_source(files: RunFiles) -> dict[str, Any]:
    if not files.source.is_file():
        raise ArtifactError(f"{files.source} is missing: this run directory was not written by `ptqkit quantize`")
    try:
        source = json.loads(files.source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{files.source}: not valid JSON ({str(exc)[:200]}); the run directory is corrupted") from None
    except RecursionError:
        raise ArtifactError(f"{files.source}: not valid JSON (nested too deeply); the run directory is corrupted") from None
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind not in ("hf", "factory") or not isinstance(source.get("path" if kind == "hf" else "factory"), str):
        raise ArtifactError(
            f"{files.source}: expected {{\"kind\": \"hf\", \"path\": ...}} or {{\"kind\": \"factory\", \"factory\": ...}}; "
            "the run directory is corrupted"
        )
    return source


def _float_model(files: RunFiles, recipe: Recipe, model: nn.Module | str | None, trust_factory: bool) -> LoadedModel:
    source = _read_source(files)
    if source["kind"] == "hf" or not isinstance(model, nn.Module):  # weights read from disk: the ones quantized against
        verify_source(source, files.source)
    if source["kind"] == "hf":
        return load_model(source["path"])
    if isinstance(model, nn.Module):  # the user's own float model: nothing from the run directory runs
        loaded = LoadedModel(copy.deepcopy(model).eval(), None, source)
    else:
        spec = model if isinstance(model, str) else source["factory"]
        if model is None and not trust_factory:
            raise UntrustedCodeError(
                f"{files.source} names the model factory {spec!r}: a run directory does not run code unless you allow it. "
                f"If you trust {spec!r}, pass --trust-factory (CLI), or trust_factory=True or model=... (Python)"
            )
        loaded = load_model(spec, source.get("weights"))
    from ptqkit.algorithms.pipeline import apply_pre_transforms, split_algorithms

    apply_pre_transforms(loaded.model, split_algorithms(recipe.algorithms).pre_transforms)  # the artifact's module structure
    return loaded


def open_run(
    out_dir: str | Path, *, model: nn.Module | str | None = None, trust_factory: bool = False
) -> tuple[LoadedModel, nn.Module, Any]:
    """(the float model, the quantized model, the example inputs) of a run directory. For a
    factory model the float model has the recipe's pre-transforms applied (same function).

    A run from a factory calls code: only with `trust_factory=True` (call the factory that
    source.json names) or `model=` (a "package.module:function" you name, or the float
    nn.Module itself, copied); otherwise UntrustedCodeError. A Hugging Face run runs no code.
    Float weights read from disk must have the SHA-256 recorded at quantization (ArtifactError
    otherwise)."""
    files = RunFiles(Path(out_dir))
    manifest = read_manifest(files.root)
    recipe = Recipe.from_dict(manifest.recipe)
    loaded = _float_model(files, recipe, model, trust_factory)
    qmodel = load_artifact(files.root, copy.deepcopy(loaded.model))
    return loaded, qmodel, _load_example(files.example)


def _export_into(files: RunFiles, qmodel: nn.Module, example: Any, sha: str, shown: RunFiles, **options: Any) -> dict[str, Any]:
    """Export `qmodel` into files.onnx_dir (recording the artifact's SHA-256); the summary names
    the files under `shown` (the run's final place)."""
    result = export(qmodel, files.onnx_dir, ("onnx",), example_inputs=example, artifact_sha256=sha, **options)
    integer = sum(layer.integer for layer in result.layers)
    return {
        "file": str(shown.onnx_dir / ONNX_FILE), "integer_layers": integer, "float_layers": list(result.float_layers),
        "kernels": dict(Counter(layer.kernel or "none" for layer in result.layers)), "checks": result.checks,
    }


def export_run(
    out_dir: str | Path, *, qmodel: nn.Module | None = None, strict: bool = False, keep_float: bool = False,
    trust_factory: bool = False, model: nn.Module | str | None = None,
) -> dict[str, Any]:
    """Export a run directory's quantized model to ONNX: onnx/model.onnx + onnx/export_report.json
    (+ onnx/model.fp32.onnx with `keep_float`); the onnx/ folder is replaced as a whole, atomically,
    under the run's lock. `trust_factory`/`model`: as in `open_run`."""
    files = RunFiles(Path(out_dir))  # the run itself may be the working directory: only onnx/, bench.json change
    with atomic.exclusive_lock(files.root):
        if qmodel is None:
            _, qmodel, example = open_run(files.root, model=model, trust_factory=trust_factory)
        else:
            example = _load_example(files.example)
        sha = run_artifact_sha(files.root)
        return _export_into(files, qmodel, example, sha, files, strict=strict, keep_float=keep_float)


def bench_run(
    out_dir: str | Path, *, runtime: str = "auto", threads: int | None = None, warmup: int = 3, reps: int = 20,
    trust_factory: bool = False, model: nn.Module | str | None = None,
) -> Any:
    """Float vs quantized speed of a run directory on its example batch (`eval.bench`): "auto" (the
    deployable form: `eval.bench.deployable_runtime`), ONNX Runtime (exported again with the float
    graph kept when onnx/model.fp32.onnx is missing or onnx/ was not exported from this artifact),
    torch (the float model against the packed quantized one) or the eager simulation ("simulated",
    labelled as such). `trust_factory`/`model`: as in `open_run`."""
    from ptqkit.eval.bench import RUNTIMES, bench, bench_onnx, deployable_runtime

    files = RunFiles(Path(out_dir))
    if runtime not in RUNTIMES:
        raise ConfigError(f"bench: runtime {runtime!r} is unknown; valid: {', '.join(RUNTIMES)}")
    loaded, qmodel, example = open_run(files.root, model=model, trust_factory=trust_factory)
    runtime = deployable_runtime(qmodel) if runtime == "auto" else runtime
    if runtime != "onnxruntime":
        return bench(loaded.model, qmodel, example, runtime=runtime, threads=threads, warmup=warmup, reps=reps)
    sha = run_artifact_sha(files.root)
    float_onnx, report = files.onnx_dir / FLOAT_ONNX_FILE, files.onnx_dir / REPORT_FILE
    if not float_onnx.is_file() or not _onnx_is_current(files, sha):  # never time a graph of another artifact
        export_run(files.root, qmodel=qmodel, keep_float=True)
    kernels = Counter(layer["kernel"] or "none" for layer in json.loads(report.read_text(encoding="utf-8"))["layers"])
    return bench_onnx(float_onnx, files.onnx_dir / ONNX_FILE, example, threads=threads or 1, warmup=warmup, reps=reps, kernels=dict(kernels))


def write_bench(out_dir: str | Path, data: dict[str, Any]) -> Path:
    """Write a `bench_run` result as the run's bench.json (atomically, under the run's lock),
    recording the SHA-256 of the artifact it timed."""
    files = RunFiles(Path(out_dir))  # the run itself may be the working directory: only onnx/, bench.json change
    with atomic.exclusive_lock(files.root):
        record = {**data, ARTIFACT_SHA_KEY: run_artifact_sha(files.root)}
        return atomic.write_json(files.bench, record)


def current_bench(out_dir: str | Path) -> dict[str, Any] | None:
    """The run's bench.json if it timed the current artifact; None (with a warning) if it is
    missing, unreadable or stale: a stale speed is never reported."""
    files = RunFiles(Path(out_dir))
    if not files.bench.is_file():
        return None
    sha = run_artifact_sha(files.root)
    if files.bench.is_symlink() or recorded_artifact_sha(files.bench) != sha:
        logger.warning("%s was not measured on this run's model.safetensors (stale or foreign); not reported: run `ptqkit bench` again", files.bench)
        return None
    data = json.loads(files.bench.read_text(encoding="utf-8"))
    speedup = data.get("speedup")
    if speedup is not None and (isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 0 < speedup < math.inf):
        logger.warning("%s holds speedup %r, not a positive number; not reported: run `ptqkit bench` again", files.bench, speedup)
        return None
    data.pop(ARTIFACT_SHA_KEY, None)
    return data


def describe_run(out_dir: str | Path) -> dict[str, Any]:
    """What a run directory or artifact holds, read from its JSON files (no model is loaded)."""
    root = Path(out_dir)
    manifest = read_manifest(root)
    files = RunFiles(root)
    layers = manifest.layers
    kinds = Counter(f"{layer.plan_type} {(layer.weights or {}).get('qtype', 'float')}" for layer in layers)
    return {
        "artifact": str(root),
        "recipe": manifest.recipe.get("name"),
        "model_class": manifest.model.class_name,
        "quantized_layers": len(layers),
        "layers_by_kind": dict(kinds),
        "skipped_modules": len(manifest.skipped),
        "calibration": manifest.calibration,
        "versions": manifest.versions,
        "metrics": manifest.metrics,
        "files": sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
        "source": _read_source(files) if files.source.is_file() else None,
        "stale": _stale_entries(files, manifest.model_sha256),
    }


def _stale_entries(files: RunFiles, sha: str) -> list[str]:
    """Derived entries of a run that were not made from its current artifact (never used)."""
    stale = [
        entry.name for entry in (files.onnx_dir, files.bench, files.report_dir)
        if os.path.lexists(entry) and not _keep_from_previous(entry, sha)
    ]
    recorded = recorded_artifact_sha(files.summary) if files.summary.is_file() else None
    if recorded is not None and recorded != sha:  # e.g. pq.save into a run directory
        stale.append(files.summary.name)
    return sorted(stale)


def run_artifact_sha(out_dir: str | Path) -> str:
    """The SHA-256 of a run's model.safetensors, as its quantization.json records it (load_artifact
    checks the file against it)."""
    return read_manifest(Path(out_dir)).model_sha256
