"""Typed JSON documents (`core.json_fields`): every shape a document has is read and checked from
the annotations, each refusal names the path, the value and what is valid, and `to_json` gives
the document back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import Interval
from ptqkit.core.json_fields import describe, read_json, to_json


@dataclass(frozen=True)
class Inner:
    kind: Literal["a", "b"]
    size: Annotated[int, Interval(1, 8)] = 1


@dataclass(frozen=True)
class Record:
    name: str
    klass: str = field(metadata={"json": "class"})
    inner: Inner
    pairs: tuple[tuple[str, int], ...]
    names: dict[str, str]
    ratio: float | None = None
    shape: tuple[int, ...] | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name == self.klass:
            raise ConfigError(f"name: {self.name!r} must differ from class")


DOCUMENT = {"name": "x", "class": "Y", "inner": {"kind": "a", "size": 3}, "pairs": [["p", 1]], "names": {"k": "v"}, "ratio": None, "more": [1, 2]}


def test_a_document_round_trips_with_its_extra_keys() -> None:
    record = read_json(Record, DOCUMENT, "")
    assert record == Record(name="x", klass="Y", inner=Inner("a", 3), pairs=(("p", 1),), names={"k": "v"}, extra={"more": [1, 2]})
    assert to_json(record) == DOCUMENT  # shape is None: left out; ratio is None: written
    assert json.dumps(to_json(record), sort_keys=True) == json.dumps(DOCUMENT, sort_keys=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": 5}, r"^name: 5 must be a string$"),
        ({"inner": {"kind": "c"}}, r"^inner\.kind: 'c' is unknown; valid: a, b$"),
        ({"inner": {"kind": "a", "size": 9}}, r"^inner\.size: 9 must be an integer in \[1, 8\]$"),
        ({"inner": {"kind": "a", "size": True}}, r"^inner\.size: True must be an integer in \[1, 8\]$"),
        ({"inner": {"kind": "a", "colour": 1}}, r"^inner: unknown key\(s\) \['colour'\]; valid keys: \['kind', 'size'\]$"),
        ({"inner": {}}, r"^inner: missing key\(s\) \['kind'\]; required: \['kind'\]$"),
        ({"pairs": [["p", 1, 2]]}, r"^pairs\[0\]: \['p', 1, 2\] must be a list of 2 values$"),
        ({"pairs": [["p", "1"]]}, r"^pairs\[0\]\[1\]: '1' must be an integer$"),
        ({"names": {"k": 1}}, r"^names\.k: 1 must be a string$"),
        ({"names": ["k"]}, r"^names: \['k'\] must be an object of strings$"),
        ({"ratio": "high"}, r"^ratio: 'high' must be a number or null$"),
        ({"ratio": float("nan")}, r"^ratio: nan must be a number or null$"),
        ({"shape": [2, "x"]}, r"^shape\[1\]: 'x' must be an integer$"),
        ({"class": "x"}, r"^name: 'x' must differ from class$"),
    ],
)
def test_each_refusal_names_the_path_the_value_and_what_is_valid(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_json(Record, {**DOCUMENT, **change}, "")


def test_a_missing_key_and_a_nested_cross_field_check_name_the_path() -> None:
    document = {key: value for key, value in DOCUMENT.items() if key != "names"}
    with pytest.raises(ConfigError, match=r"^doc: missing key\(s\) \['names'\]; required: \['name', 'class', 'inner', 'pairs', 'names'\]$"):
        read_json(Record, document, "doc")
    with pytest.raises(ConfigError, match=r"^records\[0\]\.name: 'x' must differ from class$"):
        read_json(tuple[Record, ...], [{**DOCUMENT, "class": "x"}], "records")


def test_descriptions() -> None:
    assert describe(tuple[str, ...]) == "a list of strings"
    assert describe(dict[str, Any]) == "an object"
    assert describe(Annotated[int, Interval(0, 4, "[)")] | None) == "an integer in [0, 4) or null"
    assert describe(Inner) == "an object with keys ['kind', 'size']"
