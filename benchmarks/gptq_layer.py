"""Time GPTQ on SmolLM2-135M-sized Linear layers (up_proj [1536, 576], down_proj [576, 1536])
against the slow float64 reference written from the paper, and report output-error ratios.

Synthetic but realistic layers: Gaussian weights with a few outlier input columns, correlated
and unevenly scaled inputs (2,048 rows). Prints a table and writes
benchmarks/results/gptq_layer.json.

    .venv/bin/python benchmarks/gptq_layer.py [--no-reference] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.reference.gptq_reference
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402

from ptqkit.algorithms import (
    GPTQConfig,
    HessianAccumulator,
    gptq_quantize_weight,
    rtn_quantize_weight,
)
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from tests.reference.gptq_reference import reference_gptq

SHAPES = {"up_proj": (1536, 576), "down_proj": (576, 1536)}
ROWS = 2048


def make_layer(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02  # [out, in]
    w[:, torch.randperm(in_f, generator=g)[:8]] *= 6
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(ROWS, in_f, generator=g) @ (torch.eye(in_f) + 2 * mix)  # [rows, in]
    x *= torch.exp(torch.randn(in_f, generator=g) * 0.7)
    return w, x


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.double() - w_hat.double()) @ x.double().T).pow(2).sum())


def best_time(repeats: int, fn, *args, **kwargs) -> tuple[float, object]:
    """Best wall time of `repeats` calls of fn(*args, **kwargs), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the slow float64 reference"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    configs = {
        "int4 per-channel": (QuantSpec(qtype="int4", granularity=PerChannel(0)), GPTQConfig()),
        "int4 g128": (QuantSpec(qtype="int4", granularity=PerGroup(128)), GPTQConfig()),
        "int4 g128 act_order": (
            QuantSpec(qtype="int4", granularity=PerGroup(128)),
            GPTQConfig(act_order=True),
        ),
    }
    rows = []
    for layer_name, (out_f, in_f) in SHAPES.items():
        w, x = make_layer(out_f, in_f)
        acc = HessianAccumulator(in_f)
        t_hessian, _ = best_time(1, acc.update, x)
        h = acc.hessian()
        for config_name, (spec, config) in configs.items():
            t_gptq, result = best_time(args.repeats, gptq_quantize_weight, w, h, spec, config)
            t_rtn, rtn = best_time(args.repeats, rtn_quantize_weight, w, spec)
            err = output_error(w, result.dequantized, x)
            row = {
                "layer": layer_name,
                "shape": [out_f, in_f],
                "config": config_name,
                "hessian_s": t_hessian,
                "gptq_s": t_gptq,
                "rtn_s": t_rtn,
                "gptq_over_rtn_error": err / output_error(w, rtn.dequantized, x),
            }
            if not args.no_reference:
                group = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None
                t_ref, (codes, deq) = best_time(
                    1,
                    reference_gptq,
                    w.double().numpy(),
                    h.double().numpy(),
                    qmin=int(spec.qtype.qmin),
                    qmax=int(spec.qtype.qmax),
                    symmetric=spec.symmetric,
                    group_size=group,
                    act_order=config.act_order,
                    static_groups=config.act_order,
                )
                row["reference_s"] = t_ref
                row["speedup_vs_reference"] = t_ref / t_gptq
                row["code_mismatch"] = float((result.codes.double().numpy() != codes).mean())
                row["error_vs_reference"] = err / output_error(w, torch.from_numpy(deq), x)
            rows.append(row)

    header = (
        f"{'layer':<10} {'shape':<11} {'config':<20} {'gptq s':>7} {'rtn s':>7} {'ref s':>7} "
        f"{'speedup':>8} {'mismatch':>9} {'err/ref':>8} {'gptq/rtn':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        ref = r.get("reference_s")
        print(
            f"{r['layer']:<10} {shape:<11} {r['config']:<20} {r['gptq_s']:7.3f} {r['rtn_s']:7.4f} "
            + (
                f"{ref:7.2f} {r['speedup_vs_reference']:7.1f}x {r['code_mismatch']:9.2e} "
                f"{r['error_vs_reference']:8.5f} "
                if ref is not None
                else f"{'-':>7} {'-':>8} {'-':>9} {'-':>8} "
            )
            + f"{r['gptq_over_rtn_error']:9.3f}"
        )
    out = ROOT / "benchmarks" / "results" / "gptq_layer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "rows": ROWS,
    }
    table = [[r["layer"], f"{r['shape'][0]}x{r['shape'][1]}", r["config"], f"{r['gptq_s']:.3f}", f"{r['rtn_s']:.4f}",
              "-" if r.get("reference_s") is None else f"{r['reference_s']:.2f}",
              "-" if r.get("reference_s") is None else f"{r['speedup_vs_reference']:.1f}",
              "-" if r.get("reference_s") is None else f"{r['code_mismatch']:.2e}",
              "-" if r.get("reference_s") is None else f"{r['error_vs_reference']:.5f}", f"{r['gptq_over_rtn_error']:.3f}"] for r in rows]
    write_record(out, make_record(
        "gptq_layer", f"GPTQ on single layers against RTN and the reference implementation ({args.threads} threads)",
        ["layer", "shape", "config", "gptq s", "rtn s", "reference s", "x reference", "code mismatch", "error / reference", "gptq / rtn error"],
        table, data={"meta": meta, "results": rows}))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
