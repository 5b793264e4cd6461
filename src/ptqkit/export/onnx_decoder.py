"""KV-cached ONNX export of Hugging Face causal LMs, and greedy decoding with ONNX Runtime.

One graph serves the prefill (an empty cache, P = 0) and the one-token decode steps (T = 1).
Batch 1, no padding; L decoder layers, H key/value heads, D head dim:

    inputs   input_ids                     int64 [1, T]
             attention_mask                int64 [1, P + T]   (all ones)
             past_key_values.{i}.key       float [1, H, P, D]  i = 0 .. L-1
             past_key_values.{i}.value     float [1, H, P, D]
    outputs  logits                        float [1, T, vocab]
             present.{i}.key               float [1, H, P + T, D]
             present.{i}.value             float [1, H, P + T, D]

`CachedDecoderStep` builds a transformers `DynamicCache` from the past tensors, calls the model
with `use_cache=True` and returns the logits and the cache's keys/values after the step (the
input keys/values with the T new positions appended). The dynamo exporter (opset 18) captures it
at T = 3, P = 5 with both lengths dynamic, so neither is specialised to 0 or 1. Positions come
from the cache length (no position_ids input): a left-padded batch is not supported.

`pq.export(qmodel, out, example_inputs=ids, kv_cache=True)` captures this graph instead of the
logits-only one and then rewrites it as usual (int8 QDQ, MatMulNBits for weight-only low-bit
Linear layers); inside the wrapper every module's name scope starts with `SCOPE_PREFIX`. Its
float check runs the example prompt as a prefill and then one decode step, in torch and in ONNX
Runtime. `OrtDecoder` runs such a graph greedily (what benchmarks/llm_decode_ort.py times).

Measured (transformers 5.23, torch 2.13, ORT 1.32): tests/unit/export/test_onnx_decoder.py.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ptqkit.core.errors import ConfigError, ExportError
from ptqkit.core.quiet import quiet_third_party
from ptqkit.models.hf_cache import cache_keyword, cached_forward, output_cache

__all__ = [
    "SCOPE_PREFIX",
    "CachedDecoderStep",
    "DecoderShape",
    "GreedyResult",
    "OrtDecoder",
    "check_inputs",
    "decoder_shape",
    "empty_past",
    "export_cached_decoder",
    "input_names",
    "output_names",
    "prompt_ids",
]

logger = logging.getLogger(__name__)

SCOPE_PREFIX = "decoder."  # module "model.layers.0.mlp.up_proj" is "decoder.model.layers.0.mlp.up_proj" in the graph
_CAPTURE_NEW, _CAPTURE_PAST = 3, 5  # example lengths for the capture: >= 2, so not specialised


@dataclass(frozen=True)
class DecoderShape:
    """What the cached graph's interface depends on."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int


