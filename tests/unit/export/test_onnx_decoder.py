"""KV-cached ONNX decoder export (`ptqkit.export.onnx_decoder`, `pq.export(..., kv_cache=True)`)
on a tiny randomly initialised LlamaForCausalLM (2 layers, hidden 64, 2 KV heads, vocab 128).

References are Hugging Face's own cached forward (`model(..., cache=cache, use_cache=True)`;
`past_key_values=` before transformers 5.24), not the export wrapper. Tolerance:
max |ORT - reference| <= 1e-5 x max |logit|.
Measured (prefill + 5 cached steps, torch 2.13 / ORT 1.32, AVX2): float graph vs torch 5.1e-7,
int4 g32 (MatMulNBits, accuracy_level 0) vs the simulated model 5.6e-7 and vs the plain
(uncached) export 1.0e-6, int8 MatMulNBits vs simulated 6.9e-7 - float32 summation order. The
smallest top-1/top-2 logit gap on the 16 greedy float steps is 0.068 (max |logit| 2.4): no ties.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError, ExportError
from ptqkit.core.qtypes import PerChannel
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Override, Scheme
from ptqkit.export import NBitsOptions
from ptqkit.models.hf_cache import cached_forward, output_cache

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ptqkit.export.onnx_decoder import (  # noqa: E402
    OrtDecoder,
    decoder_shape,
    export_cached_decoder,
    input_names,
    output_names,
)
from ptqkit.export.onnx_qdq import quantized_modules  # noqa: E402

RTOL = 1e-5  # x max |logit|; measured <= 1.0e-6
VOCAB = 128
PROMPT = torch.tensor([[5, 17, 99, 3, 64, 120, 41]])  # [1, 7]


def _tiny_llama() -> nn.Module:
    # initializer_range 0.1 (not 0.02): logits spread enough that greedy ties cannot occur
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _tiny_llama()


@pytest.fixture(scope="module")
def float_graph(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("float") / "decoder.onnx"
    export_cached_decoder(model, path)
    return path


@pytest.fixture(scope="module")
def int4(model: nn.Module, tmp_path_factory: pytest.TempPathFactory):
    """(qmodel, cached export result, non-cached export dir) for w4a16 groups of 32."""
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w4a16", group_size=32), progress=False)
    root = tmp_path_factory.mktemp("int4")
    cached = pq.export(qmodel, root / "cached", example_inputs=PROMPT, kv_cache=True, strict=True)
    pq.export(qmodel, root / "plain", example_inputs={"input_ids": PROMPT.repeat(2, 1)}, strict=True)
    return qmodel, cached, root


@torch.inference_mode()
def _torch_steps(model: nn.Module, prompt: torch.Tensor, tokens: list[int]) -> list[np.ndarray]:
    """HF's cached forward: logits [1, T, V] of the prefill, then of one step per token in `tokens`."""
    out = cached_forward(model, input_ids=prompt)
    logits, cache = [out.logits.numpy()], output_cache(out)
    for token in tokens:
        out = cached_forward(model, cache, input_ids=torch.tensor([[token]]))
        logits.append(out.logits.numpy())
        cache = output_cache(out)
    return logits


def _ort_steps(decoder: OrtDecoder, prompt: torch.Tensor, tokens: list[int]) -> list[np.ndarray]:
    logits, past = decoder.step(prompt.numpy(), decoder.empty_past())
    out = [logits]
    for token in tokens:
        logits, past = decoder.step(np.array([[token]], np.int64), past)
        out.append(logits)
    return out


@torch.inference_mode()
def _torch_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    out = cached_forward(model, input_ids=prompt)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        out = cached_forward(model, output_cache(out), input_ids=torch.tensor([[tokens[-1]]]))
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _max_rel(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    assert [g.shape for g in got] == [r.shape for r in ref]
    return max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) / max(float(np.abs(r).max()) for r in ref)


def test_graph_interface_names_and_dynamic_lengths(float_graph: Path) -> None:
    graph = onnx.load(str(float_graph)).graph
    assert [i.name for i in graph.input] == input_names(2) == [
        "input_ids", "attention_mask",
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value",
    ]
    assert [o.name for o in graph.output] == output_names(2) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    dims = [d.dim_value or d.dim_param for d in graph.input[2].type.tensor_type.shape.dim]
    assert dims[0] == 1 and dims[1:] != [2, 5, 16] and dims[1] == 2 and dims[3] == 16 and isinstance(dims[2], str)  # past length dynamic
    decoder = OrtDecoder(float_graph, threads=1)
    assert (decoder.layers, decoder.kv_heads, decoder.head_dim) == (2, 2, 16)


