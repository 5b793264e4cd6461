"""Export a quantized Hugging Face model as a compressed-tensors checkpoint, laid out as
llm-compressor writes it, so that transformers, vLLM and SGLang load it with no ptqkit code.

The directory holds `model.safetensors`, `config.json` with a `quantization_config`
(`quant_method` "compressed-tensors", `quantization_status` "compressed"), the generation config
and the tokenizer files of the model's source directory (when `config._name_or_path` names one).

Two formats, one per checkpoint:

- `pack-quantized` (weight-only integer weights, 2..8 bits, per tensor / channel / group along
  the input dimension, symmetric or not): per Linear `weight_packed` int32
  [out, ceil(in * bits / 32)] holding code + 2^(bits-1), element i at bit i * bits of its row,
  low bits first; `weight_scale` [out, groups] (per channel [out, 1]); `weight_shape` int64 [2];
  `weight_zero_point` (only when asymmetric) packed the same way along the output dimension.
- `int-quantized` (int8 per-channel weights with dynamic per-token 8-bit inputs, W8A8): int8
  `weight`, `weight_scale` [out, 1]; the inputs are quantized per token at run time.

The layout is the one compressed-tensors 0.20.1 reads (`PackedQuantizationCompressor`,
`NaiveQuantizationCompressor`); its 3/5/6/7-bit packing changed between versions, so that is
the version the tests load with. No compressed-tensors code runs here.

What the format cannot hold is refused with ExportError naming the layer (nothing written):
non-integer codes (fp8, fp4, nf4), per-token weights, groups along another axis, convolutions,
embeddings, GPT-2 `Conv1D`, static or decomposed (smoothed, outlier) input quantizers, and a mix
of weight-only and W8A8 layers in one checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.core import atomic
from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor, PerToken
from ptqkit.core.spec import QuantSpec
from ptqkit.nn.act_quant import InputQuantizer
from ptqkit.nn.modules import QuantLinear

__all__ = [
    "COMPRESSED_TENSORS_VERSION",
    "MODEL_FILE",
    "CONFIG_FILE",
    "SOURCE_FILES",
    "FILES",
    "pack_int32",
    "signed_codes",
    "quantization_config",
    "write_compressed_tensors",
]

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the compressed-tensors release whose loader the tests verify
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# copied from the source Hugging Face directory when it has them
SOURCE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
FILES = (MODEL_FILE, CONFIG_FILE, *SOURCE_FILES)
PACKED, INT = "pack-quantized", "int-quantized"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed `bits`-bit codes [rows, cols] into int32 [rows, ceil(cols * bits / 32)]:
    element i of a row, stored as code + 2^(bits-1), sits at bits [i * bits, (i + 1) * bits)
    of the row's bit string (low bits first; a code may straddle two words)."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    unsigned = codes.to(torch.int64) + (1 << (bits - 1))
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(rows, cols), (unsigned << shift) & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand(rows, cols), unsigned >> (32 - shift))
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same 32 bits, as int32


def signed_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes in the signed range [-2^(bits-1), 2^(bits-1)) compressed-tensors stores (unsigned
    codes and their zero points move down by 2^(bits-1); the dequantized value is unchanged)."""
    offset = 0 if spec.qtype.signed else 1 << (spec.qtype.bits - 1)
    return codes.to(torch.int32) - offset


def _refuse(name: str, what: str) -> ExportError:
    return ExportError(f"export compressed-tensors: layer {name!r} {what}; compressed-tensors cannot hold it (nothing written)")


def _weight_args(name: str, spec: QuantSpec) -> dict[str, Any]:
    """The compressed-tensors QuantizationArgs of a weight spec (refused when it has none)."""
    g = spec.granularity
    if not spec.qtype.is_integer or spec.qtype.bits > 8:
        raise _refuse(name, f"has {spec.qtype.name} weights (valid: integer codes of 2..8 bits)")
    if isinstance(g, PerToken) or (isinstance(g, PerChannel) and g.axis not in (0, -2)):
        raise _refuse(name, f"has {g.kind} weights along axis {getattr(g, 'axis', -1)} (valid: per tensor, per output channel, per group)")
    if isinstance(g, PerGroup) and g.axis not in (1, -1):
        raise _refuse(name, f"has weight groups along axis {g.axis} (valid: groups along the input dimension, axis -1)")
    strategy = {PerTensor: "tensor", PerChannel: "channel", PerGroup: "group"}[type(g)]
    return _args(spec.qtype.bits, spec.symmetric, strategy, getattr(g, "size", None), dynamic=False)


