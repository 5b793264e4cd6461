"""`search`: per-layer formats chosen from measured accuracy, latency and size.

1. Candidates: each Linear in each format with a kernel here (`mixed_precision.formats`).
2. Per layer and format, measured: the task-metric degradation with only that layer in that
   format (`eval.sensitivity.model_metrics` against the float model; or, with
   `layer_costs="proxy"`, estimated from the weight's SQNR), its latency alone on this machine
   on the rows it sees in the model (`mixed_precision.latency`, cached on disk) and its bytes.
3. Two greedy paths from all-fp32, one move (one layer to a cheaper format) at a time:
   - latency: only moves the table predicts to be faster, most time saved per unit of added
     degradation first;
   - size: moves to fewer bytes, most bytes saved per unit of added degradation first.
   Every `stride`-th configuration on each path, the last one, and the uniform configurations are
   measured end to end: the metric on the evaluation data, and latency alternating with the float
   model (same thread count), so "faster than float" compares like with like. Then each path is
   bisected between its last measured step within the degradation budget and the first beyond
   it, so the configuration at the budget is found to the step (log2(stride) more points).
4. The Pareto front over (degradation, latency, bytes) of the measured points, and the chosen
   point: the fastest within the degradation budget (and the bytes budget, if any) that is at
   least `min_speedup` (1.05) times faster than float. If none qualifies the result says why.
   With `holdout_data`, every point within the budget is measured again on that data and must
   stay within the budget there too: the paths are chosen on the search data, so their measured
   degradation there is optimistic.
Deterministic: the same measurements give the same paths (ties broken by layer order).
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import AtLeast, check_fields, literal_values
from ptqkit.core.progress import progress_bar
from ptqkit.core.threads import torch_threads
from ptqkit.engine.targets import no_match_error, pattern_matches
from ptqkit.eval.sensitivity import degradation, model_metrics, task_metric
from ptqkit.mixed_precision.formats import apply_assignment, format_module, weight_bytes
from ptqkit.mixed_precision.latency import LatencyTable, linear_ms_inside, linear_rows

__all__ = ["LAYER_COSTS", "LayerCosts", "SearchPoint", "SearchResult", "decode_step_input", "versus_uniform", "pareto_front", "proxy_rank_correlation", "search", "weight_sqnr_db"]

logger = logging.getLogger(__name__)

# How each layer's degradation is known: measured (one evaluation per layer and format) or the
# weight-SQNR proxy (estimated without data).
LayerCosts = Literal["measured", "proxy"]
LAYER_COSTS: tuple[str, ...] = literal_values(LayerCosts)
TIE = 1.05  # speed-ups within 5% of each other are timing noise here (see _choose's min_speedup)


@dataclass(frozen=True)
class SearchPoint:
    """One configuration, measured end to end (`predicted_ms` is the table's estimate;
    `float_ms` the float model timed alternately with it)."""

    name: str
    assignment: dict[str, str]
    metric: float
    degradation: float
    measured_ms: float
    predicted_ms: float
    weight_bytes: int
    float_ms: float = 0.0
    holdout_degradation: float | None = None  # on the held-out data, when the search had some

    @property
    def speedup(self) -> float:
        return self.float_ms / self.measured_ms if self.measured_ms else 0.0

    def within(self, max_degradation: float, holdout: bool = False) -> bool:
        """Within the budget on the search's data and, with `holdout`, on the held-out data too
        (a point not checked there is not within)."""
        if not self.degradation <= max_degradation:  # NaN (a model that gave NaN) is never within
            return False
        return not holdout or (self.holdout_degradation is not None and self.holdout_degradation <= max_degradation)


@dataclass(frozen=True)
class SearchResult:
    """The measured points, their Pareto front, the chosen point (or why none) and the float
    reference's numbers."""

    metric: str
    float_metric: float
    float_ms: float
    float_bytes: int
    points: tuple[SearchPoint, ...]
    front: tuple[SearchPoint, ...]
    chosen: SearchPoint | None
    why_none: str = ""
    layer_costs: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    stopped_early: bool = False
    proxy_rank_correlation: float | None = None  # Spearman: -weight SQNR vs measured degradation
    layer_costs_source: LayerCosts = "measured"  # "proxy": per-layer degradations estimated, not measured
    versus_uniform: str = ""  # the chosen point against the best uniform one within the budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "float_metric": self.float_metric, "float_ms": self.float_ms, "float_bytes": self.float_bytes,
            "points": [asdict(p) for p in self.points], "front": [p.name for p in self.front],
            "chosen": asdict(self.chosen) if self.chosen else None, "why_none": self.why_none,
            "layer_costs": self.layer_costs, "stopped_early": self.stopped_early,
            "proxy_rank_correlation": self.proxy_rank_correlation, "layer_costs_source": self.layer_costs_source,
            "versus_uniform": self.versus_uniform,
        }


