"""The engine end to end on small models, checked against closed forms built from primitives."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqkit as pq
from ptqkit.calibration.data import CalibrationData
from ptqkit.core.errors import CalibrationDataError, ConfigError, UnsupportedModelError
from ptqkit.engine.quantize import dequantize_model, quantize, quantize_
from ptqkit.engine.recipe import CalibrationSettings, Recipe
from ptqkit.nn import QuantConv, QuantLinear


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _data(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) * 3


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_weight_only_matches_closed_form() -> None:
    model = _mlp()
    qmodel = quantize(model, Recipe.from_preset("w8a16", keep_output_head=False))
    assert isinstance(qmodel[0], QuantLinear) and isinstance(qmodel[2], QuantLinear)
    x = _data(5)
    spec = pq.QuantSpec(qtype="int8", granularity=pq.PerChannel(0))
    w0 = pq.fake_quantize(model[0].weight, pq.qparams_from_tensor(model[0].weight, spec))
    w2 = pq.fake_quantize(model[2].weight, pq.qparams_from_tensor(model[2].weight, spec))
    expected = F.linear(F.relu(F.linear(x, w0, model[0].bias)), w2, model[2].bias)
    assert torch.allclose(qmodel(x), expected, atol=1e-6)
    assert qmodel[0].weight_codes.dtype == torch.int8
    assert isinstance(model[0], nn.Linear)  # the original is untouched


def test_static_inputs_use_calibrated_min_max_over_all_batches() -> None:
    model = _mlp()
    data = _data(40)
    recipe = Recipe.from_preset("w8a8")
    qmodel = quantize(model, recipe, CalibrationData.from_tensors(data, batch_size=7), progress=False)
    qp = qmodel[0].input_quantizer.qparams
    expected = pq.qparams_from_range(data.min(), data.max(), pq.UINT8, symmetric=False)
    assert torch.allclose(qp.scale, expected.scale) and torch.equal(qp.zero_point, expected.zero_point)
    hidden = F.relu(model[0](data))
    qp2 = qmodel[2].input_quantizer.qparams
    assert torch.allclose(qp2.scale, pq.qparams_from_range(hidden.min(), hidden.max(), pq.UINT8, symmetric=False).scale, rtol=1e-6)
    info = qmodel.ptqkit_info
    # the recipe's calibration.batch_size (8) decides the batching, not the data's default (7)
    assert info.recipe == recipe and len(info.input_ranges["0"]) == 5
    assert info.calibration["fingerprint"]
    assert _no_hooks(qmodel) and _no_hooks(model)


def test_calibration_sample_limit_comes_from_recipe() -> None:
    model = _mlp()
    data = _data(40)
    recipe = replace(Recipe.from_preset("w8a8"), calibration=CalibrationSettings(samples=10, batch_size=4))
    qmodel = quantize(model, recipe, CalibrationData.from_tensors(data), progress=False)
    qp = qmodel[0].input_quantizer.qparams
    expected = pq.qparams_from_range(data[:10].min(), data[:10].max(), pq.UINT8, symmetric=False)
    assert torch.allclose(qp.scale, expected.scale)
    assert len(qmodel.ptqkit_info.input_ranges["0"]) == 3  # 4 + 4 + 2 samples


def test_dynamic_inputs_are_quantized_per_call() -> None:
    model = _mlp()
    qmodel = quantize(model, Recipe.from_preset("w8a8_dynamic"))
    x = _data(3)
    w0 = qmodel[0].weight
    spec = pq.QuantSpec(qtype="uint8", granularity=pq.PerToken(), symmetric=False, dynamic=True)
    assert qmodel[0].input_quantizer.spec == spec  # the preset: per-token asymmetric uint8
    xq = pq.fake_quantize(x, pq.qparams_from_tensor(x, spec))
    assert not torch.allclose(xq, pq.fake_quantize(x, pq.qparams_from_tensor(x, pq.QuantSpec(qtype="uint8", symmetric=False))))
    assert torch.allclose(qmodel[0](x), F.linear(xq, w0, model[0].bias), atol=1e-6)


def test_conv_model_and_dequantize_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    images = torch.randn(12, 3, 16, 16)
    qmodel = quantize(model, Recipe.from_preset("w8a8"), CalibrationData.from_tensors(images), progress=False)
    assert isinstance(qmodel[0], QuantConv) and qmodel[0].conv_args["stride"] == (2, 2)
    ref = model(images)
    out = qmodel(images)
    assert pq.sqnr_db(ref, out) > 30  # int8 on a random conv net: measured 36 dB
    fp = dequantize_model(qmodel)
    assert isinstance(fp[0], nn.Conv2d) and not hasattr(fp, "ptqkit_info")
    assert torch.equal(fp[0].weight, qmodel[0].weight)


def test_quantize_in_place_and_weight_bytes() -> None:
    model = _mlp()
    same = quantize_(model, Recipe.from_preset("w4a16", keep_output_head=False, group_size=8))
    assert same is model and isinstance(model[0], QuantLinear)
    # 16x32 int4 codes = 256 bytes + 32 rows x 2 groups fp32 scales = 256 bytes
    assert model[0].weight_nbytes() == 16 * 32 // 2 + 32 * 2 * 4


def test_static_recipe_without_calibration_data_suggests_dynamic() -> None:
    with pytest.raises(ConfigError, match=r"no calibration data was given: .*'w8a8_dynamic'"):
        quantize(_mlp(), Recipe.from_preset("w8a8"))


def test_empty_calibration_data() -> None:
    with pytest.raises(CalibrationDataError, match="empty"):
        quantize(_mlp(), Recipe.from_preset("w8a8"), [], progress=False)


def test_nan_activation_names_module_and_batch() -> None:
    model = _mlp()
    data = _data(16)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")  # the second layer's output becomes non-finite...
    model = nn.Sequential(*model, nn.Linear(8, 4)).eval()  # ...and feeds a fourth, quantized layer
    data[9, 0] = 1.0
    with pytest.raises(CalibrationDataError, match=r"NaN/Inf activation at the input of module '3' in calibration batch 0 \(samples 0-7\)"):
        quantize(model, Recipe.from_preset("w8a8"), CalibrationData.from_tensors(data), progress=False)
    assert _no_hooks(model)


def test_batches_that_do_not_fit_show_the_model_error_and_samples() -> None:
    model = _mlp()
    wrong = torch.randn(10, 5)
    with pytest.raises(CalibrationDataError, match=r"calibration batch 0 \(samples 0-7\) does not fit the model: RuntimeError: .*mat1 and mat2"):
        quantize_(model, Recipe.from_preset("w8a8"), CalibrationData.from_tensors(wrong), progress=False)
    assert isinstance(model[0], nn.Linear) and not hasattr(model, "ptqkit_info")  # untouched
    assert _no_hooks(model) and not model.training


def test_quantizing_a_quantized_model_is_refused() -> None:
    qmodel = quantize(_mlp(), Recipe.from_preset("w8a16", keep_output_head=False))
    with pytest.raises(UnsupportedModelError, match=r"already quantized \(2 ptqkit module\(s\)"):
        quantize(qmodel, Recipe.from_preset("w8a16"))
    assert isinstance(quantize(dequantize_model(qmodel), Recipe.from_preset("w8a16", keep_output_head=False))[0], QuantLinear)


def test_model_without_targets() -> None:
    with pytest.raises(UnsupportedModelError, match="nothing to quantize"):
        quantize(nn.Sequential(nn.ReLU()), Recipe.from_preset("w8a16"))
