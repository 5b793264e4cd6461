"""Load a ptqkit artifact (see `ptqkit.export.artifact`) back into quantized modules.

Only safetensors and JSON are read: no pickle anywhere on this path. Everything read is checked
before it is used: the format version, the SHA-256 of `model.safetensors`, every tensor's presence,
dtype and shape against the model skeleton and the recorded specs, code ranges, and the activation
QParams stored both as tensors and in JSON. Any failure raises ArtifactError naming the file and
the tensor or key.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.core.errors import ArtifactError, ConfigError, PTQError
from ptqkit.core.json_fields import read_json
from ptqkit.export.artifact import CONFIG_FILE, MODEL_FILE, QUANT_FILE, file_sha256
from ptqkit.export.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest
from ptqkit.export.records import ArtifactTensors, build_module, build_outputs, built_entries, module_names
from ptqkit.nn.tree import replace_module

__all__ = ["load_artifact", "read_manifest"]

logger = logging.getLogger(__name__)



def _read_json(path: Path, *, missing: str, invalid_suffix: str = "") -> Any:
    """Parsed JSON of `path`; ArtifactError naming the file if it is absent or not valid JSON."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, a number of more than 4300 digits
        raise ArtifactError(f"{path}: not valid JSON ({str(exc)[:200]}){invalid_suffix}") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not valid JSON (nested too deeply){invalid_suffix}") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc})") from None


def read_manifest(out_dir: str | Path) -> Manifest:
    """The parsed and validated `quantization.json` of an artifact (format, version, every key's
    type, the recipe, and each layer's module type against `export.records`)."""
    from ptqkit.engine.recipe import Recipe

    path = Path(out_dir) / QUANT_FILE
    data = _read_json(
        path,
        missing=f"{Path(out_dir)} is not a ptqkit artifact (expected {QUANT_FILE} and {MODEL_FILE})",
        invalid_suffix="; the artifact is corrupted",
    )
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    if "format" in data and data["format"] != FORMAT_NAME:
        raise ArtifactError(f"{path}: format {data['format']!r:.100} is not {FORMAT_NAME!r}")
    if "format_version" in data and data["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {data['format_version']!r:.100} is not supported; this ptqkit reads version {FORMAT_VERSION}"
        )
    try:
        manifest = read_json(Manifest, data, "")
    except ConfigError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    try:
        Recipe.from_dict(manifest.recipe)
    except PTQError as exc:
        raise ArtifactError(f"{path}: recipe is invalid: {exc}") from None
    for i, layer in enumerate(manifest.layers):
        if layer.module not in module_names():
            raise ArtifactError(f"{path}: layers[{i}].module {layer.module!r:.100} is unknown; valid: {list(module_names())}")
    return manifest


