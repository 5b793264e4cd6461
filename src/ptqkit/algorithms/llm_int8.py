"""LLM.int8() outlier decomposition (Dettmers et al., 2022, "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale"), as a simulated scheme.

A few hidden-state channels of large transformers carry values far above the rest (|x| > 6);
int8 per-token quantization of such a row spends its whole range on them. LLM.int8() splits the
matrix product by input column: columns where any element of the current input exceeds the
threshold stay in 16/32-bit, the rest are quantized per token to int8:

    y = Q(x_regular) · Ŵᵀ + x_outlier · Ŵᵀ

with Ŵ the int8 (per output channel) weights, x_regular = x with the outlier columns zeroed and
x_outlier = x on them only. The columns are chosen per call, as in the paper. The quantizer
counts how many input columns it kept in float (`OutlierKeepingQuantizer.outlier_fraction`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ptqkit.core.errors import ConfigError
from ptqkit.nn.act_quant import outlier_columns, split_outliers

__all__ = ["LLMInt8Config", "outlier_columns", "split_outliers"]


@dataclass(frozen=True, kw_only=True)
class LLMInt8Config:
    """`threshold`: an input column is an outlier when any |x| in it exceeds this (6.0 in the paper)."""

    threshold: float = 6.0
    name: ClassVar[str] = "llm_int8"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 < self.threshold < math.inf:
            raise ConfigError(f"llm_int8.threshold: {self.threshold!r} must be a positive number")
