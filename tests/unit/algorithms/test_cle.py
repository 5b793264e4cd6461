"""Cross-layer equalization: closed-form scales and equal ranges, "nothing changed" on a small
MobileNetV2-layout CNN (ReLU6 kept exact), the DFQ ReLU6→ReLU mode, skipped chains, errors,
and the weight-quantization gain on MobileNetV2 when the model zoo is present."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from ptqkit.algorithms.bn_fold import fold_batchnorm_
from ptqkit.algorithms.cle import (
    ChannelClippedReLU,
    CLEConfig,
    apply_equalization,
    equalization_scales,
    equalize_,
)
from ptqkit.core.errors import ConfigError
from ptqkit.core.primitives import fake_quantize, qparams_from_tensor, sqnr_db
from ptqkit.core.qtypes import INT8
from ptqkit.core.spec import QuantSpec
from ptqkit.models.mappings import CLEChain, resolve_cle_chains


# ---- a torchvision-layout MobileNetV2 in miniature ------------------------------------------
def conv_bn_act(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6()
    )


class InvertedResidual(nn.Module):
    """Same attribute layout as torchvision's block (matched by the mapping table by name)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [conv_bn_act(c_in, hidden, 1)] if expand != 1 else []
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def tiny_mobilenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv_bn_act(3, 8, 3, 2),
        InvertedResidual(8, 8, 1, 1),
        InvertedResidual(8, 12, 2, 4),
        InvertedResidual(12, 12, 1, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # BN statistics that spread the per-channel ranges widely
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g) * torch.logspace(-2, 1, c)[torch.randperm(c, generator=g)])
            m.bias.data.copy_(torch.randn(c, generator=g) + 1.0)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- pure maths ---------------------------------------------------------------------------
def test_scales_closed_form_and_ranges_equalized():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(6, 4, 3, 3, generator=g) * torch.logspace(-2, 1, 6).view(6, 1, 1, 1)
    w2 = torch.randn(5, 6, 1, 1, generator=g)
    s = equalization_scales(w1, w2)
    r1 = w1.abs().amax(dim=(1, 2, 3)).double()
    r2 = w2.abs().amax(dim=(0, 2, 3)).double()
    torch.testing.assert_close(s.double(), torch.sqrt(r1 * r2) / r2, rtol=1e-6, atol=0)
    nw1, _, nw2 = apply_equalization(w1, None, w2, s)
    torch.testing.assert_close(nw1.abs().amax(dim=(1, 2, 3)), nw2.abs().amax(dim=(0, 2, 3)), rtol=1e-5, atol=0)
    torch.testing.assert_close(nw1.abs().amax(dim=(1, 2, 3)).double(), torch.sqrt(r1 * r2), rtol=1e-5, atol=0)


