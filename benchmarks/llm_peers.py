"""Peer quantization tools on SmolLM2-135M, on exactly the tokens ptqkit's LLM benchmarks use.

This script (product venv) converts/locates the FP32 SmolLM2 directory, cuts the calibration and
eval windows with `benchmarks/llm_data.py`, saves them to safetensors, and runs every peer
configuration in its own process in the peers' venv (`benchmarks/peers/setup_venv.sh` creates
`.venv-peers`): `benchmarks/peers/run_peer.py`, which does not import ptqkit. Its docstring says
what is measured and evaluated: quantization wall time, peak RSS of the child process, and
perplexity of the model exactly as the tool returns it (dequantized weights, FP32 matmuls).

Every configuration is INT4 symmetric weight-only on all decoder Linear layers; embedding and
lm_head (tied) stay FP32. "g128" cannot be the same grouping as ptqkit's `PerGroup(128)` (four
groups of 128 and one of 64 on a 576-wide row): neither peer accepts a group size that does not
divide the input width, so both use NNCF's adjustment, groups of 64 on the 576-wide layers
(q/k/v/o/gate/up) and 128 on down_proj (1536 wide). The peers' g128 is therefore finer.

| name | what |
|---|---|
| fp32 | the unquantized model, evaluated in the peers' venv (and once here with ptqkit's metric) |
| llmcompressor-gptq/{g128,channel} | `oneshot` + `GPTQModifier`, groups or per channel; tool defaults otherwise (actorder static, dampening 0.01, block 128, min-max observer) |
| llmcompressor-awq/g128 | `AWQModifier` (known to fail without a GPU: tried once, `--awq-timeout`) |
| nncf/{g128,channel} | `nncf.compress_weights` INT4_SYM, ratio 1.0, backup mode NONE, data-free |
| nncf-awq-se/{g128,channel} | the same with awq=True, scale_estimation=True on the calibration windows (subset_size = all); measured peak RSS 8.5 GB for g128 at 32 x 512 (12-15 GB reported at 128 x 512), so run last and only with `--min-free-gib` available |

The same run then quantizes with ptqkit (`--ptqkit`, configuration names of `llm_ppl.py`) on the
same windows, each in its own product-venv process (`llm_ppl.run_child`), so ptqkit's rows sit
beside the peers' under the same load. Calibration is the "What's New" prose by default
(`--calibration shakespeare` for the domain-shifted source; see `llm_data.py`).

A failing, timed-out or skipped configuration becomes a row with its error; the run goes on.
Each child's JSON row and log are kept in `results/<JSON name>_rows/`; the 1-minute load
average after each row is recorded because other jobs may share the 2 cores.

    .venv/bin/python benchmarks/llm_peers.py [--samples 128] [--window 512] [--quick] [--only NAME ...]
        [--calibration whatsnew|shakespeare] [--ptqkit CONFIG ...]

`--quick` is a smoke test: 16 calibration windows of 256 tokens and 8 eval windows.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_data import CALIBRATION_SOURCES, calibration_windows, eval_windows, save_windows  # noqa: E402
from llm_ppl import run_child  # noqa: E402
from results_record import make_record, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RUN_PEER = ROOT / "benchmarks" / "peers" / "run_peer.py"
PTQKIT_CONFIGS = ("int4-pc/rtn", "int4-pc/gptq", "int4-pc/awq+gptq", "int4-g128/rtn", "int4-g128/gptq", "int4-g128/awq+gptq")

# (tool, scheme, heavy): heavy configurations need --min-free-gib of available memory.
CONFIGS = [
    ("fp32", "g128", False),
    ("llmcompressor-gptq", "g128", False),
    ("llmcompressor-gptq", "channel", False),
    ("llmcompressor-awq", "g128", False),
    ("nncf", "g128", False),
    ("nncf", "channel", False),
    ("nncf-awq-se", "g128", True),
    ("nncf-awq-se", "channel", True),
]

logger = logging.getLogger("llm_peers")


def config_name(tool: str, scheme: str) -> str:
    return tool if tool == "fp32" else f"{tool}/{scheme}"


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_peer(tool: str, scheme: str, windows: Path, model_dir: Path, timeout: float, rows_dir: Path) -> dict:
    """One configuration in a child process of the peers' venv; any failure becomes `error`."""
    name = config_name(tool, scheme)
    out = rows_dir / f"{name.replace('/', '_')}.json"
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [str(PEER_PYTHON), str(RUN_PEER), "--tool", tool, "--scheme", scheme,
               "--windows", str(windows), "--model", str(model_dir), "--out", str(out)]
    logger.info("%s: running (timeout %.0f s, log %s)", name, timeout, log)
    start = time.perf_counter()
    with log.open("w") as stream:
        try:
            code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s (log: {log})"}
    row = json.loads(out.read_text()) if out.is_file() else {}
    row["child_s"] = round(time.perf_counter() - start, 1)
    if not out.is_file():
        tail = log.read_text().strip().splitlines()[-3:]
        reason = f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit code {code}"
        row["error"] = f"{reason}: {' | '.join(tail)}"
    return row


def run_ptqkit(name: str, windows: Path, timeout: float) -> dict:
    """One ptqkit configuration of `llm_ppl.py` in a product-venv child on the same windows."""
    logger.info("ptqkit %s: running", name)
    row = run_child(name, windows, timeout)
    if "error" in row:
        return {"error": row["error"]}
    return {"ppl": row["ppl"], "quantize_s": row["quantize_s"], "peak_rss_mib": row["peak_rss_mb"]}


