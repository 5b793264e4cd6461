"""`evaluate`: every per-layer and model-wide number against an independent computation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.algorithms import BNFoldConfig, CLEConfig
from ptqkit.algorithms.bn_fold import fold_batchnorm_
from ptqkit.algorithms.cle import equalize_
from ptqkit.core.errors import ConfigError
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.evaluate import evaluate, float_equivalent
from ptqkit.eval.metrics import mean_softmax_kl, top1_agreement, topk_agreement


def _sqnr(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    ref, cand = reference.detach().double(), candidate.detach().double()
    return 10 * math.log10(float(ref.pow(2).sum()) / float((cand - ref).pow(2).sum()))


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 25, 10),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def cnn_case():
    model = _cnn()
    recipe = Recipe.from_preset("w8a8", algorithms=(BNFoldConfig(), CLEConfig()))
    calib = torch.randn(64, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    qmodel = pq.quantize(model, recipe, pq.CalibrationData.from_tensors(calib, batch_size=16), progress=False)
    data = torch.randn(40, 3, 5, 5, generator=torch.Generator().manual_seed(2)) * 1.5
    labels = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(3))
    report = evaluate(qmodel, model, [data[:16], data[16:32], data[32:]], labels=labels)
    return model, qmodel, data, labels, report


def test_float_equivalent_is_the_reference_with_fold_and_cle_replayed(cnn_case) -> None:
    model, qmodel, data, _, _ = cnn_case
    replayed = float_equivalent(model, qmodel.ptqkit_info.recipe)
    by_hand = copy.deepcopy(model)
    fold_batchnorm_(by_hand)
    equalize_(by_hand)
    for name in ("0", "3", "7"):
        torch.testing.assert_close(replayed.get_submodule(name).weight, by_hand.get_submodule(name).weight)
    with torch.no_grad():
        torch.testing.assert_close(replayed(data), model(data), rtol=1e-4, atol=1e-4)  # same function


def test_per_layer_numbers_match_independent_computations(cnn_case) -> None:
    model, qmodel, data, _, report = cnn_case
    equivalent = float_equivalent(model, qmodel.ptqkit_info.recipe)
    layers = {layer.name: layer for layer in report.layers}
    assert list(layers) == ["0", "3", "7"] and report.samples == 40
    for name in layers:
        expected = _sqnr(equivalent.get_submodule(name).weight, qmodel.get_submodule(name).weight)
        assert layers[name].weight_sqnr_db == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():  # layer 0 reads the model input: isolated = the float conv vs the quantized conv on it
        isolated = _sqnr(equivalent[0](data), qmodel[0](data))
        logits_fp, logits_q = equivalent(data), qmodel(data)
    assert layers["0"].output_sqnr_db == pytest.approx(isolated, abs=1e-6)
    assert layers["0"].accumulated_sqnr_db == pytest.approx(isolated, abs=1e-6)  # nothing upstream
    # the output layer; float32 sums in another order: 1.3e-6 dB apart on an Intel Xeon (AMX), 0 on AMD EPYC
    assert layers["7"].accumulated_sqnr_db == pytest.approx(_sqnr(logits_fp, logits_q), abs=1e-5)
    assert layers["7"].accumulated_sqnr_db < layers["7"].output_sqnr_db  # error builds up along the network
    assert layers["0"].input_min == pytest.approx(float(data.min())) and layers["0"].input_max == pytest.approx(float(data.max()))
    per_channel = data.abs().amax(dim=(0, 2, 3))
    assert layers["0"].outlier_ratio == pytest.approx(float(per_channel.max() / per_channel.median()), rel=1e-6)


def test_clip_rate_counts_inputs_beyond_the_calibrated_range(cnn_case) -> None:
    _, qmodel, data, _, report = cnn_case
    quantizer = qmodel[0].input_quantizer.qparams
    scale, zero = float(quantizer.scale), float(quantizer.zero_point)
    low, high = (0 - zero) * scale - scale / 2, (255 - zero) * scale + scale / 2
    expected = float(((data < low) | (data > high)).float().mean())
    layer0 = next(layer for layer in report.layers if layer.name == "0")
    assert expected > 0.01  # evaluation data is 1.5x wider than calibration
    assert layer0.clip_rate == pytest.approx(expected, abs=1e-9)


def test_classifier_metrics_equal_the_metric_functions(cnn_case) -> None:
    model, qmodel, data, labels, report = cnn_case
    with torch.no_grad():
        ref, cand = model(data), qmodel(data)
    metrics = report.metrics
    assert metrics["top1_agreement"] == pytest.approx(top1_agreement(ref, cand))
    assert metrics["top5_agreement"] == pytest.approx(topk_agreement(ref, cand, 5))
    assert metrics["softmax_kl"] == pytest.approx(mean_softmax_kl(ref, cand), rel=1e-6)
    assert metrics["accuracy_float"] == pytest.approx(float((ref.argmax(-1) == labels).float().mean()))
    assert metrics["accuracy_quantized"] == pytest.approx(float((cand.argmax(-1) == labels).float().mean()))
    assert metrics["output_sqnr_db"] == pytest.approx(_sqnr(ref, cand), abs=1e-3)
    assert report.size["quantized_bytes"] < report.size["float_bytes"]
    assert report.worst_layers(1)[0].output_sqnr_db == min(layer.output_sqnr_db for layer in report.layers)
    as_dict = report.to_dict()
    assert as_dict["schema_version"] == 1 and len(as_dict["layers"]) == 3


def test_histograms_of_the_worst_layers_count_every_input(cnn_case) -> None:
    _, qmodel, data, _, report = cnn_case
    assert set(report.histograms) == {layer.name for layer in report.layers}  # 3 layers <= 5 worst
    first = report.histograms["0"]
    assert sum(first["counts"]) == data.numel()  # layer 0 reads the data itself
    expected = torch.histc(data.double(), bins=64, min=first["low"], max=first["high"])
    assert first["counts"] == [int(c) for c in expected]
    scale, zero = float(qmodel[0].input_quantizer.scale), float(qmodel[0].input_quantizer.zero_point)
    assert first["clip"] == pytest.approx([-zero * scale, (255 - zero) * scale])
    assert report.size["bytes_by_dtype"]["int8"] == sum(qmodel.get_submodule(n).weight_codes.numel() for n in ("0", "3", "7"))


def test_outlier_input_channel_shows_in_the_ratio() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(64, 16)
    x[:, 3] *= 100  # one outlier feature
    qmodel = pq.quantize(model, Recipe.from_preset("w8a8_dynamic"), progress=False)
    report = evaluate(qmodel, model, [x[:32], x[32:]])
    first = report.layers[0]
    per_channel = x.abs().amax(0)
    assert first.outlier_ratio == pytest.approx(float(per_channel.max() / per_channel.median()), rel=1e-6)
    assert first.outlier_ratio > 30 and first.clip_rate is None  # dynamic inputs never saturate
    assert report.layers[1].outlier_ratio < 10


def test_needs_a_quantized_model_and_data() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(ConfigError, match="has no ptqkit_info"):
        evaluate(model, model, [torch.randn(2, 4)])
    qmodel = pq.quantize(model, Recipe.from_preset("w8a16"), progress=False)
    with pytest.raises(pq.CalibrationDataError, match="holds no samples"):
        evaluate(qmodel, model, [])
