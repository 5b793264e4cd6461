"""This machine, as measurements depend on it: CPU model, ISA flags, cores, versions. Used for
latency cache keys, the choice of ONNX weight storage, and the provenance of reports."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

__all__ = ["cpu_flags", "cpu_name", "describe"]

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


@lru_cache(maxsize=1)
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return tuple(handle.read().splitlines())
    except OSError:
        return ()


def _first(field: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith(field)), None)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's processor string elsewhere)."""
    return _first("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unavailable)."""
    return frozenset((_first("flags") or "").split())


def describe() -> dict[str, Any]:
    """CPU model, core count, integer-dot-product ISA flags and versions of this process."""
    import torch

    from ptqkit.core.version import __version__

    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "isa": {name: name in flags for name in ISA_FLAGS},
        "torch_threads": torch.get_num_threads(),
        "versions": {"ptqkit": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
