"""Input smoothing: the divisors against their closed form, the quantized layer against a float64
re-implementation, the float function kept by `to_float`, the gain on a model with outlier
channels, the artifact round trip and tampering, typed errors, and the ONNX form (one shared Div
before the QuantizeLinear) against the simulation on ORT's integer kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ptqkit as pq
from ptqkit.algorithms import InputSmoothingConfig
from ptqkit.algorithms.input_smoothing import smoothing_divisors
from ptqkit.core.errors import ArtifactError, ConfigError
from ptqkit.export.load import load_artifact
from ptqkit.nn.act_quant import SmoothedInputQuantizer

from .tiny_transformers import check_bert_artifact_round_trip, outputs, tiny_bert, token_batch
from .wide_column import export_and_check_against_simulation, quantized_two_readers


def _recipe(**options) -> pq.Recipe:
    return pq.Recipe.from_preset("w8a8", algorithms=(InputSmoothingConfig(**options),))


def test_divisors_are_the_closed_form() -> None:
    absmax = torch.tensor([1.0, 2.0, 4.0, 40.0, 0.0])
    floor = 1e-5 * 40.0
    expected = np.array([1.0, 2.0, 4.0, 40.0, floor]) / 2.0  # median of the floored maxima: 2
    for alpha in (0.3, 0.5, 1.0):
        np.testing.assert_allclose(smoothing_divisors(absmax, alpha).numpy(), expected**alpha, rtol=1e-6)
    with pytest.raises(ValueError, match="positive one"):
        smoothing_divisors(torch.zeros(4), 0.5)


def test_smoothed_layer_is_the_float64_reference_and_keeps_the_float_function(bert_case) -> None:
    model, ids, calib = bert_case
    qmodel = pq.quantize(model, _recipe(alpha=0.5), calib, progress=False)
    name = "encoder.layer.0.intermediate.dense"
    layer, original = qmodel.get_submodule(name), model.get_submodule(name)
    quantizer = layer.input_quantizer
    assert isinstance(quantizer, SmoothedInputQuantizer)
    s = quantizer.divisors.double()
    # the weight: W · diag(s), then symmetric int8 per output channel (closed form, in float32 as the
    # quantizer computes it, so that ties round alike): step 2 max|w| / 255, codes in [-128, 127]
    w = original.weight.detach() * quantizer.divisors
    step = 2 * w.abs().amax(1, keepdim=True) / 255
    np.testing.assert_allclose(layer.weight.numpy(), ((w / step).round().clamp(-128, 127) * step).numpy(), rtol=1e-6, atol=1e-9)
    # the input: x / s on the per-tensor uint8 grid
    x = torch.randn(3, 7, 64, dtype=torch.float64) * 2
    scale, zero = float(quantizer.scale), int(quantizer.zero_point)
    expected = ((x / s / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)
    np.testing.assert_allclose(quantizer(x.float()).double().numpy(), expected.numpy(), atol=scale * 1e-3)
    # dequantize_model divides the columns back: the float function of the quantized weights
    assert torch.allclose(layer.to_float().weight.double(), layer.weight.double() / s, rtol=1e-6)
    np.testing.assert_allclose(layer.to_float().weight.detach().numpy(), original.weight.detach().numpy(), atol=float(step.max() / quantizer.divisors.min()))


def test_input_smoothing_beats_plain_w8a8_on_outlier_channels(bert_case) -> None:
    model, ids, calib = bert_case
    plain = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    smoothed = pq.quantize(model, _recipe(alpha=0.5), calib, progress=False)
    reference = outputs(model, ids)
    err_smoothed = float((outputs(smoothed, ids) - reference).norm())
    err_plain = float((outputs(plain, ids) - reference).norm())
    assert err_smoothed < 0.7 * err_plain, (err_smoothed, err_plain)
    report = pq.evaluate(smoothed, model, calib, max_samples=8)
    query = next(l for l in report.layers if l.name == "encoder.layer.0.attention.self.query")
    assert query.weight_sqnr_db > 30  # measured against the float weight, not W · diag(s)


def test_layers_reading_one_tensor_get_the_same_divisors_and_patterns_select(bert_case) -> None:
    model, _, calib = bert_case
    qmodel = pq.quantize(model, _recipe(layers=("re:.*attention\\.self\\.(query|key|value)",)), calib, progress=False)
    smoothed = {n: m.input_quantizer for n, m in qmodel.named_modules() if isinstance(getattr(m, "input_quantizer", None), SmoothedInputQuantizer)}
    assert sorted(smoothed) == sorted(f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value"))
    for i in (0, 1):
        q, k, v = (smoothed[f"encoder.layer.{i}.attention.self.{p}"] for p in ("query", "key", "value"))
        assert torch.equal(q.divisors, k.divisors) and torch.equal(q.divisors, v.divisors) and torch.equal(q.scale, v.scale)
    with pytest.raises(ConfigError, match=r"input_smoothing.layers: pattern '\*.querry' matches no Linear with static inputs"):
        pq.quantize(model, _recipe(layers=("*.querry",)), calib, progress=False)


def test_input_smoothing_round_trips_through_the_artifact(bert_case, tmp_path) -> None:
    model, ids, calib = bert_case
    qmodel = pq.quantize(model, _recipe(alpha=0.7), calib, progress=False)
    tampered = check_bert_artifact_round_trip(qmodel, ids, tmp_path / "q", lambda layer: layer["input_smoothing"].update(divisors=63))
    with pytest.raises(ArtifactError, match=r"layers\['encoder.layer.0.attention.self.query'\].input_smoothing must be \{'divisors': 64\}"):
        load_artifact(tampered, tiny_bert())


def test_input_smoothing_refuses_dynamic_inputs_weight_algorithms_and_bad_alpha() -> None:
    with pytest.raises(ConfigError, match="input_smoothing works on a static activation range"):
        pq.quantize(tiny_bert(), pq.Recipe.from_preset("w8a8_dynamic", algorithms=(InputSmoothingConfig(),)), progress=False)
    recipe = pq.Recipe.from_preset("w8a8", algorithms=(pq.Recipe.from_dict({**_recipe().to_dict(), "algorithms": [{"name": "gptq"}]}).algorithms[0], InputSmoothingConfig()))
    calib = pq.CalibrationData.from_tensors([{"input_ids": row} for row in token_batch(samples=4, length=8)])
    with pytest.raises(ConfigError, match=r"input_smoothing scales the weights' input columns at conversion, after \['GPTQConfig'\]"):
        pq.quantize(tiny_bert(), recipe, calib, progress=False)
    for alpha in (0, 1.5, True):
        with pytest.raises(ConfigError, match="input_smoothing.alpha"):
            InputSmoothingConfig(alpha=alpha)
    parsed = pq.Recipe.from_dict({**_recipe().to_dict(), "algorithms": [{"name": "input_smoothing", "alpha": 0.7, "layers": ["*.query"]}]})
    assert parsed.algorithms == (InputSmoothingConfig(alpha=0.7, layers=("*.query",)),)


def test_input_smoothing_and_outlier_channels_share_a_recipe_on_disjoint_layers(bert_case) -> None:
    from ptqkit.algorithms import OutlierChannelsConfig
    from ptqkit.nn.act_quant import OutlierColumnsQuantizer

    model, ids, calib = bert_case
    both = pq.Recipe.from_preset("w8a8", algorithms=(
        OutlierChannelsConfig(ratio=4.0, layers=("re:.*intermediate\\.dense",)),
        InputSmoothingConfig(layers=("re:.*attention\\.self\\.(query|key|value)",)),
    ))
    qmodel = pq.quantize(model, both, calib, progress=False)
    kinds = {n: type(m.input_quantizer).__name__ for n, m in qmodel.named_modules() if isinstance(getattr(m, "input_quantizer", None), (OutlierColumnsQuantizer, SmoothedInputQuantizer))}
    assert kinds == {
        **{f"encoder.layer.{i}.attention.self.{p}": "SmoothedInputQuantizer" for i in (0, 1) for p in ("query", "key", "value")},
        **{f"encoder.layer.{i}.intermediate.dense": "OutlierColumnsQuantizer" for i in (0, 1)},
    }
    overlapping = pq.Recipe.from_preset("w8a8", algorithms=(OutlierChannelsConfig(ratio=4.0), InputSmoothingConfig()))
    with pytest.raises(ConfigError, match=r"input_smoothing and outlier_channels both apply to \['encoder\.layer\.0\..*give them disjoint"):
        pq.quantize(model, overlapping, calib, progress=False)
    with pytest.raises(ConfigError, match=r"input decompositions \['InputSmoothingConfig', 'InputSmoothingConfig'\] repeat one"):
        pq.quantize(model, pq.Recipe.from_preset("w8a8", algorithms=(InputSmoothingConfig(), InputSmoothingConfig(alpha=0.7))), calib, progress=False)


def test_onnx_form_divides_once_and_matches_the_simulation_on_integer_kernels(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model, qmodel, calib = quantized_two_readers(_recipe(alpha=0.7))
    ops = export_and_check_against_simulation(model, qmodel, calib, tmp_path)
    assert ops.count("Div") == 2 and ops.count("QuantizeLinear") == 2  # query and key share x / s and its codes
