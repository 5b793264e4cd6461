"""HessianAccumulator: equals 2/N XᵀX, split- and merge-invariant, stable, typed errors."""

from __future__ import annotations

import pytest
import torch

from ptqkit.algorithms import HessianAccumulator
from ptqkit.core.errors import CalibrationDataError, ConfigError


def _inputs(rows: int = 600, features: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=g, dtype=torch.float64) @ torch.randn(
        features, features, generator=g, dtype=torch.float64
    )


def test_equals_direct_formula_float64() -> None:
    x = _inputs()
    acc = HessianAccumulator(48, dtype=torch.float64)
    acc.update(x)
    direct = 2.0 / x.shape[0] * x.T @ x
    torch.testing.assert_close(acc.hessian(), direct, rtol=1e-12, atol=1e-12)
    assert acc.num_samples == 600


def test_float32_accumulation_matches_float64_within_1e5() -> None:
    x = _inputs()
    acc = HessianAccumulator(48, dtype=torch.float32)
    for chunk in x.float().split(7):
        acc.update(chunk)
    direct = 2.0 / x.shape[0] * x.T @ x
    torch.testing.assert_close(
        acc.hessian().double(), direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item()
    )


@pytest.mark.parametrize("sizes", [[600], [1, 599], [100, 0, 250, 250], [13] * 46 + [2]])
def test_batch_split_invariant_and_leading_dims_flattened(sizes: list[int]) -> None:
    x = _inputs()
    acc = HessianAccumulator(48, dtype=torch.float64)
    start = 0
    for i, size in enumerate(sizes):
        chunk = x[start : start + size]
        # odd chunks as [1, rows, in] (batch, seq, features) to exercise the flattening
        acc.update(chunk.unsqueeze(0) if i % 2 else chunk)
        start += size
    torch.testing.assert_close(acc.hessian(), 2.0 / 600 * x.T @ x, rtol=1e-12, atol=1e-12)


def test_merged_float32_hessian_is_bit_identical_to_one_pass() -> None:
    """float32 Gram products summed in float64: splitting the batches differently (as ranks do)
    gives the same float32 Hessian (a float32 running mean differs in its last bits)."""
    x = _inputs().float()
    whole = HessianAccumulator(48)
    for chunk in x.split(50):
        whole.update(chunk)
    first, second = HessianAccumulator(48), HessianAccumulator(48)
    for chunk in x[:300].split(50):
        first.update(chunk)
    for chunk in x[300:].split(50):
        second.update(chunk)
    assert torch.equal(first.merge_(second).hessian(), whole.hessian())


def test_merge_equals_union() -> None:
    x = _inputs()
    a = HessianAccumulator(48, dtype=torch.float64)
    b = HessianAccumulator(48, dtype=torch.float64)
    a.update(x[:123])
    b.update(x[123:])
    empty = HessianAccumulator(48, dtype=torch.float64)
    assert a.merge_(b).merge_(empty) is a
    torch.testing.assert_close(a.hessian(), 2.0 / 600 * x.T @ x, rtol=1e-12, atol=1e-12)
    assert a.num_samples == 600
    fresh = HessianAccumulator(48, dtype=torch.float64).merge_(b)
    torch.testing.assert_close(
        fresh.hessian(), 2.0 / 477 * x[123:].T @ x[123:], rtol=1e-12, atol=1e-12
    )


def test_many_batches_of_large_inputs_stay_exact() -> None:
    """10,000 batches of large inputs: the float64 sum neither overflows nor loses the mean."""
    acc = HessianAccumulator(4, dtype=torch.float32)
    batch = torch.full((16, 4), 1000.0)
    for _ in range(10_000):
        acc.update(batch)
    torch.testing.assert_close(acc.hessian(), torch.full((4, 4), 2e6), rtol=1e-5, atol=0)


def test_hessian_is_a_copy() -> None:
    acc = HessianAccumulator(3)
    acc.update(torch.ones(2, 3))
    acc.hessian().zero_()
    assert acc.hessian().sum() == 18.0


def test_errors_name_the_layer_and_the_bad_value() -> None:
    acc = HessianAccumulator(8, name="model.layers.0.mlp.up_proj")
    with pytest.raises(CalibrationDataError, match=r"up_proj.*no calibration inputs"):
        acc.hessian()
    with pytest.raises(CalibrationDataError, match=r"up_proj.*shape \(4, 7\).*in_features=8"):
        acc.update(torch.ones(4, 7))
    with pytest.raises(CalibrationDataError, match=r"up_proj.*floating-point.*torch.int64"):
        acc.update(torch.ones(4, 8, dtype=torch.int64))
    bad = torch.ones(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(CalibrationDataError, match=r"up_proj.*NaN/Inf"):
        acc.update(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(CalibrationDataError, match=r"up_proj.*NaN/Inf"):
        acc.update(bad)
    assert acc.num_samples == 0  # a rejected batch leaves no trace
    with pytest.raises(ConfigError, match=r"in_features=5 into one with in_features=8"):
        acc.merge_(HessianAccumulator(5))
    with pytest.raises(ConfigError, match=r"in_features must be a positive integer, got 0"):
        HessianAccumulator(0)
    with pytest.raises(ConfigError, match=r"dtype torch.float16 is not supported"):
        HessianAccumulator(8, dtype=torch.float16)