def _args(bits: int, symmetric: bool, strategy: str, group_size: int | None, *, dynamic: bool) -> dict[str, Any]:
    return {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "group_size": group_size,
        "dynamic": dynamic, "actorder": None, "block_structure": None, "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


def _input_args(name: str, module: QuantLinear) -> dict[str, Any] | None:
    """The input QuantizationArgs: None for weight-only layers, dynamic per-token 8-bit otherwise."""
    quantizer = module.input_quantizer
    if quantizer is None:
        return None
    spec = getattr(quantizer, "spec", None)
    if type(quantizer) is not InputQuantizer or spec is None:
        raise _refuse(name, f"has a {type(quantizer).__name__} input quantizer (valid: none, or dynamic per-token int8)")
    if not (spec.dynamic and isinstance(spec.granularity, PerToken) and spec.qtype.is_integer and spec.qtype.bits == 8):
        what = f"{'dynamic' if spec.dynamic else 'static'} {spec.granularity.kind} {spec.qtype.name}"
        raise _refuse(name, f"has {what} input quantization (valid: none, or dynamic per-token 8-bit)")
    if module.weight_spec.qtype.bits != 8 or not isinstance(module.weight_spec.granularity, PerChannel):
        raise _refuse(name, "quantizes its input with weights that are not int8 per channel (valid W8A8: int8 per-channel weights)")
    return _args(8, spec.symmetric, "token", None, dynamic=True)


def _layer_scheme(name: str, module: nn.Module, module_type: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(weights args, input args) of one planned layer, or ExportError if the format cannot hold it."""
    if not isinstance(module, QuantLinear) or module_type != "Linear":
        raise _refuse(name, f"is a {module_type} ({type(module).__name__}); only nn.Linear layers are valid")
    size = getattr(module.weight_spec.granularity, "size", None)
    if size is not None and module.in_features % size:
        raise _refuse(name, f"has {module.in_features} input features, not a multiple of its group size {size} (a short last group)")
    return _weight_args(name, module.weight_spec), _input_args(name, module)


def _schemes(qmodel: nn.Module) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Every planned layer's scheme, checked before anything is written."""
    return {
        layer.name: _layer_scheme(layer.name, qmodel.get_submodule(layer.name), layer.module_type)
        for layer in qmodel.ptqkit_info.plan.layers
    }


def _format(schemes: dict[str, tuple[dict[str, Any], dict[str, Any] | None]]) -> str:
    formats = {name: INT if inputs is not None else PACKED for name, (_, inputs) in schemes.items()}
    if len(set(formats.values())) > 1:
        packed = next(n for n, f in formats.items() if f == PACKED)
        w8a8 = next(n for n, f in formats.items() if f == INT)
        raise ExportError(
            f"export compressed-tensors: layer {packed!r} is weight-only and layer {w8a8!r} is W8A8; one checkpoint "
            "holds one format (valid: all layers weight-only, or all W8A8), nothing written"
        )
    return next(iter(formats.values()), PACKED)


def quantization_config(schemes: dict[str, tuple[dict[str, Any], dict[str, Any] | None]], ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group per distinct (weights, inputs)
    scheme, targeting its layers by name; `ignore` lists the Linear layers kept in float."""
    groups: dict[str, dict[str, Any]] = {}
    for name, (weights, inputs) in schemes.items():
        key = json.dumps([weights, inputs], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": inputs, "output_activations": None})
        group["targets"].append(name)
    return {
        "quant_method": "compressed-tensors",
        "format": _format(schemes),
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def _scale_2d(module: QuantLinear) -> torch.Tensor:
    scale = module.weight_scale.detach()
    return scale.reshape(module.out_features, -1) if scale.ndim else scale.reshape(1)


def _layer_tensors(name: str, module: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors reads for one layer, named `<layer>.<tensor>`."""
    spec = module.weight_spec
    codes = signed_codes(module.weight_codes, spec)
    scale = _scale_2d(module).to(module.weight.dtype)
    if not torch.equal(scale.float(), _scale_2d(module).float()):
        raise _refuse(name, f"has scales that {module.weight.dtype} (the model's dtype) cannot hold exactly")
    out = {f"{name}.weight_scale": scale.contiguous()}
    if fmt == INT:
        out[f"{name}.weight"] = codes.to(torch.int8)
    else:
        out[f"{name}.weight_packed"] = pack_int32(codes, spec.qtype.bits)
        out[f"{name}.weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
    if not spec.symmetric:
        zero_point = signed_codes(module.weight_zero_point.detach(), spec).reshape(scale.shape)
        low, high = -(1 << (spec.qtype.bits - 1)), (1 << (spec.qtype.bits - 1)) - 1
        if int(zero_point.min()) < low or int(zero_point.max()) > high:
            raise _refuse(name, f"has zero points outside the code range [{low}, {high}]")
        packed = pack_int32(zero_point.T, spec.qtype.bits).T if fmt == PACKED and scale.ndim == 2 else zero_point.to(torch.int8)
        out[f"{name}.weight_zero_point"] = packed.contiguous()
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().clone()
    return out


def _float_tensors(qmodel: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the quantized layers (tied output embeddings once)."""
    tied = bool(getattr(getattr(qmodel, "config", None), "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, value in qmodel.state_dict().items():
        if key.rpartition(".")[0] in quantized or any(key.startswith(f"{name}.input_quantizer.") for name in quantized):
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if tied and value.numel() and identity in seen:
            continue  # the tied output embedding: transformers ties it back on load
        seen.add(identity)
        out[key] = value.detach().clone().contiguous()
    return out


def _ignored(qmodel: nn.Module, quantized: set[str]) -> list[str]:
    return [name for name, module in qmodel.named_modules() if isinstance(module, nn.Linear) and name not in quantized]


def _hf_config(qmodel: nn.Module) -> dict[str, Any]:
    config = getattr(qmodel, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        raise ExportError(
            f"export compressed-tensors: {type(qmodel).__name__} is not a Hugging Face model (it has no config with a "
            "model_type); compressed-tensors checkpoints are Hugging Face directories"
        )
    return config.to_dict()


def source_directory(qmodel: nn.Module) -> Path | None:
    """The local Hugging Face directory the model was loaded from (`config._name_or_path`), if any."""
    path = getattr(getattr(qmodel, "config", None), "_name_or_path", "") or ""
    return Path(path) if path and Path(path).is_dir() else None


def copy_source_files(qmodel: nn.Module, directory: Path, names: tuple[str, ...] = SOURCE_FILES) -> list[str]:
    """Copy the tokenizer and generation config files of the source directory; the generation
    config is written from the model when the source has none. Returns the names written."""
    source, written = source_directory(qmodel), []
    for name in names:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
            written.append(name)
    generation = getattr(qmodel, "generation_config", None)
    if "generation_config.json" in names and "generation_config.json" not in written and generation is not None:
        atomic.write_text(directory / "generation_config.json", generation.to_json_string())
        written.append("generation_config.json")
    return written


def write_compressed_tensors(qmodel: nn.Module, directory: str | Path) -> list[str]:
    """Write `qmodel` (from `ptqkit.engine.quantize`) as a compressed-tensors checkpoint into
    the empty directory `directory`; returns the file names written. Everything is checked
    before the first file is written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = _hf_config(qmodel)
    schemes = _schemes(qmodel)
    fmt = _format(schemes)
    quantized = set(schemes)
    tensors = _float_tensors(qmodel, quantized)
    for name in schemes:
        tensors.update(_layer_tensors(name, qmodel.get_submodule(name), fmt))
    config["quantization_config"] = quantization_config(schemes, _ignored(qmodel, quantized))
    save_file(tensors, str(directory / MODEL_FILE), metadata={"format": "pt"})
    atomic.write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    written = [MODEL_FILE, CONFIG_FILE, *copy_source_files(qmodel, directory)]
    logger.info("wrote a compressed-tensors (%s) checkpoint of %d layers to %s", fmt, len(schemes), directory)
    return written
