"""Checks that cannot pass on NaN (issue 28 item 6): every comparison treats NaN as failure, and
every float option refuses NaN/Inf with a typed error."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError, ExportError
from ptqkit.core.primitives import sqnr_db
from ptqkit.eval.metrics import mean_softmax_kl, output_sqnr_db, top1_agreement, topk_agreement

from .conftest import assert_refused, run_cli


class NaNHead(nn.Module):
    """A classifier whose last logit is NaN: torch and ONNX Runtime agree on it, exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.register_buffer("mask", torch.tensor([0.0] * 7 + [math.nan]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.mask


def _nan_head() -> nn.Module:
    return NaNHead().eval()


def test_compare_outputs_reports_nan_and_within_tolerance_fails_on_it() -> None:
    from ptqkit.export.ort_check import compare_outputs, within_tolerance

    same = compare_outputs([torch.tensor([1.0, math.inf])], [np.array([1.0, math.inf], np.float32)])
    assert same["max_abs"] == 0.0 and same["ref_absmax"] == 1.0  # the same infinity agrees; the scale is finite
    nan = compare_outputs([torch.tensor([1.0, math.nan])], [np.array([1.0, math.nan], np.float32)])
    assert math.isnan(nan["max_abs"]) and not within_tolerance(nan["max_abs"], 1e-4)
    inf = compare_outputs([torch.tensor([1.0, 2.0])], [np.array([1.0, math.inf], np.float32)])
    assert not within_tolerance(inf["max_abs"], 1e9)


def test_export_refuses_a_graph_whose_outputs_hold_nan(tmp_path: Path) -> None:
    model = _nan_head()
    x = torch.randn(4, 16)
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8_dynamic"), pq.CalibrationData.from_tensors(x), progress=False)
    with pytest.raises(ExportError, match=r"the float ONNX graph disagrees with torch \(max abs difference nan \(an output holds NaN\)"):
        pq.export(qmodel, tmp_path / "onnx", ("onnx",), example_inputs=x)


@pytest.mark.parametrize("tolerance", [math.nan, math.inf, -1.0])
def test_export_refuses_a_non_finite_tolerance(tmp_path: Path, tolerance: float) -> None:
    x = torch.randn(4, 16)
    qmodel = pq.quantize(_nan_head(), pq.Recipe.from_preset("w8a8_dynamic"), pq.CalibrationData.from_tensors(x), progress=False)
    with pytest.raises(ExportError, match=r"export\.fp32_tolerance: .* must be a number >= 0"):
        pq.export(qmodel, tmp_path / "onnx", ("onnx",), example_inputs=x, fp32_tolerance=tolerance)


def test_metrics_count_nan_rows_as_failures() -> None:
    reference = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0, 0.0, 0.0]])
    candidate = reference.clone()
    candidate[1, 4] = math.nan  # torch's argmax picks a NaN: it must not count as agreement
    assert top1_agreement(reference, candidate) == 0.5
    assert topk_agreement(reference, candidate, 5) == 0.5
    assert mean_softmax_kl(reference, candidate) == math.inf
    assert sqnr_db(reference, candidate) == -math.inf and output_sqnr_db(reference, candidate) == -math.inf
    assert top1_agreement(reference, reference) == 1.0 and sqnr_db(reference, reference) == math.inf  # unchanged otherwise


def test_model_metrics_of_a_model_that_gives_nan() -> None:
    from ptqkit.eval.evaluate import model_metrics

    good = NaNHead().eval()
    good.mask.zero_()
    metrics = model_metrics(good, _nan_head(), pq.CalibrationData.from_tensors(torch.randn(16, 16)))
    assert metrics["top1_agreement"] == 0.0 and metrics["top5_agreement"] == 0.0
    assert metrics["output_sqnr_db"] == -math.inf and metrics["softmax_kl"] == math.inf


def test_eval_of_a_run_that_gives_nan_reports_failure_not_nan(tmp_path: Path) -> None:
    data = tmp_path / "x.pt"
    torch.save(torch.randn(16, 16), data)
    run = tmp_path / "run"
    quantized = run_cli("quantize", "--model", f"{__name__}:_nan_head", "--calib", data, "--preset", "w8a8_dynamic", "--out", run, "--quiet")
    assert quantized.code == 0, quantized.stderr[-2000:]
    result = run_cli("eval", run, "--data", data, "--trust-factory", "--json")
    assert result.code == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)["metrics"]
    # was: SQNR nan and agreement 1.0 (torch's argmax picks the NaN on both sides); a NaN row is a failure
    assert metrics["top1_agreement"] == 0.0 and metrics["top5_agreement"] == 0.0
    assert metrics["output_sqnr_db"] == -math.inf and metrics["softmax_kl"] == math.inf


def test_the_search_budget_refuses_nan() -> None:
    from ptqkit.mixed_precision.search import SearchPoint, search

    point = SearchPoint(name="p", assignment={}, metric=math.nan, degradation=math.nan, measured_ms=1.0, predicted_ms=1.0, weight_bytes=1)
    assert not point.within(0.1) and not point.within(math.inf)
    for option in ({"max_degradation": math.nan}, {"max_degradation": 0.1, "min_speedup": math.inf}, {"max_degradation": 0.1, "time_limit_s": -1.0}):
        with pytest.raises(ConfigError, match=r"search\.(max_degradation|min_speedup|time_limit_s): .* must be a number"):
            search(nn.Linear(4, 4), [torch.randn(2, 4)], **option)


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--max-degradation", "nan", "--max-degradation nan: must be a finite number"),
        ("--max-degradation", "inf", "--max-degradation inf: must be a finite number"),
        ("--min-speedup", "inf", "--min-speedup inf: must be a finite number >= 0"),
        ("--min-speedup", "-1", "--min-speedup -1.0: must be a finite number >= 0"),
        ("--time-limit", "nan", "--time-limit nan: must be a finite number >= 0"),
    ],
)
def test_cli_float_options_refuse_nan_and_inf(tmp_path: Path, digits, option: str, value: str, fragment: str) -> None:
    args = ["search", "--model", "ptqkit.models.digits_cnn:DigitsCNN", "--data", digits.calib, "--out", tmp_path / "s", "--max-degradation", "0.1"]
    if option == "--max-degradation":
        args = args[:-2]
    result = run_cli(*args, option, value)
    assert_refused(result, 2, fragment)
    assert not (tmp_path / "s").exists()


def test_doctor_and_suggest_thresholds_refuse_nan() -> None:
    from ptqkit.eval.doctor import DoctorConfig
    from ptqkit.eval.sensitivity import suggest

    with pytest.raises(ConfigError, match=r"doctor\.max_clip_rate: nan must be a number > 0, and finite"):
        DoctorConfig(max_clip_rate=math.nan)
    with pytest.raises(ConfigError, match=r"doctor\.outlier_ratio: inf must be a number > 0, and finite"):
        DoctorConfig(outlier_ratio=math.inf)
    with pytest.raises(ConfigError, match=r"suggest: min_gain=nan must be a finite number"):
        suggest(nn.Linear(4, 4), pq.Recipe.from_preset("w8a16"), None, None, min_gain=math.nan)
