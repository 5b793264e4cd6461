"""`ptqkit quantize` / `export` / `inspect` as a user runs them, on real models and files:
MiniLM from its Hugging Face directory with a text file, MobileNetV2 from a factory, its
torchvision state dict and a folder of photos."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptqkit.eval.metrics import logits_of, top1_agreement

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _ptqkit(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ptqkit.cli", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_minilm_from_its_directory_with_a_text_file_then_export(minilm, shakespeare_calib_texts, tmp_path: Path) -> None:
    from ptqkit.models.zoo import minilm_path

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(shakespeare_calib_texts), encoding="utf-8")
    out = tmp_path / "minilm-w8a8"
    summary = _ptqkit(
        "quantize", "--model", str(minilm_path()), "--recipe", str(ROOT / "recipes/w8a8-encoder.yaml"),
        "--set", "calibration.samples=64", "--calib", str(calib), "--out", str(out), "--quiet",
    )
    assert summary["quantized_layers"] == 40 and summary["calibration_samples"] == 64  # 6 x 6 Linear + pooler + 3 embeddings
    assert summary["output_sqnr_db"] > 14  # last_hidden_state on one calibration batch; measured 16.2 dB
    # int8 embedding rows too: measured 58.7 / 90.9 MB with float embeddings
    assert summary["model_quantized_bytes"] < 0.3 * summary["model_float_bytes"], (summary["model_quantized_bytes"], summary["model_float_bytes"])
    exported = _ptqkit("export", str(out))
    assert exported["integer_layers"] == 40 and exported["float_layers"] == []  # embeddings on GatherBlockQuantized
    assert (out / "onnx/model.onnx").is_file()
    info = _ptqkit("inspect", str(out))
    assert info["source"]["kind"] == "hf" and "onnx/model.onnx" in info["files"] and "model.safetensors" in info["files"]
    evaluation = _ptqkit("eval", str(out), "--data", str(calib), "--samples", "32")
    assert evaluation["samples"] == 32 and evaluation["metrics"]["embedding_cosine_mean"] > 0.95
    timing = _ptqkit("bench", str(out), "--reps", "5", "--threads", "2")
    assert timing["runtime"] == "onnxruntime" and timing["kernels"] and timing["float"]["median_ms"] > 0
    _ptqkit("report", str(out))
    saved = json.loads((out / "report/report.json").read_text())
    assert saved["bench"]["speedup"] == timing["speedup"] and saved["size"]["artifact_bytes"] > 0
    assert ("Slower than float" in saved["headline"]) == (timing["speedup"] < 1)


def test_mobilenet_v2_factory_weights_and_photo_folder(mobilenet_v2, photo_crops_eval, tmp_path: Path) -> None:
    from PIL import Image

    from ptqkit.models import corpora, zoo
    from ptqkit.workflows.runs import open_run

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in corpora.PHOTO_SETS["calib"]:
        image = (corpora.load_photo(photo).permute(1, 2, 0).numpy() * 255).round().astype("uint8")  # [H, W, 3]
        for flip in (False, True):
            Image.fromarray(image[:, ::-1] if flip else image).save(folder / f"{photo.replace(':', '_')}_{int(flip)}.png")
    out = tmp_path / "mnv2"
    summary = _ptqkit(
        "quantize", "--model", "ptqkit.models.mobilenet_v2:MobileNetV2", "--weights", str(zoo.mobilenet_v2_weights()),
        "--recipe", str(ROOT / "recipes/w8a8-cnn-cle-bc.yaml"), "--set", "calibration.samples=8",
        "--calib", str(folder), "--out", str(out), "--format", "onnx", "--quiet",
    )
    assert summary["quantized_layers"] == 53 and summary["calibration_samples"] == 8
    assert summary["onnx"]["integer_layers"] >= 48  # of 53 quantized layers; measured 52 on integer kernels
    found = _ptqkit(
        "doctor", "--model", "ptqkit.models.mobilenet_v2:MobileNetV2", "--weights", str(zoo.mobilenet_v2_weights()),
        "--preset", "w8a8", "--set", "scheme.weights.granularity={kind: per_tensor}", "--calib", str(folder), "--quiet",
    )
    assert "depthwise-per-tensor" in [f["id"] for f in found["findings"]]
    _, qmodel, _ = open_run(out, trust_factory=True)  # the factory this test named
    crops = photo_crops_eval[:128]
    agreement = top1_agreement(logits_of(mobilenet_v2, crops), logits_of(qmodel, crops))
    assert agreement > 0.85, agreement  # per-tensor W8A8 + CLE + BC from 8 photos; measured 0.945 (128 crops)
