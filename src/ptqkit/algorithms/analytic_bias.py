"""Data-free (analytic) bias correction inside the engine: DFQ (Nagel et al. 2019), section 4.2.

Each targeted layer B gets c = -ΔW · E[x] added to its bias, with ΔW = W̃ - W its weight
error on the grid conversion will use, and E[x] its expected input from a model, not from data:

- `bn_fold` records, before folding, each folded layer's pre-activation output per channel as
  N(β_c, γ_c²), the BatchNorm's output (`batchnorm_gaussians`);
- cross-layer equalization divides output channel c of a layer by s_c, so its model becomes
  N(β_c / s_c, (γ_c / s_c)²) (`equalized_gaussians`);
- the torch.fx graph says which layer A feeds B and through which activation module
  (`input_links`); E[x] = E[act(N(β, γ²))] is a clipped normal mean (ReLU, ReLU6, CLE's clipped
  ReLU, identity).
A layer whose input is not such a layer output (the model input, a residual sum, a pooling or
reshape function, an activation without a closed form, a layer without a folded BatchNorm) keeps
its bias; the log says which and why. For convolutions E[x] is taken at every kernel tap, which
slightly overcorrects border outputs that read padding (see `bias_correction`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ptqkit.algorithms.bias_correction import clipped_normal_mean, empirical_bias_correction
from ptqkit.algorithms.bn_fold import FoldedPair
from ptqkit.algorithms.cle import ChannelClippedReLU, EqualizationResult, layer_groups
from ptqkit.algorithms.cle_graph import LAYERS, passes_through
from ptqkit.algorithms.rtn import round_to_grid
from ptqkit.core.errors import ConfigError
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.stats.graph_pass import trace

__all__ = [
    "ChannelGaussian",
    "activation_bounds",
    "analytic_bias_correct_",
    "batchnorm_gaussians",
    "equalized_gaussians",
    "input_links",
]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ChannelGaussian:
    """A layer's pre-activation output modelled per output channel as N(mean, std²): [C] each."""

    mean: torch.Tensor
    std: torch.Tensor


def batchnorm_gaussians(model: nn.Module, pairs: Iterable[FoldedPair]) -> dict[str, ChannelGaussian]:
    """For each (layer, BatchNorm) pair, still unfolded: the BN's output model N(β, γ²) per
    channel (γ = 1, β = 0 for an affine-free BN), keyed by the layer's name. Float64 copies."""
    gaussians = {}
    for pair in pairs:
        bn = model.get_submodule(pair.bn)
        features = bn.num_features
        gamma = bn.weight.detach() if bn.affine else torch.ones(features)
        beta = bn.bias.detach() if bn.affine else torch.zeros(features)
        gaussians[pair.layer] = ChannelGaussian(beta.to(torch.float64).clone(), gamma.to(torch.float64).abs())
    return gaussians


def equalized_gaussians(
    gaussians: Mapping[str, ChannelGaussian], results: Iterable[EqualizationResult]
) -> dict[str, ChannelGaussian]:
    """`gaussians` after cross-layer equalization: a layer whose output channels CLE divided by
    s (the product over sweeps) has N(mean / s, (std / s)²)."""
    updated = dict(gaussians)
    for result in results:
        for layer, scale in zip(result.chain.layers, result.scales):
            if layer in updated:
                s = scale.to(torch.float64)
                updated[layer] = ChannelGaussian(updated[layer].mean / s, updated[layer].std / s)
    return updated


def activation_bounds(module: nn.Module | None) -> tuple[float | torch.Tensor, float | torch.Tensor] | str:
    """(lower, upper) such that the activation is clamp(x, lower, upper), or why it is not one."""
    if module is None or passes_through(module):
        return -math.inf, math.inf
    if isinstance(module, nn.ReLU):
        return 0.0, math.inf
    if isinstance(module, nn.ReLU6):
        return 0.0, 6.0
    if type(module) is nn.Hardtanh:
        return float(module.min_val), float(module.max_val)
    if isinstance(module, ChannelClippedReLU):
        return 0.0, module.upper.detach().to(torch.float64)
    return f"{type(module).__name__} is not a clamp, so E[act(x)] has no closed form here (ReLU, ReLU6, Hardtanh, identity)"


