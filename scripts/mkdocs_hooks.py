"""MkDocs hooks: the pages generated from the code and the result records, made at build time.

- reference/recipe.md from the config types (scripts/recipe_reference.py);
- benchmarks.md from benchmarks/results/*.json (scripts/results_page.py, the same page as
  benchmarks/RESULTS.md).

They are added to the build as generated files, so nothing generated is written into docs/.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from mkdocs.structure.files import File, Files

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"ptqkit_docs_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def benchmarks_page() -> str:
    """The benchmark page, with a pointer to how it is made."""
    results_page = _script("results_page")
    return results_page.build_page(results_page.load_records((ROOT / "benchmarks" / "results").glob("*.json")))


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/recipe.md", content=_script("recipe_reference").build_page()))
    files.append(File.generated(config, "benchmarks.md", content=benchmarks_page()))
    return files
