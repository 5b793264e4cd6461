"""ptqkit's quantize/dequantize against independent implementations, bit-exact:
PyTorch's fake-quant ops, ONNX Runtime's QuantizeLinear/DequantizeLinear, torch's float8 casts.

ptqkit divides by the scale, as the ONNX QuantizeLinear definition does. PyTorch's fake-quant
kernels multiply by 1/scale instead, which moves an exact tie (x / scale = k + 0.5, e.g. the
channel maximum under full-range symmetric scaling, absmax / 127.5) by one ulp and so by one
code. Against PyTorch the integer codes are therefore compared bit-exactly everywhere except
at ties (within 4 ulps of k + 0.5), which are counted and bounded; against ONNX Runtime they are bit-exact.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ptqkit as pq


def _assert_codes_equal_except_exact_ties(x: torch.Tensor, scale: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    ratio = x / scale
    ulps = 4 * torch.finfo(torch.float32).eps * ratio.abs().clamp_min(1.0)
    exact_tie = (ratio - torch.floor(ratio) - 0.5).abs() <= ulps  # a tie, up to reciprocal rounding
    mismatch = ours != theirs
    assert not (mismatch & ~exact_tie).any(), "codes differ away from exact ties"
    assert ((ours - theirs).abs() <= 1).all()
    assert mismatch.sum() <= max(2, x.numel() // 500)


def _activations(seed: int, shape: tuple[int, ...] = (64, 96)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.3
    x[0, :4] = torch.tensor([9.0, -7.5, 0.0, 3.25])  # outliers and an exact zero
    return x


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("qtype", "symmetric"), [(pq.INT8, True), (pq.UINT8, False), (pq.INT8, False)])
def test_per_tensor_matches_torch_fake_quantize(seed: int, qtype: pq.QType, symmetric: bool) -> None:
    x = _activations(seed)
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype=qtype, symmetric=symmetric))
    ours = pq.fake_quantize(x, qp)
    theirs = torch.fake_quantize_per_tensor_affine(
        x, qp.scale.item(), int(qp.zero_point.item()), int(qtype.qmin), int(qtype.qmax)
    )
    # Same grid points: compare the integer codes they imply.
    codes_theirs = torch.round(theirs / qp.scale) + qp.zero_point
    _assert_codes_equal_except_exact_ties(x, qp.scale, pq.quantize_tensor(x, qp).to(torch.float32), codes_theirs)
    assert torch.allclose(ours, theirs, rtol=0, atol=qp.scale.item() * 1.0001)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("qtype", "symmetric", "axis"), [(pq.INT8, True, 0), (pq.UINT8, False, 1), (pq.INT4, True, 0)])
def test_per_channel_matches_torch_fake_quantize(seed: int, qtype: pq.QType, symmetric: bool, axis: int) -> None:
    w = _activations(seed, (48, 80)) * torch.linspace(0.01, 3.0, 48).unsqueeze(1)  # very different channel ranges
    spec = pq.QuantSpec(qtype=qtype, granularity=pq.PerChannel(axis), symmetric=symmetric)
    qp = pq.qparams_from_tensor(w, spec)
    theirs = torch.fake_quantize_per_channel_affine(
        w, qp.scale, qp.zero_point, axis, int(qtype.qmin), int(qtype.qmax)
    )
    ours = pq.fake_quantize(w, qp)
    view = [1, 1]
    view[axis] = -1
    scale = qp.scale.reshape(view)
    codes_theirs = torch.round(theirs / scale) + qp.zero_point.reshape(view)
    _assert_codes_equal_except_exact_ties(w, scale, pq.quantize_tensor(w, qp).to(torch.float32), codes_theirs)
    assert ((ours - theirs).abs() <= scale * 1.0001).all()


def _run_onnx_qdq(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    attrs = {} if axis is None else {"axis": axis}
    zp_type = TensorProto.INT8 if zero_point.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [
            helper.make_tensor_value_info("q", zp_type, list(x.shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
        ],
        initializer=[numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, y = session.run(None, {"x": x})
    return q, y


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("qtype", "symmetric", "granularity"),
    [
        (pq.INT8, True, pq.PerTensor()),
        (pq.UINT8, False, pq.PerTensor()),
        (pq.INT8, True, pq.PerChannel(0)),
        (pq.UINT8, False, pq.PerChannel(1)),
    ],
)
def test_matches_onnx_runtime_quantize_linear(seed: int, qtype: pq.QType, symmetric: bool, granularity: pq.Granularity) -> None:
    x = _activations(seed, (32, 40)) * torch.linspace(0.1, 2.0, 40)
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype=qtype, granularity=granularity, symmetric=symmetric))
    np_dtype = np.int8 if qtype.signed else np.uint8
    axis = getattr(granularity, "axis", None)
    q_ort, y_ort = _run_onnx_qdq(
        x.numpy(), qp.scale.numpy().astype(np.float32), qp.zero_point.numpy().astype(np_dtype), axis
    )
    q_ours = pq.quantize_tensor(x, qp)
    assert np.array_equal(q_ours.numpy(), q_ort), "integer codes differ from ONNX Runtime"
    assert np.array_equal(pq.dequantize(q_ours, qp).numpy(), y_ort)


def test_onnx_runtime_rounds_ties_to_even_like_default() -> None:
    # The seed example's tie (1.0 / (6/255) = 42.5): ONNX gives 144, as ptqkit's default half_even.
    qp = pq.qparams_from_range(-2.4, 3.6, pq.UINT8, symmetric=False)
    x = torch.tensor([1.0, -2.4, 3.6, 0.0])
    q_ort, _ = _run_onnx_qdq(x.numpy(), qp.scale.numpy(), qp.zero_point.numpy().astype(np.uint8), None)
    assert q_ort.tolist() == [144, 0, 255, 102]
    assert pq.quantize_tensor(x, qp).tolist() == q_ort.tolist()


@pytest.mark.parametrize(("qtype", "dtype"), [(pq.FP8_E4M3, torch.float8_e4m3fn), (pq.FP8_E5M2, torch.float8_e5m2)])
def test_fp8_round_trip_matches_torch_cast_bit_exactly(qtype: pq.QType, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) * 50  # well inside both formats' ranges
    qp = pq.QParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), qtype, pq.PerTensor())
    ours = pq.quantize_tensor(x, qp)
    theirs = x.to(dtype)
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(pq.fake_quantize(x, qp), theirs.to(torch.float32))


def test_fp8_with_scale_matches_scaled_cast() -> None:
    x = torch.linspace(-3.0, 3.0, 999)
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype="fp8_e4m3"))
    assert qp.scale.item() == pytest.approx(3.0 / 448)
    expected = (x / qp.scale).to(torch.float8_e4m3fn).to(torch.float32) * qp.scale
    assert torch.equal(pq.fake_quantize(x, qp), expected)
