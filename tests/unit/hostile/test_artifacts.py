"""Hostile run directories and artifacts: a tampered quantization.json, missing files, corrupt
derived JSON, example inputs that do not fit, bad arguments to pq.load. One typed line each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ArtifactError, ConfigError
from ptqkit.export.load import read_manifest

from .conftest import assert_refused, run_cli


def _tamper(run: Path, change) -> Path:
    path = run / "quantization.json"
    text = path.read_text()
    path.write_text(change(text) if callable(change) else json.dumps({**json.loads(text), **change}))
    return run


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace('"format_version": 1', '"format_version": 1' + "0" * 100_000), r"not valid JSON \(Exceeds the limit \(4300 digits\)"),
        (lambda t: t.replace('"skipped": [', '"skipped": [' + "[" * 100_000 + "]" * 100_000 + ",", 1), r"not valid JSON \(nested too deeply\)"),
        ({"skipped": [5, None]}, r"skipped\[0\]: 5 must be a list of 3 strings"),
        ({"skipped": [["a", "Linear"]]}, r"skipped\[0\]: \['a', 'Linear'\] must be a list of 3 strings"),
        ({"recipe": [1]}, r"recipe: \[1\] must be an object"),
        ({"recipe": {"scheme": {"weights": {"qtype": "int9"}}}}, r"recipe is invalid: scheme\.weights: int qtype bits=9"),
        ({"model": "DigitsCNN"}, r"model: 'DigitsCNN' must be an object with keys \['class', 'hf', 'dtype', 'attn_implementation'\]"),
        ({"model": {"class": "DigitsCNN", "dtype": 5}}, r"model\.dtype: 5 must be a string or null"),
        ({"aliases": {"a": 1}}, r"aliases\.a: 1 must be a string"),
        ({"model_sha256": 7}, r"model_sha256: 7 must be a string"),
        ({"metrics": [1]}, r"metrics: \[1\] must be an object or null"),
        ({"layers": {"0": {}}}, r"layers: \{'0': \{\}\} must be a list of objects with keys \['name', 'module'"),
        ({"calibraton": {}}, r"unknown key\(s\) \['calibraton'\]; valid keys: \['aliases', 'calibration'"),
    ],
)
def test_a_tampered_quantization_json(digits, tmp_path: Path, change, message: str) -> None:
    run = _tamper(digits.run_copy(tmp_path), change)
    with pytest.raises(ArtifactError, match=rf"quantization\.json: {message}"):
        read_manifest(run)


@pytest.mark.parametrize(
    ("layer_change", "message"),
    [
        ({"weight_shape": "ab"}, r"layers\[0\]\.weight_shape: 'ab' must be a list of integers in \[0, 2\*\*40\) or null"),
        ({"weight_shape": [8, -1]}, r"layers\[0\]\.weight_shape\[1\]: -1 must be an integer in \[0, 2\*\*40\)"),
        ({"weight_shape": [1] * 9}, r"layers\[0\]\.weight_shape: \[1, 1, 1, 1, 1, 1, 1, 1, 1\] must hold 1 to 8 sizes"),
        ({"weight_shape": []}, r"layers\[0\]\.weight_shape: \[\] must hold 1 to 8 sizes"),
        ({"outlier_threshold": "big"}, r"layers\[0\]\.outlier_threshold: 'big' must be a number or null"),
        ({"name": 3}, r"layers\[0\]\.name: 3 must be a string"),
        ({"weights": [1]}, r"layers\[0\]\.weights: \[1\] must be an object or null"),
        ({"input_qparams": "x"}, r"layers\[0\]\.input_qparams: 'x' must be an object or null"),
    ],
)
def test_a_tampered_layer_record(digits, tmp_path: Path, layer_change: dict, message: str) -> None:
    def change(text: str) -> str:
        data = json.loads(text)
        data["layers"][0].update(layer_change)
        return json.dumps(data)

    run = _tamper(digits.run_copy(tmp_path), change)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(run)


def test_tampered_quantization_json_through_the_cli(digits, tmp_path: Path) -> None:
    deep = _tamper(digits.run_copy(tmp_path, "deep"), lambda t: t.replace('"skipped": [', '"skipped": [' + "[" * 100_000 + "]" * 100_000 + ",", 1))
    assert_refused(run_cli("inspect", deep), 1, str(deep / "quantization.json"), "nested too deeply")
    skipped = _tamper(digits.run_copy(tmp_path, "skipped"), {"skipped": [5, None]})
    assert_refused(run_cli("inspect", skipped), 1, "skipped[0]")
    assert_refused(run_cli("eval", skipped, "--trust-factory"), 1, "skipped[0]")


def test_inspect_refuses_a_run_without_its_model_file(digits, tmp_path: Path) -> None:
    run = digits.run_copy(tmp_path)
    (run / "model.safetensors").unlink()
    assert_refused(run_cli("inspect", run), 1, str(run / "model.safetensors"), "is missing")


def test_pq_load_arguments(digits) -> None:
    with pytest.raises(ConfigError, match=r"load: the second argument must be the float model \(an nn.Module\), a Hugging Face directory or None, got int 42"):
        pq.load(digits.run, 42)
    with pytest.raises(ConfigError, match=r"load: the artifact directory must be a path, got int 42"):
        pq.load(42)


def test_source_json_that_is_not_json_or_empty(digits, tmp_path: Path) -> None:
    broken = digits.run_copy(tmp_path, "broken")
    (broken / "source.json").write_text("{nope")
    assert_refused(run_cli("eval", broken, "--trust-factory"), 1, str(broken / "source.json"), "not valid JSON")
    empty = digits.run_copy(tmp_path, "empty")
    (empty / "source.json").write_text("{}")
    assert_refused(run_cli("eval", empty, "--trust-factory"), 1, str(empty / "source.json"))


def test_example_inputs_of_the_wrong_shape(digits, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    run = digits.run_copy(tmp_path)
    save_file({"input": torch.rand(2, 3, 5, 5)}, str(run / "example_inputs.safetensors"))
    result = run_cli("eval", run, "--trust-factory")
    assert_refused(result, 3, str(run / "example_inputs.safetensors"), "does not fit the model: RuntimeError", "3 channels")
    result = run_cli("export", run, "--trust-factory")
    assert_refused(result, 1, "example_inputs ((2, 3, 5, 5)) do not fit DigitsCNN: RuntimeError")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[1,", "not a search.json written by `ptqkit search` (JSONDecodeError"),
        ("[" * 100_000 + "]" * 100_000, "not a search.json written by `ptqkit search` (RecursionError"),
        ('{"points": [{"name": 1}], "float_ms": 1.0}', "needs float_ms and points with a name"),
        ('{"points": [], "float_ms": NaN}', "needs float_ms"),
    ],
)
def test_a_corrupt_search_json_is_refused_before_the_evaluation(digits, tmp_path: Path, text: str, fragment: str) -> None:
    search = tmp_path / "search.json"
    search.write_text(text)
    result = run_cli("report", digits.run, "--search", search, "--out", tmp_path / "report", "--trust-factory", "--quiet")
    assert_refused(result, 2, f"--search {search}", fragment)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("text", ["{nope", "[" * 100_000 + "]" * 100_000, '{"speedup": "fast"}'])
def test_a_corrupt_bench_json_is_not_reported(digits, tmp_path: Path, text: str) -> None:
    run = digits.run_copy(tmp_path)
    (run / "bench.json").write_text(text)
    result = run_cli("report", run, "--trust-factory", "--quiet", "--json")
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert json.loads((run / "report" / "report.json").read_text()).get("bench") is None


def test_a_bench_json_of_this_artifact_with_a_corrupt_body(digits, tmp_path: Path) -> None:
    run = digits.run_copy(tmp_path)
    sha = read_manifest(run).model_sha256
    (run / "bench.json").write_text(json.dumps({"artifact_sha256": sha, "speedup": "fast", "float": [1], "quantized": None}))
    result = run_cli("report", run, "--trust-factory")
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "holds speedup 'fast', not a positive number; not reported" in result.stderr
    assert json.loads((run / "report" / "report.json").read_text()).get("bench") is None


def test_deeply_nested_source_json(digits, tmp_path: Path) -> None:
    run = digits.run_copy(tmp_path)
    (run / "source.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(run_cli("eval", run, "--trust-factory"), 1, str(run / "source.json"), "nested too deeply")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1]", '{"version": 1, "entries": {"k": "fast"}}', '{"version": 1, "entries": {"k": NaN}}'])
def test_a_corrupt_latency_cache_is_measured_again(tmp_path: Path, text: str) -> None:
    from ptqkit.mixed_precision.latency import LatencyTable

    cache = tmp_path / "latency.json"
    cache.write_text(text)
    assert LatencyTable(cache, threads=1)._entries == {}
