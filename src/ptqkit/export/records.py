"""How each quantized module type is written to and rebuilt from a ptqkit artifact.

Every module the engine puts in a model has one `ModuleRecord` row in `MODULE_RECORDS`, keyed by
its type: the name `quantization.json` records (`"module"`), the keys it adds to its layer record
when saved (`describe`), and how it is rebuilt from the float skeleton's module and the
artifact's tensors when loaded (`build`). Input quantizers with extra state (calibrated outlier
columns, smoothing divisors) have one `InputRecord` row each in `INPUT_RECORDS`. Saving
(`export.artifact`) and loading (`export.load`) only look rows up: a new quantized module type is
one more row here, not a branch in both.

Everything read is checked before it is used (presence, dtype, shape, code range, agreement
between the JSON record and the tensors) and a failure is an ArtifactError naming the file and
the tensor or key.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqkit.core.errors import ArtifactError, PTQError
from ptqkit.core.primitives import unpack_lowbit
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.export.manifest import LayerEntry, OutputEntry
from ptqkit.nn.act_quant import InputQuantizer, OutlierColumnsQuantizer, SmoothedInputQuantizer, make_input_quantizer
from ptqkit.nn.modules import InputOnly, QuantConv, QuantEmbedding, QuantLinear
from ptqkit.nn.output_quant import output_quantizers, set_output_quantizer_

__all__ = [
    "ArtifactTensors",
    "INPUT_RECORDS",
    "InputRecord",
    "MODULE_RECORDS",
    "ModuleRecord",
    "build_module",
    "build_outputs",
    "built_entries",
    "codes_storage",
    "describe_module",
    "describe_outputs",
    "module_names",
    "record_of",
]

_PACKABLE_BITS = (1, 2, 4)


def codes_storage(spec: QuantSpec) -> str:
    """How a layer's codes are stored: "packed" (1/2/4-bit, two or more per byte) or "raw"."""
    qtype = spec.qtype
    if qtype.storage_dtype.is_floating_point or qtype.bits not in _PACKABLE_BITS:
        return "raw"
    return "packed"


