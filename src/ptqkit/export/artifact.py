"""Save a quantized model as a ptqkit artifact: safetensors + JSON, written atomically.

An artifact is a directory holding

- `model.safetensors`: every tensor of the model's state dict. Integer weight codes are stored at
  their width: 8-bit codes as int8/uint8 (`<layer>.weight_codes`), 4-/2-bit codes packed along
  the last axis with `ptqkit.core.primitives.pack_lowbit` (`<layer>.weight_packed`, uint8, low bits
  first), fp8 codes as float8. Scales and zero points are tensors; everything else keeps its float
  dtype. Tensors that share storage (tied embeddings) are stored once and listed as aliases.
- `quantization.json`: format version, the recipe, the plan (per-layer weight/input specs),
  activation QParams (also stored as tensors; the loader checks that both agree), the calibration
  description + fingerprint, ptqkit/torch/safetensors versions, optional metrics, and the SHA-256
  of `model.safetensors`.
- `config.json` (Hugging Face models only): the model's config with a `quantization_config` laid out
  as compressed-tensors does (`config_groups` of `weights`/`input_activations` QuantizationArgs,
  `ignore`, `format`, `quantization_status`). Its `quant_method` is "ptqkit", not
  "compressed-tensors", because the tensor layout differs (codes as int8, not int32-packed).

Writes go to a temporary directory next to `out_dir`, which is swapped into place at the end
(`ptqkit.core.atomic`), so a process killed while saving leaves the previous artifact or none, never
a half-written one; `out_dir` is locked while it is written. Files in an existing `out_dir` that
are not part of the artifact (e.g. an ONNX export) are carried over, except an ONNX export whose
export_report.json records another artifact's SHA-256 (stale). A non-empty directory that holds
no ptqkit artifact or export is refused (OutputPathError), never rebuilt.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ptqkit.core import atomic
from ptqkit.core.atomic import file_sha256
from ptqkit.core.errors import ArtifactError
from ptqkit.core.primitives import pack_lowbit
from ptqkit.core.spec import QuantSpec
from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE, REPORT_FILE
from ptqkit.core.json_fields import to_json
from ptqkit.export.manifest import FORMAT_NAME, FORMAT_VERSION, LayerEntry, Manifest, ModelEntry
from ptqkit.export.records import codes_storage, describe_module, describe_outputs, record_of

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "QUANT_FILE",
    "CONFIG_FILE",
    "ARTIFACT_FILES",
    "save_artifact",
    "write_artifact_files",
    "written_by_ptqkit",
    "file_sha256",
    "codes_storage",
    "compressed_tensors_config",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
QUANT_FILE = "quantization.json"
CONFIG_FILE = "config.json"
ARTIFACT_FILES = (MODEL_FILE, QUANT_FILE, CONFIG_FILE)
def _collect(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[LayerEntry]]:
    """(tensors to write, aliases name -> stored name, per-layer records) of a quantized model."""
    info = qmodel.ptqkit_info
    layers = {layer.name: layer for layer in info.plan.layers}
    records = []
    packed_codes: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        try:
            module = qmodel.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"save_artifact: planned layer {name!r} is missing from the model") from None
        if record_of(module) is None:
            raise ArtifactError(
                f"save_artifact: layer {name!r} is a {type(module).__name__}, not a ptqkit quantized module; "
                "save the model returned by ptqkit.engine.quantize (packed models from ptqkit.export.pack cannot be saved: "
                "save before packing, pack after loading)"
            )
        record = describe_module(name, module, layer)
        records.append(record)
        if record.extra.get("codes_storage") == "packed":
            # [..., K] codes -> [..., ceil(K * bits / 8)] bytes along the last axis
            packed_codes[f"{name}.weight_codes"] = pack_lowbit(module.weight_codes, module.weight_spec.qtype.bits)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in qmodel.state_dict().items():
        if key in packed_codes:
            tensors[key.removesuffix("weight_codes") + "weight_packed"] = packed_codes[key].contiguous()
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().clone().contiguous()  # own storage: safetensors refuses shared views
    return tensors, aliases, records


def _versions() -> dict[str, str]:
    import safetensors

    from ptqkit.core.version import __version__

    return {"ptqkit": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def _strategy(spec: QuantSpec) -> dict[str, Any]:
    g = spec.granularity
    strategy = {"per_tensor": "tensor", "per_channel": "channel", "per_group": "group", "per_token": "token"}[g.kind]
    return {
        "num_bits": spec.qtype.bits,
        "type": "int" if spec.qtype.is_integer else "float",
        "ptqkit_qtype": spec.qtype.name,
        "symmetric": spec.symmetric,
        "strategy": strategy,
        "group_size": getattr(g, "size", None),
        "dynamic": spec.dynamic,
        "observer": spec.observer,
        "actorder": None,
    }


def compressed_tensors_config(records: Sequence[LayerEntry], skipped: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A `quantization_config` following compressed-tensors' layout (config groups of modules
    sharing one weight/input scheme, targets by module name)."""
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        weights = None if record.weights is None else _strategy(QuantSpec.from_dict(record.weights))
        inputs = None if record.inputs is None else _strategy(QuantSpec.from_dict(record.inputs))
        key = json.dumps([weights, inputs], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": inputs, "output_activations": None})
        group["targets"].append(record.name)
    return {
        "quant_method": "ptqkit",
        "format": f"{FORMAT_NAME}-v{FORMAT_VERSION}",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": [entry[0] for entry in skipped],
        "kv_cache_scheme": None,
    }


def _hf_config(qmodel: nn.Module) -> dict[str, Any] | None:
    config = getattr(qmodel, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        return None
    return config.to_dict()


def _write_json(path: Path, data: Any) -> None:
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


EXPORT_FILES = (ONNX_FILE, FLOAT_ONNX_FILE, REPORT_FILE)
ARTIFACT_SHA_KEY = "artifact_sha256"  # what derived files (ONNX export report, bench.json, ...) record


def written_by_ptqkit(directory: Path) -> bool:
    """Whether `directory` holds a ptqkit artifact or ONNX export (the only non-empty directories
    ptqkit rebuilds)."""
    return any((Path(directory) / name).is_file() for name in (QUANT_FILE, REPORT_FILE))


def recorded_artifact_sha(report: Path) -> str | None:
    """The artifact SHA-256 a derived JSON file records, or None (absent, unreadable, not recorded)."""
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting too deep for json
        return None
    value = data.get(ARTIFACT_SHA_KEY) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _prepare(qmodel: nn.Module, metrics: Mapping[str, Any] | None) -> tuple[dict[str, torch.Tensor], Manifest, Any]:
    """(tensors, manifest with an empty model_sha256, HF config or None) of `qmodel`."""
    info = getattr(qmodel, "ptqkit_info", None)
    if info is None:
        raise ArtifactError(
            f"save_artifact: {type(qmodel).__name__} has no ptqkit_info; pass the model returned by ptqkit.engine.quantize(...)"
        )
    tensors, aliases, records = _collect(qmodel)
    float_dtypes = {str(p.dtype).removeprefix("torch.") for p in qmodel.parameters() if p.is_floating_point()}
    config = _hf_config(qmodel)
    manifest = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        versions=_versions(),
        model=ModelEntry(
            class_name=type(qmodel).__name__,
            hf=config is not None,
            dtype=sorted(float_dtypes)[0] if len(float_dtypes) == 1 else None,
            attn_implementation=getattr(getattr(qmodel, "config", None), "_attn_implementation", None),
        ),
        recipe=info.recipe.to_dict(),
        calibration=dict(info.calibration),
        layers=tuple(records),
        skipped=tuple(tuple(entry) for entry in info.plan.skipped),
        aliases=aliases,
        metrics=dict(metrics) if metrics is not None else None,
        model_sha256="",
        outputs=describe_outputs(qmodel),
    )
    return tensors, manifest, config


def save_artifact(qmodel: nn.Module, out_dir: str | Path, *, metrics: Mapping[str, Any] | None = None) -> Path:
    """Write `qmodel` (returned by `ptqkit.engine.quantize`) as a ptqkit artifact in `out_dir`.

    The write is atomic (temporary directory + rename); an existing artifact in `out_dir` is
    replaced, other files there are kept. `metrics` (JSON-able) is stored in quantization.json.
    Saving the same quantized model twice gives byte-identical `model.safetensors`.
    Raises ArtifactError if `qmodel` is not a ptqkit-quantized model; OutputPathError if `out_dir`
    is the current directory or a parent, a symbolic link, a non-empty directory holding no ptqkit
    artifact or export, or is being written by another process.
    """
    out_dir = Path(out_dir)
    prepared = _prepare(qmodel, metrics)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"save_artifact: {out_dir} exists and is not a directory; choose another out_dir")
    with atomic.build_directory(out_dir, owned=written_by_ptqkit) as build:
        sha = _write_files(build.path, *prepared)
        stale = _stale_export(out_dir, sha)
        build.carry(lambda entry: entry.name not in ARTIFACT_FILES and entry.name not in stale)
        atomic.fsync_path(build.path)
        _swap_in(build.path, out_dir)
    logger.info("saved ptqkit artifact to %s (%d tensors, %d quantized layers)", out_dir, len(prepared[0]), len(prepared[1].layers))
    return out_dir