def input_names(layers: int) -> list[str]:
    """Graph input names, in order: input_ids, attention_mask, past_key_values.{i}.key/value."""
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    """Graph output names, in order: logits, present.{i}.key/value."""
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _config_int(config: Any, owner: str, *names: str) -> int:
    """The first of `names` set on `config` as a positive int; ExportError naming them otherwise."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ExportError(f"kv_cache export: {owner}.config has no {' / '.join(names)}; a decoder's KV cache shape needs it")


def decoder_shape(model: nn.Module) -> DecoderShape:
    """The cache shape of a Hugging Face causal LM; ExportError naming what is missing otherwise.

    Required: a transformers `config` (decoder-only), `can_generate()`, a forward taking
    a KV cache (`cache`, or `past_key_values` before transformers 5.24) and `use_cache`, and the config fields for layers, heads and vocabulary.
    """
    owner = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError(
            f"kv_cache export: {owner} has no Hugging Face config; pass a transformers causal LM "
            "(e.g. LlamaForCausalLM), or export without kv_cache"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"kv_cache export: {owner} is an encoder-decoder model; only decoder-only causal LMs are supported")
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate():
        raise ExportError(
            f"kv_cache export: {owner} is not a causal LM (can_generate() is not True); "
            "pass a *ForCausalLM model, or export without kv_cache"
        )
    missing = [] if cache_keyword(model.forward) else ["past_key_values"]
    if "use_cache" not in inspect.signature(model.forward).parameters:
        missing.append("use_cache")
    if missing:
        raise ExportError(f"kv_cache export: {owner}.forward takes no {' / '.join(missing)} argument; it has no KV cache to export")
    layers = _config_int(config, owner, "num_hidden_layers")
    heads = _config_int(config, owner, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or _config_int(config, owner, "hidden_size") // heads
    return DecoderShape(layers, int(kv_heads), int(head_dim), _config_int(config, owner, "vocab_size"))


class CachedDecoderStep(nn.Module):
    """logits, *present = step(input_ids [1, T], attention_mask [1, P + T], *past ([1, H, P, D] x 2L)).

    `past` alternates keys and values, layer by layer; so does `present`. The model is held as
    the attribute `decoder` (module names in the graph start with `SCOPE_PREFIX`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.decoder = model
        self.layers = decoder_shape(model).layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        assert len(past) == 2 * self.layers, f"{len(past)} past tensors for {self.layers} layers"
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = cached_forward(self.decoder, cache, input_ids=input_ids, attention_mask=attention_mask)
        present: list[torch.Tensor] = []
        for layer in output_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def empty_past(shape: DecoderShape, dtype: torch.dtype = torch.float32, length: int = 0) -> list[torch.Tensor]:
    """2L zero tensors [1, H, length, D]: the cache of a prefill (length 0)."""
    return [torch.zeros(1, shape.kv_heads, length, shape.head_dim, dtype=dtype) for _ in range(2 * shape.layers)]


def export_cached_decoder(model: nn.Module, path: str | Path | None = None, *, opset: int = 18) -> Any:
    """The float KV-cached decoder graph of `model` as an `onnx.ModelProto` (also saved at `path`).

    T and P are dynamic, batch is 1; names as in the module docstring. Quantized modules are
    captured as they compute (pass `dequantize_model(qmodel)` for the graph the rewrites expect).
    """
    from torch.export import Dim

    shape = decoder_shape(model)
    dtype = _dtype(model)
    generator = torch.Generator().manual_seed(0)
    past = [torch.randn(1, shape.kv_heads, _CAPTURE_PAST, shape.head_dim, generator=generator).to(dtype) for _ in range(2 * shape.layers)]
    ids = torch.arange(1, _CAPTURE_NEW + 1).remainder(shape.vocab)[None]  # [1, T]
    mask = torch.ones(1, _CAPTURE_PAST + _CAPTURE_NEW, dtype=torch.long)  # [1, P + T]
    dynamic = ({1: Dim.AUTO}, {1: Dim.AUTO}, tuple({2: Dim.AUTO} for _ in past))
    step = CachedDecoderStep(model).eval()
    try:
        with torch.no_grad(), quiet_third_party():  # the exporter's notes on optional torchvision ops say nothing here
            program = torch.onnx.export(
                step, (ids, mask, *past), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                input_names=input_names(shape.layers), output_names=output_names(shape.layers),
                external_data=False, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; name the model and keep the cause
        raise ExportError(f"kv_cache export: torch.onnx.export(dynamo=True, opset={opset}) failed for {type(model).__name__}: {exc}") from exc
    proto = program.model_proto
    _check_interface(proto, shape, "the captured graph")
    if path is not None:
        import onnx

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(path))
    logger.info("KV-cached decoder graph: %d layers, %d nodes%s", shape.layers, len(proto.graph.node), f" -> {path}" if path else "")
    return proto


def _check_interface(proto: Any, shape: DecoderShape, where: str) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != input_names(shape.layers) or got_out != output_names(shape.layers):
        raise ExportError(
            f"kv_cache export: {where} has inputs {got_in} and outputs {got_out}; expected "
            f"{input_names(shape.layers)[:3]}... and {output_names(shape.layers)[:2]}... ({shape.layers} layers)"
        )


def prompt_ids(example_inputs: Any) -> torch.Tensor:
    """input_ids [1, T] from a tensor or a mapping with input_ids (and an all-ones attention_mask)."""
    if isinstance(example_inputs, Mapping):
        if "input_ids" not in example_inputs:
            raise ExportError(f"kv_cache export: example_inputs has keys {sorted(example_inputs)}; it needs input_ids")
        mask = example_inputs.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).eq(1).all()):
            raise ExportError("kv_cache export: example_inputs attention_mask has zeros; the cached graph takes one unpadded sequence")
        ids = example_inputs["input_ids"]
    else:
        ids = example_inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1 or ids.is_floating_point():
        what = f"a tensor of shape {tuple(ids.shape)} ({ids.dtype})" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ExportError(f"kv_cache export: example_inputs must give integer input_ids of shape [1, T >= 1] (batch 1), got {what}")
    return ids.long()


