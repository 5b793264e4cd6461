"""Weights left on disk: a Hugging Face model built on the meta device (`build_skeleton`) and
its tensors read one at a time from safetensors files (`WeightStore`, `materialize_`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ptqkit.core.errors import ArtifactError, UnsupportedModelError

__all__ = ["WeightStore", "build_skeleton", "materialize_", "tensor_of", "tensors_of", "tokens_per_sample"]


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class WeightStore:
    """The tensors of a Hugging Face directory's safetensors file(s) (`model.safetensors`, or
    the shards named by `model.safetensors.index.json`), each read on request with plain file
    reads: nothing is memory-mapped, so pages of tensors already released do not stay resident."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ArtifactError(f"{index}: not a safetensors index (needs a 'weight_map' object): {exc}") from exc
        elif (self.root / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UnsupportedModelError(
                f"{self.root} has no model.safetensors or model.safetensors.index.json: onloading reads safetensors "
                "weights only (convert .bin/.gguf weights with save_pretrained first)"
            )
        self._entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for name in files:
            path = self.root / name
            start, header = _read_header(path)
            self._entries.update({key: (path, start, entry) for key, entry in header.items() if key != "__metadata__"})

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise ArtifactError(f"{self.root}: tensor {name!r} is not in its safetensors file(s)")
        path, start, entry = self._entries[name]
        try:
            dtype, shape, (begin, end) = _DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: tensor {name!r} has an unreadable header entry {entry!r}") from exc
        size = end - begin
        expected = dtype.itemsize * int(torch.Size(shape).numel())
        if size != expected:
            raise ArtifactError(f"{path}: tensor {name!r} holds {size} bytes; {entry['dtype']} {list(shape)} needs {expected}")
        buffer = bytearray(size)
        with path.open("rb") as handle:
            handle.seek(start + begin)
            if handle.readinto(buffer) != size:
                raise ArtifactError(f"{path}: tensor {name!r} is truncated")
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header dict) of a safetensors file."""
    with path.open("rb") as handle:
        length_bytes = handle.read(8)
        if len(length_bytes) != 8:
            raise ArtifactError(f"{path}: too short for a safetensors file")
        length = int.from_bytes(length_bytes, "little")
        if length > 100_000_000:
            raise ArtifactError(f"{path}: safetensors header of {length} bytes is not plausible")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: safetensors header is not an object")
    return 8 + length, header


def build_skeleton(model_dir: str | Path) -> nn.Module:
    """The model of `model_dir` (a causal LM or an encoder, as `load_hf_model` decides) with its
    parameters on the meta device (eager attention, eval mode): nothing is allocated for weights."""
    import transformers
    from accelerate import init_empty_weights

    from ptqkit.models.hf import infer_task

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot read the Hugging Face config of {model_dir}: {exc}") from exc
    if hasattr(config, "quantization_config"):  # a GGUF-converted directory may still name its source format
        delattr(config, "quantization_config")
    causal = infer_task(config.to_dict(), source=str(Path(model_dir) / "config.json")) == "causal_lm"
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # (inside init_empty_weights it leaves the output head untied)
    return model.eval()


def tokens_per_sample(calib: Any) -> int:
    """The longest sample of token-sequence calibration data (its first tensor's last axis)."""
    lengths = []
    for index in range(len(calib)):
        sample = calib[index]
        tensor = next(iter(sample.values())) if isinstance(sample, dict) else sample
        lengths.append(int(tensor.shape[-1]))
    return max(lengths)


def tensors_of(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """(qualified name, owner, attribute, is parameter) of each parameter and persistent buffer."""
    for owner_name, owner in module.named_modules():
        for attr, param in owner._parameters.items():
            if param is not None:
                yield (f"{owner_name}.{attr}" if owner_name else attr), owner, attr, True
        for attr in owner._buffers:
            if attr not in owner._non_persistent_buffers_set and owner._buffers[attr] is not None:
                yield (f"{owner_name}.{attr}" if owner_name else attr), owner, attr, False


def tensor_of(owner: nn.Module, attr: str, is_param: bool) -> torch.Tensor:
    return owner._parameters[attr] if is_param else owner._buffers[attr]


def materialize_(module: nn.Module, prefix: str, store: WeightStore, *, skip: str | None = None) -> int:
    """Read every meta parameter/buffer of `module` (named `prefix.…` in the model) from
    `store`, except those under the submodule named `skip`; returns the bytes read. Shapes are
    checked against the skeleton."""
    loaded = 0
    for name, owner, attr, is_param in list(tensors_of(module)):
        if skip is not None and name.startswith(skip + "."):
            continue
        current = tensor_of(owner, attr, is_param)
        if current.device.type != "meta":
            continue
        full = f"{prefix}.{name}" if prefix else name
        tensor = store.tensor(full)
        if tuple(tensor.shape) != tuple(current.shape):
            raise ArtifactError(f"{store.root}: tensor {full!r} has shape {tuple(tensor.shape)}; the model's config expects {tuple(current.shape)}")
        tensor = tensor.to(current.dtype)
        if is_param:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor
        loaded += tensor.numel() * tensor.element_size()
    return loaded