def _write_files(directory: Path, tensors: dict[str, torch.Tensor], manifest: Manifest, config: Any) -> str:
    """Write the artifact files into the (new, empty) `directory`; returns model.safetensors' SHA-256."""
    from safetensors.torch import save_file

    model_path = directory / MODEL_FILE
    # One metadata key only: safetensors keeps metadata in a hash map whose order varies per
    # process, so two keys would make the header (and the file) non-deterministic.
    save_file(tensors, str(model_path), metadata={"format": "pt"})
    atomic.fsync_path(model_path)
    sha = file_sha256(model_path)
    _write_json(directory / QUANT_FILE, to_json(replace(manifest, model_sha256=sha)))
    if config is not None:
        config["quantization_config"] = compressed_tensors_config(manifest.layers, manifest.skipped)
        _write_json(directory / CONFIG_FILE, config)
    return sha


def write_artifact_files(qmodel: nn.Module, directory: str | Path, *, metrics: Mapping[str, Any] | None = None) -> str:
    """Write `qmodel`'s artifact files into `directory`, an empty directory the caller builds and
    swaps in itself (a run directory, `ptqkit.workflows.runs`); returns model.safetensors' SHA-256."""
    return _write_files(Path(directory), *_prepare(qmodel, metrics))


def _stale_export(out_dir: Path, sha: str) -> set[str]:
    """The ONNX export files of `out_dir` when its export_report.json was made from another artifact."""
    recorded = recorded_artifact_sha(out_dir / REPORT_FILE) if out_dir.is_dir() else None
    if recorded is None or recorded == sha:
        return set()
    logger.info("dropping the ONNX export in %s: it was made from another artifact (sha256 %s)", out_dir, recorded)
    return set(EXPORT_FILES)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Put the finished artifact `tmp` at `out_dir` in one step (`ptqkit.core.atomic.swap_in`)."""
    atomic.swap_in(tmp, out_dir)
