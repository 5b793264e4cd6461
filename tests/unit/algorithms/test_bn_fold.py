"""BatchNorm folding: closed form vs a float64 reference, "nothing changed" on small CNNs (and on
MobileNetV2 when the model zoo is present), pair discovery, error paths."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms.bn_fold import FoldedPair, find_fold_pairs, fold_batchnorm, fold_batchnorm_
from ptqkit.core.errors import ConfigError, NonFiniteError


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.05)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g))
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)


class BasicBlock(nn.Module):
    """ResNet-style block keeping conv/bn pairs as attributes (found through the mapping table)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),  # depthwise
        nn.Sequential(nn.Conv2d(8, 12, 1, groups=4), nn.BatchNorm2d(12, affine=False)),  # grouped, with bias
        BasicBlock(12),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 6),
        nn.BatchNorm1d(6),
    ).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fold_matches_float64_reference_conv_grouped_and_linear():
    g = torch.Generator().manual_seed(1)
    for shape, groups in (((6, 4, 3, 3), 1), ((6, 1, 3, 3), 6), ((6, 2, 1, 1), 2), ((6, 5), 1)):
        w = torch.randn(*shape, generator=g)
        b = torch.randn(6, generator=g)
        mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
        gamma, beta = torch.randn(6, generator=g), torch.randn(6, generator=g)
        wf, bf = fold_batchnorm(w, b, mean, var, gamma, beta, 1e-5)
        # float64 reference: apply layer then BN to inputs, compare with the folded layer.
        if len(shape) == 2:
            x = torch.randn(4, 5, generator=g).double()
            ref = nn.functional.linear(x, w.double(), b.double())
            got = nn.functional.linear(x, wf.double(), bf.double())
        else:
            x = torch.randn(4, shape[1] * groups, 7, 7, generator=g).double()
            ref = nn.functional.conv2d(x, w.double(), b.double(), groups=groups)
            got = nn.functional.conv2d(x, wf.double(), bf.double(), groups=groups)
        view = (1, -1) + (1,) * (ref.ndim - 2)
        ref = (ref - mean.double().view(view)) / torch.sqrt(var.double().view(view) + 1e-5)
        ref = ref * gamma.double().view(view) + beta.double().view(view)
        assert _rel_err(got, ref) < 1e-6, (shape, groups)
        # closed form per channel
        k = gamma.double() / torch.sqrt(var.double() + 1e-5)
        torch.testing.assert_close(bf.double(), k * (b.double() - mean.double()) + beta.double(), rtol=1e-6, atol=1e-6)


def test_fold_without_bias_or_affine():
    w = torch.ones(2, 3)
    wf, bf = fold_batchnorm(w, None, torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), None, None, 1.0)
    torch.testing.assert_close(wf, torch.tensor([[0.5] * 3, [1.0] * 3]))
    torch.testing.assert_close(bf, torch.tensor([-0.5, 2.0]))


def test_fold_model_nothing_changed_and_pairs_found():
    torch.manual_seed(0)
    model = small_cnn()
    _randomize_bn(model)
    ref_model = copy.deepcopy(model)
    x = torch.randn(5, 3, 16, 16)
    pairs = find_fold_pairs(model)
    assert pairs == [  # Sequential pairs in named_modules order (root first), then table pairs
        FoldedPair(layer="6", bn="7"),
        FoldedPair(layer="0.0", bn="0.1"),
        FoldedPair(layer="1.0", bn="1.1"),
        FoldedPair(layer="2.0", bn="2.1"),
        FoldedPair(layer="3.conv1", bn="3.bn1"),  # from the mapping table (BasicBlock row)
        FoldedPair(layer="3.conv2", bn="3.bn2"),
    ]
    folded = fold_batchnorm_(model)
    assert folded == pairs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model[0][1], nn.Identity) and isinstance(model[3].bn1, nn.Identity)
    with torch.no_grad():
        ref, got = ref_model(x), model(x)
    assert _rel_err(got, ref) < 1e-5  # measured ~1e-7
    assert find_fold_pairs(model) == []  # nothing left; folding twice is a no-op
    assert fold_batchnorm_(model) == []


def test_fold_errors():
    w = torch.randn(4, 3)
    ok = dict(bn_mean=torch.zeros(4), bn_var=torch.ones(4), bn_gamma=None, bn_beta=None, eps=1e-5)
    with pytest.raises(ConfigError, match=r"bn_var has shape \(3,\), expected \(4,\)"):
        fold_batchnorm(w, None, **{**ok, "bn_var": torch.ones(3)})
    with pytest.raises(ConfigError, match="bn_var must be >= 0"):
        fold_batchnorm(w, None, **{**ok, "bn_var": -torch.ones(4)})
    with pytest.raises(ConfigError, match="eps must be a number >= 0, got -1"):
        fold_batchnorm(w, None, **{**ok, "eps": -1})
    with pytest.raises(ConfigError, match="bn_var has zeros and eps is 0"):
        fold_batchnorm(w, None, **{**ok, "bn_var": torch.zeros(4), "eps": 0.0})
    with pytest.raises(ConfigError, match=r"weight must be a floating tensor .* got \(4,\)"):
        fold_batchnorm(torch.randn(4), None, **ok)
    with pytest.raises(NonFiniteError, match="bn_mean holds 1 NaN"):
        fold_batchnorm(w, None, **{**ok, "bn_mean": torch.tensor([0.0, float("nan"), 0.0, 0.0])})

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"cannot fold '1': it is in training mode .* model.eval\(\)"):
        fold_batchnorm_(model)
    model.eval()
    with pytest.raises(ConfigError, match=r"'1' \(5 features\) into '0' with 4 output channels"):
        fold_batchnorm_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5)).eval(), [FoldedPair(layer="0", bn="1")])
    with pytest.raises(ConfigError, match="it is a ReLU; valid layers: Linear, Conv1d"):
        fold_batchnorm_(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).eval(), [FoldedPair(layer="0", bn="1")])
    with pytest.raises(ConfigError, match="no running statistics"):
        fold_batchnorm_(
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval(),
            [FoldedPair(layer="0", bn="1")],
        )
    with pytest.raises(ConfigError, match=r"BatchNorm\(s\) \['1'\] more than once"):
        fold_batchnorm_(model, [FoldedPair(layer="0", bn="1"), FoldedPair(layer="0", bn="1")])
    with pytest.raises(ConfigError, match="fold pair .*'missing'"):
        fold_batchnorm_(model, [FoldedPair(layer="0", bn="missing")])


@pytest.mark.integration
def test_fold_mobilenet_v2_nothing_changed():
    zoo = pytest.importorskip("ptqkit.models.zoo")
    model = zoo.load_mobilenet_v2().eval()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    folded = fold_batchnorm_(model)
    assert len(folded) == 52  # every Conv2d of torchvision's MobileNetV2 has a BN after it
    with torch.no_grad():
        ref, got = ref_model(x), model(x)
    assert _rel_err(got, ref) < 1e-5
