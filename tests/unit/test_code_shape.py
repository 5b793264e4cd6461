"""Functions in src/ stay small enough to read: at most 60 lines each (docstring included), except
a paper's algorithm kept whole so it can be read beside the paper."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ptqkit"
MAX_LINES = 60
KEPT_WHOLE = {("algorithms/gptq.py", "gptq_quantize_weight")}  # GPTQ's Algorithm 1, one loop as in the paper


def long_functions(root: Path) -> list[tuple[str, str, int]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append((path.relative_to(root).as_posix(), node.name, lines))
    return found


def test_no_function_over_60_lines() -> None:
    over = [(path, name, lines) for path, name, lines in long_functions(SRC) if (path, name) not in KEPT_WHOLE]
    assert over == []


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n", encoding="utf-8")
    assert long_functions(tmp_path) == [("long.py", "long", MAX_LINES + 1)]
    assert ("algorithms/gptq.py", "gptq_quantize_weight") in {(p, n) for p, n, _ in long_functions(SRC)}
