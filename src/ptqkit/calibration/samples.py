"""Pure helpers over calibration samples: validation, batch splitting, collation, hashing.

A *sample* is one model input without a batch dimension: a Tensor, a tuple of Tensors
(positional arguments) or a dict name -> Tensor (keyword arguments). All samples of one
CalibrationData share the same structure, dtypes and shapes, except that 1-D integer (or bool)
tensors — token sequences — may differ in length; `collate` right-pads those.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from ptqkit.core.errors import CalibrationDataError, NonFiniteError

__all__ = [
    "ModelInput",
    "as_sample",
    "validate_samples",
    "split_batch",
    "collate",
    "hash_samples",
    "clone_sample",
    "call_model",
    "call_on_batch",
    "count_samples",
    "describe_tensors",
    "pick_samples",
]

ModelInput = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]
"""What `model(...)` takes: a Tensor, a tuple of positional Tensors, or a dict of keyword Tensors."""


def _is_sequence_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex


def _leaves(sample: ModelInput) -> list[tuple[str, torch.Tensor]]:
    """(location, tensor) pairs of a sample; location is '' for a bare tensor, '[i]' or key 'k'."""
    if isinstance(sample, torch.Tensor):
        return [("", sample)]
    if isinstance(sample, dict):
        return [(f"key {k!r}", v) for k, v in sample.items()]
    return [(f"element {i}", v) for i, v in enumerate(sample)]


def _at(location: str) -> str:
    return f" at {location}" if location else ""


def as_sample(item: Any, origin: str, *, copy: bool) -> ModelInput:
    """Check one item's structure and return it as a sample of detached, contiguous tensors.

    Lists become tuples. With `copy`, tensors are cloned so later changes to the caller's
    tensors cannot change the calibration set (or its fingerprint).
    """

    def own(t: Any, location: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise CalibrationDataError(
                f"calibration {origin}{_at(location)} is a {type(t).__name__}; samples must be a Tensor, "
                "a tuple of Tensors or a dict str -> Tensor"
            )
        t = t.detach()
        return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()

    if isinstance(item, torch.Tensor):
        return own(item, "")
    if isinstance(item, Mapping):
        bad = [k for k in item if not isinstance(k, str)]
        if bad:
            raise CalibrationDataError(
                f"calibration {origin} has non-string key {bad[0]!r}; dict samples need str keys"
            )
        return {k: own(v, f"key {k!r}") for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        if not item:
            raise CalibrationDataError(f"calibration {origin} is an empty {type(item).__name__}")
        return tuple(own(v, f"element {i}") for i, v in enumerate(item))
    raise CalibrationDataError(
        f"calibration {origin} is a {type(item).__name__}; samples must be a Tensor, a tuple of Tensors "
        "or a dict str -> Tensor"
    )


def _structure(sample: ModelInput) -> str:
    if isinstance(sample, torch.Tensor):
        return "a Tensor"
    if isinstance(sample, dict):
        return f"a dict with keys {sorted(sample)}"
    return f"a tuple of {len(sample)} Tensors"


def _check_finite(sample: ModelInput, origin: str) -> None:
    for location, t in _leaves(sample):
        if (t.dtype.is_floating_point or t.dtype.is_complex) and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise CalibrationDataError(
                f"calibration {origin}{_at(location)} holds {int(bad.sum())} NaN/Inf value(s) "
                f"(first at index {first}); calibration samples must be finite: clean or drop that sample"
            )


def validate_samples(samples: Sequence[ModelInput], origins: Sequence[str]) -> None:
    """Raise CalibrationDataError unless the samples agree with each other and are finite.

    Each sample is compared with the first one: same structure (kind, keys, tuple length), same
    dtype and shape per tensor; 1-D integer/bool tensors may differ in length (padded later).
    Errors name the two disagreeing samples (`origins`) and their shapes/dtypes.
    """
    if not samples:
        raise CalibrationDataError("calibration data is empty: no samples to validate")
    first, first_origin = samples[0], origins[0]
    reference = _leaves(first)
    for sample, origin in zip(samples, origins):
        if type(sample) is not type(first) or _structure(sample) != _structure(first):
            raise CalibrationDataError(
                f"calibration samples disagree: {first_origin} is {_structure(first)} but {origin} is "
                f"{_structure(sample)}; every sample must have the same structure"
            )
        leaves = _leaves(sample)
        if isinstance(sample, dict):
            leaves = [(loc, sample[k]) for (loc, _), k in zip(reference, first)]
        for (location, ref), (_, t) in zip(reference, leaves):
            if t.dtype != ref.dtype:
                raise CalibrationDataError(
                    f"calibration samples disagree{_at(location)}: {first_origin} has dtype {ref.dtype} "
                    f"but {origin} has dtype {t.dtype}; every sample must have the same dtype"
                )
            same = t.shape == ref.shape
            padded = t.ndim == 1 and ref.ndim == 1 and _is_sequence_dtype(t.dtype)
            if not same and not padded:
                raise CalibrationDataError(
                    f"calibration samples disagree{_at(location)}: {first_origin} has shape {tuple(ref.shape)} "
                    f"but {origin} has shape {tuple(t.shape)}; every sample must have the same shape "
                    "(only 1-D integer token sequences may differ in length)"
                )
        _check_finite(sample, origin)


def split_batch(batch: Any, origin: str) -> list[ModelInput]:
    """Split a batched model input (first dimension = samples) into per-sample inputs (views)."""

    def rows(t: Any, location: str) -> tuple[torch.Tensor, ...]:
        if not isinstance(t, torch.Tensor):
            raise CalibrationDataError(
                f"calibration {origin}{_at(location)} is a {type(t).__name__}; batches must hold Tensors"
            )
        if t.ndim == 0:
            raise CalibrationDataError(
                f"calibration {origin}{_at(location)} is a 0-d tensor; a batch needs a first (sample) dimension"
            )
        return t.unbind(0)  # [B, ...] -> B x [...]

    if isinstance(batch, torch.Tensor):
        return list(rows(batch, ""))
    if isinstance(batch, Mapping):
        columns = {k: rows(v, f"key {k!r}") for k, v in batch.items()}
    elif isinstance(batch, (tuple, list)):
        columns = {i: rows(v, f"element {i}") for i, v in enumerate(batch)}
    else:
        raise CalibrationDataError(
            f"calibration {origin} is a {type(batch).__name__}; a batch must be a Tensor, a tuple of Tensors "
            "or a dict str -> Tensor"
        )
    sizes = {k: len(v) for k, v in columns.items()}
    if not sizes:
        raise CalibrationDataError(f"calibration {origin} holds no tensor")
    if len(set(sizes.values())) > 1:
        raise CalibrationDataError(
            f"calibration {origin}: its tensors have different batch sizes {sizes}; all must share the first dimension"
        )
    count = next(iter(sizes.values()))
    if isinstance(batch, Mapping):
        return [{k: columns[k][i] for k in columns} for i in range(count)]
    return [tuple(columns[j][i] for j in columns) for i in range(count)]


def _stack(tensors: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(list(tensors))  # B x [...] -> [B, ...]
    length = max(t.shape[0] for t in tensors)
    out = torch.full((len(tensors), length), pad, dtype=tensors[0].dtype)  # [B, L], right-padded
    for row, t in enumerate(tensors):
        out[row, : t.shape[0]] = t
    return out


def collate(
    samples: Sequence[ModelInput], pad_id: int, pad_values: Mapping[str, int]
) -> ModelInput:
    """Stack samples into one batch; 1-D sequences of different length are right-padded.

    Padding value: `pad_values[key]` for dict keys listed there (e.g. attention_mask -> 0),
    otherwise `pad_id`. Stacking copies, so a batch never aliases the stored samples.
    """
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return _stack(samples, pad_id)  # type: ignore[arg-type]
    if isinstance(first, dict):
        return {k: _stack([s[k] for s in samples], pad_values.get(k, pad_id)) for k in first}  # type: ignore[index]
    return tuple(_stack([s[i] for s in samples], pad_id) for i in range(len(first)))  # type: ignore[index]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)  # [...] -> [numel]
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def hash_samples(samples: Sequence[ModelInput], preprocessing: Mapping[str, Any]) -> str:
    """sha256 over every sample's structure, keys, dtypes, shapes and raw bytes, then `preprocessing`.

    Each field is length-prefixed, so different splits of the same bytes hash differently.
    """
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put(b"ptqkit-calibration-v1")
    put(str(len(samples)).encode())
    for sample in samples:
        put(_structure(sample).encode())
        for location, t in _leaves(sample):
            put(location.encode())
            put(str(t.dtype).encode())
            put(json.dumps(list(t.shape)).encode())
            put(_tensor_bytes(t))
    put(json.dumps(preprocessing, sort_keys=True, default=str).encode())
    return h.hexdigest()


def clone_sample(sample: ModelInput) -> ModelInput:
    """A deep copy of a sample's tensors."""
    if isinstance(sample, torch.Tensor):
        return sample.clone()
    if isinstance(sample, dict):
        return {k: v.clone() for k, v in sample.items()}
    return tuple(v.clone() for v in sample)


