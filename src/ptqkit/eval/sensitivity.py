"""Per-layer sensitivity and suggested exclusions, measured on the task metric.

`sensitivity`: for each targeted layer, the float equivalent of the model with only that layer
quantized (its quantized module, calibrated ranges included, swapped in), against the float
model: how much the task metric degrades. Layers are ranked most damaging first.

`suggest`: for the most sensitive layers, the fully quantized model with that one layer put back
to float: the measured gain of excluding it. The layers that gain most (above `min_gain`, at
most `max_exclude`) go into the recipe's `ignore`; that recipe is quantized again and measured,
so the returned number is the suggestion's real result, not a sum of single-layer gains.

The task metric is the first available of: accuracy (with labels), perplexity (causal LMs),
top-1 agreement (classifiers), mean embedding cosine (encoders), output SQNR. Degradation is
float value - value for accuracy, 1 - value for agreement and cosine, value - float value for
perplexity, and -value for SQNR (lower SQNR ranks as more sensitive).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.eval.evaluate import float_equivalent, model_metrics
from ptqkit.nn.tree import replace_module

__all__ = ["LayerSensitivity", "Suggestion", "degradation", "model_metrics", "sensitivity", "suggest", "task_metric"]

logger = logging.getLogger(__name__)

_ORDER = ("accuracy_quantized", "perplexity_quantized", "top1_agreement", "embedding_cosine_mean", "output_sqnr_db")


def task_metric(metrics: dict[str, float]) -> str:
    """The metric sensitivity and suggestions use (see the module docstring)."""
    for name in _ORDER:
        if name in metrics:
            return name
    raise ConfigError(f"no task metric among {sorted(metrics)}; expected one of {list(_ORDER)}")


def degradation(metrics: dict[str, float], name: str) -> float:
    """How much worse than float the metric `name` is (larger is worse)."""
    value = metrics[name]
    if name == "accuracy_quantized":
        return metrics["accuracy_float"] - value
    if name == "perplexity_quantized":
        return value - metrics["perplexity_float"]
    if name in ("top1_agreement", "embedding_cosine_mean"):
        return 1.0 - value
    return -value


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer quantized alone: the task metric's value and its degradation from float."""

    name: str
    metric: str
    value: float
    degradation: float


def sensitivity(
    model: nn.Module, qmodel: nn.Module, data: Any, *, layers: Iterable[str] | None = None, max_samples: int = 256,
    labels: torch.Tensor | None = None,
) -> list[LayerSensitivity]:
    """Each layer of `qmodel` (or of `layers`) quantized alone in the float equivalent of `model`;
    most damaging first. Memory: two float copies of the model."""
    info = getattr(qmodel, "ptqkit_info", None)
    if info is None:
        raise ConfigError("sensitivity: qmodel has no ptqkit_info; pass the model returned by ptqkit.engine.quantize(...)")
    names = list(layers) if layers is not None else [layer.name for layer in info.plan.layers]
    return _rank(float_equivalent(model, info.recipe), qmodel, names, data, max_samples, labels)


def _rank(
    reference: nn.Module, qmodel: nn.Module, names: list[str], data: Any, max_samples: int, labels: torch.Tensor | None
) -> list[LayerSensitivity]:
    """`sensitivity` on a float equivalent already built (it is copied once, layers swapped in)."""
    hybrid = copy.deepcopy(reference)
    metric = None
    results = []
    for name in names:
        previous = replace_module(hybrid, name, qmodel.get_submodule(name))
        try:
            metrics = model_metrics(reference, hybrid, data, max_samples=max_samples, labels=labels)
        finally:
            replace_module(hybrid, name, previous)
        metric = metric or task_metric(metrics)
        results.append(LayerSensitivity(name, metric, metrics[metric], degradation(metrics, metric)))
        logger.info("sensitivity: %s alone -> %s %.4f", name, metric, metrics[metric])
    return sorted(results, key=lambda r: -r.degradation)


@dataclass(frozen=True)
class Suggestion:
    """A recipe with the exclusions that measurably help, and the numbers behind it.

    `baseline`: the task metric of the recipe as given; `gains[layer]`: the metric's improvement
    when only that layer goes back to float (positive = better); `measured`: the metric of
    `recipe` (with `excluded` in its ignore list), quantized again from scratch."""

    recipe: Any
    metric: str
    baseline: float
    sensitivities: tuple[LayerSensitivity, ...]
    gains: dict[str, float]
    excluded: tuple[str, ...]
    measured: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "baseline": self.baseline, "measured": self.measured, "excluded": list(self.excluded),
            "gains": dict(self.gains), "sensitivities": [vars(s) for s in self.sensitivities], "recipe": self.recipe.to_dict(),
        }


def suggest(
    model: nn.Module,
    recipe: Any,
    calib: Any,
    eval_data: Any,
    *,
    candidates: int = 5,
    max_exclude: int = 3,
    min_gain: float = 0.0,
    max_samples: int = 256,
    labels: torch.Tensor | None = None,
    progress: bool = False,
) -> Suggestion:
    """Quantize, rank the layers by sensitivity, measure the gain of excluding each of the
    `candidates` most sensitive ones, and return the recipe with the best (at most
    `max_exclude`, each gaining more than `min_gain`) excluded, measured again."""
    from ptqkit.engine.quantize import quantize

    for name, value, low in (("candidates", candidates, 1), ("max_exclude", max_exclude, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"suggest: {name}={value!r} must be an integer >= {low}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not -float("inf") < min_gain < float("inf"):
        raise ConfigError(f"suggest: min_gain={min_gain!r} must be a finite number")
    qmodel = quantize(model, recipe, calib, progress=progress)
    reference = float_equivalent(model, recipe)
    ranked = _rank(reference, qmodel, [layer.name for layer in qmodel.ptqkit_info.plan.layers], eval_data, max_samples, labels)
    base = model_metrics(reference, qmodel, eval_data, max_samples=max_samples, labels=labels)
    metric = ranked[0].metric if ranked else task_metric(base)
    sign = -1.0 if metric == "perplexity_quantized" else 1.0  # gains are "better is positive"
    baseline = base[metric]
    gains: dict[str, float] = {}
    for layer in ranked[:candidates]:
        previous = replace_module(qmodel, layer.name, reference.get_submodule(layer.name))
        try:
            value = model_metrics(reference, qmodel, eval_data, max_samples=max_samples, labels=labels)[metric]
        finally:
            replace_module(qmodel, layer.name, previous)
        gains[layer.name] = sign * (value - baseline)
        logger.info("suggest: excluding %s alone: %s %.4f -> %.4f", layer.name, metric, baseline, value)
    chosen = tuple(name for name, gain in sorted(gains.items(), key=lambda kv: -kv[1]) if gain > min_gain)[:max_exclude]
    suggested = replace(recipe, ignore=tuple(recipe.ignore) + tuple(n for n in chosen if n not in recipe.ignore))
    if chosen:
        requantized = quantize(model, suggested, calib, progress=progress)
        measured = model_metrics(float_equivalent(model, suggested), requantized, eval_data, max_samples=max_samples, labels=labels)[metric]
    else:
        measured = baseline
    return Suggestion(suggested, metric, baseline, tuple(ranked), gains, chosen, measured)
