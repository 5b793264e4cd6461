"""`evaluate`: the quantized model against its float original on the same data, model-wide and
per layer, every number measured in one pass.

The float side is the *float equivalent* of the quantized model: a copy of the reference with the
recipe's data-free pre-transforms (BN folding, CLE) replayed. They are exact and deterministic,
so its layers are the ones that were quantized, with their float weights and the same names.

Per targeted layer:
- weight SQNR: the float equivalent's weight against the dequantized one;
- output SQNR (isolated): the quantized layer against the float layer on the *same* inputs (the
  quantized model's), so it is this layer's own error (weights and input quantization);
- accumulated SQNR: the layer's output in the quantized model against the float model's, each
  on its own activations: the error that has built up to this point;
- input range, clipping rate (share of input values beyond a static quantizer's representable
  range) and the outlier ratio of the input channels (largest per-channel |x| max over the
  median one; ~1 for even channels, 10-100 for LLM outlier features).
Block transforms (SmoothQuant, AWQ) rescale weights and inputs by data-dependent factors that are
not replayed: with them, weight and isolated SQNR are not reported (accumulated SQNR still is,
since they preserve every layer's output).

Model-wide metrics follow the output: [N, classes] logits give top-1/top-5 agreement, softmax KL
and, with labels, accuracy; a causal LM's logits with input_ids give both perplexities, next-token
agreement and KL; other [N, T, H] outputs (encoders) give mean-pooled cosine similarity. Output
SQNR always.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.algorithms.input_smoothing import smoothed
from ptqkit.core.errors import CalibrationDataError, ConfigError
from ptqkit.eval.metrics import finite_rows, mean_softmax_kl, top1_agreement, topk_agreement
from ptqkit.nn.act_quant import SmoothedInputQuantizer
from ptqkit.nn.modules import QuantizedModule
from ptqkit.stats.collect import ModelBatches, collect
from ptqkit.stats.hooks import batch_length
from ptqkit.stats.paired import PairedBatches

__all__ = [
    "REPORT_SCHEMA_VERSION", "LayerReport", "QuantReport", "batches_of", "evaluate", "float_equivalent", "main_tensor", "model_metrics",
]

REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerReport:
    """One targeted layer's measurements (None: not measurable here, `note` says why)."""

    name: str
    module_type: str
    weights: str | None
    inputs: str | None
    weight_sqnr_db: float | None
    output_sqnr_db: float | None
    accumulated_sqnr_db: float | None
    input_min: float | None
    input_max: float | None
    clip_rate: float | None
    outlier_ratio: float | None
    note: str | None = None


@dataclass(frozen=True)
class QuantReport:
    """What `evaluate` measured: model-wide `metrics`, per-layer reports and sizes."""

    metrics: dict[str, float]
    layers: tuple[LayerReport, ...]
    size: dict[str, float]
    samples: int
    recipe: dict[str, Any] = field(default_factory=dict)
    histograms: dict[str, dict[str, Any]] = field(default_factory=dict)  # worst layers' input histograms

    def worst_layers(self, count: int = 5) -> list[LayerReport]:
        """The layers with the lowest isolated output SQNR (accumulated where isolated is absent)."""
        scored = [(layer.output_sqnr_db if layer.output_sqnr_db is not None else layer.accumulated_sqnr_db, layer) for layer in self.layers]
        return [layer for score, layer in sorted((s for s in scored if s[0] is not None), key=lambda s: s[0])[:count]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "samples": self.samples,
            "metrics": dict(self.metrics),
            "size": dict(self.size),
            "recipe": dict(self.recipe),
            "layers": [asdict(layer) for layer in self.layers],
            "histograms": dict(self.histograms),
        }


def float_equivalent(reference: nn.Module, recipe: Any) -> nn.Module:
    """A copy of `reference` with the recipe's data-free pre-transforms replayed (eval mode)."""
    from ptqkit.algorithms.pipeline import apply_pre_transforms, split_algorithms

    model = copy.deepcopy(reference).eval()
    apply_pre_transforms(model, split_algorithms(recipe.algorithms).pre_transforms)
    return model


