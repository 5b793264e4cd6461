"""CNN post-training quantization (issue 8): BN folding, CLE, bias correction and AdaRound on
MobileNetV2 (torchvision ImageNet weights), plus a CNN trained here on scikit-learn's digits.

No ImageNet data is reachable, so MobileNetV2 is measured by agreement with its own FP32 outputs
on deterministic crops/flips/scales of the bundled photos (`corpora.photo_crops`): top-1
agreement, top-5 agreement (FP32's class among the quantized model's five best) and the mean
KL divergence of the softmax outputs. Calibration crops come from other photos (PHOTO_SETS
"calib" vs "eval"). The digits CNN has true labels: accuracy on the held-out split.
Then the per-channel W8A8 MobileNetV2 is exported to ONNX and timed in ONNX Runtime against ORT
FP32 and torch FP32 (same thread count, spinning off), with the kernels ORT ran.

    .venv/bin/python benchmarks/cnn_ptq.py [--eval 1000] [--calib 256] [--layerwise-samples 128]
        [--iterations 300] [--rows ...] [--threads 2] [--skip-onnx] [--out results/cnn_ptq.json]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import ptqkit as pq
from ptqkit.algorithms import AdaRoundConfig, BiasCorrectionConfig, BNFoldConfig, CLEConfig
from ptqkit.core.qtypes import PerChannel, PerTensor
from ptqkit.core.spec import QuantSpec
from ptqkit.eval.metrics import (
    logits_of,
    mean_softmax_kl,
    output_sqnr_db,
    top1_agreement,
    topk_agreement,
)

logger = logging.getLogger("cnn_ptq")
RESULTS = Path(__file__).parent / "results" / "cnn_ptq.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402

INT8_PER_TENSOR = QuantSpec(qtype="int8", granularity=PerTensor(), symmetric=True)
INT8_PER_CHANNEL = QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True)
INT4_PER_CHANNEL = QuantSpec(qtype="int4", granularity=PerChannel(0), symmetric=True)


def recipe(weights: QuantSpec, algorithms: tuple[Any, ...], samples: int, name: str) -> pq.Recipe:
    """The W8A8 preset's activations (uint8 per-tensor, min-max) with these weights and algorithms."""
    base = pq.Recipe.from_preset("w8a8")
    calibration = replace(base.calibration, samples=samples)
    return replace(base, name=name, scheme=replace(base.scheme, weights=weights), algorithms=algorithms, calibration=calibration)


def rows(iterations: int, calib: int, layerwise_samples: int) -> dict[str, pq.Recipe]:
    """The issue's table rows, in order (plus the data-free bias correction of DFQ, which needs no
    calibration pass of its own); the layer-by-layer rows (bias correction, AdaRound)
    calibrate on the first `layerwise_samples` crops (their one pass holds all of them in memory)."""
    ada = AdaRoundConfig(iterations=iterations)
    fold, cle, bc = BNFoldConfig(), CLEConfig(), BiasCorrectionConfig()
    analytic = BiasCorrectionConfig(mode="analytic")
    table = {
        "W8A8 per-tensor nearest": (INT8_PER_TENSOR, (), calib),
        "+ BN fold": (INT8_PER_TENSOR, (fold,), calib),
        "+ CLE": (INT8_PER_TENSOR, (fold, cle), calib),
        "+ CLE + bias correction": (INT8_PER_TENSOR, (fold, cle, bc), layerwise_samples),
        "+ CLE + analytic bias correction": (INT8_PER_TENSOR, (fold, cle, analytic), calib),
        "W8A8 per-channel": (INT8_PER_CHANNEL, (fold,), calib),
        "W4A8 per-channel nearest": (INT4_PER_CHANNEL, (fold,), calib),
        "W4A8 + AdaRound": (INT4_PER_CHANNEL, (fold, ada), layerwise_samples),
        "W4A8 + CLE + BC + AdaRound": (INT4_PER_CHANNEL, (fold, cle, ada, bc), layerwise_samples),
    }
    return {name: recipe(w, algos, n, name) for name, (w, algos, n) in table.items()}


