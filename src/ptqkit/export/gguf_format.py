"""Export a quantized Hugging Face LLaMA-family model as one GGUF file (llama.cpp, Ollama, LM
Studio), with ptqkit's own codes and scales: GPTQ/AWQ results on llama.cpp's grid.

Tensor types, chosen per planned layer from its weight spec:

- Q4_0: symmetric int4 codes whose groups (or whole rows, per channel) are multiples of 32
  along the input dimension; each 32-block gets its group's scale as its fp16 `d`. A block is
  18 bytes: `d` (fp16), then 16 bytes where byte j holds code j + 8 in its low nibble and code
  j + 16 + 8 in its high nibble; llama.cpp's value is d * (u - 8), exactly code * scale.
- Q8_0: symmetric int8 codes on the same kind of grid: `d` (fp16) then 32 int8 codes.
- F32 for 1-D float tensors (norms, biases), F16 (default) or F32 for other float tensors.

The fp16 `d` must equal the scale exactly, checked per layer. Scales that fp16 cannot hold are
refused unless `requantize=True`, which rounds each scale to the nearest fp16 and keeps the codes
(verified unchanged: round(code * scale / fp16(scale)) == code, since a relative change of at most
2^-11 moves a code of magnitude <= 128 by less than half a step); the dequantized weights then
differ from the simulated model's by that scale rounding only.

llama.cpp's converter permutes the rows of q_proj / k_proj for the "llama" architecture (its rope
pairs dimension i with i + head_dim / 2 per head, HF's with i + 1); the same row permutation is
applied to codes and scales here. The header holds the architecture's hyper-parameters and, when
the model's source directory (`config._name_or_path`) has a BPE `tokenizer.json`, the
`tokenizer.ggml.*` keys built from it (`tokenizer.ggml.pre` is written as "default").

Refused with ExportError naming the layer, before anything is written: a model family with no
GGUF architecture here (valid: llama, qwen2), asymmetric weights, groups not a multiple of 32,
bit widths other than 4 and 8, non-integer codes, quantized inputs, tensors GGUF has no name for.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.export.options import FloatType, GGUFOptions
from ptqkit.nn.modules import QuantLinear

__all__ = [
    "GGUF_FILE",
    "FILES",
    "ARCHITECTURES",
    "BLOCK",
    "FloatType",
    "GGUFOptions",
    "encode_q4_0",
    "encode_q8_0",
    "block_scales",
    "fp16_scales",
    "qk_permutation",
    "write_gguf",
]

logger = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
FILES = (GGUF_FILE,)
BLOCK = 32  # weights per Q4_0 / Q8_0 block
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # HF model_type -> gguf.MODEL_ARCH member
_PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp's converter permutes


# ---- block encodings -----------------------------------------------------------------------
def _blocks(codes: torch.Tensor, d: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 d bytes [rows, blocks, 2], codes [rows, blocks, 32] int16) of `codes` [rows, cols]."""
    rows, cols = codes.shape
    d_bytes = d.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(rows, cols // BLOCK, 2)
    return d_bytes, codes.to(torch.int16).numpy().reshape(rows, cols // BLOCK, BLOCK)


def encode_q4_0(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Q4_0 bytes [rows, cols / 32 * 18] of int4 codes [rows, cols] in [-8, 7] with one fp16 `d`
    per 32-block [rows, cols / 32]: d, then byte j = (code j + 8) | (code j + 16 + 8) << 4."""
    d_bytes, q = _blocks(codes, d)
    u = (q + 8).astype(np.uint8)
    nibbles = u[..., : BLOCK // 2] | (u[..., BLOCK // 2 :] << 4)
    return np.concatenate([d_bytes, nibbles], axis=-1).reshape(codes.shape[0], -1)


def encode_q8_0(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Q8_0 bytes [rows, cols / 32 * 34] of int8 codes [rows, cols] with one fp16 `d` per 32-block."""
    d_bytes, q = _blocks(codes, d)
    return np.concatenate([d_bytes, q.astype(np.int8).view(np.uint8)], axis=-1).reshape(codes.shape[0], -1)


# ---- checks -------------------------------------------------------------------------------
def _refuse(name: str, what: str) -> ExportError:
    return ExportError(f"export gguf: layer {name!r} {what} (nothing written)")


def _ggml_type(name: str, module: nn.Module) -> str:
    """"Q4_0" or "Q8_0" for a planned layer, or ExportError saying why GGUF cannot hold it."""
    if not isinstance(module, QuantLinear):
        raise _refuse(name, f"is a {type(module).__name__}; only quantized Linear layers map to GGUF types")
    spec: QuantSpec = module.weight_spec
    if module.input_quantizer is not None:
        raise _refuse(name, "quantizes its input; GGUF holds weights only (valid: weight-only recipes such as w4a16)")
    if not spec.qtype.is_integer or not spec.qtype.signed or spec.qtype.bits not in (4, 8):
        raise _refuse(name, f"has {spec.qtype.name} weights; valid: int4 (Q4_0) or int8 (Q8_0)")
    if not spec.symmetric:
        raise _refuse(name, f"has asymmetric {spec.qtype.name} weights (zero points); Q4_0/Q8_0 are symmetric, valid: symmetric=true")
    g = spec.granularity
    if isinstance(g, PerGroup) and g.axis in (1, -1):
        if g.size % BLOCK:
            raise _refuse(name, f"has group size {g.size}, not a multiple of {BLOCK}; valid: 32, 64, 128, ...")
    elif not (isinstance(g, PerChannel) and g.axis in (0, -2)):
        raise _refuse(name, f"has {g.kind} weights; valid: per output channel or groups along the input dimension")
    if module.in_features % BLOCK:
        raise _refuse(name, f"has {module.in_features} input features, not a multiple of {BLOCK}")
    return "Q4_0" if spec.qtype.bits == 4 else "Q8_0"


def block_scales(module: QuantLinear) -> torch.Tensor:
    """One scale per 32-block of the weight [out, in / 32] (a group's scale repeated over its blocks)."""
    scale = module.weight_scale.detach().float()
    g = module.weight_spec.granularity
    repeat = g.size // BLOCK if isinstance(g, PerGroup) else module.in_features // BLOCK
    return scale.reshape(module.out_features, -1).repeat_interleave(repeat, dim=1)[:, : module.in_features // BLOCK]


def fp16_scales(name: str, scales: torch.Tensor, codes: torch.Tensor, requantize: bool) -> torch.Tensor:
    """The fp16 `d` of every block: the scale itself when fp16 holds it exactly; with `requantize`,
    the nearest fp16 (codes checked unchanged); otherwise ExportError naming the layer."""
    d = scales.to(torch.float16)
    if not torch.isfinite(d).all() or bool((d == 0).any() & (scales != 0).any()):
        raise _refuse(name, "has scales outside fp16's range (overflow or underflow to 0)")
    if torch.equal(d.float(), scales):
        return d
    if not requantize:
        worst = ((d.float() - scales).abs() / scales.abs().clamp_min(1e-30)).max().item()
        raise _refuse(
            name, f"has scales fp16 cannot hold exactly (largest relative rounding {worst:.2e}); GGUF stores fp16 scales: "
            "pass requantize=True to round them to the nearest fp16 (codes kept, each scale moves by at most 2^-11 relative)"
        )
    per_weight = lambda s: s.repeat_interleave(BLOCK, dim=1)  # noqa: E731
    recomputed = torch.round(codes.float() * per_weight(scales) / per_weight(d.float()))
    if not torch.equal(recomputed, codes.float()):
        raise _refuse(name, "changes codes when its scales are rounded to fp16; it cannot be requantized exactly")
    return d


def qk_permutation(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q_proj / k_proj (per head, rows i and
    i + head_dim / 2 become neighbours): GGUF row r is HF row perm[r]."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(rows)


# ---- tensors ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor: its name, data (raw block bytes for quantized types) and ggml type name."""

    name: str
    data: np.ndarray
    ggml_type: str


def _architecture(qmodel: nn.Module) -> tuple[str, Any]:
    """(HF model_type, its config) of a model family GGUF has an architecture name for here."""
    config = getattr(qmodel, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"export gguf: model family {model_type!r} ({type(qmodel).__name__}) has no GGUF architecture in ptqkit; "
            f"valid: {', '.join(ARCHITECTURES)} (Hugging Face model_type), nothing written"
        )
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"export gguf: {model_type} rope_type {rope.get('rope_type')!r} is not written by ptqkit; valid: default")
    return model_type, config


def _rope_parameters(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", None), **dict(rope)}


def _gguf_name(name_map: Any, key: str) -> str:
    mapped = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise _refuse(key.rpartition(".")[0], f"holds tensor {key!r}, which GGUF has no name for")
    return mapped


def _permute_rows(model_type: str, config: Any, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """q_proj / k_proj rows (weights, scales, codes, biases) in llama.cpp's order."""
    if model_type not in _PERMUTED:
        return tensor
    heads = config.num_attention_heads
    if ".self_attn.k_proj." in key:
        heads = getattr(config, "num_key_value_heads", None) or heads
    elif ".self_attn.q_proj." not in key:
        return tensor
    return tensor[qk_permutation(tensor.shape[0], heads)]


def _quantized_tensor(name: str, module: QuantLinear, ggml_type: str, gguf_name: str, permute: Any, requantize: bool) -> _Tensor:
    codes = permute(f"{name}.weight", module.weight_codes.detach())
    scales = permute(f"{name}.weight", block_scales(module))
    d = fp16_scales(name, scales, codes, requantize)
    encode = encode_q4_0 if ggml_type == "Q4_0" else encode_q8_0
    return _Tensor(gguf_name, encode(codes, d), ggml_type)


def _float_tensor(gguf_name: str, tensor: torch.Tensor, float_type: FloatType) -> _Tensor:
    if tensor.ndim == 1 or float_type == "f32":
        return _Tensor(gguf_name, tensor.detach().to(torch.float32).numpy(), "F32")
    return _Tensor(gguf_name, tensor.detach().to(torch.float16).numpy(), "F16")


def _float_key(key: str, planned: set[str], tied: bool) -> bool:
    """Whether state-dict `key` is written as a float tensor: not a quantized layer's codes or
    scales (its bias is), not the tied output head (llama.cpp reads token_embd when it is missing)."""
    layer, _, leaf = key.rpartition(".")
    if layer in planned:
        return leaf == "bias"
    return not (tied and key == "lm_head.weight")


def _tensors(qmodel: nn.Module, model_type: str, config: Any, options: GGUFOptions) -> tuple[list[_Tensor], dict[str, str]]:
    """(every GGUF tensor, layer -> ggml type of the quantized ones); everything is checked first."""
    import gguf

    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type]), config.num_hidden_layers)
    permute = lambda key, t: _permute_rows(model_type, config, key, t)  # noqa: E731
    planned = {layer.name: qmodel.get_submodule(layer.name) for layer in qmodel.ptqkit_info.plan.layers}
    types = {name: _ggml_type(name, module) for name, module in planned.items()}
    tensors = [
        _quantized_tensor(name, module, types[name], _gguf_name(name_map, f"{name}.weight"), permute, options.requantize)
        for name, module in planned.items()
    ]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, value in qmodel.state_dict().items():
        if _float_key(key, set(planned), tied):
            tensors.append(_float_tensor(_gguf_name(name_map, key), permute(key, value), options.float_type))
    return tensors, types


# ---- header -------------------------------------------------------------------------------
def _hyperparameters(writer: Any, model_type: str, config: Any) -> None:
    """The architecture keys llama.cpp's converter writes for LLaMA / Qwen2."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = _rope_parameters(config).get("rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if model_type == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _file_type(types: dict[str, str]) -> int:
    """general.file_type: the ggml type most layers have (all-F16 when nothing is quantized)."""
    import gguf

    counts = {t: list(types.values()).count(t) for t in set(types.values())}
    most = max(sorted(counts), key=counts.__getitem__) if counts else "F16"
    return {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16}[most]


def _token_types(vocab_size: int, tokens: dict[int, str], added: dict[int, dict[str, Any]]) -> tuple[list[str], list[int]]:
    import gguf

    names, types = [], []
    for i in range(vocab_size):
        if i not in tokens:
            names.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            names.append(tokens[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            names.append(tokens[i])
            types.append(gguf.TokenType.NORMAL)
    return names, types


def _tokenizer(writer: Any, source: Path | None, vocab_size: int) -> bool:
    """The tokenizer.ggml.* keys of a byte-level BPE `tokenizer.json` in `source` (tokens, types,
    merges, special ids, chat template); False when there is none to read."""
    import gguf

    path = None if source is None else source / "tokenizer.json"
    if path is None or not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        logger.warning("export gguf: %s is not a BPE tokenizer; no tokenizer.ggml.* keys written", path)
        return False
    tokens = {int(i): t for t, i in data["model"]["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    tokens.update({i: t["content"] for i, t in added.items()})
    names, types = _token_types(vocab_size, tokens, added)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(names)
    writer.add_token_types(types)
    gguf.SpecialVocab(source, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    return True


def write_gguf(qmodel: nn.Module, directory: str | Path, options: GGUFOptions = GGUFOptions()) -> list[str]:
    """Write `qmodel` (from `ptqkit.engine.quantize`) as `model.gguf` in the empty directory
    `directory`; returns the file names written. Every layer is checked before the file is opened."""
    import gguf

    from ptqkit.export.compressed_tensors import source_directory

    model_type, config = _architecture(qmodel)
    tensors, types = _tensors(qmodel, model_type, config, options)
    path = Path(directory) / GGUF_FILE
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[model_type])])
    writer.add_name(str(getattr(config, "_name_or_path", "") or model_type))
    _hyperparameters(writer, model_type, config)
    writer.add_file_type(_file_type(types))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if not _tokenizer(writer, source_directory(qmodel), config.vocab_size):
        logger.warning("export gguf: no tokenizer.json next to the model; llama.cpp needs tokenizer.ggml.* keys to run %s", path)
    for tensor in tensors:
        ggml_type = getattr(gguf.GGMLQuantizationType, tensor.ggml_type)
        raw = ggml_type if tensor.ggml_type.startswith("Q") else None
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote %s: %d tensors, %d quantized layers (%s)", path, len(tensors), len(types), ", ".join(sorted(set(types.values()))))
    return [GGUF_FILE]