def test_float_prefill_and_five_cached_steps_equal_torch(model: nn.Module, float_graph: Path) -> None:
    tokens = [7, 100, 2, 55, 31]
    ref = _torch_steps(model, PROMPT, tokens)
    decoder = OrtDecoder(float_graph, threads=1)
    got = _ort_steps(decoder, PROMPT, tokens)
    assert _max_rel(got, ref) <= RTOL
    _, past = decoder.step(PROMPT.numpy(), decoder.empty_past())
    assert past[0].shape == (1, 2, PROMPT.shape[1], 16)  # present = past + T positions


def test_float_greedy_16_tokens_equal_torch(model: nn.Module, float_graph: Path) -> None:
    result = OrtDecoder(float_graph, threads=1).greedy(PROMPT, 16)
    assert list(result.tokens) == _torch_greedy(model, PROMPT, 16)
    assert len(set(result.tokens)) > 3  # not a degenerate repetition
    assert result.prefill_s > 0 and result.decode_s > 0 and result.tokens_per_s > 0


def test_int4_cached_graph_runs_every_linear_on_matmul_nbits(int4) -> None:
    qmodel, cached, root = int4
    targeted = sorted(quantized_modules(qmodel))
    assert len(targeted) == 14  # 7 Linear per layer; lm_head kept float by the w4a16 preset
    assert sorted(l.module for l in cached.layers) == targeted
    assert {(l.form, l.kernel, l.integer) for l in cached.layers} == {("matmul_nbits", "MatMulNBits", True)}
    nodes = onnx.load(str(root / "cached" / "model.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert sorted(n.input[1] for n in nbits) == sorted(f"{name}.weight_nbits" for name in targeted)
    checks = cached.checks
    assert checks["kv_cache"]["layers"] == 2 and checks["kv_cache"]["inputs"][2] == "past_key_values.0.key"
    assert checks["quantized_ort_vs_simulated"]["max_abs"] <= RTOL * checks["quantized_ort_vs_simulated"]["ref_absmax"]


def test_int4_cached_decode_matches_simulated_and_the_plain_export(int4) -> None:
    from ptqkit.export.ort_check import make_session

    qmodel, _, root = int4
    tokens = [7, 100, 2, 55, 31]
    got = _ort_steps(OrtDecoder(root / "cached" / "model.onnx", threads=1), PROMPT, tokens)
    assert _max_rel(got, _torch_steps(qmodel, PROMPT, tokens)) <= RTOL  # the simulated model, HF cache
    full = torch.cat([PROMPT, torch.tensor([tokens])], dim=1)  # [1, 12]: the same positions, no cache
    plain = make_session(root / "plain" / "model.onnx", threads=1).run(None, {"input_ids": full.numpy()})[0]
    stepped = np.concatenate(got, axis=1)  # [1, 7 + 5, V]
    assert stepped.shape == plain.shape
    assert float(np.abs(stepped - plain).max()) <= RTOL * float(np.abs(plain).max())
    assert OrtDecoder(root / "cached" / "model.onnx").greedy(PROMPT, 16).tokens == tuple(_torch_greedy(qmodel, PROMPT, 16))


def test_int8_weight_only_cached_graph_on_matmul_nbits(model: nn.Module, tmp_path: Path) -> None:
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a16"), progress=False)
    result = pq.export(qmodel, tmp_path / "w8", example_inputs=PROMPT, kv_cache=True, matmul_nbits=NBitsOptions(int8=True), strict=True)
    assert len(result.layers) == 14 and {(l.form, l.kernel) for l in result.layers} == {("matmul_nbits", "MatMulNBits")}
    tokens = [9, 8, 7]
    got = _ort_steps(OrtDecoder(tmp_path / "w8" / "model.onnx", threads=1), PROMPT, tokens)
    assert _max_rel(got, _torch_steps(qmodel, PROMPT, tokens)) <= RTOL


def test_int8_lm_head_tied_to_the_embeddings_runs_on_matmul_nbits(tmp_path: Path) -> None:
    """SmolLM2's deployment: int4 decoder layers and an int8 per-channel lm_head tied to the
    embeddings. The head becomes 8-bit MatMulNBits; the embedding Gather keeps its float table."""
    config = _tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(config).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    int8_head = Override(match=("lm_head",), scheme=Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0))))
    recipe = pq.Recipe.from_preset("w4a16", group_size=32, keep_output_head=False, overrides=(int8_head,))
    qmodel = pq.quantize(tied, recipe, progress=False)
    result = pq.export(qmodel, tmp_path / "q", example_inputs=PROMPT, kv_cache=True, matmul_nbits=NBitsOptions(int8=True), strict=True)
    assert len(result.layers) == 15 and {(l.form, l.kernel) for l in result.layers} == {("matmul_nbits", "MatMulNBits")}
    graph = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    bits = {n.input[1]: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("lm_head.weight_nbits") == 8 and set(bits.values()) == {4}
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [VOCAB, 64]}
    assert tables & floats, "the embedding Gather reads a float [vocab, hidden] table"
    tokens = [9, 8, 7]
    got = _ort_steps(OrtDecoder(tmp_path / "q" / "model.onnx", threads=1), PROMPT, tokens)
    assert _max_rel(got, _torch_steps(qmodel, PROMPT, tokens)) <= RTOL


