"""Silence third-party output that says nothing about the user's model, for the bundled example
and other runs that promise ptqkit's own progress only.

What is silenced, and nothing else: transformers' weight-loading progress bars and its
informational logs, torch's ONNX exporter notes about optional torchvision operators, and the
FutureWarning torch's pytree raises about its own LeafSpec class. Everything is restored on exit.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet_third_party"]

_LOGGERS = ("torch.onnx._internal.exporter._registration", "transformers")
_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)",)


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block, third-party loggers above only report errors, transformers shows no
    progress bars and the known FutureWarning is ignored (module docstring)."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), _transformers_bars_off():
        for message in _WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
