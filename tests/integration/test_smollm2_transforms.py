"""SmoothQuant and AWQ scaling are function-preserving on the real SmolLM2-135M (30 LLaMA
blocks; grouped-query attention, so v_proj -> o_proj is skipped by the table)."""
from __future__ import annotations

import copy

import pytest
import torch

import ptqkit as pq
from ptqkit.algorithms import AWQConfig, SmoothQuantConfig
from ptqkit.algorithms.blockwise import transform_blocks_
from ptqkit.eval.metrics import token_windows

pytestmark = pytest.mark.integration


def test_smoothquant_and_awq_scaling_leave_smollm2_unchanged(smollm2, shakespeare_calib_texts, python_doc_eval_texts) -> None:
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    calib = token_windows(tokenizer, shakespeare_calib_texts[:64], window=128, max_windows=2)
    evaluation = token_windows(tokenizer, python_doc_eval_texts[:40], window=128, max_windows=2)
    with torch.inference_mode():
        reference = model(input_ids=evaluation).logits
    spec = pq.Recipe.from_preset("w4a16").scheme.weights
    targets = {n: ("Linear", spec) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    details = transform_blocks_(
        model, targets, (SmoothQuantConfig(alpha=0.5), AWQConfig(grid=4, clip=False)), [{"input_ids": calib}], max_samples=2, progress=False
    )
    assert len(details) == 30 and all(len(d["smoothquant"]) == 3 for d in details.values())  # 3 groups per block
    with torch.inference_mode():
        logits = model(input_ids=evaluation).logits
    # measured (grid 20): relative error 9.3e-7, max abs 7.2e-5 on logits up to ~30, top-1 identical
    assert float((logits - reference).norm() / reference.norm()) < 1e-5
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
