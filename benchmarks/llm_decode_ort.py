"""LLM decode in ONNX Runtime: SmolLM2-135M, batch 1, greedy, ORT FP32 vs ptqkit W4A16 on MatMulNBits.

The decoder is exported with its KV cache as graph inputs/outputs (one graph for prefill, with an
empty cache, and for decode steps) by the library: `ptqkit.export.onnx_decoder.export_cached_decoder`
for FP32, and `pq.export(qmodel, ..., kv_cache=True, matmul_nbits=NBitsOptions(accuracy_level=L),
strict=True)` for int4, which rewrites every Linear of the decoder layers to MatMulNBits and
checks the graph in ONNX Runtime (prefill + one decode step vs torch). Greedy decoding in ORT is
`ptqkit.export.onnx_decoder.OrtDecoder`.

The lm_head (49152 x 576, tied to the embeddings: 113 MB read per token in FP32, more than the
30 decoder layers in int4) is varied with `--heads`: `fp32` (the w4a16 preset keeps the output
head float), `int8` (a per-channel int8 override, written as 8-bit MatMulNBits) and `int4` (the
same group size as the decoder layers). `--embeddings` does the same for the embedding table
(FP32 by default; int8/int4 export as GatherBlockQuantized: a smaller file, not a faster step).

For each configuration: decode tokens/s (prefill excluded), prefill latency of the prompt, greedy
agreement with torch FP32 (first diverging position; teacher-forced top-1 on FP32's own
continuation) and with ptqkit's simulated model in torch, perplexity of the graph that ran on
held-out Python documentation windows (`llm_data.eval_windows`; w4a16 is data-free), and the ONNX file size. All
sessions use the same `intra_op_num_threads`, spinning off; configurations run round-robin in
one process, best of `--rounds`. One thread by default: on this 2-core machine, shared with other
jobs, torch with 2 threads fell from 37 to 10 tok/s (a 2-layer model) whenever another process
took a core (OpenMP workers waiting for a descheduled peer).

    .venv/bin/python benchmarks/llm_decode_ort.py [--tokens 128] [--threads 1] [--groups 128 64] [--rounds 3]
        [--heads fp32 int8 int4] [--embeddings fp32 int8 int4] [--ppl-windows 4]
        [--onnx-dir DIR]   (keeps the exported graphs there and reuses them on the next run)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from llm_data import eval_windows  # noqa: E402
from llm_decode import (  # noqa: E402
    PROMPT,
    greedy,
    load_model,
    memory_bandwidth_gbs,
    teacher_forced_agreement,
    weight_bytes_per_token,
)

import ptqkit as pq  # noqa: E402
from ptqkit.core.qtypes import PerChannel  # noqa: E402
from ptqkit.core.spec import QuantSpec  # noqa: E402
from ptqkit.engine.recipe import Override, Scheme  # noqa: E402
from ptqkit.eval.metrics import perplexity  # noqa: E402
from ptqkit.export import REPORT_FILE, NBitsOptions  # noqa: E402
from ptqkit.export.onnx_decoder import OrtDecoder, export_cached_decoder  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_decode_ort.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_record import make_record, write_record  # noqa: E402

HEADS = ("fp32", "int8", "int4")


def int4_recipe(group: int, head: str, embedding: str = "fp32") -> pq.Recipe:
    """w4a16 with group size `group`; the lm_head and the embedding each float (`fp32`), int8 per
    channel (per row), or int4 in groups like the rest."""
    int8 = Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0)))
    overrides = []
    if head == "int8":
        overrides.append(Override(match=("lm_head",), scheme=int8))
    if embedding == "int8":
        overrides.append(Override(match=("model.embed_tokens",), scheme=int8))
    targets = ("Linear", "Embedding") if embedding != "fp32" else ("Linear",)
    return pq.Recipe.from_preset(
        "w4a16", group_size=group, keep_output_head=head == "fp32", targets=targets, overrides=tuple(overrides)
    )


def export_int4(qmodel: nn.Module, out: Path, ids: torch.Tensor, level: int) -> dict[str, int]:
    """The KV-cached int4 graph at `out`/model.onnx (kept from a previous run if there); ORT kernel counts.
    int8 weight-only layers (an int8 lm_head) go to 8-bit MatMulNBits too."""
    if not (out / "model.onnx").exists():
        options = NBitsOptions(accuracy_level=level, int8=True)
        pq.export(qmodel, out, example_inputs=ids, kv_cache=True, matmul_nbits=options, strict=True)
    kernels: dict[str, int] = {}
    for layer in json.loads((out / REPORT_FILE).read_text())["layers"]:
        kernels[layer["kernel"]] = kernels.get(layer["kernel"], 0) + 1
    return kernels


def teacher_forced(decoder: OrtDecoder, ids: torch.Tensor, reference: list[int]) -> float:
    """Top-1 agreement with `reference` when the graph reads FP32's own continuation (one prefill)."""
    full = torch.cat([ids, torch.tensor([reference[:-1]])], dim=1).numpy()  # [1, P + T - 1]
    logits, _ = decoder.step(full, decoder.empty_past())
    top1 = logits[0, ids.shape[1] - 1 :].argmax(-1)  # [T]
    return float((top1 == np.array(reference)).mean())