def pareto_front(points: Sequence[SearchPoint]) -> list[SearchPoint]:
    """Points no other point beats or equals on all of degradation, latency and bytes (and beats
    on one), sorted by latency."""
    def dominated(p: SearchPoint) -> bool:
        return any(
            q is not p and q.degradation <= p.degradation and q.measured_ms <= p.measured_ms and q.weight_bytes <= p.weight_bytes
            and (q.degradation < p.degradation or q.measured_ms < p.measured_ms or q.weight_bytes < p.weight_bytes)
            for q in points
        )
    return sorted((p for p in points if not dominated(p)), key=lambda p: p.measured_ms)


def search(
    model: nn.Module,
    eval_data: Any,
    *,
    max_degradation: float,
    example: Any = None,
    max_bytes: int | None = None,
    formats: Sequence[str] = ("int8_dyn", "int8_wo", "int4_g128", "int4_g64"),
    table_path: str | Path | None = None,
    threads: int = 1,
    stride: int = 4,
    max_samples: int = 64,
    time_limit_s: float | None = None,
    min_speedup: float = 1.05,
    layer_costs: LayerCosts = "measured",
    layers: Sequence[str] | None = None,
    holdout_data: Any = None,
    progress: bool = True,
) -> SearchResult:
    """Search per-Linear formats of `model` (see the module docstring). `eval_data`
    (`CalibrationData`) gives the task metric; `example` is the input latency is measured on
    (default: the first batch of `eval_data`; `decode_step_input(eval_data)` for an LLM decode
    step); `table_path` the latency cache (default: `latency.json` in the ptqkit cache
    directory). Also `pq.search`. A point is only chosen when it is
    at least `min_speedup` times faster than float (timed alternately): smaller gains are within
    the noise of timing here, and a config slower than float is never recommended.

    `layer_costs="proxy"` skips the per-layer accuracy measurements (one evaluation per layer
    and format: hours on an LLM's hundreds of layers): each layer's degradation is estimated by
    the data-free proxy, the relative noise power 10^(-SQNR/10) of its quantized weight, which
    only orders the greedy moves; every point is still measured end to end.

    `layers`: patterns (as in a recipe's targets: globs, or "re:" regular expressions) of the
    Linears the search may move; the others stay float. Default: every Linear the example calls.

    `holdout_data`: evaluation data the search does not select on (step 4 of the module docstring)."""
    _SearchOptions(stride=stride, max_degradation=max_degradation, min_speedup=min_speedup, time_limit_s=time_limit_s, layer_costs=layer_costs)
    deadline = _Deadline(time.monotonic(), time_limit_s)
    model = model.eval()
    if example is None:
        example = next(iter(eval_data.batches() if hasattr(eval_data, "batches") else eval_data))
    table = LatencyTable(_latency_table_path(table_path), threads=threads)
    base = model_metrics(model, model, eval_data, max_samples=max_samples)
    metric = task_metric(base)
    budget = _Budget(max_degradation, max_bytes, min_speedup, holdout=holdout_data is not None)
    with torch_threads(threads):  # every measurement at the search's thread count, restored on any exit
        s = _setup(
            model, eval_data, example, metric, table, threads=threads, layers=layers, max_samples=max_samples, progress=progress, deadline=deadline
        )
        costs, stopped = _measure_layer_costs(s, formats, layer_costs)
        paths = {objective: _greedy_path(costs, objective) for objective in ("latency", "size")}
        by_name: dict[str, SearchPoint] = {}
        stopped |= _measure_candidates(s, _candidates(costs, formats, paths, stride), by_name)
        stopped |= _refine_at_budget(s, paths, by_name, max_degradation)
        if holdout_data is not None:
            stopped |= _check_holdout(s, by_name, holdout_data, max_degradation)
        return _result(s, base[metric], costs, list(by_name.values()), stopped, budget, layer_costs)


