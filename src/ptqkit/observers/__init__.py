"""Observers: streaming statistics -> ranges -> QParams. One explicit registry dict."""

from __future__ import annotations

from typing import Any

import torch

from ptqkit.core.errors import ConfigError
from ptqkit.core.spec import QuantSpec
from ptqkit.observers.base import Observer
from ptqkit.observers.kl import KLObserver
from ptqkit.observers.minmax import EMAMinMaxObserver, MinMaxObserver
from ptqkit.observers.mse import MSEObserver
from ptqkit.observers.percentile import PercentileObserver

__all__ = ["OBSERVERS", "Observer", "make_observer", "observer_from_state"]

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema_minmax": EMAMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def _observer_class(name: str) -> type[Observer]:
    if name not in OBSERVERS:
        raise ConfigError(f"observer {name!r} is unknown; valid: {', '.join(OBSERVERS)}")
    return OBSERVERS[name]


def make_observer(spec: QuantSpec) -> Observer:
    """A fresh observer for `spec` (its `observer` name and `observer_options`)."""
    return _observer_class(spec.observer)(spec)


def observer_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Observer:
    """Rebuild an observer saved with `Observer.state()`."""
    return _observer_class(str(meta.get("observer"))).from_state(tensors, meta)
