"""Fixtures shared by the algorithm tests."""
from __future__ import annotations

import pytest

import ptqkit as pq

from .tiny_transformers import tiny_bert, token_batch


@pytest.fixture(scope="module")
def bert_case():
    """(tiny BERT whose LayerNorm weights have 8x channels, i.e. outlier input columns; 16 x 16
    token ids; calibration data on them in batches of 8)."""
    model = tiny_bert()
    ids = token_batch(samples=16, length=16)
    calib = pq.CalibrationData.from_tensors([{"input_ids": row} for row in ids], batch_size=8)
    return model, ids, calib
