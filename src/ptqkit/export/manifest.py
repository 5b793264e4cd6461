"""`quantization.json`, the manifest of a ptqkit artifact, as typed frozen dataclasses.

The artifact writer builds a `Manifest` and writes `to_json(manifest)`; the loader reads the file
with `read_json(Manifest, ...)`, so both sides share one description of every key and its type.
A layer record holds the keys every quantized module has (`LayerEntry`) plus the keys its type's
row in `export.records` adds (`extra`: codes storage, conv arguments, outlier columns, ...), which
that row checks when it rebuilds the module. The recipe is checked by `Recipe.from_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from ptqkit.core.errors import ConfigError
from ptqkit.core.fields import Interval

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "LayerEntry", "Manifest", "ModelEntry", "OutputEntry"]

FORMAT_NAME = "ptqkit-artifact"
FORMAT_VERSION = 1
MAX_WEIGHT_DIMS = 8
Size = Annotated[int, Interval(0, 2**40, "[)")]


@dataclass(frozen=True)
class ModelEntry:
    """The model the artifact was quantized from: its class, whether it is a Hugging Face model,
    its float dtype (None when mixed) and attention implementation (rebuilt as recorded)."""

    class_name: str = field(metadata={"json": "class"})
    hf: bool = False
    dtype: str | None = None
    attn_implementation: str | None = None


@dataclass(frozen=True)
class LayerEntry:
    """One quantized (or input-only) module: the plan's entry (`plan_type`, `reason`), its
    module type's name in `export.records`, its weight and input specs (QuantSpec dicts, checked
    when the module is built), its calibrated input QParams, the outlier threshold of inputs that
    keep outliers in float, its weight shape (weight-quantized modules) and its type's own keys
    (`extra`)."""

    name: str
    module: str
    plan_type: str
    reason: str
    weights: dict[str, Any] | None
    inputs: dict[str, Any] | None
    input_qparams: dict[str, Any] | None
    outlier_threshold: float | None = None
    weight_shape: tuple[Size, ...] | None = field(default=None, metadata={"omit_none": True})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight_shape is not None and not 1 <= len(self.weight_shape) <= MAX_WEIGHT_DIMS:
            raise ConfigError(f"weight_shape: {list(self.weight_shape)!r:.100} must hold 1 to {MAX_WEIGHT_DIMS} sizes")


@dataclass(frozen=True)
class OutputEntry:
    """The output quantizer of one module (`nn.output_quant`: where an integer CNN graph quantizes
    a tensor no quantized layer reads): its static input spec and QParams, also stored as the
    tensors `{module}.output_quantizer.scale` / `.zero_point`."""

    module: str
    spec: dict[str, Any]
    qparams: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """Everything `quantization.json` holds (see `export.artifact`)."""

    format: Literal["ptqkit-artifact"]
    format_version: int
    model: ModelEntry
    recipe: dict[str, Any]
    layers: tuple[LayerEntry, ...]
    skipped: tuple[tuple[str, str, str], ...]
    aliases: dict[str, str]
    model_sha256: str
    versions: dict[str, str] | None = None
    calibration: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    outputs: tuple[OutputEntry, ...] | None = field(default=None, metadata={"omit_none": True})  # only when there are some