@dataclass(frozen=True, kw_only=True)
class _SearchOptions:
    """`search`'s option arguments, checked from their annotations before anything is measured:
    a bad one is a ConfigError naming it ("search.stride: 0 must be an integer >= 1")."""

    stride: Annotated[int, AtLeast(1)]
    max_degradation: float
    min_speedup: Annotated[float, AtLeast(0)]
    time_limit_s: Annotated[float, AtLeast(0)] | None
    layer_costs: LayerCosts

    def __post_init__(self) -> None:
        check_fields(self, "search")


def _latency_table_path(table_path: str | Path | None) -> str | Path:
    if table_path is not None:
        return table_path
    from ptqkit.models.zoo import cache_dir

    return cache_dir() / "latency.json"


@dataclass(frozen=True)
class _Deadline:
    started: float  # time.monotonic() at the start of the search
    limit_s: float | None

    def passed(self) -> bool:
        return self.limit_s is not None and time.monotonic() - self.started > self.limit_s


@dataclass(frozen=True)
class _Budget:
    """What the chosen point must meet."""

    max_degradation: float
    max_bytes: int | None
    min_speedup: float
    holdout: bool  # within max_degradation on the held-out data too


@dataclass(frozen=True)
class _Search:
    """What every measurement of one search shares."""

    model: nn.Module
    eval_data: Any
    example: Any  # the input latency is measured on
    metric: str  # the task metric's key in `model_metrics`
    table: LatencyTable
    rows: dict[str, int]  # Linear -> input rows it sees on `example`
    inside: dict[str, float]  # Linear -> ms it takes inside the float model (`linear_ms_inside`)
    linears: dict[str, nn.Linear]  # the Linears the search may move
    float_bytes: int  # their weight bytes in fp32
    max_samples: int
    progress: bool
    deadline: _Deadline


def _setup(
    model: nn.Module, eval_data: Any, example: Any, metric: str, table: LatencyTable, *,
    threads: int, layers: Sequence[str] | None, max_samples: int, progress: bool, deadline: _Deadline,
) -> _Search:
    rows = linear_rows(model, example)
    inside = linear_ms_inside(model, example, threads=threads)
    linears = _searched_linears(model, rows, layers)
    float_bytes = sum(weight_bytes(m, "fp32") for m in linears.values())
    return _Search(model, eval_data, example, metric, table, rows, inside, linears, float_bytes, max_samples, progress, deadline)


def _costs_of_layer(s: _Search, name: str, linear: nn.Linear, formats: list[str], layer_costs: LayerCosts) -> dict[str, dict[str, float | None]]:
    """Format -> degradation (measured with only this layer in it, or the SQNR proxy), ms and bytes."""
    costs: dict[str, dict[str, float | None]] = {
        "fp32": {"degradation": 0.0, "ms": s.table.layer_ms(linear, "fp32", s.rows[name]), "bytes": weight_bytes(linear, "fp32")}
    }
    for fmt in formats:
        sqnr = weight_sqnr_db(linear, fmt)
        if layer_costs == "measured":
            metrics = model_metrics(s.model, apply_assignment(s.model, {name: fmt}), s.eval_data, max_samples=s.max_samples)
            damage = degradation(metrics, s.metric)
        else:
            damage = 10.0 ** (-sqnr / 10.0)  # relative noise power of the quantized weight
        costs[fmt] = {
            "degradation": damage, "ms": s.table.layer_ms(linear, fmt, s.rows[name]),
            "bytes": weight_bytes(linear, fmt), "weight_sqnr_db": sqnr,
        }
    return costs


def _measure_layer_costs(s: _Search, formats: Sequence[str], layer_costs: LayerCosts) -> tuple[dict[str, dict[str, dict[str, float | None]]], bool]:
    """Step 2 for every searched Linear, in the formats with a kernel for it; and whether the time limit stopped it."""
    ladder = {name: [f for f in formats if not isinstance(format_module(m, f), str)] for name, m in s.linears.items()}
    costs: dict[str, dict[str, dict[str, float | None]]] = {}
    with progress_bar(f"measuring {len(s.linears)} layer(s) x {len(formats)} format(s)", len(s.linears), s.progress) as advance:
        for name, linear in s.linears.items():
            if s.deadline.passed():
                return costs, True
            costs[name] = _costs_of_layer(s, name, linear, ladder[name], layer_costs)
            advance(1, current=name)
    return costs, False


