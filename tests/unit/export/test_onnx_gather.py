"""Quantized embeddings as ONNX Runtime's GatherBlockQuantized (`ptqkit.export.onnx_gather`).

Tiny randomly initialised LlamaForCausalLM (1 layer, hidden 64, vocab 128, tied embeddings).
References: the kernel itself against (u - zp) · s in numpy (exact: the same float32 product),
and ptqkit's simulated model, whose embedding rows are the dequantized codes; tolerance for
the whole model 1e-5 x max |logit| (float32 summation order in the layers after it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Override, Recipe, Scheme
from ptqkit.export import NBitsOptions

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ptqkit.export.onnx_gather import (  # noqa: E402
    gather_refusal,
    insert_gather_block_quantized,
    quantized_embeddings,
)
from ptqkit.export.onnx_graph import LayerNode  # noqa: E402

RTOL = 1e-5
VOCAB, HIDDEN = 128, 64
PROMPT = torch.tensor([[5, 17, 99, 3, 64, 120, 41]])


def _tied_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1, tie_word_embeddings=True, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _recipe(embedding: QuantSpec) -> Recipe:
    linear = QuantSpec(qtype="int4", granularity=PerGroup(32))
    return Recipe(
        targets=("Linear", "Embedding"), scheme=Scheme(weights=linear),
        overrides=(Override(match=("model.embed_tokens",), scheme=Scheme(weights=embedding)),),
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _tied_llama()


@pytest.mark.parametrize(
    ("spec", "bits", "block", "zero_points"),
    [
        (QuantSpec(qtype="int4", granularity=PerGroup(32)), 4, 32, False),
        (QuantSpec(qtype="uint4", granularity=PerGroup(16), symmetric=False), 4, 16, True),
        (QuantSpec(qtype="int8", granularity=PerChannel(0)), 8, 64, False),
    ],
    ids=["int4_g32", "uint4_g16_asymmetric", "int8_per_row"],
)
def test_quantized_embedding_runs_on_gather_block_quantized(model, spec, bits, block, zero_points, tmp_path: Path) -> None:
    qmodel = pq.quantize(model, _recipe(spec), progress=False)
    result = pq.export(qmodel, tmp_path, example_inputs=PROMPT, matmul_nbits=NBitsOptions(), strict=True)
    row = next(l for l in result.layers if l.module == "model.embed_tokens")
    assert (row.form, row.kernel, row.integer) == ("gather_block_quantized", "GatherBlockQuantized", True)
    assert row.note.startswith(f"{bits}-bit rows, block {block}")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    (node,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(node.input) == (4 if zero_points else 3)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [VOCAB, HIDDEN] for t in graph.initializer)
    # the table the node reads decodes to the simulated model's rows
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    data = inits[node.input[0]]
    assert data.shape == (VOCAB, HIDDEN * bits // 8)
    check = result.checks["quantized_ort_vs_simulated"]
    assert check["max_abs"] <= RTOL * check["ref_absmax"]


def test_kernel_rows_equal_the_simulated_embedding(model) -> None:
    """One GatherBlockQuantized node on its own: rows equal QuantEmbedding's dequantized weight exactly."""
    qmodel = pq.quantize(model, _recipe(QuantSpec(qtype="uint4", granularity=PerGroup(16), symmetric=False)), progress=False)
    (name, embedding), = quantized_embeddings(qmodel).items()
    table = embedding.weight.detach().numpy()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["rows"], name="gather")], "g",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
        [onnx.helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    proto, rewrites = insert_gather_block_quantized(proto, {name: LayerNode(name, 0, "Gather", "table", "rows")}, {name: embedding})
    assert [r.form for r in rewrites] == ["gather_block_quantized"] and len(proto.graph.initializer) == 3
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, 127, 7, 64], np.int64)
    assert np.array_equal(session.run(None, {"ids": ids})[0], table[ids])


def test_embedding_without_a_block_form_is_reported_and_strict_refuses(model, tmp_path: Path) -> None:
    spec = QuantSpec(qtype="int8", granularity=PerChannel(1))  # one scale per column: blocks run along rows
    qmodel = pq.quantize(model, _recipe(spec), progress=False)
    why = gather_refusal(qmodel.model.embed_tokens)
    assert why == "per-channel scales along axis 1; GatherBlockQuantized takes one scale per row and block"
    with pytest.raises(ExportError, match=r"export \(strict\): 1 weight-only module\(s\) have no MatMulNBits/GatherBlockQuantized form: .*model.embed_tokens"):
        pq.export(qmodel, tmp_path / "strict", example_inputs=PROMPT, strict=True)
    result = pq.export(qmodel, tmp_path / "lenient", example_inputs=PROMPT)
    row = next(l for l in result.layers if l.module == "model.embed_tokens")
    assert (row.form, row.kernel, row.integer) == ("float", "Gather", False)
    assert row.note == f"kept float: {why}"


def test_refusals_name_the_reason(model) -> None:
    config = model.config
    config = type(config)(**{**config.to_dict(), "hidden_size": 72, "head_dim": 18})
    qmodel = pq.quantize(
        transformers.LlamaForCausalLM(config).eval(),
        _recipe(QuantSpec(qtype="int8", granularity=PerChannel(0))), progress=False,
    )
    assert gather_refusal(qmodel.model.embed_tokens) == (
        "no power-of-two block >= 16 divides both the per_channel length 72 and the embedding dimension 72"
    )
    assert gather_refusal(qmodel.lm_head).startswith("QuantLinear is not an embedding")
