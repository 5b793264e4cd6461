"""Calibration data and sampling (`CalibrationData`, `call_model`).

Hooks (`ptqkit.stats.hooks`) and range-stability tracking live in their own modules and
are imported from there; this package import stays light (torch only).
"""

from ptqkit.calibration.data import CalibrationData, ModelInput, call_model

__all__ = ["CalibrationData", "ModelInput", "call_model"]
