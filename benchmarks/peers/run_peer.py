"""One peer quantization run on a causal LM, in the peers' own environment (.venv-peers).

Started by `benchmarks/llm_peers.py`; does not import ptqkit. Reads the token windows that script
saved (safetensors: `calibration` [N, T] and `eval` [M, 512] int64), quantizes the FP32 model
with one tool, and writes one JSON row to `--out`:

- `quantize_s`: wall time of the tool's quantization call alone (model loading excluded);
- `peak_rss_mib`: ru_maxrss of this process at the end (load + quantize + evaluation), and
  `load_rss_mib` the same counter right after loading the FP32 model;
- `ppl`: exp(mean next-token cross-entropy) over every predicted token of every eval window,
  one window [1, 512] at a time, logits[:, :-1] against ids[:, 1:] (as ptqkit.eval.metrics).

What is evaluated is the model as the tool returns it, in torch: llm-compressor's modules hold
the GPTQ/AWQ-quantized weights and fake-quantize them on each forward; NNCF's model holds packed
integer weights and a decompression hook that dequantizes them on each forward. Both compute
the matmuls in FP32 on the dequantized weights, so the perplexity is that of the quantized
weights (no kernel effects). The token embedding (tied to lm_head in SmolLM2) stays FP32 in
every configuration.

    .venv-peers/bin/python benchmarks/peers/run_peer.py --tool llmcompressor-gptq --scheme g128 \
        --windows W.safetensors --model DIR --out row.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("run_peer")

TOOLS = ("fp32", "llmcompressor-gptq", "llmcompressor-awq", "nncf", "nncf-awq-se")
WEIGHT_FIELDS = ("num_bits", "symmetric", "strategy", "group_size", "actorder", "observer")
SCHEMES = {"g128": 128, "channel": None}  # INT4 symmetric weights, group size (None = per output channel)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of every window."""
    total_nll, total_tokens = 0.0, 0
    for ids in windows.split(1):  # [1, T]
        logits = model(input_ids=ids).logits.float()  # [1, T, V]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def adjusted_group_size(columns: int, group_size: int) -> int:
    """NNCF's ADJUST rule: the largest power of two <= group_size dividing `columns` (576 -> 64)."""
    size = group_size
    while columns % size:
        size //= 2
    return size


def llmcompressor_groups(model, group_size: int | None) -> dict:
    """compressed-tensors config groups: INT4 symmetric, per channel or per group of input columns.

    compressed-tensors needs the group size to divide the input width (576 = 4.5 x 128: both
    its observers and its fake-quant forward fail on a shorter last group), so layers whose
    width 128 does not divide get NNCF's adjusted group size (64 for SmolLM2's 576-wide layers;
    its 1536-wide down_proj keeps 128). lm_head (tied to the embedding) stays FP32.
    """
    base = {"num_bits": 4, "type": "int", "symmetric": True}
    if group_size is None:
        return {"channel": {"targets": ["Linear"], "weights": base | {"strategy": "channel"}}}
    targets: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            targets.setdefault(adjusted_group_size(module.in_features, group_size), []).append(name)
    return {
        f"group_{size}": {"targets": names, "weights": base | {"strategy": "group", "group_size": size}}
        for size, names in targets.items()
    }


def llmcompressor_quantize(model, model_dir: Path, method: str, group_size: int | None, calibration: torch.Tensor) -> dict:
    """GPTQ or AWQ through `llmcompressor.oneshot` on pre-tokenized windows, in their saved order."""
    from datasets import Dataset
    from llmcompressor import oneshot

    groups = llmcompressor_groups(model, group_size)
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:  # AWQ smoothing, then round-to-nearest with the smoothed weights (the tool's recipe)
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    ids = calibration.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    oneshot(
        model=model,
        tokenizer=str(model_dir),
        recipe=recipe,
        dataset=dataset,
        num_calibration_samples=len(ids),
        max_seq_length=calibration.shape[1],
        shuffle_calibration_samples=False,
    )
    return {"settings": {"modifiers": [type(m).__name__ for m in recipe], "weights": applied_weight_args(model)}}


