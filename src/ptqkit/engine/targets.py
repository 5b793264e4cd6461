"""Target resolution: which module gets which scheme, decided before anything runs.

Patterns are globs (`fnmatch`, `*` crosses dots) or regular expressions prefixed with "re:"
(full match). A pattern selects a module when it matches the module's name or the name of one
of its ancestors, so `ignore: ["encoder.layer.0"]` leaves that whole block in float. Entries of
`targets`/`ignore` that are supported class names ("Linear", "Conv2d", ...) select by type.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from ptqkit.core.errors import ConfigError, UnsupportedModelError
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import SUPPORTED_MODULE_TYPES, ModuleKind, Recipe, Scheme

__all__ = ["LayerPlan", "Plan", "resolve_plan", "module_kind", "no_match_error", "pattern_matches"]


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one module."""

    name: str
    module_type: ModuleKind
    weights: QuantSpec | None
    inputs: QuantSpec | None
    reason: str  # why this scheme: "targets", "override 'pattern'", ...


@dataclass(frozen=True)
class Plan:
    """The per-module plan: quantized layers and the supported modules left in float (with why)."""

    layers: tuple[LayerPlan, ...]
    skipped: tuple[tuple[str, str, str], ...]  # (name, type, reason)

    @property
    def needs_calibration(self) -> bool:
        return any(layer.inputs is not None and not layer.inputs.dynamic for layer in self.layers)

    def render(self) -> str:
        """A plain-text table of the plan."""

        def describe(spec: QuantSpec | None) -> str:
            if spec is None:
                return "float"
            g = spec.granularity
            detail = {"per_group": f"g{getattr(g, 'size', '')}", "per_channel": "per-channel", "per_token": "per-token"}.get(g.kind, "per-tensor")
            extra = " dynamic" if spec.dynamic else ("" if spec.symmetric else " asym")
            return f"{spec.qtype.name} {detail}{extra}"

        rows = [(x.name, x.module_type, describe(x.weights), describe(x.inputs), x.reason) for x in self.layers]
        rows += [(name, kind, "float", "float", reason) for name, kind, reason in self.skipped]
        header = ("module", "type", "weights", "inputs", "why")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"{len(self.layers)} module(s) quantized, {len(self.skipped)} left in float")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


_TORCH_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "Linear"),
    (nn.Conv1d, "Conv1d"),
    (nn.Conv2d, "Conv2d"),
    (nn.Embedding, "Embedding"),
)


def module_kind(module: nn.Module) -> str | None:
    """The supported type name of `module`, or None if ptqkit cannot quantize it."""
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out] and an `nf` attribute
        return "Conv1D" if hasattr(module, "nf") and getattr(module, "weight", None) is not None else None
    return next((kind for cls, kind in _TORCH_KINDS if isinstance(module, cls)), None)


def pattern_matches(pattern: str, name: str) -> bool:
    """True if `pattern` matches `name` or one of its ancestors' names."""
    parts = name.split(".")
    candidates = [".".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(c) for c in candidates)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def _entry_matches(entry: str, name: str, kind: str | None, type_name: str) -> bool:
    if entry in SUPPORTED_MODULE_TYPES:
        return kind == entry
    if entry == type_name:
        return True
    return pattern_matches(entry, name)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (AttributeError, NotImplementedError):
            head = None
        if isinstance(head, nn.Module):
            return head
    return getattr(model, "lm_head", None) if isinstance(getattr(model, "lm_head", None), nn.Module) else None


def no_match_error(field: str, pattern: str, names: list[str], what: str = "no module") -> ConfigError:
    close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.3)
    hint = f"; closest module names: {close}" if close else f"; module names look like: {names[:5]}"
    return ConfigError(f"{field}: pattern {pattern!r} matches {what}{hint}")


