"""ExportOptions: export's ONNX keywords as one frozen config, checked from its annotations."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest

from ptqkit.core.errors import ExportError
from ptqkit.export import ONNX_WEIGHT_DTYPES, ExportOptions, NBitsOptions, export


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"onnx_weight_dtype": "int4"}, r"^export\.onnx_weight_dtype: 'int4' is unknown; valid: auto, int8, uint8$"),
        ({"fp32_tolerance": math.nan}, r"^export\.fp32_tolerance: nan must be a number >= 0$"),
        ({"fp32_tolerance": -1.0}, r"^export\.fp32_tolerance: -1.0 must be a number >= 0$"),
        ({"opset": 0}, r"^export\.opset: 0 must be an integer >= 1$"),
        ({"strict": "yes"}, r"^export\.strict: 'yes' must be true or false$"),
        ({"kv_cache": 1}, r"^export\.kv_cache: 1 must be true or false$"),
        ({"matmul_nbits": None}, r"^export\.matmul_nbits: None must be a NBitsOptions$"),
        ({"gguf": {"requantize": True}}, r"^export\.gguf: \{'requantize': True\} must be a GGUFOptions$"),
        ({"kv_cache": True, "dynamic_shapes": False}, r"^export: kv_cache=True needs dynamic_shapes=True"),
    ],
)
def test_bad_options_are_export_errors_naming_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        ExportOptions(**kwargs)


def test_the_defaults_are_export_keyword_defaults() -> None:
    """`export`'s keyword defaults and ExportOptions' defaults are the same values."""
    import inspect

    defaults = ExportOptions()
    keywords = inspect.signature(export).parameters
    for f in fields(ExportOptions):
        if f.name in ("matmul_nbits", "gguf"):  # None in export's signature: the option type's defaults
            assert keywords[f.name].default is None and getattr(defaults, f.name) == type(getattr(defaults, f.name))()
        else:
            assert keywords[f.name].default == getattr(defaults, f.name), f.name
    assert ONNX_WEIGHT_DTYPES == ("auto", "int8", "uint8")


def test_export_checks_its_keywords_before_the_model(tmp_path) -> None:
    """A bad keyword is refused before anything is looked at or written."""
    with pytest.raises(ExportError, match=r"export\.onnx_weight_dtype: 'fp16' is unknown"):
        export(object(), tmp_path / "out", example_inputs=1, onnx_weight_dtype="fp16")
    assert not (tmp_path / "out").exists()
