"""An up-front memory plan: predict the peak resident memory of a quantization run from the
model's shapes, the recipe and the calibration size, before any weight is loaded, and refuse a
run that cannot fit with the setting to change.

The prediction is the process's resident memory now (interpreter, torch, the model skeleton)
plus, in bytes:

- in memory (`pq.quantize` on a loaded model): the weight file's pages (transformers maps it
  while loading), the float model, the copy `quantize` works on, the block engine's results
  (codes, 1 byte per weight, and dequantized floats) and the quantized layers (codes and their
  dequantized float cache) built while the float copy still exists;
- with onloading (`ptqkit.engine.onloading`): the weights outside the blocks, one float block, the
  integer codes of every quantized layer, and, when the artifact is written, its tensors
  (packed codes and the outside weights) twice: collected, then serialized by safetensors;
- both: the calibration activations the block engine keeps (each block's inputs and outputs for
  every sample), one batch's transient activations inside a block, and one block's statistics
  (GPTQ's Hessians and their working copies, AWQ's sampled rows).

`benchmarks/onloading.py` compares it with the measured peak.
"""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ptqkit.core.errors import ConfigError, UnsupportedModelError
from ptqkit.core.progress import current_rss_bytes
from ptqkit.engine.recipe import Recipe

__all__ = ["MemoryPlan", "plan_memory", "plan_from_config", "available_memory", "check_memory", "proc_status"]

logger = logging.getLogger(__name__)

_FLOAT_BYTES = 4  # the engine runs in float32
SAFETY_MARGIN = 1.15  # measured predictions: -10%..+9% of the peak growth (benchmarks/onloading.py, the capped test)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak resident bytes of a run: `baseline` (resident now) + `parts`."""

    onload: bool
    baseline: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.baseline + sum(self.parts.values())

    def render(self) -> str:
        lines = [f"memory plan ({'onloading' if self.onload else 'in memory'}): predicted peak {self.peak / 2**30:.2f} GiB"]
        lines.append(f"  {'resident now':44} {self.baseline / 2**20:9.1f} MiB")
        lines += [f"  {name:44} {size / 2**20:9.1f} MiB" for name, size in self.parts.items()]
        return "\n".join(lines)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * _FLOAT_BYTES for p in module.parameters())


def _linear_shapes(block: nn.Module) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for m in block.modules() if isinstance(m, nn.Linear)]