def _candidates(
    costs: dict[str, dict[str, dict[str, float | None]]], formats: Sequence[str], paths: dict[str, list[dict[str, str]]], stride: int
) -> dict[str, dict[str, str]]:
    """The uniform configurations, then every `stride`-th step of each path and its last (each configuration once)."""
    candidates: dict[str, dict[str, str]] = {}
    for fmt in formats:
        uniform = {n: fmt for n in costs if fmt in costs[n]}
        if uniform:
            candidates[f"uniform {fmt}"] = uniform
    for objective, path in paths.items():
        for step in sorted({*range(stride, len(path) + 1, stride), len(path)} - {0}):
            if path[step - 1] not in candidates.values():
                candidates[f"{objective} step {step}"] = dict(path[step - 1])
    return candidates


def _measure(s: _Search, by_name: dict[str, SearchPoint], name: str, assignment: dict[str, str]) -> None:
    """Point `name`: `assignment` measured end to end (metric; latency alternating with float)."""
    from ptqkit.calibration.samples import call_model
    from ptqkit.core.timing import time_alternating

    same = next((p for p in by_name.values() if p.assignment == assignment), None)
    if same is not None:  # a bisection step can equal a configuration already measured
        by_name[name] = replace(same, name=name)
        return
    model, example, linears = s.model, s.example, s.linears
    candidate = apply_assignment(model, assignment)
    metrics = model_metrics(model, candidate, s.eval_data, max_samples=s.max_samples)
    with torch.inference_mode():
        float_timing, timing = time_alternating(lambda: call_model(model, example), lambda: call_model(candidate, example), 2, 8, 1)
    by_name[name] = SearchPoint(
        name=name, assignment=assignment, metric=metrics[s.metric], degradation=degradation(metrics, s.metric),
        measured_ms=timing.median_ms,
        predicted_ms=s.table.predict_ms(model, assignment, example, s.rows, float_ms=float_timing.median_ms, inside=s.inside),
        weight_bytes=s.float_bytes + sum(weight_bytes(linears[n], f) - weight_bytes(linears[n], "fp32") for n, f in assignment.items()),
        float_ms=float_timing.median_ms,
    )


def _measure_candidates(s: _Search, candidates: dict[str, dict[str, str]], by_name: dict[str, SearchPoint]) -> bool:
    """Each candidate measured end to end into `by_name`; True if the time limit stopped it."""
    with progress_bar(f"measuring {len(candidates)} configuration(s) end to end", len(candidates), s.progress) as advance:
        for name, assignment in candidates.items():
            if s.deadline.passed():
                return True
            _measure(s, by_name, name, assignment)
            advance(1, current=name)
    return False


def _refine_at_budget(s: _Search, paths: dict[str, list[dict[str, str]]], by_name: dict[str, SearchPoint], max_degradation: float) -> bool:
    """Each path bisected at the degradation budget (`_budget_bisection`); True if the time limit stopped it."""
    stopped = False
    with progress_bar("refining each path at the budget", None, s.progress) as advance:
        for objective, path in paths.items():
            for step in _budget_bisection(objective, path, by_name, max_degradation):
                if s.deadline.passed():
                    stopped = True
                    break
                _measure(s, by_name, f"{objective} step {step}", dict(path[step - 1]))
                advance(1, current=f"{objective} step {step}")
    return stopped


def _check_holdout(s: _Search, by_name: dict[str, SearchPoint], holdout_data: Any, max_degradation: float) -> bool:
    """The points within the budget, fastest first, measured again on `holdout_data`; True if the time limit stopped it."""
    checked: dict[tuple[tuple[str, str], ...], float] = {}
    within = sorted((n for n, p in by_name.items() if p.within(max_degradation)), key=lambda n: -by_name[n].speedup)
    with progress_bar("checking the points within the budget on the held-out data", len(within), s.progress) as advance:
        for name in within:
            if s.deadline.passed():
                return True
            key = tuple(sorted(by_name[name].assignment.items()))
            if key not in checked:
                metrics = model_metrics(s.model, apply_assignment(s.model, by_name[name].assignment), holdout_data, max_samples=s.max_samples)
                checked[key] = degradation(metrics, s.metric)
            by_name[name] = replace(by_name[name], holdout_degradation=checked[key])
            advance(1, current=name)
    return False


