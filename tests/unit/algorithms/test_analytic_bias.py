"""Data-free (analytic) bias correction inside `pq.quantize`: E[x] from the folded BatchNorms,
checked against Monte Carlo references and against the true output mean shift of a network whose
activations follow the BatchNorm model exactly."""
from __future__ import annotations

import copy
import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.algorithms import AdaRoundConfig, BiasCorrectionConfig, BNFoldConfig, CLEConfig
from ptqkit.algorithms.analytic_bias import activation_bounds, input_links
from ptqkit.algorithms.bn_fold import fold_batchnorm, fold_batchnorm_
from ptqkit.algorithms.cle import ChannelClippedReLU, equalize_
from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import PerChannel
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Recipe
from ptqkit.stats.graph_pass import trace

INT4 = QuantSpec(qtype="int4", granularity=PerChannel(0), symmetric=True)
ANALYTIC = BiasCorrectionConfig(mode="analytic")


def _w4a16(*algorithms) -> Recipe:
    base = Recipe.from_preset("w8a16", algorithms=algorithms)
    return replace(base, scheme=replace(base.scheme, weights=INT4))


def _gaussian_net(seed: int = 0) -> nn.Sequential:
    """1x1 conv -> BN -> ReLU6 -> depthwise 3x3 (no padding) -> BN -> ReLU -> 1x1 conv -> BN.

    With x ~ N(0, 1) per pixel, a 1x1 conv's output channel c is N(b_c, |w_c|²); the first BN's
    running statistics are set to exactly that, so its output is N(β, γ²) as the DFQ model
    assumes."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
    )
    with torch.no_grad():
        for conv in (model[0], model[3], model[6]):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.3)
        model[1].running_mean.copy_(model[0].bias)
        model[1].running_var.copy_(model[0].weight.reshape(8, -1).pow(2).sum(1))
        model[1].eps = 1e-12
        for bn in (model[1], model[4], model[7]):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.3)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 1.5 + 1.0)
        model[4].running_var.uniform_(0.5, 2.0, generator=g)
        model[7].running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


@torch.no_grad()
def _folded(model: nn.Sequential, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    conv, bn = model[index], model[index + 1]
    return fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def test_corrected_bias_matches_a_monte_carlo_reference() -> None:
    """conv 3 reads ReLU6(N(β1, γ1²)): its bias gains -ΔW · E[x], E[x] here from a million draws."""
    model = _gaussian_net()
    qmodel = pq.quantize(model, _w4a16(BNFoldConfig(), ANALYTIC), progress=False)
    w3, b3 = _folded(model, 3)
    codes = qmodel[3].weight_codes.to(torch.float64)
    delta = codes * qmodel[3].weight_scale.to(torch.float64).reshape(-1, 1, 1, 1) - w3.to(torch.float64)
    draws = torch.randn(1_000_000, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected_x = (draws * model[1].weight.double().abs() + model[1].bias.double()).clamp(0, 6).mean(0)  # [8]
    reference = b3.double() - delta.sum(dim=(1, 2, 3)) * expected_x  # depthwise: channel c reads channel c
    torch.testing.assert_close(qmodel[3].bias.double(), reference, atol=5e-3, rtol=0)
    assert float((qmodel[3].bias - b3).abs().max()) > 0.05  # the correction is not negligible here
    _, b0 = _folded(model, 0)
    torch.testing.assert_close(qmodel[0].bias, b0)  # reads the model input: no BatchNorm model, unchanged


@pytest.mark.parametrize("with_cle", [False, True])
def test_the_output_mean_shift_of_weight_rounding_is_removed(with_cle: bool) -> None:
    """On data that follows the BN model, the quantized depthwise conv's mean output error shrinks
    (with CLE in the recipe too: the Gaussians are rescaled with the channels)."""
    model = _gaussian_net(seed=1)
    pre = (BNFoldConfig(), CLEConfig()) if with_cle else (BNFoldConfig(),)
    plain = pq.quantize(model, _w4a16(*pre), progress=False)
    corrected = pq.quantize(model, _w4a16(*pre, ANALYTIC), progress=False)
    equivalent = copy.deepcopy(model)  # the float model the quantized ones approximate
    fold_batchnorm_(equivalent)
    if with_cle:
        equalize_(equivalent)
        assert isinstance(corrected[2], ChannelClippedReLU)
    x = torch.randn(4000, 3, 3, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(equivalent(x), model(x), rtol=1e-4, atol=1e-4)
        reference = equivalent[:5](x).mean(dim=(0, 2, 3))  # the float output of conv 3, per channel

        def shift(q: nn.Module) -> float:
            return float((q[:5](x).mean(dim=(0, 2, 3)) - reference).abs().max())

        before, after = shift(plain), shift(corrected)
    # measured: 0.402 -> 0.048 (fold only), 0.710 -> 0.053 (fold + CLE)
    assert before > 0.05 and after < 0.2 * before, (before, after)


def test_scales_record_how_cle_divided_each_output_channel() -> None:
    model = _gaussian_net()
    pq.quantize(model, Recipe.from_preset("w8a16", algorithms=(BNFoldConfig(),)), progress=False)  # copy folded
    folded = pq.dequantize_model(pq.quantize(model, Recipe.from_preset("w8a16", algorithms=(BNFoldConfig(),)), progress=False))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        before = folded[0](x)
        (result,) = equalize_(folded)
        after = folded[0](x)
    assert result.chain.layers == ("0", "3", "6") and len(result.scales) == 2 and result.sweeps > 1
    torch.testing.assert_close(before, after * result.scales[0].float().reshape(1, -1, 1, 1), rtol=1e-5, atol=1e-6)


def test_links_and_bounds() -> None:
    model = _gaussian_net()
    assert input_links(trace(model), model) == {}  # unfolded: BN and activation, two modules between layers
    folded = pq.dequantize_model(pq.quantize(model, Recipe.from_preset("w8a16", algorithms=(BNFoldConfig(),)), progress=False))
    assert input_links(trace(folded), folded) == {"3": ("0", "2"), "6": ("3", "5")}
    assert activation_bounds(nn.ReLU6()) == (0.0, 6.0) and activation_bounds(None)[0] == float("-inf")
    lower, upper = activation_bounds(ChannelClippedReLU(torch.tensor([1.0, 2.0])))
    assert lower == 0.0 and upper.tolist() == [1.0, 2.0]
    assert "SiLU is not a clamp" in activation_bounds(nn.SiLU())


def test_layers_without_a_model_are_logged_and_left_alone(caplog) -> None:
    model = _gaussian_net()
    model[5] = nn.SiLU()
    with caplog.at_level(logging.INFO, logger="ptqkit.algorithms.analytic_bias"):
        qmodel = pq.quantize(model, _w4a16(BNFoldConfig(), ANALYTIC), progress=False)
    assert "leaves 6 unchanged: activation '5': SiLU is not a clamp" in caplog.text
    assert "leaves 0 unchanged: its input is not a layer's output" in caplog.text
    assert "1 of 3 layer(s) corrected" in caplog.text
    torch.testing.assert_close(qmodel[6].bias, _folded(model, 6)[1])


def test_bad_recipes_are_refused() -> None:
    model = _gaussian_net()
    with pytest.raises(ConfigError, match="mode 'analytic' models each layer's input from the BatchNorm folded.*list bn_fold"):
        pq.quantize(model, _w4a16(ANALYTIC))
    with pytest.raises(ConfigError, match="AdaRoundConfig learns from calibration data: use mode 'empirical'"):
        pq.quantize(model, _w4a16(BNFoldConfig(), AdaRoundConfig(), ANALYTIC), torch.randn(4, 3, 5, 5))

    class DataDependent(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if x.sum() > -1e9 else x

    untraceable = DataDependent(*_gaussian_net()).eval()
    before = {k: v.clone() for k, v in untraceable.state_dict().items()}
    with pytest.raises(ConfigError, match="DataDependent does not trace; use bias_correction mode 'empirical'"):
        pq.quantize_(untraceable, _w4a16(BNFoldConfig(), ANALYTIC))
    assert all(torch.equal(v, before[k]) for k, v in untraceable.state_dict().items())  # restored, BNs included