def plan_memory(
    model: nn.Module, recipe: Recipe, *, samples: int, seq_len: int, batch_size: int, onload: bool
) -> MemoryPlan:
    """The memory plan of quantizing `model` (a skeleton on the meta device is enough: only
    shapes are read) with `recipe` on `samples` sequences of `seq_len` tokens."""
    from ptqkit.algorithms.pipeline import split_algorithms
    from ptqkit.engine.targets import resolve_plan
    from ptqkit.models.mappings import require_block_list

    list_name, blocks = require_block_list(model, "the memory plan models block-by-block runs")
    stages = split_algorithms(recipe.algorithms)
    total = _param_bytes(model)  # tied weights are counted once by parameters()
    block_bytes = max(_param_bytes(block) for block in blocks)
    outside = total - sum(_param_bytes(block) for block in blocks)
    the_plan = resolve_plan(model, recipe)
    quantized = [layer for layer in the_plan.layers if layer.weights is not None]
    weights = {name: module.weight.numel() for name, module in model.named_modules() if hasattr(module, "weight") and isinstance(getattr(module, "weight"), nn.Parameter)}
    codes = sum(weights.get(layer.name, 0) for layer in quantized)  # 1 byte each (int8 storage)
    bits = max((layer.weights.qtype.bits for layer in quantized), default=8)
    hidden = _hidden_size(model, blocks)
    widest = max((shape[0] for shape in _linear_shapes(blocks[0])), default=hidden)
    parts: dict[str, int] = {}
    if onload:
        parts["weights outside the blocks"] = outside
        parts["one float block"] = block_bytes
        parts["integer codes of quantized layers"] = codes
        parts["artifact tensors while writing"] = 2 * (codes * bits // 8 + outside)  # collected, then serialized
    else:
        parts["weight file pages mapped while loading"] = total
        parts["float model"] = total
        parts["copy quantized by pq.quantize"] = total
        if stages.blockwise:
            parts["weight results (codes + dequantized floats)"] = codes * (1 + _FLOAT_BYTES)
        parts["quantized layers (codes + float cache)"] = codes * (1 + _FLOAT_BYTES)
    tokens = samples * seq_len
    parts["block inputs and outputs (all samples)"] = 2 * tokens * hidden * _FLOAT_BYTES
    parts["one batch inside a block"] = 4 * batch_size * seq_len * widest * _FLOAT_BYTES
    parts["one block's statistics"] = _statistics_bytes(stages, blocks[0], tokens // max(1, batch_size))
    logger.info("memory plan for %s (%s): %s", type(model).__name__, list_name, parts)
    return MemoryPlan(onload=onload, baseline=current_rss_bytes(), parts=parts)


def _hidden_size(model: nn.Module, blocks: nn.ModuleList) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size:
        return int(size)
    return max(shape[1] for shape in _linear_shapes(blocks[0]))


def _statistics_bytes(stages: Any, block: nn.Module, calls: int) -> int:
    """One block's statistics: the sum of each block-engine algorithm's own estimate (its
    registry row's `memory`: GPTQ's Hessians and working copies, AWQ's sampled rows)."""
    from ptqkit.algorithms.registry import algorithm_of

    inputs = [shape[1] for shape in _linear_shapes(block)]
    rows = [(c, algorithm_of(c)) for c in (stages.weight_quantizer, *stages.block_transforms) if c is not None]
    return sum(row.memory(c, inputs, calls) for c, row in rows if row.memory is not None)


def available_memory() -> tuple[int, str]:
    """(bytes this process may still grow by, where that bound comes from): the smallest of
    MemAvailable, the cgroup's memory.max minus its usage, and the soft RLIMIT_AS / RLIMIT_DATA
    minus what this process already maps."""
    bounds: list[tuple[int, str]] = []
    meminfo = _kib_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        bounds.append((meminfo["MemAvailable"], "MemAvailable in /proc/meminfo"))
    cgroup = Path("/sys/fs/cgroup")
    limit, usage = cgroup / "memory.max", cgroup / "memory.current"
    if limit.is_file() and usage.is_file() and limit.read_text().strip() != "max":
        bounds.append((int(limit.read_text()) - int(usage.read_text()), "cgroup memory.max"))
    status = proc_status()
    for which, name, used in ((resource.RLIMIT_AS, "RLIMIT_AS", "VmSize"), (resource.RLIMIT_DATA, "RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY and used in status:
            bounds.append((soft - status[used], f"{name} (setrlimit/ulimit) minus {used}"))
    if not bounds:
        return (1 << 62, "no limit found")
    return min(bounds)


def _kib_fields(path: str) -> dict[str, int]:
    """The "Name: N kB" lines of a /proc file, in bytes ({} where /proc is missing)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.endswith("kB")}


def proc_status() -> dict[str, int]:
    """This process's memory counters (VmRSS, VmData, VmSize...) in bytes."""
    return _kib_fields("/proc/self/status")


def check_memory(plan: MemoryPlan, available: tuple[int, str] | None = None) -> None:
    """Raise ConfigError when the plan's growth beyond what is resident now, plus the safety
    margin, exceeds the memory available, naming the settings that lower it."""
    room, source = available if available is not None else available_memory()
    growth = plan.peak - plan.baseline
    if growth * SAFETY_MARGIN <= room:
        logger.info("%s\nfits: %.2f GiB may still be used (%s)", plan.render(), room / 2**30, source)
        return
    largest = max(plan.parts, key=lambda name: plan.parts[name])
    advice = (
        "quantize with onloading (`ptqkit quantize --onload`, or ptqkit.engine.onloading.quantize_onloaded): the weights stay on disk"
        if not plan.onload
        else "lower calibration.samples, --max-length or calibration.batch_size, or free memory"
    )
    raise ConfigError(
        f"this run needs about {growth / 2**30:.2f} GiB more than is resident now ({growth * SAFETY_MARGIN / 2**30:.2f} GiB "
        f"with the {SAFETY_MARGIN - 1:.0%} safety margin), but only {room / 2**30:.2f} GiB is "
        f"available ({source}); the largest part is {largest!r} ({plan.parts[largest] / 2**30:.2f} GiB). {advice}.\n"
        f"{plan.render()}"
    )


def plan_from_config(model_dir: str | Path, recipe: Recipe, *, samples: int, seq_len: int, batch_size: int, onload: bool) -> MemoryPlan | None:
    """The plan of a run on the Hugging Face model in `model_dir`, from its config alone (the
    model is built on the meta device: no weight is read). None for a model without repeated
    blocks."""
    from ptqkit.engine.weight_store import build_skeleton

    try:
        return plan_memory(build_skeleton(model_dir), recipe, samples=samples, seq_len=seq_len, batch_size=batch_size, onload=onload)
    except UnsupportedModelError as exc:
        logger.info("no memory plan: %s", exc)
        return None
