"""CLE chains captured from one forward with hooks, for models torch.fx cannot trace."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.algorithms.bn_fold import fold_batchnorm_
from ptqkit.algorithms.cle import equalize_
from ptqkit.algorithms.cle_capture import captured_cle_chains
from ptqkit.algorithms.cle_graph import graph_cle_chains
from ptqkit.models.mappings import CLEChain
from ptqkit.models.mobilenet_v2 import MobileNetV2
from ptqkit.stats.graph_pass import trace


class _Untraceable(nn.Module):
    """Control flow on a value (fx cannot trace it), a residual add reading a layer's output
    through plain code, a function between two layers, and a valid chain with eval Dropout and
    an Identity on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act_a, self.b = nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.drop, self.act_b, self.keep, self.c = nn.Dropout(0.2), nn.ReLU6(), nn.Identity(), nn.Conv2d(6, 3, 1)
        self.d, self.act_d, self.e = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1)
        self.f, self.g = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(self.keep(self.act_b(self.drop(self.b(self.act_a(self.a(x)))))))
        if y.sum() > -1e9:  # a value decides: torch.fx cannot trace this
            h = self.act_d(self.d(y))
            y = y + self.e(h) + h.mean()  # h has a functional reader besides e: no link d -> e
        return self.g(F.relu(self.f(y)))  # a function between f and g: no link


def test_captured_chains_equal_the_graph_chains_on_mobilenet_v2() -> None:
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    example = torch.randn(1, 3, 96, 96)
    for fold in (False, True):  # unfolded BNs are reported in the activation slot, as by the graph
        if fold:
            fold_batchnorm_(model)
        graph = graph_cle_chains(model)
        assert len(graph) == 16
        assert captured_cle_chains(model, example) == graph


def test_functional_readers_and_untraceable_code() -> None:
    model = _Untraceable().eval()
    assert trace(model) is None
    chains = captured_cle_chains(model, torch.randn(2, 3, 8, 8))
    assert chains == [CLEChain(layers=("a", "b", "c"), activations=("act_a", "act_b"))]


def test_a_training_dropout_or_a_shared_module_ends_a_link() -> None:
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared, nn.Linear(4, 4))  # ReLU runs twice
    assert captured_cle_chains(model.eval(), torch.randn(3, 4)) == []
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 4))
    assert captured_cle_chains(model.train(), torch.randn(3, 4)) == []  # training Dropout is an op, not a pass-through
    assert captured_cle_chains(model.eval(), torch.randn(3, 4)) == [CLEChain(layers=("0", "3"), activations=("2",))]


def test_equalize_with_an_example_uses_the_capture_and_preserves_the_function() -> None:
    torch.manual_seed(1)
    model = _Untraceable().eval()
    with torch.no_grad():
        model.a.weight.mul_(torch.logspace(-2, 1, 6).view(6, 1, 1, 1))
    x = torch.randn(4, 3, 8, 8) * 2
    with torch.no_grad():
        ref = model(x)
    untouched = copy.deepcopy({k: v for k, v in model.state_dict().items() if k.split(".")[0] in {"d", "e", "f", "g"}})
    results = equalize_(model, example=x[:1])
    assert [r.chain.layers for r in results] == [("a", "b", "c")] and results[0].skipped is None
    with torch.no_grad():
        assert float((model(x) - ref).norm() / ref.norm()) < 1e-5
    for key, value in untouched.items():
        assert torch.equal(model.state_dict()[key], value), key  # layers outside chains keep their weights
