"""compressed-tensors export: the int32 packing against compressed-tensors' own packer, and tiny
random LLaMA checkpoints loaded by transformers (with compressed-tensors installed) whose logits
equal ptqkit's simulated model."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ExportError
from ptqkit.engine.recipe import Recipe
from ptqkit.export.compressed_tensors import pack_int32, write_compressed_tensors

transformers = pytest.importorskip("transformers")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def _tiny_llama(tied: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _asymmetric(recipe: Recipe) -> Recipe:
    return replace(recipe, scheme=replace(recipe.scheme, weights=replace(recipe.scheme.weights, symmetric=False)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_int32_equals_compressed_tensors(bits: int) -> None:
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    codes = torch.randint(low, high, (5, 77), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    ours = pack_int32(codes, bits)
    assert ours.dtype == torch.int32 and ours.shape == (5, -(-77 * bits // 32))
    assert torch.equal(ours, ct_helpers.pack_to_int32(codes, bits))
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size([5, 77])), codes)


def _load_and_compare(qmodel: torch.nn.Module, out: Path, **load: object) -> torch.nn.Module:
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), **load)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits
    # Scales are stored in the model's dtype (float32 here) and compressed-tensors dequantizes
    # (code - zero_point) * scale as ptqkit does: the logits measured bit-identical (max |diff| 0).
    assert torch.equal(got, expected), (got - expected).abs().max()
    return loaded


@pytest.mark.parametrize(
    ("recipe", "tied", "load"),
    [
        (Recipe.from_preset("w4a16", group_size=32), True, {}),
        (Recipe.from_preset("w8a16"), False, {}),
        (Recipe.from_preset("w8a8_dynamic"), False, {}),  # per-token activations quantized by compressed-tensors at run time
        # transformers refuses asymmetric packed zero points' shapes unless the checkpoint is dequantized while loading
        (_asymmetric(Recipe.from_preset("w4a16", group_size=32)), False, {"dequantize": True}),
    ],
    ids=["w4a16-g32-tied", "w8a16", "w8a8-dynamic", "w4a16-asym"],
)
def test_transformers_loads_the_checkpoint(tmp_path: Path, recipe: Recipe, tied: bool, load: dict) -> None:
    qmodel = pq.quantize(_tiny_llama(tied), recipe, progress=False)
    written = write_compressed_tensors(qmodel, tmp_path)
    assert written[:2] == ["model.safetensors", "config.json"] and "generation_config.json" in written
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == ("int-quantized" if recipe.scheme.inputs else "pack-quantized")
    assert sum(len(g["targets"]) for g in qc["config_groups"].values()) == len(qmodel.ptqkit_info.plan.layers)
    extra = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if load else {}
    _load_and_compare(qmodel, tmp_path, **extra)


def test_tensor_layout_is_llm_compressors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    qmodel = pq.quantize(_tiny_llama(), _asymmetric(Recipe.from_preset("w4a16", group_size=32)), progress=False)
    write_compressed_tensors(qmodel, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."  # [64, 128]
    assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == {
        "weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
    }
    assert tensors[prefix + "weight_packed"].dtype == torch.int32 and tensors[prefix + "weight_packed"].shape == (64, 16)
    assert tensors[prefix + "weight_scale"].shape == (64, 4)
    assert tensors[prefix + "weight_shape"].tolist() == [64, 128]
    assert tensors[prefix + "weight_zero_point"].shape == (8, 4)  # packed along the output dimension
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.float32
    symmetric = pq.quantize(_tiny_llama(), Recipe.from_preset("w4a16", group_size=32), progress=False)
    (tmp_path / "sym").mkdir()
    write_compressed_tensors(symmetric, tmp_path / "sym")
    assert not any(k.endswith("weight_zero_point") for k in load_file(str(tmp_path / "sym" / "model.safetensors")))


def test_config_parses_as_compressed_tensors_config(tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    qmodel = pq.quantize(_tiny_llama(), Recipe.from_preset("w4a16", group_size=32), progress=False)
    write_compressed_tensors(qmodel, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    (group,) = parsed.config_groups.values()
    assert group.weights.num_bits == 4 and group.weights.group_size == 32 and group.weights.strategy == "group"
    assert parsed.ignore == ["lm_head"]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (Recipe.from_preset("fp8"), r"layer 'model\.layers\.0\.self_attn\.q_proj' has fp8_e4m3 weights"),
        (Recipe.from_preset("w8a8"), r"layer 'model\.layers\.0\.self_attn\.q_proj' has static per_tensor uint8 input quantization"),
        (Recipe.from_preset("w4a16", group_size=48), r"layer 'model\.layers\.0\.self_attn\.q_proj' has 64 input features, not a multiple of its group size 48"),
    ],
    ids=["fp8", "static-inputs", "short-last-group"],
)
def test_refusals_write_nothing(tmp_path: Path, recipe: Recipe, message: str) -> None:
    qmodel = pq.quantize(_tiny_llama(), recipe, calib=torch.randint(0, 96, (4, 8)), progress=False)
    with pytest.raises(ExportError, match=message + r".*nothing written"):
        write_compressed_tensors(qmodel, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_model_without_hugging_face_config(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qmodel = pq.quantize(model, Recipe.from_preset("w8a16", keep_output_head=False), progress=False)
    with pytest.raises(ExportError, match=r"Sequential is not a Hugging Face model"):
        write_compressed_tensors(qmodel, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_and_generation_files_come_from_the_source_directory(tmp_path: Path) -> None:
    source = tmp_path / "source"
    _tiny_llama().save_pretrained(source)
    (source / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source))
    qmodel = pq.quantize(model, Recipe.from_preset("w4a16", group_size=32), progress=False)
    (tmp_path / "out").mkdir()
    written = write_compressed_tensors(qmodel, tmp_path / "out")
    assert set(written) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"}
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()