def _call(model: nn.Module, batch: ModelInput) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise CalibrationDataError(
        f"call_model: batch is a {type(batch).__name__}; expected a Tensor, tuple or dict of Tensors"
    )


def _module_raising(model: nn.Module, batch: ModelInput) -> str | None:
    """The name of the innermost module running when `model` raises NonFiniteError on `batch`
    (found by running the batch again with pre-hooks; None if it does not raise again)."""
    entered: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: entered.append(name))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            _call(model, batch)
    except NonFiniteError:
        return entered[-1] if entered else None
    except Exception:  # noqa: BLE001 - only looking for the module; the first error is reported
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None


def call_model(model: nn.Module, batch: ModelInput) -> Any:
    """Run `model` on a batch: `model(**batch)` for a dict, `model(*batch)` for a tuple/list,
    `model(batch)` for a Tensor. A quantizer meeting NaN/Inf activations (finite inputs that
    overflow in the model) is a CalibrationDataError naming the module."""
    try:
        return _call(model, batch)
    except NonFiniteError as exc:
        name = _module_raising(model, batch)
        where = f"the input of module {name!r}" if name else "an activation of the model"
        raise CalibrationDataError(
            f"{where} holds NaN/Inf on this data ({exc}); the inputs are finite, so the activations "
            "overflow in the model: check the data's scale and preprocessing, or the model's numerics in float"
        ) from exc