@dataclass
class ArtifactTensors:
    """The tensors of an artifact's model.safetensors (`path`) while layers are rebuilt from
    them; `quant_path` is its quantization.json. `take` hands each tensor out once, checked, and
    remembers its name in `taken`."""

    tensors: dict[str, torch.Tensor]
    path: Path
    quant_path: Path
    taken: set[str] = field(default_factory=set)

    def take(self, key: str, dtype: torch.dtype | None, shape: tuple[int, ...] | None) -> torch.Tensor:
        if key not in self.tensors:
            raise ArtifactError(f"{self.path}: tensor {key!r} is missing")
        value = self.tensors.pop(key)
        self.taken.add(key)
        if dtype is not None and value.dtype != dtype:
            raise ArtifactError(f"{self.path}: tensor {key!r} has dtype {value.dtype}, expected {dtype}")
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ArtifactError(f"{self.path}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value

    def spec(self, data: Any, name: str, key: str) -> QuantSpec:
        """The QuantSpec recorded at layers[name].key of quantization.json."""
        where = f"{self.quant_path}: layers[{name!r}].{key}"
        try:
            return QuantSpec.from_dict(data, where=where)
        except PTQError as exc:  # the message already starts with `where`
            raise ArtifactError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None

    def qparams(self, prefix: str, spec: QuantSpec, shape: tuple[int, ...] | None) -> QParams:
        param_shape = None if shape is None else spec.granularity.param_shape(torch.Size(shape))
        scale = self.take(f"{prefix}scale", torch.float32, param_shape)
        zero_point = self.take(f"{prefix}zero_point", torch.int32, param_shape)
        try:
            return QParams(scale, zero_point, spec.qtype, spec.granularity)
        except PTQError as exc:
            raise ArtifactError(f"{self.path}: tensors {prefix}scale / {prefix}zero_point are invalid: {exc}") from None

    def codes(self, layer: LayerEntry, spec: QuantSpec) -> torch.Tensor:
        """A layer's weight codes, unpacked when stored packed, checked against the qtype's range."""
        name, qtype = layer.name, spec.qtype
        shape = _weight_shape(layer, self.quant_path)
        if layer.extra.get("codes_storage") == "packed":
            key = f"{name}.weight_packed"
            packed = self.take(key, torch.uint8, (*shape[:-1], -(-shape[-1] // (8 // qtype.bits))))
            codes = unpack_lowbit(packed, qtype.bits, shape[-1], signed=qtype.is_integer and qtype.signed)
            codes = codes.to(qtype.storage_dtype)
        else:
            key = f"{name}.weight_codes"
            codes = self.take(key, qtype.storage_dtype, shape)
        if qtype.is_integer and codes.numel() and (codes.min() < qtype.qmin or codes.max() > qtype.qmax):
            raise ArtifactError(
                f"{self.path}: tensor {key!r} holds codes in [{codes.min().item()}, {codes.max().item()}], outside "
                f"{qtype.name}'s range [{qtype.qmin}, {qtype.qmax}]"
            )
        if not qtype.is_integer and not qtype.storage_dtype.is_floating_point and codes.numel() and codes.max() > 15:
            raise ArtifactError(f"{self.path}: tensor {key!r} holds 4-bit codes above 15")
        return codes


# ---------------------------------------------------------------- input quantizers


@dataclass(frozen=True)
class InputRecord:
    """An input quantizer kind with state beyond its (scale, zero point): the layer-record key
    holding that state, what is written there, and how the quantizer is rebuilt (static inputs)."""

    key: str
    quantizer_type: type[InputQuantizer]
    describe: Callable[[Any], dict[str, Any]]
    read: Callable[[LayerEntry, QuantSpec, QParams, ArtifactTensors], InputQuantizer]


def _weight_shape(layer: LayerEntry, quant_path: Path) -> tuple[int, ...]:
    if layer.weight_shape is None:
        raise ArtifactError(f"{quant_path}: layers[{layer.name!r}] of module {layer.module} has no weight_shape")
    return layer.weight_shape


def _input_width(layer: LayerEntry) -> int | None:
    return layer.weight_shape[1] if layer.weight_shape and len(layer.weight_shape) > 1 else None


def _read_smoothing(layer: LayerEntry, spec: QuantSpec, qparams: QParams, tensors: ArtifactTensors) -> InputQuantizer:
    """Smoothing divisors: one finite positive value per input column of a per-tensor static input."""
    name, recorded = layer.name, layer.extra["input_smoothing"]
    where = f"{tensors.quant_path}: layers[{name!r}].input_smoothing"
    width = _input_width(layer)
    if not isinstance(recorded, dict) or recorded.get("divisors") != width:
        raise ArtifactError(f"{where} must be {{'divisors': {width}}} (the layer's input columns), got {recorded!r:.200}")
    divisors = tensors.take(f"{name}.input_quantizer.divisors", torch.float32, (width,))
    try:
        return make_input_quantizer(spec, qparams, divisors=divisors)
    except ValueError as exc:
        raise ArtifactError(f"{tensors.path}: tensor {name}.input_quantizer.divisors: {exc}") from None


def _read_outlier_columns(layer: LayerEntry, spec: QuantSpec, qparams: QParams, tensors: ArtifactTensors) -> InputQuantizer:
    """Calibrated outlier columns: the tensors must match the JSON record, be distinct input
    columns of a static input, multiples >= 1."""
    name, recorded = layer.name, layer.extra["outlier_columns"]
    where = f"{tensors.quant_path}: layers[{name!r}].outlier_columns"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("columns"), list) or not isinstance(recorded.get("multiples"), list):
        raise ArtifactError(f"{where} must be {{'columns': [...], 'multiples': [...]}}, got {recorded!r:.200}")
    k = len(recorded["columns"])
    columns = tensors.take(f"{name}.input_quantizer.columns", torch.int64, (k,))
    multiples = tensors.take(f"{name}.input_quantizer.multiples", torch.int64, (k,))
    width = _input_width(layer)
    if columns.tolist() != recorded["columns"] or multiples.tolist() != recorded["multiples"]:
        raise ArtifactError(f"{tensors.path}: tensors {name}.input_quantizer.columns/multiples disagree with {where} {recorded!r:.200}")
    outside = bool((columns < 0).any()) or (width is not None and bool((columns >= width).any()))
    if spec.dynamic or len(set(columns.tolist())) != k or outside or bool((multiples < 1).any()):
        raise ArtifactError(
            f"{where}: columns {columns.tolist()} must be distinct input columns in [0, {width}) of a static input, "
            f"multiples {multiples.tolist()} at least 1"
        )
    return make_input_quantizer(spec, qparams, columns=columns, multiples=multiples)


INPUT_RECORDS: tuple[InputRecord, ...] = (
    InputRecord(
        "outlier_columns", OutlierColumnsQuantizer,
        lambda q: {"columns": q.columns.tolist(), "multiples": q.multiples.tolist()}, _read_outlier_columns,
    ),
    InputRecord("input_smoothing", SmoothedInputQuantizer, lambda q: {"divisors": int(q.divisors.numel())}, _read_smoothing),
)
_INPUT_RECORD_OF = {row.quantizer_type: row for row in INPUT_RECORDS}


def _describe_inputs(quantizer: InputQuantizer | None) -> dict[str, Any]:
    """The layer-record fields of a module's input quantizer (spec, qparams, outlier threshold)
    and, in "extra", the state its `InputRecord` row writes."""
    row = _INPUT_RECORD_OF.get(type(quantizer))
    qparams = None if quantizer is None else quantizer.qparams
    return {
        "inputs": None if quantizer is None else quantizer.spec.to_dict(),
        "outlier_threshold": getattr(quantizer, "outlier_threshold", None),
        "input_qparams": None if qparams is None else {"scale": qparams.scale.tolist(), "zero_point": qparams.zero_point.tolist()},
        "extra": {} if row is None else {row.key: row.describe(quantizer)},
    }


def _dynamic_quantizer(layer: LayerEntry, spec: QuantSpec, tensors: ArtifactTensors) -> InputQuantizer:
    threshold = layer.outlier_threshold
    if threshold is None:
        return make_input_quantizer(spec)
    if not threshold > 0 or not spec.dynamic:
        raise ArtifactError(
            f"{tensors.quant_path}: layers[{layer.name!r}].outlier_threshold={threshold!r} must be a positive number "
            "on a layer with dynamic inputs"
        )
    return make_input_quantizer(spec, outlier_threshold=float(threshold))


def _read_inputs(layer: LayerEntry, tensors: ArtifactTensors) -> InputQuantizer | None:
    """A layer's input quantizer: dynamic (optionally keeping outliers), or static with its
    qparams checked against the JSON record and its extra state read by its `InputRecord`."""
    if layer.inputs is None:
        return None
    name = layer.name
    spec = tensors.spec(layer.inputs, name, "inputs")
    if spec.dynamic or layer.outlier_threshold is not None:
        return _dynamic_quantizer(layer, spec, tensors)
    qparams = tensors.qparams(f"{name}.input_quantizer.", spec, None)
    recorded = layer.input_qparams
    if not isinstance(recorded, dict) or recorded.get("scale") != qparams.scale.tolist() or recorded.get("zero_point") != qparams.zero_point.tolist():
        raise ArtifactError(
            f"{tensors.path}: tensors {name}.input_quantizer.scale/zero_point {qparams.scale.tolist()}/{qparams.zero_point.tolist()} "
            f"disagree with layers[{name!r}].input_qparams {recorded!r:.200} in {tensors.quant_path.name}"
        )
    for row in INPUT_RECORDS:
        if layer.extra.get(row.key) is not None:
            return row.read(layer, spec, qparams, tensors)
    return make_input_quantizer(spec, qparams)


# ---------------------------------------------------------------- modules


@dataclass(frozen=True)
class WeightParts:
    """What a weight-quantized module is rebuilt from: its layer record, the skeleton's float
    module, the recorded spec, codes, QParams, an empty tensor of the weight's float dtype and
    shape, and the input quantizer."""

    record: LayerEntry
    skeleton: nn.Module
    spec: QuantSpec
    codes: torch.Tensor
    qparams: QParams
    template: torch.Tensor
    inputs: InputQuantizer | None


@dataclass(frozen=True)
class ModuleRecord:
    """One quantized module type in the artifact: `module` is its name in quantization.json,
    `describe` adds its own keys to its layer record, `build` rebuilds it from `WeightParts`
    (weight-quantized types) or from the skeleton module and its input quantizer (`weights=False`)."""

    module: str
    module_type: type[nn.Module]
    weights: bool
    build: Callable[..., nn.Module]
    describe: Callable[[nn.Module], dict[str, Any]] = lambda module: {}


def _conv_args(module: QuantConv) -> dict[str, Any]:
    return {"conv_args": {k: list(v) if isinstance(v, tuple) else v for k, v in module.conv_args.items()}}


MODULE_RECORDS: dict[type[nn.Module], ModuleRecord] = {
    row.module_type: row
    for row in (
        ModuleRecord(
            "QuantLinear", QuantLinear, True,
            lambda p: QuantLinear(p.template, getattr(p.skeleton, "bias", None), p.qparams, p.spec, p.inputs, codes=p.codes),
        ),
        ModuleRecord("QuantConv", QuantConv, True, lambda p: QuantConv(p.skeleton, p.qparams, p.spec, p.inputs, codes=p.codes), _conv_args),
        ModuleRecord("QuantEmbedding", QuantEmbedding, True, lambda p: QuantEmbedding(p.skeleton, p.qparams, p.spec, codes=p.codes)),
        ModuleRecord("InputOnly", InputOnly, False, lambda skeleton, inputs: InputOnly(skeleton, inputs)),
    )
}


def module_names() -> tuple[str, ...]:
    """The "module" names quantization.json may hold, one per row."""
    return tuple(sorted(row.module for row in MODULE_RECORDS.values()))


def record_of(module: nn.Module) -> ModuleRecord | None:
    """The row of `module`'s type, or None for a module the artifact cannot hold."""
    return MODULE_RECORDS.get(type(module))


def describe_module(name: str, module: nn.Module, layer: Any) -> LayerEntry:
    """The quantization.json record of one quantized (or input-only) module of the plan's `layer`."""
    row = record_of(module)
    inputs = _describe_inputs(module.input_quantizer)
    common = {"name": name, "module": row.module, "plan_type": layer.module_type, "reason": layer.reason}
    if not row.weights:
        return LayerEntry(**common, weights=None, **inputs)
    storage = codes_storage(module.weight_spec)
    inputs["extra"] |= {
        "float_type": module.float_type,
        "weight_dtype": str(module.weight.dtype).removeprefix("torch."),
        "codes_storage": storage,
        "codes_tensor": f"{name}.weight_packed" if storage == "packed" else f"{name}.weight_codes",
        **row.describe(module),
    }
    return LayerEntry(**common, weights=module.weight_spec.to_dict(), weight_shape=tuple(module.weight_codes.shape), **inputs)


_FROM_ARTIFACT = ("weight_codes", "weight_scale", "weight_zero_point", "input_quantizer.")


def built_entries(module: nn.Module) -> list[str]:
    """The state-dict entries of a rebuilt module that `build_module` read from the artifact (its
    codes, weight QParams and input quantizer); the rest (bias, a wrapped float module) is the
    skeleton's and is filled from the artifact's tensors afterwards."""
    return [key for key in module.state_dict() if key.startswith(_FROM_ARTIFACT)]


def _skeleton_weight(module: nn.Module, layer: LayerEntry, path: Path, quant_path: Path) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ArtifactError(f"{path}: layer {layer.name!r}: the model skeleton's {type(module).__name__} has no weight")
    if layer.plan_type == "Conv1D":
        weight = weight.t()  # transformers' Conv1D keeps [in, out]
    expected = _weight_shape(layer, quant_path)
    if tuple(weight.shape) != expected:
        raise ArtifactError(
            f"{path}: layer {layer.name!r}: weight shape {expected} does not fit the model skeleton's "
            f"{type(module).__name__} of weight shape {tuple(weight.shape)}; is this the right model?"
        )
    return weight


def _weight_parts(skeleton: nn.Module, layer: LayerEntry, inputs: InputQuantizer | None, tensors: ArtifactTensors) -> WeightParts:
    name = layer.name
    spec = tensors.spec(layer.weights, name, "weights")
    _skeleton_weight(skeleton, layer, tensors.path, tensors.quant_path)  # raises ArtifactError when the skeleton weight does not match
    codes = tensors.codes(layer, spec)
    qparams = tensors.qparams(f"{name}.weight_", spec, tuple(codes.shape))
    dtype_name = layer.extra.get("weight_dtype", "float32")
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArtifactError(f"{tensors.quant_path}: layers[{name!r}].weight_dtype {dtype_name!r} is not a float dtype")
    return WeightParts(layer, skeleton, spec, codes, qparams, torch.empty(codes.shape, dtype=dtype), inputs)


def build_module(skeleton: nn.Module, layer: LayerEntry, tensors: ArtifactTensors) -> nn.Module:
    """The quantized replacement of one skeleton module, from its layer record and the artifact's
    tensors (the record's "module" was checked against `module_names()` when the manifest was read)."""
    row = next(row for row in MODULE_RECORDS.values() if row.module == layer.module)
    inputs = _read_inputs(layer, tensors)
    if not row.weights:
        return row.build(skeleton, inputs)
    parts = _weight_parts(skeleton, layer, inputs, tensors)
    try:
        return row.build(parts)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"{tensors.path}: layer {layer.name!r} cannot be rebuilt as {row.module} on {type(skeleton).__name__}: {exc}"
        ) from None


# ---------------------------------------------------------------- output quantizers


def _qparams_record(qparams: QParams) -> dict[str, Any]:
    return {"scale": qparams.scale.tolist(), "zero_point": qparams.zero_point.tolist()}


def describe_outputs(qmodel: nn.Module) -> tuple[OutputEntry, ...] | None:
    """The output quantizers of `qmodel` (`nn.output_quant`), or None when it has none. Only
    calibrated static quantizers can be saved: anything else is an ArtifactError naming the module."""
    entries = []
    for name, quantizer in output_quantizers(qmodel).items():
        if type(quantizer) is not InputQuantizer or quantizer.qparams is None:
            raise ArtifactError(
                f"save_artifact: module {name!r} has an output quantizer of type {type(quantizer).__name__}; only a "
                "calibrated static InputQuantizer (export.integer_cnn.calibrate_outputs_) can be saved"
            )
        entries.append(OutputEntry(module=name, spec=quantizer.spec.to_dict(), qparams=_qparams_record(quantizer.qparams)))
    return tuple(entries) or None


def build_outputs(model: nn.Module, entries: tuple[OutputEntry, ...], tensors: ArtifactTensors) -> list[str]:
    """Give `model`'s modules the recorded output quantizers (tensors checked against the JSON);
    returns the state-dict entries they were built from."""
    built = []
    for i, entry in enumerate(entries):
        where = f"{tensors.quant_path}: outputs[{i}]"
        try:
            module = model.get_submodule(entry.module)
            spec = QuantSpec.from_dict(entry.spec, where=f"{where}.spec")
        except AttributeError:
            raise ArtifactError(f"{where}: module {entry.module!r} does not exist in the model skeleton {type(model).__name__}") from None
        except PTQError as exc:
            raise ArtifactError(str(exc)) from None
        if spec.dynamic:
            raise ArtifactError(f"{where}.spec: an output quantizer is static (dynamic=false), got {entry.spec!r:.200}")
        qparams = tensors.qparams(f"{entry.module}.output_quantizer.", spec, None)
        if _qparams_record(qparams) != entry.qparams:
            raise ArtifactError(f"{tensors.path}: tensors {entry.module}.output_quantizer.scale/zero_point disagree with {where}.qparams")
        set_output_quantizer_(module, InputQuantizer(spec, qparams))
        built += [f"{entry.module}.output_quantizer.scale", f"{entry.module}.output_quantizer.zero_point"]
    return built
