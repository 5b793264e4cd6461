"""GGUF export: Q4_0/Q8_0 block encodings against gguf-py's dequantizer, the q/k permutation
against transformers' reverse permutation, and tiny random LLaMA / Qwen2 files loaded by
transformers' GGUF loader with weights bit-identical to ptqkit's codes x fp16 scales."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ExportError
from ptqkit.engine.recipe import Recipe
from ptqkit.export.gguf_format import GGUFOptions, block_scales, encode_q4_0, encode_q8_0, qk_permutation, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

EXACT = GGUFOptions(float_type="f32", requantize=True)


def _tiny(family: str, tied: bool = False) -> torch.nn.Module:
    sizes = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    config, cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gpt2": (None, None),
    }[family]
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4)).eval()
    return cls(config(**sizes)).eval()


@pytest.mark.parametrize(("encode", "ggml", "low", "high"), [(encode_q4_0, "Q4_0", -8, 8), (encode_q8_0, "Q8_0", -128, 128)])
def test_block_encoding_equals_gguf_dequantize(encode, ggml: str, low: int, high: int) -> None:
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(low, high, (3, 96), dtype=torch.int8, generator=generator)
    d = (torch.rand(3, 3, generator=generator) + 0.01).to(torch.float16)
    raw = encode(codes, d)
    qtype = getattr(gguf.GGMLQuantizationType, ggml)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    assert raw.dtype == np.uint8 and raw.shape == (3, 3 * block_bytes)
    got = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    assert torch.equal(got, codes.float() * d.float().repeat_interleave(32, dim=1))


def test_q4_0_equals_gguf_quantize_on_its_own_grid() -> None:
    """gguf-py's reference quantizer, given weights already on a Q4_0 grid, writes the same bytes."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (4, 64), dtype=torch.int8, generator=generator)
    codes[:, ::32] = -8  # gguf picks d from the largest magnitude with sign: -8 * d is that value
    d = torch.full((4, 2), 0.125, dtype=torch.float16)
    weights = (codes.float() * d.float().repeat_interleave(32, dim=1)).numpy()
    reference = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(encode_q4_0(codes, d), reference)


def test_qk_permutation_is_undone_by_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    for heads, kv_heads in ((4, 4), (4, 2)):
        rows = 64 if kv_heads == heads else 32
        w = weights[:rows]
        permuted = w[qk_permutation(rows, kv_heads)].numpy()
        undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, kv_heads)
        assert np.array_equal(undone, w.numpy())


def _fp16_simulated(module) -> torch.Tensor:
    return module.weight_codes.float() * block_scales(module).half().float().repeat_interleave(32, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("recipe", "ggml"),
    [(Recipe.from_preset("w4a16", group_size=64), "Q4_0"), (Recipe.from_preset("w8a16"), "Q8_0")],
    ids=["q4_0-g64", "q8_0-per-channel"],
)
def test_transformers_dequantizes_bit_identically(tmp_path: Path, family: str, recipe: Recipe, ggml: str) -> None:
    qmodel = pq.quantize(_tiny(family, tied=family == "llama"), recipe, progress=False)
    assert write_gguf(qmodel, tmp_path, EXACT) == ["model.gguf"]
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == ggml and types["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in types) == (family != "llama")  # tied LLaMA head: llama.cpp reads token_embd
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    state = loaded.state_dict()
    for layer in qmodel.ptqkit_info.plan.layers:
        module = qmodel.get_submodule(layer.name)
        assert torch.equal(state[f"{layer.name}.weight"], _fp16_simulated(module)), layer.name
        # requantize rounds the scales only: relative weight change <= 2^-11
        assert torch.allclose(state[f"{layer.name}.weight"], module.weight, rtol=2**-11, atol=0)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (loaded(input_ids=ids).logits - qmodel(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-3  # fp16 scale rounding only; measured about 1.4e-4 on these models


def test_fp16_exact_scales_need_no_requantize(tmp_path: Path) -> None:
    qmodel = pq.quantize(_tiny("llama"), Recipe.from_preset("w4a16", group_size=32), progress=False)
    for layer in qmodel.ptqkit_info.plan.layers:
        module = qmodel.get_submodule(layer.name)
        module.weight_scale.copy_(module.weight_scale.half().float())
    write_gguf(qmodel, tmp_path, GGUFOptions(float_type="f16"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    q_proj = "model.layers.1.self_attn.k_proj"
    assert torch.equal(loaded.state_dict()[f"{q_proj}.weight"], _fp16_simulated(qmodel.get_submodule(q_proj)))


def _with_weights(recipe: Recipe, **changes) -> Recipe:
    return replace(recipe, scheme=replace(recipe.scheme, weights=replace(recipe.scheme.weights, **changes)))


@pytest.mark.parametrize(
    ("family", "recipe", "options", "message"),
    [
        ("gpt2", Recipe.from_preset("w4a16", group_size=32), EXACT, r"model family 'gpt2' .*has no GGUF architecture.*valid: llama, qwen2"),
        ("llama", Recipe.from_preset("w4a16", group_size=48), EXACT, r"layer 'model\.layers\.0\.self_attn\.q_proj' has group size 48, not a multiple of 32"),
        ("llama", _with_weights(Recipe.from_preset("w4a16", group_size=32), symmetric=False), EXACT,
         r"layer 'model\.layers\.0\.self_attn\.q_proj' has asymmetric int4 weights"),
        ("llama", Recipe.from_preset("w4a16", group_size=32), GGUFOptions(), r"layer 'model\.layers\.0\.self_attn\.q_proj' has scales fp16 cannot hold exactly.*requantize=True"),
        ("llama", _with_weights(Recipe.from_preset("w4a16", group_size=32), qtype=pq.QType.int(3)), EXACT, r"has int3 weights; valid: int4 \(Q4_0\) or int8 \(Q8_0\)"),
        ("llama", Recipe.from_preset("w8a8_dynamic"), EXACT, r"quantizes its input; GGUF holds weights only"),
    ],
    ids=["family", "group-48", "asymmetric", "fp32-scales", "int3", "w8a8"],
)
def test_refusals_write_nothing(tmp_path: Path, family: str, recipe: Recipe, options: GGUFOptions, message: str) -> None:
    qmodel = pq.quantize(_tiny(family), recipe, progress=False)
    with pytest.raises(ExportError, match=message):
        write_gguf(qmodel, tmp_path, options)
    assert list(tmp_path.iterdir()) == []


def test_options_are_checked() -> None:
    with pytest.raises(ExportError, match=r"export gguf.float_type: 'bf16' is unknown; valid: f16, f32"):
        GGUFOptions(float_type="bf16")
