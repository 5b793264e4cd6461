"""Layer onloading (`ptqkit.engine.onloading`): a model saved to disk is quantized block by block with
its weights left there, and gives the very bytes `pq.quantize` + `pq.save` give on the loaded
model; sharded and tied checkpoints; refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptqkit as pq
from ptqkit.algorithms import AWQConfig, BNFoldConfig, GPTQConfig
from ptqkit.core.errors import ArtifactError, ConfigError, UnsupportedModelError
from ptqkit.engine.onloading import quantize_onloaded
from ptqkit.engine.weight_store import WeightStore, build_skeleton

from ..algorithms.tiny_transformers import tiny_llama, token_batch

transformers = pytest.importorskip("transformers")


def _gptq() -> pq.Recipe:
    return pq.Recipe.from_preset("w4a16", group_size=16, algorithms=(GPTQConfig(),))


@pytest.fixture(scope="module")
def data() -> pq.CalibrationData:
    return pq.CalibrationData.from_tensors({"input_ids": token_batch(samples=8, length=24)})


def _saved(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def _in_memory_bytes(model: torch.nn.Module, recipe: pq.Recipe, data, path: Path) -> bytes:
    pq.save(pq.quantize(model, recipe, data, progress=False), path)
    return (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "recipe",
    [_gptq(), pq.Recipe.from_preset("w4a16", group_size=16, algorithms=(AWQConfig(grid=5), GPTQConfig())), pq.Recipe.from_preset("w8a8_dynamic")],
    ids=["gptq", "awq+gptq", "w8a8-dynamic-rtn"],
)
def test_onloaded_artifact_is_byte_identical_to_the_in_memory_one(tmp_path: Path, data, recipe: pq.Recipe) -> None:
    model = tiny_llama()
    source = _saved(model, tmp_path / "hf")
    pq.save(quantize_onloaded(source, recipe, data, progress=False), tmp_path / "onloaded")
    assert (tmp_path / "onloaded/model.safetensors").read_bytes() == _in_memory_bytes(model, recipe, data, tmp_path / "memory")
    loaded = pq.load(tmp_path / "onloaded", source)  # the artifact loads like any other, and runs
    ids = token_batch(samples=2, length=12, seed=4)
    reference = pq.load(tmp_path / "memory", source)
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_sharded_checkpoint_with_tied_embeddings(tmp_path: Path, data) -> None:
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    source = _saved(model, tmp_path / "hf", max_shard_size="60KB")
    assert (source / "model.safetensors.index.json").is_file()
    pq.save(quantize_onloaded(source, _gptq(), data, progress=False), tmp_path / "onloaded")
    assert (tmp_path / "onloaded/model.safetensors").read_bytes() == _in_memory_bytes(model, _gptq(), data, tmp_path / "memory")


def test_skeleton_allocates_no_weights(tmp_path: Path) -> None:
    skeleton = build_skeleton(_saved(tiny_llama(), tmp_path / "hf"))
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert all(b.device.type == "cpu" for b in skeleton.buffers())  # rotary frequencies are computed


def test_static_activations_and_cnn_algorithms_are_refused(tmp_path: Path, data) -> None:
    source = _saved(tiny_llama(), tmp_path / "hf")
    with pytest.raises(ConfigError, match="statically.*w8a8_dynamic"):
        quantize_onloaded(source, pq.Recipe.from_preset("w8a8"), data, progress=False)
    with pytest.raises(ConfigError, match="onloading runs the block-by-block engine"):
        quantize_onloaded(source, pq.Recipe.from_preset("w8a8_dynamic", algorithms=(BNFoldConfig(),)), data, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_and_mismatched_weights_name_the_file_and_tensor(tmp_path: Path, data) -> None:
    with pytest.raises(UnsupportedModelError, match="no model.safetensors"):
        WeightStore(tmp_path)
    source = _saved(tiny_llama(), tmp_path / "hf")
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="model.layers.1.mlp.up_proj.weight.*shape \\(3, 3\\)"):
        quantize_onloaded(source, _gptq(), data, progress=False)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="'model.layers.1.mlp.up_proj.weight' is not in"):
        quantize_onloaded(source, _gptq(), data, progress=False)
    assert not (tmp_path / "out").exists()


def test_unreadable_safetensors_files_and_calibration_are_refused_by_name(tmp_path: Path, data) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ArtifactError, match="too short for a safetensors file"):
        WeightStore(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"{oops")
    with pytest.raises(ArtifactError, match="header is not JSON"):
        WeightStore(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"no_map": 1}')
    with pytest.raises(ArtifactError, match="not a safetensors index"):
        WeightStore(tmp_path)
    source = _saved(tiny_llama(), tmp_path / "hf")
    with pytest.raises(ConfigError, match="non-empty CalibrationData"):
        quantize_onloaded(source, _gptq(), [torch.zeros(2, 3)], progress=False)


def test_cli_onload_needs_a_model_directory_and_calibration(tmp_path: Path, capsys) -> None:
    from ptqkit.cli import main

    assert main(["quantize", "--model", "ptqkit.models.digits_cnn:DigitCNN", "--preset", "w4a16", "--out", str(tmp_path / "o"), "--onload"]) == 2
    assert "quantize --onload: needs a Hugging Face model directory and --calib" in capsys.readouterr().err
