"""Progress display for long work: a rich progress bar when rich is installed and enabled,
silence otherwise. Library code never prints; this only draws on stderr when asked to."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a rich bar on stderr if `enabled` and rich is importable."""
    if not enabled:
        yield lambda n=1: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        yield lambda n=1: None
        return
    console = Console(file=sys.stderr)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
