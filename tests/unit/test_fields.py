"""Typed config fields (core.fields): one annotation-driven check for every frozen config."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Literal, get_args, get_origin, get_type_hints

import pytest

from ptqkit.algorithms import REGISTRY
from ptqkit.core.errors import ConfigError, ExportError
from ptqkit.core.fields import Above, AtLeast, Interval, check_fields, literal_values


@dataclass(frozen=True, kw_only=True)
class Example:
    mode: Literal["a", "b"] = "a"
    flag: bool = True
    count: Annotated[int, Interval(1, 10)] = 1
    big: Annotated[int, Interval(0, 2**63 - 1)] = 0
    at_least: Annotated[int, AtLeast(0)] = 0
    ratio: Annotated[float, Interval(0, 1, "[)")] = 0.5
    positive: Annotated[float, Above(0)] = 1.0
    anything: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "example")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "c"}, "example.mode: 'c' is unknown; valid: a, b"),
        ({"mode": 1}, "example.mode: 1 is unknown; valid: a, b"),
        ({"flag": 1}, "example.flag: 1 must be true or false"),
        ({"count": 0}, r"example.count: 0 must be an integer in \[1, 10\]"),
        ({"count": True}, r"example.count: True must be an integer in \[1, 10\]"),
        ({"count": 2.0}, r"example.count: 2.0 must be an integer in \[1, 10\]"),
        ({"big": -1}, r"example.big: -1 must be an integer in \[0, 2\*\*63 - 1\]"),
        ({"at_least": -1}, "example.at_least: -1 must be an integer >= 0"),
        ({"ratio": 1.0}, r"example.ratio: 1.0 must be a number in \[0, 1\)"),
        ({"ratio": math.nan}, r"example.ratio: nan must be a number in \[0, 1\)"),
        ({"positive": 0}, "example.positive: 0 must be a number > 0"),
        ({"positive": math.inf}, "example.positive: inf must be a number > 0"),
        ({"anything": math.nan}, "example.anything: nan must be a number$"),
        ({"anything": "1"}, "example.anything: '1' must be a number$"),
    ],
)
def test_bad_values_name_the_field_and_what_is_valid(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Example(**kwargs)


def test_good_values_pass() -> None:
    Example(mode="b", flag=False, count=10, big=2**63 - 1, at_least=5, ratio=0, positive=1e-9, anything=-3)


def _base(annotation):
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


@pytest.mark.parametrize("config_type", list(REGISTRY), ids=lambda c: c.__name__)
def test_no_algorithm_option_accepts_nan_or_inf(config_type) -> None:
    """Every float option of every registered algorithm refuses NaN and Inf when the config is built."""
    hints = get_type_hints(config_type, include_extras=True)
    floats = [f.name for f in fields(config_type) if _base(hints[f.name]) is float]
    for name in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=name):
                config_type(**{name: bad})


@dataclass(frozen=True, kw_only=True)
class Inner:
    size: Annotated[int, AtLeast(1)] = 1


@dataclass(frozen=True, kw_only=True)
class Outer:
    inner: Inner = Inner()
    optional_inner: Inner | None = None
    limit: Annotated[float, AtLeast(0)] | None = None
    seed: Annotated[int, Interval(-(2**63), 2**64 - 1)] = 0

    def __post_init__(self) -> None:
        check_fields(self, "")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner": {"size": 2}}, r"^inner: \{'size': 2\} must be an Inner$"),
        ({"optional_inner": 3}, r"^optional_inner: 3 must be an Inner or null$"),
        ({"limit": -1.0}, r"^limit: -1.0 must be a number >= 0 or null$"),
        ({"limit": "1"}, r"^limit: '1' must be a number >= 0 or null$"),
        ({"seed": 2**64}, r"^seed: 18446744073709551616 must be an integer in \[-2\*\*63, 2\*\*64 - 1\]$"),
        ({"seed": -(2**63) - 1}, r"^seed: -9223372036854775809 must be an integer"),
    ],
)
def test_nested_configs_optional_values_and_64_bit_ranges(kwargs, message) -> None:
    """A nested config must be an instance of its class; `X | None` takes None or an X; an empty
    prefix names the bare field (for a loader that adds the key path)."""
    with pytest.raises(ConfigError, match=message):
        Outer(**kwargs)


def test_optional_and_nested_good_values_pass() -> None:
    outer = Outer(inner=Inner(size=3), optional_inner=Inner(), limit=0, seed=2**64 - 1)
    assert outer.inner.size == 3 and outer.limit == 0
    assert Outer(seed=-(2**63)).optional_inner is None


def test_the_error_type_can_be_the_callers() -> None:
    """Export options promise ExportError: check_fields raises the type it is given, same message."""

    @dataclass(frozen=True)
    class Options:
        mode: Literal["a", "b"] = "a"

    options = Options(mode="c")
    with pytest.raises(ExportError, match=r"^export.mode: 'c' is unknown; valid: a, b$"):
        check_fields(options, "export", error=ExportError)
    with pytest.raises(ConfigError, match=r"^mode: 'c' is unknown"):
        check_fields(options, "")


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(ConfigError) as caught:
        Example(mode="x" * 10_000)
    assert len(str(caught.value)) < 300 and literal_values(Literal["a", "b"]) == ("a", "b")
