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
- `scale_groups`: for transformer blocks, a *source* whose output channels may be divided by a
  per-channel scale s and the linear projections that read that output, whose input columns
  are then multiplied by s (SmoothQuant, AWQ). The source is a norm (LayerNorm/RMSNorm: weight
  and bias divided) or a Linear (output rows and bias divided) whose output reaches the
  projections only through positively homogeneous operations (ReLU, a gated product, an
  attention-weighted sum), so the float function is unchanged. A post-norm (BERT) LayerNorm
  also feeds the residual branch and is therefore never a source.

A row whose block class is a whole model (torchvision's `MobileNetV2`) holds model-level paths.
`FAMILIES` groups rows per model family; `block_mappings()` lists them all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ptqkit.core.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = [
    "FoldPair",
    "CLEChain",
    "ScaleGroup",
    "BlockMapping",
    "FAMILIES",
    "block_mappings",
    "resolve_fold_pairs",
    "resolve_cle_chains",
    "resolve_scale_groups",
    "find_block_list",
    "require_block_list",
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
class ScaleGroup:
    """A source module (norm or Linear) and the projections that read its output channels."""

    source: str
    projections: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "projections", tuple(self.projections))
        if not self.projections:
            raise ConfigError(f"scale group of source {self.source!r} names no projection")

    def prefixed(self, prefix: str) -> "ScaleGroup":
        """The same group with every path under the module `prefix`."""
        return ScaleGroup(source=_join(prefix, self.source), projections=tuple(_join(prefix, p) for p in self.projections))


@dataclass(frozen=True, kw_only=True)
class BlockMapping:
    """One block class of a model family and the paths inside it that algorithms use."""

    family: str
    block_class: str
    fold_pairs: tuple[FoldPair, ...] = ()
    cle_chains: tuple[CLEChain, ...] = ()  # variants: the first that fits the block is used
    scale_groups: tuple[ScaleGroup, ...] = ()


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
    BlockMapping(family="torchvision_resnet", block_class="ResNet", fold_pairs=(FoldPair(layer="conv1", bn="bn1"),)),
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

# Hugging Face decoders and encoders. LLaMA-style blocks (LLaMA, Mistral, Qwen2, SmolLM2) share
# paths. v_proj -> o_proj only applies without grouped-query attention (same width); groups whose
# widths do not match are skipped with a logged reason (see `resolve_scale_groups`).
_LLAMA_GROUPS = (
    ScaleGroup(source="input_layernorm", projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup(source="self_attn.v_proj", projections=("self_attn.o_proj",)),
    ScaleGroup(source="post_attention_layernorm", projections=("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup(source="mlp.up_proj", projections=("mlp.down_proj",)),  # down(act(gate) * up)
)
_TRANSFORMERS = (
    *(
        BlockMapping(family="llama", block_class=name, scale_groups=_LLAMA_GROUPS)
        for name in ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    ),
    BlockMapping(
        family="gpt2",
        block_class="GPT2Block",
        # c_fc -> GELU -> c_proj is not homogeneous; c_attn's value third feeds c_proj but also q/k
        scale_groups=(
            ScaleGroup(source="ln_1", projections=("attn.c_attn",)),
            ScaleGroup(source="ln_2", projections=("mlp.c_fc",)),
        ),
    ),
    BlockMapping(
        family="opt",
        block_class="OPTDecoderLayer",
        scale_groups=(
            ScaleGroup(source="self_attn_layer_norm", projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup(source="self_attn.v_proj", projections=("self_attn.out_proj",)),
            ScaleGroup(source="final_layer_norm", projections=("fc1",)),
            ScaleGroup(source="fc1", projections=("fc2",)),  # fc2(ReLU(fc1))
        ),
    ),
    BlockMapping(
        family="bert",
        block_class="BertLayer",
        # post-norm: every LayerNorm also feeds the residual, so only value -> output.dense
        scale_groups=(ScaleGroup(source="attention.self.value", projections=("attention.output.dense",)),),
    ),
)

FAMILIES: dict[str, tuple[BlockMapping, ...]] = {
    "torchvision_mobilenet_v2": tuple(m for m in _TORCHVISION_CNN if m.family == "torchvision_mobilenet_v2"),
    "torchvision_resnet": tuple(m for m in _TORCHVISION_CNN if m.family == "torchvision_resnet"),
    **{family: tuple(m for m in _TRANSFORMERS if m.family == family) for family in ("llama", "gpt2", "opt", "bert")},
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



def resolve_scale_groups(block: nn.Module, prefix: str = "") -> list[ScaleGroup]:
    """The scale groups of one transformer block, as names under `prefix`.

    Raises UnsupportedModelError when no table row names the block's class (the message says
    which row to add). Groups whose paths are missing or whose widths do not match (grouped-query
    attention's v_proj -> o_proj) are skipped with a logged reason."""
    rows = [row for row in block_mappings() if row.block_class == type(block).__name__ and row.scale_groups]
    if not rows:
        known = sorted({row.block_class for row in block_mappings() if row.scale_groups})
        raise UnsupportedModelError(
            f"no scale-group mapping for block class {type(block).__name__!r} (at {prefix or 'the model root'!r}); "
            "add a BlockMapping(family=..., block_class=..., scale_groups=(ScaleGroup(source='<norm>', "
            f"projections=('<linear>', ...)), ...)) row to ptqkit/mappings.py. Known block classes: {known}"
        )
    groups = []
    for group in rows[0].scale_groups:
        paths = (group.source, *group.projections)
        if not all(_has_path(block, p) for p in paths):
            logger.info("%s: scale group %s skipped: a path is missing", prefix, group.source)
            continue
        width = _output_width(block.get_submodule(group.source))
        widths = {_input_width(block.get_submodule(p)) for p in group.projections}
        if widths != {width}:
            logger.info(
                "%s: scale group %s -> %s skipped: source width %s != projection input width(s) %s",
                prefix, group.source, list(group.projections), width, sorted(widths),
            )
            continue
        groups.append(group.prefixed(prefix))
    return groups


def _output_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if type(module).__name__ == "Conv1D":  # Hugging Face GPT-2: weight [in, out]
        return int(weight.shape[1])
    return int(weight.shape[0])


def _input_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        return None
    return int(weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1])


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated blocks of a transformer: the ModuleList of at least two children of one
    class that holds the most parameters (HF decoders' `model.layers`, GPT-2's `transformer.h`,
    BERT's `encoder.layer`), as (name, list); None when the model has no such list."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def require_block_list(model: nn.Module, needed_for: str) -> tuple[str, nn.ModuleList]:
    """`find_block_list`, or UnsupportedModelError saying what (`needed_for`) needs one."""
    found = find_block_list(model)
    if found is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no repeated block list (an nn.ModuleList of same-class blocks): {needed_for}"
        )
    return found