# ---- errors -----------------------------------------------------------------------------
class _NoCacheLM(transformers.LlamaForCausalLM):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):  # type: ignore[override]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _tiny_bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(8, 8)), r"kv_cache export: Sequential has no Hugging Face config; pass a transformers causal LM"),
        (_tiny_bert, r"kv_cache export: BertModel is not a causal LM \(can_generate\(\) is not True\)"),
        (lambda: _NoCacheLM(_tiny_llama().config), r"kv_cache export: _NoCacheLM.forward takes no past_key_values / use_cache argument"),
    ],
    ids=["sequential", "bert", "no_cache_forward"],
)
def test_not_a_cached_causal_lm_raises(build, match: str, tmp_path: Path) -> None:
    module = build().eval()
    with pytest.raises(ExportError, match=match):
        decoder_shape(module)
    qmodel = pq.quantize(module, pq.Recipe.from_preset("w8a16"), progress=False)
    with pytest.raises(ExportError, match=match):
        pq.export(qmodel, tmp_path / "out", example_inputs=PROMPT, kv_cache=True)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def w8(model: nn.Module) -> nn.Module:
    return pq.quantize(model, pq.Recipe.from_preset("w8a16"), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"example_inputs": PROMPT.repeat(2, 1)}, r"input_ids of shape \[1, T >= 1\] \(batch 1\), got a tensor of shape \(2, 7\)"),
        ({"example_inputs": {"input_ids": PROMPT, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]])}}, r"attention_mask has zeros"),
        ({"example_inputs": {"ids": PROMPT}}, r"example_inputs has keys \['ids'\]; it needs input_ids"),
        ({"example_inputs": PROMPT, "dynamic_shapes": False}, r"kv_cache=True needs dynamic_shapes=True"),
        ({"example_inputs": PROMPT, "formats": ("safetensors",)}, r"kv_cache=True applies to the 'onnx' format only"),
        ({"example_inputs": PROMPT, "kv_cache": "yes"}, r"^export\.kv_cache: 'yes' must be true or false$"),
    ],
    ids=["batch2", "padding", "no_input_ids", "static", "safetensors", "not_bool"],
)
def test_bad_kv_cache_arguments_raise(w8: nn.Module, kwargs: dict, match: str, tmp_path: Path) -> None:
    kwargs = {"kv_cache": True, **kwargs}
    with pytest.raises(ExportError, match=match):
        pq.export(w8, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_ort_decoder_refuses_a_graph_without_cache_and_bad_arguments(int4, float_graph: Path) -> None:
    _, _, root = int4
    with pytest.raises(ExportError, match=r"OrtDecoder: .*plain.*model.onnx has inputs \['input_ids'\]; expected input_ids, attention_mask, past_key_values"):
        OrtDecoder(root / "plain" / "model.onnx")
    decoder = OrtDecoder(float_graph)
    with pytest.raises(ConfigError, match=r"new_tokens=0; valid: an int >= 1"):
        decoder.greedy(PROMPT, 0)
    with pytest.raises(ConfigError, match=r"the prompt is empty"):
        decoder.greedy([], 4)
