"""The one record format of benchmarks/results/*.json, which scripts/results_page.py turns into
benchmarks/RESULTS.md. Every benchmark script writes its results through `write_record`:

    {
      "benchmark": "encoder_w8a8",          # the script (one RESULTS.md section per benchmark)
      "title": "...",                       # what the table measures
      "date": "YYYY-MM-DD",                 # the day of the run (UTC)
      "machine": {...},                     # ptqkit.core.machine.describe(), or a text where the
                                            #   machine was described by hand, or "not recorded"
      "command": "...",                     # the exact command line
      "columns": ["...", ...],
      "rows": [[...], ...],                 # one list per table row, in column order
      "notes": "...",                       # what a reader needs to read the rows ("" if nothing)
      "source": "run",                      # or "transcribed from README.md at <commit>"
      "data": {...}                         # optional: the script's full output
    }
"""
from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED = ("benchmark", "title", "date", "machine", "command", "columns", "rows", "notes", "source")


def command_line(argv: Sequence[str] | None = None) -> str:
    """This process's command line, as it would be typed again from the repository root."""
    args = list(sys.argv if argv is None else argv)
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(shlex.quote(str(a)) for a in [python, *args])


def make_record(benchmark: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                notes: str = "", data: Any = None) -> dict[str, Any]:
    """A record of a run finished now on this machine, with this process's command line."""
    from ptqkit.core.machine import describe

    record: dict[str, Any] = {
        "benchmark": benchmark,
        "title": title,
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "machine": describe(),
        "command": command_line(),
        "columns": list(columns),
        "rows": [list(r) for r in rows],
        "notes": notes,
        "source": "run",
    }
    if data is not None:
        record["data"] = data
    return record


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write `record` as indented JSON (keys in the documented order) and return the path."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"result record for {path} lacks {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path
