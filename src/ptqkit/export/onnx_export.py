"""The ONNX export driver: float graph -> check vs torch -> integer rewrite -> check in ONNX Runtime.

Thin on purpose: graph capture and the module map live in `onnx_graph` (or, for a Hugging Face
causal LM with its KV cache as graph inputs/outputs, `onnx_decoder`), the rewrite in
`onnx_qdq` / `onnx_pertoken` (int8 QDQ) and `onnx_nbits` (weight-only low-bit Linear layers ->
MatMulNBits), the ORT checks in `ort_check`.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ptqkit.core.errors import ExportError

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)


def _torch_outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    from ptqkit.export.onnx_qdq import simulated_outputs

    with _no_kv_cache(model):
        return simulated_outputs(model, example_inputs)


@dataclass(frozen=True)
class _GraphPlan:
    """Which graph is captured and how it is checked: the logits-only forward on the example
    inputs, or the KV-cached decoder step (`onnx_decoder`) on a prefill and one decode step."""

    capture: Callable[[Path], Any]  # float graph -> ModelProto (saved at the path)
    cases: list[Any]  # inputs the torch and ORT outputs are compared on
    wrap: Callable[[nn.Module], nn.Module]  # the module whose outputs the graph reproduces
    prefix: str  # module "a.b" has name scope prefix + "a.b" in the graph


def _plan(float_model: nn.Module, example_inputs: Any, *, kv_cache: bool, opset: int, dynamic: bool) -> _GraphPlan:
    if not kv_cache:
        from ptqkit.export.onnx_graph import export_float_onnx

        def capture(path: Path) -> Any:
            with _no_kv_cache(float_model):
                return export_float_onnx(float_model, example_inputs, path, opset=opset, dynamic=dynamic)

        return _GraphPlan(capture, [example_inputs], lambda model: model, "")
    from ptqkit.export.onnx_decoder import (
        SCOPE_PREFIX,
        CachedDecoderStep,
        check_inputs,
        export_cached_decoder,
    )

    if not dynamic:
        raise ExportError("export: kv_cache=True needs dynamic_shapes=True (one graph for any prompt and cache length)")
    cases = check_inputs(float_model, example_inputs)  # validates the model and the prompt before the capture
    return _GraphPlan(lambda path: export_cached_decoder(float_model, path, opset=opset), cases, CachedDecoderStep, SCOPE_PREFIX)


def _outputs(plan: _GraphPlan, model: nn.Module) -> list[torch.Tensor]:
    wrapped = plan.wrap(model)
    return [t for case in plan.cases for t in _torch_outputs(wrapped, case)]


def _ort_outputs(plan: _GraphPlan, session: Any) -> list[Any]:
    from ptqkit.export.ort_check import run_session

    return [t for case in plan.cases for t in run_session(session, case)]


def _find_modules(proto: Any, names: list[str], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """`find_layer_nodes` for module names that sit under `prefix` in the graph, keyed without it."""
    from ptqkit.export.onnx_graph import find_layer_nodes

    found, missing = find_layer_nodes(proto, [prefix + name for name in names])
    n = len(prefix)
    return {k[n:]: replace(ln, module=k[n:]) for k, ln in found.items()}, {k[n:]: why for k, why in missing.items()}


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face decoders return a KV cache object by default, which the graph capture cannot
    output: export (and compare) the logits-only forward, `config.use_cache=False`."""
    config = getattr(model, "config", None)
    previous = getattr(config, "use_cache", None)
    if not previous:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = previous