def input_links(graph: object, model: nn.Module) -> dict[str, tuple[str, str | None]]:
    """From a torch.fx graph of `model`: layer B -> (layer A, activation module or None) for each
    Conv2d/Linear B whose input is A's output through Identity/eval Dropout modules and at most
    one other single-input module (the activation). A's output may have other readers."""
    modules = dict(model.named_modules())
    links = {}
    for node in graph.nodes:  # type: ignore[attr-defined]
        if node.op != "call_module" or not isinstance(modules.get(node.target), LAYERS) or len(node.all_input_nodes) != 1:
            continue
        current, activation = node.all_input_nodes[0], None
        while current.op == "call_module" and len(current.all_input_nodes) == 1:
            module = modules[current.target]
            if isinstance(module, LAYERS):
                links[node.target] = (current.target, activation)
                break
            if passes_through(module):
                current = current.all_input_nodes[0]
                continue
            if activation is not None:
                break
            activation, current = current.target, current.all_input_nodes[0]
    return links


@torch.no_grad()
def analytic_bias_correct_(
    model: nn.Module,
    targets: Mapping[str, tuple[str, QuantSpec]],
    grids: Callable[[torch.Tensor, QuantSpec], QParams],
    gaussians: Mapping[str, ChannelGaussian],
) -> dict[str, float]:
    """Add -ΔW · E[x] to the bias of every target (name -> (module type, weight spec)) whose input
    comes from a layer in `gaussians`, in place; `grids(weight, spec)` must give the grid the
    weights will be quantized on. Returns name -> largest |correction| for the corrected layers.

    Raises ConfigError if the model does not trace (the links come from its torch.fx graph)."""
    graph = trace(model)
    if graph is None:
        raise ConfigError(
            f"analytic bias correction finds which layer feeds each layer in the torch.fx graph, and "
            f"{type(model).__name__} does not trace; use bias_correction mode 'empirical' (with calibration data)"
        )
    links = input_links(graph, model)
    corrected: dict[str, float] = {}
    uncorrected: dict[str, str] = {}
    for name, (kind, spec) in targets.items():
        if kind not in ("Linear", "Conv2d"):
            uncorrected[name] = f"a {kind}"
            continue
        if name not in links:
            uncorrected[name] = "its input is not a layer's output through one activation module"
            continue
        producer, activation = links[name]
        if producer not in gaussians:
            uncorrected[name] = f"no BatchNorm was folded into {producer!r}, which feeds it"
            continue
        bounds = activation_bounds(model.get_submodule(activation) if activation is not None else None)
        if isinstance(bounds, str):
            uncorrected[name] = f"activation {activation!r}: {bounds}"
            continue
        gaussian = gaussians[producer]
        expected = clipped_normal_mean(gaussian.mean, gaussian.std, *bounds)  # [C] E[x] per input channel
        module = model.get_submodule(name)
        weight = module.weight.detach()
        qparams = grids(weight, spec)
        delta = round_to_grid(weight, qparams, spec).dequantized.to(torch.float64) - weight.to(torch.float64)
        correction = empirical_bias_correction(delta, expected, groups=layer_groups(module))  # [out]
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype), requires_grad=False)
        module.bias.add_(correction.to(module.bias.dtype))
        corrected[name] = float(correction.abs().max())
    for name, why in uncorrected.items():
        logger.info("analytic bias correction leaves %s unchanged: %s", name, why)
    logger.info("analytic bias correction: %d of %d layer(s) corrected", len(corrected), len(targets))
    return corrected
