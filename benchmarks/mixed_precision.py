"""Mixed precision (issue 11), first part: is the per-layer latency table a good model of the
whole model's latency? For uniform and mixed per-layer formats on MiniLM (batch x 128 tokens),
the predicted latency (float model - its Linears in fp32 + the assigned layers, each measured
alone and cached) against the latency measured end to end, in one run, same thread count.

    .venv/bin/python benchmarks/mixed_precision.py [--threads 2] [--batch 8] [--search] [--max-degradation 0.01]
        [--time-limit S] [--out results/mixed_precision.json]

With --search, the per-layer search (`ptqkit.mixed_precision.search`) on MiniLM: embedding cosine on stdlib
docstrings, every point measured end to end, the chosen point against the best uniform one.

With --smollm2, the search on SmolLM2-135M instead: perplexity on Python documentation windows,
latency of a decode step (one token; `decode_step_input`), per-layer degradations from the
weight-SQNR proxy (`layer_costs="proxy"`), or measured (`--layer-costs measured`: one evaluation
per layer and format, 211 x 2 with `--formats int8_wo,int4_g64`).

    .venv/bin/python benchmarks/mixed_precision.py --smollm2 [--max-degradation 2.0] [--stride 40] [--windows 6]
        [--layer-costs proxy|measured] [--formats int8_wo,int4_g128,int4_g64] [--holdout]

With --holdout the points within the budget are measured again on as many held-out windows (other
documentation pages) and must stay within the budget there too.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "mixed_precision.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402


def search_record(data: dict, title: str) -> dict:
    """The result record of one search: a row per measured point, fastest first."""
    front = set(data["front"])
    rows = [[p["name"], f"{p['metric']:.4f}", "-" if p["holdout_degradation"] is None else f"{p['holdout_degradation']:+.4f}",
             f"{p['measured_ms']:.2f}", f"{p['predicted_ms']:.2f}", f"{p['float_ms']:.2f}", f"{p['float_ms'] / p['measured_ms']:.2f}",
             f"{p['weight_bytes'] / 1e6:.2f}", "*" if p["name"] in front else ""]
            for p in sorted(data["points"], key=lambda p: p["measured_ms"])]
    chosen = data["chosen"]["name"] if data["chosen"] else None
    return make_record("mixed_precision", title,
                       ["point", data["metric"], "held-out degradation", "ms", "predicted ms", "float ms", "x float", "MB", "front"], rows,
                       notes=f"chosen: {chosen} {data['why_none'] or ''}; against uniform: {data['versus_uniform']}; "
                             f"proxy rank correlation: {data['proxy_rank_correlation']}", data=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--search", action="store_true", help="also run the per-layer search on MiniLM")
    parser.add_argument("--max-degradation", type=float, default=0.01, help="search budget: 1 - embedding cosine")
    parser.add_argument("--eval-texts", type=int, default=64)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=None, help="search wall-time limit in seconds")
    parser.add_argument("--smollm2", action="store_true", help="run the search on SmolLM2 (perplexity, decode-step latency)")
    parser.add_argument("--windows", type=int, default=6, help="SmolLM2: evaluation windows of 128 tokens")
    parser.add_argument("--layer-costs", choices=("proxy", "measured"), default="proxy",
                        help="SmolLM2: per-layer degradations from the weight-SQNR proxy, or measured (one evaluation per layer and format)")
    parser.add_argument("--formats", default="int8_wo,int4_g128,int4_g64", help="SmolLM2: candidate formats")
    parser.add_argument("--holdout", action="store_true", help="SmolLM2: check the points within the budget on held-out windows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.smollm2:
        out = args.out if args.out != RESULTS else RESULTS.with_name("mixed_precision_smollm2.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_record(out, search_record(run_search_smollm2(args), f"SmolLM2 per-layer search (decode step, budget {args.max_degradation})"))
        print(f"wrote {out}")
        return

    from ptqkit.mixed_precision.formats import apply_assignment, format_module
    from ptqkit.mixed_precision.latency import LatencyTable, linear_rows, measure_ms
    from ptqkit.models.zoo import load_minilm

    model, tokenizer = load_minilm()
    example = dict(tokenizer(["calibration text " * 60] * args.batch, truncation=True, max_length=args.tokens, padding="max_length", return_tensors="pt"))
    rows_seen = linear_rows(model, example)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ffn = [n for n in linears if "intermediate" in n or ("output.dense" in n and "attention" not in n)]
    configs = {
        "all int8_wo": {n: "int8_wo" for n in linears},
        "all int8_dyn": {n: "int8_dyn" for n in linears},
        "FFN int8_dyn, rest fp32": {n: "int8_dyn" for n in ffn},
        "all int4_g128": {n: "int4_g128" for n in linears if not isinstance(format_module(model.get_submodule(n), "int4_g128"), str)},
        "FFN int4_g128, attention int8_wo": {n: ("int4_g128" if n in ffn else "int8_wo") for n in linears},
        "FFN int8_wo, rest fp32": {n: "int8_wo" for n in ffn},
    }
    with tempfile.TemporaryDirectory() as tmp:
        table = LatencyTable(Path(tmp) / "latency.json", threads=args.threads, reps=args.reps)
        float_ms = measure_ms(model, example, threads=args.threads, reps=args.reps)
        rows = {"fp32": {"predicted_ms": float_ms, "measured_ms": float_ms}}
        for name, assignment in configs.items():
            predicted = table.predict_ms(model, assignment, example, rows_seen, float_ms=float_ms)
            measured = measure_ms(apply_assignment(model, assignment), example, threads=args.threads, reps=args.reps)
            rows[name] = {"predicted_ms": predicted, "measured_ms": measured, "layers": len(assignment)}
    print(f"MiniLM, batch {args.batch} x {args.tokens} tokens, {args.threads} threads ({table.measured} layer micro-benchmarks)")
    print(f"{'config':36} {'predicted ms':>13} {'measured ms':>12} {'error':>7} {'vs fp32':>8}")
    for name, row in rows.items():
        row["error"] = row["predicted_ms"] / row["measured_ms"] - 1
        row["speedup_vs_fp32"] = float_ms / row["measured_ms"]
        print(f"{name:36} {row['predicted_ms']:13.1f} {row['measured_ms']:12.1f} {row['error']:+7.1%} {row['speedup_vs_fp32']:7.2f}x")
    results = {"threads": args.threads, "batch": args.batch, "tokens": args.tokens, "rows": rows}
    if args.search:
        results["search"] = run_search(model, tokenizer, example, args)
    table_rows = [[name, f"{row['predicted_ms']:.1f}", f"{row['measured_ms']:.1f}", f"{row['error']:+.1%}", f"{row['speedup_vs_fp32']:.2f}"]
                  for name, row in rows.items()]
    write_record(args.out, make_record(
        "mixed_precision", f"MiniLM per-layer latency table against end-to-end latency (batch {args.batch} x {args.tokens} tokens, {args.threads} threads)",
        ["config", "predicted ms", "measured ms", "error", "x fp32"], table_rows, data=results))
    if args.search:
        write_record(args.out.with_name(args.out.stem + "_search.json"),
                     search_record(results["search"], f"MiniLM per-layer search (budget {args.max_degradation})"))
    print(f"wrote {args.out}")


def run_search_smollm2(args) -> dict:
    """The search on SmolLM2: perplexity (budget: `--max-degradation` perplexity points), decode-step latency."""
    import ptqkit as pq
    from ptqkit.eval.metrics import token_windows
    from ptqkit.mixed_precision.search import decode_step_input, search
    from ptqkit.models import corpora
    from ptqkit.models.zoo import load_smollm2

    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, corpora.python_doc_texts(400, seed=1), window=128, max_windows=args.windows)
    data = pq.CalibrationData.from_tensors({"input_ids": windows}, batch_size=2)
    searched = set(corpora.python_doc_texts(400, seed=1))
    unseen = [text for text in corpora.python_doc_texts(600, seed=0) if text not in searched]  # paragraphs the search never reads
    held_out = token_windows(tokenizer, unseen, window=128, max_windows=args.windows)
    holdout = pq.CalibrationData.from_tensors({"input_ids": held_out}, batch_size=2) if args.holdout else None
    with tempfile.TemporaryDirectory() as tmp:
        result = search(
            model, data, example=decode_step_input(data), max_degradation=args.max_degradation, table_path=Path(tmp) / "latency.json",
            formats=tuple(args.formats.split(",")), threads=args.threads, stride=args.stride, max_samples=len(windows),
            time_limit_s=args.time_limit, layer_costs=args.layer_costs, holdout_data=holdout, progress=True,
        )
    return _print_search(result, args, "SmolLM2 decode step (1 token)", "ppl")


def _print_search(result, args, what: str, label: str) -> dict:
    """Print the measured points, the front, the choice and the best uniform point; return the JSON."""
    print(f"\n{what}: {result.metric}, budget degradation <= {args.max_degradation} (float {result.float_metric:.4f}, "
          f"{result.float_ms:.2f} ms, {result.float_bytes / 1e6:.1f} MB of Linear weights); {len(result.points)} points measured end to end")
    print(f"{'point':22} {label:>8} {'held-out':>9} {'ms':>8} {'pred ms':>8} {'error':>7} {'float ms':>9} {'speedup':>8} {'MB':>7} {'front':>6}")
    front = {p.name for p in result.front}
    for p in sorted(result.points, key=lambda p: p.measured_ms):
        held = "" if p.holdout_degradation is None else f"{p.holdout_degradation:+.4f}"
        print(f"{p.name:22} {p.metric:8.4f} {held:>9} {p.measured_ms:8.2f} {p.predicted_ms:8.2f} {p.predicted_ms / p.measured_ms - 1:+7.1%} "
              f"{p.float_ms:9.2f} {p.speedup:7.2f}x {p.weight_bytes / 1e6:7.2f} {'*' if p.name in front else '':>6}")
    checked = any(p.holdout_degradation is not None for p in result.points)
    uniform = [p for p in result.points if p.name.startswith("uniform") and p.within(args.max_degradation, checked)]
    best_uniform = min(uniform, key=lambda p: p.measured_ms) if uniform else None
    smallest_uniform = min(uniform, key=lambda p: p.weight_bytes) if uniform else None
    print(f"data-free proxy (weight SQNR) vs measured per-layer degradation, Spearman: {result.proxy_rank_correlation}")
    print(f"chosen: {result.chosen.name if result.chosen else None} {result.why_none}")
    print(f"against uniform: {result.versus_uniform}")
    print(f"fastest uniform within budget: {best_uniform.name if best_uniform else None}; "
          f"smallest: {smallest_uniform.name if smallest_uniform else None}")
    return {**result.to_dict(), "best_uniform": best_uniform.name if best_uniform else None,
            "smallest_uniform": smallest_uniform.name if smallest_uniform else None}


def run_search(model: torch.nn.Module, tokenizer, example, args) -> dict:
    """The search on MiniLM: embedding cosine on stdlib docstrings, budget `--max-degradation`."""
    import ptqkit as pq
    from ptqkit.examples.minilm import stdlib_doc_texts
    from ptqkit.mixed_precision.search import search

    texts = stdlib_doc_texts(args.eval_texts)
    data = pq.CalibrationData.from_text(texts, tokenizer, max_length=128, batch_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        result = search(
            model, data, example=example, max_degradation=args.max_degradation, table_path=Path(tmp) / "latency.json",
            formats=("int8_dyn", "int8_wo", "int4_g128"), threads=args.threads, stride=args.stride, max_samples=len(texts),
            time_limit_s=args.time_limit, progress=False,
        )
    return _print_search(result, args, "MiniLM", "cosine")


if __name__ == "__main__":
    main()
