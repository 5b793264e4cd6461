"""Typed JSON documents: read a parsed JSON value into a frozen dataclass, checked from its annotations.

The same annotations as `core.fields` (a config's `Literal`, `bool`, numbers with their range),
plus the shapes a JSON document has: `str`, `X | None`, `tuple[X, ...]` and `tuple[A, B, C]`
(JSON lists), `dict[str, X]` (JSON objects with string keys), `Any`, and nested dataclasses
(JSON objects). A dataclass field may name its JSON key (`field(metadata={"json": "class"})`) and
be left out of the document when it is None (`metadata={"omit_none": True}`); a field named
`extra` of type `dict[str, Any]` collects the keys the dataclass does not declare (records that
other modules extend), otherwise an unknown key is refused. A dataclass's own cross-field checks
(`__post_init__`) raise ConfigError messages that start with the field name. A value that does
not fit raises ConfigError naming its path in the document, the value and what is valid.

`to_json` is the inverse: the dataclass back to plain JSON values (lists for tuples).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import check_value

__all__ = ["describe", "read_json", "to_json"]

T = TypeVar("T")
EXTRA = "extra"


def _json_name(field: dataclasses.Field) -> str:
    return field.metadata.get("json", field.name)


def _optional(annotation: Any) -> Any | None:
    """X for `X | None`, else None."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0]
    return None


def describe(annotation: Any) -> str:
    """What a value of `annotation` is, in words ("a list of strings", "an integer or null")."""
    inner = _optional(annotation)
    if inner is not None:
        return f"{describe(inner)} or null"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        bounds = next((mark for mark in args[1:] if hasattr(mark, "describe")), None)
        return describe(args[0]) + ("" if bounds is None else bounds.describe())
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0]) if len(set(args)) == 1 else 'values'}"
    if origin is dict:
        return "an object" if args[1] is Any else f"an object of {_plural(args[1])}"
    if dataclasses.is_dataclass(annotation):
        keys = [_json_name(f) for f in dataclasses.fields(annotation) if f.name != EXTRA]
        return f"an object with keys {keys}"
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number", Any: "any value"}[annotation]


def _plural(annotation: Any) -> str:
    words = describe(annotation)
    for article in ("an ", "a "):
        if words.startswith(article):
            head, _, rest = words[len(article):].partition(" ")
            return f"{head}s {rest}".rstrip()
    return words


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _refuse(value: Any, annotation: Any, where: str) -> ConfigError:
    return ConfigError(f"{_prefix(where)}{value!r:.100} must be {describe(annotation)}")


def _read_list(value: Any, annotation: Any, where: str) -> tuple[Any, ...]:
    args = get_args(annotation)
    if not isinstance(value, list):
        raise _refuse(value, annotation, where)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(read_json(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise _refuse(value, annotation, where)
    return tuple(read_json(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))


def _read_object(value: Any, annotation: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise _refuse(value, annotation, where)
    inner = get_args(annotation)[1]
    return {key: read_json(inner, item, _at(where, key)) for key, item in value.items()}


def _read_dataclass(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, dict):
        raise _refuse(value, cls, where)
    hints = get_type_hints(cls, include_extras=True)
    declared = {_json_name(f): f for f in dataclasses.fields(cls) if f.name != EXTRA}
    has_extra = any(f.name == EXTRA for f in dataclasses.fields(cls))
    required = [key for key, f in declared.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in value]
    if missing:
        raise ConfigError(f"{_prefix(where)}missing key(s) {missing}; required: {required}")
    unknown = sorted(str(key) for key in value if key not in declared)
    if unknown and not has_extra:
        raise ConfigError(f"{_prefix(where)}unknown key(s) {unknown}; valid keys: {sorted(declared)}")
    values = {f.name: read_json(hints[f.name], value[key], _at(where, key)) for key, f in declared.items() if key in value}
    if has_extra:
        values[EXTRA] = {key: value[key] for key in value if key not in declared}
    try:
        return cls(**values)
    except ConfigError as exc:  # a cross-field check; its message starts with the field name
        raise ConfigError(_at(where, str(exc))) from None


def read_json(annotation: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as `annotation` describes it; ConfigError naming `where` when it does not fit."""
    inner = _optional(annotation)
    if inner is None:
        return _read(annotation, value, where)
    if value is None:
        return None
    try:
        return _read(inner, value, where)
    except ConfigError as exc:  # say that null was valid too, when the value itself was refused
        message = str(exc)
        refused = f"{_prefix(where)}{value!r:.100} must be {describe(inner)}"
        raise ConfigError(message + " or null" if message == refused else message) from None


def _read(annotation: Any, value: Any, where: str) -> Any:
    base = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    if base is Any:
        return value
    if get_origin(base) is tuple:
        return _read_list(value, base, where)
    if get_origin(base) is dict:
        return _read_object(value, base, where)
    if dataclasses.is_dataclass(base):
        return _read_dataclass(base, value, where)
    if base is str:
        if not isinstance(value, str):
            raise _refuse(value, base, where)
        return value
    check_value(value, annotation, where)
    return value


def to_json(value: Any) -> Any:
    """A dataclass read by `read_json` (or built in code) back to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == EXTRA:
                out.update(to_json(item))
            elif item is not None or not f.metadata.get("omit_none", False):
                out[_json_name(f)] = to_json(item)
        return out
    if isinstance(value, (tuple, list)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value
