"""`QuantSpec` (how one tensor is quantized) and `QParams` (the calibrated result)."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal, Mapping

import torch

from ptqkit.core.errors import ConfigError, NonFiniteError
from ptqkit.core.fields import check_fields, literal_values
from ptqkit.core.observer_options import OBSERVER_OPTIONS, parse_options
from ptqkit.core.qtypes import Granularity, PerTensor, PerToken, QType, granularity_from_dict

__all__ = ["QuantSpec", "QParams", "ROUNDING_MODES", "OBSERVERS", "ObserverName", "Rounding", "check_config_keys", "error_at"]

Rounding = Literal["half_even", "half_away", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = literal_values(Rounding)
# The observers a spec can name: the keys of core.observer_options.OBSERVER_OPTIONS (a unit test
# holds the two together).
ObserverName = Literal["minmax", "ema_minmax", "percentile", "mse", "kl"]
OBSERVERS: tuple[str, ...] = literal_values(ObserverName)
_OPTION_TYPES = (bool, int, float, str)


def check_config_keys(data: Any, cls: type, where: str) -> dict[str, Any]:
    """`data` as a dict if it is a mapping whose keys are all fields of the dataclass `cls`;
    otherwise a ConfigError naming `where`, the unknown keys and the valid ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r:.200}")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid, key=str)  # YAML keys may be numbers too
    if unknown:
        close = [m for key in unknown for m in difflib.get_close_matches(str(key), sorted(valid), n=1)]
        hint = f" (did you mean {close[0]!r}?)" if len(close) == 1 else f" (did you mean {close}?)" if close else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint}; valid keys: {sorted(valid)}")
    return dict(data)


def error_at(where: str, exc: ConfigError, cls: type) -> ConfigError:
    """`exc`, raised while building the dataclass `cls`, under the key path `where`: a message that
    starts with a field name ("rounding: ...", from `check_fields`) becomes "where.rounding: ...",
    any other (a check across fields) "where: ..."."""
    message = str(exc)
    name = message.split(":", 1)[0]
    if any(f.name == name for f in fields(cls)):
        return ConfigError(f"{where}.{message}")
    return ConfigError(f"{where}: {message}")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor is quantized. Frozen and validated on construction.

    - `qtype`: the number format (a QType or its name, e.g. "int8", "nf4").
    - `granularity`: PerTensor(), PerChannel(axis), PerGroup(size), PerToken().
    - `symmetric`: zero point fixed at the middle of the range (required for float formats).
    - `rounding`: "half_even" (default, as PyTorch and ONNX), "half_away" or "stochastic".
    - `dynamic`: activation parameters computed at run time instead of calibrated.
    - `observer` / `observer_options`: how calibration turns statistics into a range.
    """

    qtype: QType
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    rounding: Rounding = "half_even"
    dynamic: bool = False
    observer: ObserverName = "minmax"
    observer_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.qtype, str):
            object.__setattr__(self, "qtype", QType.parse(self.qtype))
        if not isinstance(self.qtype, QType):
            raise ConfigError(f"qtype must be a QType or a name like 'int8', got {self.qtype!r}")
        if not isinstance(self.granularity, Granularity):
            object.__setattr__(self, "granularity", granularity_from_dict(self.granularity))
        check_fields(self, "")  # symmetric, rounding, dynamic, observer: "rounding: 'x' is unknown; valid: ..."
        self._check_combinations()
        object.__setattr__(self, "observer_options", MappingProxyType(self._checked_options()))

    def _check_combinations(self) -> None:
        """What the fields cannot be together."""
        if not self.qtype.is_integer and not self.symmetric:
            raise ConfigError(
                f"{self.qtype.name} is a symmetric format and has no zero point; set symmetric=true "
                "or use an integer qtype such as uint8/uint4 for asymmetric quantization"
            )
        if not self.qtype.is_integer and self.rounding == "stochastic":
            raise ConfigError(f"stochastic rounding is implemented for integer qtypes only, not {self.qtype.name}")
        if isinstance(self.granularity, PerToken) and not self.dynamic:
            raise ConfigError("per-token granularity needs dynamic=true: token counts are only known at run time")

    def _checked_options(self) -> dict[str, Any]:
        """`observer_options` as a plain dict, checked against the observer's option type."""
        if not isinstance(self.observer_options, Mapping):
            raise ConfigError(f"observer_options must be a mapping of option -> value, got {self.observer_options!r:.200}")
        options = dict(self.observer_options)
        for key, value in options.items():
            if not isinstance(key, str) or not isinstance(value, _OPTION_TYPES):
                raise ConfigError(
                    f"observer_options[{key!r}] = {value!r:.200}: keys must be strings and values "
                    "bool/int/float/str"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"observer_options[{key!r}] = {value!r}: must be a finite number")
        parse_options(OBSERVER_OPTIONS[self.observer], options, self.observer)  # unknown keys, bad values
        return options

    def __deepcopy__(self, memo: dict) -> "QuantSpec":
        return self  # immutable

    def __reduce__(self) -> tuple:
        return (QuantSpec.from_dict, (self.to_dict(),))

    def __hash__(self) -> int:
        return hash(tuple((f.name, repr(self._plain(f.name))) for f in fields(self)))

    def _plain(self, name: str) -> Any:
        value = getattr(self, name)
        if name == "qtype":
            return value.name
        if name == "granularity":
            return value.to_dict()
        if name == "observer_options":
            return dict(sorted(value.items()))
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; every field is written, defaults included."""
        return {f.name: self._plain(f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> "QuantSpec":
        """Inverse of `to_dict`; unknown keys raise ConfigError naming `where`."""
        kwargs = check_config_keys(data, cls, where)
        if "qtype" not in kwargs:
            raise ConfigError(f"{where}: 'qtype' is required (e.g. 'int8', 'int4', 'fp8_e4m3')")
        if "granularity" in kwargs:
            kwargs["granularity"] = granularity_from_dict(kwargs["granularity"], f"{where}.granularity")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise error_at(where, exc, cls) from None


@dataclass(frozen=True, eq=False)
class QParams:
    """Calibrated quantization parameters for one tensor.

    `scale` (float32, > 0, finite) and `zero_point` (int32, within the qtype's range) have
    the shape `granularity.param_shape(tensor.shape)`.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qtype: QType
    granularity: Granularity

    def __post_init__(self) -> None:
        if self.scale.shape != self.zero_point.shape:
            raise ConfigError(
                f"scale shape {tuple(self.scale.shape)} != zero_point shape {tuple(self.zero_point.shape)}"
            )
        if not torch.isfinite(self.scale).all():
            raise NonFiniteError(f"scale holds NaN/Inf: {self.scale.flatten()[:8].tolist()}")
        if not (self.scale > 0).all():
            raise ConfigError(f"scale must be > 0, got min {self.scale.min().item()!r}")
        if self.zero_point.is_floating_point():
            raise ConfigError(f"zero_point must be an integer tensor, got {self.zero_point.dtype}")
        if self.zero_point.numel() and (
            self.zero_point.min() < self.qtype.qmin or self.zero_point.max() > self.qtype.qmax
        ):
            raise ConfigError(
                f"zero_point outside {self.qtype.name}'s range [{self.qtype.qmin}, {self.qtype.qmax}]"
            )

    def to(self, device: torch.device | str) -> "QParams":
        return QParams(self.scale.to(device), self.zero_point.to(device), self.qtype, self.granularity)