def call_on_batch(model: nn.Module, batch: ModelInput, where: str) -> Any:
    """`call_model`, with an error of the model's own (a batch of the wrong shape or dtype, a
    token id out of range) turned into a CalibrationDataError naming `where` (e.g. "evaluation
    batch 0 (samples 0-7)"); ptqkit's own errors pass through."""
    from ptqkit.core.errors import PTQError

    try:
        return call_model(model, batch)
    except PTQError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's forward raises anything on bad input
        raise CalibrationDataError(f"{where} does not fit the model: {type(exc).__name__}: {str(exc)[:300]}") from exc


def describe_tensors(data: Any) -> str:
    """A short text for in-memory data: 'Tensor[100, 3] torch.float32', 'dict(x: [8, 4])', ..."""
    if isinstance(data, torch.Tensor):
        return f"Tensor{list(data.shape)} {data.dtype}"
    if isinstance(data, Mapping):
        parts = [
            f"{k}: {list(v.shape)}" if isinstance(v, torch.Tensor) else str(k)
            for k, v in data.items()
        ]
        return "dict(" + ", ".join(parts) + ")"
    return f"{type(data).__name__} of {len(data)} samples"


def count_samples(data: Any) -> int:
    """Number of samples in from_tensors data (Tensor [N, ...], sequence, dict of [N, ...]); > 0."""
    if isinstance(data, torch.Tensor):
        if data.ndim == 0:
            raise CalibrationDataError(
                "from_tensors: data is a 0-d tensor; pass a Tensor [N, ...] with N samples"
            )
        available = int(data.shape[0])
    elif isinstance(data, Mapping):
        if not data:
            raise CalibrationDataError("calibration data is empty: from_tensors got an empty dict")
        sizes = {}
        for k, v in data.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0:
                raise CalibrationDataError(
                    f"from_tensors: data[{k!r}] is {type(v).__name__}; a dict must map names to Tensors [N, ...]"
                )
            sizes[k] = int(v.shape[0])
        if len(set(sizes.values())) > 1:
            raise CalibrationDataError(
                f"from_tensors: dict tensors have different sample counts {sizes}; all need the same N"
            )
        available = next(iter(sizes.values()))
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        available = len(data)
    else:
        raise CalibrationDataError(
            f"from_tensors: data is a {type(data).__name__}; pass a Tensor [N, ...], a list of samples "
            "or a dict of Tensors"
        )
    if available == 0:
        raise CalibrationDataError(
            f"calibration data is empty: from_tensors got {describe_tensors(data)}"
        )
    return available


def pick_samples(data: Any, index: Sequence[int]) -> tuple[list[Any], bool]:
    """The samples at `index` and whether they still need copying (True for user-owned ones).

    Only the chosen rows of a Tensor or dict of Tensors are gathered (into fresh tensors).
    """
    picked = torch.tensor(list(index), dtype=torch.long)  # [k]
    if isinstance(data, torch.Tensor):
        return list(data.detach()[picked].unbind(0)), False  # [N, ...] -> [k, ...] -> k x [...]
    if isinstance(data, Mapping):
        columns = {
            k: v.detach()[picked].unbind(0) for k, v in data.items()
        }  # [N, ...] -> k x [...]
        return [{k: columns[k][j] for k in columns} for j in range(len(index))], False
    return [data[i] for i in index], True
