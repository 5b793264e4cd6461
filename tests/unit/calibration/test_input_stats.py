"""Input statistics collected once for every algorithm: exact against direct computation, exact
after a channel rescaling (`divide_`), and errors that name the layer."""
from __future__ import annotations

import pytest
import torch

from ptqkit.core.errors import CalibrationDataError
from ptqkit.stats.input_stats import InputStatistics, StatsRequest


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 6, generator=generator) * torch.arange(1.0, 7.0) for _ in range(3)]  # [B, T, C]


def test_statistics_equal_direct_computation_and_follow_a_rescaling() -> None:
    request = StatsRequest(absmax=True, mean_abs=True, rows_per_call=4, hessian=True)
    stats = InputStatistics(6, request, "layer")
    for x in _batches():
        stats.update(x)
    rows = torch.cat([x.reshape(-1, 6) for x in _batches()])  # [30, 6]
    assert torch.equal(stats.absmax, rows.abs().amax(0))
    assert torch.allclose(stats.mean_abs, rows.abs().mean(0))
    assert stats.samples.shape == (12, 6)  # 4 evenly spaced rows of each of 3 calls
    assert torch.allclose(stats.hessian.hessian(), 2 * rows.T @ rows / 30, rtol=1e-5)
    s = torch.tensor([1.0, 2.0, 4.0, 0.5, 3.0, 1.5])
    stats.divide_(s)
    scaled = rows / s
    assert torch.allclose(stats.absmax, scaled.abs().amax(0))
    assert torch.allclose(stats.mean_abs, scaled.abs().mean(0))
    assert torch.allclose(stats.hessian.hessian(), 2 * scaled.T @ scaled / 30, rtol=1e-5)


@pytest.mark.parametrize(
    "request_", [StatsRequest(absmax=True), StatsRequest(mean_abs=True), StatsRequest(rows_per_call=8), StatsRequest(hessian=True)]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_name_the_layer(request_: StatsRequest, bad: float) -> None:
    stats = InputStatistics(3, request_, "model.layers.0.mlp.down_proj")
    x = torch.ones(5, 3)
    x[2, 1] = bad
    with pytest.raises(CalibrationDataError, match="layer 'model.layers.0.mlp.down_proj'.*NaN/Inf"):
        stats.update(x)
