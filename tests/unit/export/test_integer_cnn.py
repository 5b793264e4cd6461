"""Fully integer CNN graphs in ONNX Runtime (export.integer_cnn, nn.output_quant): every conv on
QLinearConv, residual adds on QLinearAdd, pooling on QLinearGlobalAveragePool, and ORT computing
what the simulated model computes."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.algorithms import BNFoldConfig
from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import PerChannel
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.quantize import dequantize_model
from ptqkit.export.integer_cnn import calibrate_outputs_, float_op_share
from ptqkit.export.ort_check import make_session
from ptqkit.models.mobilenet_v2 import InvertedResidual
from ptqkit.models.resnet import ResNet, recalibrate_batchnorm_
from ptqkit.nn.act_quant import InputQuantizer
from ptqkit.nn.output_quant import output_quantizers, remove_output_quantizer_, set_output_quantizer_

pytest.importorskip("onnxruntime")


def _recipe() -> pq.Recipe:
    base = pq.Recipe.from_preset("w8a8")
    weights = QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True)
    return replace(base, scheme=replace(base.scheme, weights=weights), algorithms=(BNFoldConfig(),))


class _TinyMobile(nn.Module):
    """Stem -> two inverted residual blocks (each with a residual add) -> head conv -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, stride=1, expand_ratio=4), InvertedResidual(8, 8, stride=1, expand_ratio=4))
        self.head = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


def _quantized(model: nn.Module, images: torch.Tensor) -> tuple[nn.Module, pq.CalibrationData]:
    recalibrate_batchnorm_(model, images)
    data = pq.CalibrationData.from_tensors(images, batch_size=16)
    return pq.quantize(model, _recipe(), data, progress=False), data


def _export(qmodel: nn.Module, x: torch.Tensor, tmp_path: Path) -> tuple[dict, list[str], np.ndarray, dict]:
    """(kernel counts, ORT's optimized op types, ORT outputs on x, float op share)."""
    result = pq.export(qmodel, tmp_path / "out", formats=["onnx"], example_inputs=(x[:4],), onnx_weight_dtype="uint8")
    optimized = tmp_path / "optimized.onnx"
    session = make_session(result.files["onnx"], optimized_path=optimized)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    return result.checks["kernels"], ops, out, float_op_share(optimized)


