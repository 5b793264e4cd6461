"""Typed config fields, checked from their annotations: one mechanism for every frozen config.

A config dataclass annotates each field with its type, and numbers with their valid range:

    clip_search: Literal["none", "mse"] = "none"
    grid: Annotated[int, Interval(1, 1000)] = 20
    max_shrink: Annotated[float, Interval(0, 1, "[)")] = 0.5
    block_size: Annotated[int, AtLeast(1)] = 128
    clip: bool = True

and calls `check_fields(self, "rtn")` in `__post_init__`. A bad value raises ConfigError naming
the field, the value and what is valid ("rtn.grid: 0 must be an integer in [1, 1000]"). Numbers
never accept booleans, NaN or infinities. Fields of other types (tuples, mappings) are left to
the config's own checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from ptqkit.core.errors import ConfigError

__all__ = ["AtLeast", "Above", "Interval", "check_fields", "check_value", "literal_values"]


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) or not float(x).is_integer() else str(int(x))


@dataclass(frozen=True)
class Interval:
    """low..high, each end closed or open: `closed` is "[]", "[)", "(]" or "()"."""

    low: float
    high: float
    closed: str = "[]"

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.closed[0] == "[" else value > self.low
        below = value <= self.high if self.closed[1] == "]" else value < self.high
        return above and below

    def describe(self) -> str:
        return f" in {self.closed[0]}{_number(self.low)}, {_number(self.high)}{self.closed[1]}"


@dataclass(frozen=True)
class AtLeast:
    """low or more."""

    low: float

    def __contains__(self, value: float) -> bool:
        return value >= self.low

    def describe(self) -> str:
        return f" >= {_number(self.low)}"


@dataclass(frozen=True)
class Above:
    """More than low."""

    low: float

    def __contains__(self, value: float) -> bool:
        return value > self.low

    def describe(self) -> str:
        return f" > {_number(self.low)}"


def literal_values(annotation: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal[...]` type."""
    return get_args(annotation)


def _is_number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_value(value: Any, annotation: Any, where: str) -> None:
    """Raise ConfigError unless `value` fits `annotation` (see the module docstring)."""
    bounds = None
    if get_origin(annotation) is Annotated:
        annotation, *marks = get_args(annotation)
        bounds = next((m for m in marks if isinstance(m, (Interval, AtLeast, Above))), None)
    if get_origin(annotation) is Literal:
        allowed = get_args(annotation)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{where}: {value!r} is unknown; valid: {', '.join(map(str, allowed))}")
    elif annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} must be true or false")
    elif annotation in (int, float):
        integer = annotation is int
        if not _is_number(value, integer) or (bounds is not None and value not in bounds):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{where}: {value!r} must be {kind}{bounds.describe() if bounds is not None else ''}")


def check_fields(config: Any, prefix: str) -> None:
    """Check every field of the dataclass `config` against its annotation; `prefix` names the
    config in messages (a recipe's algorithm name)."""
    hints = get_type_hints(type(config), include_extras=True)
    for field in fields(config):
        check_value(getattr(config, field.name), hints[field.name], f"{prefix}.{field.name}")
