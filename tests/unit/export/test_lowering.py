"""The lowering protocol routes each quantized module to the one lowering that takes it, and says
why it refuses one (the module then stays float)."""
from __future__ import annotations

import torch
from torch import nn

import ptqkit as pq
from ptqkit.export.lowering import LOWERINGS, LoweringOptions, lowering_of
from ptqkit.export.onnx_nbits import NBitsOptions

OPTIONS = LoweringOptions(NBitsOptions(), uint8_weights=False)


def _quantized(recipe: pq.Recipe) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 32)).eval()
    return pq.quantize(model, pq.Recipe.from_dict({**recipe.to_dict(), "targets": ["Linear", "Embedding"]}), progress=False)


def test_forms_are_unique_and_ordered() -> None:
    assert [lowering.form for lowering in LOWERINGS] == ["matmul_nbits", "qdq", "gather_block_quantized"]


def test_each_module_is_routed_to_its_lowering() -> None:
    int4 = _quantized(pq.Recipe.from_preset("w4a16", group_size=16))
    assert lowering_of(int4[1], OPTIONS).form == "matmul_nbits" and lowering_of(int4[1], OPTIONS).refusal(int4[1]) is None
    assert lowering_of(int4[0], OPTIONS).form == "gather_block_quantized"
    int8 = _quantized(pq.Recipe.from_preset("w8a8_dynamic"))
    assert lowering_of(int8[1], OPTIONS).form == "qdq"
    assert lowering_of(nn.Linear(2, 2), OPTIONS) is None


def test_a_refused_module_says_why() -> None:
    nf4 = _quantized(pq.Recipe.from_dict({**pq.Recipe.from_preset("w4a16", group_size=16).to_dict(), "scheme": {
        "weights": {"qtype": "nf4", "granularity": {"kind": "per_group", "size": 16, "axis": -1}}, "inputs": None}}))
    lowering = lowering_of(nf4[1], OPTIONS)
    assert lowering.form == "matmul_nbits" and "nf4" in lowering.refusal(nf4[1])
