"""MatMulNBits export of weight-only low-bit Linear layers: packing, ORT vs simulated, kernels, errors.

The reference for the layout is ONNX Runtime's own kernel: a one-node graph rewritten by
`insert_matmul_nbits` must give the simulated QuantLinear's output. Tolerance: max |ORT - ptqkit|
<= 1e-5 x max |output| at accuracy_level 0 (measured <= 2e-6: both dequantize the same codes and
scales in float32 and differ only in summation order).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ExportError
from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Recipe, Scheme
from ptqkit.export import NBitsOptions, export
from ptqkit.export.onnx_graph import LayerNode
from ptqkit.export.onnx_nbits import (
    insert_matmul_nbits,
    nbits_layout,
    nbits_refusal,
    nbits_tensors,
    routes_to_nbits,
)
from ptqkit.nn.modules import QuantLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RTOL = 1e-5  # x max |output|; measured <= 2e-6


def _recipe(qtype: str, granularity, symmetric: bool = True) -> Recipe:
    return Recipe(scheme=Scheme(weights=QuantSpec(qtype=qtype, granularity=granularity, symmetric=symmetric)))


def _quant_linear(k: int, n: int, recipe: Recipe, bias: bool = True, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.2, 3.0, k)).add_(0.05)  # uneven, off-centre ranges: zero points differ
    qmodel = pq.quantize(nn.Sequential(linear), recipe, progress=False)
    module = qmodel[0]
    assert isinstance(module, QuantLinear)
    return module


def _one_node_graph(module: QuantLinear, op: str) -> tuple[object, LayerNode]:
    """The float graph the exporter would see: MatMul(x, Wᵀ) [+ Add(bias)], or Gemm(x, W, b, transB=1)."""
    w = module.weight.detach().numpy()  # [N, K]
    k, n = module.in_features, module.out_features
    inits, nodes = [], []
    if op == "MatMul":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "w_t"))  # [K, N]
        out = "mm" if module.bias is not None else "y"
        nodes.append(helper.make_node("MatMul", ["x", "w_t"], [out], name="matmul"))
        if module.bias is not None:
            inits.append(numpy_helper.from_array(module.bias.detach().numpy(), "b"))
            nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="add"))
        x_shape, y_shape, layout = ["batch", "seq", k], ["batch", "seq", n], "in_out"
    else:
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(module.bias.detach().numpy(), "b")]
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1))
        x_shape, y_shape, layout = ["rows", k], ["rows", n], "out_in"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return proto, LayerNode("fc", 0, op, inits[0].name, layout)


def _run(proto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _rewrite(module: QuantLinear, op: str = "MatMul", accuracy_level: int = 0):
    proto, ln = _one_node_graph(module, op)
    proto, rewrites = insert_matmul_nbits(proto, {"fc": ln}, {"fc": module}, NBitsOptions(accuracy_level=accuracy_level))
    onnx.checker.check_model(proto)
    return proto, rewrites


CASES = [
    # qtype, granularity, symmetric, K, expected (bits, block_size, zero points written)
    ("int4", PerGroup(64), True, 256, (4, 64, False)),
    ("int4", PerGroup(64), False, 256, (4, 64, True)),
    ("int4", PerGroup(128), True, 576, (4, 128, False)),  # SmolLM2's K: 4 x 128 + 64 (ragged)
    ("int4", PerGroup(128), False, 576, (4, 128, True)),
    ("int4", PerGroup(64), False, 200, (4, 64, True)),  # 3 x 64 + 8
    ("uint4", PerGroup(32), False, 100, (4, 32, True)),
    ("uint4", PerGroup(32), True, 96, (4, 32, False)),  # symmetric uint4: zero point 8 = ORT's default
    ("int4", PerGroup(96), False, 192, (4, 32, True)),  # group 96 = 3 blocks of 32
    ("int4", PerChannel(0), True, 576, (4, 128, False)),
    ("int4", PerChannel(0), False, 80, (4, 128, True)),
    ("int4", PerTensor(), False, 64, (4, 128, True)),
    ("int3", PerGroup(64), True, 128, (4, 64, False)),  # 4-bit container
    ("int2", PerGroup(32), False, 96, (2, 32, True)),
    ("int2", PerGroup(16), True, 48, (2, 16, False)),
    ("int8", PerGroup(128), False, 320, (8, 128, True)),
    ("int6", PerChannel(0), True, 64, (8, 128, False)),  # 8-bit container
]


@pytest.mark.parametrize(("qtype", "granularity", "symmetric", "k", "expected"), CASES, ids=lambda v: str(v))
def test_matmul_nbits_equals_simulated_quantlinear(qtype, granularity, symmetric, k, expected) -> None:
    module = _quant_linear(k, 48, _recipe(qtype, granularity, symmetric))
    assert routes_to_nbits(module, NBitsOptions()) and nbits_refusal(module) is None
    proto, rewrites = _rewrite(module)
    (node,) = proto.graph.node  # the bias Add was folded into the node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, block, has_zp = expected
    assert (node.op_type, node.domain) == ("MatMulNBits", "com.microsoft")
    assert attrs == {"K": k, "N": 48, "bits": bits, "block_size": block}
    assert (len(node.input) > 3 and node.input[3] != "") == has_zp
    assert node.input[-1] == "b" and rewrites[0].weight_initializer == node.input[1]
    assert {i.name for i in proto.graph.initializer} >= {node.input[1], "b"} and "w_t" not in {i.name for i in proto.graph.initializer}
    for shape in ((2, 7, k), (1, 1, k)):  # prefill-like and one decode token
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
        with torch.inference_mode():
            ref = module(x).numpy()
        got = _run(proto, x.numpy())
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()


def test_gemm_with_bias_becomes_matmul_nbits() -> None:
    module = _quant_linear(576, 32, _recipe("int4", PerGroup(128), False))
    proto, _ = _rewrite(module, op="Gemm")
    (node,) = proto.graph.node
    assert node.op_type == "MatMulNBits" and node.input[-1] == "b"
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = module(x).numpy()
    assert np.abs(_run(proto, x.numpy()) - ref).max() <= RTOL * np.abs(ref).max()


def test_packing_by_hand() -> None:
    """int4 symmetric codes -8..7 -> unsigned 0..15, two per byte, low nibble first."""
    module = _quant_linear(32, 16, _recipe("int4", PerGroup(16)), bias=False)
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(16, 2)  # [16, 32]: each row -8..7, -8..7
    module.weight_codes.copy_(codes)
    layout = nbits_layout(module)
    b, scales, zp = nbits_tensors(module, layout)
    assert (layout.bits, layout.block_size, layout.k_blocks, layout.blob_size) == (4, 16, 2, 8)
    expected = np.array([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE], np.uint8)
    assert b.shape == (16, 2, 8) and b.dtype == np.uint8
    assert (b == expected).all()
    assert scales.shape == (16, 2) and np.array_equal(scales, module.weight_scale.numpy())
    assert zp is None  # symmetric: every zero point is 8, MatMulNBits' default


def test_zero_points_and_padding_by_hand() -> None:
    """uint4 asymmetric, K = 40 with groups of 16: 3 blocks, the last one 8 codes + 8 padding codes."""
    module = _quant_linear(40, 16, _recipe("uint4", PerGroup(16), symmetric=False), bias=False)
    module.weight_zero_point.copy_(torch.tensor([1, 2, 3], dtype=module.weight_zero_point.dtype).repeat(16, 1))
    module.weight_codes.fill_(5)
    b, _, zp = nbits_tensors(module, nbits_layout(module))
    assert zp.shape == (16, 2) and (zp == np.array([0x21, 0x03], np.uint8)).all()  # [1, 2 | 3, pad 0]
    assert b.shape == (16, 3, 8)
    assert (b[:, :2] == 0x55).all() and (b[:, 2, :4] == 0x55).all()
    assert (b[:, 2, 4:] == 0x33).all()  # padding: the last block's zero point (weight 0)


def test_accuracy_level_is_an_attribute_and_level_4_is_not_exact() -> None:
    module = _quant_linear(256, 64, _recipe("int4", PerGroup(64)))
    proto, _ = _rewrite(module, accuracy_level=4)
    (node,) = proto.graph.node
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 4
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = module(x).numpy()
    rel = np.abs(_run(proto, x.numpy()) - ref).max() / np.abs(ref).max()
    assert 1e-5 < rel < 0.05  # int8 activations per block: measured ~5e-3


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (_recipe("int4", PerGroup(8)), r"group size 8 has no power-of-two divisor between 16 and 256"),
        (_recipe("int4", PerGroup(40)), r"group size 40 has no power-of-two divisor"),
        (_recipe("nf4", PerGroup(64)), r"weights are nf4; MatMulNBits takes integer codes"),
        (_recipe("fp8_e4m3", PerChannel(0)), r"weights are fp8_e4m3"),
    ],
)
def test_refusals_name_the_reason(recipe: Recipe, match: str) -> None:
    module = _quant_linear(64, 16, recipe)
    assert routes_to_nbits(module, NBitsOptions())
    assert nbits_refusal(module) is not None
    with pytest.raises(ExportError, match=match):
        nbits_layout(module)
    proto, ln = _one_node_graph(module, "MatMul")
    with pytest.raises(ExportError, match=r"MatMulNBits: " + match):
        insert_matmul_nbits(proto, {"fc": ln}, {"fc": module}, NBitsOptions())


def test_routing_int8_stays_qdq_unless_asked() -> None:
    w8 = _quant_linear(64, 16, pq.Recipe.from_preset("w8a16"))
    assert not routes_to_nbits(w8, NBitsOptions())
    assert routes_to_nbits(w8, NBitsOptions(int8=True))
    w8a8 = pq.quantize(nn.Sequential(nn.Linear(64, 16)), pq.Recipe.from_preset("w8a8_dynamic"), progress=False)[0]
    assert not routes_to_nbits(w8a8, NBitsOptions(int8=True))  # inputs quantized: not weight-only
    assert "inputs are quantized too" in nbits_refusal(w8a8)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"accuracy_level": 5}, r"^NBitsOptions\.accuracy_level: 5 must be an integer in \[0, 4\]$"),
    ({"accuracy_level": True}, r"^NBitsOptions\.accuracy_level: True must be an integer in \[0, 4\]$"),
    ({"int8": "yes"}, r"^NBitsOptions\.int8: 'yes' must be true or false$"),
])
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        NBitsOptions(**kwargs)


# ---- export() end to end ------------------------------------------------------------------
class Mlp(nn.Module):
    """A decoder-like block on [B, T, 96]: K = 96 is one group of 64 and a ragged one of 32."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(96, 128)
        self.act = nn.SiLU()
        self.down = nn.Linear(128, 96, bias=False)
        self.head = nn.Linear(96, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down(self.act(self.up(x))))


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval()


