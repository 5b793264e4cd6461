"""Number formats (`QType`) and the granularity of quantization parameters (`Granularity`).

A `QType` knows its range and its grid of representable values. A `Granularity` knows how
to reduce a tensor to one statistic per quantization parameter and how to broadcast those
parameters back over the tensor, so the maths in `primitives.py` never branches on it.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ptqkit.core.errors import ConfigError

__all__ = [
    "QType",
    "INT2",
    "INT3",
    "INT4",
    "INT8",
    "INT8_NARROW",
    "UINT4",
    "UINT8",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP4_E2M1",
    "NF4",
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "granularity_from_dict",
]

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al., 2023), as published in bitsandbytes.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Magnitudes of FP4 E2M1 indexed by the 3 low bits of the code (the sign is bit 3).
FP4_E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

_INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
_FLOAT_FORMATS: dict[str, int] = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "nf4": 4}
_FORMATS = ("int", *_FLOAT_FORMATS)
_TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_NAME_RE = re.compile(r"^(u?)int(\d+)(_narrow)?$")


@dataclass(frozen=True, kw_only=True)
class QType:
    """A quantized number format.

    `format` is "int" for integers (with `bits`, `signed`, `narrow`) or one of "fp8_e4m3",
    "fp8_e5m2", "fp4_e2m1", "nf4" (whose width is fixed). `narrow=True` drops the most
    negative integer code so the range is symmetric, e.g. int8 in [-127, 127].
    """

    format: str = "int"
    bits: int | None = None
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if self.format not in _FORMATS:
            raise ConfigError(f"qtype format {self.format!r} is unknown; valid: {', '.join(_FORMATS)}")
        if self.format == "int":
            if self.bits not in _INT_BITS:
                raise ConfigError(f"int qtype bits={self.bits!r} is not supported; valid: 2..8 or 16")
            if self.narrow and not self.signed:
                raise ConfigError("narrow range applies to signed integers only (got an unsigned qtype)")
            return
        width = _FLOAT_FORMATS[self.format]
        if self.bits is None:
            object.__setattr__(self, "bits", width)
        if self.bits != width:
            raise ConfigError(f"{self.format} is a {width}-bit format; bits={self.bits!r} is impossible")
        if not self.signed or self.narrow:
            raise ConfigError(f"{self.format} is signed and has no narrow variant")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def int(cls, bits: int, signed: bool = True, narrow: bool = False) -> "QType":
        """An integer format of `bits` bits (2..8 or 16)."""
        return cls(format="int", bits=bits, signed=signed, narrow=narrow)

    @classmethod
    def parse(cls, name: str) -> "QType":
        """Parse a canonical name: "int8", "uint4", "int8_narrow", "fp8_e4m3", "fp4_e2m1", "nf4"."""
        if not isinstance(name, str):
            raise ConfigError(f"qtype must be a name string, got {type(name).__name__} {name!r}")
        if name in _FLOAT_FORMATS:
            return cls(format=name)
        match = _NAME_RE.match(name)
        if match is None:
            raise ConfigError(
                f"qtype {name!r} is not a known format; valid: int2..int8, int16, uint2..uint8, "
                f"int8_narrow (and other widths), {', '.join(_FLOAT_FORMATS)}"
            )
        unsigned, bits, narrow = match.groups()
        return cls(format="int", bits=int(bits), signed=not unsigned, narrow=bool(narrow))

    # ---- identity -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.format != "int":
            return self.format
        return f"{'' if self.signed else 'u'}int{self.bits}{'_narrow' if self.narrow else ''}"

    def __str__(self) -> str:
        return self.name

    @property
    def is_integer(self) -> bool:
        return self.format == "int"

    # ---- range --------------------------------------------------------------------------
    @property
    def qmin(self) -> float:
        """Smallest representable value (an integer code for int formats)."""
        if self.is_integer:
            if not self.signed:
                return 0
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return -self.max_value

    @property
    def qmax(self) -> float:
        """Largest representable value (an integer code for int formats)."""
        if self.is_integer:
            return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1
        return self.max_value

    @property
    def max_value(self) -> float:
        """Largest finite magnitude of the format (for int formats, `qmax`)."""
        if self.format in _TORCH_FP8:
            return float(torch.finfo(_TORCH_FP8[self.format]).max)
        if self.format == "fp4_e2m1":
            return FP4_E2M1_MAGNITUDES[-1]
        if self.format == "nf4":
            return 1.0
        return float(self.qmax)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype that holds quantized values (codes for fp4/nf4)."""
        if self.format in _TORCH_FP8:
            return _TORCH_FP8[self.format]
        if not self.is_integer:
            return torch.uint8
        if self.bits == 16:
            return torch.int16 if self.signed else torch.int32
        return torch.int8 if self.signed else torch.uint8

    def levels(self) -> torch.Tensor:
        """All representable values, ascending, as float64 (integer codes for int formats)."""
        return _levels(self)


@functools.lru_cache(maxsize=None)
def _levels_cached(qtype: QType) -> tuple[float, ...]:
    if qtype.is_integer:
        return tuple(float(v) for v in range(int(qtype.qmin), int(qtype.qmax) + 1))
    if qtype.format == "nf4":
        return NF4_LEVELS
    if qtype.format == "fp4_e2m1":
        return tuple(sorted({s * m + 0.0 for s in (-1.0, 1.0) for m in FP4_E2M1_MAGNITUDES}))
    every_code = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(_TORCH_FP8[qtype.format])
    values = every_code.to(torch.float64)
    values = values[torch.isfinite(values)]
    return tuple(torch.unique(values).tolist())


