"""Cross-layer equalization (CLE), Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.1.

For two layers y = f(W1 x + b1), z = W2 y + b2 with a positively homogeneous f
(f(x / s) = f(x) / s for s > 0: ReLU, LeakyReLU, identity), scaling output channel i of layer 1
by 1/s_i and input channel i of layer 2 by s_i leaves z unchanged:

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i,   W2'[:, i] = W2[:, i] · s_i

With r1_i = max|W1[i]| (range of output channel i of layer 1) and r2_i = max|W2[:, i]| (range
of input channel i of layer 2), the choice s_i = sqrt(r1_i · r2_i) / r2_i = sqrt(r1_i / r2_i)
makes both ranges equal to sqrt(r1_i · r2_i), which maximizes the total per-channel precision
Σ_i (r1_i/R1)(r2_i/R2) (the paper's eq. 10-12). A channel with r1_i = 0 or r2_i = 0 is dead and
keeps s_i = 1. Chains of more layers (MobileNetV2's 1x1 → depthwise → 1x1) are equalized pair by
pair, repeatedly, until the scales converge.

ReLU6 is not positively homogeneous. The paper replaces ReLU6 by ReLU before equalizing, which
changes the FP model whenever a pre-activation exceeds 6. ptqkit's default ("clip") keeps the
model exactly: ReLU6 after a scaled channel becomes `ChannelClippedReLU`, min(max(x, 0), u_i)
with per-channel upper bounds u_i = 6 / s_i, since clamp(x / s, 0, 6 / s) = clamp(x, 0, 6) / s.
relu6="relu" reproduces the paper. Any other non-linearity between the layers (SiLU, GELU,
Hardswish, sigmoid, an unfolded BatchNorm) makes the chain ineligible: it is skipped with a
logged reason and never rescaled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import Above, Interval, check_fields, literal_values
from ptqkit.core.primitives import check_finite
from ptqkit.models.mappings import CLEChain, resolve_cle_chains
from ptqkit.nn.tree import replace_module

__all__ = [
    "CLEConfig",
    "ChannelClippedReLU",
    "EqualizationResult",
    "RELU6_MODES",
    "equalization_scales",
    "input_channel_ranges",
    "layer_groups",
    "apply_equalization",
    "equalize_",
]

logger = logging.getLogger(__name__)

Relu6Mode = Literal["clip", "relu"]
RELU6_MODES: tuple[str, ...] = literal_values(Relu6Mode)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


@dataclass(frozen=True, kw_only=True)
class CLEConfig:
    """Cross-layer equalization.

    - `iterations`: most sweeps over every chain (each sweep equalizes each consecutive pair).
    - `tolerance`: stop when every scale of a sweep satisfies |log s| < tolerance.
    - `relu6`: "clip" (exact: ReLU6 becomes a per-channel clipped ReLU) or "relu" (the DFQ
      paper: ReLU6 becomes ReLU, which changes the FP model when activations exceed 6).
    """

    iterations: Annotated[int, Interval(1, 10000)] = 20
    tolerance: Annotated[float, Above(0)] = 1e-4
    relu6: Relu6Mode = "clip"

    def __post_init__(self) -> None:
        check_fields(self, "cle")


@dataclass(frozen=True, kw_only=True)
class EqualizationResult:
    """What happened to one chain: `sweeps` run (0 if skipped), the reason it was skipped, and
    `scales[i]` [C]: the product of the scales layers[i]'s output channels were divided by."""

    chain: CLEChain
    sweeps: int = 0
    skipped: str | None = None
    scales: tuple[torch.Tensor, ...] = ()


