"""Streaming statistics of one layer's input channels [..., C], collected once per calibration
pass for every algorithm that asked for them (statistics first, then apply):

- `absmax`: max |x_c| per channel (SmoothQuant's activation range);
- `mean_abs`: mean |x_c| per channel (AWQ's salience);
- `samples`: up to `rows_per_call` evenly spaced input rows from each call (AWQ's search losses);
- `hessian`: 2/N Σ x xᵀ (GPTQ).

Every statistic is linear in x (or quadratic, for the Hessian), so when a transform divides the
layer's input channels by s, `divide_(s)` updates them exactly instead of running the
calibration data through the model again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ptqkit.core.errors import CalibrationDataError, ConfigError

__all__ = ["StatsRequest", "InputStatistics"]


@dataclass(frozen=True, kw_only=True)
class StatsRequest:
    """Which statistics an algorithm needs of a layer's input."""

    absmax: bool = False
    mean_abs: bool = False
    rows_per_call: int = 0  # 0: no samples
    hessian: bool = False

    def __or__(self, other: "StatsRequest") -> "StatsRequest":
        return StatsRequest(
            absmax=self.absmax or other.absmax,
            mean_abs=self.mean_abs or other.mean_abs,
            rows_per_call=max(self.rows_per_call, other.rows_per_call),
            hessian=self.hessian or other.hessian,
        )


class InputStatistics:
    """The requested statistics of one input [..., channels]; `name` appears in errors."""

    def __init__(self, channels: int, request: StatsRequest, name: str) -> None:
        from ptqkit.stats.hessian import (
            HessianAccumulator,  # (ptqkit.algorithms imports this module)
        )

        self.channels = channels
        self.request = request
        self.name = name
        self.absmax = torch.zeros(channels) if request.absmax else None  # [C]
        self._abs_sum = torch.zeros(channels, dtype=torch.float64) if request.mean_abs else None  # [C]
        self._rows = 0
        self._samples: list[torch.Tensor] = []  # each [k, C]
        self.hessian = HessianAccumulator(channels, name=name) if request.hessian else None

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.channels:
            raise CalibrationDataError(f"layer {self.name!r}: input of shape {tuple(x.shape)} does not end in {self.channels} channels")
        rows = x.reshape(-1, self.channels).float()  # [n, C]
        # Each statistic is checked on its own small result (NaN/Inf propagates into it), which
        # costs far less than scanning the [n, C] rows once more.
        if self.absmax is not None:
            torch.maximum(self.absmax, self._finite(rows.abs().amax(0)), out=self.absmax)
        if self._abs_sum is not None:
            self._abs_sum += self._finite(rows.abs().sum(0, dtype=torch.float64))
        if self.request.rows_per_call:
            k = min(self.request.rows_per_call, rows.shape[0])
            index = torch.linspace(0, rows.shape[0] - 1, k).round().long()  # [k], evenly spaced
            self._samples.append(self._finite(rows[index].clone()))
        if self.hessian is not None:
            self.hessian.update(rows)
        self._rows += rows.shape[0]

    def _finite(self, statistic: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(statistic).all():
            raise CalibrationDataError(f"layer {self.name!r}: NaN/Inf in its calibration input; check the model's float numerics")
        return statistic

    @property
    def mean_abs(self) -> torch.Tensor:
        if self._abs_sum is None or self._rows == 0:
            raise CalibrationDataError(f"layer {self.name!r}: no mean |x| was collected")
        return (self._abs_sum / self._rows).float()  # [C]

    @property
    def samples(self) -> torch.Tensor:
        if not self._samples:
            raise CalibrationDataError(f"layer {self.name!r}: no input samples were collected")
        if len(self._samples) > 1:
            self._samples = [torch.cat(self._samples)]
        return self._samples[0]  # [n, C]

    def state(self) -> dict[str, Any]:
        """Plain tensors and counts from which `from_state` rebuilds these statistics (sent
        between processes by data-parallel calibration)."""
        return {
            "absmax": self.absmax,
            "abs_sum": self._abs_sum,
            "rows": self._rows,
            "samples": list(self._samples),
            "hessian": self.hessian.state() if self.hessian is not None else None,
        }

    @classmethod
    def from_state(cls, channels: int, request: StatsRequest, name: str, state: dict[str, Any]) -> "InputStatistics":
        from ptqkit.stats.hessian import HessianAccumulator

        stats = cls(channels, request, name)
        stats.absmax = None if state["absmax"] is None else state["absmax"].clone()
        stats._abs_sum = None if state["abs_sum"] is None else state["abs_sum"].clone()
        stats._rows = int(state["rows"])
        stats._samples = [chunk.clone() for chunk in state["samples"]]
        stats.hessian = None if state["hessian"] is None else HessianAccumulator.from_state(state["hessian"], name=name)
        return stats

    def merge_(self, other: "InputStatistics") -> "InputStatistics":
        """Fold `other` (the same statistics over later, disjoint data) into these, in place:
        maxima and sums combine exactly, samples are appended, Hessians merge (`merge_`)."""
        if other.channels != self.channels or other.request != self.request:
            raise ConfigError(
                f"layer {self.name!r}: cannot merge statistics of {other.channels} channels ({other.request}) into "
                f"{self.channels} channels ({self.request})"
            )
        if self.absmax is not None and other.absmax is not None:
            torch.maximum(self.absmax, other.absmax, out=self.absmax)
        if self._abs_sum is not None and other._abs_sum is not None:
            self._abs_sum += other._abs_sum
        self._samples.extend(other._samples)
        if self.hessian is not None and other.hessian is not None:
            self.hessian.merge_(other.hessian)
        self._rows += other._rows
        return self

    def divide_(self, scales: torch.Tensor) -> None:
        """Update every statistic as if each input row had been divided by `scales` [C]."""
        if scales.shape != (self.channels,) or (scales <= 0).any():
            raise ConfigError(f"layer {self.name!r}: channel scales must be {self.channels} positive values, got shape {tuple(scales.shape)}")
        s = scales.float()
        if self.absmax is not None:
            self.absmax /= s
        if self._abs_sum is not None:
            self._abs_sum /= s.double()
        self._samples = [chunk / s for chunk in self._samples]
        if self.hessian is not None:
            self.hessian.divide_inputs_(s)