def measure_row(model: torch.nn.Module, the_recipe: pq.Recipe, calib: torch.Tensor, eval_x: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    data = pq.CalibrationData.from_tensors(calib, batch_size=32)
    start = time.perf_counter()
    qmodel = pq.quantize(model, the_recipe, data, progress=False)
    seconds = time.perf_counter() - start
    logits = logits_of(qmodel, eval_x)
    return {
        "top1_agreement": top1_agreement(reference, logits),
        "top5_agreement": topk_agreement(reference, logits, 5),
        "mean_kl": mean_softmax_kl(reference, logits),
        "logit_sqnr_db": output_sqnr_db(reference, logits),
        "quantize_seconds": seconds,
        "algorithms": [type(a).__name__ for a in the_recipe.algorithms],
        "calibration_samples": the_recipe.calibration.samples,
        "qmodel": qmodel,
    }


def digits_rows(iterations: int) -> dict[str, Any]:
    from ptqkit.models.corpora import digits
    from ptqkit.models.digits_cnn import accuracy, train_digits_cnn

    trained = train_digits_cnn()
    x_train, _ = digits("train")
    x_test, y_test = digits("test")
    out: dict[str, Any] = {"FP32": {"accuracy": trained.test_accuracy, "train_seconds": trained.seconds}}
    table = {
        "W8A8 per-channel": (INT8_PER_CHANNEL, (BNFoldConfig(),)),
        "W4A8 per-channel nearest": (INT4_PER_CHANNEL, (BNFoldConfig(),)),
        "W4A8 + AdaRound": (INT4_PER_CHANNEL, (BNFoldConfig(), AdaRoundConfig(iterations=iterations))),
        "W4A8 + CLE + BC + AdaRound": (
            INT4_PER_CHANNEL, (BNFoldConfig(), CLEConfig(), AdaRoundConfig(iterations=iterations), BiasCorrectionConfig())
        ),
    }
    data = pq.CalibrationData.from_tensors(x_train[:256], batch_size=64)
    for name, (weights, algorithms) in table.items():
        start = time.perf_counter()
        qmodel = pq.quantize(trained.model, recipe(weights, algorithms, 256, name), data, progress=False)
        out[name] = {"accuracy": accuracy(qmodel, x_test, y_test), "quantize_seconds": time.perf_counter() - start}
    out["test_samples"] = len(y_test)
    return out


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onnx_rows(
    model: torch.nn.Module, qmodel: torch.nn.Module, calib: torch.Tensor, eval_x: torch.Tensor, reference: torch.Tensor,
    threads: int, batch: int, reps: int,
) -> dict[str, Any]:
    """Latency (batch `batch`) and top-1 agreement with torch FP32 on all eval crops for ORT FP32,
    ptqkit's export and ORT's own quantize_static (QDQ, per-channel, MinMax, same calibration crops)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from ptqkit.export.onnx_graph import export_float_onnx
    from ptqkit.export.ort_check import make_session

    x = eval_x[:batch].contiguous()
    with torch.inference_mode():
        simulated = logits_of(qmodel, eval_x)
    with tempfile.TemporaryDirectory() as tmp:
        result = pq.export(qmodel, Path(tmp) / "mnv2", formats=["onnx"], example_inputs=(x,))
        kernels: dict[str, int] = {}
        for layer in result.layers:
            kernels[layer.kernel] = kernels.get(layer.kernel, 0) + 1
        fp32 = Path(tmp) / "fp32.onnx"
        export_float_onnx(model, (x,), fp32)  # the original model (the export's own float file has its dequantized weights)
        files = {"ORT FP32": fp32, "ptqkit W8A8 (ORT)": result.files["onnx"]}

        input_name = make_session(files["ORT FP32"], threads=threads).get_inputs()[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{input_name: calib[i : i + 16].numpy()} for i in range(0, len(calib), 16)])

            def get_next(self) -> dict[str, Any] | None:
                return next(self.batches, None)

        peer = Path(tmp) / "ort_static.onnx"
        start = time.perf_counter()
        quantize_static(str(files["ORT FP32"]), str(peer), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        peer_seconds = time.perf_counter() - start
        files["ORT quantize_static (QDQ, per-channel)"] = peer
        timings = {}
        with torch.inference_mode():
            timings["torch FP32"] = median_seconds(lambda: model(x), reps)
        agreement = {"torch FP32": 1.0}
        for name, path in files.items():
            session = make_session(path, threads=threads)
            feed = {input_name: x.numpy()}
            timings[name] = median_seconds(lambda s=session, f=feed: s.run(None, f), reps)
            logits = torch.cat([torch.from_numpy(session.run(None, {input_name: eval_x[i : i + 32].numpy()})[0]) for i in range(0, len(eval_x), 32)])
            agreement[name] = top1_agreement(reference, logits)
            if name == "ptqkit W8A8 (ORT)":
                agreement["ptqkit W8A8 (ORT) vs simulated"] = top1_agreement(simulated, logits)
        size = {name: path.stat().st_size for name, path in files.items()}
    base = timings["torch FP32"]
    return {
        "batch": batch,
        "threads": threads,
        "onnxruntime": ort.__version__,
        "latency_ms": {k: v * 1e3 for k, v in timings.items()},
        "speedup_vs_torch_fp32": {k: base / v for k, v in timings.items()},
        "top1_agreement_vs_fp32": agreement,
        "simulated_top1_agreement_vs_fp32": top1_agreement(reference, simulated),
        "ort_quantize_static_seconds": peer_seconds,
        "file_bytes": size,
        "kernels": kernels,
        "float_layers": list(result.float_layers),
        "checks": result.checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=int, default=1000, help="evaluation crops (default 1000)")
    parser.add_argument("--calib", type=int, default=256, help="calibration crops (default 256)")
    parser.add_argument("--layerwise-samples", type=int, default=128, help="calibration crops for the bias-correction and AdaRound rows")
    parser.add_argument("--iterations", type=int, default=300, help="AdaRound iterations per layer")
    parser.add_argument("--rows", nargs="*", default=None, help="MobileNetV2 rows to run (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx-batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from ptqkit.models import corpora, zoo

    model = zoo.load_mobilenet_v2()
    calib = corpora.photo_crops(args.calib, seed=0, source="calib")  # [calib, 3, 224, 224]
    eval_x = corpora.photo_crops(args.eval, seed=1, source="eval")  # [eval, 3, 224, 224]
    reference = logits_of(model, eval_x)
    table = rows(args.iterations, args.calib, args.layerwise_samples)
    chosen = args.rows or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {list(table)}")
    results: dict[str, Any] = {"eval_crops": args.eval, "calib_crops": args.calib, "adaround_iterations": args.iterations, "mobilenet_v2": {}}
    print(f"MobileNetV2, {args.eval} eval crops, agreement with FP32 ({args.threads} threads)")
    print(f"{'row':32} {'top-1':>7} {'top-5':>7} {'KL':>8} {'SQNR dB':>8} {'quantize s':>11}")
    kept: dict[str, torch.nn.Module] = {}
    for name in chosen:
        row = measure_row(model, table[name], calib[: table[name].calibration.samples], eval_x, reference)
        kept[name] = row.pop("qmodel")
        results["mobilenet_v2"][name] = row
        print(f"{name:32} {row['top1_agreement']:7.4f} {row['top5_agreement']:7.4f} {row['mean_kl']:8.4f} "
              f"{row['logit_sqnr_db']:8.2f} {row['quantize_seconds']:11.1f}", flush=True)
    if not args.skip_digits:
        results["digits"] = digits_rows(args.iterations)
        print(f"\ndigits CNN, accuracy on {results['digits']['test_samples']} held-out images")
        for name, row in results["digits"].items():
            if isinstance(row, dict):
                print(f"{name:32} {row['accuracy']:7.4f}")
    if not args.skip_onnx:
        qmodel = kept.get("W8A8 per-channel") or pq.quantize(
            model, table["W8A8 per-channel"], pq.CalibrationData.from_tensors(calib, batch_size=32), progress=False
        )
        results["onnx"] = onnx_rows(model, qmodel, calib, eval_x, reference, args.threads, args.onnx_batch, args.reps)
        onnx = results["onnx"]
        print(f"\nONNX Runtime {onnx['onnxruntime']}, batch {onnx['batch']}, {onnx['threads']} threads; ptqkit's kernels {onnx['kernels']}")
        print(f"{'model':40} {'latency ms':>10} {'vs torch FP32':>14} {'top-1 vs FP32':>14}")
        for name, ms in onnx["latency_ms"].items():
            print(f"{name:40} {ms:10.2f} {onnx['speedup_vs_torch_fp32'][name]:13.2f}x {onnx['top1_agreement_vs_fp32'][name]:14.4f}")
        print(f"ptqkit simulated top-1 vs FP32 {onnx['simulated_top1_agreement_vs_fp32']:.4f}; ORT int8 vs simulated "
              f"{onnx['top1_agreement_vs_fp32']['ptqkit W8A8 (ORT) vs simulated']:.4f}")
    mnv2 = [[name, f"{r['top1_agreement']:.4f}", f"{r['top5_agreement']:.4f}", f"{r['mean_kl']:.4f}", f"{r['logit_sqnr_db']:.2f}",
             f"{r['quantize_seconds']:.1f}"] for name, r in results["mobilenet_v2"].items()]
    write_record(args.out, make_record(
        "cnn_ptq", f"MobileNetV2 (torchvision ImageNet weights): agreement with its own FP32 outputs on {args.eval} crops of the bundled photos",
        ["MobileNetV2", "top-1", "top-5", "softmax KL", "logit SQNR dB", "quantize s"], mnv2,
        notes=f"{args.calib} calibration crops; AdaRound {args.iterations} iterations per layer.", data=results))
    if "digits" in results:
        digits = [[name, f"{r['accuracy']:.4f}"] for name, r in results["digits"].items() if isinstance(r, dict)]
        write_record(args.out.with_name(args.out.stem + "_digits.json"), make_record(
            "cnn_ptq", f"digits CNN: accuracy on {results['digits']['test_samples']} held-out images", ["configuration", "accuracy"], digits))
    if "onnx" in results:
        onnx = results["onnx"]
        ort = [[name, f"{ms:.2f}", f"{onnx['speedup_vs_torch_fp32'][name]:.2f}", f"{onnx['top1_agreement_vs_fp32'][name]:.4f}"]
               for name, ms in onnx["latency_ms"].items()]
        write_record(args.out.with_name(args.out.stem + "_onnx.json"), make_record(
            "cnn_ptq", f"MobileNetV2 in ONNX Runtime {onnx['onnxruntime']} (batch {onnx['batch']}, {onnx['threads']} threads)",
            ["model", "latency ms", "x torch FP32", "top-1 vs FP32"], ort,
            notes=f"ptqkit's kernels {onnx['kernels']}; ptqkit simulated top-1 vs FP32 {onnx['simulated_top1_agreement_vs_fp32']:.4f}"))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