class _Matcher:
    """Matches recipe entries against modules and remembers which entries matched something."""

    def __init__(self) -> None:
        self.used: set[tuple[str, str]] = set()

    def hit(self, field: str, entry: str, name: str, kind: str | None, type_name: str) -> bool:
        ok = _entry_matches(entry, name, kind, type_name)
        if ok:
            self.used.add((field, entry))
        return ok

    def check_all_used(self, recipe: Recipe, names: list[str]) -> None:
        """Every name pattern in targets, ignore and overrides must match some module."""
        for field, entries in (("targets", recipe.targets), ("ignore", recipe.ignore)):
            for entry in entries:  # type names are filters; only name patterns must match something
                if entry not in SUPPORTED_MODULE_TYPES and (field, entry) not in self.used:
                    what = "no quantizable module" if field == "targets" else "no module"
                    raise no_match_error(field, entry, names, what)
        for i, override in enumerate(recipe.overrides):
            for pattern in override.match:
                if ("overrides", pattern) not in self.used:
                    raise no_match_error(f"overrides[{i}].match", pattern, names, "no quantizable module")


def _refuse_quantized(modules: list[tuple[str, nn.Module]]) -> None:
    from ptqkit.nn import InputQuantizer, QuantizedModule

    already = [name for name, m in modules if isinstance(m, (QuantizedModule, InputQuantizer))]
    if already:
        raise UnsupportedModelError(
            f"the model is already quantized ({len(already)} ptqkit module(s), e.g. {already[:3]}); "
            "quantize the original float model, or call ptqkit.dequantize_model() first"
        )


def _plan_module(
    name: str, module: nn.Module, kind: str, recipe: Recipe, head: nn.Module | None, match: _Matcher
) -> LayerPlan | tuple[str, str, str] | None:
    """The module's LayerPlan, a (name, kind, reason) skip record, or None when no target selects it."""
    type_name = type(module).__name__
    if not any([match.hit("targets", e, name, kind, type_name) for e in recipe.targets]):
        return None
    ignored_by = [e for e in recipe.ignore if match.hit("ignore", e, name, kind, type_name)]
    if ignored_by:
        return (name, kind, f"ignore {ignored_by[0]!r}")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return (name, kind, f"padding_mode={module.padding_mode!r} is not supported (zeros only); left in float")
    if head is not None and module is head:
        return (name, kind, "output head kept in float (keep_output_head)")
    scheme, reason = recipe.scheme, "targets"
    for override in recipe.overrides:
        matched = [p for p in override.match if match.hit("overrides", p, name, kind, type_name)]
        if matched:
            scheme, reason = override.scheme, f"override {matched[0]!r}"
            break
    inputs = None if kind == "Embedding" else scheme.inputs
    if Scheme(weights=scheme.weights, inputs=inputs).is_empty:
        return (name, kind, f"{reason}: no quantization")
    return LayerPlan(name, kind, scheme.weights, inputs, reason)


def resolve_plan(model: nn.Module, recipe: Recipe) -> Plan:
    """Decide, per module, which scheme applies. Raises ConfigError for patterns that match
    nothing and UnsupportedModelError when nothing at all would be quantized."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    _refuse_quantized(modules)
    head = _output_head(model) if recipe.keep_output_head else None
    match = _Matcher()
    layers: list[LayerPlan] = []
    skipped: list[tuple[str, str, str]] = []
    for name, module in modules:
        kind = module_kind(module)
        if kind is None:  # an ignore pattern may name a container or a float-only module
            for entry in recipe.ignore:
                match.hit("ignore", entry, name, kind, type(module).__name__)
            continue
        planned = _plan_module(name, module, kind, recipe, head, match)
        if isinstance(planned, LayerPlan):
            layers.append(planned)
        elif planned is not None:
            skipped.append(planned)
    match.check_all_used(recipe, [name for name, _ in modules])
    if not layers:
        raise UnsupportedModelError(
            f"nothing to quantize in {type(model).__name__}: no module of the supported types "
            f"{list(SUPPORTED_MODULE_TYPES)} is selected by targets {list(recipe.targets)} "
            f"after ignore {list(recipe.ignore)}"
        )
    return Plan(tuple(layers), tuple(skipped))
