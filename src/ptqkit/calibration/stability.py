"""Range-stability tracking: did each layer's calibration range stop moving?

A layer's range has stabilized at batch b when, from b on, no batch changed its (min, max) by
more than `rel_tol` of the range width, and at least `window` batches followed b. Layers whose
last `window` batches still moved the range are unstable: give them more samples, or look at
them first when accuracy drops (the seeds' advice: "detect when ranges stabilize").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ptqkit.core.errors import ConfigError

__all__ = ["RangeStability", "range_stability", "relative_changes"]


@dataclass(frozen=True)
class RangeStability:
    """`stabilized`: layer -> first batch index after which the range stayed within tolerance;
    `unstable`: layers still moving in their last `window` batches (or with too few batches)."""

    stabilized: dict[str, int]
    unstable: list[str]
    rel_tol: float
    window: int

    @property
    def all_stable(self) -> bool:
        return not self.unstable


def relative_changes(history: Sequence[tuple[float, float]]) -> list[float]:
    """Per batch after the first: max(|Δmin|, |Δmax|) / (max - min) of the running range."""
    changes = []
    for (lo0, hi0), (lo1, hi1) in pairwise(history):
        width = max(hi1 - lo1, 1e-30)
        changes.append(max(abs(lo1 - lo0), abs(hi1 - hi0)) / width)
    return changes


def range_stability(
    histories: Mapping[str, Sequence[tuple[float, float]]], rel_tol: float = 0.01, window: int = 5
) -> RangeStability:
    """Classify each layer's range history (as recorded by observers) as stabilized or not."""
    if not 0 < rel_tol < 1:
        raise ConfigError(f"rel_tol={rel_tol!r} must be in (0, 1)")
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"window={window!r} must be a positive integer")
    stabilized: dict[str, int] = {}
    unstable: list[str] = []
    for name, history in histories.items():
        changes = relative_changes(list(history))  # changes[j] is batch j + 1's move
        last_big = max((j + 1 for j, c in enumerate(changes) if c >= rel_tol), default=0)
        if len(history) - 1 - last_big >= window:
            stabilized[name] = last_big
        else:
            unstable.append(name)
    return RangeStability(stabilized, unstable, rel_tol, window)
