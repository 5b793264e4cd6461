"""Write the recipe reference (docs/reference/recipe.md) from the config types themselves.

Every field of Recipe, Scheme, QuantSpec, the granularities, Override, CalibrationSettings, the
observers' options and every algorithm config in `ptqkit.algorithms.registry.REGISTRY` becomes a
table row: name, type, default and valid values read from the annotations (`Literal[...]`
values, `core.fields` Interval / AtLeast / Above ranges, booleans), and the description given
for it in the class docstring ("- `field`: text"). The page is built when the docs are built
(the mkdocs hook in scripts/mkdocs_hooks.py calls `build_page`), so it cannot fall behind the code:

    .venv/bin/python scripts/recipe_reference.py            # print the page
    .venv/bin/python scripts/recipe_reference.py --out F    # write it to F
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from ptqkit.algorithms.registry import REGISTRY, Stage
from ptqkit.core import qtypes
from ptqkit.core.fields import Above, AtLeast, Interval
from ptqkit.core.observer_options import OBSERVER_OPTIONS
from ptqkit.core.spec import ROUNDING_MODES, QuantSpec
from ptqkit.engine.recipe import (
    PRESETS,
    SUPPORTED_MODULE_TYPES,
    CalibrationSettings,
    Override,
    Recipe,
    Scheme,
)

HEADER = """# Recipe reference

Generated from the config types by `scripts/recipe_reference.py` when the documentation is
built; do not edit by hand. A recipe is YAML or JSON (`pq.Recipe.load`, `recipe.save`,
`ptqkit inspect RECIPE`); unknown keys and invalid values are refused with a `ConfigError`
naming the key path, the value and what is valid. `ptqkit quantize --set key.path=value` edits
any field below before validation (`--set scheme.weights.granularity.size=64`,
`--set algorithms.0.damp_percent=0.05`).

A complete recipe (`recipes/w8a8-encoder-smooth.yaml`, every default written out):

```yaml
{example}
```
"""

# Valid values of fields whose type does not carry them (checked in the config's __post_init__).
_FLOAT_FORMATS = tuple(getattr(qtypes, "_FLOAT_FORMATS", ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4")))
_KNOWN_VALUES: dict[tuple[type, str], str] = {
    (QuantSpec, "qtype"): "`int2`..`int8`, `int16`, `uint2`..`uint8`, `int8_narrow` (and other widths), "
    + ", ".join(f"`{name}`" for name in _FLOAT_FORMATS),
    (QuantSpec, "granularity"): "a mapping with `kind`: "
    + ", ".join(f"[`{cls.kind}`](#granularity-{cls.kind})" for cls in (qtypes.PerTensor, qtypes.PerChannel, qtypes.PerGroup, qtypes.PerToken)),
    (QuantSpec, "rounding"): ", ".join(f"`{mode}`" for mode in ROUNDING_MODES),
    (QuantSpec, "observer"): ", ".join(f"[`{name}`](#observer-{name})" for name in OBSERVER_OPTIONS),
    (QuantSpec, "observer_options"): "the options of the chosen [observer](#observers)",
    (Recipe, "algorithms"): "a list of [algorithm](#algorithms) mappings, each with its `name`, in stage order",
    (Recipe, "overrides"): "a list of [override](#overrides) mappings",
    (Recipe, "version"): f"`{Recipe.__dataclass_fields__['version'].default}`",
    (Scheme, "weights"): "a [QuantSpec](#quantspec) mapping, or null (float)",
    (Scheme, "inputs"): "a [QuantSpec](#quantspec) mapping, or null (float)",
    (Override, "scheme"): "a [scheme](#scheme) mapping",
    (Recipe, "scheme"): "a [scheme](#scheme) mapping",
    (Recipe, "calibration"): "a [calibration](#calibration) mapping",
    (Recipe, "targets"): "class names (" + ", ".join(f"`{t}`" for t in SUPPORTED_MODULE_TYPES)
    + ") or module-name patterns",
    (CalibrationSettings, "samples"): "an integer >= 1",
    (CalibrationSettings, "batch_size"): "an integer >= 1",
    (CalibrationSettings, "seed"): "an integer in [-2**63, 2**64 - 1]",
    (OBSERVER_OPTIONS["ema_minmax"], "momentum"): "a number in [0, 1)",
    (OBSERVER_OPTIONS["percentile"], "percentile"): "a number in (50, 100]",
    (OBSERVER_OPTIONS["percentile"], "bins"): "a power of two in [8, 2**20]",
    (OBSERVER_OPTIONS["kl"], "bins"): "a power of two in [8, 2**20]",
    (OBSERVER_OPTIONS["kl"], "levels"): "0 (automatic) or an integer in [1, bins]",
    (OBSERVER_OPTIONS["kl"], "stride"): "an integer >= 1",
    (OBSERVER_OPTIONS["mse"], "bins"): "0 (automatic) or a power of two in [8, 2**20]",
    (OBSERVER_OPTIONS["mse"], "grid"): "an integer in [2, 10000]",
    (OBSERVER_OPTIONS["mse"], "min_ratio"): "a number in (0, 1)",
}

# Descriptions of fields whose class docstring does not describe them one by one.
_DESCRIPTIONS: dict[tuple[type, str], str] = {
    (Recipe, "name"): "a label for the recipe, written into run summaries and reports.",
    (Recipe, "version"): "the recipe format version this ptqkit reads.",
    (Scheme, "weights"): "how the targeted modules' weights are quantized; null leaves them in float.",
    (Scheme, "inputs"): "how the targeted modules' input activations are quantized; null leaves them in float.",
    (Override, "scheme"): "the scheme the matching modules get instead of the recipe's.",
    (CalibrationSettings, "samples"): "how many calibration samples are used (a seeded subset when the data has more).",
    (CalibrationSettings, "seed"): "seeds which samples are chosen.",
    (CalibrationSettings, "batch_size"): "samples per calibration forward pass.",
    (qtypes.PerChannel, "axis"): "the tensor axis that gets one parameter per index (0: a weight's output channels).",
    (qtypes.PerGroup, "size"): "elements per group.",
    (qtypes.PerGroup, "axis"): "the axis the groups run along (-1: a Linear weight's input dimension).",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One documented field."""

    name: str
    type: str
    default: str
    valid: str
    description: str


