"""Where the command line's models, calibration data and recipe overrides come from.

Models (`load_model`):
- a local Hugging Face directory (config.json + weights; `models.hf.load_hf_model`, nothing is
  downloaded), which also gives the tokenizer for text calibration;
- a Python factory "package.module:function" returning an nn.Module, with `weights` a state dict
  file: .safetensors, or .pt/.pth read by `torch.load(weights_only=True)` (no pickled code runs).

Calibration data (`load_calibration`), by what the path is:
- a directory: images (ImageNet eval preprocessing: resize the shorter side, centre crop,
  normalize), one class per sub-folder;
- .txt / .jsonl / .ndjson: text, tokenized by the model's tokenizer (`text_field` for JSON lines);
- .safetensors / .pt: one tensor [N, ...] of model inputs, one sample per row (the first tensor
  of a .safetensors file, or the one named `tensor_name`).

Recipe overrides (`apply_settings`): "key.path=value" with a YAML value, applied to the recipe's
dict form before validation, so they pass the same checks as a recipe file.
"""
from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.core.atomic import file_sha256
from ptqkit.core.errors import (
    ArtifactError,
    CalibrationDataError,
    ConfigError,
    UnsupportedModelError,
)

__all__ = [
    "LoadedModel", "apply_settings", "load_calibration", "load_model", "read_tensor_file", "source_with_hashes", "verify_source",
]

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".ndjson")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class LoadedModel:
    """A float model in eval mode, its tokenizer (Hugging Face models) and how it was loaded
    (`source`, JSON-able: saved beside the artifact so that later commands rebuild the skeleton)."""

    model: nn.Module
    tokenizer: Any = None
    source: dict[str, Any] = field(default_factory=dict)


