"""The recipes and data that data-parallel calibration is tested on, shared by the torchrun
worker (`worker.py`) and the single-process reference in the tests."""
from __future__ import annotations

from dataclasses import replace

import ptqkit as pq
from ptqkit.algorithms import AWQConfig, GPTQConfig, SmoothQuantConfig
from ptqkit.engine.recipe import CalibrationSettings

from ..algorithms.tiny_transformers import tiny_llama, token_batch

SAMPLES, BATCH = 12, 2  # 6 batches: 3 per rank on 2 ranks


def _calibrated(recipe: pq.Recipe) -> pq.Recipe:
    return replace(recipe, calibration=CalibrationSettings(samples=SAMPLES, batch_size=BATCH))


# byte-identical: min-max, histogram and max statistics merge exactly
EXACT = {
    "w8a8_minmax": lambda: _calibrated(pq.Recipe.from_preset("w8a8")),
    "w8a8_percentile": lambda: _calibrated(pq.Recipe.from_preset("w8a8", observer="percentile")),
    "w8a8_kl": lambda: _calibrated(pq.Recipe.from_preset("w8a8", observer="kl")),
    "w8a8_smoothquant": lambda: _calibrated(pq.Recipe.from_preset("w8a8", algorithms=(SmoothQuantConfig(alpha=0.5),))),
}
# sums (Hessians, mean |x|) are added in another order: equal to float rounding
SUMMED = {
    "w4_gptq": lambda: _calibrated(pq.Recipe.from_preset("w4a16", group_size=16, algorithms=(GPTQConfig(),))),
    "w4_awq_gptq": lambda: _calibrated(pq.Recipe.from_preset("w4a16", group_size=16, algorithms=(AWQConfig(grid=10), GPTQConfig()))),
}
CASES = {**EXACT, **SUMMED}


def model_and_data() -> tuple[object, pq.CalibrationData]:
    ids = token_batch(samples=SAMPLES, length=24, seed=3)
    return tiny_llama(), pq.CalibrationData.from_tensors({"input_ids": ids})


def eval_windows() -> object:
    return token_batch(samples=7, length=20, seed=9)  # 4 batches of 2 (the last of 1)
