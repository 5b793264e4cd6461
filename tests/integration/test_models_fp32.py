"""The bundled real models in FP32: proofs that loading, architecture and preprocessing are right
before anything is quantized. Measured values are written beside each threshold."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptqkit.models.mobilenet_v2 import imagenet_preprocess

pytestmark = pytest.mark.integration


def _sentence_embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe for all-MiniLM-L6-v2: masked mean pooling, then L2 norm."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, T, 384]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T] -> [B, T, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # [B, 384]
    return F.normalize(pooled, dim=-1)


def test_minilm_paraphrases_are_closer_than_unrelated(minilm) -> None:
    model, tokenizer = minilm
    emb = _sentence_embeddings(
        model,
        tokenizer,
        [
            "A man is playing a guitar on stage.",
            "Someone performs music with a guitar in front of an audience.",
            "The central bank raised interest rates by half a percent.",
        ],
    )
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    paraphrase = float(emb[0] @ emb[1])
    unrelated = float(emb[0] @ emb[2])
    # measured: paraphrase 0.638, unrelated -0.086
    assert paraphrase > 0.5
    assert abs(unrelated) < 0.2
    assert paraphrase - unrelated > 0.4


def test_smollm2_fp32_perplexity_on_python_docs(smollm2, python_doc_eval_texts, record_property) -> None:
    model, tokenizer = smollm2
    ids = tokenizer("\n\n".join(python_doc_eval_texts[:60]), return_tensors="pt")["input_ids"][0]
    windows = ids[: 2 * 512].view(2, 512)  # [1024] -> [2 windows, 512 tokens]
    assert windows.shape == (2, 512)
    with torch.no_grad():
        logits = model(windows).logits  # [2, 512, vocab]
    # predict token t+1 from tokens <= t: logits [2, 511, vocab] -> [1022, vocab], targets [1022]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    record_property("smollm2_fp32_ppl_python_docs_2x512", ppl)
    # measured: 36.1 (a 135M model on unrelated API-doc paragraphs; a broken model gives >1000,
    # uniform guessing 49152)
    assert math.isfinite(ppl)
    assert 5.0 < ppl < 60.0, ppl


def test_mobilenet_v2_recognises_the_cat_and_the_coffee(mobilenet_v2) -> None:
    import skimage.data

    batch = imagenet_preprocess([skimage.data.chelsea(), skimage.data.coffee()])  # [2, 3, 224, 224]
    with torch.no_grad():
        logits = mobilenet_v2(batch)  # [2, 1000]
    top1 = logits.argmax(dim=1).tolist()
    # measured: chelsea -> 285 (Egyptian cat; 282 tiger cat 2nd), coffee -> 967 (espresso)
    assert top1[0] in {281, 282, 283, 284, 285}, top1
    assert top1[1] in {967, 968, 504}, top1
    probs = logits.softmax(dim=1).max(dim=1).values
    assert (probs > 0.3).all(), probs  # measured 0.72 / 0.99


def test_digits_splits(digits_data) -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    (x_train, y_train), (x_test, y_test) = digits_data["train"], digits_data["test"]
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    # stratified: every class has round(0.25 * count) test samples
    counts = np.bincount(reference.target, minlength=10)
    assert y_test.bincount(minlength=10).tolist() == [int(round(0.25 * c)) for c in counts]
    # the two splits are exactly the dataset, each image with its own label
    all_x = torch.cat([x_train, x_test]).flatten(1)  # [1797, 64]
    all_y = torch.cat([y_train, y_test])
    ref_x = torch.from_numpy(reference.data.astype(np.float32) / 16.0)  # [1797, 64]
    order_ref = sorted(range(len(ref_x)), key=lambda i: (ref_x[i].tolist(), int(reference.target[i])))
    order_ours = sorted(range(len(all_x)), key=lambda i: (all_x[i].tolist(), int(all_y[i])))
    assert torch.equal(all_x[order_ours], ref_x[order_ref])
    assert all_y[order_ours].tolist() == reference.target[order_ref].tolist()
