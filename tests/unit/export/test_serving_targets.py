"""The compressed-tensors and gguf rows of export.TARGETS: written through `export` atomically,
re-exported into the same directory, and refused together with the safetensors artifact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ExportError
from ptqkit.engine.recipe import Recipe
from ptqkit.export import FORMATS, TARGETS, export

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def qmodel() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    qmodel = pq.quantize(transformers.LlamaForCausalLM(config).eval(), Recipe.from_preset("w4a16", group_size=32), progress=False)
    for layer in qmodel.ptqkit_info.plan.layers:  # scales fp16 holds exactly: Q4_0 without requantize
        module = qmodel.get_submodule(layer.name)
        module.weight_scale.copy_(module.weight_scale.half().float())
    return qmodel


def test_rows_own_the_modules_files() -> None:
    from ptqkit.export import compressed_tensors, gguf_format

    assert {"compressed-tensors", "gguf"} <= set(FORMATS)
    assert TARGETS["compressed-tensors"].files == (*compressed_tensors.FILES, "ptqkit_export.json")
    assert TARGETS["gguf"].files == (*gguf_format.FILES, "ptqkit_export.json")


def test_export_writes_both_formats_and_exports_again(tmp_path: Path, qmodel: torch.nn.Module) -> None:
    out = tmp_path / "serving"
    result = export(qmodel, out, formats=["compressed-tensors", "gguf"])
    assert set(result.files) == {"model.safetensors", "config.json", "generation_config.json", "model.gguf"}
    assert json.loads((out / "ptqkit_export.json").read_text())["formats"] == ["compressed-tensors", "gguf"]
    before = (out / "model.safetensors").read_bytes()
    export(qmodel, out, formats=["gguf"])  # a directory ptqkit wrote is rebuilt; the other format's files are kept
    assert (out / "model.safetensors").read_bytes() == before and (out / "model.gguf").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf")
    name = "model.layers.0.mlp.up_proj"
    module = qmodel.get_submodule(name)
    expected = module.weight_codes.float() * module.weight_scale.repeat_interleave(32, dim=1)  # fp16-exact scales: no rounding
    assert torch.equal(loaded.state_dict()[f"{name}.weight"], expected)


def test_failed_export_leaves_the_previous_directory(tmp_path: Path, qmodel: torch.nn.Module) -> None:
    out = tmp_path / "serving"
    export(qmodel, out, formats=["compressed-tensors"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"formats 'safetensors' and 'compressed-tensors' both write model\.safetensors"):
        export(qmodel, out, formats=["safetensors", "compressed-tensors"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shipped_recipes_export_to_their_formats(tmp_path: Path) -> None:
    from ptqkit.core.qtypes import PerGroup
    from ptqkit.export import GGUFOptions
    from ptqkit.export.gguf_format import write_gguf

    root = Path(__file__).resolve().parents[3] / "recipes"
    gguf_recipe = Recipe.load(root / "gguf-q4_0-gptq.yaml")
    ct_recipe = Recipe.load(root / "compressed-tensors-w4a16-gptq.yaml")
    assert gguf_recipe.scheme.weights.granularity == PerGroup(32) and gguf_recipe.scheme.weights.symmetric
    assert ct_recipe.scheme.weights.granularity == PerGroup(128) and [a.name for a in ct_recipe.algorithms] == ["gptq"]
    config = transformers.LlamaConfig(  # widths that are multiples of both recipes' groups (32, 128)
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    qmodel = pq.quantize(model, gguf_recipe, calib=calib, progress=False)
    with pytest.raises(ExportError, match="fp16"):  # fp32 scales: refused unless requantize, nothing written
        export(qmodel, tmp_path / "gguf", formats=["gguf"])
    assert not (tmp_path / "gguf").exists()
    result = export(qmodel, tmp_path / "gguf", formats=["gguf"], gguf=GGUFOptions(requantize=True))  # through export, atomically
    assert result.files["model.gguf"].is_file()
    assert write_gguf(qmodel, tmp_path, GGUFOptions(requantize=True)) == ["model.gguf"]
    export(pq.quantize(model, ct_recipe, calib=calib, progress=False), tmp_path / "ct", formats=["compressed-tensors"])
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "pack-quantized" and group["weights"]["group_size"] == 128
