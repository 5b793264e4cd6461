"""Calibrated outlier channels: column choice and grid multiples against brute force, the
quantizer's grids, calibration without the outlier columns, the gain on a model with outlier
channels, the artifact round trip, typed errors, and the ONNX form against the simulation."""
from __future__ import annotations

import pytest
import torch

import ptqkit as pq
from ptqkit.algorithms import OutlierChannelsConfig
from ptqkit.algorithms.outlier_channels import choose_outlier_columns, column_multiples
from ptqkit.core.errors import ArtifactError, ConfigError
from ptqkit.core.spec import QParams
from ptqkit.export.load import load_artifact
from ptqkit.nn.act_quant import InputQuantizer, OutlierColumnsQuantizer

from .tiny_transformers import check_bert_artifact_round_trip, outputs, tiny_bert
from .wide_column import export_and_check_against_simulation, quantized_two_readers


def _recipe(**options) -> pq.Recipe:
    return pq.Recipe.from_preset("w8a8", algorithms=(OutlierChannelsConfig(**options),))


def test_columns_are_those_above_ratio_times_median_largest_first() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        absmax = torch.rand(40, generator=generator) * torch.where(torch.rand(40, generator=generator) < 0.1, 30.0, 1.0)
        ratio, cap = 4.0, 3
        threshold = ratio * float(absmax.median())
        brute = sorted(range(40), key=lambda c: -float(absmax[c]))
        expected = sorted(c for c in brute[:cap] if float(absmax[c]) > threshold)
        assert choose_outlier_columns(absmax, ratio, cap).tolist() == expected
    assert choose_outlier_columns(torch.ones(8), 2.0, 4).numel() == 0


def test_multiples_are_the_smallest_grid_that_spans_the_range() -> None:
    generator = torch.Generator().manual_seed(1)
    scale, qmin, qmax = 0.02, 0, 255
    for zero_point in (0, 9, 128):
        low = -torch.rand(30, generator=generator) * 20 * (zero_point > 0)
        high = torch.rand(30, generator=generator) * 40
        multiples = column_multiples(low, high, scale, zero_point, qmin, qmax)

        def spans(m: int, lo: float, hi: float) -> bool:
            return scale * m * (qmin - zero_point) <= lo + 1e-9 and scale * m * (qmax - zero_point) >= hi - 1e-9

        for m, lo, hi in zip(multiples.tolist(), low.tolist(), high.tolist()):
            assert m >= 1 and spans(m, lo, hi)
            assert m == 1 or not spans(m - 1, lo, hi)  # brute force: the one below does not


def test_quantizer_puts_outlier_columns_on_the_coarser_grid() -> None:
    spec = pq.Recipe.from_preset("w8a8").scheme.inputs
    qparams = QParams(torch.tensor([0.05]), torch.tensor([20], dtype=torch.int32), spec.qtype, spec.granularity)
    quantizer = OutlierColumnsQuantizer(spec, qparams, torch.tensor([2, 5]), torch.tensor([4, 2]))
    x = torch.randn(6, 3, 8) * 3
    x[..., 2] *= 8
    y = quantizer(x)
    regular = InputQuantizer(spec, qparams)(x)
    others = [c for c in range(8) if c not in (2, 5)]
    assert torch.equal(y[..., others], regular[..., others])
    for column, multiple in ((2, 4), (5, 2)):
        step = 0.05 * multiple
        codes = y[..., column] / step + 20
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid of step m·s, same zero point
        inside = (x[..., column] > step * -20) & (x[..., column] < step * 235)
        assert (y[..., column] - x[..., column])[inside].abs().max() <= step / 2 + 1e-6
    with pytest.raises(ValueError, match="multiples >= 1"):
        OutlierColumnsQuantizer(spec, qparams, torch.tensor([1]), torch.tensor([0]))


def test_outlier_channels_calibrate_without_them_and_beat_plain_w8a8(bert_case) -> None:
    model, ids, calib = bert_case
    plain = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    split = pq.quantize(model, _recipe(ratio=4.0), calib, progress=False)
    found = {n: m.input_quantizer for n, m in split.named_modules() if isinstance(getattr(m, "input_quantizer", None), OutlierColumnsQuantizer)}
    assert "encoder.layer.0.attention.self.query" in found
    for name, quantizer in found.items():  # the tensor range no longer holds the outliers
        assert float(quantizer.scale) < float(plain.get_submodule(name).input_quantizer.scale)
        assert bool((quantizer.multiples > 1).any())
    reference = outputs(model, ids)
    err_split = float((outputs(split, ids) - reference).norm())
    err_plain = float((outputs(plain, ids) - reference).norm())
    assert err_split < 0.7 * err_plain, (err_split, err_plain)


def test_outlier_channels_round_trip_through_the_artifact(bert_case, tmp_path) -> None:
    model, ids, calib = bert_case
    split = pq.quantize(model, _recipe(ratio=4.0), calib, progress=False)

    def tamper(layer: dict) -> None:  # disagrees with the tensors
        layer["outlier_columns"]["multiples"][0] += 1

    tampered = check_bert_artifact_round_trip(split, ids, tmp_path / "q", tamper)
    with pytest.raises(ArtifactError, match=r"input_quantizer.columns/multiples disagree"):
        load_artifact(tampered, tiny_bert())


def test_outlier_channels_refuse_dynamic_inputs_and_bad_settings() -> None:
    with pytest.raises(ConfigError, match="outlier_channels works on a static activation range"):
        pq.quantize(tiny_bert(), pq.Recipe.from_preset("w8a8_dynamic", algorithms=(OutlierChannelsConfig(),)), progress=False)
    with pytest.raises(ConfigError, match="outlier_channels.ratio: 1 must be a number above 1"):
        OutlierChannelsConfig(ratio=1)
    with pytest.raises(ConfigError, match="max_columns"):
        OutlierChannelsConfig(max_columns=0)
    recipe = pq.Recipe.from_dict({**_recipe().to_dict(), "algorithms": [{"name": "outlier_channels", "ratio": 6.0, "layers": ["*.query"]}]})
    assert recipe.algorithms == (OutlierChannelsConfig(ratio=6.0, layers=("*.query",)),)


def test_layers_limit_where_outlier_columns_are_looked_for(bert_case) -> None:
    model, _, calib = bert_case
    split = pq.quantize(model, _recipe(ratio=4.0, layers=("re:.*intermediate\\.dense",)), calib, progress=False)
    found = [n for n, m in split.named_modules() if isinstance(getattr(m, "input_quantizer", None), OutlierColumnsQuantizer)]
    assert found == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    with pytest.raises(ConfigError, match=r"outlier_channels.layers: pattern '\*.querry' matches no Linear with static inputs"):
        pq.quantize(model, _recipe(layers=("*.querry",)), calib, progress=False)


def test_onnx_form_matches_the_simulation_on_integer_kernels(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    model, qmodel, calib = quantized_two_readers(_recipe(ratio=4.0))
    assert qmodel.query.input_quantizer.columns.tolist() == [3] and int(qmodel.query.input_quantizer.multiples[0]) > 1
    ops = export_and_check_against_simulation(model, qmodel, calib, tmp_path)
    assert ops.count("Concat") == 1 and ops.count("Gather") == 1  # query and key share the extended codes