def test_scales_depthwise_and_grouped_second_layer():
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(8, 3, 1, 1, generator=g) * torch.logspace(-1, 1, 8).view(8, 1, 1, 1)
    for groups, w2 in ((8, torch.randn(8, 1, 3, 3, generator=g)), (2, torch.randn(6, 4, 3, 3, generator=g))):
        s = equalization_scales(w1, w2, groups=groups)
        b1 = torch.randn(8, generator=g)
        nw1, nb1, nw2 = apply_equalization(w1, b1, w2, s, groups=groups)
        x = torch.randn(2, 3, 9, 9, generator=g)
        ref = nn.functional.conv2d(torch.relu(nn.functional.conv2d(x, w1, b1)), w2, groups=groups)
        got = nn.functional.conv2d(torch.relu(nn.functional.conv2d(x, nw1, nb1)), nw2, groups=groups)
        assert _rel_err(got, ref) < 1e-5
        # per input channel c of the grouped conv: c // (8/groups) picks the group, c % (8/groups) the column
        per_group = 8 // groups
        r2 = torch.stack([
            nw2[(c // per_group) * (w2.shape[0] // groups):(c // per_group + 1) * (w2.shape[0] // groups), c % per_group].abs().max()
            for c in range(8)
        ])
        torch.testing.assert_close(nw1.abs().amax(dim=(1, 2, 3)), r2, rtol=1e-5, atol=0)


def test_dead_channel_keeps_unit_scale():
    w1 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    w2 = torch.tensor([[4.0, 3.0]])
    torch.testing.assert_close(equalization_scales(w1, w2), torch.tensor([(2.0 * 4.0) ** 0.5 / 4.0, 1.0]))


def test_pure_errors():
    with pytest.raises(ConfigError, match=r"w1 has 6 output channels but w2 \(5, 4\) with groups=1 reads 4"):
        equalization_scales(torch.randn(6, 3), torch.randn(5, 4))
    with pytest.raises(ConfigError, match="groups=3 must be a positive integer dividing w2's 4"):
        equalization_scales(torch.randn(6, 3), torch.randn(4, 2, 1, 1), groups=3)
    with pytest.raises(ConfigError, match=r"scales must be > 0"):
        apply_equalization(torch.randn(2, 3), None, torch.randn(4, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ConfigError, match=r"scales have shape \(3,\), expected \(2,\)"):
        apply_equalization(torch.randn(2, 3), None, torch.randn(4, 2), torch.ones(3))
    with pytest.raises(ConfigError, match="cle.relu6: 'clamp' is unknown; valid: clip, relu"):
        CLEConfig(relu6="clamp")
    with pytest.raises(ConfigError, match="cle.iterations: 0 must be an integer"):
        CLEConfig(iterations=0)
    with pytest.raises(ConfigError, match="at least 2 layers"):
        CLEChain(layers=("a",), activations=())
    with pytest.raises(ConfigError, match="needs 1 activation entries"):
        CLEChain(layers=("a", "b"), activations=())


# ---- module level -------------------------------------------------------------------------
def test_mapping_finds_mobilenet_chains():
    chains = resolve_cle_chains(tiny_mobilenet())
    assert chains == [
        CLEChain(layers=("1.conv.0.0", "1.conv.1"), activations=("1.conv.0.2",)),
        CLEChain(layers=("2.conv.0.0", "2.conv.1.0", "2.conv.2"), activations=("2.conv.0.2", "2.conv.1.2")),
        CLEChain(layers=("3.conv.0.0", "3.conv.1.0", "3.conv.2"), activations=("3.conv.0.2", "3.conv.1.2")),
    ]


def test_equalize_nothing_changed_with_relu6_clip():
    model = tiny_mobilenet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        ref = model(x)
    fold_batchnorm_(model)
    results = equalize_(model, config=CLEConfig(iterations=50, tolerance=1e-6))
    assert len(results) == 3 and all(r.skipped is None and r.sweeps >= 1 for r in results)
    assert isinstance(model[2].conv[0][2], ChannelClippedReLU)
    with torch.no_grad():
        got = model(x)
    assert _rel_err(got, ref) < 1e-5  # measured ~2e-7
    # converged: every pair's ranges are equal after the last sweep (closed form)
    c = model[2].conv
    for l1, l2, groups in ((c[0][0], c[1][0], c[1][0].groups), (c[1][0], c[2], 1)):
        s = equalization_scales(l1.weight, l2.weight, groups=groups)
        torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-4)
    # activations did exceed 6 before scaling somewhere, so the clip bounds matter
    assert any((m.upper != 6.0).any() for m in model.modules() if isinstance(m, ChannelClippedReLU))


def test_equalize_relu_mode_follows_dfq():
    model = tiny_mobilenet()
    fold_batchnorm_(model)
    relu_model = copy.deepcopy(model)
    for m in relu_model[1:4].modules():  # the DFQ reference: ReLU instead of the chains' ReLU6
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(m, name, nn.ReLU())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 3
    equalize_(model, config=CLEConfig(relu6="relu"))
    assert not any(isinstance(m, (nn.ReLU6, ChannelClippedReLU)) for m in model[2].conv.modules())
    with torch.no_grad():
        assert _rel_err(model(x), relu_model(x)) < 1e-5


def test_ineligible_chain_is_skipped_with_reason(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)).eval()
    before = copy.deepcopy(model.state_dict())
    chains = [
        CLEChain(layers=("0", "2"), activations=("1",)),
        CLEChain(layers=("2", "4"), activations=("3",)),
        CLEChain(layers=("0", "4"), activations=(None,)),
        CLEChain(layers=("0", "nope"), activations=(None,)),
    ]
    with caplog.at_level(logging.WARNING, logger="ptqkit.algorithms.cle"):
        results = equalize_(model, chains)
    assert [r.sweeps for r in results] == [0, 0, 0, 0]
    assert "SiLU" in results[0].skipped and "not positively homogeneous" in results[0].skipped
    assert "unfolded BatchNorm" in results[1].skipped
    assert results[2].skipped == "'0' has 4 output channels but '4' reads 2"
    assert results[3].skipped == "module 'nope' does not exist"
    assert "skipping chain 0 -> 2" in caplog.text and "SiLU" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # never silently mis-scaled


def test_equalize_linear_chain_with_relu6():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU6(), nn.Linear(8, 3))
    model[0].weight.data *= torch.logspace(-1, 1.5, 8).view(8, 1)
    x = torch.randn(7, 5, 6) * 4  # [batch, tokens, features]: channels on the last axis
    with torch.no_grad():
        ref = model(x)
    (result,) = equalize_(model, [CLEChain(layers=("0", "2"), activations=("1",))])
    assert result.skipped is None and isinstance(model[1], ChannelClippedReLU)
    with torch.no_grad():
        assert _rel_err(model(x), ref) < 1e-5


