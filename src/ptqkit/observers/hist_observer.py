"""Shared base of the histogram observers (percentile, kl, mse): one batch-split-invariant
PowerOfTwoHistogram row per tensor (or per channel), plus the exact per-row min and max."""

from __future__ import annotations

import torch

from ptqkit.core.errors import ConfigError
from ptqkit.observers.base import Observer
from ptqkit.observers.histogram import PowerOfTwoHistogram

__all__ = ["HistogramObserver", "check_bins"]


class HistogramObserver(Observer):
    """Rows are the tensor (per-tensor) or its channels along the per-channel axis."""

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        axis = self._channel_axis()
        if axis is None:
            return x.reshape(1, -1)  # [1, n]
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)  # [C, n]

    def _bins(self, rows: int) -> int:
        return self.options.bins

    def _observe(self, x: torch.Tensor) -> None:
        rows = self._rows_of(x)
        if self.num_batches > 0 and rows.shape[0] != self._hist.rows:
            raise ConfigError(
                f"observer {self.name!r}: batch has {rows.shape[0]} channels but earlier batches had {self._hist.rows}"
            )
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # [rows]
        if self.num_batches == 0:
            self._hist = PowerOfTwoHistogram(rows.shape[0], self._bins(rows.shape[0]))
            self._row_min, self._row_max = lo.to(torch.float64), hi.to(torch.float64)
        else:
            self._row_min = torch.minimum(self._row_min, lo.to(torch.float64))
            self._row_max = torch.maximum(self._row_max, hi.to(torch.float64))
        self._hist.add(rows, absmax=torch.maximum(hi, -lo))

    def _shape_param(self, values: torch.Tensor) -> torch.Tensor:
        """[rows] -> the granularity's parameter shape ([] per tensor, [C] per channel)."""
        values = values.to(torch.float32)
        return values.reshape(()) if self._channel_axis() is None else values

    def _clamp_to_seen(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Never report a range wider than what was observed."""
        lo = torch.maximum(lo, self._row_min)
        hi = torch.minimum(hi, self._row_max)
        return self._shape_param(lo), self._shape_param(hi)

    def _merge_stats(self, other: Observer) -> None:
        self._hist.merge_(other._hist)  # type: ignore[attr-defined]
        self._row_min = torch.minimum(self._row_min, other._row_min)  # type: ignore[attr-defined]
        self._row_max = torch.maximum(self._row_max, other._row_max)  # type: ignore[attr-defined]

    def _stats(self) -> dict[str, torch.Tensor]:
        return {**self._hist.state(), "row_min": self._row_min, "row_max": self._row_max}

    def _load_stats(self, tensors: dict[str, torch.Tensor]) -> None:
        self._hist = PowerOfTwoHistogram.from_state(tensors)
        self._row_min = tensors["row_min"].to(torch.float64)
        self._row_max = tensors["row_max"].to(torch.float64)
