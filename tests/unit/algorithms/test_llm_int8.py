"""LLM.int8() outlier decomposition: the split is exact, outlier columns pass through in float,
it beats plain per-token int8 on inputs with outlier channels, reports its outlier share,
round-trips through the artifact and is refused by the ONNX exporter."""
from __future__ import annotations

import pytest
import torch

import ptqkit as pq
from ptqkit.algorithms import LLMInt8Config
from ptqkit.algorithms.llm_int8 import outlier_columns, split_outliers
from ptqkit.core.errors import ConfigError, ExportError
from ptqkit.export import artifact
from ptqkit.export.load import load_artifact
from ptqkit.nn.act_quant import OutlierKeepingQuantizer

from .tiny_transformers import outputs, tiny_llama, token_batch


def test_split_is_exact_and_picks_columns_by_threshold() -> None:
    x = torch.tensor([[[0.5, 7.0, -1.0], [0.2, 0.1, -6.5]]])  # [1, 2, 3]
    assert outlier_columns(x, 6.0).tolist() == [False, True, True]
    regular, outliers, _ = split_outliers(x, 6.0)
    assert torch.equal(regular + outliers, x)
    assert torch.equal(regular[..., 1:], torch.zeros(1, 2, 2))
    with pytest.raises(ConfigError, match="llm_int8.threshold: 0 must be a positive number"):
        LLMInt8Config(threshold=0)


def test_outlier_columns_pass_through_in_float() -> None:
    spec = pq.Recipe.from_preset("w8a8_dynamic").scheme.inputs
    quantizer = OutlierKeepingQuantizer(spec, threshold=6.0)
    x = torch.randn(4, 16)
    x[:, 5] = 40.0 + torch.arange(4.0)  # an outlier channel
    y = quantizer(x)
    assert torch.equal(y[:, 5], x[:, 5])
    from ptqkit.nn.act_quant import InputQuantizer

    plain = InputQuantizer(spec)(x)
    keep = [c for c in range(16) if c != 5]
    assert (y - x)[:, keep].abs().max() < 0.2 * (plain - x)[:, keep].abs().max()
    assert quantizer.outlier_fraction == pytest.approx(1 / 16)


def test_llm_int8_on_a_model_reports_outliers_and_round_trips(tmp_path) -> None:
    model = tiny_llama()  # norms with 8x channels: hidden states exceed 6 in a few columns
    ids = token_batch(samples=8, length=24)
    recipe = pq.Recipe.from_preset("w8a8_dynamic", keep_output_head=True, algorithms=(LLMInt8Config(threshold=2.0),))
    quantized = pq.quantize(model, recipe, progress=False)
    reference = outputs(model, ids)
    plain = pq.quantize(model, pq.Recipe.from_preset("w8a8_dynamic", keep_output_head=True), progress=False)
    error = float((outputs(quantized, ids) - reference).norm())
    assert error < float((outputs(plain, ids) - reference).norm())
    fractions = {n: m.input_quantizer.outlier_fraction for n, m in quantized.named_modules() if isinstance(getattr(m, "input_quantizer", None), OutlierKeepingQuantizer)}
    assert len(fractions) == 14 and any(f > 0 for f in fractions.values())
    artifact.save_artifact(quantized, tmp_path / "q")
    loaded = load_artifact(tmp_path / "q", tiny_llama())
    assert torch.equal(outputs(loaded, ids), outputs(quantized, ids))
    with pytest.raises(ExportError, match=r"LLM.int8 outlier decomposition .* is a simulated scheme with no ONNX form"):
        pq.export(quantized, tmp_path / "onnx", formats=["onnx"], example_inputs={"input_ids": ids})


def test_llm_int8_needs_dynamic_inputs() -> None:
    with pytest.raises(ConfigError, match="llm_int8 decomposes dynamically quantized inputs, but recipe 'w8a16' has no input quantization"):
        pq.quantize(tiny_llama(), pq.Recipe.from_preset("w8a16", algorithms=(LLMInt8Config(),)), progress=False)