_BULLET = re.compile(r"(\s*)- ((?:`\w+`(?:\s*(?:/|,|and|or)\s*)?)+):\s*(.*)")


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field's description in the class docstring: a bullet "- `name`: text" (its indented
    continuation lines joined; "- `a` / `b`: text" describes both), or else a fragment of the
    prose that starts with the field's name ("`bins` per sign; ...")."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        match = _BULLET.match(line)
        if match is None:
            continue
        indent, body = len(match.group(1)), [match.group(3)]
        for following in lines[i + 1:]:
            if not following.strip() or len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following.strip())
        for name in re.findall(r"`(\w+)`", match.group(2)):
            found[name] = " ".join(body)
    if found:
        return found
    for fragment in re.split(r";\s+|\.\s+", " ".join(lines).strip()):
        match = re.match(r"`(\w+)`(:?)\s*(.*)", fragment)
        if match:
            found.setdefault(match.group(1), match.group(3) if match.group(2) else fragment)
    return found


def _unwrap(annotation: Any) -> tuple[Any, Any]:
    """(the type, its number range mark or None) of a possibly Annotated annotation."""
    if typing.get_origin(annotation) is Annotated:
        base, *marks = typing.get_args(annotation)
        return base, next((m for m in marks if isinstance(m, (Interval, AtLeast, Above))), None)
    return annotation, None


def type_text(annotation: Any) -> str:
    """A short, readable type: int, float, bool, str, list of str, QuantSpec or null."""
    base, _ = _unwrap(annotation)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is Literal:
        return "str"
    if origin in (tuple, list):
        return "list of " + type_text(args[0]) if args else "list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if base is Any:
        return "any"
    if origin is not None:  # Mapping[str, Any] and friends
        return "mapping" if "Mapping" in str(origin) or origin is dict else str(origin.__name__)
    return getattr(base, "__name__", str(base))


def valid_text(cls: type, name: str, annotation: Any) -> str:
    """Valid values: Literal values, a number range, true/false, or what the config checks."""
    base, bounds = _unwrap(annotation)
    kind = {int: "an integer", float: "a finite number"}.get(base)
    if typing.get_origin(base) is Literal:
        return ", ".join(f"`{v}`" for v in typing.get_args(base))
    if kind is not None and bounds is not None:
        return kind + bounds.describe()
    if (cls, name) in _KNOWN_VALUES:
        return _KNOWN_VALUES[(cls, name)]
    if base is bool:
        return "`true`, `false`"
    return kind or "-"