def export_onnx(
    qmodel: nn.Module,
    out_dir: Path,
    example_inputs: Any,
    *,
    strict: bool = False,
    opset: int = 18,
    dynamic: bool = True,
    keep_float: bool = False,
    fp32_tolerance: float = 1e-4,
    weight_dtype: str = "auto",
    nbits: Any = None,
    kv_cache: bool = False,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Write `model.onnx` (and optionally `model.fp32.onnx`) into `out_dir`; return (layers, checks).

    `weight_dtype`: "int8", "uint8" (int8 codes + 128, zero point + 128: the same values) or
    "auto" (uint8 on x86 CPUs without VNNI, where ORT's u8s8 kernels saturate; else int8).
    `nbits`: `onnx_nbits.NBitsOptions` for weight-only low-bit Linear layers (None: defaults).
    `kv_cache`: capture a Hugging Face causal LM as the KV-cached decoder step of
    `onnx_decoder` (checked on a prefill of the example prompt and one decode step).
    """
    import onnx

    from ptqkit.engine.quantize import dequantize_model
    from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE, LayerExport
    from ptqkit.export.onnx_gather import (
        find_gather_nodes,
        gather_layout,
        gather_refusal,
        insert_gather_block_quantized,
        quantized_embeddings,
    )
    from ptqkit.export.onnx_nbits import (
        NBitsOptions,
        insert_matmul_nbits,
        nbits_layout,
        nbits_refusal,
        routes_to_nbits,
    )
    from ptqkit.export.onnx_qdq import check_exportable, insert_qdq, quantized_modules
    from ptqkit.export.ort_check import compare_outputs, cpu_has_vnni, layer_kernels, make_session

    if weight_dtype not in ("auto", "int8", "uint8"):
        raise ExportError(f"export: onnx_weight_dtype={weight_dtype!r} is unknown; valid: auto, int8, uint8")
    if nbits is None:
        nbits = NBitsOptions()
    if not isinstance(nbits, NBitsOptions):
        raise ExportError(f"export: matmul_nbits must be a ptqkit.export.onnx_nbits.NBitsOptions or None, got {type(nbits).__name__}")
    if not isinstance(kv_cache, bool):
        raise ExportError(f"export: kv_cache must be True or False, got {kv_cache!r}")
    if kv_cache:
        from ptqkit.export.onnx_decoder import decoder_shape

        decoder_shape(qmodel)  # not a causal LM with a cache: fail before anything is copied
    uint8_weights = weight_dtype == "uint8" or (weight_dtype == "auto" and not cpu_has_vnni())
    modules = quantized_modules(qmodel)
    if not modules:
        raise ExportError("export: the model has no QuantLinear/QuantConv modules; nothing to write as integer ONNX")
    nbits_modules = {name: m for name, m in modules.items() if routes_to_nbits(m, nbits)}
    qdq_modules = {name: m for name, m in modules.items() if name not in nbits_modules}
    for name, module in qdq_modules.items():
        check_exportable(name, module)  # fail before the (slow) graph capture
    nbits_refused = {name: why for name, m in nbits_modules.items() if (why := nbits_refusal(m)) is not None}
    embeddings = quantized_embeddings(qmodel)
    refused = nbits_refused | {name: why for name, m in embeddings.items() if (why := gather_refusal(m)) is not None}
    if refused and strict:
        raise ExportError(f"export (strict): {len(refused)} weight-only module(s) have no MatMulNBits/GatherBlockQuantized form: {refused}")
    float_model = dequantize_model(qmodel).eval()
    float_path = out_dir / FLOAT_ONNX_FILE
    plan = _plan(float_model, example_inputs, kv_cache=kv_cache, opset=opset, dynamic=dynamic)
    proto = plan.capture(float_path)

    checks: dict[str, Any] = {}
    if kv_cache:
        layers = (len(proto.graph.input) - 2) // 2
        checks["kv_cache"] = {
            "layers": layers, "inputs": [i.name for i in proto.graph.input][:4], "outputs": [o.name for o in proto.graph.output][:3],
            "checked_on": "prefill of the example prompt (empty cache) + one decode step",
        }
    fp32 = compare_outputs(_outputs(plan, float_model), _ort_outputs(plan, make_session(float_path)))
    checks["fp32_ort_vs_torch"] = fp32
    if fp32["max_abs"] > fp32_tolerance * max(1.0, fp32["ref_absmax"]):
        raise ExportError(
            f"export: the float ONNX graph disagrees with torch (max abs difference {fp32['max_abs']:.3g}, "
            f"tolerance {fp32_tolerance:g} x max(1, |output| max {fp32['ref_absmax']:.3g})); the graph capture is wrong"
        )
    if not keep_float:
        float_path.unlink()

    found, missing = _find_modules(proto, list(modules), plan.prefix)
    if missing and strict:
        raise ExportError(f"export (strict): {len(missing)} quantized module(s) not found in the ONNX graph: {missing}")
    kept_float = {name: found[name] for name in refused if name in found}  # float MatMul with the dequantized weight
    to_nbits = {name: ln for name, ln in found.items() if name in nbits_modules and name not in refused}
    proto, nbits_rewrites = insert_matmul_nbits(proto, to_nbits, nbits_modules, nbits)
    if to_nbits:  # node indices moved: map the QDQ modules again
        found, _ = _find_modules(proto, [name for name in found if name in qdq_modules], plan.prefix)
    proto, rewrites = insert_qdq(proto, {n: ln for n, ln in found.items() if n in qdq_modules}, qdq_modules, uint8_weights=uint8_weights)
    gathers, gather_missing = find_gather_nodes(proto, list(embeddings), plan.prefix)
    if gather_missing and strict:
        raise ExportError(f"export (strict): {len(gather_missing)} quantized embedding(s) not found in the ONNX graph: {gather_missing}")
    missing |= gather_missing
    kept_float |= {name: gathers[name] for name in refused if name in gathers}
    to_gather = {name: ln for name, ln in gathers.items() if name not in refused}
    proto, gather_rewrites = insert_gather_block_quantized(proto, to_gather, embeddings)
    rewrites = nbits_rewrites + rewrites + gather_rewrites
    checks["weight_dtype"] = "uint8" if uint8_weights else "int8"
    if nbits_modules:
        checks["matmul_nbits"] = {"accuracy_level": nbits.accuracy_level, "layers": len(nbits_rewrites), "kept_float": nbits_refused}
    onnx_path = out_dir / ONNX_FILE
    onnx.save_model(proto, str(onnx_path))

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        session = make_session(onnx_path, optimized_path=optimized)
        weights = {r.module: r.weight_initializer for r in rewrites} | {n: ln.weight_name for n, ln in kept_float.items()}
        kernels = {k.module: k for k in layer_kernels(optimized, weights)}
        quantized = compare_outputs(_outputs(plan, qmodel), _ort_outputs(plan, session))
    checks["quantized_ort_vs_simulated"] = quantized
    checks["int8_ort_vs_simulated"] = quantized  # the name before MatMulNBits (same numbers)

    layers = []
    for r in rewrites:
        k = kernels[r.module]
        note = "" if k.integer else ("weight-only: DequantizeLinear + float kernel" if r.form == "weight_only" else "fused to a float kernel")
        if r.form == "matmul_nbits":
            layout = nbits_layout(nbits_modules[r.module])
            note = f"{layout.bits}-bit, block {layout.block_size}" + (f"; {layout.note}" if layout.note else "") + (f"; {note}" if note else "")
        elif r.form == "gather_block_quantized":
            layout = gather_layout(embeddings[r.module])
            note = f"{layout.bits}-bit rows, block {layout.block_size}" + (f"; {layout.note}" if layout.note else "")
        layers.append(LayerExport(r.module, r.form, k.op_type, k.integer, note))
    layers += [LayerExport(n, "float", kernels[n].op_type, False, f"kept float: {refused[n]}") for n in kept_float]
    layers += [LayerExport(name, "not_found", "", False, why) for name, why in missing.items()]
    stayed_float = [f"{l.module} ({l.kernel or 'no kernel'}: {l.note})" for l in layers if not l.integer]
    if stayed_float:
        logger.warning("%d of %d quantized module(s) stayed float in ONNX Runtime: %s", len(stayed_float), len(layers), stayed_float)
        if strict:
            raise ExportError(f"export (strict): {len(stayed_float)} quantized module(s) did not run on an integer kernel: {stayed_float}")
    counts: dict[str, int] = {}
    for l in layers:
        counts[l.kernel or "none"] = counts.get(l.kernel or "none", 0) + 1
    checks["kernels"] = counts
    logger.info("ONNX export: %s; ORT vs simulated max abs %.3g", counts, quantized["max_abs"])
    return tuple(layers), checks