def ort_perplexity(decoder: OrtDecoder, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of the graph, one prefill per window [n, T]."""
    total, count = 0.0, 0
    for window in windows:
        logits, _ = decoder.step(window[None].numpy(), decoder.empty_past())
        nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits[0, :-1]).double(), window[1:], reduction="sum")
        total, count = total + float(nll), count + len(window) - 1
    return float(np.exp(total / count))


def graph_weight_bytes_per_token(path: Path) -> int:
    """Bytes of initializers one decode step reads: all of them except embedding tables (one row read)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    gathers = ("Gather", "GatherBlockQuantized")  # table (and block scales / zero points): one row read
    gather_tables = {name for node in graph.node if node.op_type in gathers for i, name in enumerate(node.input) if i != 1}
    other_uses = {name for node in graph.node if node.op_type not in gathers for name in node.input}
    total = 0
    for tensor in graph.initializer:
        if tensor.name in gather_tables and tensor.name not in other_uses:
            continue
        total += int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return total


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra_op_num_threads and torch threads")
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 64], help="int4 group sizes (w4a16 preset, symmetric)")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 4], help="MatMulNBits accuracy levels")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS), help="lm_head precision (with each group)")
    parser.add_argument("--embeddings", nargs="+", choices=HEADS, default=["fp32"], help="embedding table precision (GatherBlockQuantized)")
    parser.add_argument("--ppl-windows", type=int, default=4, help="512-token Python documentation windows for perplexity (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes; the best tok/s of each is kept")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (a smoke test)")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="keep (and reuse) the exported graphs here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bandwidth = memory_bandwidth_gbs()
    model, tokenizer = load_model()
    model.config.use_cache = True
    if args.layers is not None:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    work = args.onnx_dir or Path(tempfile.mkdtemp(prefix="llm_decode_ort-"))
    work.mkdir(parents=True, exist_ok=True)
    tag = f"L{model.config.num_hidden_layers}"

    torch_runs: dict[str, nn.Module] = {"torch fp32": model}
    ort_runs: dict[str, tuple[OrtDecoder, dict]] = {}
    start = time.perf_counter()
    path = work / f"{tag}_fp32.onnx"
    if not path.exists():
        export_cached_decoder(model, path)
    ort_runs["ORT fp32"] = (OrtDecoder(path, threads=args.threads), {"onnx_mb": path.stat().st_size / 1e6, "kernels": {}})
    print(f"exported fp32 in {time.perf_counter() - start:.0f} s", flush=True)
    simulated_of: dict[str, str] = {}
    for group in args.groups:
        for head, embedding in [(h, e) for h in args.heads for e in args.embeddings]:
            start = time.perf_counter()
            qmodel = pq.quantize(model, int4_recipe(group, head, embedding), progress=False)
            what = f"{head} head" + ("" if embedding == "fp32" else f" {embedding} emb")
            simulated = f"torch int4 g{group} {what} (simulated)"
            torch_runs[simulated] = qmodel
            for level in args.levels:
                out = work / f"{tag}_int4_g{group}_{head}head_{embedding}emb_acc{level}"
                kernels = export_int4(qmodel, out, ids, level)
                path = out / "model.onnx"
                label = f"ORT int4 g{group} acc{level} {what}"
                simulated_of[label] = simulated
                ort_runs[label] = (OrtDecoder(path, threads=args.threads), {"onnx_mb": path.stat().st_size / 1e6, "kernels": kernels})
            print(f"exported int4 g{group} {what} in {time.perf_counter() - start:.0f} s: {kernels}", flush=True)
    windows = None
    if args.ppl_windows:
        windows = eval_windows(tokenizer, args.ppl_windows)

    # warm-up, then round-robin best-of-rounds
    for run in torch_runs.values():
        greedy(run, ids, 4)
    for decoder, _ in ort_runs.values():
        decoder.greedy(ids, 4)
    best: dict[str, float] = {}
    prefill: dict[str, float] = {}
    generated: dict[str, list[int]] = {}
    for round_ in range(args.rounds):
        for label, run in torch_runs.items():
            tokens, seconds = greedy(run, ids, args.tokens)
            best[label] = max(best.get(label, 0.0), (args.tokens - 1) / seconds)
            generated[label] = tokens
            print(f"round {round_}: {label:40s} {(args.tokens - 1) / seconds:7.1f} tok/s", flush=True)
        for label, (decoder, _) in ort_runs.items():
            run = decoder.greedy(ids, args.tokens)
            tokens, seconds = list(run.tokens), run.decode_s
            best[label] = max(best.get(label, 0.0), (args.tokens - 1) / seconds)
            prefill[label] = min(prefill.get(label, float("inf")), run.prefill_s)
            generated[label] = tokens
            print(f"round {round_}: {label:40s} {(args.tokens - 1) / seconds:7.1f} tok/s", flush=True)

    reference = generated["torch fp32"]
    results = []
    for label in list(torch_runs) + list(ort_runs):
        tokens = generated[label]
        simulated = generated[simulated_of[label]] if label in simulated_of else None
        if label in ort_runs:
            decoder, info = ort_runs[label]
            tf = teacher_forced(decoder, ids, reference)
            ppl = ort_perplexity(decoder, windows) if windows is not None else None
            nbytes = graph_weight_bytes_per_token(decoder.path)
        else:
            tf, info = teacher_forced_agreement(torch_runs[label], ids, reference), {}
            ppl = perplexity(torch_runs[label], windows) if windows is not None else None
            nbytes = weight_bytes_per_token(torch_runs[label])
        results.append({
            "config": label,
            "tokens_per_s": best[label],
            "prefill_ms": prefill[label] * 1e3 if label in prefill else None,
            "first_divergence_vs_fp32": first_divergence(tokens, reference),
            "teacher_forced_top1_vs_fp32": tf,
            "perplexity": ppl,
            "weight_mb_per_token": nbytes / 1e6,
            "bandwidth_fraction": nbytes * best[label] / 1e9 / bandwidth,
            "first_divergence_vs_simulated_int4": first_divergence(tokens, simulated) if simulated else None,
            "text": tokenizer.decode(tokens[:24]),
            **info,
        })
    ort_fp32 = best["ORT fp32"]
    torch_fp32 = best["torch fp32"]
    print(f"\nSmolLM2-135M decode, batch 1, prompt {ids.shape[1]} tokens, {args.tokens} greedy tokens, {args.threads} threads, "
          f"best of {args.rounds} rounds (load average before {load_before[0]:.1f}), memcpy bandwidth {bandwidth:.1f} GB/s")
    print(f"{'config':40s} {'tok/s':>7s} {'x ORT32':>7s} {'x torch':>7s} {'prefill':>8s} {'div@fp32':>8s} {'TF top1':>7s} {'ppl':>6s} {'div@sim':>7s} {'MB':>6s} {'MB/tok':>6s} {'BW':>5s}")
    for r in results:
        r["speedup_vs_ort_fp32"] = r["tokens_per_s"] / ort_fp32
        r["speedup_vs_torch_fp32"] = r["tokens_per_s"] / torch_fp32
        pre = f"{r['prefill_ms']:6.1f}ms" if r["prefill_ms"] is not None else "       -"
        sim = r["first_divergence_vs_simulated_int4"]
        print(
            f"{r['config']:40s} {r['tokens_per_s']:7.1f} {r['speedup_vs_ort_fp32']:7.2f} {r['speedup_vs_torch_fp32']:7.2f} {pre} "
            f"{r['first_divergence_vs_fp32']:8d} {r['teacher_forced_top1_vs_fp32']:7.3f} {r['perplexity'] or float('nan'):6.2f} {'-' if sim is None else sim:>7} "
            f"{r.get('onnx_mb', float('nan')):6.0f} {r['weight_mb_per_token']:6.1f} {r['bandwidth_fraction']:5.2f}"
        )
    import onnxruntime

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": "llm_decode_ort",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to FP32); lm_head tied to the embeddings",
        "perplexity": f"{0 if windows is None else len(windows)} windows x 512 tokens of Python documentation (llm_data.eval_windows)",
        "graph": "KV-cached decoder (DynamicCache built from past tensors), torch.onnx dynamo opset 18, batch 1: "
                 "ptqkit.export.onnx_decoder (pq.export(kv_cache=True) for int4)",
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.tokens,
        "threads": args.threads,
        "memcpy_bandwidth_gbs": bandwidth,
        "ort_session": {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1, "allow_spinning": 0, "graph_optimization": "ORT_ENABLE_ALL"},
        "rounds": args.rounds,
        "decoder_layers": model.config.num_hidden_layers,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    table = [[r["config"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_ort_fp32']:.2f}", f"{r['speedup_vs_torch_fp32']:.2f}",
              "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}", r["first_divergence_vs_fp32"], f"{r['teacher_forced_top1_vs_fp32']:.3f}",
              "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}", r["first_divergence_vs_simulated_int4"],
              "-" if r.get("onnx_mb") is None else f"{r['onnx_mb']:.0f}", f"{r['weight_mb_per_token']:.1f}"] for r in results]
    write_record(RESULTS, make_record(
        "llm_decode_ort", f"SmolLM2-135M decode in ONNX Runtime (batch 1, prompt {ids.shape[1]} tokens, {args.tokens} greedy tokens, "
        f"{args.threads} threads, best of {args.rounds} rounds)",
        ["config", "tok/s", "x ORT FP32", "x torch FP32", "prefill ms", "first token unlike FP32", "teacher-forced top-1", "perplexity",
         "first token unlike simulated int4", "ONNX MB", "MB/token"], table,
        notes=f"memcpy bandwidth {bandwidth:.1f} GB/s; onnxruntime {onnxruntime.__version__}. {data['perplexity']}.", data=data))
    print(f"wrote {RESULTS}")
    if args.onnx_dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