def default_text(field: dataclasses.Field) -> str:
    """The default as it is written in a recipe (JSON/YAML scalars), or "required"."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, tuple):
        value = list(value)
    return "`" + json.dumps(value, default=str) + "`"


def rows(cls: type) -> list[Row]:
    """One row per dataclass field of `cls` (ClassVars, such as an algorithm's name, excluded)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    described = field_descriptions(cls)
    return [
        Row(f.name, type_text(hints[f.name]), default_text(f), valid_text(cls, f.name, hints[f.name]),
            described.get(f.name) or _DESCRIPTIONS.get((cls, f.name), ""))
        for f in dataclasses.fields(cls)
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def table(cls: type, anchor: str) -> str:
    """A Markdown table of `cls`'s fields; each field has the anchor `{anchor}-{field}`."""
    lines = ["| field | type | default | valid values | description |", "|---|---|---|---|---|"]
    for row in rows(cls):
        field_id = f"{anchor}-{row.name}".replace("_", "-")
        lines.append(
            f'| <span id="{field_id}"></span>`{row.name}` | {_cell(row.type)} | {_cell(row.default)} '
            f"| {_cell(row.valid)} | {_cell(row.description)} |"
        )
    if len(lines) == 2:
        return "No fields.\n"
    return "\n".join(lines) + "\n"


def _summary(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def config_sections() -> Iterator[str]:
    """The recipe's own types, top down."""
    yield "## recipe {#recipe}\n\nThe top level of a recipe file (`Recipe`).\n\n" + table(Recipe, "recipe")
    yield "## scheme {#scheme}\n\n" + _summary(Scheme) + " Used as `scheme` and `overrides[].scheme`.\n\n" + table(Scheme, "scheme")
    yield ("## QuantSpec: scheme.weights, scheme.inputs {#quantspec}\n\n" + _summary(QuantSpec)
           + " See [Concepts](../concepts.md) for the maths.\n\n" + table(QuantSpec, "quantspec"))
    parts = ["## granularity {#granularity}\n\n`granularity` is a mapping with a `kind` and that kind's fields.\n"]
    for cls in (qtypes.PerTensor, qtypes.PerChannel, qtypes.PerGroup, qtypes.PerToken):
        parts.append(f"### `{cls.kind}` {{#granularity-{cls.kind}}}\n\n{_summary(cls)}\n\n" + table(cls, f"granularity-{cls.kind}"))
    yield "\n".join(parts)
    parts = [("## observers {#observers}\n\n`observer` turns calibration statistics into a range; "
              "`observer_options` holds the chosen observer's options.\n")]
    for name, options in OBSERVER_OPTIONS.items():
        parts.append(f"### `{name}` {{#observer-{name}}}\n\n{_summary(options)}\n\n" + table(options, f"observer-{name}"))
    yield "\n".join(parts)
    yield "## overrides {#overrides}\n\n" + _summary(Override) + "\n\n" + table(Override, "overrides")
    yield "## calibration {#calibration}\n\n" + _summary(CalibrationSettings) + "\n\n" + table(CalibrationSettings, "calibration")


def algorithm_sections() -> Iterator[str]:
    """One section per registered algorithm, grouped by stage in recipe order."""
    yield (
        "## algorithms {#algorithms}\n\n`algorithms` is a list of mappings, each with the algorithm's "
        "`name` and its options; they run in stage order (a recipe lists them in it, otherwise "
        "it is refused): " + ", ".join(stage.phrase.split(" ", 1)[1] + "s" for stage in Stage) + ".\n"
    )
    for stage in Stage:
        for algorithm in (row for row in REGISTRY.values() if row.stage is stage):
            anchor = f"algorithm-{algorithm.name}".replace("_", "-")
            yield (
                f"### `{algorithm.name}` {{#{anchor}}}\n\n"
                f"{stage.phrase.capitalize()} (`{algorithm.config.__name__}`). {_summary(algorithm.config)}\n\n"
                + table(algorithm.config, anchor)
            )


def preset_section() -> str:
    """The presets (`Recipe.from_preset`, `ptqkit quantize --preset`) and what each quantizes."""
    lines = ["## presets {#presets}\n", "| preset | weights | inputs |", "|---|---|---|"]
    for name, make in PRESETS.items():
        scheme = make().scheme
        cells = []
        for spec in (scheme.weights, scheme.inputs):
            if spec is None:
                cells.append("float")
                continue
            kind = spec.granularity.kind + (f" {spec.granularity.size}" if hasattr(spec.granularity, "size") else "")
            cells.append(f"{spec.qtype.name} {kind}" + (", dynamic" if spec.dynamic else "")
                         + ("" if spec.symmetric else ", asymmetric"))
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def build_page() -> str:
    """The whole reference page."""
    example = (ROOT / "recipes" / "w8a8-encoder-smooth.yaml").read_text(encoding="utf-8")
    example = "\n".join(line for line in example.splitlines() if not line.startswith("#"))
    parts = [HEADER.format(example=example.strip()), *config_sections(), preset_section(), *algorithm_sections()]
    return "\n".join(parts)


def documented_configs() -> list[type]:
    """Every config type the page documents (the test checks each field appears)."""
    return [Recipe, Scheme, QuantSpec, qtypes.PerTensor, qtypes.PerChannel, qtypes.PerGroup, qtypes.PerToken,
            Override, CalibrationSettings, *OBSERVER_OPTIONS.values(), *REGISTRY]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the page here (default: stdout)")
    args = parser.parse_args(argv)
    page = build_page()
    if args.out is None:
        sys.stdout.write(page)
    else:
        args.out.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
