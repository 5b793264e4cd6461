"""LLM weight-quantization accuracy: SmolLM2-135M perplexity for FP32, RTN, GPTQ, AWQ and
AWQ+GPTQ at int4 per-channel / g128 / g64 and int3 g128, and W8A8 (static per-tensor and
dynamic per-token activations) with and without SmoothQuant.

Data (`llm_data.py`): perplexity on held-out Python documentation prose (non-overlapping
512-token windows); calibration on the "What's New" pages (disjoint documents, similar text;
the default) or on Shakespeare (`--calibration shakespeare`, a deliberate domain shift). SmolLM2's weights already lie on a
4-bit grid in blocks of 32, so group size 32 is never reported. The output head (tied to the
embeddings) stays in float, as the seeds recommend.

Each configuration runs in its own subprocess so its peak RSS (ru_maxrss) is its own; the
quantization wall time excludes model loading and evaluation. "gap recovered" is
(ppl_RTN - ppl_method) / (ppl_RTN - ppl_FP32) at the same bit width and group size.

    .venv/bin/python benchmarks/llm_ppl.py [--samples 128] [--window 512] [--eval-windows 40]
        [--calibration whatsnew|shakespeare] [--quick] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llm_data import CALIBRATION_SOURCES  # noqa: E402
from results_record import make_record, write_record  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
WEIGHTS = {"int4-pc": (4, None), "int4-g128": (4, 128), "int4-g64": (4, 64), "int3-g128": (3, 128)}
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# Not in the default table: RTN with a weight-MSE clip search, measured here to *hurt* SmolLM2
# (int4 per-channel, 16 x 256: perplexity 134.1 against plain RTN's 75.3; clipping large weights
# loses salient ones, which is why AWQ searches its clip on layer outputs instead).
EXTRA_METHODS = ("rtn-mse",)


def config_names(extra: bool = False) -> list[str]:
    names = ["fp32"]
    methods = METHODS + EXTRA_METHODS if extra else METHODS
    names += [f"{weights}/{method}" for weights in WEIGHTS for method in methods]
    names += ["w8a8-static/plain", "w8a8-static/smoothquant", "w8a8-dynamic/plain", "w8a8-dynamic/smoothquant"]
    return names


def build_recipe(name: str):
    import dataclasses

    import ptqkit as pq
    from ptqkit.algorithms import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig
    from ptqkit.core.qtypes import PerChannel, QType

    scheme_name, method = name.split("/")
    if scheme_name.startswith("w8a8"):
        preset = "w8a8" if scheme_name == "w8a8-static" else "w8a8_dynamic"
        algorithms = (SmoothQuantConfig(alpha=0.5),) if method == "smoothquant" else ()
        return pq.Recipe.from_preset(preset, keep_output_head=True, algorithms=algorithms)
    bits, group = WEIGHTS[scheme_name]
    algorithms = {
        "rtn": (),
        "rtn-mse": (RTNConfig(clip_search="mse"),),
        "gptq": (GPTQConfig(),),
        "awq": (AWQConfig(),),
        "awq+gptq": (AWQConfig(), GPTQConfig()),
    }[method]
    recipe = pq.Recipe.from_preset("w4a16", group_size=group, algorithms=algorithms)
    weights = dataclasses.replace(recipe.scheme.weights, qtype=QType.int(bits))
    if group is None:
        weights = dataclasses.replace(weights, granularity=PerChannel(0))
    return dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, weights=weights))


def run_one(name: str, windows_file: Path) -> dict:
    """Quantize with one configuration and measure perplexity (runs in a subprocess)."""
    import torch
    from llm_data import load_windows

    import ptqkit as pq
    from ptqkit.eval.metrics import perplexity
    from ptqkit.models.zoo import load_smollm2

    model, _ = load_smollm2()
    windows = load_windows(windows_file)
    seconds = 0.0
    if name != "fp32":
        data = pq.CalibrationData.from_tensors({"input_ids": windows["calibration"]})
        recipe = build_recipe(name)
        start = time.perf_counter()
        model = pq.quantize_(model, recipe, data, progress=False)
        seconds = time.perf_counter() - start
    ppl = perplexity(model, windows["eval"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": name, "ppl": ppl, "quantize_s": seconds, "peak_rss_mb": peak_mb, "threads": torch.get_num_threads()}


def run_child(name: str, windows_file: Path, timeout: float | None = None) -> dict:
    """`run_one` in a fresh process of this interpreter: its row, or {config, error}."""
    command = [sys.executable, __file__, "--child", name, "--windows-file", str(windows_file)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"config": name, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_gap_recovered(rows: list[dict]) -> None:
    by_name = {r["config"]: r for r in rows if "ppl" in r}
    fp32 = by_name.get("fp32", {}).get("ppl")
    for row in rows:
        scheme_name, _, method = row["config"].partition("/")
        rtn = by_name.get(f"{scheme_name}/rtn", {}).get("ppl")
        if fp32 and rtn and "ppl" in row and method not in ("rtn", "") and rtn > fp32:
            row["gap_recovered"] = (rtn - row["ppl"]) / (rtn - fp32)


def print_table(rows: list[dict], meta: dict) -> None:
    print(
        f"SmolLM2-135M perplexity; calibration {meta['calibration']} {meta['samples']} x {meta['window']} tokens,"
        f" eval {meta['eval_windows']} x 512 (Python docs)"
    )
    print(f"{'config':28} {'ppl':>9} {'gap rec.':>9} {'quantize s':>11} {'peak RSS MB':>12}")
    for row in rows:
        if "error" in row:
            print(f"{row['config']:28} failed: {row['error'][:80]}")
            continue
        gap = f"{row['gap_recovered']:.0%}" if "gap_recovered" in row else ""
        print(f"{row['config']:28} {row['ppl']:9.3f} {gap:>9} {row['quantize_s']:11.1f} {row['peak_rss_mb']:12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--calibration", choices=CALIBRATION_SOURCES, default="whatsnew")
    parser.add_argument("--quick", action="store_true", help="16 x 256 calibration, 8 eval windows")
    parser.add_argument("--only", nargs="*", help="configuration names (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", type=Path, help="results JSON (default results/llm_ppl_<calibration>_<N>x<T>_<eval>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--windows-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        print("\n".join(config_names(extra=True)))
        return
    if args.child:
        print(json.dumps(run_one(args.child, args.windows_file)))
        return
    if args.quick:
        args.samples, args.window, args.eval_windows = 16, 256, 8
    from llm_data import calibration_windows, eval_windows, save_windows

    from ptqkit.models.zoo import load_smollm2

    _, tokenizer = load_smollm2()
    tag = f"{args.calibration}_{args.samples}x{args.window}_{args.eval_windows}"
    windows_file = RESULTS_DIR / f"llm_ppl_windows_{tag}.safetensors"
    calibration = calibration_windows(tokenizer, args.samples, args.window, source=args.calibration)
    save_windows(windows_file, calibration=calibration, eval=eval_windows(tokenizer, args.eval_windows))
    names = args.only or config_names()
    if "fp32" not in names:
        names = ["fp32", *names]
    rows = []
    for name in names:
        if name not in config_names(extra=True):
            raise SystemExit(f"unknown configuration {name!r}; see --list")
        rows.append(run_child(name, windows_file))
        print(json.dumps(rows[-1]), flush=True)
    add_gap_recovered(rows)
    meta = {
        "calibration": args.calibration, "samples": args.samples, "window": args.window, "eval_windows": args.eval_windows,
        "machine": platform.processor() or platform.machine(), "load_average": list(__import__("os").getloadavg()),
    }
    print_table(rows, meta)
    results = args.out or RESULTS_DIR / f"llm_ppl_{tag}.json"
    table = [[r["config"], f"{r['ppl']:.3f}", f"{r['gap_recovered']:.0%}" if "gap_recovered" in r else "", f"{r['quantize_s']:.1f}",
              f"{r['peak_rss_mb']:.0f}"] for r in rows if "error" not in r]
    write_record(results, make_record(
        "llm_ppl", f"SmolLM2-135M perplexity (calibration {args.calibration} {args.samples} x {args.window} tokens, "
        f"eval {args.eval_windows} x 512 tokens of Python docs)",
        ["config", "perplexity", "gap recovered", "quantize s", "peak RSS MB"], table,
        notes="; ".join(f"{r['config']} failed: {r['error'][:200]}" for r in rows if "error" in r),
        data={"meta": meta, "results": rows}))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
