"""Input-activation fake quantization: static (calibrated QParams) or dynamic (per call)."""
from __future__ import annotations

import torch
from torch import nn

from ptqkit.core.primitives import fake_quantize, qparams_from_tensor
from ptqkit.core.qtypes import PerTensor
from ptqkit.core.spec import QParams, QuantSpec

__all__ = [
    "InputQuantizer",
    "OutlierKeepingQuantizer",
    "OutlierColumnsQuantizer",
    "SmoothedInputQuantizer",
    "outlier_columns",
    "split_outliers",
    "smoothed",
    "make_input_quantizer",
]


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask [C] of the input columns with any |x| > threshold, for x [..., C]."""
    return (x.detach().abs() > threshold).reshape(-1, x.shape[-1]).any(0)  # [C]


def split_outliers(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x with outlier columns zeroed, x on the outlier columns only, the mask [C]); the two
    parts add up to x exactly."""
    mask = outlier_columns(x, threshold)  # [C]
    outliers = x * mask.to(x.dtype)  # [..., C]
    return x - outliers, outliers, mask


def smoothed(x: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    """x [..., C] / divisors [C] in x's dtype: what a smoothed layer's quantizer quantizes."""
    return x / divisors.to(x.dtype)

class InputQuantizer(nn.Module):
    """Fake-quantizes a module's input.

    Static: uses the calibrated `qparams` (held as buffers so they follow `.to(device)`).
    Dynamic: computes min-max parameters from each incoming tensor (per tensor or per token).
    """

    def __init__(self, spec: QuantSpec, qparams: QParams | None = None) -> None:
        super().__init__()
        if spec.dynamic == (qparams is not None):
            raise ValueError("a static input spec needs calibrated qparams; a dynamic one must not have them")
        self.spec = spec
        if qparams is not None:
            self.register_buffer("scale", qparams.scale.detach().clone())
            self.register_buffer("zero_point", qparams.zero_point.detach().clone())

    @property
    def qparams(self) -> QParams | None:
        """The calibrated parameters (None for dynamic quantization)."""
        if self.spec.dynamic:
            return None
        return QParams(self.scale, self.zero_point, self.spec.qtype, self.spec.granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qparams = qparams_from_tensor(x, self.spec) if self.spec.dynamic else self.qparams
        return fake_quantize(x, qparams, self.spec.rounding)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.spec.dynamic else "static"
        return f"{self.spec.qtype.name}, {type(self.spec.granularity).__name__}, {mode}"


class OutlierKeepingQuantizer(InputQuantizer):
    """LLM.int8()'s input side: per call, the input columns with any |x| > `threshold` pass
    through in float, the others are fake-quantized dynamically (see `algorithms.llm_int8`).
    Counts the share of columns kept in float over all calls (`outlier_fraction`)."""

    def __init__(self, spec: QuantSpec, threshold: float) -> None:
        if not spec.dynamic:
            raise ValueError("LLM.int8 decomposition needs a dynamic input spec (per-token int8)")
        super().__init__(spec)
        self.outlier_threshold = float(threshold)
        self.register_buffer("_columns_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_outliers_seen", torch.zeros((), dtype=torch.float64), persistent=False)

    @property
    def outlier_fraction(self) -> float:
        """Share of input columns kept in float, over every call so far (0 before any)."""
        seen = float(self._columns_seen)
        return float(self._outliers_seen) / seen if seen else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regular, outliers, mask = split_outliers(x, self.outlier_threshold)
        self._columns_seen += mask.numel()
        self._outliers_seen += mask.sum()
        return super().forward(regular) + outliers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float columns where |x| > {self.outlier_threshold:g}"


class OutlierColumnsQuantizer(InputQuantizer):
    """Static quantization with calibrated outlier columns (see `algorithms.outlier_channels`):
    every input column is fake-quantized with the calibrated (scale, zero point), except the
    `columns`, divided by their `multiples` m first and multiplied back after: the grid of step
    m x scale with the same zero point (divided first, as the ONNX graph computes it)."""

    def __init__(self, spec: QuantSpec, qparams: QParams, columns: torch.Tensor, multiples: torch.Tensor) -> None:
        if spec.dynamic or not isinstance(spec.granularity, PerTensor):
            raise ValueError("calibrated outlier columns go with a static per-tensor input spec")
        if columns.shape != multiples.shape or columns.ndim != 1 or bool((multiples < 1).any()):
            raise ValueError(f"columns {columns.tolist()} and multiples {multiples.tolist()} must be [k] and [k] with multiples >= 1")
        super().__init__(spec, qparams)
        self.register_buffer("columns", columns.detach().to(torch.int64).clone())
        self.register_buffer("multiples", multiples.detach().to(torch.int64).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regular = super().forward(x)
        multiples = self.multiples.to(x.dtype)  # [k]
        outliers = super().forward(x.index_select(-1, self.columns) / multiples) * multiples  # on the grid of step m·scale
        return regular.index_copy(-1, self.columns, outliers)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, columns {self.columns.tolist()} at {self.multiples.tolist()} x the step"


class SmoothedInputQuantizer(InputQuantizer):
    """Static per-tensor quantization of x / `divisors` (see `algorithms.input_smoothing`): the
    result is in the smoothed coordinates, so the layer's weight holds W · diag(divisors)."""

    def __init__(self, spec: QuantSpec, qparams: QParams, divisors: torch.Tensor) -> None:
        if spec.dynamic or not isinstance(spec.granularity, PerTensor):
            raise ValueError("input smoothing goes with a static per-tensor input spec")
        if divisors.ndim != 1 or not bool(torch.isfinite(divisors).all()) or bool((divisors <= 0).any()):
            raise ValueError("smoothing divisors must be a finite positive vector [in_features]")
        super().__init__(spec, qparams)
        self.register_buffer("divisors", divisors.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(smoothed(x, self.divisors))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, divided by per-channel divisors in [{float(self.divisors.min()):.3g}, {float(self.divisors.max()):.3g}]"


def make_input_quantizer(
    spec: QuantSpec,
    qparams: QParams | None = None,
    *,
    outlier_threshold: float | None = None,
    columns: torch.Tensor | None = None,
    multiples: torch.Tensor | None = None,
    divisors: torch.Tensor | None = None,
) -> InputQuantizer:
    """The input quantizer of one layer, whether its parameters come from calibration (the engine)
    or from a saved artifact (the loader): per-call outlier columns kept float above
    `outlier_threshold` (llm_int8, dynamic inputs), dynamic quantization, calibrated outlier
    `columns` at `multiples` of the step (outlier_channels), smoothing `divisors`
    (input_smoothing), or plain static `qparams`."""
    if outlier_threshold is not None:
        return OutlierKeepingQuantizer(spec, outlier_threshold)
    if spec.dynamic:
        return InputQuantizer(spec)
    if columns is not None:
        return OutlierColumnsQuantizer(spec, qparams, columns, multiples)
    if divisors is not None:
        return SmoothedInputQuantizer(spec, qparams, divisors)
    return InputQuantizer(spec, qparams)
