"""The README and the documentation run as written.

- Every ```python block of README.md runs, in order, in a fresh interpreter started in a scratch
  directory that holds a link to the repository's recipes/ (as on a clean checkout).
- Every ```python block of docs/**/*.md preceded by the line `<!-- runnable -->` runs the same
  way, the runnable blocks of one page together in order (a block identical to a README block
  is not run twice).
- The README's relative links point at files of the repository.
- The recipe reference lists every field of every config type and every registered algorithm.
- The site builds with `mkdocs build --strict` (a broken link, anchor or API reference fails).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUNNABLE = "<!-- runnable -->"
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_RUN_TIMEOUT_S = 300


def python_blocks(markdown: str, *, runnable_only: bool) -> list[str]:
    """The ```python blocks of `markdown`; with `runnable_only`, those right after RUNNABLE."""
    blocks = []
    for match in _FENCE.finditer(markdown):
        before = markdown[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if not runnable_only or before == RUNNABLE:
            blocks.append(match.group(1))
    return blocks


def run_blocks(blocks: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Run `blocks` as one script in a fresh interpreter, in `workdir` (with recipes/ linked)."""
    (workdir / "recipes").symlink_to(ROOT / "recipes")
    script = workdir / "blocks.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(script)], cwd=workdir, capture_output=True, text=True,
                          timeout=_RUN_TIMEOUT_S, env=env, check=False)


def _readme_blocks() -> list[str]:
    return python_blocks((ROOT / "README.md").read_text(encoding="utf-8"), runnable_only=False)


def _page_blocks(page: Path) -> list[str]:
    """The runnable blocks of a docs page that are not README blocks (those run once, below)."""
    readme = set(_readme_blocks())
    return [b for b in python_blocks(page.read_text(encoding="utf-8"), runnable_only=True) if b not in readme]


def _runnable_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if _page_blocks(p))


def test_block_extraction():
    page = f"text\n\n```python\nskipped = 1\n```\n\n{RUNNABLE}\n```python\nran = 2\n```\n\n```\nnot python\n```\n"
    assert python_blocks(page, runnable_only=False) == ["skipped = 1\n", "ran = 2\n"]
    assert python_blocks(page, runnable_only=True) == ["ran = 2\n"]


@pytest.mark.integration
def test_readme_quickstart_runs(tmp_path):
    blocks = _readme_blocks()
    assert blocks, "README.md has no python block"
    done = run_blocks(blocks, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"\d+\.\d MB -> \d+\.\d MB", done.stdout), done.stdout
    assert (tmp_path / "runs" / "quickstart" / "model.onnx").is_file()


def test_docs_have_runnable_blocks():
    pages = {p.relative_to(DOCS).as_posix() for p in _runnable_pages()}
    assert {"concepts.md", "how-to/llm-int4.md", "how-to/cnn.md"} <= pages, pages


def test_getting_started_shows_the_readme_quickstart():
    """The quickstart is written twice (README, getting started) and run once: they must agree."""
    page = python_blocks((DOCS / "getting-started.md").read_text(encoding="utf-8"), runnable_only=True)
    assert page == _readme_blocks()


@pytest.mark.integration
@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_runnable_doc_blocks(page, tmp_path):
    done = run_blocks(_page_blocks(page), tmp_path)
    assert done.returncode == 0, f"{page}:\n{done.stderr[-4000:]}"


def test_readme_links_point_into_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links
    for link in links:
        assert "://" not in link and not link.startswith(("/", "..")), link
        assert (ROOT / link).is_file(), f"README.md links to {link}, which does not exist"


def test_serving_formats_page_names_every_export_format():
    from ptqkit.export import FORMATS

    page = (DOCS / "how-to" / "serving-formats.md").read_text(encoding="utf-8")
    for name in FORMATS:
        assert f"(`{name}`)" in page, f"docs/how-to/serving-formats.md does not describe export format {name!r}"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"test_docs_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_lists_every_field():
    import dataclasses

    from ptqkit.algorithms.registry import REGISTRY

    reference = _script("recipe_reference")
    page = reference.build_page()
    for config in reference.documented_configs():
        for row in reference.rows(config):
            assert f"`{row.name}`" in page
            assert row.type and row.default and row.valid, (config.__name__, row)
        assert len(reference.rows(config)) == len(dataclasses.fields(config))
    for row in REGISTRY.values():
        assert f"### `{row.name}`" in page
    # types, defaults and ranges come from the annotations
    assert '<span id="algorithm-gptq-damp-percent"></span>`damp_percent` | float | `0.01` | a finite number in (0, 10]' in page
    assert "| `none`, `mse` |" in page
    assert '<span id="calibration-samples"></span>`samples` | int | `256` |' in page


def test_field_descriptions_from_docstrings():
    reference = _script("recipe_reference")

    class Options:
        """Options.

        - `alpha`: the first
          option, on two lines.
        - `beta` / `gamma`: shared.
        Not part of a bullet.
        """

    class Prose:
        """`bins` per sign; `levels`: bins per side."""

    assert reference.field_descriptions(Options) == {
        "alpha": "the first option, on two lines.", "beta": "shared.", "gamma": "shared."}
    assert reference.field_descriptions(Prose) == {"bins": "`bins` per sign", "levels": "bins per side."}


@pytest.mark.integration
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (make test installs it)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S, env=env, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    for page in ("index.html", "reference/recipe.html", "reference/api.html", "benchmarks.html", "design.html"):
        assert (tmp_path / "site" / page).is_file(), page
    assert 'id="ptqkit.quantize"' in (tmp_path / "site" / "reference" / "api.html").read_text(encoding="utf-8")


def test_errors_link_to_anchors_that_exist_in_the_recipe_reference():
    """Every recipe field has an anchor `engine.reference.field_anchor` computes and the page holds."""
    import dataclasses

    from ptqkit.algorithms.registry import ALGORITHMS
    from ptqkit.engine.recipe import CalibrationSettings, Override, Recipe, Scheme
    from ptqkit.engine.reference import field_anchor, reference_hint

    page = _script("recipe_reference").build_page()
    owners = {"": Recipe, "scheme.": Scheme, "scheme.weights.": __import__("ptqkit").QuantSpec, "overrides[0].": Override,
              "calibration.": CalibrationSettings}
    owners |= {f"{name}.": config for name, config in ALGORITHMS.items()}
    for prefix, config in owners.items():
        for field in dataclasses.fields(config):
            anchor = field_anchor(prefix + field.name)
            assert anchor is not None and f'<span id="{anchor}"></span>' in page, (prefix, field.name)
    assert field_anchor("scheme.weights.no_such_field") is None and field_anchor("model.yaml") is None
    hint = reference_hint("algorithms[0] (gptq): gptq.damp_percent: -1 must be a number in (0, 10]")
    assert hint == "see reference/recipe.html#algorithm-gptq-damp-percent in the docs (make docs)"
