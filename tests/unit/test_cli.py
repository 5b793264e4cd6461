"""The `ptqkit` command: inspect, typed exit codes, no tracebacks for user errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ptqkit.cli import main
from ptqkit.recipe import Recipe


def test_inspect_preset_prints_yaml(capsys) -> None:
    assert main(["inspect", "w4a16"]) == 0
    out = capsys.readouterr().out
    assert "keep_output_head: true" in out and "qtype: int4" in out


def test_inspect_file_round_trips(tmp_path: Path, capsys) -> None:
    path = Recipe.from_preset("w8a8").save(tmp_path / "r.yaml")
    assert main(["inspect", str(path), "--json"]) == 0
    assert '"name": "w8a8"' in capsys.readouterr().out


def test_bad_recipe_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme:\n  weights: {qtype: int9}\n")
    proc = subprocess.run([sys.executable, "-m", "ptqkit.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ptqkit: error:") and "int qtype bits=9 is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_recipe_file(capsys) -> None:
    assert main(["inspect", "no/such/recipe.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
