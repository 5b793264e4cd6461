"""Every observer's options, by observer name: a recipe's `observer_options` are checked here
when its QuantSpec is built (at recipe load), not first when calibration builds the observer.

`OBSERVER_OPTIONS` maps each observer name to the frozen dataclass of its options; the observers
package keeps one class per name with the same keys (a unit test holds the two together).
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from ptqkit.core.errors import ConfigError

__all__ = [
    "OBSERVER_OPTIONS",
    "EMAOptions",
    "KLOptions",
    "MSEOptions",
    "MinMaxOptions",
    "PercentileOptions",
    "check_bins",
    "parse_options",
]


MAX_BINS = 2**20  # histogram bins per sign: 2048 by default; more only costs memory and time
MAX_GRID = 10_000  # MSE candidate ratios (100 by default)


def check_bins(observer: str, bins: object) -> None:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 8 or bins > MAX_BINS or bins & (bins - 1):
        raise ConfigError(
            f"observer {observer!r}: bins={bins!r:.40} must be a power of two >= 8 (bins per sign), at most {MAX_BINS}"
        )


def parse_options(options_type: type, raw: dict[str, Any], observer: str) -> Any:
    """Build an observer's frozen options dataclass from `spec.observer_options`."""
    valid = {f.name: f for f in fields(options_type)}
    unknown = sorted(set(raw) - set(valid), key=str)
    if unknown:
        described = (
            ", ".join(
                f"{n} (default {f.default!r})" for n, f in valid.items() if f.default is not MISSING
            )
            or "none"
        )
        raise ConfigError(
            f"observer {observer!r}: unknown option(s) {unknown}; valid options: {described}"
        )
    return options_type(**raw)


@dataclass(frozen=True, kw_only=True)
class MinMaxOptions:
    """`minmax` has no options."""


@dataclass(frozen=True, kw_only=True)
class EMAOptions:
    """`momentum`: weight of the running value (0 <= momentum < 1); each batch moves the range
    by (1 - momentum) towards that batch's own range."""

    momentum: float = 0.9

    def __post_init__(self) -> None:
        if (
            not isinstance(self.momentum, (int, float))
            or isinstance(self.momentum, bool)
            or not 0.0 <= self.momentum < 1.0
        ):
            raise ConfigError(
                f"observer 'ema_minmax': momentum={self.momentum!r} must be in [0, 1)"
            )


@dataclass(frozen=True, kw_only=True)
class PercentileOptions:
    """`percentile` in (50, 100]; `bins` per sign of the histogram (a power of two)."""

    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self) -> None:
        if (
            not isinstance(self.percentile, (int, float))
            or isinstance(self.percentile, bool)
            or not 50.0 < self.percentile <= 100.0
        ):
            raise ConfigError(
                f"observer 'percentile': percentile={self.percentile!r} must be in (50, 100]"
            )
        check_bins("percentile", self.bins)


@dataclass(frozen=True, kw_only=True)
class MSEOptions:
    """`bins` per sign (0 = 2048 per tensor, 256 per channel); `grid` candidate ratios from
    `min_ratio` to 1."""

    bins: int = 0
    grid: int = 100
    min_ratio: float = 0.01

    def __post_init__(self) -> None:
        if self.bins != 0:
            check_bins("mse", self.bins)
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or not 2 <= self.grid <= MAX_GRID:
            raise ConfigError(f"observer 'mse': grid={self.grid!r:.40} must be an integer >= 2, at most {MAX_GRID}")
        if not isinstance(self.min_ratio, (int, float)) or not 0.0 < self.min_ratio < 1.0:
            raise ConfigError(f"observer 'mse': min_ratio={self.min_ratio!r} must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class KLOptions:
    """`bins` per sign of the histogram; `levels`: quantized bins per side (0 = from the qtype:
    half the number of codes, 128 for 8 bits); `stride`: coarse scan step (1 = every bin)."""

    bins: int = 2048
    levels: int = 0
    stride: int = 8

    def __post_init__(self) -> None:
        check_bins("kl", self.bins)
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 1:
            raise ConfigError(f"observer 'kl': stride={self.stride!r} must be a positive integer")
        if (
            not isinstance(self.levels, int)
            or isinstance(self.levels, bool)
            or self.levels < 0
            or self.levels > self.bins
        ):
            raise ConfigError(
                f"observer 'kl': levels={self.levels!r} must be 0 (automatic) or in 1..bins ({self.bins})"
            )


OBSERVER_OPTIONS: dict[str, type] = {
    "minmax": MinMaxOptions,
    "ema_minmax": EMAOptions,
    "percentile": PercentileOptions,
    "mse": MSEOptions,
    "kl": KLOptions,
}