class _Energy:
    """Running Σ ref² and Σ (cand - ref)² for an SQNR."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        ref = reference.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((candidate.detach().double() - ref).pow(2).sum())

    def db(self) -> float | None:
        if not (math.isfinite(self.signal) and math.isfinite(self.noise)):
            return -math.inf  # NaN/Inf outputs: the worst SQNR, never NaN
        if self.signal == 0 and self.noise == 0:
            return None
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


class _InputStats:
    """Range, saturation count and per-channel |x| maxima of a layer's float inputs."""

    def __init__(self, channel_dim: int) -> None:
        self.channel_dim = channel_dim
        self.low = math.inf
        self.high = -math.inf
        self.clipped = 0
        self.seen = 0
        self.channel_max: torch.Tensor | None = None

    def add(self, x: torch.Tensor, quantizer: Any) -> None:
        x = x.detach().float()
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
        self.seen += x.numel()
        qparams = quantizer.qparams if quantizer is not None else None
        if qparams is not None and qparams.qtype.is_integer:
            seen = smoothed(x, quantizer.divisors) if isinstance(quantizer, SmoothedInputQuantizer) else x  # what it quantizes
            scale = qparams.granularity.expand(qparams.scale, x.shape).float()
            zero = qparams.granularity.expand(qparams.zero_point, x.shape).float()
            lowest, highest = (qparams.qtype.qmin - zero) * scale, (qparams.qtype.qmax - zero) * scale
            self.clipped += int(((seen < lowest - scale / 2) | (seen > highest + scale / 2)).sum())
        per_channel = x.abs().transpose(0, self.channel_dim).reshape(x.shape[self.channel_dim], -1).amax(dim=1)  # [C]
        self.channel_max = per_channel if self.channel_max is None else torch.maximum(self.channel_max, per_channel)

    def clip_rate(self, quantizer: Any) -> float | None:
        static = quantizer is not None and quantizer.qparams is not None and quantizer.qparams.qtype.is_integer
        return self.clipped / self.seen if static and self.seen else None

    def outlier_ratio(self) -> float | None:
        if self.channel_max is None or self.channel_max.numel() < 2:
            return None
        median = float(self.channel_max.median())
        return float(self.channel_max.max()) / median if median > 0 else math.inf


def _describe(spec: Any) -> str | None:
    if spec is None:
        return None
    kind = type(spec.granularity).__name__.replace("Per", "per-").lower()
    return f"{spec.qtype.name} {kind}{' dynamic' if spec.dynamic else ''}"


def _float_weight(module: nn.Module, module_type: str) -> torch.Tensor:
    return module.weight.t() if module_type == "Conv1D" else module.weight


