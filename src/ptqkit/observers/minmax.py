"""Min-max observers: the exact running range (`minmax`) and its exponential moving average
(`ema_minmax`, as in PyTorch's MovingAverageMinMaxObserver)."""

from __future__ import annotations

import torch

from ptqkit.core.errors import ConfigError
from ptqkit.core.observer_options import EMAOptions, MinMaxOptions
from ptqkit.core.qtypes import PerChannel, PerGroup, PerTensor
from ptqkit.observers.base import Observer

__all__ = ["EMAMinMaxObserver", "MinMaxObserver"]


class MinMaxObserver(Observer):
    """Exact running min and max per parameter; identical for any batching or order."""

    name = "minmax"
    options_type = MinMaxOptions
    granularities = (PerTensor, PerChannel, PerGroup)

    def _observe(self, x: torch.Tensor) -> None:
        g = self.spec.granularity
        lo, hi = g.reduce(x, torch.amin), g.reduce(x, torch.amax)
        if self.num_batches == 0:
            self._min, self._max = lo, hi
            return
        if lo.shape != self._min.shape:
            raise ConfigError(
                f"observer 'minmax': batch gives {tuple(lo.shape)} parameters but earlier batches gave "
                f"{tuple(self._min.shape)} (the {g.kind} axis changed size)"
            )
        self._min, self._max = self._combine(lo, hi)

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The running range after a batch whose own range is (lo, hi)."""
        return torch.minimum(self._min, lo), torch.maximum(self._max, hi)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._min.clone(), self._max.clone()

    def _merge_stats(self, other: Observer) -> None:
        self._min = torch.minimum(self._min, other._min)  # type: ignore[attr-defined]
        self._max = torch.maximum(self._max, other._max)  # type: ignore[attr-defined]

    def _stats(self) -> dict[str, torch.Tensor]:
        return {"min": self._min, "max": self._max}

    def _load_stats(self, tensors: dict[str, torch.Tensor]) -> None:
        self._min, self._max = tensors["min"], tensors["max"]


class EMAMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max. Order-dependent by definition; merging
    two observers averages their ranges weighted by batch counts (documented approximation)."""

    name = "ema_minmax"
    options_type = EMAOptions

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.options.momentum
        return m * self._min + (1 - m) * lo, m * self._max + (1 - m) * hi

    def _merge_stats(self, other: Observer) -> None:
        a, b = self.num_batches, other.num_batches
        self._min = (a * self._min + b * other._min) / (a + b)  # type: ignore[attr-defined]
        self._max = (a * self._max + b * other._max) / (a + b)  # type: ignore[attr-defined]
