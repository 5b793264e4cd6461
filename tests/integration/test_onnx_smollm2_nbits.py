"""SmolLM2-135M (first 3 decoder layers, so the graph capture stays ~15 s) W4A16 exported to ONNX
with MatMulNBits and run in ONNX Runtime.

K = 576 is 4 x 128 + 64: with groups of 128 the last group is ragged and maps to a half-padded
MatMulNBits block. Measured here (ORT 1.32, AVX2, accuracy_level 0): all 21 Linear layers on
MatMulNBits; ORT vs the simulated model's logits max |diff| 6.1e-5 (g128 symmetric) and 9.2e-5
(g64 asymmetric) at max |logit| 78 / 75, i.e. ~1e-6 relative, the size of the float graph's own
ORT-vs-torch difference; next-token argmax equal at every position.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ptqkit as pq
from ptqkit.models.hf_cache import cached_forward, output_cache

pytestmark = pytest.mark.integration

N_LAYERS = 3
TEXTS = [
    "The old lighthouse keeper climbed the stairs every evening, and",
    "def fibonacci(n):\n    return n if n < 2 else",
]


@pytest.fixture(scope="module")
def smollm2_3layers():
    pytest.importorskip("onnxruntime")
    from ptqkit.models.zoo import load_smollm2

    model, tokenizer = load_smollm2()  # a fresh copy: the truncation below must not leak
    model.model.layers = model.model.layers[:N_LAYERS]
    model.config.num_hidden_layers = N_LAYERS
    return model.eval(), tokenizer


@pytest.mark.parametrize(("group", "symmetric"), [(128, True), (64, False)])
def test_smollm2_w4a16_on_matmul_nbits_matches_simulation(smollm2_3layers, group: int, symmetric: bool, tmp_path: Path) -> None:
    from ptqkit.export import export
    from ptqkit.export.ort_check import make_session, run_session

    model, tokenizer = smollm2_3layers
    recipe = pq.Recipe.from_preset("w4a16", group_size=group)
    recipe = replace(recipe, scheme=replace(recipe.scheme, weights=replace(recipe.scheme.weights, symmetric=symmetric)))
    qmodel = pq.quantize(model, recipe, progress=False)
    example = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    result = export(qmodel, tmp_path / "out", example_inputs=example, strict=True)

    assert len(result.layers) == 7 * N_LAYERS and result.float_layers == ()
    assert {(l.form, l.kernel) for l in result.layers} == {("matmul_nbits", "MatMulNBits")}
    down = next(l for l in result.layers if l.module.endswith("layers.0.mlp.down_proj"))
    assert down.note.startswith(f"4-bit, block {group}")  # K = 1536: whole groups
    q_proj = next(l for l in result.layers if l.module.endswith("layers.0.self_attn.q_proj"))
    assert ("K=576 padded to 640" in q_proj.note) == (group == 128)
    check = result.checks["quantized_ort_vs_simulated"]
    tolerance = 1e-5 * check["ref_absmax"]  # measured 1.2e-6 x max |logit|
    assert check["max_abs"] <= tolerance

    # fresh text, another length: logits and greedy next tokens agree with the simulated model
    fresh = dict(tokenizer(["Water boils at a temperature of one hundred degrees"], return_tensors="pt"))
    with torch.inference_mode():
        ref = qmodel(**fresh, use_cache=False).logits.numpy()
    got = run_session(make_session(tmp_path / "out" / "model.onnx", threads=2), fresh)[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= tolerance
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@torch.inference_mode()
def _torch_greedy_logits(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and last-position logits of each step, Hugging Face's own KV cache."""
    out = cached_forward(model, input_ids=ids)
    tokens, logits = [int(out.logits[0, -1].argmax())], [out.logits[0, -1].numpy()]
    for _ in range(new_tokens - 1):
        out = cached_forward(model, output_cache(out), input_ids=torch.tensor([[tokens[-1]]]))
        tokens.append(int(out.logits[0, -1].argmax()))
        logits.append(out.logits[0, -1].numpy())
    return tokens, logits


def test_smollm2_w4a16_kv_cached_decode_matches_simulation(smollm2_3layers, tmp_path: Path) -> None:
    """pq.export(kv_cache=True): the 3-layer decoder as one prefill/decode graph with past
    key/values; 16 greedy ORT steps on MatMulNBits reproduce the simulated model's tokens, and each
    step's logits its logits (HF cache in torch). Measured: max |diff| 8.0e-5 at max |logit| 71,
    1.1e-6 relative (the size of the uncached export's difference above); export ~15 s."""
    from ptqkit.export import export
    from ptqkit.export.onnx_decoder import OrtDecoder

    model, tokenizer = smollm2_3layers
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w4a16", group_size=128), progress=False)
    prompt = dict(tokenizer([TEXTS[0]], return_tensors="pt"))
    result = export(qmodel, tmp_path / "out", example_inputs=prompt, kv_cache=True, strict=True)
    assert len(result.layers) == 7 * N_LAYERS and {(l.form, l.kernel) for l in result.layers} == {("matmul_nbits", "MatMulNBits")}
    assert result.checks["kv_cache"]["layers"] == N_LAYERS

    decoder = OrtDecoder(tmp_path / "out" / "model.onnx", threads=2)
    ref_tokens, ref_logits = _torch_greedy_logits(qmodel, prompt["input_ids"], 16)
    assert list(decoder.greedy(prompt["input_ids"], 16).tokens) == ref_tokens
    logits, past = decoder.step(prompt["input_ids"].numpy(), decoder.empty_past())
    got = [logits[0, -1]]
    for token in ref_tokens[:-1]:
        logits, past = decoder.step(np.array([[token]], np.int64), past)
        got.append(logits[0, -1])
    scale = max(float(np.abs(r).max()) for r in ref_logits)
    assert max(float(np.abs(g - r).max()) for g, r in zip(got, ref_logits)) <= 1e-5 * scale