def _factory(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"model {spec!r}: expected a directory or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnsupportedModelError(f"model {spec!r}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a SyntaxError, or the module's own code raising on import
        raise UnsupportedModelError(f"model {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    target = getattr(module, attribute, None)
    if not callable(target):
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        close = difflib.get_close_matches(attribute, public, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnsupportedModelError(f"model {spec!r}: {module_name} has no callable {attribute!r}{hint}")
    return target


def read_tensor_file(path: Path, tensor_name: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pt/.pth file (weights_only: plain tensors and containers)."""
    if not path.is_file():
        raise CalibrationDataError(f"{path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            tensors = {"": loaded} if isinstance(loaded, torch.Tensor) else loaded
    except Exception as exc:  # safetensors and torch.load raise many types for a bad file
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch.save file of tensors"
        raise CalibrationDataError(
            f"{path}: cannot read tensors: the file is not {kind}, or is truncated or corrupted ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CalibrationDataError(f"{path}: expected a tensor or a dict of name -> tensor, got {type(tensors).__name__}")
    if tensor_name is not None:
        if tensor_name not in tensors:
            raise CalibrationDataError(f"{path}: no tensor {tensor_name!r}; tensors: {sorted(tensors)}")
        return {tensor_name: tensors[tensor_name]}
    return tensors


def load_model(spec: str, weights: str | Path | None = None) -> LoadedModel:
    """The float model named by `spec`: a local HF directory, or "package.module:function"
    (called without arguments) with a state dict file `weights` (loaded strictly)."""
    path = Path(spec).expanduser()
    if path.is_dir() or (":" not in spec):
        if weights is not None:
            raise ConfigError("--weights applies to a 'package.module:function' model, not to a Hugging Face directory")
        from ptqkit.models.hf import load_hf_model

        model, tokenizer = load_hf_model(path)
        return LoadedModel(model, tokenizer, {"kind": "hf", "path": str(path.resolve())})
    factory = _factory(spec)
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory: name it and what it raised
        raise UnsupportedModelError(
            f"model {spec!r}: calling it without arguments raised {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    source: dict[str, Any] = {"kind": "factory", "factory": spec, "weights": None}
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if weights_path.suffix not in TENSOR_SUFFIXES:
            raise ConfigError(f"--weights {str(weights_path)!r}: expected a {', '.join(TENSOR_SUFFIXES)} state dict")
        try:
            state = read_tensor_file(weights_path)
        except CalibrationDataError as exc:
            raise UnsupportedModelError(f"--weights: {exc}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UnsupportedModelError(f"--weights {weights_path} does not fit {spec}: {exc}") from None
        source["weights"] = str(weights_path.resolve())
    return LoadedModel(model.eval(), None, source)


def _hf_weight_files(directory: Path) -> list[Path]:
    """The files of a Hugging Face directory that hold the model: config and weights."""
    names = ("config.json", "model.safetensors.index.json")
    return sorted(p for p in directory.iterdir() if p.name in names or p.suffix == ".safetensors")


def source_with_hashes(source: dict[str, Any]) -> dict[str, Any]:
    """`source` (LoadedModel.source) with the SHA-256 of the float weights it names: the weights
    file of a factory ("weights_sha256"), the config and weight files of a Hugging Face
    directory ("files_sha256"). Written to a run's source.json; `verify_source` checks them."""
    source = dict(source)
    if source.get("kind") == "factory" and source.get("weights") and "weights_sha256" not in source:
        source["weights_sha256"] = file_sha256(source["weights"])
    if source.get("kind") == "hf" and "files_sha256" not in source and Path(source["path"]).is_dir():
        source["files_sha256"] = {p.name: file_sha256(p) for p in _hf_weight_files(Path(source["path"]))}
    return source


def _check_hash(path: Path, expected: Any, where: Path) -> None:
    if not path.is_file():
        raise ArtifactError(f"{where}: the float weights {path} are missing (expected SHA-256 {expected})")
    found = file_sha256(path)
    if found != expected:
        raise ArtifactError(
            f"{where}: the float weights {path} changed since the run was quantized: expected SHA-256 {expected}, "
            f"found {found}; restore that file or quantize again"
        )


def verify_source(source: dict[str, Any], where: Path) -> None:
    """ArtifactError naming the file, the expected and the found SHA-256 if the float weights a
    run's source.json names are not those it was quantized against (see `source_with_hashes`)."""
    if source.get("kind") == "factory" and source.get("weights"):
        if "weights_sha256" not in source:
            logger.warning("%s records no SHA-256 of %s (an older ptqkit): the weights are not verified", where, source["weights"])
            return
        _check_hash(Path(source["weights"]), source["weights_sha256"], where)
    elif source.get("kind") == "hf":
        recorded = source.get("files_sha256")
        if not isinstance(recorded, dict):
            logger.warning("%s records no SHA-256 of the model files (an older ptqkit): they are not verified", where)
            return
        directory = Path(source["path"])
        extra = sorted(p.name for p in _hf_weight_files(directory) if p.name not in recorded) if directory.is_dir() else []
        if extra:
            raise ArtifactError(f"{where}: {directory} holds model files the run was not quantized with: {extra}")
        for name, expected in recorded.items():
            _check_hash(directory / Path(str(name)).name, expected, where)


def _image_transform(size: int) -> Any:
    from ptqkit.models.mobilenet_v2 import imagenet_preprocess

    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"image_size={size!r}: the centre-crop size must be a positive integer")
    resize = round(size * 256 / 224)

    def transform(image: Any) -> torch.Tensor:
        import numpy as np

        return imagenet_preprocess(np.asarray(image), resize=resize, crop=size)[0]  # [3, size, size]

    return transform


def load_calibration(
    path: str | Path,
    *,
    tokenizer: Any = None,
    samples: int,
    batch_size: int,
    seed: int = 0,
    text_field: str = "text",
    max_length: int = 128,
    image_size: int = 224,
    tensor_name: str | None = None,
) -> Any:
    """CalibrationData from `path` (see the module docstring for the formats)."""
    from ptqkit.calibration.data import CalibrationData

    path = Path(path).expanduser()
    if path.is_dir():
        return CalibrationData.from_image_folder(path, _image_transform(image_size), limit=samples, seed=seed, batch_size=batch_size)
    if not path.exists():
        raise CalibrationDataError(f"calibration data {str(path)!r} does not exist")
    if path.suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise ConfigError(f"calibration text {path} needs a tokenizer: use a Hugging Face model directory")
        return CalibrationData.from_text(
            path, tokenizer, max_length=max_length, limit=samples, seed=seed, batch_size=batch_size, text_key=text_field
        )
    if path.suffix in TENSOR_SUFFIXES:
        tensors = read_tensor_file(path, tensor_name)
        if len(tensors) != 1:
            raise CalibrationDataError(f"{path} holds {len(tensors)} tensors {sorted(tensors)}; name one with --tensor-name")
        (tensor,) = tensors.values()
        return CalibrationData.from_tensors(tensor, limit=samples, seed=seed, batch_size=batch_size)
    valid = ", ".join(("a directory of images", *TEXT_SUFFIXES, *TENSOR_SUFFIXES))
    raise CalibrationDataError(f"calibration data {str(path)!r}: unknown format {path.suffix!r}; valid: {valid}")


def _parse_setting(setting: str) -> tuple[list[str], Any]:
    key, sep, text = setting.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {setting!r}: expected key.path=value, e.g. scheme.weights.granularity.size=64")
    from ptqkit.engine.recipe import safe_yaml_load

    value = safe_yaml_load(text, f"--set {setting!r}: the value") if text.strip() else None  # no aliases
    return key.strip().split("."), value


def _step(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {where}: {part!r} is not an index of this list of {len(node)}")
        return node[int(part)]
    if not isinstance(node, dict) or part not in node:
        valid = sorted(node) if isinstance(node, dict) else []
        close = difflib.get_close_matches(part, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--set {where}: unknown key {part!r}{hint} (valid: {valid})")
    return node[part]


def apply_settings(data: dict[str, Any], settings: Sequence[str]) -> dict[str, Any]:
    """`data` (a recipe's dict form) with each "key.path=value" applied, in order. A spec's
    `group_size=N` is short for granularity {kind: per_group, size: N}."""
    for setting in settings:
        parts, value = _parse_setting(setting)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _step(node, part, ".".join(parts[: i + 1]))
        last = parts[-1]
        if last == "group_size" and isinstance(node, dict) and "granularity" in node:
            last, value = "granularity", {"kind": "per_group", "size": value, "axis": -1}
        _step(node, last, ".".join(parts))  # the key or index must exist: a typo is an error, not a new field
        node[int(last) if isinstance(node, list) else last] = value
    return data
