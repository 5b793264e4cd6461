"""CLE chains discovered from the torch.fx graph, with no architecture table."""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.algorithms.cle import ChannelClippedReLU, equalize_
from ptqkit.algorithms.cle_graph import graph_cle_chains
from ptqkit.models.mappings import CLEChain


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.act = nn.ReLU()
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.b(self.act(self.a(x)))  # residual add: b's output has one reader, the add
        return self.d(F.relu(self.c(y)))  # a function call between c and d: not a module to rescale


def test_links_through_one_activation_and_transparent_modules() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Identity(), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Dropout(0.1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1),
    ).eval()
    assert graph_cle_chains(model) == [
        CLEChain(layers=("0", "3", "6", "7"), activations=("2", "4", None)),
    ]


def test_residual_adds_and_function_calls_end_a_link() -> None:
    assert graph_cle_chains(_Residual()) == [CLEChain(layers=("a", "b"), activations=("act",))]


def test_a_tensor_with_two_readers_is_not_a_link() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b, self.c = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.a(x))
            return self.b(h) + self.c(h)

    assert graph_cle_chains(Fork()) == []


def test_silu_chain_is_found_then_skipped_with_a_logged_reason(caplog) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)).eval()
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="ptqkit.algorithms.cle"):
        results = equalize_(model)
    assert [r.chain.layers for r in results] == [("0", "2", "4")]
    assert "SiLU" in results[0].skipped and "not positively homogeneous" in results[0].skipped
    assert "skipping chain 0 -> 2 -> 4" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # never silently mis-scaled


def test_unfolded_batchnorm_is_reported_in_the_chain() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    (result,) = equalize_(model)
    assert result.chain.activations == ("1",) and "unfolded BatchNorm" in result.skipped


def test_equalization_on_graph_chains_preserves_the_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))  # ranges over three decades
    x = torch.randn(4, 3, 10, 10) * 3
    with torch.no_grad():
        ref = model(x)
    (result,) = equalize_(model)
    assert result.skipped is None and isinstance(model[1], ChannelClippedReLU)
    with torch.no_grad():
        assert float((model(x) - ref).norm() / ref.norm()) < 1e-5


def test_untraceable_model_falls_back_to_the_tables(caplog) -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) if x.sum() > 0 else x  # control flow on a value: fx cannot trace

    with caplog.at_level(logging.INFO, logger="ptqkit.stats.graph_pass"):
        assert graph_cle_chains(DataDependent()) is None
        assert equalize_(DataDependent()) == []  # no table row names it either
    assert "does not trace with torch.fx" in caplog.text


def test_an_equalized_model_still_traces() -> None:
    """CLE's ChannelClippedReLU is a leaf for the tracer, so the layer-by-layer engine can run
    its one-pass graph after CLE."""
    from ptqkit.stats.graph_pass import trace

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    equalize_(model)
    assert isinstance(model[1], ChannelClippedReLU)
    graph = trace(model)
    assert graph is not None and [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    assert graph_cle_chains(model) == [CLEChain(layers=("0", "2"), activations=("1",))]