def test_equalize_rejects_bad_config():
    with pytest.raises(ConfigError, match="config must be a CLEConfig, got dict"):
        equalize_(nn.Sequential(), [], {"iterations": 3})


# ---- the real model -----------------------------------------------------------------------
_INT8 = QuantSpec(qtype=INT8)  # per-tensor, symmetric


def _channel_sqnr(model: nn.Module) -> float:
    """Mean over every output channel of every conv of the channel's SQNR (dB) under per-tensor
    int8 weight quantization: the per-channel precision that equalization is about."""
    values = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            wq = fake_quantize(m.weight, qparams_from_tensor(m.weight, _INT8))
            values += [sqnr_db(m.weight[c], wq[c]) for c in range(m.weight.shape[0]) if m.weight[c].abs().max() > 0]
    return sum(values) / len(values)


def _layer_sqnr(model: nn.Module) -> float:
    """Mean over conv layers of the per-tensor int8 weight SQNR (dB)."""
    values = [
        sqnr_db(m.weight, fake_quantize(m.weight, qparams_from_tensor(m.weight, _INT8)))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    return sum(values) / len(values)


def _output_sqnr(model: nn.Module, x: torch.Tensor) -> float:
    """SQNR (dB) of the outputs with every conv weight fake-quantized per-tensor int8."""
    quant = copy.deepcopy(model)
    with torch.no_grad():
        for m in quant.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(fake_quantize(m.weight, qparams_from_tensor(m.weight, _INT8)))
        return sqnr_db(model(x), quant(x))


def test_cle_improves_per_channel_weight_precision_on_tiny_model():
    model = tiny_mobilenet()
    fold_batchnorm_(model)
    before = _channel_sqnr(model)
    equalize_(model)
    after = _channel_sqnr(model)
    assert after > before + 8.0, (before, after)  # measured 18.0 -> 30.0 dB


@pytest.mark.integration
def test_cle_mobilenet_v2_nothing_changed_and_sqnr_gain():
    zoo = pytest.importorskip("ptqkit.models.zoo")
    from skimage import data as skdata

    model = zoo.load_mobilenet_v2().eval()
    img = torch.tensor(skdata.astronaut()).permute(2, 0, 1).float() / 255  # [3, 512, 512]
    crops = [img[:, 0:224, 0:224], img[:, 200:424, 150:374], img[:, 100:324, 250:474], img[:, 288:512, 288:512]]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (torch.stack(crops) - mean) / std  # [4, 3, 224, 224]
    with torch.no_grad():
        ref = model(x)
    fold_batchnorm_(model)
    before = (_layer_sqnr(model), _output_sqnr(model, x))
    tables = {link for c in resolve_cle_chains(model) for link in zip(c.layers, c.layers[1:])}
    results = equalize_(model)  # chains from the torch.fx graph
    # 16 chains: one per inverted-residual block (expand -> depthwise -> project), where a
    # block without a residual add joins the next layer's chain (stem + blocks 1-2, block 17 +
    # the 1x1 head); every link of the mapping tables is among them, plus those two joins
    graph = {link for r in results for link in zip(r.chain.layers, r.chain.layers[1:])}
    assert len(results) == 16 and all(r.skipped is None for r in results)
    assert graph - tables == {("features.1.conv.1", "features.2.conv.0.0"), ("features.17.conv.2", "features.18.0")}
    assert tables < graph
    with torch.no_grad():
        assert _rel_err(model(x), ref) < 1e-5  # measured 3.3e-6
    after = (_layer_sqnr(model), _output_sqnr(model, x))
    assert after[0] > before[0] + 2.5, (before, after)  # measured mean layer SQNR 36.96 -> 40.72 dB
    # measured output SQNR 9.36 -> 19.41 dB (20.61 with the mapping tables' chains)
    assert after[1] > before[1] + 8.0, (before, after)
