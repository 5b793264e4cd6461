"""`doctor`: each finding is triggered by a crafted model or data set, and absent without the flaw."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import PerTensor
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.doctor import DoctorConfig, doctor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _calib(x: torch.Tensor, batch_size: int = 32) -> pq.CalibrationData:
    return pq.CalibrationData.from_tensors(x, batch_size=batch_size)


W8A8 = Recipe.from_preset("w8a8")


def test_depthwise_per_tensor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))  # channel ranges over three decades
    data = _calib(torch.randn(64, 3, 6, 6, generator=_gen(1)))
    per_tensor = replace(W8A8, scheme=replace(W8A8.scheme, weights=QuantSpec(qtype="int8", granularity=PerTensor(), symmetric=True)))
    found = doctor(model, data, per_tensor)
    finding = next(f for f in found.findings if f.id == "depthwise-per-tensor")
    assert finding.evidence["layers"] == ["2"] and "per-channel" in finding.fix
    assert "depthwise-per-tensor" not in doctor(model, data, W8A8).ids()  # per-channel weights: fine


def test_activation_outliers() -> None:
    x = torch.randn(256, 16, generator=_gen(2))
    assert "activation-outliers" not in doctor(_mlp(), _calib(x), W8A8).ids()
    x[:, 5] *= 80
    finding = next(f for f in doctor(_mlp(), _calib(x), W8A8).findings if f.id == "activation-outliers")
    assert list(finding.evidence["outlier_ratio"]) == ["0"] and finding.evidence["outlier_ratio"]["0"] > 20
    assert "smoothquant" in finding.fix


def test_low_sqnr_layers() -> None:
    model = _mlp()
    with torch.no_grad():  # one huge weight on a nearly silent input: a per-tensor int4 grid rounds the rest to zero
        model[0].weight[0].zero_()
        model[0].bias[0] = 0.01
        model[2].weight[0, 0] = 40.0
    int4 = replace(W8A8, scheme=replace(W8A8.scheme, weights=QuantSpec(qtype="int4", granularity=PerTensor(), symmetric=True)))
    data = _calib(torch.randn(256, 16, generator=_gen(3)))
    finding = next(f for f in doctor(model, data, int4).findings if f.id == "low-sqnr-layers")
    assert finding.evidence["output_sqnr_db"]["2"] < 15  # measured 3.2 dB
    assert "low-sqnr-layers" not in doctor(_mlp(), data, W8A8).ids()


def test_ranges_still_moving_and_too_few_samples() -> None:
    growing = torch.cat([torch.randn(16, 16, generator=_gen(i)) * (1 + i) for i in range(8)])  # every batch wider
    found = doctor(_mlp(), _calib(growing, batch_size=16), W8A8)
    assert "ranges-still-moving" in found.ids() and "too-few-samples" not in found.ids()  # 128 samples
    repeated = torch.randn(16, 16, generator=_gen(9)).repeat(8, 1)  # the same batch eight times: ranges settle at once
    assert "ranges-still-moving" not in doctor(_mlp(), _calib(repeated, batch_size=16), W8A8).ids()
    few = next(f for f in doctor(_mlp(), _calib(torch.randn(24, 16, generator=_gen(4)), batch_size=8), W8A8).findings if f.id == "too-few-samples")
    assert few.evidence == {"samples": 24, "minimum": 64}


def test_calibration_mismatch_and_input_clipping() -> None:
    calib = torch.randn(128, 16, generator=_gen(5))
    same = torch.randn(128, 16, generator=_gen(6))
    assert not {"calibration-mismatch", "input-clipping"} & set(doctor(_mlp(), _calib(calib), W8A8, eval_data=_calib(same)).ids())
    unnormalized = same * 3 + 2  # evaluation data preprocessed differently
    found = doctor(_mlp(), _calib(calib), W8A8, eval_data=_calib(unnormalized))
    assert found.ids()[0] == "calibration-mismatch" and found.findings[0].severity == "error"  # errors first
    assert min(found.findings[0].evidence["shift_sigma"]) > 1
    clipping = next(f for f in found.findings if f.id == "input-clipping")
    assert clipping.evidence["clip_rate"]["0"] > 0.1


def test_unsupported_modules() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    found = doctor(model, _calib(torch.randn(64, 3, 5, 5, generator=_gen(7))), W8A8)
    finding = next(f for f in found.findings if f.id == "unsupported-modules")
    assert finding.severity == "info" and finding.evidence["modules"][0]["name"] == "0"


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="doctor.outlier_ratio: -1 must be a number > 0"):
        DoctorConfig(outlier_ratio=-1)
    with pytest.raises(ConfigError, match="doctor.min_samples: 0 must be an integer >= 1"):
        DoctorConfig(min_samples=0)