def check_inputs(float_model: nn.Module, example_inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    """Positional inputs of the cached graph for the export's checks: the example prompt as a
    prefill (empty cache), then one decode step of float_model's greedy next token on the cache
    float_model left (both compared in torch and ONNX Runtime on exactly these tensors)."""
    shape = decoder_shape(float_model)
    ids = prompt_ids(example_inputs)
    prefill = (ids, torch.ones_like(ids), *empty_past(shape, _dtype(float_model)))
    with torch.inference_mode():
        logits, *present = CachedDecoderStep(float_model)(*prefill)
    token = logits[:, -1:].argmax(-1)  # [1, 1]
    decode = (token, torch.ones(1, ids.shape[1] + 1, dtype=torch.long), *present)
    return [prefill, decode]


@dataclass(frozen=True)
class GreedyResult:
    """Greedy tokens and timings; decode_s covers the len(tokens) - 1 steps after the prefill."""

    tokens: tuple[int, ...]
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second (prefill excluded); 0 when only the prefill ran."""
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps and self.decode_s > 0 else 0.0


_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtDecoder:
    """Greedy decoding with ONNX Runtime on a KV-cached decoder graph (this module's interface).

    The graph's inputs are checked at load; layers, key/value heads and head dim are read from it.
    `threads`: intra-op threads (None: ORT's default); spinning is off unless asked.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, spinning: bool = False) -> None:
        from ptqkit.export.ort_check import make_session

        self.path = Path(path)
        self.session = make_session(path, threads=threads, spinning=spinning)
        inputs = self.session.get_inputs()
        self.layers = (len(inputs) - 2) // 2
        names = [i.name for i in inputs]
        if len(inputs) < 4 or names != input_names(self.layers):
            raise ExportError(
                f"OrtDecoder: {path} has inputs {names}; expected input_ids, attention_mask, "
                "past_key_values.{i}.key/value (export with pq.export(..., kv_cache=True) or export_cached_decoder)"
            )
        past = inputs[2]
        _, self.kv_heads, _, self.head_dim = past.shape
        if not isinstance(self.kv_heads, int) or not isinstance(self.head_dim, int) or past.type not in _ORT_FLOAT:
            raise ExportError(f"OrtDecoder: {path} input {past.name} is {past.type} {past.shape}; expected float [1, heads, past, head_dim]")
        self.dtype = _ORT_FLOAT[past.type]

    def empty_past(self) -> list[np.ndarray]:
        """The cache of a prefill: 2L arrays [1, H, 0, D]."""
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtype) for _ in range(2 * self.layers)]

    def step(self, ids: np.ndarray, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits [1, T, vocab], present) for ids [1, T] after the cached `past`."""
        mask = np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64)
        out = self.session.run(None, dict(zip(input_names(self.layers), [ids, mask, *past])))
        return out[0], out[1:]

    def greedy(self, ids: torch.Tensor | np.ndarray | Sequence[int], new_tokens: int) -> GreedyResult:
        """Prefill `ids` (one sequence), then `new_tokens - 1` one-token steps, always the top-1 token."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ConfigError(f"OrtDecoder.greedy: new_tokens={new_tokens!r}; valid: an int >= 1")
        prompt = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(1, -1)  # [1, T]
        if prompt.shape[1] == 0:
            raise ConfigError("OrtDecoder.greedy: the prompt is empty; give at least one token id")
        start = time.perf_counter()
        logits, past = self.step(prompt, self.empty_past())
        prefill = time.perf_counter() - start
        tokens = [int(logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, past = self.step(np.array([[tokens[-1]]], np.int64), past)
            tokens.append(int(logits[0, -1].argmax()))
        return GreedyResult(tuple(tokens), prefill, time.perf_counter() - start)
