"""The bundled example (`make example`, `ptqkit quantize` with no arguments) end to end on the
real all-MiniLM-L6-v2, kept small: the project's best encoder recipe, a run directory, and one
table measured in the same run (torch FP32, ONNX Runtime FP32, ptqkit INT8 in ONNX Runtime)."""
from __future__ import annotations

from pathlib import Path

import ptqkit as pq
from ptqkit.examples import minilm

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_the_example_runs_the_shipped_encoder_recipe() -> None:
    shipped = pq.Recipe.load(RECIPES / "w8a8-encoder-smooth.yaml")
    assert minilm.example_recipe().to_dict() == shipped.to_dict()


def test_the_example_measures_accuracy_size_and_speed_in_one_run(tmp_path: Path, capfd) -> None:
    result = minilm.run(calib_samples=16, eval_samples=24, progress=False, out_dir=tmp_path / "run", show_plan=False, reps=2)
    runtimes = result["runtimes"]
    assert runtimes["batch"]["reps"] == 2 and runtimes["batch"]["samples"] >= 2
    assert runtimes["fp32_torch"]["speedup"] == 1.0 and runtimes["fp32_torch"]["cosine_mean"] > 0.9999
    assert runtimes["fp32_ort"]["cosine_min"] > 0.999  # the float graph computes what torch computes
    assert runtimes["int8_ort"]["cosine_mean"] > 0.98 and result["cosine_mean"] == runtimes["int8_ort"]["cosine_mean"]
    assert runtimes["int8_ort"]["file_mb"] < runtimes["fp32_ort"]["file_mb"] / 3  # int8 weights and embedding rows
    assert result["onnx"]["integer_layers"] == result["quantized_layers"]
    table = minilm.render(result)
    for label in ("torch FP32", "ONNX Runtime FP32", "ptqkit INT8, ONNX Runtime", "latency (ms)", "speed-up", "file (MB)", "cosine to FP32"):
        assert label in table
    page = Path(result["report"]).read_text()
    assert 'id="speed-chart"' in page and "in onnxruntime" in page
    captured = capfd.readouterr()
    for noise in ("torchvision is not installed", "FutureWarning", "Loading weights"):  # third-party output is silenced
        assert noise not in captured.err and noise not in captured.out
