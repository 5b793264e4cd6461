"""Issue 5's quality floors on real models shipped in PyPI packages (measured values beside
each threshold). Calibration and evaluation data never share a source."""
from __future__ import annotations

import pytest
import torch

import ptqkit as pq
from ptqkit.eval.metrics import (
    embedding_cosine,
    logits_of,
    mean_pooled_embeddings,
    output_sqnr_db,
    perplexity,
    token_windows,
    top1_agreement,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm_eval(minilm, python_doc_eval_texts):
    model, tokenizer = minilm
    texts = python_doc_eval_texts[:500]
    assert len(texts) >= 500
    return texts, mean_pooled_embeddings(model, tokenizer, texts)


def test_minilm_w8a8_static(minilm, shakespeare_calib_texts, minilm_eval) -> None:
    model, tokenizer = minilm
    texts, reference = minilm_eval
    calib = pq.CalibrationData.from_text(shakespeare_calib_texts[:256], tokenizer, max_length=128, batch_size=16)
    assert len(calib) == 256
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    cosine = embedding_cosine(reference, mean_pooled_embeddings(qmodel, tokenizer, texts))
    assert cosine.mean() >= 0.99  # measured 0.9934 (500 Python-doc paragraphs)
    size = pq.model_size(qmodel)
    assert size.quantized_layers == 37  # 6 blocks x 6 Linear + the pooler
    assert 0.25 <= size.ratio <= 0.26  # int8 codes + fp32 per-channel scales: measured 0.252


def test_minilm_w8a8_dynamic(minilm, minilm_eval) -> None:
    model, tokenizer = minilm
    texts, reference = minilm_eval
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8_dynamic"), progress=False)
    cosine = embedding_cosine(reference, mean_pooled_embeddings(qmodel, tokenizer, texts))
    assert cosine.mean() >= 0.995  # measured 0.9991 (per-token uint8; 0.9933 per tensor)


@pytest.fixture(scope="module")
def smollm2_windows(smollm2, python_doc_eval_texts):
    _, tokenizer = smollm2
    return token_windows(tokenizer, python_doc_eval_texts, window=512, max_windows=6)


@pytest.fixture(scope="module")
def smollm2_fp32_ppl(smollm2, smollm2_windows):
    return perplexity(smollm2[0], smollm2_windows)


def test_smollm2_w8a16_within_one_percent(smollm2, smollm2_windows, smollm2_fp32_ppl) -> None:
    qmodel = pq.quantize(smollm2[0], pq.Recipe.from_preset("w8a16"), progress=False)
    ppl = perplexity(qmodel, smollm2_windows)
    assert ppl <= smollm2_fp32_ppl * 1.01, (ppl, smollm2_fp32_ppl)  # measured 39.93 vs FP32 39.86 (+0.17%)
    size = pq.model_size(qmodel)
    assert 0.25 <= size.ratio <= 0.26  # measured 0.2515
    # lm_head is tied to the embedding and kept in float (keep_output_head)
    assert "lm_head" not in [layer.name for layer in qmodel.ptqkit_info.plan.layers]


def test_smollm2_w4a16_g128_is_measured(smollm2, smollm2_windows, smollm2_fp32_ppl, record_property) -> None:
    qmodel = pq.quantize(smollm2[0], pq.Recipe.from_preset("w4a16", group_size=128), progress=False)
    ppl = perplexity(qmodel, smollm2_windows)
    record_property("smollm2_w4a16_g128_ppl", ppl)
    record_property("smollm2_fp32_ppl", smollm2_fp32_ppl)
    # RTN int4 g128 is much worse than FP32 (GPTQ/AWQ, issue 7, are to recover it):
    # measured 59.93 vs FP32 39.86 (x1.50) on 6 x 512 Python-doc tokens
    assert smollm2_fp32_ppl < ppl < smollm2_fp32_ppl * 1.6
    size = pq.model_size(qmodel)
    # int4 codes (1/8 of fp32) plus one fp32 scale per 128 weights (1/128): 0.133 with 576 = 4.5 groups
    assert 0.125 < size.ratio < 0.14  # measured 0.1335


def test_mobilenet_v2_w8a8_per_channel(mobilenet_v2, photo_crops_calib, photo_crops_eval) -> None:
    assert len(photo_crops_eval) >= 500
    calib = pq.CalibrationData.from_tensors(photo_crops_calib[:128], batch_size=16)
    qmodel = pq.quantize(mobilenet_v2, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    reference = logits_of(mobilenet_v2, photo_crops_eval)
    quantized = logits_of(qmodel, photo_crops_eval)
    agreement = top1_agreement(reference, quantized)
    sqnr = output_sqnr_db(reference, quantized)
    assert agreement >= 0.90, (agreement, sqnr)  # measured 0.928 on 512 crops
    assert sqnr > 10.0  # measured 14.5 dB logit SQNR
    assert torch.isfinite(quantized).all()
