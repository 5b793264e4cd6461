"""Where a recipe field is documented: the anchor of a key path in the recipe reference page.

The docs' recipe reference (generated from the config types) gives every field the anchor
`{section}-{field}` with underscores as hyphens: `recipe-name`, `scheme-weights`,
`quantspec-rounding`, `overrides-match`, `calibration-samples`, `algorithm-gptq-damp-percent`.
An error that names a recipe key path ("scheme.weights.rounding: ...") can then say where the
field and its valid values are described.
"""
from __future__ import annotations

import re
from dataclasses import fields

from ptqkit.algorithms.registry import ALGORITHMS
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import CalibrationSettings, Override, Recipe, Scheme

__all__ = ["RECIPE_REFERENCE", "field_anchor", "reference_hint"]

RECIPE_REFERENCE = "reference/recipe.html"  # in the docs site built by `make docs`
_KEY_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\[\d+\])?(\.[a-z_][a-z0-9_]*(\[\d+\])?)*$")


def _section(owners: list[str]) -> tuple[type, str] | None:
    """(config class, anchor section) of the mapping that holds a field, from the keys above it."""
    last = owners[-1] if owners else "recipe"
    if last in ("weights", "inputs"):
        return QuantSpec, "quantspec"
    if last in ALGORITHMS:
        return ALGORITHMS[last], f"algorithm-{last}"
    return {"recipe": (Recipe, "recipe"), "scheme": (Scheme, "scheme"), "overrides": (Override, "overrides"),
            "calibration": (CalibrationSettings, "calibration")}.get(last)


def field_anchor(path: str) -> str | None:
    """The reference anchor of a recipe key path ("scheme.weights.rounding" -> "quantspec-rounding",
    "gptq.damp_percent" -> "algorithm-gptq-damp-percent"), or None when it names no documented field."""
    if not _KEY_PATH.match(path):
        return None
    *owners, name = [re.sub(r"\[\d+\]$", "", part) for part in path.split(".")]
    found = _section(owners)
    if found is None or name not in {f.name for f in fields(found[0])}:
        return None
    return f"{found[1]}-{name}".replace("_", "-")


def reference_hint(message: str) -> str | None:
    """"see <page>#<anchor>" for the most specific recipe key path an error message names, or None."""
    anchors = [anchor for part in message.split(": ") if (anchor := field_anchor(part.strip()))]
    return f"see {RECIPE_REFERENCE}#{anchors[-1]} in the docs (make docs)" if anchors else None
