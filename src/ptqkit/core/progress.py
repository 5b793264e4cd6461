"""Progress display for long work: a rich progress bar when rich is installed and enabled,
silence otherwise. Library code never prints; this only draws on stderr when asked to.

The bar shows done/total, elapsed time, the estimated time left, what runs now (the block or
layer the caller names) and the process's peak resident memory so far."""
from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["Advance", "current_rss_bytes", "peak_rss_bytes", "progress_bar"]

Advance = Callable[..., None]  # advance(n=1, current=None)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _status(current: str | None) -> str:
    now = f"{current}  " if current else ""
    return f"{now}peak {peak_rss_bytes() / 2**30:.2f} GiB"


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Advance]:
    """Yield `advance(n=1, current=None)`; `current` names the step shown beside the bar (the
    block or layer just done or starting).
    Draws a rich bar on stderr if `enabled` and rich is importable."""
    if not enabled:
        yield lambda n=1, current=None: None
        return
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        yield lambda n=1, current=None: None
        return
    console = Console(file=sys.stderr)
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status=_status(None))

        def advance(n: int = 1, current: str | None = None) -> None:
            progress.update(task, advance=n, status=_status(current))

        yield advance
