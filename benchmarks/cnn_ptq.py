"""CNN post-training quantization (issue 8): BN folding, CLE, bias correction and AdaRound on
MobileNetV2 (torchvision ImageNet weights), plus a CNN trained here on scikit-learn's digits.

No ImageNet data is reachable, so MobileNetV2 is measured by agreement with its own FP32 outputs
on deterministic crops/flips/scales of the bundled photos (`corpora.photo_crops`): top-1
agreement, top-5 agreement (FP32's class among the quantized model's five best) and the mean
KL divergence of the softmax outputs. Calibration crops come from other photos (PHOTO_SETS
"calib" vs "eval"). The digits CNN has true labels: accuracy on the held-out split.
Then, in ONNX Runtime (same thread count, spinning off), timed round-robin (every model once per
round, so load from other processes falls on all alike): torch FP32, ORT FP32, ORT's own
quantize_static (QDQ, per-channel, the best of its MinMax/Entropy/Percentile calibrators by
agreement), ptqkit W8A8 per-channel and W8A8 CLE + analytic bias correction per-tensor, both
exported as fully integer graphs (`export.integer_cnn`: output quantizers calibrated on the same
crops); with agreement on the eval crops, file size, ORT's kernels and its share of float ops.
The same table for a ResNet-18 with random weights (BatchNorm statistics of the calibration crops).

    .venv/bin/python benchmarks/cnn_ptq.py [--eval 1000] [--calib 256] [--layerwise-samples 128]
        [--iterations 300] [--rows ...] [--threads 2] [--rounds 30] [--skip-onnx] [--skip-resnet]
        [--out results/cnn_ptq.json]
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


def _ort_reader(input_name: str, calib: torch.Tensor) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: calib[i : i + 16].numpy()} for i in range(0, len(calib), 16)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    return Reader()


def ort_static_best(fp32: Path, input_name: str, calib: torch.Tensor, eval_x: torch.Tensor, reference: torch.Tensor, tmp: Path) -> tuple[Path, dict[str, float]]:
    """ORT's quantize_static (QDQ, per-channel int8 weights, uint8 activations) with each of its
    calibrators; returns the file with the best top-1 agreement and every calibrator's agreement."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from ptqkit.export.ort_check import make_session

    scores: dict[str, float] = {}
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):
        path = tmp / f"ort_static_{method.name}.onnx"
        quantize_static(str(fp32), str(path), _ort_reader(input_name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
        scores[method.name] = top1_agreement(reference, _ort_logits(make_session(path, threads=2), input_name, eval_x))
    best = max(scores, key=scores.get)
    return tmp / f"ort_static_{best}.onnx", scores


def _ort_logits(session: Any, input_name: str, eval_x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.from_numpy(session.run(None, {input_name: eval_x[i : i + 32].numpy()})[0]) for i in range(0, len(eval_x), 32)])


def round_robin_ms(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median ms per run over `rounds` rounds, each round running every entry once in turn (so
    load from other processes on the machine falls on all of them alike)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def ptqkit_onnx(qmodel: torch.nn.Module, calib: torch.Tensor, x: torch.Tensor, tmp: Path, label: str) -> tuple[Path, dict[str, Any]]:
    """Output quantizers calibrated on `calib` (integer_cnn.calibrate_outputs_), then pq.export;
    returns the ONNX file and what ORT ran (kernels, float op share of its optimized graph)."""
    from ptqkit.export.integer_cnn import calibrate_outputs_, float_op_share
    from ptqkit.export.ort_check import make_session

    points = calibrate_outputs_(qmodel, pq.CalibrationData.from_tensors(calib, batch_size=32), (x[:2],))
    result = pq.export(qmodel, tmp / label, formats=["onnx"], example_inputs=(x,))
    optimized = tmp / f"{label}_optimized.onnx"
    make_session(result.files["onnx"], threads=2, optimized_path=optimized)
    info = {"kernels": result.checks["kernels"], "float_ops": float_op_share(optimized), "output_points": len(points.points),
            "left_float": list(points.refused), "ort_vs_simulated": result.checks["quantized_ort_vs_simulated"]}
    return result.files["onnx"], info


def onnx_rows(
    model: torch.nn.Module, qmodels: dict[str, torch.nn.Module], calib: torch.Tensor, eval_x: torch.Tensor, reference: torch.Tensor,
    threads: int, batch: int, rounds: int,
) -> dict[str, Any]:
    """Latency (batch `batch`, round-robin), top-1 agreement with torch FP32 on all eval crops and
    file size for ORT FP32, ORT's quantize_static (best calibrator) and each ptqkit model
    exported as a fully integer graph (output quantizers calibrated on the same crops)."""
    import onnxruntime as ort

    from ptqkit.export.onnx_graph import export_float_onnx
    from ptqkit.export.ort_check import make_session

    x = eval_x[:batch].contiguous()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        fp32 = tmp / "fp32.onnx"
        export_float_onnx(model, (x,), fp32)  # the original model
        input_name = make_session(fp32, threads=threads).get_inputs()[0].name
        peer, calibrators = ort_static_best(fp32, input_name, calib, eval_x, reference, tmp)
        files = {"ORT FP32": fp32, "ORT quantize_static (QDQ, per-channel)": peer}
        details, simulated = {}, {}
        for name, qmodel in qmodels.items():
            files[name], details[name] = ptqkit_onnx(qmodel, calib, x, tmp, f"q{len(details)}")
            with torch.inference_mode():
                simulated[name] = logits_of(qmodel, eval_x)
        sessions = {name: make_session(path, threads=threads) for name, path in files.items()}
        feed = {input_name: x.numpy()}
        runs: dict[str, Callable[[], Any]] = {"torch FP32": lambda: model(x)}
        runs |= {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
        with torch.inference_mode():
            latency = round_robin_ms(runs, rounds)
        agreement, vs_simulated = {"torch FP32": 1.0}, {}
        for name, session in sessions.items():
            logits = _ort_logits(session, input_name, eval_x)
            agreement[name] = top1_agreement(reference, logits)
            if name in simulated:
                vs_simulated[name] = top1_agreement(simulated[name], logits)
        size = {name: path.stat().st_size for name, path in files.items()}
    return {
        "batch": batch, "threads": threads, "rounds": rounds, "onnxruntime": ort.__version__, "latency_ms": latency,
        "top1_agreement_vs_fp32": agreement, "ort_vs_simulated_top1": vs_simulated,
        "simulated_top1_vs_fp32": {k: top1_agreement(reference, v) for k, v in simulated.items()},
        "ort_quantize_static_calibrators": calibrators, "file_bytes": size, "ptqkit": details,
    }


PTQKIT_ROWS = {"ptqkit W8A8 per-channel": "W8A8 per-channel", "ptqkit W8A8 CLE + analytic BC per-tensor": "+ CLE + analytic bias correction"}


def mobilenet_onnx(model: torch.nn.Module, kept: dict, table: dict, calib: torch.Tensor, eval_x: torch.Tensor, reference: torch.Tensor, args: Any) -> dict[str, Any]:
    data = pq.CalibrationData.from_tensors(calib, batch_size=32)
    qmodels = {label: kept.get(row) or pq.quantize(model, table[row], data, progress=False) for label, row in PTQKIT_ROWS.items()}
    return onnx_rows(model, qmodels, calib, eval_x, reference, args.threads, args.onnx_batch, args.rounds)


def resnet_onnx(calib: torch.Tensor, eval_x: torch.Tensor, args: Any) -> dict[str, Any]:
    """ResNet-18 with torchvision's random initialisation (seed 0), BatchNorm statistics set on
    the calibration crops, through the same ONNX table."""
    from ptqkit.models.resnet import recalibrate_batchnorm_, resnet18

    torch.manual_seed(0)
    model = recalibrate_batchnorm_(resnet18(), calib)
    reference = logits_of(model, eval_x)
    table = rows(args.iterations, args.calib, args.layerwise_samples)
    data = pq.CalibrationData.from_tensors(calib, batch_size=32)
    qmodels = {label: pq.quantize(model, table[row], data, progress=False) for label, row in PTQKIT_ROWS.items()}
    return onnx_rows(model, qmodels, calib, eval_x, reference, args.threads, args.onnx_batch, args.rounds)


def onnx_table(onnx: dict[str, Any]) -> list[list[str]]:
    base = onnx["latency_ms"]["ORT FP32"]
    return [[name, f"{ms:.2f}", f"{ms / base:.2f}", f"{onnx['top1_agreement_vs_fp32'][name]:.4f}",
             f"{onnx['file_bytes'][name] / 1e6:.2f}" if name in onnx["file_bytes"] else "-"] for name, ms in onnx["latency_ms"].items()]


def onnx_notes(onnx: dict[str, Any]) -> str:
    parts = [f"round-robin timing, median of {onnx['rounds']} rounds on a machine shared with other jobs (noisy)",
             f"ORT quantize_static calibrators (top-1): {', '.join(f'{k} {v:.4f}' for k, v in onnx['ort_quantize_static_calibrators'].items())}, the best one timed"]
    for name, info in onnx["ptqkit"].items():
        share = info["float_ops"]
        parts.append(f"{name}: kernels {info['kernels']}, {share['float_ops']} of {share['compute_ops']} compute ops float "
                     f"{share['float_op_types'] or ''}, ORT vs simulated top-1 {onnx['ort_vs_simulated_top1'][name]:.4f}")
    return "; ".join(parts) + "."


def print_onnx(label: str, onnx: dict[str, Any]) -> None:
    print(f"\n{label} in ONNX Runtime {onnx['onnxruntime']}, batch {onnx['batch']}, {onnx['threads']} threads, round-robin x{onnx['rounds']}")
    print(f"{'model':44} {'latency ms':>10} {'x ORT FP32':>10} {'top-1 vs FP32':>14} {'file MB':>8}")
    for row in onnx_table(onnx):
        print(f"{row[0]:44} {row[1]:>10} {row[2]:>10} {row[3]:>14} {row[4]:>8}")
    print(onnx_notes(onnx))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=int, default=1000, help="evaluation crops (default 1000)")
    parser.add_argument("--calib", type=int, default=256, help="calibration crops (default 256)")
    parser.add_argument("--layerwise-samples", type=int, default=128, help="calibration crops for the bias-correction and AdaRound rows")
    parser.add_argument("--iterations", type=int, default=300, help="AdaRound iterations per layer")
    parser.add_argument("--rows", nargs="*", default=None, help="MobileNetV2 rows to run (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30, help="round-robin timing rounds (each runs every model once)")
    parser.add_argument("--skip-resnet", action="store_true", help="skip the ResNet-18 ONNX table")
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
        results["onnx"] = mobilenet_onnx(model, kept, table, calib, eval_x, reference, args)
        print_onnx("MobileNetV2", results["onnx"])
        if not args.skip_resnet:
            results["onnx_resnet18"] = resnet_onnx(calib, eval_x, args)
            print_onnx("ResNet-18 (random weights, BatchNorm statistics of the calibration crops)", results["onnx_resnet18"])
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
    for key, label in (("onnx", "MobileNetV2"), ("onnx_resnet18", "ResNet-18 (random weights)")):
        if key in results:
            onnx = results[key]
            suffix = "_onnx.json" if key == "onnx" else "_onnx_resnet18.json"
            write_record(args.out.with_name(args.out.stem + suffix), make_record(
                "cnn_ptq", f"{label} in ONNX Runtime {onnx['onnxruntime']} (batch {onnx['batch']}, {onnx['threads']} threads, {args.eval} crops)",
                ["model", "latency ms", "x ORT FP32", "top-1 vs FP32", "file MB"], onnx_table(onnx), notes=onnx_notes(onnx), data=onnx))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
