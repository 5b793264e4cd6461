"""Quantize a Hugging Face model whose weights do not fit in memory: layer onloading.

`quantize_onloaded(model_dir, recipe, calib, out_dir)` runs the block-by-block engine
(`algorithms.blockwise`: SmoothQuant, AWQ, GPTQ or round-to-nearest) with the weights left on
disk:

1. the model is built as a skeleton whose parameters live on the `meta` device (no memory;
   buffers such as rotary frequencies are real);
2. the weights outside the repeated blocks (embeddings, final norm, output head) are read from
   the safetensors file(s) (plain reads, no memory map: see `WeightStore`);
3. each block is materialised from disk just before the engine runs it, its targeted Linears
   are quantized, and right after its outputs are computed they are replaced by quantized
   modules that hold integer codes only: the block's float weights are released;
4. the artifact is written (`pq.save`'s format, loadable with `pq.load(out_dir, model_dir)`).

Peak memory is the outside weights + one float block + the integer codes so far + the
calibration activations, not the float model (`ptqkit.memory_plan` predicts it). Static input
activations need observers over the whole forward pass and are refused; weight-only and
dynamic-activation recipes run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ptqkit.errors import ArtifactError, ConfigError, UnsupportedModelError
from ptqkit.recipe import Recipe

__all__ = ["WeightStore", "build_skeleton", "quantize_onloaded", "tokens_per_sample"]

logger = logging.getLogger(__name__)


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


def _tensors_of(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """(qualified name, owner, attribute, is parameter) of each parameter and persistent buffer."""
    for owner_name, owner in module.named_modules():
        for attr, param in owner._parameters.items():
            if param is not None:
                yield (f"{owner_name}.{attr}" if owner_name else attr), owner, attr, True
        for attr in owner._buffers:
            if attr not in owner._non_persistent_buffers_set and owner._buffers[attr] is not None:
                yield (f"{owner_name}.{attr}" if owner_name else attr), owner, attr, False


def _tensor(owner: nn.Module, attr: str, is_param: bool) -> torch.Tensor:
    return owner._parameters[attr] if is_param else owner._buffers[attr]


def materialize_(module: nn.Module, prefix: str, store: WeightStore, *, skip: str | None = None) -> int:
    """Read every meta parameter/buffer of `module` (named `prefix.…` in the model) from
    `store`, except those under the submodule named `skip`; returns the bytes read. Shapes are
    checked against the skeleton."""
    loaded = 0
    for name, owner, attr, is_param in list(_tensors_of(module)):
        if skip is not None and name.startswith(skip + "."):
            continue
        current = _tensor(owner, attr, is_param)
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


class _BlockOnloader:
    """The engine's block hooks: read a block before it runs, swap in its quantized layers and
    drop its float weights once its outputs are computed."""

    def __init__(self, model: nn.Module, the_plan: Any, stages: Any, store: WeightStore) -> None:
        self.model, self.store, self.stages = model, store, stages
        self.layers = {layer.name: layer for layer in the_plan.layers}
        self.bytes_read = 0
        self.converted: set[str] = set()

    def load(self, prefix: str, block: nn.Module) -> None:
        self.bytes_read += materialize_(block, prefix, self.store)

    def release(self, prefix: str, block: nn.Module, results: dict[str, Any]) -> None:
        from ptqkit.quantize import convert_layer
        from ptqkit.targets import replace_module

        for name, result in results.items():
            module = self.model.get_submodule(name)
            quantized = convert_layer(module, self.layers[name], None, self.stages, result)
            quantized.drop_float_weight_()
            replace_module(self.model, name, quantized)
            self.converted.add(name)


def quantize_onloaded(
    model_dir: str | Path, recipe: Recipe, calib: Any, out_dir: str | Path, *, progress: bool = True, memory_check: bool = True
) -> Path:
    """Quantize the Hugging Face causal LM in `model_dir` block by block with its weights on
    disk, and write the artifact to `out_dir` (see the module docstring). `calib` is a
    CalibrationData (required: the block engine runs on it). The memory plan is checked first
    unless `memory_check` is False."""
    from ptqkit.algorithms.blockwise import quantize_blocks_
    from ptqkit.algorithms.pipeline import split_algorithms
    from ptqkit.calibration.data import CalibrationData
    from ptqkit.export.artifact import save_artifact
    from ptqkit.memory_plan import check_memory, plan_memory
    from ptqkit.quantize import QuantizationInfo, convert_layer
    from ptqkit.targets import replace_module, resolve_plan

    stages = split_algorithms(recipe.algorithms)
    _check_recipe(recipe, stages)
    if not isinstance(calib, CalibrationData) or len(calib) == 0:
        raise ConfigError("quantize_onloaded: calib must be a non-empty CalibrationData (the block engine runs on it)")
    store = WeightStore(model_dir)
    model = build_skeleton(model_dir)
    the_plan = resolve_plan(model, recipe)  # refusals first: nothing is read before them
    static = [layer.name for layer in the_plan.layers if layer.inputs is not None and not layer.inputs.dynamic]
    if static:
        raise ConfigError(
            f"recipe {recipe.name!r} quantizes the inputs of {len(static)} layer(s) statically (e.g. {static[0]!r}); "
            "onloading runs weight-only and dynamic-activation recipes (w4a16, w8a16, w8a8_dynamic)"
        )
    samples = min(len(calib), recipe.calibration.samples)
    if memory_check:
        check_memory(plan_memory(
            model, recipe, samples=samples, seq_len=tokens_per_sample(calib), batch_size=recipe.calibration.batch_size, onload=True,
        ))
    outside = _materialize_outside(model, store)
    onloader = _BlockOnloader(model, the_plan, stages, store)
    targets = {layer.name: (layer.module_type, layer.weights) for layer in the_plan.layers if layer.weights is not None}
    quantize_blocks_(
        model, targets, stages, calib.batches(recipe.calibration.batch_size), max_samples=samples, progress=progress,
        onload=onloader,
    )
    for layer in the_plan.layers:  # layers outside the blocks: the data-free quantizer, as pq.quantize does
        if layer.name not in onloader.converted:
            replace_module(model, layer.name, convert_layer(model.get_submodule(layer.name), layer, None, stages))
    model.ptqkit_info = QuantizationInfo(
        recipe=recipe, plan=the_plan, calibration={"description": calib.description, "fingerprint": calib.fingerprint}
    )
    logger.info("onloading read %.1f MB outside the blocks and %.1f MB of blocks", outside / 1e6, onloader.bytes_read / 1e6)
    return save_artifact(model, out_dir)


def _check_recipe(recipe: Recipe, stages: Any) -> None:
    if stages.layerwise or stages.pre_transforms or stages.analytic_correction is not None:
        raise ConfigError(
            f"recipe {recipe.name!r}: onloading runs the block-by-block engine (smoothquant, awq, gptq, rtn) on "
            "transformer blocks; bn_fold/cle/adaround/bias_correction are for models that fit in memory"
        )


def _materialize_outside(model: nn.Module, store: WeightStore) -> int:
    """Read every weight outside the repeated blocks, then re-tie tied embeddings."""
    from ptqkit.mappings import require_block_list

    list_name, _ = require_block_list(model, "onloading materialises one block at a time")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in store and hasattr(model, "lm_head"):
        model.lm_head.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # re-tied below
    loaded = materialize_(model, "", store, skip=list_name)
    if tied:
        model.tie_weights()
    meta = [
        name for name, owner, attr, is_param in _tensors_of(model)
        if not name.startswith(list_name + ".") and _tensor(owner, attr, is_param).device.type == "meta"
    ]
    if meta:
        raise ArtifactError(f"{store.root}: no weights for {meta}")
    return loaded