def applied_weight_args(model) -> dict[str, int]:
    """How many modules got each weight quantization (as compressed-tensors attached it)."""
    def text(value) -> str:
        return str(getattr(value, "value", value))  # some fields are enums, some plain strings

    applied = Counter()
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is not None:
            applied[" ".join(f"{key}={text(getattr(args, key))}" for key in WEIGHT_FIELDS)] += 1
    return dict(applied)


def nncf_quantize(model, group_size: int | None, calibration: torch.Tensor, data_aware: bool):
    """`nncf.compress_weights` INT4_SYM, ratio 1.0, embedding and lm_head kept FP32 (backup NONE)."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedCompressionParameters,
        GroupSizeFallbackMode,
    )

    # The torch backend traces the model with the dataset's first item even when data-free.
    items = [{"input_ids": row[None]} for row in (calibration if data_aware else calibration[:1])]
    # NNCF needs the group size to divide the input width; ADJUST gives the 576-wide layers
    # groups of 64 (the largest power of two dividing 576), the same as llmcompressor_groups.
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    settings = dict(
        mode=nncf.CompressWeightsMode.INT4_SYM,
        ratio=1.0,
        group_size=group_size or -1,
        backup_mode=nncf.BackupMode.NONE,
        dataset=nncf.Dataset(items),
        subset_size=len(items),
        awq=data_aware,
        scale_estimation=data_aware,
        advanced_parameters=advanced,
    )
    model = nncf.compress_weights(model, **settings)
    shown = {k: str(v) for k, v in settings.items() if k not in ("dataset", "advanced_parameters")}
    shown["group_size_fallback_mode"] = "adjust"
    return model, {"settings": shown}


def run(tool: str, scheme: str, windows_path: Path, model_dir: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    windows = load_file(str(windows_path))
    calibration, evaluation = windows["calibration"], windows["eval"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    row: dict = {"load_rss_mib": round(max_rss_mib(), 1)}
    start = time.perf_counter()
    if tool == "llmcompressor-gptq":
        row |= llmcompressor_quantize(model, model_dir, "gptq", SCHEMES[scheme], calibration)
    elif tool == "llmcompressor-awq":
        row |= llmcompressor_quantize(model, model_dir, "awq", SCHEMES[scheme], calibration)
    elif tool in ("nncf", "nncf-awq-se"):
        model, info = nncf_quantize(model, SCHEMES[scheme], calibration, data_aware=tool == "nncf-awq-se")
        row |= info
    row["quantize_s"] = round(time.perf_counter() - start, 2) if tool != "fp32" else None
    row["quantize_rss_mib"] = round(max_rss_mib(), 1)
    start = time.perf_counter()
    row["ppl"] = perplexity(model, evaluation)
    row["eval_s"] = round(time.perf_counter() - start, 2)
    row["peak_rss_mib"] = round(max_rss_mib(), 1)
    return row


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "nncf"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=TOOLS, required=True)
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="g128")
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    row = {"tool": args.tool, "scheme": args.scheme, "versions": versions(), "threads": torch.get_num_threads()}
    try:
        row |= run(args.tool, args.scheme, args.windows, args.model)
    except Exception as error:  # a peer's failure is a result row, not a crash of the benchmark
        logger.error("%s %s failed:\n%s", args.tool, args.scheme, traceback.format_exc())
        row |= {"error": f"{type(error).__name__}: {error}"[:2000], "peak_rss_mib": round(max_rss_mib(), 1)}
    args.out.write_text(json.dumps(row, indent=2))
    logger.info("%s", {k: v for k, v in row.items() if k not in ("recipe", "versions")})
    raise SystemExit(1 if "error" in row else 0)


if __name__ == "__main__":
    main()
