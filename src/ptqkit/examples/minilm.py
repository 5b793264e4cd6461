"""The bundled example, end to end: all-MiniLM-L6-v2 to W8A8 with the project's best encoder
recipe (static int8 per-channel weights, uint8 per-tensor activations, int8 embedding rows,
input smoothing of the post-norm inputs) on bundled calibration text, compared with FP32 for
accuracy, size and speed (torch FP32, ONNX Runtime FP32 and the int8 graph in ONNX Runtime).

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
from dataclasses import replace
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


SMOOTHED_LAYERS = (r"re:(.*\.)?attention\.self\.(query|key|value)", r"re:(.*\.)?intermediate\.dense")


def example_recipe() -> pq.Recipe:
    """The project's best encoder recipe (recipes/w8a8-encoder-smooth.yaml, built here so that an
    installed ptqkit runs it): static W8A8 with int8 embedding rows, and the post-norm inputs of
    query/key/value and the feed-forward layer divided by smoothing divisors before their quantizer."""
    from ptqkit.algorithms import InputSmoothingConfig

    base = pq.Recipe.from_preset("w8a8", name="w8a8-encoder-smooth")
    return replace(
        base,
        targets=("Linear", "Embedding", "Conv1d", "Conv2d", "Conv1D"),
        algorithms=(InputSmoothingConfig(alpha=0.7, layers=SMOOTHED_LAYERS),),
    )


def run(
    calib_samples: int = 256,
    eval_samples: int = 300,
    progress: bool = True,
    out_dir: str | Path | None = None,
    show_plan: bool = True,
    reps: int = 20,
) -> dict[str, Any]:
    """Quantize MiniLM with `example_recipe` and compare embeddings with FP32. With `out_dir`,
    also write a run directory there (artifact, recipe, ONNX export with its float graph, report:
    see `ptqkit.workflows.runs`) and time torch FP32, ONNX Runtime FP32 and the int8 graph in
    ONNX Runtime side by side (`reps` rounds, same batch)."""
    from ptqkit.core.quiet import quiet_third_party
    from ptqkit.models.zoo import load_minilm

    with quiet_third_party():
        model, tokenizer = load_minilm()
        recipe = example_recipe()
        if show_plan:
            plan = pq.plan(model, recipe)
            sys.stderr.write(f"{len(plan.layers)} module(s) quantized, {len(plan.skipped)} left in float (pq.plan shows each)\n")
        calib = pq.CalibrationData.from_text(calibration_texts(calib_samples), tokenizer, max_length=128, batch_size=16)
        texts = stdlib_doc_texts(eval_samples)
        if out_dir is None:
            return _simulated_only(model, tokenizer, recipe, calib, texts, progress)
        return _run_directory(model, tokenizer, recipe, calib, texts, Path(out_dir), progress, reps)


def _size_fields(qmodel: torch.nn.Module) -> dict[str, Any]:
    size = pq.model_size(qmodel)
    return {
        "quantized_layers": size.quantized_layers,
        "model_fp32_mb": size.total_float_bytes / 1e6,
        "model_quantized_mb": size.total_quantized_bytes / 1e6,
    }


def _simulated_only(model: Any, tokenizer: Any, recipe: pq.Recipe, calib: Any, texts: list[str], progress: bool) -> dict[str, Any]:
    """Quantize in memory; the embedding cosine of the simulated model (no files, no timing)."""
    start = time.perf_counter()
    qmodel = pq.quantize(model, recipe, calib, progress=progress)
    seconds = time.perf_counter() - start
    cosine = embedding_cosine(mean_pooled_embeddings(model, tokenizer, texts), mean_pooled_embeddings(qmodel, tokenizer, texts))
    return {
        "recipe": recipe.name, "calibration_samples": len(calib), "eval_sentences": len(texts), "quantize_seconds": seconds,
        "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(), **_size_fields(qmodel),
    }


def _run_directory(
    model: Any, tokenizer: Any, recipe: pq.Recipe, calib: Any, texts: list[str], out_dir: Path, progress: bool, reps: int
) -> dict[str, Any]:
    """Write the run directory, then measure the three runtimes on it and write the report."""
    from ptqkit.models.zoo import minilm_path
    from ptqkit.workflows.runs import quantize_run
    from ptqkit.workflows.sources import LoadedModel

    loaded = LoadedModel(model, tokenizer, {"kind": "hf", "path": str(minilm_path())})
    summary = quantize_run(loaded, recipe, calib, out_dir, formats=("onnx",), progress=progress, keep_float=True)
    _, qmodel, example = open_run(out_dir)
    onnx_dir = Path(summary["onnx"]["file"]).parent
    result: dict[str, Any] = {
        "recipe": recipe.name, "calibration_samples": len(calib), "eval_sentences": len(texts),
        "quantize_seconds": summary["quantize_seconds"], "run_directory": str(out_dir), "onnx": summary["onnx"],
        **_size_fields(qmodel),
    }
    result["runtimes"] = _runtimes(model, tokenizer, texts, onnx_dir, example, reps)
    result["cosine_mean"], result["cosine_min"] = (result["runtimes"]["int8_ort"][key] for key in ("cosine_mean", "cosine_min"))
    result["report"] = _report(model, qmodel, tokenizer, texts, calib, out_dir, result["runtimes"])
    return result


def _ort_embeddings(session: Any, tokenizer: Any, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings from an ONNX Runtime session of the encoder."""
    from ptqkit.export.ort_check import run_session

    out = []
    for start in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        hidden = torch.from_numpy(run_session(session, batch)[0]).float()  # last_hidden_state [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)


