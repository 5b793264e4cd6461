"""The Observer contract: stream batches in, get a range (and QParams) out, in bounded memory.

Every observer also records the running (min, max) it has seen after each batch (`history`),
which range-stability tracking reads, and can be saved (`state`), restored (`from_state`) and
merged (`merge_`) so statistics from several processes combine.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from ptqkit.core.errors import ConfigError
from ptqkit.core.observer_options import parse_options
from ptqkit.core.primitives import check_finite, qparams_from_range
from ptqkit.core.qtypes import Granularity, PerChannel, PerTensor, PerToken
from ptqkit.core.spec import QParams, QuantSpec

__all__ = ["STATE_VERSION", "Observer", "parse_options"]

STATE_VERSION = 1


class Observer(abc.ABC):
    """Base class. Subclasses set `name`, `options_type`, `granularities` and implement
    `_observe`, `compute_range`, `_merge_stats`, `_stats` and `_load_stats`."""

    name: ClassVar[str]
    options_type: ClassVar[type]
    granularities: ClassVar[tuple[type[Granularity], ...]] = (PerTensor,)

    def __init__(self, spec: QuantSpec) -> None:
        if not isinstance(spec.granularity, self.granularities):
            valid = ", ".join(g.kind for g in self.granularities)  # type: ignore[attr-defined]
            hint = ""
            if isinstance(spec.granularity, PerToken):  # QuantSpec only allows it with dynamic=true
                hint = " (per-token parameters are computed from each token at run time: dynamic specs need no observer)"
            raise ConfigError(
                f"observer {self.name!r} does not support {spec.granularity.kind} granularity; valid: {valid}{hint}"
            )
        self.spec = spec
        self.options = parse_options(self.options_type, dict(spec.observer_options), self.name)
        self._history: list[tuple[float, float]] = []
        self._seen_min = float("inf")
        self._seen_max = float("-inf")

    # ---- streaming ------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Observe one batch. NaN/Inf raise NonFiniteError; empty tensors are ignored."""
        check_finite(x, f"input to observer {self.name!r}")
        if x.numel() == 0:
            return
        x = x.detach().to(torch.float32)
        self._observe(x)
        self._seen_min = min(self._seen_min, float(x.min()))
        self._seen_max = max(self._seen_max, float(x.max()))
        self._history.append((self._seen_min, self._seen_max))

    @abc.abstractmethod
    def _observe(self, x: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) with the shape of the spec's granularity parameters."""

    def qparams(self) -> QParams:
        """Quantization parameters for the observed range under the observer's spec."""
        if not self._history:
            raise ConfigError(
                f"observer {self.name!r} has seen no data; run calibration batches first"
            )
        lo, hi = self.compute_range()
        return qparams_from_range(
            lo,
            hi,
            self.spec.qtype,
            symmetric=self.spec.symmetric,
            granularity=self.spec.granularity,
        )

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def history(self) -> list[tuple[float, float]]:
        """Running (min, max) of everything seen, after each batch."""
        return list(self._history)

    @property
    def num_batches(self) -> int:
        return len(self._history)

    def _channel_axis(self) -> int | None:
        g = self.spec.granularity
        return g.axis if isinstance(g, PerChannel) else None

    # ---- merge and state ------------------------------------------------------------------
    def merge_(self, other: Observer) -> None:
        """Fold `other`'s statistics into this observer (same result as one observer over both)."""
        if type(other) is not type(self) or other.spec != self.spec:
            raise ConfigError(
                f"cannot merge observer {other.name!r} ({other.spec.to_dict()}) into {self.name!r} ({self.spec.to_dict()})"
            )
        if not other._history:
            return
        if self._history:
            self._merge_stats(other)
        else:
            self._load_stats({k: v.clone() for k, v in other._stats().items()})
        base_min, base_max = self._seen_min, self._seen_max
        self._history.extend((min(lo, base_min), max(hi, base_max)) for lo, hi in other._history)
        self._seen_min = min(base_min, other._seen_min)
        self._seen_max = max(base_max, other._seen_max)

    @abc.abstractmethod
    def _merge_stats(self, other: Observer) -> None: ...

    @abc.abstractmethod
    def _stats(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def _load_stats(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Plain tensors + JSON-able metadata (the spec, the history)."""
        meta = {
            "state_version": STATE_VERSION,
            "observer": self.name,
            "spec": self.spec.to_dict(),
            "history": [list(h) for h in self._history],
        }
        tensors = {k: v.detach().clone() for k, v in self._stats().items()} if self._history else {}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Observer:
        if meta.get("state_version") != STATE_VERSION or meta.get("observer") != cls.name:
            raise ConfigError(
                f"observer state is for {meta.get('observer')!r} version {meta.get('state_version')!r}; "
                f"expected {cls.name!r} version {STATE_VERSION}"
            )
        observer = cls(QuantSpec.from_dict(meta["spec"], where="observer state spec"))
        observer._history = [(float(lo), float(hi)) for lo, hi in meta["history"]]
        if observer._history:
            observer._seen_min = min(h[0] for h in observer._history)
            observer._seen_max = max(h[1] for h in observer._history)
            observer._load_stats({k: v.clone() for k, v in tensors.items()})
        return observer
