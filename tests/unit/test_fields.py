"""Typed config fields (core.fields): one annotation-driven check for every frozen config."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Literal, get_args, get_origin, get_type_hints

import pytest

from ptqkit.algorithms import REGISTRY
from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import Above, AtLeast, Interval, check_fields


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
        ({"big": -1}, r"example.big: -1 must be an integer in \[0, 9223372036854775807\]"),
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