def _levels(qtype: QType) -> torch.Tensor:
    return torch.tensor(_levels_cached(qtype), dtype=torch.float64)


INT2 = QType.int(2)
INT3 = QType.int(3)
INT4 = QType.int(4)
INT8 = QType.int(8)
INT8_NARROW = QType.int(8, narrow=True)
UINT4 = QType.int(4, signed=False)
UINT8 = QType.int(8, signed=False)
FP8_E4M3 = QType(format="fp8_e4m3")
FP8_E5M2 = QType(format="fp8_e5m2")
FP4_E2M1 = QType(format="fp4_e2m1")
NF4 = QType(format="nf4")


# ---- granularity ------------------------------------------------------------------------
Reduction = Callable[..., torch.Tensor]  # torch.amin / torch.amax style: op(t, dim=..., keepdim=...)


# The largest group a PerGroup granularity accepts: a group longer than the tensor is one group,
# so a bigger size only risks the allocation of `expand` (size x groups elements).
MAX_GROUP_SIZE = 2**20


def _check_axis(axis: Any, what: str) -> None:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ConfigError(f"{what} axis={axis!r} must be an integer dimension index (e.g. 0 or -1)")


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(f"{what} axis={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


class Granularity:
    """How many quantization parameters a tensor gets, and which elements share one."""

    kind: ClassVar[str]

    def reduce(self, x: torch.Tensor, op: Reduction) -> torch.Tensor:
        """Reduce `x` to one value per parameter with `op` (e.g. torch.amin)."""
        raise NotImplementedError

    def expand(self, param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcast per-parameter values back to a tensor of `shape` (or a broadcastable view)."""
        raise NotImplementedError

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """The shape of the parameter tensor for a tensor of `shape`."""
        return tuple(self.reduce(torch.empty(shape, device="meta"), torch.amin).shape)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: getattr(self, k) for k in self.__dataclass_fields__}}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One parameter for the whole tensor."""

    kind: ClassVar[str] = "per_tensor"

    def reduce(self, x: torch.Tensor, op: Reduction) -> torch.Tensor:
        return op(x.reshape(-1), dim=0)  # [] scalar

    def expand(self, param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return param


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One parameter per index of `axis` (0 = output channels of a weight)."""

    axis: int = 0
    kind: ClassVar[str] = "per_channel"

    def __post_init__(self) -> None:
        _check_axis(self.axis, "per-channel")

    def reduce(self, x: torch.Tensor, op: Reduction) -> torch.Tensor:
        axis = _normalize_axis(self.axis, x.ndim, "per-channel")
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # [C, everything else]
        return op(rows, dim=1)  # [C]

    def expand(self, param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        axis = _normalize_axis(self.axis, len(shape), "per-channel")
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return param.reshape(view)  # [1, .., C, .., 1]


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One parameter per run of `size` consecutive elements along `axis` (the input dimension
    of a Linear weight by default). A last group shorter than `size` is allowed."""

    size: int
    axis: int = -1
    kind: ClassVar[str] = "per_group"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 1 <= self.size <= MAX_GROUP_SIZE:
            raise ConfigError(f"per-group size must be a positive integer, got {self.size!r}; at most {MAX_GROUP_SIZE}")
        _check_axis(self.axis, "per-group")

    def reduce(self, x: torch.Tensor, op: Reduction) -> torch.Tensor:
        axis = _normalize_axis(self.axis, x.ndim, "per-group")
        length = x.shape[axis]
        full = (length // self.size) * self.size
        parts = []
        if full:
            blocks = x.narrow(axis, 0, full).unflatten(axis, (full // self.size, self.size))
            parts.append(op(blocks, dim=axis + 1))  # [..., G_full, ...]
        if length > full:
            parts.append(op(x.narrow(axis, full, length - full), dim=axis, keepdim=True))  # [..., 1, ...]
        return torch.cat(parts, dim=axis)  # [..., ceil(length / size), ...]

    def expand(self, param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        axis = _normalize_axis(self.axis, len(shape), "per-group")
        return param.repeat_interleave(self.size, dim=axis).narrow(axis, 0, shape[axis])

    def num_groups(self, length: int) -> int:
        return -(-length // self.size)


@dataclass(frozen=True)
class PerToken(Granularity):
    """One parameter per token: every vector along the last axis (dynamic activations)."""

    kind: ClassVar[str] = "per_token"

    def reduce(self, x: torch.Tensor, op: Reduction) -> torch.Tensor:
        return op(x, dim=-1, keepdim=True)  # [..., 1]

    def expand(self, param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return param


_GRANULARITIES: dict[str, type[Granularity]] = {
    cls.kind: cls for cls in (PerTensor, PerChannel, PerGroup, PerToken)
}


def granularity_from_dict(data: Any, where: str = "granularity") -> Granularity:
    """Build a Granularity from its `to_dict()` form; unknown kinds or keys raise ConfigError."""
    if isinstance(data, Granularity):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}: expected a mapping with a 'kind' key, got {data!r:.200}")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in _GRANULARITIES:
        raise ConfigError(f"{where}.kind: {kind!r} is unknown; valid: {', '.join(_GRANULARITIES)}")
    cls = _GRANULARITIES[kind]
    fields = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = set(data) - fields - {"kind"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown, key=str)} for {kind}; valid: {sorted(fields)}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "kind"})
    except TypeError:  # a required field is missing, e.g. per_group without size
        needed = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in data)
        raise ConfigError(f"{where}: {kind} needs {needed} (its keys: {sorted(fields - {'kind'})})") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
