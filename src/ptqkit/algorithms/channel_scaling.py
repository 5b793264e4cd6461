"""Function-preserving per-channel rescaling between a source and the projections reading it
(the move SmoothQuant and AWQ make): the source's output channels are divided by s [C] and the
projections' input columns multiplied by s, so Ŵ·(x/s) = W·x in float.

Layouts: a norm (LayerNorm / RMSNorm) has weight [C] and maybe bias [C]; a Linear has weight
[out, in]; Hugging Face's GPT-2 `Conv1D` has weight [in, out]. Norms whose forward is not
`weight · normalized + bias` (Gemma's `1 + weight`) cannot be rescaled this way and are refused.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ptqkit.core.errors import UnsupportedModelError

__all__ = ["scale_channels_", "rescale_group_", "input_columns", "set_input_columns_"]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def input_columns(projection: nn.Module) -> torch.Tensor:
    """The projection's weight as [out, in] (a view; Conv1D's is transposed)."""
    return projection.weight.t() if _is_conv1d(projection) else projection.weight


def _divide_source_(source: nn.Module, s: torch.Tensor, name: str) -> None:
    weight = getattr(source, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedModelError(f"scale source {name!r} ({type(source).__name__}) has no weight to rescale")
    if "Gemma" in type(source).__name__:
        raise UnsupportedModelError(f"scale source {name!r}: {type(source).__name__} multiplies by (1 + weight); it cannot be rescaled")
    bias = getattr(source, "bias", None)
    if weight.ndim == 1:  # norm: y = weight · x̂ + bias
        weight.div_(s.to(weight.dtype))
    elif _is_conv1d(source):  # [in, out]
        weight.div_(s.to(weight.dtype)[None, :])
    elif weight.ndim == 2:  # Linear [out, in]
        weight.div_(s.to(weight.dtype)[:, None])
    else:
        raise UnsupportedModelError(f"scale source {name!r}: weight of shape {tuple(weight.shape)} is neither a norm nor a linear")
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


def set_input_columns_(projection: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] weight back into the projection in its own layout."""
    target = projection.weight
    target.copy_(weight.t() if _is_conv1d(projection) else weight)


@torch.no_grad()
def scale_channels_(
    modules: dict[str, nn.Module], source: str, projections: Sequence[str], scales: torch.Tensor
) -> None:
    """Divide `source`'s output channels by `scales` [C] and multiply every projection's input
    columns by them (in place; the float function is unchanged)."""
    _divide_source_(modules[source], scales, source)
    for name in projections:
        projection = modules[name]
        columns = input_columns(projection)  # [out, C]
        set_input_columns_(projection, columns * scales.to(columns.dtype)[None, :])


def rescale_group_(modules: dict[str, nn.Module], group: Any, scales: torch.Tensor, stats: dict[str, Any]) -> None:
    """`scale_channels_` for a scale group, and the projections' input statistics divided by
    the same scales (each distinct statistics object once)."""
    scale_channels_(modules, group.source, group.projections, scales)
    for unique in {id(stats[p]): stats[p] for p in group.projections}.values():
        unique.divide_(scales)
