"""`doctor`: the seeds' PTQ checklist and calibration diagnostics, as findings with evidence and
a fix. It quantizes the model with the recipe, evaluates it (`eval.evaluate`) on evaluation data
(the calibration data when none is given) and checks:

- depthwise-per-tensor: depthwise convolutions with per-tensor weights (their per-channel ranges
  differ by orders of magnitude: MobileNetV2 collapses) -> per-channel weights, or CLE + bias
  correction;
- activation-outliers: a layer's input has channels far above the others (max / median of the
  per-channel |x| maxima above `outlier_ratio`) -> SmoothQuant, LLM.int8, per-channel inputs,
  or keep the layer's inputs float;
- low-sqnr-layers: layers whose own output SQNR (float layer vs quantized, same inputs) is below
  `min_layer_sqnr_db` -> ignore them or give them more bits;
- ranges-still-moving: static input ranges that changed in the last batches of calibration
  (`calibration.stability`) -> more calibration samples;
- too-few-samples: fewer calibration samples than `min_samples`;
- calibration-mismatch: the first quantized layer's inputs differ between calibration and
  evaluation data (a channel's mean moves by more than `mismatch_sigma` calibration standard
  deviations: inconsistent preprocessing) -> preprocess both the same way;
- input-clipping: evaluation inputs beyond the calibrated range (more than `max_clip_rate`) ->
  calibration data like the deployment data, or a wider-range observer;
- unsupported-modules: modules the recipe targets that stay float because ptqkit cannot quantize
  them (they keep their float cost).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ptqkit.calibration.samples import call_model
from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import PerTensor
from ptqkit.eval.evaluate import QuantReport, batches_of, evaluate
from ptqkit.stats.hooks import limited_batches

__all__ = ["DoctorConfig", "DoctorResult", "Finding", "FINDING_IDS", "doctor", "findings_from"]

logger = logging.getLogger(__name__)

FINDING_IDS = (
    "depthwise-per-tensor",
    "activation-outliers",
    "low-sqnr-layers",
    "ranges-still-moving",
    "too-few-samples",
    "calibration-mismatch",
    "input-clipping",
    "unsupported-modules",
)


@dataclass(frozen=True)
class Finding:
    """One diagnosis: `id` (one of FINDING_IDS), `severity` (error, warning, info), what was
    found, the measured `evidence` and the `fix`."""

    id: str
    severity: str
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DoctorConfig:
    """Thresholds of the checks (see the module docstring)."""

    outlier_ratio: float = 20.0
    min_layer_sqnr_db: float = 15.0
    min_samples: int = 64
    mismatch_sigma: float = 1.0
    max_clip_rate: float = 0.01
    stability_tolerance: float = 0.01
    stability_window: int = 3

    def __post_init__(self) -> None:
        for name in ("outlier_ratio", "min_layer_sqnr_db", "mismatch_sigma", "max_clip_rate", "stability_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ConfigError(f"doctor.{name}: {value!r} must be a number > 0, and finite")
        for name in ("min_samples", "stability_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"doctor.{name}: {value!r} must be an integer >= 1")


@dataclass(frozen=True)
class DoctorResult:
    """The findings (most severe first), the evaluation they came from and the quantized model."""

    findings: tuple[Finding, ...]
    report: QuantReport
    qmodel: nn.Module

    def ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.findings]


def _depthwise_per_tensor(qmodel: nn.Module, report: QuantReport) -> Finding | None:
    plans = {layer.name: layer for layer in qmodel.ptqkit_info.plan.layers}
    layers = []
    for layer in report.layers:
        module = qmodel.get_submodule(layer.name)
        groups = getattr(module, "conv_args", {}).get("groups", 1)
        spec = plans[layer.name].weights
        if groups > 1 and groups == getattr(module, "in_channels", -1) and spec is not None and isinstance(spec.granularity, PerTensor):
            layers.append(layer)
    if not layers:
        return None
    worst = min(layers, key=lambda l: l.weight_sqnr_db if l.weight_sqnr_db is not None else math.inf)
    return Finding(
        id="depthwise-per-tensor",
        severity="warning",
        message=(
            f"{len(layers)} depthwise convolution(s) have per-tensor weights; their channels' ranges differ widely "
            f"(worst weight SQNR {worst.weight_sqnr_db:.1f} dB at {worst.name})"
            if worst.weight_sqnr_db is not None else f"{len(layers)} depthwise convolution(s) have per-tensor weights"
        ),
        fix="use per-channel weights (scheme.weights.granularity: per_channel), or add bn_fold, cle and bias_correction to the recipe",
        evidence={"layers": [l.name for l in layers], "weight_sqnr_db": {l.name: l.weight_sqnr_db for l in layers}},
    )


def _flagged(report: QuantReport, attribute: str, threshold: float, *, above: bool = True) -> list[Any]:
    """Layers whose measured `attribute` is beyond `threshold` (above, or below), worst first."""
    sign = 1.0 if above else -1.0
    hits = [l for l in report.layers if getattr(l, attribute) is not None and sign * (getattr(l, attribute) - threshold) > 0]
    return sorted(hits, key=lambda l: -sign * getattr(l, attribute))


def _outliers(report: QuantReport, config: DoctorConfig) -> Finding | None:
    hits = [l for l in _flagged(report, "outlier_ratio", config.outlier_ratio) if l.inputs is not None]
    if not hits:
        return None
    return Finding(
        id="activation-outliers",
        severity="warning",
        message=(
            f"{len(hits)} layer(s) read inputs with outlier channels (largest channel max / median channel max up to "
            f"{hits[0].outlier_ratio:.0f}x at {hits[0].name}); one scale per tensor or token spends its range on them"
        ),
        fix="add smoothquant to the recipe (migrates the outliers into the weights; pre-norm models), "
        "outlier_channels (static inputs; post-norm encoders; runs in ONNX Runtime's int8 kernel), "
        "llm_int8 with w8a8_dynamic, or leave these layers' inputs float (overrides)",
        evidence={"outlier_ratio": {l.name: l.outlier_ratio for l in hits[:20]}, "threshold": config.outlier_ratio},
    )


def _low_sqnr(report: QuantReport, config: DoctorConfig) -> Finding | None:
    low = _flagged(report, "output_sqnr_db", config.min_layer_sqnr_db, above=False)
    if not low:
        return None
    names = [l.name for l in low]
    return Finding(
        id="low-sqnr-layers",
        severity="warning",
        message=f"{len(low)} layer(s) have output SQNR below {config.min_layer_sqnr_db:g} dB (worst {low[0].output_sqnr_db:.1f} dB at {low[0].name})",
        fix=f"leave the worst in float (ignore: {names[:3]}) or give them more bits with an override; "
        "then compare the model metric with `pq.evaluate`",
        evidence={"output_sqnr_db": {l.name: l.output_sqnr_db for l in low[:20]}, "threshold_db": config.min_layer_sqnr_db},
    )


def _stability(qmodel: nn.Module, config: DoctorConfig) -> list[Finding]:
    from ptqkit.calibration.stability import range_stability

    info = qmodel.ptqkit_info
    histories = {name: history for name, history in info.input_ranges.items() if history}
    findings = []
    description = info.calibration.get("description")
    count = int(description.get("count", 0)) if isinstance(description, dict) else 0
    samples = min(count, info.recipe.calibration.samples)  # what quantize used
    batches = max((len(h) for h in histories.values()), default=0)
    static = any(layer.inputs is not None and not layer.inputs.dynamic for layer in info.plan.layers)
    if static and samples and samples < config.min_samples:
        findings.append(Finding(
            id="too-few-samples",
            severity="warning",
            message=f"calibrated on {samples} samples; activation ranges need at least {config.min_samples} to be trusted",
            fix=f"calibrate on at least {config.min_samples} samples (a few hundred for LLMs) drawn like the deployment data",
            evidence={"samples": samples, "minimum": config.min_samples},
        ))
    if histories:
        stability = range_stability(histories, rel_tol=config.stability_tolerance, window=config.stability_window)
        if stability.unstable:
            findings.append(Finding(
                id="ranges-still-moving",
                severity="warning",
                message=f"{len(stability.unstable)} of {len(histories)} input range(s) still moved by more than "
                f"{config.stability_tolerance:.0%} in the last {config.stability_window} of {batches} calibration batches",
                fix="calibrate on more samples (the ranges have not converged), or use a percentile/MSE observer less driven by single extremes",
                evidence={"unstable": stability.unstable[:20], "batches": batches},
            ))
    return findings


def _clipping(report: QuantReport, config: DoctorConfig) -> Finding | None:
    hits = _flagged(report, "clip_rate", config.max_clip_rate)
    if not hits:
        return None
    return Finding(
        id="input-clipping",
        severity="warning",
        message=f"{len(hits)} layer(s) saturate more than {config.max_clip_rate:.1%} of their evaluation inputs "
        f"(worst {hits[0].clip_rate:.1%} at {hits[0].name}): the calibrated ranges are narrower than the evaluation data",
        fix="calibrate on data like the evaluation/deployment data; if extremes matter, use the minmax observer",
        evidence={"clip_rate": {l.name: l.clip_rate for l in hits[:20]}, "threshold": config.max_clip_rate},
    )


def _unsupported(qmodel: nn.Module) -> Finding | None:
    rows = [(name, kind, reason) for name, kind, reason in qmodel.ptqkit_info.plan.skipped if "not supported" in reason or "no quantization" in reason]
    if not rows:
        return None
    return Finding(
        id="unsupported-modules",
        severity="info",
        message=f"{len(rows)} targeted module(s) stay float: {', '.join(f'{n} ({k})' for n, k, _ in rows[:5])}",
        fix="they keep their float size and speed; nothing to do unless they dominate the model's cost",
        evidence={"modules": [{"name": n, "type": k, "reason": r} for n, k, r in rows]},
    )


def _first_layer_inputs(model: nn.Module, name: str, data: Iterable[Any], max_samples: int) -> torch.Tensor:
    """Per-channel (mean, std) of the inputs of module `name` over `data`: [2, C]."""
    module = model.get_submodule(name)
    total = square = None
    count = 0

    def hook(mod: nn.Module, args: tuple) -> None:
        nonlocal total, square, count
        x = args[0].detach().double()
        dim = 1 if x.ndim == 4 else x.ndim - 1
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)  # [C, rest]
        total = flat.sum(1) if total is None else total + flat.sum(1)
        square = flat.pow(2).sum(1) if square is None else square + flat.pow(2).sum(1)
        count += flat.shape[1]

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch, _ in limited_batches(data, max_samples):
                call_model(model, batch)
    finally:
        handle.remove()
    mean = total / count
    return torch.stack([mean, (square / count - mean.pow(2)).clamp_min(0).sqrt()])


def _mismatch(model: nn.Module, qmodel: nn.Module, calib: Any, eval_data: Any, config: DoctorConfig, max_samples: int) -> Finding | None:
    first = next((l for l in qmodel.ptqkit_info.plan.layers if l.module_type in ("Conv2d", "Linear", "Conv1d")), None)
    if first is None or eval_data is None:
        return None
    try:
        cal = _first_layer_inputs(model, first.name, batches_of(calib), max_samples)
        ev = _first_layer_inputs(model, first.name, batches_of(eval_data), max_samples)
    except (TypeError, AttributeError, IndexError):  # integer inputs (token ids) have no float statistics here
        return None
    if not cal.dtype.is_floating_point:
        return None
    shift = (cal[0] - ev[0]).abs() / cal[1].clamp_min(1e-12)  # [C] in calibration sigmas
    worst = int(shift.argmax())
    if float(shift[worst]) <= config.mismatch_sigma:
        return None
    return Finding(
        id="calibration-mismatch",
        severity="error",
        message=f"inputs of {first.name} differ between calibration and evaluation data: channel {worst}'s mean moves by "
        f"{float(shift[worst]):.1f} calibration standard deviations ({float(cal[0, worst]):.3g} vs {float(ev[0, worst]):.3g})",
        fix="preprocess calibration data exactly as deployment data (same normalization, resizing, tokenizer settings)",
        evidence={"layer": first.name, "shift_sigma": [float(v) for v in shift], "threshold_sigma": config.mismatch_sigma},
    )


def findings_from(qmodel: nn.Module, report: QuantReport, config: DoctorConfig | None = None) -> list[Finding]:
    """The checks that need only the quantized model and its evaluation (no data)."""
    config = config or DoctorConfig()
    found = [_depthwise_per_tensor(qmodel, report), _outliers(report, config), _low_sqnr(report, config), _clipping(report, config), _unsupported(qmodel)]
    return [f for f in found if f is not None] + _stability(qmodel, config)


_SEVERITY = {"error": 0, "warning": 1, "info": 2}


def doctor(
    model: nn.Module,
    calib: Any,
    recipe: Any,
    *,
    eval_data: Any = None,
    config: DoctorConfig | None = None,
    max_samples: int = 256,
    progress: bool = False,
) -> DoctorResult:
    """Quantize `model` with `recipe` on `calib`, evaluate it on `eval_data` (default: `calib`)
    and run every check. Returns the findings, most severe first."""
    from ptqkit.engine.quantize import quantize

    config = config or DoctorConfig()
    qmodel = quantize(model, recipe, calib, progress=progress)
    report = evaluate(qmodel, model, batches_of(eval_data if eval_data is not None else calib), max_samples=max_samples)
    found = findings_from(qmodel, report, config)
    mismatch = _mismatch(model, qmodel, calib, eval_data, config, max_samples)
    if mismatch is not None:
        found.append(mismatch)
    found.sort(key=lambda f: (_SEVERITY[f.severity], FINDING_IDS.index(f.id)))
    for finding in found:
        logger.info("doctor: %s %s: %s", finding.severity, finding.id, finding.message)
    return DoctorResult(tuple(found), report, qmodel)
