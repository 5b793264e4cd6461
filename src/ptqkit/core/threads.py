"""Thread-count control: a fixed intra-op pool for timing and for latency-bound loops."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["one_thread", "torch_threads"]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with torch's intra-op pool set to `count` threads, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """One intra-op thread: for loops of many small ops, where waking the other threads costs
    more than the work, and for results that must not depend on the machine's core count."""
    return torch_threads(1)
