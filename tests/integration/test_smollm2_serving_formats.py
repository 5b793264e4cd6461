"""SmolLM2-135M exported to compressed-tensors and GGUF and loaded back by transformers.

SmolLM2 ships as a Q4_1 GGUF, so its weights already sit on a 32-block grid: the GGUF check uses
groups of 64, and nothing here measures quantization quality, only that the engines load
exactly what ptqkit computed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.engine.recipe import Recipe
from ptqkit.export import export
from ptqkit.export.gguf_format import GGUFOptions, block_scales, write_gguf

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

PROMPT = "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # naïve 12345"


def test_compressed_tensors_logits_equal_the_simulated_model(tmp_path: Path, smollm2) -> None:
    model, tokenizer = smollm2
    qmodel = pq.quantize(model, Recipe.from_preset("w4a16", group_size=64), progress=False)  # 576 and 1536 split into 64s
    export(qmodel, tmp_path, formats=["compressed-tensors"])
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in tmp_path.iterdir()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")  # as the fixture
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        diff = (loaded(input_ids=ids).logits - qmodel(input_ids=ids).logits).abs().max().item()
    # float32 scales, dequantized as ptqkit does; 7.4e-5 was measured with transformers' default sdpa
    # attention against the fixture's eager attention, so this bounds kernel differences, not quantization
    assert diff <= 1e-4, diff


def test_gguf_weights_are_codes_times_fp16_scales(tmp_path: Path, smollm2) -> None:
    model, tokenizer = smollm2
    qmodel = pq.quantize(model, Recipe.from_preset("w4a16", group_size=64), progress=False)
    write_gguf(qmodel, tmp_path, GGUFOptions(requantize=True))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    state = loaded.state_dict()
    for layer in qmodel.ptqkit_info.plan.layers:
        module = qmodel.get_submodule(layer.name)
        expected = module.weight_codes.float() * block_scales(module).half().float().repeat_interleave(32, dim=1)
        assert torch.equal(state[f"{layer.name}.weight"], expected), layer.name
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    assert gguf_tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