def _agrees(qmodel: nn.Module, x: torch.Tensor, out: np.ndarray) -> None:
    with torch.inference_mode():
        simulated = qmodel(x).numpy()
    assert (out.argmax(1) == simulated.argmax(1)).mean() >= 0.95
    assert np.abs(out - simulated).max() <= 0.1 * np.abs(simulated).max()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_resnet_runs_fully_integer_and_agrees_with_the_simulation(images: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel, data = _quantized(ResNet((1, 1, 1, 1), num_classes=10, width=8), images)
    calibration = calibrate_outputs_(qmodel, data, (images[:4],))
    assert calibration.refused == ()
    # each block: conv2's output (observed) and its sum (a reader's parameters or observed); stem's maxpool; downsample convs
    assert {p.module for p in calibration.points} >= {"maxpool", "layer1.0", "layer1.0.conv2", "layer2.0.downsample.0", "layer4.0"}
    kernels, ops, out, share = _export(qmodel, images, tmp_path)
    assert kernels == {"QLinearConv": 12, "MatMulIntegerToFloat": 1}
    assert ops.count("QLinearAdd") == 4 and "QLinearGlobalAveragePool" in ops
    assert share["float_ops"] == 0, share
    _agrees(qmodel, images, out)


def test_inverted_residuals_and_pooling_run_integer(images: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel, data = _quantized(_TinyMobile(), images)
    calibrate_outputs_(qmodel, data, (images[:4],))
    kernels, ops, out, share = _export(qmodel, images, tmp_path)
    assert kernels == {"QLinearConv": 8, "MatMulIntegerToFloat": 1}
    assert ops.count("QLinearAdd") == 2 and "QLinearGlobalAveragePool" in ops
    assert share["float_ops"] == 0, share
    _agrees(qmodel, images, out)


def test_digits_cnn_runs_integer(tmp_path: Path) -> None:
    from ptqkit.models.corpora import digits
    from ptqkit.models.digits_cnn import DigitsCNN

    torch.manual_seed(0)
    x, _ = digits("train")
    qmodel, data = _quantized(DigitsCNN(), x[:128])
    calibrate_outputs_(qmodel, data, (x[:4],))
    kernels, ops, out, share = _export(qmodel, x[:64], tmp_path)
    assert kernels == {"QLinearConv": 4, "MatMulIntegerToFloat": 1}
    assert "QLinearGlobalAveragePool" in ops and share["float_ops"] == 0, share
    _agrees(qmodel, x[:64], out)


def test_without_output_quantizers_the_export_is_unchanged(images: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel, _ = _quantized(ResNet((1, 1, 1, 1), num_classes=10, width=8), images)
    kernels, ops, _, share = _export(qmodel, images, tmp_path)
    assert kernels.get("ConvInteger", 0) > 0 and "QLinearAdd" not in ops  # convs before adds have no output scale
    assert share["float_ops"] > 0


def test_output_quantizer_hooks_follow_copies_and_leave_the_float_copy(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    qmodel, data = _quantized(ResNet((1, 1, 1, 1), num_classes=10, width=8), images)
    calibrate_outputs_(qmodel, data, (images[:4],))
    found = output_quantizers(qmodel)
    assert "layer1.0" in found and all(isinstance(q, InputQuantizer) for q in found.values())
    twin = copy.deepcopy(qmodel)
    with torch.inference_mode():
        assert torch.equal(twin(images[:8]), qmodel(images[:8]))
        assert output_quantizers(dequantize_model(qmodel)) == {}
        codes = qmodel.layer1[0](qmodel.maxpool(qmodel.relu(qmodel.conv1(images[:2]))))
        step = float(found["layer1.0"].scale)
        assert torch.allclose(codes / step, torch.round(codes / step), atol=1e-3)  # on its grid
    block = nn.ReLU()
    set_output_quantizer_(block, found["layer1.0"])
    remove_output_quantizer_(block)
    assert output_quantizers(block) == {} and not hasattr(block, "output_quantizer")


def test_resnet_names_are_torchvisions_and_bad_shapes_are_refused() -> None:
    keys = set(ResNet((2, 2, 2, 2), width=8).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var", "layer4.1.bn2.weight", "fc.weight", "fc.bias"} <= keys
    with pytest.raises(ConfigError, match="layers"):
        ResNet((2, 2, 2))
    with pytest.raises(ConfigError, match="width"):
        ResNet(width=0)


def _folded_skeleton() -> nn.Module:
    """A ResNet with other weights and the recipe's BatchNorm folding replayed (the artifact's structure)."""
    from ptqkit.algorithms.pipeline import apply_pre_transforms, split_algorithms

    torch.manual_seed(1)
    skeleton = ResNet((1, 1, 1, 1), num_classes=10, width=8).eval()
    apply_pre_transforms(skeleton, split_algorithms(_recipe().algorithms).pre_transforms)
    return skeleton


def test_output_quantizers_are_saved_and_loaded(images: torch.Tensor, tmp_path: Path) -> None:
    """The artifact records each output quantizer (spec and QParams, as JSON and tensors); the
    loaded model quantizes at the same places and computes the same outputs bit for bit."""
    import json

    from ptqkit.core.errors import ArtifactError

    torch.manual_seed(0)
    qmodel, data = _quantized(ResNet((1, 1, 1, 1), num_classes=10, width=8), images)
    plain = tmp_path / "plain"
    pq.save(qmodel, plain)
    assert "outputs" not in json.loads((plain / "quantization.json").read_text())  # unchanged without output quantizers
    calibrate_outputs_(qmodel, data, (images[:4],))
    pq.save(qmodel, tmp_path / "a")
    recorded = json.loads((tmp_path / "a" / "quantization.json").read_text())["outputs"]
    assert [entry["module"] for entry in recorded] == list(output_quantizers(qmodel))
    loaded = pq.load(tmp_path / "a", _folded_skeleton())
    assert list(output_quantizers(loaded)) == list(output_quantizers(qmodel))
    with torch.inference_mode():
        assert torch.equal(loaded(images), qmodel(images))
    tampered = json.loads((tmp_path / "a" / "quantization.json").read_text())
    tampered["outputs"][0]["qparams"]["scale"] = [1.0]
    (tmp_path / "a" / "quantization.json").write_text(json.dumps(tampered))
    with pytest.raises(ArtifactError, match=r"output_quantizer.scale/zero_point disagree with .*outputs\[0\]\.qparams"):
        pq.load(tmp_path / "a", _folded_skeleton())
    set_output_quantizer_(qmodel.get_submodule("fc"), nn.Identity())
    with pytest.raises(ArtifactError, match="module 'fc' has an output quantizer of type Identity"):
        pq.save(qmodel, tmp_path / "b")
