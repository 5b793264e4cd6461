"""Per-layer formats on real kernels, their stored bytes, and the on-disk latency table."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.mixed_precision.formats import FORMATS, format_module, weight_bytes
from ptqkit.mixed_precision.latency import LatencyTable, linear_rows
from ptqkit.nn.packed import Int4WeightOnlyLinear, Int8WeightOnlyLinear


def _linear(k: int = 256, n: int = 128) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n)


@pytest.mark.parametrize("fmt", ["bf16", "int8_wo", "int8_dyn", "int4_g128", "int4_g64"])
def test_formats_run_on_their_kernels_close_to_float(fmt: str) -> None:
    linear = _linear()
    module = format_module(linear, fmt)
    assert not isinstance(module, str)
    if fmt == "int8_wo":
        assert isinstance(module, Int8WeightOnlyLinear)
    if fmt.startswith("int4"):
        assert isinstance(module, Int4WeightOnlyLinear) and module.group_size == int(fmt[-2:] if fmt.endswith("64") else 128)
    x = torch.randn(8, 256)
    with torch.no_grad():
        reference, got = linear(x), module(x)
    error = float((got - reference).norm() / reference.norm())
    assert error < {"bf16": 0.01, "int8_wo": 0.02, "int8_dyn": 0.03, "int4_g128": 0.15, "int4_g64": 0.15}[fmt], error
    assert format_module(linear, "fp32") is linear


def test_refusals_name_the_reason() -> None:
    wide = nn.Linear(576, 192)  # SmolLM2's width: 4.5 groups of 128
    assert "4.5 groups" in format_module(wide, "int4_g128")
    assert not isinstance(format_module(wide, "int4_g64"), str)
    with pytest.raises(ConfigError, match="format 'int3' is unknown"):
        format_module(wide, "int3")
    assert "not an nn.Linear" in format_module(nn.Conv2d(3, 4, 1), "int8_wo")


def test_weight_bytes() -> None:
    linear = _linear(256, 128)
    assert weight_bytes(linear, "fp32") == 256 * 128 * 4
    assert weight_bytes(linear, "int8_wo") == 256 * 128 + 4 * 128
    assert weight_bytes(linear, "int4_g128") == 256 * 128 // 2 + 4 * 128 * 2
    assert weight_bytes(linear, "int8_dyn") == weight_bytes(linear, "int8_wo")
    assert set(FORMATS) == {"fp32", "bf16", "int8_wo", "int8_dyn", "int4_g128", "int4_g64"}


def test_latency_table_caches_by_machine_and_threads(tmp_path: Path, caplog) -> None:
    path = tmp_path / "latency.json"
    table = LatencyTable(path, threads=1, warmup=0, reps=2)
    linear = _linear()
    first = table.layer_ms(linear, "int8_wo", tokens=4)
    assert first > 0 and table.measured == 1
    assert table.layer_ms(linear, "int8_wo", tokens=4) == first and table.measured == 1  # cached in memory
    again = LatencyTable(path, threads=1, warmup=0, reps=2)
    assert again.layer_ms(linear, "int8_wo", tokens=4) == first and again.measured == 0  # read from disk
    other = LatencyTable(path, threads=2, warmup=0, reps=2)
    other.layer_ms(linear, "int8_wo", tokens=4)
    assert other.measured == 1  # another thread count is another key
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 2 and all("threads" in key and "256x128" in key for key in entries)
    assert table.layer_ms(nn.Linear(576, 192), "int4_g128", tokens=4) is None  # no kernel: nothing measured
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ptqkit.mixed_precision.latency"):
        assert LatencyTable(path, threads=1)._entries == {}
    assert "unreadable" in caplog.text


def test_prediction_swaps_measured_layer_costs_into_the_float_latency(tmp_path: Path, monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    rows = linear_rows(model, torch.randn(2, 3, 64))
    assert rows == {"0": 6, "2": 6}  # every dimension but the last
    table = LatencyTable(tmp_path / "t.json", threads=1)
    costs = {("0", "fp32"): 1.0, ("2", "fp32"): 2.0, ("0", "int8_wo"): 0.4, ("2", "int8_wo"): 0.5}
    names = {id(model[0]): "0", id(model[2]): "2"}
    monkeypatch.setattr(table, "layer_ms", lambda linear, fmt, rows: costs[(names[id(linear)], fmt)])
    assert table.predict_ms(model, {"0": "int8_wo"}, None, rows, float_ms=3.5) == pytest.approx(3.5 - 1.0 + 0.4)
    assert table.predict_ms(model, {"0": "int8_wo", "2": "int8_wo"}, None, rows, float_ms=3.5) == pytest.approx(3.5 - 3.0 + 0.9)
    inside = {"0": 1.7}  # the float layer's time inside the model replaces its time alone
    assert table.predict_ms(model, {"0": "int8_wo"}, None, rows, float_ms=3.5, inside=inside) == pytest.approx(3.5 - 1.7 + 0.4)
    with pytest.raises(ConfigError, match=r"\['1'\] are not nn.Linear modules"):
        table.predict_ms(model, {"1": "int8_wo"}, None, rows, float_ms=3.5)


def test_rows_follow_the_calls() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token, self.pooler = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pooler(self.token(x)[:, 0])  # the pooler sees one row per sequence

    assert linear_rows(Pooled(), torch.randn(4, 16, 8)) == {"token": 64, "pooler": 4}


def test_linear_times_inside_the_model_cover_every_called_linear() -> None:
    from ptqkit.mixed_precision.latency import linear_ms_inside

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 8))
    inside = linear_ms_inside(model, torch.randn(4, 64), threads=1, reps=3)
    assert set(inside) == {"0", "2", "3"} and all(v > 0 for v in inside.values())
