"""The `ptqkit` command: inspect, typed exit codes, no tracebacks for user errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqkit.cli import main
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.metrics import output_sqnr_db
from tests.unit.digits_files import FACTORY
from tests.unit.digits_files import digits_files as make_digits_files


def test_inspect_preset_prints_yaml(capsys) -> None:
    assert main(["inspect", "w4a16"]) == 0
    out = capsys.readouterr().out
    assert "keep_output_head: true" in out and "qtype: int4" in out


def test_inspect_file_round_trips(tmp_path: Path, capsys) -> None:
    path = Recipe.from_preset("w8a8").save(tmp_path / "r.yaml")
    assert main(["inspect", str(path), "--json"]) == 0
    assert '"name": "w8a8"' in capsys.readouterr().out


def test_bad_recipe_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme:\n  weights: {qtype: int9}\n")
    proc = subprocess.run([sys.executable, "-m", "ptqkit.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ptqkit: error:") and "int qtype bits=9 is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_recipe_file(capsys) -> None:
    assert main(["inspect", "no/such/recipe.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- quantize / inspect / export on a factory model (the digits CNN: seconds) --------------
RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.fixture()
def digits_files(tmp_path: Path) -> dict[str, Path]:
    return make_digits_files(tmp_path, samples=48)


def _quantize_args(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "quantize", "--model", FACTORY, "--weights", str(files["weights"]), "--calib", str(files["calib"]),
        "--out", str(files["out"]), "--quiet", *extra,
    ]


def test_quantize_a_factory_model_writes_a_run_directory(digits_files, capsys) -> None:
    recipe = str(next(r for r in RECIPES if r.name == "w8a8-cnn-cle-bc.yaml"))
    args = _quantize_args(digits_files, "--recipe", recipe, "--set", "calibration.samples=32", "--set", "algorithms.2.mode=analytic", "--json")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantized_layers"] == 5 and summary["calibration_samples"] == 32
    assert summary["output_sqnr_db"] > 10  # per-tensor int8, random weights: measured 47.0 dB
    run = digits_files["out"]
    assert {"model.safetensors", "quantization.json", "recipe.yaml", "source.json", "example_inputs.safetensors", "summary.json"} <= {
        p.name for p in run.iterdir()
    }
    saved = Recipe.load(run / "recipe.yaml")  # the effective recipe, --set applied
    assert saved.calibration.samples == 32 and saved.algorithms[2].mode == "analytic"
    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_layers"] == 5 and info["source"]["factory"] == FACTORY
    assert info["layers_by_kind"] == {"Conv2d int8": 4, "Linear int8": 1}


def test_open_run_rebuilds_the_folded_and_equalized_model(digits_files) -> None:
    from ptqkit.workflows.runs import open_run
    from ptqkit.workflows.sources import load_model

    recipe = str(next(r for r in RECIPES if r.name == "w8a8-cnn-cle-bc.yaml"))
    assert main(_quantize_args(digits_files, "--recipe", recipe, "--set", "calibration.samples=16")) == 0
    loaded, qmodel, example = open_run(digits_files["out"], trust_factory=True)
    original = load_model(FACTORY, digits_files["weights"]).model
    with torch.no_grad():  # the rebuilt float model is the original with BN folded and CLE applied: same function
        torch.testing.assert_close(loaded.model(example), original(example), rtol=1e-4, atol=1e-5)
        assert output_sqnr_db(original(example), qmodel(example)) > 10


def test_set_group_size_shorthand_and_typos(digits_files, capsys) -> None:
    assert main(_quantize_args(digits_files, "--preset", "w8a16", "--set", "scheme.weights.group_size=8", "--set", "targets=[Linear]", "--json")) == 0
    saved = Recipe.load(digits_files["out"] / "recipe.yaml")
    assert saved.scheme.weights.granularity.size == 8 and saved.targets == ("Linear",)
    capsys.readouterr()
    assert main(_quantize_args(digits_files, "--preset", "w8a8", "--set", "scheme.wieghts.qtype=int4")) == 2
    assert "unknown key 'wieghts'; did you mean 'weights'?" in capsys.readouterr().err
    assert main(_quantize_args(digits_files, "--preset", "w8a8", "--set", "scheme.weights.qtype=int9")) == 2
    assert "int qtype bits=9 is not supported" in capsys.readouterr().err
    assert main(_quantize_args(digits_files, "--preset", "w8a8", "--set", "calibration.sample=3")) == 2
    assert "unknown key 'sample'; did you mean 'samples'?" in capsys.readouterr().err


def test_a_misspelled_recipe_key_names_the_closest(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(Recipe.from_preset("w8a8").to_yaml().replace("keep_output_head", "keep_output_haed"))
    assert main(["inspect", str(bad)]) == 2
    assert "unknown key(s) ['keep_output_haed'] (did you mean 'keep_output_head'?)" in capsys.readouterr().err


def test_user_errors_have_typed_exit_codes(digits_files, tmp_path: Path, capsys) -> None:
    assert main(["quantize", "--model", str(tmp_path / "no-such-model"), "--preset", "w8a8", "--out", str(tmp_path / "o")]) == 4
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", "--model", "ptqkit.models.digits_cnn:DigitCNN", "--preset", "w8a8", "--out", str(tmp_path / "o")]) == 4
    assert "did you mean 'DigitsCNN'?" in capsys.readouterr().err
    garbage = tmp_path / "calib.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    args = _quantize_args(digits_files, "--preset", "w8a8")
    args[args.index("--calib") + 1] = str(garbage)
    assert main(args) == 3
    assert f"{garbage}: cannot read tensors" in capsys.readouterr().err
    assert main(_quantize_args(digits_files)) == 2
    assert "pass exactly one of --recipe FILE and --preset NAME" in capsys.readouterr().err
    assert not digits_files["out"].exists()  # nothing half-written


def test_quiet_and_non_tty_output_have_no_progress(digits_files) -> None:
    base = [sys.executable, "-m", "ptqkit.cli"] + _quantize_args(digits_files, "--preset", "w8a8")
    quiet = subprocess.run(base, capture_output=True, text=True, check=True)
    assert quiet.stderr == "" and "layers quantized" in quiet.stdout
    loud = subprocess.run([a for a in base if a != "--quiet"], capture_output=True, text=True, check=True)
    assert "Conv2d" in loud.stderr  # the plan is printed ...
    assert "━" not in loud.stderr and "\r" not in loud.stderr  # ... but no progress bar: stderr is not a terminal


@pytest.mark.parametrize("command", ["quantize", "export", "eval", "report", "bench", "doctor", "search", "inspect"])
def test_help_lists_the_options(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    expected = {"quantize": ["--model", "--recipe", "--preset", "--set", "--calib", "--out", "--format", "--quiet", "--json"],
                "export": ["--format", "--strict", "--json"], "eval": ["--data", "--samples", "--json"],
                "report": ["--data", "--out", "--json"], "doctor": ["--model", "--recipe", "--calib", "--data", "--json"],
                "bench": ["--runtime", "--threads", "--reps"], "search": ["--max-degradation", "--formats", "--time-limit"],
                "inspect": ["--json"]}[command]
    assert all(option in out for option in expected), out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_bundled_recipes_load_and_validate(path: Path, capsys) -> None:
    recipe = Recipe.load(path)
    assert recipe.name == path.stem
    assert main(["inspect", str(path), "--json"]) == 0
    assert Recipe.from_dict(json.loads(capsys.readouterr().out)) == recipe


def test_eval_and_report_on_a_run(digits_files, tmp_path: Path, capsys) -> None:
    assert main(_quantize_args(digits_files, "--preset", "w8a8")) == 0
    capsys.readouterr()
    data = tmp_path / "eval.pt"
    torch.save(torch.rand(40, 1, 8, 8), data)
    assert main(["eval", str(digits_files["out"]), "--data", str(data), "--json", "--trust-factory"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 40 and [layer["name"] for layer in report["layers"]] == ["stem.0", "block.0", "block.3", "block.6", "classifier"]
    assert 0 <= report["metrics"]["top1_agreement"] <= 1 and report["metrics"]["output_sqnr_db"] > 10
    assert main(["report", str(digits_files["out"]), "--quiet", "--sensitivity", "--trust-factory"]) == 0  # default data: the run's example batch
    out = capsys.readouterr().out
    assert "report.html" in out and (digits_files["out"] / "report/report.html").is_file()
    saved = json.loads((digits_files["out"] / "report/report.json").read_text())
    assert saved["samples"] == 8 and saved["provenance"]["evaluation"]["description"].startswith("the run's example batch")
    assert saved["provenance"]["calibration"]["fingerprint"]  # the quantization's calibration data
    assert "too-few-samples" in [f["id"] for f in saved["findings"]]  # the doctor's data-free checks run too (48 samples)
    assert saved["sensitivity"]["metric"] == "top1_agreement" and len(saved["sensitivity"]["degradation"]) == 5
    assert "<th>sensitivity</th>" in (digits_files["out"] / "report/report.html").read_text()


def test_doctor_lists_findings_with_fixes(digits_files, tmp_path: Path, capsys) -> None:
    per_tensor = tmp_path / "per-tensor.yaml"
    per_tensor.write_text(Recipe.from_preset("w8a8").to_yaml().replace("kind: per_channel\n      axis: 0", "kind: per_tensor", 1))
    args = ["doctor", "--model", FACTORY, "--weights", str(digits_files["weights"]), "--recipe", str(per_tensor),
            "--calib", str(digits_files["calib"]), "--quiet", "--json"]
    assert main(args) == 0
    found = json.loads(capsys.readouterr().out)["findings"]
    ids = [f["id"] for f in found]
    assert "depthwise-per-tensor" in ids and "too-few-samples" in ids  # DigitsCNN's block.3 is depthwise; 48 samples
    assert all(f["fix"] and f["severity"] in ("error", "warning", "info") for f in found)


def test_bench_in_onnx_runtime_then_report_states_the_speed(digits_files, capsys) -> None:
    assert main(_quantize_args(digits_files, "--preset", "w8a8")) == 0
    capsys.readouterr()
    assert main(["bench", str(digits_files["out"]), "--reps", "3", "--warmup", "1", "--json", "--trust-factory"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == "onnxruntime" and result["threads"] == 1 and result["float"]["calls"] == 3
    assert sum(result["kernels"].values()) == 5 and (digits_files["out"] / "onnx/model.fp32.onnx").is_file()
    assert main(["report", str(digits_files["out"]), "--quiet", "--json", "--trust-factory"]) == 0
    saved = json.loads((digits_files["out"] / "report/report.json").read_text())
    assert saved["bench"]["speedup"] == pytest.approx(result["speedup"])
    expected = "Slower than float on this machine" if result["speedup"] < 1 else "faster than float"
    assert expected in saved["headline"]


def test_search_writes_measured_points(tmp_path: Path, capsys) -> None:
    data = tmp_path / "eval.pt"
    torch.save(torch.randn(32, 128), data)
    out = tmp_path / "search"
    args = ["search", "--model", "tests.unit.test_cli:_wide_mlp", "--data", str(data), "--max-degradation", "0.1",
            "--formats", "int8_wo", "--latency-cache", str(tmp_path / "lat.json"), "--out", str(out), "--quiet", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "top1_agreement" and (out / "search.json").is_file()
    assert "uniform int8_wo" in [p["name"] for p in result["points"]]  # the size path ends there too (deduplicated)
    assert result["chosen"] is not None or "budget" in result["why_none"] or "slower" in result["why_none"]
    assert json.loads((tmp_path / "lat.json").read_text())["entries"]


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def test_version_and_help_with_no_command(capsys) -> None:
    from ptqkit.core.version import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"ptqkit {__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ptqkit") and "the three most common commands:" in out
    assert "ptqkit quantize  " in out and "ptqkit quantize --model DIR --recipe" in out and "ptqkit report RUN" in out


def test_a_recipe_field_error_links_to_its_reference_anchor(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nscheme:\n  weights: {qtype: int8, rounding: up}\n")
    assert main(["inspect", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ptqkit: error: ") and "scheme.weights.rounding: 'up' is unknown" in err[0]
    assert err[1] == "ptqkit: see reference/recipe.html#quantspec-rounding in the docs (make docs)"
