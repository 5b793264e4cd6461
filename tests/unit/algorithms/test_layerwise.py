"""The layer-by-layer engine: AdaRound and empirical bias correction inside `pq.quantize`."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.algorithms import (
    AdaRoundConfig,
    BiasCorrectionConfig,
    BNFoldConfig,
    CLEConfig,
    GPTQConfig,
    RTNConfig,
)
from ptqkit.algorithms.cle import ChannelClippedReLU
from ptqkit.algorithms.layerwise import call_order, quantize_layers_
from ptqkit.core.errors import CalibrationDataError, ConfigError
from ptqkit.core.primitives import qparams_from_tensor
from ptqkit.core.qtypes import PerChannel
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Recipe
from ptqkit.nn.modules import QuantConv, QuantLinear

INT4 = QuantSpec(qtype="int4", granularity=PerChannel(0), symmetric=True)


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 10),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 1)
    return model.eval()


def _w4a8(*algorithms) -> Recipe:
    base = Recipe.from_preset("w8a8", algorithms=algorithms)
    from dataclasses import replace

    return replace(base, scheme=replace(base.scheme, weights=INT4))


def _images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_call_order_and_the_activation_each_layer_feeds() -> None:
    model = _cnn()
    model[5] = ChannelClippedReLU(torch.full((16,), 6.0))
    order, activations = call_order(model, ["8", "0", "3", "6"], _images(2))
    assert order == ["0", "3", "6", "8"]
    # conv 0 feeds a BatchNorm, not an activation; conv 3 feeds BN too; nothing reads 6 or 8 directly
    assert activations == {}
    folded = pq.quantize(model, Recipe.from_preset("w8a16", algorithms=(BNFoldConfig(),)))  # BN -> Identity
    float_model = pq.dequantize_model(folded)
    _, activations = call_order(float_model, ["0", "3", "6"], _images(2))
    # a folded BN is an Identity that returns its input itself: the activation reads the conv's output
    assert activations == {"0": float_model[2], "3": float_model[5]}
    bare = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1), ChannelClippedReLU(torch.ones(4)), nn.Conv2d(4, 2, 1))
    _, activations = call_order(bare, ["0", "2", "4"], _images(2))
    assert activations == {"0": bare[1], "2": bare[3]}


def test_first_inputs_stops_at_the_layer() -> None:
    from ptqkit.stats.collect import first_inputs

    model = _cnn()
    calls = []
    model[8].register_forward_pre_hook(lambda m, a: calls.append(1))
    x = _images(10)
    got = first_inputs(model, "3", [x[:4], x[4:]], max_samples=7)
    assert got.shape == (7, 16, 6, 6)
    with torch.no_grad():
        expect = model[:3](x[:7])
    torch.testing.assert_close(got, expect)
    assert calls == []  # the forward never reached the classifier


def test_bias_correction_makes_the_output_mean_shift_zero() -> None:
    """On the calibration data, each corrected layer's output mean equals the float layer's on
    the float model's inputs (the seeds' b_new = b_old + mu_fp - mu_int), per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(256, 32) + 0.5
    reference = [m for m in model]
    with torch.no_grad():
        h_fp = torch.relu(reference[0](x))
        y_fp = model(x)
    targets = {"0": ("Linear", INT4), "2": ("Linear", INT4)}
    results, details = quantize_layers_(
        model, targets, qparams_from_tensor, None, (BiasCorrectionConfig(),),
        lambda: [x[:100], x[100:]], max_samples=256, progress=False,
    )
    assert set(results) == {"0", "2"} and details["0"]["bias_shift_max"] > 0
    with torch.no_grad():
        h_q = torch.relu(model[0](x))
        y_q = model(x)
    # layer 0: same input, so its pre-activation mean matches exactly (float64 sums: tolerance 1e-5)
    torch.testing.assert_close((model[0](x)).mean(0), (h_fp * 0 + reference[0](x)).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(y_q.mean(0), y_fp.mean(0), atol=1e-5, rtol=0)  # layer 2 absorbs upstream shift too
    assert (y_q.mean(0) - y_fp.mean(0)).abs().max() < 1e-5
    assert not torch.equal(h_q, h_fp)  # weights really are int4


def test_bias_correction_reduces_output_error_on_a_cnn() -> None:
    model, x = _cnn(), _images(128)
    plain = pq.quantize(model, _w4a8(BNFoldConfig()), pq.CalibrationData.from_tensors(x), progress=False)
    corrected = pq.quantize(model, _w4a8(BNFoldConfig(), BiasCorrectionConfig()), pq.CalibrationData.from_tensors(x), progress=False)
    held_out = _images(128, seed=7)
    with torch.no_grad():
        ref, err_plain, err_bc = model(held_out), plain(held_out), corrected(held_out)
    bias_plain = (err_plain - ref).mean(0).abs().mean()
    bias_bc = (err_bc - ref).mean(0).abs().mean()
    assert bias_bc < 0.5 * bias_plain, (bias_bc, bias_plain)
    assert pq.sqnr_db(ref, err_bc) > pq.sqnr_db(ref, err_plain)


def test_adaround_in_the_engine_beats_nearest_and_is_deterministic() -> None:
    model, x = _cnn(), _images(128)
    data = pq.CalibrationData.from_tensors(x)
    nearest = pq.quantize(model, _w4a8(BNFoldConfig()), data, progress=False)
    ada = _w4a8(BNFoldConfig(), AdaRoundConfig(iterations=300, batch_size=16))
    first = pq.quantize(model, ada, data, progress=False)
    second = pq.quantize(model, ada, data, progress=False)
    for name in ("0", "3", "6", "8"):
        a, b = first.get_submodule(name), second.get_submodule(name)
        assert isinstance(a, (QuantConv, QuantLinear))
        assert torch.equal(a.weight_codes, b.weight_codes), name
    held_out = _images(128, seed=7)
    with torch.no_grad():
        ref = model(held_out)
        assert pq.sqnr_db(ref, first(held_out)) > pq.sqnr_db(ref, nearest(held_out)) + 1.0
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    assert pq.Recipe.from_dict(ada.to_dict()) == ada


def test_adaround_codes_differ_from_nearest_only_by_one_step() -> None:
    model, x = _cnn(), _images(64)
    data = pq.CalibrationData.from_tensors(x)
    nearest = pq.quantize(model, _w4a8(BNFoldConfig()), data, progress=False)
    ada = pq.quantize(model, _w4a8(BNFoldConfig(), AdaRoundConfig(iterations=100)), data, progress=False)
    for name in ("0", "3", "6", "8"):
        diff = (ada.get_submodule(name).weight_codes.int() - nearest.get_submodule(name).weight_codes.int()).abs()
        assert diff.max() <= 1, name  # rounding up or down from the same grid, never further


def test_stage_order_and_combinations_are_checked() -> None:
    model, data = _cnn(), pq.CalibrationData.from_tensors(_images(8))
    with pytest.raises(ConfigError, match=r"algorithms\[1\] \(AdaRoundConfig\) is a weight quantizer; list it before BiasCorrectionConfig \(a post-correction\)"):
        pq.quantize(model, _w4a8(BiasCorrectionConfig(), AdaRoundConfig()), data)
    with pytest.raises(ConfigError, match=r"algorithms: 2 weight quantizers given; use one"):
        pq.quantize(model, _w4a8(RTNConfig(), AdaRoundConfig()), data)
    with pytest.raises(ConfigError, match=r"\['GPTQConfig'\] run block by block and \['BiasCorrectionConfig'\] layer by layer"):
        pq.quantize(model, _w4a8(GPTQConfig(), BiasCorrectionConfig()), data)
    with pytest.raises(ConfigError, match=r"runs \['AdaRoundConfig'\] from calibration data but no calibration data was given"):
        pq.quantize(model, Recipe.from_preset("w8a16", algorithms=(AdaRoundConfig(),)))


def test_failed_layerwise_run_restores_the_model() -> None:
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationDataError, match="does not fit the model"):
        pq.quantize_(model, _w4a8(BNFoldConfig(), AdaRoundConfig(iterations=5)), pq.CalibrationData.from_tensors(torch.randn(4, 5, 6, 6)), progress=False)
    assert isinstance(model[1], nn.BatchNorm2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layers_never_called_fall_back_with_a_warning(caplog) -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    base = Recipe.from_preset("w8a16", keep_output_head=False, algorithms=(BiasCorrectionConfig(),))
    with caplog.at_level(logging.WARNING, logger="ptqkit.algorithms.layerwise"):
        qmodel = pq.quantize(WithSpare().eval(), base, pq.CalibrationData.from_tensors(torch.randn(16, 4)), progress=False)
    assert "never ran on calibration data" in caplog.text and "spare" in caplog.text
    assert isinstance(qmodel.spare, QuantLinear) and isinstance(qmodel.used, QuantLinear)


def test_cle_then_adaround_reconstructs_through_the_clipped_relu() -> None:
    bare = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = _images(32) * 4
    qmodel = pq.quantize(bare, _w4a8(CLEConfig(), AdaRoundConfig(iterations=20)), pq.CalibrationData.from_tensors(x), progress=False)
    assert isinstance(qmodel[1], ChannelClippedReLU)  # CLE found the chain from the fx graph
    with torch.no_grad():
        assert pq.sqnr_db(bare(x), qmodel(x)) > 10


def test_graph_pass_and_hook_capture_give_the_same_model(monkeypatch) -> None:
    """The lockstep fx pass (two forwards in all) and the hook capture (two per layer, the
    fallback for untraceable models) feed the layers the very same inputs."""
    from ptqkit.algorithms import layerwise

    model, data = _cnn(), pq.CalibrationData.from_tensors(_images(48), batch_size=16)
    recipe = _w4a8(BNFoldConfig(), AdaRoundConfig(iterations=30), BiasCorrectionConfig())
    graph = pq.quantize(model, recipe, data, progress=False)
    monkeypatch.setattr(layerwise, "trace", lambda model: None)
    hooks = pq.quantize(model, recipe, data, progress=False)
    for name in ("0", "3", "6", "8"):
        a, b = graph.get_submodule(name), hooks.get_submodule(name)
        assert torch.equal(a.weight_codes, b.weight_codes), name
        torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=1e-6)