class _Model:
    """Per-batch model-wide metrics, accumulated."""

    def __init__(self) -> None:
        self.energy = _Energy()
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.minimum: dict[str, float] = {}

    def mean(self, key: str, total: float, count: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + total
        self.counts[key] = self.counts.get(key, 0) + count

    def add(self, ref_out: Any, q_out: Any, batch: Any, labels: torch.Tensor | None) -> None:
        ref, cand = main_tensor(ref_out).float(), main_tensor(q_out).float()
        self.energy.add(ref, cand)
        logits = getattr(ref_out, "logits", None)
        if ref.ndim == 2:  # [N, classes]
            self._classification(ref, cand, labels)
        elif logits is not None and isinstance(batch, dict) and "input_ids" in batch:
            self._causal_lm(ref, cand, batch)
        elif ref.ndim == 3:  # [N, T, H] hidden states
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            weights = mask.unsqueeze(-1).float() if mask is not None else torch.ones(ref.shape[:2] + (1,))
            pool = lambda h: (h * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # noqa: E731  [N, H]
            cosine = F.cosine_similarity(pool(ref), pool(cand), dim=-1).nan_to_num(nan=-1.0)  # [N]; NaN: the worst
            self.mean("embedding_cosine_mean", float(cosine.sum()), cosine.numel())
            self.minimum["embedding_cosine_min"] = min(self.minimum.get("embedding_cosine_min", 1.0), float(cosine.min()))

    def _classification(self, ref: torch.Tensor, cand: torch.Tensor, labels: torch.Tensor | None) -> None:
        n = ref.shape[0]  # the metric functions give means over rows; sums accumulate across batches
        self.mean("top1_agreement", top1_agreement(ref, cand) * n, n)
        if ref.shape[1] >= 5:
            self.mean("top5_agreement", topk_agreement(ref, cand, 5) * n, n)
        self.mean("softmax_kl", mean_softmax_kl(ref, cand) * n, n)
        if labels is not None:
            self.mean("accuracy_float", float((ref.argmax(-1) == labels).sum()), n)
            self.mean("accuracy_quantized", float(((cand.argmax(-1) == labels) & finite_rows(cand)).sum()), n)

    def _causal_lm(self, ref: torch.Tensor, cand: torch.Tensor, batch: dict) -> None:
        targets = batch["input_ids"][:, 1:]  # [N, T-1]
        mask = batch.get("attention_mask")
        keep = (mask[:, 1:] > 0) if mask is not None else torch.ones_like(targets, dtype=torch.bool)
        tokens = int(keep.sum())
        if tokens == 0:
            return
        for key, logits in (("float", ref), ("quantized", cand)):
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="none")
            nll = nll.nan_to_num(nan=math.inf)  # NaN logits: infinite perplexity
            self.mean(f"nll_{key}", float(nll[keep.reshape(-1)].sum()), tokens)
        kept_ref, kept_cand = ref[:, :-1][keep], cand[:, :-1][keep]  # [tokens, vocab]: predictions of real next tokens
        self.mean("next_token_agreement", top1_agreement(kept_ref, kept_cand) * tokens, tokens)
        self.mean("softmax_kl", mean_softmax_kl(kept_ref, kept_cand) * tokens, tokens)

    def result(self) -> dict[str, float]:
        metrics = {key: self.sums[key] / self.counts[key] for key in self.sums if self.counts[key]}
        for key in ("float", "quantized"):
            if f"nll_{key}" in metrics:
                metrics[f"perplexity_{key}"] = math.exp(metrics.pop(f"nll_{key}"))
        metrics.update(self.minimum)
        sqnr = self.energy.db()
        if sqnr is not None:
            metrics["output_sqnr_db"] = sqnr
        return metrics


def main_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output: itself, a ModelOutput's/dict's first tensor, a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    for value in (output.values() if isinstance(output, dict) else output):
        if isinstance(value, torch.Tensor):
            return value
    raise ConfigError(f"the model's output ({type(output).__name__}) holds no tensor to compare")


def batches_of(data: Any) -> Iterable[Any]:
    """The batches of a CalibrationData, or `data` itself (an iterable of batches)."""
    return data.batches() if hasattr(data, "batches") else data


def _compare(
    float_model: nn.Module, candidate: nn.Module, data: Any, max_samples: int, labels: torch.Tensor | None,
    probes: list[_LayerProbe] | None = None,
) -> tuple[dict[str, float], int]:
    """Model-wide metrics of `candidate` against `float_model` on `data` and the samples seen, in
    one paired collector pass that also feeds each probe its layer's outputs."""
    accumulator = _Model()

    def add(ref_out: Any, q_out: Any, batch: Any, first: int) -> None:
        batch_labels = labels[first : first + batch_length(batch)] if labels is not None else None
        accumulator.add(ref_out, q_out, batch, batch_labels)

    source = PairedBatches(float_model, batches_of(data), max_samples, outputs=add)
    samples = collect(candidate, {probe.layer.name: probe for probe in probes or []}, source)
    if samples == 0:
        raise CalibrationDataError("the evaluation data holds no samples")
    return accumulator.result(), samples


def model_metrics(
    float_model: nn.Module, candidate: nn.Module, data: Any, *, max_samples: int = 256, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """Model-wide metrics of `candidate` against `float_model` on `data` (those of `evaluate`)."""
    return _compare(float_model, candidate, data, max_samples, labels)[0]


@dataclass
class _LayerProbe:
    """One planned layer in evaluate's paired pass (a collector statistic on the layer's output):
    the isolated and accumulated output energies and the quantized layer's input statistics."""

    layer: Any  # the plan's layer (name, module_type, weights, inputs)
    qmodule: nn.Module
    fmodule: nn.Module
    isolate: bool  # run the float layer on the quantized layer's inputs (not with block transforms)
    isolated: _Energy = field(default_factory=_Energy)
    accumulated: _Energy = field(default_factory=_Energy)
    inputs: _InputStats | None = None  # created on the first float input
    tap: ClassVar[str] = "output"  # fed by the collector after the quantized layer ran

    def update(self, reference: torch.Tensor | None, x: Any, output: torch.Tensor) -> None:
        """`reference`: the float layer's output in the float model (None if it did not run);
        `x`, `output`: the quantized layer's input and output in the quantized model."""
        if reference is not None:
            self.accumulated.add(reference, output)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if self.isolate:
                self.isolated.add(self.fmodule(x), output)
            channel_dim = 1 if self.layer.module_type in ("Conv1d", "Conv2d") else x.ndim - 1  # [N, C, ...] or [..., C]
            if self.inputs is None:
                self.inputs = _InputStats(channel_dim)
            self.inputs.add(x, getattr(self.qmodule, "input_quantizer", None))

    def report(self, rescaled: list[str]) -> LayerReport:
        from ptqkit.core.primitives import sqnr_db

        layer, stats = self.layer, self.inputs
        weight_db = None
        if isinstance(self.qmodule, QuantizedModule) and not rescaled:
            weight_db = float(sqnr_db(_float_weight(self.fmodule, layer.module_type).float(), self.qmodule.to_float().weight.float()))
        quantizer = getattr(self.qmodule, "input_quantizer", None)
        return LayerReport(
            name=layer.name,
            module_type=layer.module_type,
            weights=_describe(layer.weights),
            inputs=_describe(layer.inputs),
            weight_sqnr_db=weight_db,
            output_sqnr_db=None if rescaled else self.isolated.db(),
            accumulated_sqnr_db=self.accumulated.db(),
            input_min=stats.low if stats else None,
            input_max=stats.high if stats else None,
            clip_rate=stats.clip_rate(quantizer) if stats else None,
            outlier_ratio=stats.outlier_ratio() if stats else None,
            note=f"{', '.join(rescaled)} rescaled weights and inputs: compared end to end only" if rescaled else None,
        )


def _layer_probes(qmodel: nn.Module, float_model: nn.Module, plan: Any, rescaled: list[str]) -> list[_LayerProbe]:
    """A probe per planned layer present in both models (same names)."""
    q_modules, f_modules = dict(qmodel.named_modules()), dict(float_model.named_modules())
    return [
        _LayerProbe(layer, q_modules[layer.name], f_modules[layer.name], not rescaled)
        for layer in plan.layers if layer.name in q_modules and layer.name in f_modules
    ]


def _size_summary(qmodel: nn.Module) -> dict[str, Any]:
    from ptqkit.eval.size import model_size

    size = model_size(qmodel)
    return {
        "float_bytes": size.total_float_bytes,
        "quantized_bytes": size.total_quantized_bytes,
        "quantized_layers": size.quantized_layers,
        "layer_weight_ratio": size.ratio,
        "bytes_by_dtype": _bytes_by_dtype(qmodel),
    }


@torch.no_grad()
def evaluate(
    qmodel: nn.Module,
    reference: nn.Module,
    data: Iterable[Any],
    *,
    max_samples: int = 256,
    labels: torch.Tensor | None = None,
    per_layer: bool = True,
    histogram_layers: int = 5,
) -> QuantReport:
    """Measure `qmodel` (from `ptqkit.engine.quantize`) against the float `reference` on `data` (a
    CalibrationData or an iterable of batches: tensors, tuples or dicts). `labels` [N] (class
    ids, in sample order) add accuracy for classifiers; a CalibrationData with labels that are
    class names is not used for accuracy. `per_layer=False` measures the model-wide metrics only
    (the report's `layers` is then empty). The `histogram_layers` worst layers also get input
    histograms (one more pass)."""
    info = getattr(qmodel, "ptqkit_info", None)
    if info is None:
        raise ConfigError("evaluate: qmodel has no ptqkit_info; pass the model returned by ptqkit.engine.quantize(...)")
    from ptqkit.algorithms.pipeline import split_algorithms

    if not hasattr(data, "batches") and not isinstance(data, (list, tuple)):
        data = list(data)  # read twice (the worst layers' histograms)
    stages = split_algorithms(info.recipe.algorithms)
    rescaled = [type(c).__name__ for c in stages.block_transforms]
    float_model = float_equivalent(reference, info.recipe)
    probes = _layer_probes(qmodel, float_model, info.plan, rescaled) if per_layer else []
    metrics, samples = _compare(float_model, qmodel, data, max_samples, labels, probes)
    report = QuantReport(
        metrics=metrics,
        layers=tuple(probe.report(rescaled) for probe in probes),
        size=_size_summary(qmodel),
        samples=samples,
        recipe=info.recipe.to_dict(),
    )
    worst = [layer for layer in report.worst_layers(histogram_layers) if layer.input_min is not None and layer.input_max is not None]
    if worst:
        report = replace(report, histograms=_histograms(qmodel, worst, data, max_samples))
    return report


def _bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Stored bytes of the model's parameters and persistent buffers, per dtype (the dequantized
    weight caches of quantized modules are not stored and not counted)."""
    totals: dict[str, int] = {}
    for tensor in (*model.parameters(), *(b for name, b in model.named_buffers() if not name.endswith("._weight"))):
        key = str(tensor.dtype).removeprefix("torch.")
        totals[key] = totals.get(key, 0) + tensor.numel() * tensor.element_size()
    return totals


class _Histogram:
    """Counts of one layer's inputs in `bins` equal bins over [low, high] (values outside are not counted)."""

    def __init__(self, low: float, high: float, bins: int) -> None:
        self.low, self.high, self.bins = low, high, bins
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        self.counts += torch.histc(x.double(), bins=self.bins, min=self.low, max=self.high)


@torch.no_grad()
def _histograms(qmodel: nn.Module, layers: list[LayerReport], data: Any, max_samples: int, bins: int = 64) -> dict[str, dict[str, Any]]:
    """Input histograms of `layers` over their observed range (one more pass of the quantized
    model), with the static quantizer's clipping thresholds where there is one."""
    modules = dict(qmodel.named_modules())
    ranges = {layer.name: (layer.input_min, layer.input_max if layer.input_max > layer.input_min else layer.input_min + 1e-6) for layer in layers}
    histograms = {name: _Histogram(low, high, bins) for name, (low, high) in ranges.items()}
    collect(qmodel, histograms, ModelBatches(batches_of(data), max_samples, "input histograms", progress=False))
    counts = {name: histogram.counts for name, histogram in histograms.items()}
    result = {}
    for layer in layers:
        low, high = ranges[layer.name]
        quantizer = getattr(modules[layer.name], "input_quantizer", None)
        qparams = quantizer.qparams if quantizer is not None else None
        clip = None
        if qparams is not None and qparams.qtype.is_integer and qparams.scale.numel() == 1:
            scale, zero = float(qparams.scale), float(qparams.zero_point)
            clip = [(qparams.qtype.qmin - zero) * scale, (qparams.qtype.qmax - zero) * scale]
        result[layer.name] = {"low": low, "high": high, "counts": [int(c) for c in counts[layer.name]], "clip": clip}
    return result
