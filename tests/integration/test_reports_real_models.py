"""Issue 9 on real models: reports for MiniLM W8A8, SmolLM2 W4A16 and MobileNetV2 W8A8, and the
doctor's findings the issue names (MobileNetV2 per-tensor: depthwise; SmolLM2 W8A8: outliers)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import ptqkit as pq
from ptqkit.core.qtypes import PerTensor
from ptqkit.core.spec import QuantSpec

pytestmark = pytest.mark.integration


def _report(qmodel, model, data, tmp_path: Path, title: str) -> dict:
    report = pq.evaluate(qmodel, model, data, max_samples=64)
    paths = pq.report(report, tmp_path / "report", title=title)
    assert paths["html"].stat().st_size > 2000
    return json.loads(paths["json"].read_text())


def test_minilm_w8a8_report(minilm, shakespeare_calib_texts, python_doc_eval_texts, tmp_path: Path) -> None:
    model, tokenizer = minilm
    calib = pq.CalibrationData.from_text(shakespeare_calib_texts[:64], tokenizer, max_length=128, batch_size=16)
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    data = pq.CalibrationData.from_text(python_doc_eval_texts[:64], tokenizer, max_length=128, batch_size=16)
    saved = _report(qmodel, model, data, tmp_path, "MiniLM W8A8")
    assert saved["samples"] == 64 and len(saved["layers"]) == 37
    assert saved["metrics"]["embedding_cosine_mean"] > 0.95  # mean-pooled, 64 docs paragraphs; measured 0.9931
    assert all(layer["weight_sqnr_db"] > 30 for layer in saved["layers"])  # int8 per-channel weights; measured min 33.5 dB
    assert "Embedding cosine to float" in saved["headline"]


def test_smollm2_w4a16_report(smollm2, whatsnew_calib_texts, python_doc_eval_texts, tmp_path: Path) -> None:
    model, tokenizer = smollm2
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w4a16", group_size=128), progress=False)  # data-free RTN
    data = pq.CalibrationData.from_text(python_doc_eval_texts[:16], tokenizer, max_length=128, batch_size=4)
    saved = _report(qmodel, model, data, tmp_path, "SmolLM2 W4A16")
    metrics = saved["metrics"]
    assert metrics["perplexity_float"] < metrics["perplexity_quantized"] < 2 * metrics["perplexity_float"]
    print("SMOL", metrics)
    assert 0.5 < metrics["next_token_agreement"] < 1
    assert len(saved["layers"]) == 210 and all(layer["clip_rate"] is None for layer in saved["layers"])  # float inputs


def test_mobilenet_v2_per_tensor_doctor_and_report(mobilenet_v2, photo_crops_calib, photo_crops_eval, tmp_path: Path) -> None:
    base = pq.Recipe.from_preset("w8a8")
    per_tensor = replace(base, scheme=replace(base.scheme, weights=QuantSpec(qtype="int8", granularity=PerTensor(), symmetric=True)))
    calib = pq.CalibrationData.from_tensors(photo_crops_calib[:64], batch_size=32)
    result = pq.doctor(mobilenet_v2, calib, per_tensor, eval_data=pq.CalibrationData.from_tensors(photo_crops_eval[:64], batch_size=32))
    finding = next(f for f in result.findings if f.id == "depthwise-per-tensor")
    assert len(finding.evidence["layers"]) == 17  # every depthwise conv of MobileNetV2
    paths = pq.report(result.report, tmp_path, title="MobileNetV2 W8A8 per-tensor", findings=result.to_dicts())
    saved = json.loads(paths["json"].read_text())
    assert "depthwise-per-tensor" in [f["id"] for f in saved["findings"]]
    assert 0.5 < saved["metrics"]["top1_agreement"] <= 1 and len(saved["layers"]) == 53  # measured 0.9375 on 64 crops


def test_smollm2_w8a8_doctor_finds_activation_outliers(smollm2, whatsnew_calib_texts, python_doc_eval_texts) -> None:
    model, tokenizer = smollm2
    calib = pq.CalibrationData.from_text(whatsnew_calib_texts[:16], tokenizer, max_length=128, batch_size=4)
    data = pq.CalibrationData.from_text(python_doc_eval_texts[:8], tokenizer, max_length=128, batch_size=4)
    result = pq.doctor(model, calib, pq.Recipe.from_preset("w8a8"), eval_data=data)
    finding = next(f for f in result.findings if f.id == "activation-outliers")
    assert max(finding.evidence["outlier_ratio"].values()) > 20  # measured 3372 (20 layers listed)
    assert "too-few-samples" in result.ids()  # 16 calibration texts
