"""Hostile model sources: Hugging Face directories with pickled, truncated or nonsensical files,
and factories that raise, need arguments or do not compile. All exit 4 with one line naming the
directory, file or factory; nothing in a pickle is ever executed."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ptqkit.core.errors import UnsupportedModelError

from .conftest import assert_refused, hf_copy, run_cli


def _quantize(model: Path | str, calib: Path, out: Path) -> list:
    return ["quantize", "--model", model, "--calib", calib, "--preset", "w8a8_dynamic", "--out", out, "--quiet"]


@pytest.fixture()
def token_ids(tmp_path: Path) -> Path:
    path = tmp_path / "ids.pt"
    torch.save(torch.randint(5, 15, (8, 12)), path)
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker's pickle does on load
        return (Path.touch, (self.marker,))


def test_a_pickled_pytorch_model_bin_is_refused_and_never_run(tiny_hf: Path, tmp_path: Path, token_ids: Path) -> None:
    model = hf_copy(tiny_hf, tmp_path, weights=False)
    marker = tmp_path / "pwned"
    with (model / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"embeddings.word_embeddings.weight": _Payload(marker)}, handle)
    from ptqkit.models.hf import load_hf_model

    with pytest.raises(UnsupportedModelError, match=r"the weights are a pickle \(pytorch_model\.bin\) holding more than tensors, which ptqkit does not load"):
        load_hf_model(model)
    assert_refused(run_cli(*_quantize(model, token_ids, tmp_path / "out")), 4, str(model), "pytorch_model.bin", "model.safetensors")
    assert not marker.exists()


def test_a_truncated_model_safetensors(tiny_hf: Path, tmp_path: Path, token_ids: Path) -> None:
    model = hf_copy(tiny_hf, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    assert_refused(run_cli(*_quantize(model, token_ids, tmp_path / "out")), 4, str(model), "truncated or corrupted weights")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"num_hidden_layers": "six"}, "num_hidden_layers='six' must be an integer in [1, 4096]"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000 must be an integer in [1, 4096]"),
        ({"vocab_size": True}, "vocab_size=True must be an integer"),
        ({"architectures": "BertModel"}, "'architectures' is 'BertModel'; expected a list of class names"),
        ({"model_type": "no_such_type"}, "transformers refuses this config"),
    ],
)
def test_nonsense_in_config_json(tiny_hf: Path, tmp_path: Path, token_ids: Path, change: dict, fragment: str) -> None:
    model = hf_copy(tiny_hf, tmp_path, weights=False)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    from ptqkit.models.hf import check_hf_config

    with pytest.raises(Exception) as info:  # UnsupportedModelError or ConfigError ('architectures')
        check_hf_config(model)
    assert fragment in str(info.value)
    result = run_cli(*_quantize(model, token_ids, tmp_path / "out"))
    assert_refused(result, 4 if isinstance(info.value, UnsupportedModelError) else 2, fragment)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        ('{"model_type": "bert", "n": ' + "9" * 100_000 + "}", "not valid JSON (Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        ("{not json", "not valid JSON"),
    ],
)
def test_config_json_that_is_not_a_config(tiny_hf: Path, tmp_path: Path, token_ids: Path, text: str, fragment: str) -> None:
    model = hf_copy(tiny_hf, tmp_path, weights=False)
    (model / "config.json").write_text(text)
    assert_refused(run_cli(*_quantize(model, token_ids, tmp_path / "out")), 4, str(model / "config.json"), fragment)


FACTORIES = """
def raises():
    raise RuntimeError("the factory's own error")


def needs(width):
    return width
"""


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("hostile_factories:raises", ["'hostile_factories:raises'", "calling it without arguments raised RuntimeError: the factory's own error"]),
        ("hostile_factories:needs", ["'hostile_factories:needs'", "missing 1 required positional argument: 'width'"]),
        ("hostile_syntax:anything", ["importing 'hostile_syntax' failed: SyntaxError"]),
        ("hostile_on_import:anything", ["importing 'hostile_on_import' failed: ZeroDivisionError"]),
    ],
)
def test_factories_that_fail(tmp_path: Path, spec: str, fragments: list[str], digits) -> None:
    (tmp_path / "hostile_factories.py").write_text(FACTORIES)
    (tmp_path / "hostile_syntax.py").write_text("def anything(:\n")
    (tmp_path / "hostile_on_import.py").write_text("1 / 0\n")
    args = ["quantize", "--model", spec, "--calib", digits.calib, "--preset", "w8a8", "--out", tmp_path / "out", "--quiet"]
    result = run_cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert_refused(result, 4, *fragments)