class ChannelClippedReLU(nn.Module):
    """min(max(x, 0), upper[c]) with one upper bound per channel along `channel_dim` (1 after
    a convolution [N, C, ...], -1 after a Linear [..., C]). ReLU6 after equalization, with
    upper = 6 / s."""

    def __init__(self, upper: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ConfigError(f"ChannelClippedReLU: channel_dim={channel_dim!r}; valid: 1 (conv), -1 (linear)")
        self.channel_dim = channel_dim
        self.register_buffer("upper", upper.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = [1] * x.ndim
        view[self.channel_dim] = -1
        return torch.minimum(torch.relu(x), self.upper.reshape(view).to(x.dtype))  # [N, C, ...] or [..., C]

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}, channel_dim={self.channel_dim}"


# ---- pure maths ---------------------------------------------------------------------------
def _check_weights(w1: torch.Tensor, w2: torch.Tensor, groups: int) -> int:
    for name, w in (("w1", w1), ("w2", w2)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.ndim < 2:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ConfigError(f"cle: {name} must be a floating weight [out, in, ...] with >= 2 dims, got {shape}")
        check_finite(w, f"cle {name}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or w2.shape[0] % groups:
        raise ConfigError(f"cle: groups={groups!r} must be a positive integer dividing w2's {w2.shape[0]} output channels")
    channels = w1.shape[0]
    if w2.shape[1] * groups != channels:
        raise ConfigError(
            f"cle: w1 has {channels} output channels but w2 {tuple(w2.shape)} with groups={groups} "
            f"reads {w2.shape[1] * groups} input channels"
        )
    return channels


def _grouped(w2: torch.Tensor, groups: int) -> torch.Tensor:
    """w2 [out, in/g, *k] viewed as [g, out/g, in/g, *k]: input channel c = group·(in/g) + j."""
    return w2.reshape(groups, w2.shape[0] // groups, *w2.shape[1:])  # [g, out/g, in/g, *k]


def input_channel_ranges(w2: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """max |W2| over everything that reads input channel c, for each c: [in]."""
    g = _grouped(w2.abs(), groups)  # [g, out/g, in/g, *k]
    per = g.transpose(1, 2).reshape(groups, w2.shape[1], -1).amax(dim=2)  # [g, in/g]
    return per.reshape(-1)  # [in]


def equalization_scales(w1: torch.Tensor, w2: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """Per-channel scales s [C] that equalize layer 1's output channels with layer 2's input
    channels: s_i = sqrt(r1_i · r2_i) / r2_i (1 for a dead channel).

    `w1` [C, ...] (any Linear/Conv weight), `w2` [out, C / groups, ...] read with `groups`
    (1 for dense, C for depthwise). Computed in float64, returned as float32."""
    _check_weights(w1, w2, groups)
    r1 = w1.detach().abs().to(torch.float64).reshape(w1.shape[0], -1).amax(dim=1)  # [C]
    r2 = input_channel_ranges(w2.detach().to(torch.float64), groups)  # [C]
    alive = (r1 > 0) & (r2 > 0)
    s = torch.where(alive, torch.sqrt(r1 * r2) / torch.where(alive, r2, 1.0), torch.ones_like(r1))
    return s.to(torch.float32)


def apply_equalization(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    s: torch.Tensor,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(W1 / s per output channel, b1 / s, W2 · s per input channel), in the inputs' dtypes.

    `s` [C] must be positive and finite; `groups` is layer 2's (see `equalization_scales`)."""
    channels = _check_weights(w1, w2, groups)
    if s.shape != (channels,):
        raise ConfigError(f"cle: scales have shape {tuple(s.shape)}, expected ({channels},)")
    check_finite(s, "cle scales")
    if not (s > 0).all():
        raise ConfigError(f"cle: scales must be > 0, got min {s.min().item()!r}")
    s64 = s.to(torch.float64)
    new_w1 = w1.to(torch.float64) / s64.reshape((channels,) + (1,) * (w1.ndim - 1))  # [C, ...] / [C, 1, ...]
    new_b1 = None if b1 is None else (b1.to(torch.float64) / s64).to(b1.dtype)  # [C]
    per_group = s64.reshape(groups, 1, w2.shape[1], *([1] * (w2.ndim - 2)))  # [g, 1, in/g, 1, ...]
    new_w2 = (_grouped(w2.to(torch.float64), groups) * per_group).reshape(w2.shape)  # [out, in/g, *k]
    return new_w1.to(w1.dtype), new_b1, new_w2.to(w2.dtype)


# ---- module level -------------------------------------------------------------------------
def layer_groups(layer: nn.Module) -> int:
    """How many groups a Conv2d's weight splits its input channels into (1 for a Linear)."""
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def _is_relu6(act: nn.Module) -> bool:
    return isinstance(act, nn.ReLU6) or (
        type(act) is nn.Hardtanh and act.min_val == 0.0 and act.max_val == 6.0
    )


def _chain_problem(model: nn.Module, chain: CLEChain) -> str | None:
    """Why `chain` cannot be equalized in `model`, or None if it can."""
    layers = []
    for path in chain.layers:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            return f"module {path!r} does not exist"
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            return f"{path!r} is a {type(layer).__name__}, not a Conv2d or Linear"
        layers.append(layer)
    for i, path in enumerate(chain.activations):
        if path is None:
            continue
        try:
            act = model.get_submodule(path)
        except AttributeError:
            return f"activation {path!r} does not exist"
        if isinstance(act, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return f"{path!r} is an unfolded BatchNorm; fold batch norms first (fold_batchnorm_)"
        if not (isinstance(act, _HOMOGENEOUS + (ChannelClippedReLU,)) or _is_relu6(act)):
            return (
                f"activation {path!r} ({type(act).__name__}) is not positively homogeneous, so "
                "scaling through it would change the model; supported: ReLU, LeakyReLU, ReLU6, Identity"
            )
        if isinstance(act, ChannelClippedReLU) and act.upper.numel() != layers[i].weight.shape[0]:
            return f"{path!r} has {act.upper.numel()} channel bounds, layer {chain.layers[i]!r} {layers[i].weight.shape[0]} channels"
    for (p1, l1), (p2, l2) in zip(zip(chain.layers, layers), zip(chain.layers[1:], layers[1:])):
        c_in = l2.weight.shape[1] * layer_groups(l2)
        if l1.weight.shape[0] != c_in:
            return f"{p1!r} has {l1.weight.shape[0]} output channels but {p2!r} reads {c_in}"
    return None


def _prepare_activations(model: nn.Module, chain: CLEChain, relu6: str) -> None:
    for i, path in enumerate(chain.activations):
        if path is None:
            continue
        act = model.get_submodule(path)
        if _is_relu6(act):
            layer = model.get_submodule(chain.layers[i])
            channels = layer.weight.shape[0]
            if relu6 == "clip":
                dim = -1 if isinstance(layer, nn.Linear) else 1
                replace_module(model, path, ChannelClippedReLU(torch.full((channels,), 6.0), channel_dim=dim))
            else:
                logger.warning("cle: replacing ReLU6 %r by ReLU (DFQ); the FP model changes where activations exceed 6", path)
                replace_module(model, path, nn.ReLU())


def _equalize_pair(model: nn.Module, chain: CLEChain, i: int) -> torch.Tensor:
    l1, l2 = model.get_submodule(chain.layers[i]), model.get_submodule(chain.layers[i + 1])
    groups = layer_groups(l2)
    with torch.no_grad():
        s = equalization_scales(l1.weight, l2.weight, groups=groups)
        w1, b1, w2 = apply_equalization(l1.weight, l1.bias, l2.weight, s, groups=groups)
        l1.weight.copy_(w1)
        if b1 is not None:
            l1.bias.copy_(b1)
        l2.weight.copy_(w2)
        act_path = chain.activations[i]
        act = model.get_submodule(act_path) if act_path is not None else None
        if isinstance(act, ChannelClippedReLU):
            act.upper.copy_(act.upper / s.to(act.upper.dtype))
    return s


def _discover_chains(model: nn.Module, example: Any) -> list[CLEChain]:
    from ptqkit.algorithms.cle_capture import captured_cle_chains
    from ptqkit.algorithms.cle_graph import graph_cle_chains

    found = graph_cle_chains(model)
    if found is not None:
        return found
    if example is not None:
        return captured_cle_chains(model, example)
    logger.info("cle: %s does not trace and no example batch was given; chains from the mapping tables", type(model).__name__)
    return resolve_cle_chains(model)


def equalize_(
    model: nn.Module,
    chains: list[CLEChain] | None = None,
    config: CLEConfig | None = None,
    *,
    example: Any = None,
) -> list[EqualizationResult]:
    """Cross-layer equalization of `chains`, in place. Fold batch norms first. By default the
    chains come from the model's torch.fx graph (`cle_graph`); for a model that does not trace,
    from one forward of `example` (a calibration batch) with hooks (`cle_capture`), or without
    one from the mapping tables (`ptqkit.models.mappings.resolve_cle_chains`).

    Ineligible chains (a non-homogeneous activation, an unfolded BN, mismatched channels) are
    skipped with a logged reason. Returns one `EqualizationResult` per chain."""
    config = config or CLEConfig()
    if not isinstance(config, CLEConfig):
        raise ConfigError(f"equalize_: config must be a CLEConfig, got {type(config).__name__}")
    if chains is None:
        chains = _discover_chains(model, example)
    chains = list(chains)
    results = []
    for chain in chains:
        problem = _chain_problem(model, chain)
        if problem is not None:
            logger.warning("cle: skipping chain %s: %s", " -> ".join(chain.layers), problem)
            results.append(EqualizationResult(chain=chain, skipped=problem))
            continue
        _prepare_activations(model, chain, config.relu6)
        totals = [torch.ones(model.get_submodule(path).weight.shape[0], dtype=torch.float64) for path in chain.layers[:-1]]
        sweeps = 0
        for sweeps in range(1, config.iterations + 1):
            change = 0.0
            for i in range(len(chain.layers) - 1):
                s = _equalize_pair(model, chain, i).to(torch.float64)
                totals[i] *= s
                change = max(change, float(s.log().abs().max()))
            if change < config.tolerance:
                break
        logger.debug("cle: %s equalized in %d sweep(s)", " -> ".join(chain.layers), sweeps)
        results.append(EqualizationResult(chain=chain, sweeps=sweeps, scales=tuple(totals)))
    logger.info("cle: equalized %d of %d chain(s)", sum(r.skipped is None for r in results), len(results))
    return results