def _x(seed: int) -> torch.Tensor:
    return torch.randn(2, 6, 96, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [True, False])
def test_export_w4a16_runs_every_layer_on_matmul_nbits(mlp: nn.Module, symmetric: bool, tmp_path: Path) -> None:
    from ptqkit.export.ort_check import make_session, run_session

    qmodel = pq.quantize(mlp, _recipe("int4", PerGroup(64), symmetric), progress=False)
    result = export(qmodel, tmp_path / "out", example_inputs=(_x(0),), strict=True)
    assert [(l.module, l.form, l.kernel, l.integer) for l in result.layers] == [
        (name, "matmul_nbits", "MatMulNBits", True) for name in ("up", "down", "head")
    ]
    assert "4-bit, block 64; K=96 padded to 128" in result.layers[0].note
    assert result.checks["matmul_nbits"] == {"accuracy_level": 0, "layers": 3, "kept_float": {}}
    assert result.checks["quantized_ort_vs_simulated"]["max_abs"] <= RTOL * result.checks["quantized_ort_vs_simulated"]["ref_absmax"]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 3
    assert not any(n.op_type in ("MatMul", "Gemm") for n in graph.node)
    # fresh inputs with another batch/sequence shape (dynamic axes)
    x = torch.randn(1, 11, 96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = qmodel(x).numpy()
    got = run_session(make_session(tmp_path / "out" / "model.onnx", threads=1), (x,))[0]
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()


def test_export_keeps_unconvertible_layers_float_and_reports_them(mlp: nn.Module, tmp_path: Path) -> None:
    from ptqkit.engine.recipe import Override

    nf4 = Override(match=("down",), scheme=Scheme(weights=QuantSpec(qtype="nf4", granularity=PerGroup(64))))
    recipe = Recipe(scheme=Scheme(weights=QuantSpec(qtype="int4", granularity=PerGroup(32))), overrides=(nf4,))
    qmodel = pq.quantize(mlp, recipe, progress=False)
    result = export(qmodel, tmp_path / "out", example_inputs=(_x(1),))
    by_name = {l.module: l for l in result.layers}
    assert by_name["down"].form == "float" and not by_name["down"].integer
    assert "kept float: weights are nf4" in by_name["down"].note
    assert result.float_layers == ("down",)
    assert by_name["up"].kernel == by_name["head"].kernel == "MatMulNBits"
    assert result.checks["matmul_nbits"]["kept_float"] == {"down": "weights are nf4; MatMulNBits takes integer codes (2..8 bits)"}
    # the float layer holds the dequantized nf4 weight: ORT still equals the simulated model
    assert result.checks["quantized_ort_vs_simulated"]["max_abs"] <= RTOL * result.checks["quantized_ort_vs_simulated"]["ref_absmax"]
    with pytest.raises(ExportError, match=r"export \(strict\): 1 weight-only module\(s\) have no MatMulNBits/GatherBlockQuantized form: \{'down': 'weights are nf4"):
        export(qmodel, tmp_path / "strict", example_inputs=(_x(1),), strict=True)
    assert not (tmp_path / "strict").exists()


def test_export_int8_weight_only_option(mlp: nn.Module, tmp_path: Path) -> None:
    qmodel = pq.quantize(mlp, pq.Recipe.from_preset("w8a16"), progress=False)
    default = export(qmodel, tmp_path / "qdq", example_inputs=(_x(2),))
    assert {l.form for l in default.layers} == {"weight_only"}  # DequantizeLinear + MatMul, as before
    nbits = export(qmodel, tmp_path / "nbits", example_inputs=(_x(2),), matmul_nbits=NBitsOptions(int8=True), strict=True)
    assert {(l.form, l.kernel) for l in nbits.layers} == {("matmul_nbits", "MatMulNBits")}
    assert nbits.checks["quantized_ort_vs_simulated"]["max_abs"] <= RTOL * nbits.checks["quantized_ort_vs_simulated"]["ref_absmax"]


def test_export_rejects_a_bad_matmul_nbits_argument(mlp: nn.Module, tmp_path: Path) -> None:
    qmodel = pq.quantize(mlp, _recipe("int4", PerGroup(64)), progress=False)
    with pytest.raises(ExportError, match=r"^export\.matmul_nbits: \{'accuracy_level': 4\} must be a NBitsOptions$"):
        export(qmodel, tmp_path / "a", example_inputs=(_x(0),), matmul_nbits={"accuracy_level": 4})
    assert not (tmp_path / "a").exists()
