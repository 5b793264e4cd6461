"""A small model whose input has one wide column, and the ONNX-against-simulation check that the
static input decompositions (outlier_channels, input_smoothing) share."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ptqkit as pq


class TwoReaders(nn.Module):
    """Two layers reading one input with a wide column (3), then one reading their product."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.out = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.query(x) * self.key(x))


def wide_column_inputs(seed: int, batch: int) -> torch.Tensor:
    x = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 30.0
    return x


def quantized_two_readers(recipe: pq.Recipe) -> tuple[nn.Module, nn.Module, pq.CalibrationData]:
    """(float model, quantized with `recipe` on Linear layers only, calibration data)."""
    torch.manual_seed(0)
    model = TwoReaders().eval()
    calib = pq.CalibrationData.from_tensors([wide_column_inputs(seed, 1)[0] for seed in range(16)])
    return model, pq.quantize(model, replace(recipe, targets=("Linear",)), calib, progress=False), calib


def export_and_check_against_simulation(model: nn.Module, qmodel: nn.Module, calib: pq.CalibrationData, out_dir: Path) -> list[str]:
    """Export `qmodel` to ONNX, check every layer ran on MatMulIntegerToFloat and ORT's outputs
    agree with the simulation to 1e-4 relative, 100x closer than plain w8a8 is (a guard that the
    check can fail); returns the op types of the written graph."""
    import onnx

    from ptqkit.export.ort_check import make_session, run_session

    result = pq.export(qmodel, out_dir, formats=["onnx"], example_inputs=wide_column_inputs(1, 2))
    assert all(layer.kernel == "MatMulIntegerToFloat" for layer in result.layers), result.layers
    x = wide_column_inputs(9, 4)
    with torch.inference_mode():
        simulated = qmodel(x).numpy()
    got = run_session(make_session(out_dir / "model.onnx"), x)[0]
    assert np.abs(got - simulated).max() < 1e-4 * max(1.0, float(np.abs(simulated).max()))
    plain = pq.quantize(model, replace(pq.Recipe.from_preset("w8a8"), targets=("Linear",)), calib, progress=False)
    with torch.inference_mode():
        assert np.abs(plain(x).numpy() - simulated).max() > 100 * np.abs(got - simulated).max()
    return [n.op_type for n in onnx.load(str(out_dir / "model.onnx")).graph.node]
