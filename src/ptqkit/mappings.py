"""Architecture knowledge as data: which modules of a model family feed which.

Algorithms never test `isinstance(block, SomeArchitectureBlock)`; they ask this table. A
`BlockMapping` row names a block class (matched by class name, so a user's own copy of a
torchvision or Hugging Face block matches as well) and, relative to that block, the module
paths an algorithm needs:

- `fold_pairs`: (layer, batch norm) pairs whose BN can be folded into the layer. Pairs inside an
  `nn.Sequential` (conv, bn, act) are found without a table (see `algorithms.bn_fold`); rows are
  for blocks that keep them as named attributes (ResNet's `conv1`/`bn1`).
- `cle_chains`: variants of a layer → activation → layer … chain that cross-layer equalization may
  rescale (`algorithms.cle`). A block uses the first variant whose every path exists; a chain is
  only listed when each intermediate output feeds the next layer alone (no residual branch).
- `norm_projections`: for transformer blocks, which norm feeds which linear projections
  (SmoothQuant / AWQ / rotations). LLaMA, GPT-2, OPT and BERT rows go here.

A row whose block class is a whole model (torchvision's `MobileNetV2`) holds model-level paths.
`FAMILIES` groups rows per model family; `block_mappings()` lists them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ptqkit.errors import ConfigError

__all__ = [
    "FoldPair",
    "CLEChain",
    "NormProjections",
    "BlockMapping",
    "FAMILIES",
    "block_mappings",
    "resolve_fold_pairs",
    "resolve_cle_chains",
]


@dataclass(frozen=True, kw_only=True)
class FoldPair:
    """A layer (Conv/Linear) followed directly by a batch norm; paths are module names."""

    layer: str
    bn: str


@dataclass(frozen=True, kw_only=True)
class CLEChain:
    """layers[0] → activations[0] → layers[1] → … → layers[-1].

    `activations[i]` is the module between layers[i] and layers[i+1], or None when the output
    of layers[i] goes straight into layers[i+1] (identity)."""

    layers: tuple[str, ...]
    activations: tuple[str | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "activations", tuple(self.activations))
        if len(self.layers) < 2:
            raise ConfigError(f"a CLE chain needs at least 2 layers, got layers={self.layers!r}")
        if len(self.activations) != len(self.layers) - 1:
            raise ConfigError(
                f"a CLE chain of {len(self.layers)} layers needs {len(self.layers) - 1} activation "
                f"entries (None for identity), got activations={self.activations!r}"
            )

    def prefixed(self, prefix: str) -> "CLEChain":
        """The same chain with every path under the module `prefix`."""
        return CLEChain(
            layers=tuple(_join(prefix, p) for p in self.layers),
            activations=tuple(None if a is None else _join(prefix, a) for a in self.activations),
        )


@dataclass(frozen=True, kw_only=True)
class NormProjections:
    """A normalization module and the linear projections that read its output."""

    norm: str
    projections: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class BlockMapping:
    """One block class of a model family and the paths inside it that algorithms use."""

    family: str
    block_class: str
    fold_pairs: tuple[FoldPair, ...] = ()
    cle_chains: tuple[CLEChain, ...] = ()  # variants: the first that fits the block is used
    norm_projections: tuple[NormProjections, ...] = ()


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


# ---- the tables ---------------------------------------------------------------------------
# torchvision MobileNetV2: InvertedResidual.conv is
#   expand_ratio != 1: [Conv2dNormActivation(1x1 expand: conv, bn, ReLU6),
#                       Conv2dNormActivation(3x3 depthwise: conv, bn, ReLU6), Conv2d 1x1 project, BN]
#   expand_ratio == 1: [Conv2dNormActivation(3x3 depthwise), Conv2d 1x1 project, BN]
# The block's output may be added to its input (residual), so chains stay inside the block.
_TORCHVISION_CNN = (
    # The stem conv feeds only the first block (expand_ratio 1, 32 -> 16 channels: no residual),
    # so the chain may cross the block boundary; it covers that block's own dw -> project chain.
    BlockMapping(
        family="torchvision_mobilenet_v2",
        block_class="MobileNetV2",
        cle_chains=(
            CLEChain(
                layers=("features.0.0", "features.1.conv.0.0", "features.1.conv.1"),
                activations=("features.0.2", "features.1.conv.0.2"),
            ),
        ),
    ),
    BlockMapping(
        family="torchvision_mobilenet_v2",
        block_class="InvertedResidual",
        cle_chains=(
            CLEChain(layers=("conv.0.0", "conv.1.0", "conv.2"), activations=("conv.0.2", "conv.1.2")),
            CLEChain(layers=("conv.0.0", "conv.1"), activations=("conv.0.2",)),
        ),
    ),
    BlockMapping(
        family="torchvision_resnet",
        block_class="BasicBlock",
        fold_pairs=(FoldPair(layer="conv1", bn="bn1"), FoldPair(layer="conv2", bn="bn2")),
        cle_chains=(CLEChain(layers=("conv1", "conv2"), activations=("relu",)),),
    ),
    BlockMapping(
        family="torchvision_resnet",
        block_class="Bottleneck",
        fold_pairs=(
            FoldPair(layer="conv1", bn="bn1"),
            FoldPair(layer="conv2", bn="bn2"),
            FoldPair(layer="conv3", bn="bn3"),
        ),
        # `relu` is one shared module applied after bn1 and bn2: it is positively homogeneous,
        # so sharing it does not matter for equalization.
        cle_chains=(CLEChain(layers=("conv1", "conv2", "conv3"), activations=("relu", "relu")),),
    ),
)

FAMILIES: dict[str, tuple[BlockMapping, ...]] = {
    "torchvision_mobilenet_v2": tuple(m for m in _TORCHVISION_CNN if m.family == "torchvision_mobilenet_v2"),
    "torchvision_resnet": tuple(m for m in _TORCHVISION_CNN if m.family == "torchvision_resnet"),
}


def block_mappings() -> tuple[BlockMapping, ...]:
    """Every row of every family."""
    return tuple(row for rows in FAMILIES.values() for row in rows)


# ---- resolution against a model ------------------------------------------------------------
def _has_path(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _matching_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, BlockMapping]]:
    by_class: dict[str, list[BlockMapping]] = {}
    for row in block_mappings():
        by_class.setdefault(row.block_class, []).append(row)
    for name, module in model.named_modules():
        for row in by_class.get(type(module).__name__, ()):
            yield name, module, row


def resolve_fold_pairs(model: nn.Module) -> list[FoldPair]:
    """The table's (layer, bn) pairs present in `model`, as full module names."""
    found = []
    for name, block, row in _matching_blocks(model):
        for pair in row.fold_pairs:
            if _has_path(block, pair.layer) and _has_path(block, pair.bn):
                found.append(FoldPair(layer=_join(name, pair.layer), bn=_join(name, pair.bn)))
    return found


def _fits(block: nn.Module, chain: CLEChain) -> bool:
    for path in chain.layers:
        if not _has_path(block, path):
            return False
        if not isinstance(block.get_submodule(path), (nn.Conv2d, nn.Linear)):
            return False
    return all(a is None or _has_path(block, a) for a in chain.activations)


def resolve_cle_chains(model: nn.Module) -> list[CLEChain]:
    """For every block of `model` that a table row names, the first chain variant that fits
    (all paths exist and every layer is a Conv2d or Linear), as full module names."""
    found: list[CLEChain] = []
    for name, block, row in _matching_blocks(model):
        for chain in row.cle_chains:
            if _fits(block, chain):
                found.append(chain.prefixed(name))
                break

    def links(chain: CLEChain) -> set[tuple[str, str]]:
        return set(zip(chain.layers, chain.layers[1:]))

    # drop a chain whose every link lies inside a longer chain (e.g. a block's own chain
    # covered by a model-level row that extends it backwards)
    return [
        c for c in found if not any(len(o.layers) > len(c.layers) and links(c) <= links(o) for o in found)
    ]

