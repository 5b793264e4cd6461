"""PowerOfTwoHistogram: counts equal an independent numpy binning at the final range, for any
batch split and any internal chunk size (exact re-binning)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqkit.observers import histogram
from ptqkit.observers.histogram import PowerOfTwoHistogram


def _numpy_counts(values: np.ndarray, bins_per_side: int) -> tuple[np.ndarray, int]:
    """Reference: R = smallest power of two strictly above max |x|, 2B equal bins on [-R, R)."""
    absmax = np.abs(values).max(axis=1)
    exponent = np.maximum(np.floor(np.log2(np.maximum(absmax, 2.0**-40))).astype(np.int64) + 1, -40)
    counts = np.zeros((values.shape[0], 2 * bins_per_side))
    for r, row in enumerate(values.astype(np.float64)):
        width = 2.0 ** int(exponent[r]) / bins_per_side
        idx = np.clip(
            np.floor(row / width).astype(np.int64) + bins_per_side, 0, 2 * bins_per_side - 1
        )
        counts[r] = np.bincount(idx, minlength=2 * bins_per_side)
    return counts, exponent


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_counts_match_numpy_for_any_split(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(histogram, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.01, 1.0, 37.0]).unsqueeze(1)  # rows with very different ranges
    data = torch.randn(3, 3000, generator=g) * scales  # [rows, n]
    data[1, 2000] = 250.0  # a late outlier forces several range doublings
    expected, exponent = _numpy_counts(data.numpy(), 64)
    for split in (3000, 999, 1):
        hist = PowerOfTwoHistogram(3, 64)
        for part in data.split(split, dim=1) if split > 1 else data.split(100, dim=1)[::-1]:
            hist.add(part)
        np.testing.assert_array_equal(hist.counts.numpy(), expected)
        np.testing.assert_array_equal(hist.exponent.numpy(), exponent)
    assert hist.counts.sum().item() == data.numel()
