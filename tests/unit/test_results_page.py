"""scripts/results_page.py: benchmarks/RESULTS.md is generated from the result records, a section
per benchmark, newest first, each table with its date, machine and command."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_page = _load("results_page", ROOT / "scripts" / "results_page.py")
results_record = _load("results_record", ROOT / "benchmarks" / "results_record.py")


def _record(date: str, title: str, rows: list[list], machine) -> dict:
    return {
        "benchmark": "toy", "title": title, "date": date, "machine": machine,
        "command": f"benchmarks/toy.py --day {date}", "columns": ["config", "ms"], "rows": rows,
        "notes": f"note of {date}", "source": "run",
    }


def test_page_from_two_records(tmp_path):
    older = _record("2026-01-02", "older run", [["fp32", 10.5], ["int8", "4.25"]], "not recorded")
    newer = _record("2026-03-04", "newer run", [["fp32", 9.0], ["int4", None]],
                    {"cpu": "Toy CPU 9000", "cores": 2, "isa": {"avx2": True, "amx_int8": False}, "torch_threads": 2,
                     "versions": {"torch": "2.13.0"}})
    for name, record in (("a_older.json", older), ("b_newer.json", newer)):
        results_record.write_record(tmp_path / name, record)
    out = tmp_path / "RESULTS.md"
    assert results_page.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    page = out.read_text()
    lines = page.splitlines()

    assert lines.count("## toy") == 1
    newer_at, older_at = lines.index("### 2026-03-04: newer run"), lines.index("### 2026-01-02: older run")
    assert newer_at < older_at  # newest first
    assert "| config | ms |" in lines and "|---|---|" in lines
    assert lines.index("| fp32 | 9 |") < lines.index("| int4 | - |") < older_at
    assert older_at < lines.index("| fp32 | 10.5 |") < lines.index("| int8 | 4.25 |")
    assert "- date: 2026-03-04" in lines and "- date: 2026-01-02" in lines
    assert "- machine: Toy CPU 9000; 2 cores; ISA: avx2; 2 torch threads; torch 2.13.0" in lines
    assert "- machine: not recorded" in lines
    assert "- command: `benchmarks/toy.py --day 2026-03-04`" in lines
    assert "- command: `benchmarks/toy.py --day 2026-01-02`" in lines
    assert "note of 2026-01-02" in lines
    # deterministic: the same records give the same page, and --check agrees
    assert results_page.build_page(results_page.load_records(tmp_path.glob("*.json"))) == page
    assert results_page.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 0
    out.write_text(page + "edited\n")
    assert results_page.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1


def test_record_with_a_short_row_is_refused(tmp_path):
    bad = _record("2026-01-02", "bad", [["fp32"]], "not recorded")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        results_page.load_records([tmp_path / "bad.json"])


def _committed_records() -> list[Path]:
    """The records git tracks (a benchmark run leaves new, untracked ones until they are committed)."""
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--", "benchmarks/results/*.json"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
        return [ROOT / p for p in listed if p and (ROOT / p).is_file()]
    return sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def test_committed_page_is_up_to_date():
    page = results_page.build_page(results_page.load_records(_committed_records()))
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8") == page, (
        "benchmarks/RESULTS.md is out of date: run .venv/bin/python scripts/results_page.py")


def test_make_record_names_date_machine_and_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["benchmarks/toy.py", "--reps", "3"])
    record = results_record.make_record("toy", "a table", ["config", "ms"], [("fp32", 1.5)], data={"raw": 1})
    assert set(results_page.REQUIRED) <= set(record) and record["source"] == "run"
    assert len(record["date"]) == 10 and record["date"][4] == "-"
    assert record["machine"]["cpu"] and "isa" in record["machine"] and "versions" in record["machine"]
    assert record["command"].endswith("benchmarks/toy.py --reps 3")
    assert record["rows"] == [["fp32", 1.5]] and record["data"] == {"raw": 1}
