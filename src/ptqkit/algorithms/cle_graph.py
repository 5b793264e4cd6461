"""Find cross-layer-equalization chains in a model's module graph (torch.fx), with no
architecture-specific code.

A link is layer A → [one activation module] → layer B (A, B: Conv2d or Linear) where A's output
reaches only that activation and the activation's output reaches only B; nn.Identity modules
(what BN folding leaves behind) and eval-mode Dropout on the way are transparent. An unfolded
BatchNorm on the way is reported in the activation's place, so that the chain is skipped with
that reason. Links that share a layer are joined into chains (MobileNetV2: expand 1x1 → depthwise 3x3 → project 1x1).
Whether the activation can be scaled through (ReLU, ReLU6, LeakyReLU) is not judged here:
`cle.equalize_` skips a chain through SiLU, GELU or an unfolded BatchNorm with a logged reason.
A path through a function call (torch.relu, a residual add, a reshape) ends the link: only
modules can be rescaled, and a tensor with two readers cannot be scaled for one of them.
Models that torch.fx cannot trace return None; `cle.equalize_` then captures the chains from one
forward with hooks (`cle_capture`, given an example batch) or uses the mapping tables.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ptqkit.models.mappings import CLEChain
from ptqkit.stats.graph_pass import trace

__all__ = ["BATCHNORMS", "LAYERS", "graph_cle_chains", "join_links", "passes_through"]

logger = logging.getLogger(__name__)

LAYERS = (nn.Conv2d, nn.Linear)  # the layers a chain links (and bias correction follows)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def passes_through(module: nn.Module | None) -> bool:
    """Whether `module` returns its input unchanged: nn.Identity (what BN folding leaves) or an
    eval-mode Dropout."""
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)


def _module(modules: dict[str, nn.Module], node: Any) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _only_user(node: Any) -> Any | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _follow(modules: dict[str, nn.Module], node: Any) -> tuple[str | None, Any] | None:
    """From a layer's node: (activation module name or None, the next layer's node), if the
    layer's output flows through transparent modules and at most one other module into a layer."""
    activation = batchnorm = None
    current = node
    while True:
        nxt = _only_user(current)
        module = _module(modules, nxt) if nxt is not None else None
        if module is None or len(nxt.all_input_nodes) != 1:
            return None
        if isinstance(module, LAYERS):
            return batchnorm or activation, nxt
        if passes_through(module):
            current = nxt
            continue
        if isinstance(module, BATCHNORMS) and batchnorm is None:
            batchnorm, current = nxt.target, nxt  # the chain is reported, and skipped: fold BNs first
            continue
        if activation is not None:
            return None
        activation, current = nxt.target, nxt


def graph_cle_chains(model: nn.Module) -> list[CLEChain] | None:
    """CLE chains found in `model`'s torch.fx graph, or None if it does not trace."""
    graph = trace(model)
    if graph is None:
        return None
    modules = dict(model.named_modules())
    links: dict[str, tuple[str | None, str]] = {}  # layer -> (activation, next layer)
    for node in graph.nodes:
        if isinstance(_module(modules, node), LAYERS):
            found = _follow(modules, node)
            if found is not None:
                links[node.target] = (found[0], found[1].target)
    return join_links(links, list(modules))


def join_links(links: dict[str, tuple[str | None, str]], order: list[str]) -> list[CLEChain]:
    """Chains from links layer -> (activation, next layer): each chain starts at a layer no link
    leads to, follows the links, and chains come in `order` (module or call order)."""
    starts = set(links) - {nxt for _, nxt in links.values()}
    chains = []
    for start in sorted(starts, key=order.index):
        layers, activations = [start], []
        while layers[-1] in links and len(layers) <= len(links):
            activation, nxt = links[layers[-1]]
            activations.append(activation)
            layers.append(nxt)
        chains.append(CLEChain(layers=tuple(layers), activations=tuple(activations)))
    return chains
