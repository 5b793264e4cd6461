"""The package's tiers hold: every internal import, at module top or inside a function, points to
the same tier or a lower one, and no group of modules imports itself in a circle.

Tiers, lowest first (docs/design.md describes each):

    core -> observers -> calibration -> nn -> models -> stats -> algorithms -> engine
         -> export -> eval -> mixed_precision -> workflows -> ptqkit (public API) -> examples, cli
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

TIERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("observers",),
    ("calibration",),
    ("nn",),
    ("models",),
    ("stats",),
    ("algorithms",),
    ("engine",),
    ("export",),
    ("eval",),
    ("mixed_precision",),
    ("workflows",),
    ("",),  # ptqkit/__init__.py: the public API
    ("examples", "cli", "__main__"),
)

# (importer, imported) pairs allowed to point up a tier, each with its reason.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in (SRC / "ptqkit").rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """Module -> the ptqkit modules it imports anywhere in its source (functions included)."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                if name.split(".")[0] != "ptqkit":
                    continue
                target = _resolve(name, modules)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def tier_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(TIERS):
        if top in names:
            return index
    raise AssertionError(f"module {module} belongs to no tier: add its package to TIERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {n for targets in graph.values() for n in targets}):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_tier() -> None:
    for module in _modules():
        tier_of(module)


def test_no_import_points_up_a_tier() -> None:
    graph = import_graph()
    upward = sorted(
        (importer, imported)
        for importer, targets in graph.items()
        for imported in targets
        if tier_of(imported) > tier_of(importer) and (importer, imported) not in UPWARD_EXCEPTIONS
    )
    assert upward == [], "imports that point up a tier:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)
    assert len(UPWARD_EXCEPTIONS) <= 3


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_can_fail() -> None:
    """The graph helpers find a planted cycle and a planted upward edge."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert tier_of("ptqkit.core.errors") < tier_of("ptqkit.engine.quantize") < tier_of("ptqkit.cli")
    with pytest.raises(AssertionError, match="no tier"):
        tier_of("ptqkit.nowhere.module")
    inside_function = ast.parse("def f():\n    from ..core.errors import ConfigError\n")
    names = [n for node in ast.walk(inside_function) for n in _imported_names(node, "ptqkit.engine.quantize", False)]
    assert "ptqkit.core.errors" in names  # relative and in-function imports are both counted
    assert "ptqkit.core.errors" in import_graph()["ptqkit.engine.quantize"]