def _read_tensors(path: Path, expected_sha: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the artifact is incomplete")
    actual = file_sha256(path)
    if actual != expected_sha:
        raise ArtifactError(
            f"{path}: SHA-256 {actual[:16]}... does not match {expected_sha!s:.16}... recorded in {QUANT_FILE}; "
            "the file is truncated, corrupted or was modified"
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: cannot be read as safetensors ({exc})") from None


def _skeleton_from_config(directory: Path, manifest: Manifest) -> nn.Module:
    """An HF model with random weights built from `directory/config.json` (nothing downloaded)."""
    from ptqkit.models.hf import infer_task

    path = directory / CONFIG_FILE
    config = _read_json(path, missing="pass a model skeleton (an nn.Module) or a Hugging Face model directory")
    if not isinstance(config, dict) or "model_type" not in config:
        raise ArtifactError(f"{path}: not a Hugging Face config (no 'model_type')")
    config.pop("quantization_config", None)
    import transformers

    try:
        hf_config = transformers.AutoConfig.for_model(**config)
        task = infer_task(config, source=str(path))
        auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModel
        dtype = getattr(torch, manifest.model.dtype or "float32")
        hf_config._attn_implementation = manifest.model.attn_implementation or "eager"
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = auto.from_config(hf_config)
        finally:
            torch.set_default_dtype(previous)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: transformers cannot build a model from this config: {exc}") from None
    return model.eval()


def load_artifact(out_dir: str | Path, model_skeleton_or_hf_dir: nn.Module | str | Path | None = None) -> nn.Module:
    """Load a ptqkit artifact into quantized modules.

    `model_skeleton_or_hf_dir`: the float model the artifact was quantized from (any weights; it is
    filled in place and returned), or a local Hugging Face directory whose `config.json` builds it,
    or None to use the artifact's own `config.json`. The result has the same QuantLinear/QuantConv/
    QuantEmbedding modules with bit-identical codes and QParams, and `ptqkit_info` restored.
    """
    from ptqkit.engine.quantize import QuantizationInfo
    from ptqkit.engine.recipe import Recipe
    from ptqkit.engine.targets import LayerPlan, Plan

    if not isinstance(out_dir, (str, os.PathLike)):
        raise ConfigError(f"load: the artifact directory must be a path, got {type(out_dir).__name__} {out_dir!r:.100}")
    if model_skeleton_or_hf_dir is not None and not isinstance(model_skeleton_or_hf_dir, (nn.Module, str, os.PathLike)):
        raise ConfigError(
            f"load: the second argument must be the float model (an nn.Module), a Hugging Face directory or None, "
            f"got {type(model_skeleton_or_hf_dir).__name__} {model_skeleton_or_hf_dir!r:.100}"
        )
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    quant_path = out_dir / QUANT_FILE
    path = out_dir / MODEL_FILE
    tensors = _read_tensors(path, manifest.model_sha256)
    if isinstance(model_skeleton_or_hf_dir, nn.Module):
        model = model_skeleton_or_hf_dir
    else:
        model = _skeleton_from_config(Path(model_skeleton_or_hf_dir or out_dir), manifest)
    try:
        recipe = Recipe.from_dict(manifest.recipe)
    except PTQError as exc:
        raise ArtifactError(f"{quant_path}: recipe is invalid: {exc}") from None
    plans = []
    replacements = {}
    reader = ArtifactTensors(tensors, path, quant_path)
    for layer in manifest.layers:
        name = layer.name
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"{quant_path}: layer {name!r} does not exist in the model skeleton {type(model).__name__}") from None
        try:
            replacements[name] = build_module(module, layer, reader)
            weights = None if layer.weights is None else reader.spec(layer.weights, name, "weights")
            inputs = None if layer.inputs is None else reader.spec(layer.inputs, name, "inputs")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:  # a malformed record
            raise ArtifactError(f"{quant_path}: layers[{name!r}] is malformed: {exc!r}") from None
        plans.append(LayerPlan(name=name, module_type=layer.plan_type, weights=weights, inputs=inputs, reason=layer.reason))
    for name, module in replacements.items():
        replace_module(model, name, module)
    built = {f"{name}.{key}" for name, module in replacements.items() for key in built_entries(module)}
    built |= set(build_outputs(model, manifest.outputs or (), reader))
    _load_rest(model, tensors, manifest.aliases, path, built)
    model.ptqkit_info = QuantizationInfo(
        recipe=recipe,
        plan=Plan(layers=tuple(plans), skipped=manifest.skipped),
        calibration=dict(manifest.calibration or {}),
    )
    logger.info("loaded ptqkit artifact %s (%d quantized layers)", out_dir, len(plans))
    return model.eval()


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, Any], path: Path, built: set[str]) -> None:
    """Fill every remaining state-dict entry of `model` from `tensors`, checking names, dtypes, shapes.
    `built`: entries of the quantized modules, already read and checked."""
    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, current in state.items():
        if key in built:
            loaded[key] = current  # already built from the artifact and checked
            continue
        source = aliases.get(key, key)
        value = tensors.get(source)
        if value is None:
            raise ArtifactError(f"{path}: tensor {source!r} (model entry {key!r}) is missing")
        if value.dtype != current.dtype or value.shape != current.shape:
            raise ArtifactError(
                f"{path}: tensor {source!r} has dtype {value.dtype} shape {tuple(value.shape)}; the model skeleton's "
                f"{key!r} is {current.dtype} {tuple(current.shape)}"
            )
        loaded[key] = value
    used = {aliases.get(key, key) for key in loaded}
    extra = sorted(set(tensors) - used)
    if extra:
        raise ArtifactError(f"{path}: tensor(s) {extra[:5]} are not part of the model skeleton {type(model).__name__}")
    model.load_state_dict(loaded, strict=True)
