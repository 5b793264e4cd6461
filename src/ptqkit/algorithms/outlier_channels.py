"""Calibrated outlier channels: the few input channels of a layer whose range dwarfs the others
get a coarser step, an integer multiple of the per-tensor one, chosen once from calibration data,
so that the static per-tensor activation range fits the other channels.

BERT-style encoders carry a handful of fixed hidden channels far above the rest (all-MiniLM-L6-v2:
the GELU outputs feeding the feed-forward output layers), so a per-tensor uint8 range spends
most of its 256 steps on a few channels. As in LLM.int8() (Dettmers et al., 2022) the product is
split by input column, but the columns are fixed at calibration (as Atom, Zhao et al. 2023, keeps
calibrated outlier channels apart) and stay integer:

    y = s Σ_{c regular} (q_c - z) ŵ_c  +  Σ_{c outlier} m_c s (q'_c - z) ŵ_c

with (s, z) the tensor's parameters, calibrated with the outlier columns zeroed, and q'_c the
column quantized with scale m_c·s and the same zero point; m_c is the smallest integer whose
range holds the column's calibration range. Since m_c (q'_c - z) ŵ_c is m_c copies of
(q'_c - z) ŵ_c, an int8 kernel runs it all at once on the codes of x with the m_c copies of each
outlier column appended and the weight's rows for them repeated (see `export.onnx_qdq`).

A column is an outlier when its calibration max |x| exceeds `ratio` times the median column's;
at most `max_columns` per layer, largest first. Each outlier costs the int8 kernel m_c more
input columns: cheap on a long reduction (MiniLM's 1536-wide feed-forward output), dear where
they cross a block of the kernel (a 384-wide input going to 385), hence `layers`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ptqkit.core.errors import ConfigError

__all__ = ["OutlierChannelsConfig", "choose_outlier_columns", "column_multiples", "zero_columns"]


@dataclass(frozen=True, kw_only=True)
class OutlierChannelsConfig:
    """`ratio`: a column is an outlier when its calibration max |x| exceeds `ratio` x the median
    column's; `max_columns`: at most this many per layer (the largest); `layers`: module-name
    patterns (as in a recipe's `ignore`: globs or "re:" regexes) of the layers to look at,
    empty for every Linear with static inputs."""

    ratio: float = 8.0
    max_columns: int = 8
    layers: tuple[str, ...] = ()
    name: ClassVar[str] = "outlier_channels"

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not all(isinstance(p, str) and p for p in self.layers):
            raise ConfigError(f"outlier_channels.layers: {self.layers!r} must be a list of module-name patterns")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 1 < self.ratio < math.inf:
            raise ConfigError(f"outlier_channels.ratio: {self.ratio!r} must be a number above 1")
        if isinstance(self.max_columns, bool) or not isinstance(self.max_columns, int) or self.max_columns < 1:
            raise ConfigError(f"outlier_channels.max_columns: {self.max_columns!r} must be a positive integer")


def choose_outlier_columns(column_absmax: torch.Tensor, ratio: float, max_columns: int) -> torch.Tensor:
    """Indices (int64, ascending) of the columns whose max |x| [C] exceeds `ratio` x the median
    column's, the `max_columns` largest of them at most."""
    threshold = ratio * column_absmax.median()
    candidates = torch.nonzero(column_absmax > threshold).flatten()  # [n]
    largest = candidates[column_absmax[candidates].argsort(descending=True, stable=True)][:max_columns]
    return largest.sort().values


def zero_columns(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """x [..., C] with the given columns set to zero (a copy)."""
    return x.index_fill(-1, columns, 0.0)


def column_multiples(low: torch.Tensor, high: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """For columns with calibration ranges [low, high] ([k] each): the smallest integers m >= 1
    (int64 [k]) such that the grid of step m·scale with the tensor's zero point spans them,
    s·m·(qmin - z) <= low and s·m·(qmax - z) >= high, on each side the grid has (a grid
    without negative codes, qmin == z, clamps negatives as it does for every column)."""
    multiples = []
    for lo, hi in zip(low.tolist(), high.tolist()):
        need = 1.0
        if qmax > zero_point and hi > 0:
            need = max(need, hi / (scale * (qmax - zero_point)))
        if qmin < zero_point and lo < 0:
            need = max(need, lo / (scale * (qmin - zero_point)))
        multiples.append(math.ceil(need * (1 - 1e-7)))  # a range exactly on the grid needs no more
    return torch.tensor(multiples, dtype=torch.int64)
