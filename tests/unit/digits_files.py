"""A digits-CNN factory model on disk for CLI tests: random weights (safetensors) and random
calibration images (torch.save), quantized in seconds."""
from __future__ import annotations

from pathlib import Path

import torch

FACTORY = "ptqkit.models.digits_cnn:DigitsCNN"


def digits_files(tmp_path: Path, samples: int) -> dict[str, Path]:
    """{"weights", "calib", "out"}: the weights file, `samples` calibration images [N, 1, 8, 8], the run directory."""
    from safetensors.torch import save_file

    from ptqkit.models.digits_cnn import DigitsCNN

    torch.manual_seed(0)
    weights = tmp_path / "digits.safetensors"
    save_file(DigitsCNN().state_dict(), str(weights))
    calib = tmp_path / "calib.pt"
    torch.save(torch.rand(samples, 1, 8, 8), calib)
    return {"weights": weights, "calib": calib, "out": tmp_path / "run"}