def _result(
    s: _Search, float_metric: float, costs: dict[str, dict[str, dict[str, float | None]]], points: list[SearchPoint], stopped: bool,
    budget: _Budget, layer_costs: LayerCosts,
) -> SearchResult:
    """Step 4: the Pareto front and the chosen point (or why none)."""
    float_ms = statistics.median(p.float_ms for p in points) if points else float("nan")
    chosen, why = _choose(points, budget.max_degradation, budget.max_bytes, budget.min_speedup, budget.holdout)
    if stopped:
        logger.warning("search stopped at the time limit (%.0f s): %d point(s) measured", s.deadline.limit_s or 0, len(points))
    return SearchResult(
        s.metric, float_metric, float_ms, s.float_bytes, tuple(points), tuple(pareto_front(points)), chosen, why, costs, stopped,
        proxy_rank_correlation(costs) if layer_costs == "measured" else None, layer_costs,
        versus_uniform(points, chosen, budget.max_degradation, budget.holdout),
    )


def _searched_linears(model: nn.Module, rows: dict[str, int], layers: Sequence[str] | None) -> dict[str, nn.Linear]:
    """The Linears the example calls, narrowed to those `layers` patterns match; a pattern that
    matches none of them is a ConfigError."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name in rows}
    if layers is None:
        return linears
    for pattern in layers:
        if not any(pattern_matches(pattern, name) for name in linears):
            raise no_match_error("search layers", pattern, list(linears), "no Linear the example calls")
    return {name: m for name, m in linears.items() if any(pattern_matches(pattern, name) for pattern in layers)}


def versus_uniform(points: Sequence[SearchPoint], chosen: SearchPoint | None, max_degradation: float, holdout: bool = False) -> str:
    """Whether the chosen mixed configuration is faster (by 5% at least: speed-up over float timed
    alternately) or smaller than the best uniform one within the budget (on the held-out data
    too, with `holdout`), and if not, why: the nearest smaller configuration past the budget."""
    uniform = [p for p in points if p.name.startswith("uniform ") and p.within(max_degradation, holdout)]
    if not uniform:
        return "no uniform configuration stays within the budget"
    best = max(uniform, key=lambda p: (p.speedup, -p.weight_bytes))
    if chosen is None or chosen.name.startswith("uniform "):
        return f"best uniform within the budget: {best.name} ({best.speedup:.2f}x, {best.weight_bytes / 1e6:.1f} MB)"
    faster, smaller = chosen.speedup >= TIE * best.speedup, chosen.weight_bytes < best.weight_bytes
    if faster or smaller:
        return (
            f"{chosen.name} is {'faster' if faster else 'not faster (a gain under 5% is a tie)'} ({chosen.speedup:.2f}x vs {best.speedup:.2f}x) and "
            f"{'smaller' if smaller else 'not smaller'} ({chosen.weight_bytes / 1e6:.1f} vs {best.weight_bytes / 1e6:.1f} MB) "
            f"than {best.name}"
        )
    over = [p for p in points if not p.name.startswith("uniform ") and not p.within(max_degradation, holdout) and p.weight_bytes < best.weight_bytes]
    first = min(over, key=lambda p: best.weight_bytes - p.weight_bytes, default=None)
    held = f" ({first.holdout_degradation:.4g} held out)" if first and first.holdout_degradation is not None else ""
    reason = f"; the nearest smaller configuration measured, {first.name}, degrades by {first.degradation:.4g}{held}" if first else ""
    return f"{chosen.name} is neither faster (a gain under 5% is a tie) nor smaller than {best.name} ({best.speedup:.2f}x, {best.weight_bytes / 1e6:.1f} MB){reason}"


def decode_step_input(data: Any) -> dict[str, torch.Tensor]:
    """One token of the first sample of token data ({"input_ids": [1, 1]}, with its attention
    mask if the data has one): the Linear shapes of an LLM decode step, where weight-only
    kernels pay off (attention reads no cache here, so the step's other work is a lower bound)."""
    batch = next(iter(data.batches(1)))
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ConfigError("decode-step timing needs token data (batches with 'input_ids'), e.g. a text file for a causal LM")
    return {key: value[:1, :1] for key, value in batch.items() if isinstance(value, torch.Tensor)}


def weight_sqnr_db(linear: nn.Linear, fmt: str) -> float:
    """SQNR (dB) of the layer's weight in `fmt` against its float weight: the data-free proxy."""
    from ptqkit.core.primitives import sqnr_db

    module = format_module(linear, fmt)
    if isinstance(module, str):
        return float("nan")
    eye = torch.eye(linear.in_features)
    with torch.no_grad():
        dense = module(eye).t() - (0.0 if linear.bias is None else linear.bias.detach().reshape(-1, 1))  # [out, in]
    return float(sqnr_db(linear.weight.detach().float(), dense.float()))


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def proxy_rank_correlation(costs: dict[str, dict[str, dict[str, float | None]]]) -> float | None:
    """Spearman correlation, over every (layer, non-float format), between the proxy's damage
    (-weight SQNR) and the measured degradation; None with fewer than 3 pairs or no spread.
    Near 1: the data-free proxy ranks layers as the measurement does."""
    pairs = [
        (-float(c["weight_sqnr_db"]), float(c["degradation"]))
        for per_layer in costs.values() for fmt, c in per_layer.items()
        if fmt != "fp32" and c.get("weight_sqnr_db") is not None and c["weight_sqnr_db"] == c["weight_sqnr_db"]
    ]
    if len(pairs) < 3:
        return None
    a, b = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    var = (sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) ** 0.5
    return cov / var if var > 0 else None


def _budget_bisection(objective: str, path: list[dict[str, str]], points: dict[str, SearchPoint], max_degradation: float) -> Any:
    """Steps of `path` to measure next, one at a time (a generator that reads `points` as they
    are measured): a bisection between the last measured step within the degradation budget
    and the first measured step beyond it, so each path's point at the budget is found to the
    step instead of to the stride."""
    def measured() -> dict[int, float]:
        prefix = f"{objective} step "
        return {int(name[len(prefix):]): p.degradation for name, p in points.items() if name.startswith(prefix)}

    while True:
        steps = measured()
        within = [step for step, degradation in steps.items() if degradation <= max_degradation]
        beyond = [step for step, degradation in steps.items() if not degradation <= max_degradation]  # NaN is beyond
        low = max(within, default=0)
        high = min((step for step in beyond if step > low), default=None)
        if high is None or high - low <= 1:
            return
        yield (low + high) // 2


def _greedy_path(costs: dict[str, dict[str, dict[str, float | None]]], objective: str) -> list[dict[str, str]]:
    """Assignments after each greedy move toward less latency ("latency": only moves predicted
    faster) or fewer bytes ("size"); see the module docstring."""
    current = {name: "fp32" for name in costs}
    path = []
    while True:
        best, best_score = None, None
        for name in costs:
            now = costs[name][current[name]]
            for fmt, new in costs[name].items():
                if fmt == current[name] or new["ms"] is None or now["ms"] is None or new["bytes"] >= now["bytes"]:
                    continue  # only moves to fewer bytes: each path goes one way
                saved = now["ms"] - new["ms"] if objective == "latency" else now["bytes"] - new["bytes"]
                if saved <= 0:
                    continue
                score = saved / max(new["degradation"] - now["degradation"], 1e-9)
                if best_score is None or score > best_score:
                    best, best_score = (name, fmt), score
        if best is None:
            return path
        current[best[0]] = best[1]
        path.append({n: f for n, f in current.items() if f != "fp32"})


def _choose(
    points: list[SearchPoint], max_degradation: float, max_bytes: int | None, min_speedup: float = 1.05, holdout: bool = False
) -> tuple[SearchPoint | None, str]:
    fits = [p for p in points if p.within(max_degradation, holdout) and (max_bytes is None or p.weight_bytes <= max_bytes)]
    if not fits:
        where = " on the search data and the held-out data" if holdout else ""
        return None, f"no measured configuration stays within the budget{where} (degradation <= {max_degradation:g}{'' if max_bytes is None else f', bytes <= {max_bytes}'})"
    faster = [p for p in fits if p.speedup >= min_speedup]
    if not faster:
        best = max(fits, key=lambda p: p.speedup)
        return None, (
            f"{len(fits)} configuration(s) meet the budget but none is at least {min_speedup:g}x faster than float here "
            f"(best {best.name}: {best.measured_ms:.1f} ms vs float {best.float_ms:.1f} ms, timed alternately); "
            "ptqkit never recommends a slower model, nor a gain within timing noise"
        )
    return min(faster, key=lambda p: (-p.speedup, p.weight_bytes)), ""
