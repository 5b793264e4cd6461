"""Typed exceptions. Every message names the bad value, where it came from and what is valid."""
from __future__ import annotations

__all__ = [
    "PTQError",
    "ConfigError",
    "CalibrationDataError",
    "UnsupportedModelError",
    "ArtifactError",
    "ExportError",
    "NonFiniteError",
    "OutputPathError",
    "UntrustedCodeError",
]


class PTQError(Exception):
    """Base class of every error ptqkit raises on purpose."""


class ConfigError(PTQError, ValueError):
    """A recipe, spec or option is invalid (unknown key, out-of-range value, impossible combination)."""


class CalibrationDataError(PTQError, ValueError):
    """Calibration data is empty, inconsistent, or contains NaN/Inf."""


class UnsupportedModelError(PTQError):
    """The model has nothing ptqkit can quantize, or an architecture it has no mapping for."""


class ArtifactError(PTQError):
    """A saved ptqkit artifact is missing, truncated, corrupted or of an unknown format version."""


class ExportError(PTQError):
    """A model could not be exported, or the exported graph does not do what was asked."""


class NonFiniteError(PTQError, ValueError):
    """A tensor or range holds NaN or Inf where finite numbers are required."""


class OutputPathError(ConfigError):
    """An output ptqkit refuses to write: the current directory or a parent, a symbolic link, a
    non-empty directory ptqkit did not create, or one another process is writing."""


class UntrustedCodeError(ConfigError):
    """A run directory names code (a model factory) that the user has not allowed to run."""
