"""The bundled example, end to end: all-MiniLM-L6-v2 to W8A8 (static, int8 per-channel weights,
uint8 per-tensor activations) on bundled calibration text, compared with FP32.

Calibration text: Shakespeare lines bundled with ptqkit. Evaluation text: docstrings of the
Python standard library (a different source, present on every Python installation).
Run with `python -m ptqkit.examples.minilm` (or `make example`).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import ptqkit as pq
from ptqkit.eval.metrics import embedding_cosine, mean_pooled_embeddings
from ptqkit.workflows.runs import open_run

logger = logging.getLogger(__name__)

_DOC_MODULES = ("json", "collections", "itertools", "functools", "pathlib", "argparse", "logging", "textwrap", "string", "re", "os", "csv", "random", "statistics", "heapq", "bisect", "datetime", "calendar", "shutil", "zipfile")


def calibration_texts(limit: int) -> list[str]:
    """The bundled calibration file: Shakespeare speeches (public domain), one per line."""
    from ptqkit.models.corpora import example_calibration_texts

    return example_calibration_texts()[:limit]


def stdlib_doc_texts(limit: int) -> list[str]:
    """Sentences from the docstrings of standard-library functions and classes (deterministic)."""
    texts: list[str] = []
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o))):
            doc = inspect.getdoc(obj) or ""
            paragraph = " ".join(doc.split("\n\n")[0].split())
            if 40 <= len(paragraph) <= 400 and paragraph not in texts:
                texts.append(paragraph)
            if len(texts) >= limit:
                return texts
    return texts


def run(
    calib_samples: int = 256,
    eval_samples: int = 300,
    progress: bool = True,
    out_dir: str | Path | None = None,
    show_plan: bool = True,
) -> dict[str, Any]:
    """Quantize MiniLM to W8A8 and compare embeddings with FP32. With `out_dir`, also write a run
    directory there (artifact, recipe, ONNX export: see `ptqkit.workflows.runs`)."""
    from ptqkit.models.zoo import load_minilm, minilm_path
    from ptqkit.workflows.runs import quantize_run
    from ptqkit.workflows.sources import LoadedModel

    model, tokenizer = load_minilm()
    recipe = pq.Recipe.from_preset("w8a8", name="example-minilm-w8a8")
    if show_plan:
        sys.stderr.write(pq.plan(model, recipe).render() + "\n\n")
    calib = pq.CalibrationData.from_text(calibration_texts(calib_samples), tokenizer, max_length=128, batch_size=16)
    start = time.perf_counter()
    if out_dir is not None:
        loaded = LoadedModel(model, tokenizer, {"kind": "hf", "path": str(minilm_path())})
        run_summary = quantize_run(loaded, recipe, calib, out_dir, formats=("onnx",), progress=progress)
        _, qmodel, _ = open_run(out_dir)
    else:
        run_summary = None
        qmodel = pq.quantize(model, recipe, calib, progress=progress)
    seconds = time.perf_counter() - start
    texts = stdlib_doc_texts(eval_samples)
    reference = mean_pooled_embeddings(model, tokenizer, texts)
    quantized = mean_pooled_embeddings(qmodel, tokenizer, texts)
    cosine = embedding_cosine(reference, quantized)
    size = pq.model_size(qmodel)
    result: dict[str, Any] = {
        "calibration_samples": len(calib),
        "eval_sentences": len(texts),
        "quantize_seconds": run_summary["quantize_seconds"] if run_summary else seconds,
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "quantized_layers": size.quantized_layers,
        "layer_weights_fp32_mb": size.float_bytes / 1e6,
        "layer_weights_int8_mb": size.quantized_bytes / 1e6,
        "model_fp32_mb": size.total_float_bytes / 1e6,
        "model_quantized_mb": size.total_quantized_bytes / 1e6,
    }
    if run_summary is not None:
        eval_data = pq.CalibrationData.from_text(texts, tokenizer, max_length=128, batch_size=16)
        report = pq.evaluate(qmodel, model, eval_data, max_samples=len(texts))
        paths = pq.report(
            report, Path(out_dir) / "report", title="all-MiniLM-L6-v2, W8A8 (bundled example)",
            calibration={"description": calib.description, "fingerprint": calib.fingerprint},
            evaluation={"description": eval_data.description, "fingerprint": eval_data.fingerprint},
        )
        result["run_directory"] = str(out_dir)
        result["onnx"] = run_summary["onnx"]
        result["report"] = str(paths["html"])
    return result


def render(result: dict[str, Any]) -> str:
    rows = [
        ("", "FP32", "W8A8 (ptqkit)"),
        ("quantized layer weights (MB)", f"{result['layer_weights_fp32_mb']:.2f}", f"{result['layer_weights_int8_mb']:.2f}"),
        ("whole model (MB)", f"{result['model_fp32_mb']:.2f}", f"{result['model_quantized_mb']:.2f}"),
        ("embedding cosine to FP32, mean", "1.0000", f"{result['cosine_mean']:.4f}"),
        ("embedding cosine to FP32, worst", "1.0000", f"{result['cosine_min']:.4f}"),
    ]
    lines = [f"{a:<34} {b:>10} {c:>14}" for a, b, c in rows]
    lines.append(
        f"({result['quantized_layers']} layers quantized; calibrated on {result['calibration_samples']} Shakespeare lines "
        f"in {result['quantize_seconds']:.1f} s; evaluated on {result['eval_sentences']} stdlib docstrings)"
    )
    if "run_directory" in result:
        onnx = result["onnx"]
        lines.append(
            f"run directory {result['run_directory']}: artifact (model.safetensors, quantization.json), recipe.yaml, "
            f"summary.json, {onnx['file']} ({onnx['integer_layers']} layers on integer kernels in ONNX Runtime), {result['report']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="all-MiniLM-L6-v2 to W8A8 with ptqkit, compared with FP32")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--out", default=None, help="also write a run directory (artifact, recipe, ONNX) here")
    parser.add_argument("--quiet", action="store_true", help="no plan or progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    result = run(args.calib_samples, args.eval_samples, progress=not args.quiet, out_dir=args.out, show_plan=not args.quiet)
    sys.stdout.write(render(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
