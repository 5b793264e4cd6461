"""RTN: round-to-nearest weight quantization, the baseline every LLM weight algorithm is
measured against, with optional per-channel / per-group MSE clip search.

The clip search tries, for every quantization parameter (tensor, output channel or group), the
shrink ratios 1, 1 - max_shrink/grid, ..., 1 - max_shrink (the `grid + 1` candidates that
llm-compressor's and AWQ's searches also use) and, with `search_scale_rules`, every scale rule
of `weight_quant.SCALE_RULES` that applies to the spec; it keeps the candidate with the
smallest Σ|w - ŵ|^norm over that parameter's elements (first candidate wins ties). The loop is
over candidates; each candidate is evaluated for all parameters at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from ptqkit.algorithms.weight_quant import (
    SCALE_RULES,
    ScaleRule,
    WeightQuantResult,
    check_scale_rule,
    check_weight_spec,
    clipped_weight_qparams,
    expand_qparams,
    quant_dequant,
)
from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import Interval, check_fields, literal_values
from ptqkit.core.primitives import dequantize, quantize
from ptqkit.core.spec import QParams, QuantSpec

__all__ = ["RTNConfig", "round_to_grid", "rtn_candidates", "rtn_qparams", "rtn_quantize_weight"]

ClipSearch = Literal["none", "mse"]
CLIP_SEARCHES: tuple[str, ...] = literal_values(ClipSearch)


@dataclass(frozen=True, kw_only=True)
class RTNConfig:
    """Round-to-nearest weight quantization.

    - `clip_search`: "none" (min-max range) or "mse" (per-parameter search of the clip ratio).
    - `grid`: number of shrink steps of the search (candidates: grid + 1 ratios).
    - `max_shrink`: the smallest ratio tried is 1 - max_shrink, in [0, 1).
    - `norm`: the error exponent p of the search objective Σ|w - ŵ|^p (2 = squared error).
    - `scale_rule`: how a symmetric signed scale is derived from the range (see
      `ptqkit.algorithms.weight_quant`): "range" (2·absmax/(qmax-qmin), the spec's default),
      "qmax" (absmax/7 for int4), "qmin" (absmax/8), "signed" (no clipping, extreme on its end).
    - `search_scale_rules`: with clip_search="mse", also search every applicable scale rule.
    """

    clip_search: ClipSearch = "none"
    grid: Annotated[int, Interval(1, 1000)] = 20
    max_shrink: Annotated[float, Interval(0, 1, "[)")] = 0.5
    norm: Annotated[float, Interval(0, 10, "(]")] = 2.0
    scale_rule: ScaleRule = "range"
    search_scale_rules: bool = False
    name: ClassVar[str] = "rtn"

    def __post_init__(self) -> None:
        check_fields(self, "rtn")
        if self.search_scale_rules and self.clip_search == "none":
            raise ConfigError(
                "rtn.search_scale_rules=true needs clip_search='mse' (there is nothing to search)"
            )


def rtn_candidates(spec: QuantSpec, config: RTNConfig) -> list[tuple[str, float]]:
    """The (scale_rule, clip_ratio) candidates the search tries, in tie-breaking order."""
    if config.clip_search == "none":
        return [(config.scale_rule, 1.0)]
    signed_sym = spec.symmetric and spec.qtype.signed
    rules = (
        [r for r in SCALE_RULES if signed_sym or r == "range"]
        if config.search_scale_rules
        else [config.scale_rule]
    )
    if config.scale_rule in rules:  # the configured rule first: it wins ties
        rules.remove(config.scale_rule)
        rules.insert(0, config.scale_rule)
    ratios = [1.0 - config.max_shrink * k / config.grid for k in range(config.grid + 1)]
    return [(rule, ratio) for rule in rules for ratio in ratios]


def rtn_qparams(w: torch.Tensor, spec: QuantSpec, config: RTNConfig | None = None) -> QParams:
    """QParams of `w` [out, in] under `spec`: min-max, or the per-parameter best candidate of
    the MSE clip search (see the module docstring)."""
    config = config or RTNConfig()
    check_weight_spec(w, spec)
    check_scale_rule(config.scale_rule, spec, "rtn.scale_rule")
    candidates = rtn_candidates(spec, config)
    if len(candidates) == 1:
        rule, ratio = candidates[0]
        return clipped_weight_qparams(w, spec, ratio, scale_rule=rule)
    g = spec.granularity
    work = w.detach().to(torch.float32)
    qmin, qmax = float(spec.qtype.qmin), float(spec.qtype.qmax)
    best: QParams | None = None
    best_err = None
    for rule, ratio in candidates:
        qp = clipped_weight_qparams(work, spec, ratio, scale_rule=rule)
        scale, zero = expand_qparams(qp, work.shape)  # [out, in] each
        _, deq = quant_dequant(work, scale, zero, qmin, qmax, spec.rounding)
        err = g.reduce((deq - work).abs().pow(config.norm), torch.sum)  # [param_shape]
        if best is None:
            best, best_err = qp, err
            continue
        better = err < best_err  # [param_shape]; strict: earlier candidates win ties
        best_err = torch.where(better, err, best_err)
        best = QParams(
            torch.where(better, qp.scale, best.scale),
            torch.where(better, qp.zero_point, best.zero_point),
            spec.qtype,
            g,
        )
    assert best is not None
    return best


def rtn_quantize_weight(
    w: torch.Tensor, spec: QuantSpec, config: RTNConfig | None = None
) -> WeightQuantResult:
    """Round-to-nearest quantization of a Linear weight `w` [out, in] under `spec`."""
    config = config or RTNConfig()
    return round_to_grid(w, rtn_qparams(w, spec, config), spec)


def round_to_grid(w: torch.Tensor, qparams: QParams, spec: QuantSpec) -> WeightQuantResult:
    """Round-to-nearest codes of `w` on a given grid (`spec.rounding`), and their dequantized values."""
    codes = quantize(w.detach(), qparams, spec.rounding)  # [out, ...]
    return WeightQuantResult(codes=codes, qparams=qparams, dequantized=dequantize(codes, qparams, dtype=w.dtype))