def _runtimes(model: Any, tokenizer: Any, texts: list[str], onnx_dir: Path, example: Any, reps: int) -> dict[str, dict[str, Any]]:
    """torch FP32, ONNX Runtime FP32 and ptqkit's int8 graph in ONNX Runtime: median latency on the
    same batch (calls in turn, `core.timing.time_round_robin`), file size, embedding cosine to torch FP32."""
    from ptqkit.calibration.samples import call_model
    from ptqkit.core.timing import time_round_robin
    from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE
    from ptqkit.export.ort_check import make_session, run_session
    from ptqkit.stats.hooks import batch_length

    threads = torch.get_num_threads()
    sessions = {name: make_session(onnx_dir / file, threads=threads) for name, file in (("fp32_ort", FLOAT_ONNX_FILE), ("int8_ort", ONNX_FILE))}
    calls = {"fp32_torch": lambda: call_model(model, example)}
    calls |= {name: (lambda session=session: run_session(session, example)) for name, session in sessions.items()}
    with torch.inference_mode():
        timings = time_round_robin(calls, warmup=3, reps=reps, batch=batch_length(example))
        reference = mean_pooled_embeddings(model, tokenizer, texts)
    files = {"fp32_torch": None, "fp32_ort": onnx_dir / FLOAT_ONNX_FILE, "int8_ort": onnx_dir / ONNX_FILE}
    rows: dict[str, dict[str, Any]] = {}
    for name, timing in timings.items():
        embeddings = reference if name == "fp32_torch" else _ort_embeddings(sessions[name], tokenizer, texts)
        cosine = embedding_cosine(reference, embeddings)
        rows[name] = {
            "median_ms": timing.median_ms, "speedup": timings["fp32_torch"].median_ms / timing.median_ms,
            "file_mb": None if files[name] is None else files[name].stat().st_size / 1e6,
            "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
        }
    rows["fp32_torch"]["file_mb"] = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 1e6
    return rows | {"batch": {"samples": batch_length(example), "threads": threads, "reps": reps}}


def _report(model: Any, qmodel: Any, tokenizer: Any, texts: list[str], calib: Any, out_dir: Path, runtimes: dict[str, Any]) -> str:
    """The run's HTML report, its Speed section from the ONNX Runtime timings just measured."""
    from ptqkit.core.machine import describe

    eval_data = pq.CalibrationData.from_text(texts, tokenizer, max_length=128, batch_size=16)
    report = pq.evaluate(qmodel, model, eval_data, max_samples=len(texts))
    float_ms, int8_ms = runtimes["fp32_ort"]["median_ms"], runtimes["int8_ort"]["median_ms"]
    bench = {
        "runtime": "onnxruntime", "batch": runtimes["batch"]["samples"], "threads": runtimes["batch"]["threads"],
        "speedup": float_ms / int8_ms, "float": {"median_ms": float_ms}, "quantized": {"median_ms": int8_ms},
        "note": f"torch FP32 on the same batch: {runtimes['fp32_torch']['median_ms']:.2f} ms", "machine": describe(),
    }
    paths = pq.report(
        report, out_dir / "report", title="all-MiniLM-L6-v2, W8A8 with input smoothing (bundled example)", bench=bench,
        calibration={"description": calib.description, "fingerprint": calib.fingerprint},
        evaluation={"description": eval_data.description, "fingerprint": eval_data.fingerprint},
    )
    return str(paths["html"])


_RUNTIME_ROWS = (("fp32_torch", "torch FP32"), ("fp32_ort", "ONNX Runtime FP32"), ("int8_ort", "ptqkit INT8, ONNX Runtime"))


def render(result: dict[str, Any]) -> str:
    """The example's table: with a run directory, the three runtimes measured side by side."""
    lines = []
    if "runtimes" in result:
        runtimes, batch = result["runtimes"], result["runtimes"]["batch"]
        lines.append(f"{'':<28} {'latency (ms)':>13} {'speed-up':>9} {'file (MB)':>10} {'cosine to FP32':>15}")
        for key, label in _RUNTIME_ROWS:
            row = runtimes[key]
            lines.append(
                f"{label:<28} {row['median_ms']:>13.2f} {row['speedup']:>8.2f}x {row['file_mb']:>10.1f} "
                f"{row['cosine_mean']:>8.4f} (min {row['cosine_min']:.4f})"
            )
        lines.append(
            f"(median of {batch['reps']} rounds in turn, batch of {batch['samples']} sentences, {batch['threads']} thread(s); "
            f"speed-up against torch FP32)"
        )
    else:
        lines.append(f"embedding cosine to FP32: mean {result['cosine_mean']:.4f}, worst {result['cosine_min']:.4f}")
        lines.append(f"whole model: {result['model_fp32_mb']:.2f} MB FP32 -> {result['model_quantized_mb']:.2f} MB quantized")
    lines.append(
        f"recipe {result['recipe']}: {result['quantized_layers']} layers quantized; calibrated on {result['calibration_samples']} "
        f"Shakespeare lines in {result['quantize_seconds']:.1f} s; evaluated on {result['eval_sentences']} stdlib docstrings"
    )
    if "run_directory" in result:
        onnx = result["onnx"]
        lines.append(
            f"run directory {result['run_directory']}: artifact, recipe.yaml, summary.json, {onnx['file']} "
            f"({onnx['integer_layers']} layers on integer kernels), report {result['report']}"
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
