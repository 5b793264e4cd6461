"""Issue 12: SmolLM2 GPTQ int4 with layer onloading against the in-memory path.

Each path runs in its own child process (a clean peak resident set): "in memory" loads the
float model and runs `pq.quantize` + `pq.save`; "onloading" runs
`ptqkit.engine.onloading.quantize_onloaded` with the weights left on disk. Both children compute the
memory plan (`ptqkit.engine.memory_plan`) first, from the config alone. Reported: predicted and
measured peak RSS, wall time, and whether both artifacts hold byte-identical tensors. Prints a
table and writes benchmarks/results/onloading.json.

    .venv/bin/python benchmarks/onloading.py [--samples 32] [--seq 256] [--batch 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "onloading.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(path: str, out: str, samples: int, seq: int, batch: int, threads: int) -> dict[str, Any]:
    """One path in this process; returns its measurements."""
    from dataclasses import replace

    import torch

    import ptqkit as pq
    from ptqkit.engine.memory_plan import plan_memory
    from ptqkit.engine.onloading import quantize_onloaded
    from ptqkit.engine.recipe import CalibrationSettings
    from ptqkit.engine.weight_store import build_skeleton
    from ptqkit.models.hf import load_hf_model, load_hf_tokenizer
    from ptqkit.models.zoo import smollm2_fp32_dir

    sys.path.insert(0, str(Path(__file__).parent))
    from llm_data import calibration_windows

    torch.set_num_threads(threads)
    model_dir = smollm2_fp32_dir()
    recipe = pq.Recipe.load(ROOT / "recipes/w4a16-gptq-llm.yaml")
    recipe = replace(recipe, calibration=CalibrationSettings(samples=samples, batch_size=batch))
    tokenizer = load_hf_tokenizer(model_dir)
    calib = pq.CalibrationData.from_tensors({"input_ids": calibration_windows(tokenizer, samples, window=seq)})
    onload = path == "onloading"
    plan = plan_memory(build_skeleton(model_dir), recipe, samples=samples, seq_len=seq, batch_size=batch, onload=onload)
    start = time.perf_counter()
    if onload:
        pq.save(quantize_onloaded(model_dir, recipe, calib, progress=False), out)
    else:
        model, _ = load_hf_model(model_dir)
        pq.save(pq.quantize(model, recipe, calib, progress=False), out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": path, "seconds": round(seconds, 1), "peak_rss_bytes": peak, "predicted_peak_bytes": plan.peak, "plan": plan.parts, "resident_at_plan": plan.baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        result = child(*args.child, args.samples, args.seq, args.batch, args.threads)
        sys.stdout.write(json.dumps(result) + "\n")
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for path in ("in memory", "onloading"):
            out = str(Path(work) / path.replace(" ", "_"))
            command = [sys.executable, __file__, "--child", path, out, "--samples", str(args.samples), "--seq", str(args.seq),
                       "--batch", str(args.batch), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{path} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        files = [(Path(work) / p / "model.safetensors").read_bytes() for p in ("in_memory", "onloading")]
        identical = files[0] == files[1]
    base = rows[0]
    lines = [f"{'path':10} {'peak MiB':>9} {'predicted':>9} {'error':>7} {'x in-memory':>11} {'seconds':>8}"]
    for row in rows:
        row["prediction_error"] = row["predicted_peak_bytes"] / row["peak_rss_bytes"] - 1
        row["peak_vs_in_memory"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        row["time_vs_in_memory"] = row["seconds"] / base["seconds"]
        lines.append(
            f"{row['path']:10} {row['peak_rss_bytes'] / 2**20:9.0f} {row['predicted_peak_bytes'] / 2**20:9.0f} "
            f"{row['prediction_error']:+7.1%} {row['peak_vs_in_memory']:11.2f} {row['seconds']:8.1f}"
        )
    lines.append(f"model.safetensors byte-identical between the paths: {identical}")
    sys.stdout.write("\n".join(lines) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M (GGUF dequantized to FP32)", "recipe": "w4a16-gptq-llm", "samples": args.samples, "seq": args.seq,
            "batch": args.batch, "threads": args.threads, "identical_artifacts": identical}
    table = [[r["path"], f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['predicted_peak_bytes'] / 2**20:.0f}", f"{r['prediction_error']:+.1%}",
              f"{r['peak_vs_in_memory']:.2f}", f"{r['seconds']:.1f}"] for r in rows]
    write_record(RESULTS, make_record(
        "onloading", f"SmolLM2 W4A16 GPTQ, {args.samples} x {args.seq} calibration tokens, each path in a fresh process",
        ["path", "peak MiB", "predicted MiB", "prediction error", "x in memory", "seconds"], table,
        notes=f"model.safetensors byte-identical between the paths: {identical}", data={"meta": meta, "rows": rows}))
    sys.stdout.write(f"wrote {RESULTS}\n")


if __name__ == "__main__":
    main()
