"""Recipe algorithms the engine runs: bn_fold and cle before calibration, rtn for weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.algorithms import BNFoldConfig, CLEConfig, RTNConfig
from ptqkit.core.errors import CalibrationDataError, ConfigError
from ptqkit.engine.recipe import Recipe


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.2, 3)
            bn.bias.uniform_(-1, 1)
    return model.eval()


def test_bn_fold_and_cle_run_before_calibration() -> None:
    model = _cnn()
    images = torch.randn(16, 3, 12, 12)
    recipe = Recipe.from_preset("w8a8", algorithms=(BNFoldConfig(), CLEConfig()))
    qmodel = pq.quantize(model, recipe, pq.CalibrationData.from_tensors(images), progress=False)
    assert isinstance(qmodel[1], nn.Identity) and isinstance(qmodel[4], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original keeps its BatchNorms
    assert pq.sqnr_db(model(images), qmodel(images)) > 25  # measured 33 dB
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_rtn_mse_clip_search_lowers_weight_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.distributions.StudentT(2.5).sample((32, 64)) * 0.05)
    plain = pq.quantize(model, Recipe.from_preset("w4a16", group_size=16, keep_output_head=False))
    searched = pq.quantize(model, Recipe.from_preset("w4a16", group_size=16, keep_output_head=False, algorithms=(RTNConfig(clip_search="mse"),)))
    err = lambda q: pq.mse(model[0].weight, q[0].weight)  # noqa: E731
    assert err(searched) < 0.9 * err(plain)


def test_unknown_algorithms_and_stage_order_are_refused() -> None:
    from ptqkit.algorithms.pipeline import split_algorithms

    with pytest.raises(
        ConfigError,
        match=r"algorithms\[0\]: ConfigError is not run by the engine yet; runnable: \['AWQConfig', 'AdaRoundConfig', 'BNFoldConfig', "
        r"'BiasCorrectionConfig', 'CLEConfig', 'GPTQConfig', 'InputSmoothingConfig', 'LLMInt8Config', 'OutlierChannelsConfig', 'RTNConfig', 'SmoothQuantConfig'\]",
    ):
        split_algorithms([ConfigError("not a config")])
    with pytest.raises(ConfigError, match=r"algorithms\[1\] \(BNFoldConfig\) is a pre-transform; list it before RTNConfig \(a weight quantizer\)"):
        pq.quantize(_cnn(), Recipe.from_preset("w8a16", algorithms=(RTNConfig(), BNFoldConfig())))


def test_failed_calibration_restores_the_pre_transformed_model() -> None:
    model = _cnn()
    recipe = Recipe.from_preset("w8a8", algorithms=(BNFoldConfig(),))
    with pytest.raises(CalibrationDataError, match="does not fit the model"):
        pq.quantize_(model, recipe, pq.CalibrationData.from_tensors(torch.randn(4, 5, 8, 8)), progress=False)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[0], nn.Conv2d)