def fp32_reference(model_dir: Path, evaluation: torch.Tensor) -> float:
    """FP32 perplexity with ptqkit's own metric in this venv: checks the peers' evaluation."""
    from transformers import AutoModelForCausalLM

    from ptqkit.eval.metrics import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.inference_mode():
        return perplexity(model, evaluation)


def table(rows: list[dict]) -> str:
    lines = [f"{'config':<36} {'ppl':>8} {'quantize s':>10} {'peak RSS MiB':>12} {'load':>5}  error", "-" * 90]
    for row in rows:
        ppl = f"{row['ppl']:.3f}" if row.get("ppl") else "-"
        seconds = f"{row['quantize_s']:.1f}" if row.get("quantize_s") is not None else "-"
        rss = f"{row['peak_rss_mib']:.0f}" if row.get("peak_rss_mib") else "-"
        load = f"{row['loadavg_1min']:.1f}" if "loadavg_1min" in row else "-"
        error = (row.get("error") or "")[:100]
        lines.append(f"{row['name']:<36} {ppl:>8} {seconds:>10} {rss:>12} {load:>5}  {error}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-windows", type=int, default=40, help="512-token eval windows")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 x 256 calibration, 8 eval windows")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"configs to run, of: {[config_name(t, s) for t, s, _ in CONFIGS]}")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per configuration")
    parser.add_argument("--awq-timeout", type=float, default=300, help="seconds for llm-compressor AWQ")
    parser.add_argument("--min-free-gib", type=float, default=16, help="available memory needed for nncf-awq-se")
    parser.add_argument("--calibration", choices=CALIBRATION_SOURCES, default="whatsnew")
    parser.add_argument("--ptqkit", nargs="*", default=list(PTQKIT_CONFIGS), metavar="CONFIG", help="ptqkit rows (llm_ppl.py names)")
    parser.add_argument("--out", type=Path, help="JSON path (default results/llm_peers[_quick].json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.samples, args.window, args.eval_windows = 16, 256, 8
    out = args.out or RESULTS / f"llm_peers_{args.calibration}{'_quick' if args.quick else ''}.json"
    known = {config_name(t, s) for t, s, _ in CONFIGS}
    if args.only and not set(args.only) <= known:
        parser.error(f"--only: unknown {sorted(set(args.only) - known)}; known: {sorted(known)}")
    if not PEER_PYTHON.is_file():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `bash benchmarks/peers/setup_venv.sh` first")

    from transformers import AutoTokenizer

    from ptqkit.models.zoo import smollm2_fp32_dir

    model_dir = smollm2_fp32_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = calibration_windows(tokenizer, args.samples, args.window, source=args.calibration)  # [N, T]
    evaluation = eval_windows(tokenizer, max_windows=args.eval_windows)  # [M, 512]
    windows = RESULTS / f"llm_peers_windows_{args.calibration}_{args.samples}x{args.window}_{len(evaluation)}.safetensors"
    save_windows(windows, calibration=calibration, eval=evaluation)
    logger.info("calibration %s, eval %s, saved to %s", tuple(calibration.shape), tuple(evaluation.shape), windows)

    rows = [{"name": "fp32 (ptqkit metric, product venv)", "ppl": fp32_reference(model_dir, evaluation)}]
    for tool, scheme, heavy in CONFIGS:
        name = config_name(tool, scheme)
        if args.only and name not in args.only:
            continue
        free = available_gib()
        if heavy and free < args.min_free_gib:
            row = {"error": f"skipped: {free:.1f} GiB available < --min-free-gib {args.min_free_gib:g}"}
        else:
            timeout = args.awq_timeout if tool == "llmcompressor-awq" else args.timeout
            row = run_peer(tool, scheme, windows, model_dir, timeout, out.with_name(f"{out.stem}_rows"))
        # Other jobs may share the cores: the 1-minute load average at the end of each row.
        rows.append({"name": name, **row, "loadavg_1min": os.getloadavg()[0]})
        logger.info("%s: %s", name, {k: row.get(k) for k in ("ppl", "quantize_s", "peak_rss_mib", "error")})
    for name in args.ptqkit:
        row = run_ptqkit(name, windows, args.timeout)
        rows.append({"name": f"ptqkit {name}", **row, "loadavg_1min": os.getloadavg()[0]})
        logger.info("ptqkit %s: %s", name, row)

    print(table(rows))
    result = {
        "model": "SmolLM2-135M-Instruct (FP32, dequantized from the Q4_1 GGUF)",
        "calibration": {"source": args.calibration, "windows": args.samples, "tokens_per_window": args.window},
        "eval": {"source": "python docs", "windows": len(evaluation), "tokens_per_window": evaluation.shape[1]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "rows": rows,
    }
    table_rows = [[r["name"], f"{r['ppl']:.3f}" if r.get("ppl") else "-", f"{r['quantize_s']:.1f}" if r.get("quantize_s") is not None else "-",
                   f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-", f"{r['loadavg_1min']:.1f}" if "loadavg_1min" in r else "-",
                   (r.get("error") or "")[:200]] for r in rows]
    write_record(out, make_record(
        "llm_peers", f"SmolLM2-135M with the peers (calibration {args.calibration} {args.samples} x {args.window} tokens, "
        f"eval {len(evaluation)} x {evaluation.shape[1]} tokens of Python docs)",
        ["config", "perplexity", "quantize s", "peak RSS MiB", "load (1 min)", "error"], table_rows, data=result))
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
