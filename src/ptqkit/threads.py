"""Thread-count control for latency-bound loops of small tensor operations."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["one_thread"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with torch's intra-op pool set to one thread, then restore it. For loops
    of many small ops, where waking the other threads costs more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
