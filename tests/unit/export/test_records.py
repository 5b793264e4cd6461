"""Artifact records are registered by module type: every module the engine makes has one row,
saving and loading only look rows up, and a new quantized module type is one more row."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ArtifactError
from ptqkit.export import records
from ptqkit.export.artifact import QUANT_FILE, save_artifact
from ptqkit.export.load import load_artifact
from ptqkit.export.records import MODULE_RECORDS, ModuleRecord, module_names
from ptqkit.nn.modules import InputOnly, QuantConv, QuantEmbedding, QuantLinear


def test_each_engine_module_type_has_one_row() -> None:
    assert set(MODULE_RECORDS) == {QuantLinear, QuantConv, QuantEmbedding, InputOnly}
    assert module_names() == ("InputOnly", "QuantConv", "QuantEmbedding", "QuantLinear")
    assert all(row.module_type is key for key, row in MODULE_RECORDS.items())
    assert [row.module for row in MODULE_RECORDS.values() if not row.weights] == ["InputOnly"]


class LabelledQuantLinear(QuantLinear):
    """A new quantized module type for the test: a QuantLinear carrying a label that must survive
    save and load (state the record itself holds, not a tensor)."""

    def __init__(self, *args: Any, label: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label = label


def _labelled_row() -> ModuleRecord:
    return ModuleRecord(
        "LabelledQuantLinear", LabelledQuantLinear, True,
        lambda p: LabelledQuantLinear(
            p.template, getattr(p.skeleton, "bias", None), p.qparams, p.spec, p.inputs, codes=p.codes, label=p.record.extra["label"]
        ),
        lambda module: {"label": module.label},
    )


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _relabelled(qmodel: nn.Module) -> nn.Module:
    """`qmodel` with its first QuantLinear swapped for the new type (same codes and QParams)."""
    old = qmodel[0]
    new = LabelledQuantLinear(old.weight, old.bias, old.weight_qparams, old.weight_spec, old.input_quantizer, codes=old.weight_codes, label="kept")
    qmodel[0] = new
    return qmodel


def test_a_new_module_type_is_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qmodel = _relabelled(pq.quantize(_model(), pq.Recipe.from_preset("w8a8_dynamic"), progress=False))
    with pytest.raises(ArtifactError, match="layer '0' is a LabelledQuantLinear, not a ptqkit quantized module"):
        save_artifact(qmodel, tmp_path / "without-row")
    monkeypatch.setitem(MODULE_RECORDS, LabelledQuantLinear, _labelled_row())
    save_artifact(qmodel, tmp_path / "a")
    layer = json.loads((tmp_path / "a" / QUANT_FILE).read_text())["layers"][0]
    assert layer["module"] == "LabelledQuantLinear" and layer["label"] == "kept"
    loaded = load_artifact(tmp_path / "a", _model())
    assert type(loaded[0]) is LabelledQuantLinear and loaded[0].label == "kept"
    assert torch.equal(loaded[0].weight_codes, qmodel[0].weight_codes) and torch.equal(loaded[0].weight_scale, qmodel[0].weight_scale)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x), qmodel(x))


def test_an_unknown_module_name_is_refused_with_the_valid_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODULE_RECORDS, LabelledQuantLinear, _labelled_row())
    save_artifact(_relabelled(pq.quantize(_model(), pq.Recipe.from_preset("w8a8_dynamic"), progress=False)), tmp_path / "a")
    monkeypatch.delitem(MODULE_RECORDS, LabelledQuantLinear)
    with pytest.raises(ArtifactError, match=r"layers\[0\]\.module 'LabelledQuantLinear' is unknown; valid: \['InputOnly', 'QuantConv'"):
        load_artifact(tmp_path / "a", _model())


def test_built_entries_are_the_ones_read_from_the_artifact() -> None:
    qmodel = pq.quantize(_model(), pq.Recipe.from_preset("w8a16"), progress=False)
    assert records.built_entries(qmodel[0]) == ["weight_codes", "weight_scale", "weight_zero_point"]  # not the bias
    wrapped = InputOnly(nn.Linear(4, 4), None)
    assert records.built_entries(wrapped) == []  # the wrapped float module's weights come from the state dict
