"""The float ONNX graph: GELU written in the order ONNX Runtime fuses, with the same bits; the
bias Add a fused kernel can take in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ptqkit.export.onnx_graph import (  # noqa: E402
    bias_add_after,
    consumer_indices,
    export_float_onnx,
    gelu_in_fusable_order_,
    initializer_map,
)
from ptqkit.export.ort_check import make_session, run_session  # noqa: E402


class Mlp(nn.Module):
    """Linear -> erf GELU -> Linear, twice (the FFN of a BERT layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class NotGelu(nn.Module):
    """x * (0.5 * (1 + erf(x / 2))): the exporter's GELU shape with a different divisor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (0.5 * (1 + torch.erf(x / 2.0)))


def _op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_exported_gelu_fuses_in_onnx_runtime_and_keeps_the_bits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(3, 5, 16) * 3
    export_float_onnx(model, x, tmp_path / "mlp.onnx")
    assert _op_types(tmp_path / "mlp.onnx").count("Erf") == 2  # still plain ONNX ops in the file
    make_session(tmp_path / "mlp.onnx", optimized_path=tmp_path / "opt.onnx")
    optimized = _op_types(tmp_path / "opt.onnx")
    assert "Erf" not in optimized, optimized  # ORT fused both GELUs
    assert optimized.count("Gelu") + optimized.count("BiasGelu") == 2, optimized

    # the reorder itself is exact: the raw exporter graph and the reordered one give the same bits
    from onnx.reference import ReferenceEvaluator

    with torch.no_grad():
        raw = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False).model_proto
    reordered = onnx.ModelProto()
    reordered.CopyFrom(raw)
    assert gelu_in_fusable_order_(reordered.graph) == 2
    feeds = {raw.graph.input[0].name: x.numpy()}
    onnx.save(raw, str(tmp_path / "raw.onnx"))
    make_session(tmp_path / "raw.onnx", optimized_path=tmp_path / "raw_opt.onnx")
    assert _op_types(tmp_path / "raw_opt.onnx").count("Erf") == 2  # without the reorder ORT leaves GELU unfused
    assert np.array_equal(ReferenceEvaluator(raw).run(None, feeds)[0], ReferenceEvaluator(reordered).run(None, feeds)[0])
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_session(make_session(tmp_path / "mlp.onnx"), x)[0]
    assert np.abs(got - expected).max() < 1e-5  # measured 1e-6 (ORT's fused Gelu vs torch)


def test_other_erf_patterns_are_left_alone(tmp_path: Path) -> None:
    proto = export_float_onnx(NotGelu().eval(), torch.randn(4, 8), tmp_path / "not_gelu.onnx")
    assert gelu_in_fusable_order_(proto.graph) == 0
    make_session(tmp_path / "not_gelu.onnx", optimized_path=tmp_path / "opt.onnx")
    assert "Erf" in _op_types(tmp_path / "opt.onnx")


def _matmul_then_add(bias_shape: tuple[int, ...], *, matmul_is_output: bool = False, second_reader: bool = False) -> object:
    """x [2, 4] -> MatMul(W [4, 3]) -> Add(bias) -> y, with variations the bias search must refuse."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if matmul_is_output:
        outputs.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, None))
    if second_reader:
        nodes.append(helper.make_node("Relu", ["mm"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    inits = [numpy_helper.from_array(np.ones((4, 3), np.float32), "W"), numpy_helper.from_array(np.ones(bias_shape, np.float32), "b")]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])], outputs, inits)


@pytest.mark.parametrize(
    ("bias_shape", "variation", "expected"),
    [
        ((3,), {}, (1, "b")),
        ((1, 3), {}, None),  # not a 1-D bias
        ((3,), {"matmul_is_output": True}, None),  # folding the Add would remove a graph output
        ((3,), {"second_reader": True}, None),  # another node reads the MatMul's output
    ],
)
def test_bias_add_after_finds_only_a_foldable_bias(bias_shape: tuple[int, ...], variation: dict, expected: object) -> None:
    graph = _matmul_then_add(bias_shape, **variation)
    assert bias_add_after(graph, graph.node[0], consumer_indices(graph), initializer_map(graph)) == expected
