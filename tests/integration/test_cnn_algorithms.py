"""Issue 8 on real CNNs: BN folding, CLE, bias correction and AdaRound on MobileNetV2 (ImageNet
weights, agreement with FP32 on photo crops), and a CNN trained here on digits (true labels),
exported to ONNX Runtime's QLinearConv. Measured values sit beside each threshold; the full
table (1,000 crops, more AdaRound iterations) is `benchmarks/cnn_ptq.py`."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.algorithms import AdaRoundConfig, BiasCorrectionConfig, BNFoldConfig, CLEConfig
from ptqkit.core.qtypes import PerChannel, PerTensor
from ptqkit.core.spec import QuantSpec
from ptqkit.eval.metrics import logits_of, top1_agreement

pytestmark = pytest.mark.integration

INT8_PER_TENSOR = QuantSpec(qtype="int8", granularity=PerTensor(), symmetric=True)
INT8_PER_CHANNEL = QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True)
INT4_PER_CHANNEL = QuantSpec(qtype="int4", granularity=PerChannel(0), symmetric=True)


def _recipe(weights: QuantSpec, *algorithms) -> pq.Recipe:
    base = pq.Recipe.from_preset("w8a8", algorithms=algorithms)
    return replace(base, scheme=replace(base.scheme, weights=weights))


@pytest.fixture(scope="module")
def mnv2_eval(mobilenet_v2, photo_crops_eval):
    crops = photo_crops_eval[:128]
    return crops, logits_of(mobilenet_v2, crops)


def _agreement(model, calib, recipe, mnv2_eval) -> float:
    crops, reference = mnv2_eval
    qmodel = pq.quantize(model, recipe, pq.CalibrationData.from_tensors(calib, batch_size=32), progress=False)
    return top1_agreement(reference, logits_of(qmodel, crops))


def test_mobilenet_v2_per_tensor_cle_and_bias_correction(mobilenet_v2, photo_crops_calib, mnv2_eval, record_property) -> None:
    calib = photo_crops_calib[:32]
    folded = _agreement(mobilenet_v2, calib, _recipe(INT8_PER_TENSOR, BNFoldConfig()), mnv2_eval)
    cle_bc = _agreement(mobilenet_v2, calib, _recipe(INT8_PER_TENSOR, BNFoldConfig(), CLEConfig(), BiasCorrectionConfig()), mnv2_eval)
    per_channel = _agreement(mobilenet_v2, calib, _recipe(INT8_PER_CHANNEL, BNFoldConfig()), mnv2_eval)
    analytic = _agreement(
        mobilenet_v2, calib, _recipe(INT8_PER_TENSOR, BNFoldConfig(), CLEConfig(), BiasCorrectionConfig(mode="analytic")), mnv2_eval
    )
    record_property("mnv2_per_tensor_cle_analytic_bc", analytic)
    record_property("mnv2_per_tensor_folded", folded)
    record_property("mnv2_per_tensor_cle_bc", cle_bc)
    record_property("mnv2_per_channel", per_channel)
    assert cle_bc > folded + 0.03, (folded, cle_bc)  # measured 0.859 -> 0.945 on 128 crops, 32 calibration crops
    # the target is "within 2 points" (benchmarks/cnn_ptq.py, 1,000 crops: 0.927 vs 0.925);
    # on 128 crops one crop is 0.8 points, so the floor here has 2 points of slack
    assert cle_bc >= per_channel - 0.04, (cle_bc, per_channel)  # measured 0.945 vs 0.953
    # data-free bias correction from the folded BatchNorms (1,000 crops: 0.942)
    assert analytic > folded + 0.03 and analytic >= per_channel - 0.04, (folded, analytic, per_channel)  # measured 0.945 (128 crops)


def test_mobilenet_v2_w4a8_adaround_beats_nearest(mobilenet_v2, photo_crops_calib, mnv2_eval, record_property) -> None:
    calib = photo_crops_calib[:32]
    nearest = _agreement(mobilenet_v2, calib, _recipe(INT4_PER_CHANNEL, BNFoldConfig()), mnv2_eval)
    ada = _agreement(mobilenet_v2, calib, _recipe(INT4_PER_CHANNEL, BNFoldConfig(), AdaRoundConfig(iterations=40)), mnv2_eval)
    record_property("mnv2_w4a8_nearest", nearest)
    record_property("mnv2_w4a8_adaround", ada)
    assert ada >= nearest + 0.15, (nearest, ada)  # the target; measured 0.063 -> 0.852 (40 iterations)


@pytest.fixture(scope="module")
def digits_cnn():
    from ptqkit.models.digits_cnn import train_digits_cnn

    return train_digits_cnn()


def test_digits_cnn_true_labels_and_qlinearconv_in_onnx_runtime(digits_cnn, digits_data, tmp_path: Path, record_property) -> None:
    from ptqkit.export.ort_check import make_session
    from ptqkit.models.digits_cnn import accuracy

    (x_train, _), (x_test, y_test) = digits_data["train"], digits_data["test"]
    assert digits_cnn.test_accuracy > 0.95  # measured 0.9756 (20 epochs, 3 s)
    calib = pq.CalibrationData.from_tensors(x_train[:256], batch_size=64)
    w8a8 = pq.quantize(digits_cnn.model, _recipe(INT8_PER_CHANNEL, BNFoldConfig()), calib, progress=False)
    w4a8 = pq.quantize(digits_cnn.model, _recipe(INT4_PER_CHANNEL, BNFoldConfig()), calib, progress=False)
    w4a8_ada = pq.quantize(
        digits_cnn.model, _recipe(INT4_PER_CHANNEL, BNFoldConfig(), AdaRoundConfig(iterations=200)), calib, progress=False
    )
    acc = {name: accuracy(m, x_test, y_test) for name, m in (("w8a8", w8a8), ("w4a8", w4a8), ("w4a8_adaround", w4a8_ada))}
    for name, value in acc.items():
        record_property(f"digits_{name}", value)
    assert acc["w8a8"] >= digits_cnn.test_accuracy - 0.01, acc  # measured 0.9756, equal to FP32
    assert acc["w4a8_adaround"] >= acc["w4a8"] + 0.02, acc  # measured 0.9311 -> 0.9756

    result = pq.export(w8a8, tmp_path / "digits", formats=["onnx"], example_inputs=(x_test[:32],))
    kernels = {layer.module: layer.kernel for layer in result.layers}
    assert kernels["stem.0"] == kernels["block.0"] == kernels["block.3"] == "QLinearConv", kernels
    session = make_session(result.files["onnx"], threads=1)
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x_test.numpy()})[0])
    ort_accuracy = float((logits.argmax(-1) == y_test).float().mean())
    record_property("digits_w8a8_ort", ort_accuracy)
    # at most one of the 450 test images flips (1/450 = 0.0022; the 0.002 is below one image):
    # measured equal (0.9756) on AVX2; on AVX-512 VNNI, where training gave another model, 0.9622 vs 0.9644
    assert abs(ort_accuracy - acc["w8a8"]) <= 1.0 / len(y_test) + 1e-6, (ort_accuracy, acc["w8a8"])
