"""The ONNX export driver: float graph -> check vs torch -> integer rewrite -> check in ONNX Runtime.

Thin on purpose: graph capture and the module map live in `onnx_graph` (or, for a Hugging Face
causal LM with its KV cache as graph inputs/outputs, `onnx_decoder`), each module's lowering
(route / refuse / rewrite) in `lowering`, over `onnx_qdq` / `onnx_pertoken` (int8 QDQ),
`onnx_nbits` (weight-only low-bit Linear layers -> MatMulNBits) and `onnx_gather` (embeddings ->
GatherBlockQuantized), the ORT checks in `ort_check`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ptqkit.core.errors import ExportError
from ptqkit.export.lowering import LOWERINGS, LoweringOptions, lowering_of
from ptqkit.export.options import ExportOptions

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


def _plan(float_model: nn.Module, example_inputs: Any, options: ExportOptions) -> _GraphPlan:
    opset = options.opset
    if not options.kv_cache:
        from ptqkit.export.onnx_graph import export_float_onnx

        def capture(path: Path) -> Any:
            with _no_kv_cache(float_model):
                return export_float_onnx(float_model, example_inputs, path, opset=opset, dynamic=options.dynamic_shapes)

        return _GraphPlan(capture, [example_inputs], lambda model: model, "")
    from ptqkit.export.onnx_decoder import (
        SCOPE_PREFIX,
        CachedDecoderStep,
        check_inputs,
        export_cached_decoder,
    )

    cases = check_inputs(float_model, example_inputs)  # validates the model and the prompt before the capture
    return _GraphPlan(lambda path: export_cached_decoder(float_model, path, opset=opset), cases, CachedDecoderStep, SCOPE_PREFIX)


def _outputs(plan: _GraphPlan, model: nn.Module) -> list[torch.Tensor]:
    wrapped = plan.wrap(model)
    return [t for case in plan.cases for t in _torch_outputs(wrapped, case)]


def _ort_outputs(plan: _GraphPlan, session: Any) -> list[Any]:
    from ptqkit.export.ort_check import run_session

    return [t for case in plan.cases for t in run_session(session, case)]


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


@dataclass(frozen=True)
class _Route:
    """One quantized module and the lowering it takes: `form` is "matmul_nbits" (weight-only
    low-bit Linear), "qdq" (int8 QDQ) or "gather_block_quantized" (embedding); `refusal` says
    why it has no such form and stays a float MatMul/Gather (None: it is rewritten)."""

    name: str
    module: Any
    form: str
    refusal: str | None = None


@dataclass(frozen=True)
class _Routes:
    """Every quantized module's `_Route`, Linear/Conv modules first (model order), then embeddings."""

    layers: tuple[_Route, ...]

    def modules(self, *forms: str) -> dict[str, Any]:
        return {r.name: r.module for r in self.layers if r.form in forms}

    def refused(self, *forms: str) -> dict[str, str]:
        """Module -> why it stays float, for `forms` (all forms if none given)."""
        return {r.name: r.refusal for r in self.layers if r.refusal is not None and (not forms or r.form in forms)}

    def module(self, name: str) -> Any:
        return next(r.module for r in self.layers if r.name == name)


@dataclass(frozen=True)
class _Rewritten:
    """The integer graph and what became of each quantized module in it."""

    proto: Any
    rewrites: tuple[Any, ...]  # onnx_qdq.LayerRewrite per rewritten module (MatMulNBits, QDQ, GatherBlockQuantized)
    kept_float: dict[str, Any]  # refused module -> its LayerNode: float MatMul/Gather with the dequantized weight
    missing: dict[str, str]  # module -> why it was not found in the graph

    def merged_with(self, later: _Rewritten) -> _Rewritten:
        """`later` rewrote this graph further: its proto, the records of both."""
        return _Rewritten(later.proto, self.rewrites + later.rewrites, self.kept_float | later.kept_float, self.missing | later.missing)


@dataclass(frozen=True)
class _OrtRun:
    """The integer graph in ONNX Runtime: the kernel that took each layer's weight, and the outputs vs torch."""

    kernels: dict[str, Any]  # module -> ort_check.LayerKernel
    comparison: dict[str, float]  # ort_check.compare_outputs of the ORT outputs vs the simulated model


def _check_model_for(qmodel: nn.Module, options: ExportOptions) -> None:
    """What the options ask of the model, checked before anything is copied (the options
    themselves were checked when they were built)."""
    if options.kv_cache:
        from ptqkit.export.onnx_decoder import decoder_shape

        decoder_shape(qmodel)  # not a causal LM with a cache


def _uint8_weights(weight_dtype: str) -> bool:
    from ptqkit.export.ort_check import cpu_has_vnni

    return weight_dtype == "uint8" or (weight_dtype == "auto" and not cpu_has_vnni())


def _route(qmodel: nn.Module, options: LoweringOptions, strict: bool) -> _Routes:
    """Each quantized module's lowering (`export.lowering`), checked before the (slow) graph capture:
    Linear/Conv modules in model order, then embeddings."""
    from ptqkit.export.onnx_gather import quantized_embeddings
    from ptqkit.export.onnx_qdq import quantized_modules

    modules = quantized_modules(qmodel)
    if not modules:
        raise ExportError("export: the model has no QuantLinear/QuantConv modules; nothing to write as integer ONNX")
    layers = []
    for name, module in {**modules, **quantized_embeddings(qmodel)}.items():
        lowering = lowering_of(module, options)
        lowering.check(name, module)  # fail before the (slow) graph capture
        layers.append(_Route(name, module, lowering.form, lowering.refusal(module)))
    routes = _Routes(tuple(layers))
    refused = routes.refused()
    if refused and strict:
        raise ExportError(f"export (strict): {len(refused)} weight-only module(s) have no MatMulNBits/GatherBlockQuantized form: {refused}")
    return routes


def _kv_cache_check(proto: Any) -> dict[str, Any]:
    layers = (len(proto.graph.input) - 2) // 2
    return {
        "layers": layers, "inputs": [i.name for i in proto.graph.input][:4], "outputs": [o.name for o in proto.graph.output][:3],
        "checked_on": "prefill of the example prompt (empty cache) + one decode step",
    }


def _float_graph_check(plan: _GraphPlan, float_model: nn.Module, float_path: Path, tolerance: float) -> dict[str, float]:
    """ORT on the float graph vs torch on the dequantized model; a difference over `tolerance` is a capture bug."""
    from ptqkit.export.ort_check import compare_outputs, make_session, within_tolerance

    fp32 = compare_outputs(_outputs(plan, float_model), _ort_outputs(plan, make_session(float_path)))
    if not within_tolerance(fp32["max_abs"], tolerance * max(1.0, fp32["ref_absmax"])):  # a NaN fails
        raise ExportError(
            f"export: the float ONNX graph disagrees with torch (max abs difference {fp32['max_abs']:.3g}"
            f"{' (an output holds NaN)' if math.isnan(fp32['max_abs']) else ''}, "
            f"tolerance {tolerance:g} x max(1, |output| max {fp32['ref_absmax']:.3g})); the graph capture is wrong"
        )
    return fp32


def _rewrite(proto: Any, routes: _Routes, prefix: str, options: LoweringOptions, strict: bool) -> _Rewritten:
    """Every lowering in `LOWERINGS` order rewrites its modules in turn (each finds its nodes in the
    graph the previous one left); refused modules stay float with their dequantized weight."""
    rewritten = _Rewritten(proto, (), {}, {})
    for lowering in LOWERINGS:
        modules = routes.modules(lowering.form)
        found, missing = lowering.find(rewritten.proto, list(modules), prefix)
        if missing and strict:
            raise ExportError(f"export (strict): {len(missing)} {lowering.what} not found in the ONNX graph: {missing}")
        refused = routes.refused(lowering.form)
        kept_float = {name: found[name] for name in refused if name in found}  # float MatMul/Gather, dequantized weight
        to_rewrite = {name: ln for name, ln in found.items() if name not in refused}
        proto, rewrites = lowering.rewrite(rewritten.proto, to_rewrite, modules, options)
        rewritten = rewritten.merged_with(_Rewritten(proto, tuple(rewrites), kept_float, missing))
    return rewritten


def _matmul_nbits_check(routes: _Routes, nbits: Any, rewritten: _Rewritten) -> dict[str, Any]:
    layers = sum(r.form == "matmul_nbits" for r in rewritten.rewrites)
    return {"accuracy_level": nbits.accuracy_level, "layers": layers, "kept_float": routes.refused("matmul_nbits")}


def _run_in_ort(onnx_path: Path, plan: _GraphPlan, qmodel: nn.Module, rewritten: _Rewritten) -> _OrtRun:
    """Run the saved integer graph: which kernel consumed each weight, and the outputs vs the simulated model."""
    from ptqkit.export.ort_check import compare_outputs, layer_kernels, make_session

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        session = make_session(onnx_path, optimized_path=optimized)
        weights = {r.module: r.weight_initializer for r in rewritten.rewrites} | {n: ln.weight_name for n, ln in rewritten.kept_float.items()}
        kernels = {k.module: k for k in layer_kernels(optimized, weights)}
        quantized = compare_outputs(_outputs(plan, qmodel), _ort_outputs(plan, session))
    return _OrtRun(kernels, quantized)


def _rewritten_layer(r: Any, k: Any, routes: _Routes) -> Any:
    """The `LayerExport` of rewrite `r` that ORT ran on kernel `k`."""
    from ptqkit.export.layers import LayerExport
    from ptqkit.export.onnx_gather import gather_layout
    from ptqkit.export.onnx_nbits import nbits_layout

    note = "" if k.integer else ("weight-only: DequantizeLinear + float kernel" if r.form == "weight_only" else "fused to a float kernel")
    if r.form == "matmul_nbits":
        layout = nbits_layout(routes.module(r.module))
        note = f"{layout.bits}-bit, block {layout.block_size}" + (f"; {layout.note}" if layout.note else "") + (f"; {note}" if note else "")
    elif r.form == "gather_block_quantized":
        layout = gather_layout(routes.module(r.module))
        note = f"{layout.bits}-bit rows, block {layout.block_size}" + (f"; {layout.note}" if layout.note else "")
    return LayerExport(r.module, r.form, k.op_type, k.integer, note)


def _layer_records(rewritten: _Rewritten, kernels: dict[str, Any], routes: _Routes) -> list[Any]:
    """One `LayerExport` per quantized module: rewritten, kept float, then not found."""
    from ptqkit.export.layers import LayerExport

    refused = routes.refused()
    layers = [_rewritten_layer(r, kernels[r.module], routes) for r in rewritten.rewrites]
    layers += [LayerExport(n, "float", kernels[n].op_type, False, f"kept float: {refused[n]}") for n in rewritten.kept_float]
    layers += [LayerExport(name, "not_found", "", False, why) for name, why in rewritten.missing.items()]
    return layers


def _check_integer_kernels(layers: list[Any], strict: bool) -> None:
    """Warn about (strict: refuse) quantized modules that ORT did not run on an integer kernel."""
    stayed_float = [f"{l.module} ({l.kernel or 'no kernel'}: {l.note})" for l in layers if not l.integer]
    if stayed_float:
        logger.warning("%d of %d quantized module(s) stayed float in ONNX Runtime: %s", len(stayed_float), len(layers), stayed_float)
        if strict:
            raise ExportError(f"export (strict): {len(stayed_float)} quantized module(s) did not run on an integer kernel: {stayed_float}")


def _kernel_counts(layers: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for l in layers:
        counts[l.kernel or "none"] = counts.get(l.kernel or "none", 0) + 1
    return counts


def export_onnx(
    qmodel: nn.Module,
    out_dir: Path,
    example_inputs: Any,
    options: ExportOptions,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Write `model.onnx` (and, with `options.keep_float`, `model.fp32.onnx`) into `out_dir`;
    return (layers, checks).

    `options.onnx_weight_dtype`: "int8", "uint8" (int8 codes + 128, zero point + 128: the same
    values) or "auto" (uint8 on x86 CPUs without VNNI, where ORT's u8s8 kernels saturate; else
    int8). `options.matmul_nbits`: weight-only low-bit Linear layers. `options.kv_cache`: capture
    a Hugging Face causal LM as the KV-cached decoder step of `onnx_decoder` (checked on a
    prefill of the example prompt and one decode step).
    """
    import onnx

    from ptqkit.engine.quantize import dequantize_model
    from ptqkit.export.layers import FLOAT_ONNX_FILE, ONNX_FILE
    from ptqkit.nn.output_quant import output_quantizers

    _check_model_for(qmodel, options)
    strict, nbits = options.strict, options.matmul_nbits
    uint8_weights = _uint8_weights(options.onnx_weight_dtype)
    lowering = LoweringOptions(nbits, uint8_weights, output_quantizers(qmodel))
    routes = _route(qmodel, lowering, strict)
    float_model = dequantize_model(qmodel).eval()
    float_path = out_dir / FLOAT_ONNX_FILE
    plan = _plan(float_model, example_inputs, options)
    proto = plan.capture(float_path)

    checks: dict[str, Any] = {"kv_cache": _kv_cache_check(proto)} if options.kv_cache else {}
    checks["fp32_ort_vs_torch"] = _float_graph_check(plan, float_model, float_path, options.fp32_tolerance)
    if not options.keep_float:
        float_path.unlink()

    rewritten = _rewrite(proto, routes, plan.prefix, lowering, strict)
    checks["weight_dtype"] = "uint8" if uint8_weights else "int8"
    if routes.modules("matmul_nbits"):
        checks["matmul_nbits"] = _matmul_nbits_check(routes, nbits, rewritten)
    onnx_path = out_dir / ONNX_FILE
    onnx.save_model(rewritten.proto, str(onnx_path))

    ort = _run_in_ort(onnx_path, plan, qmodel, rewritten)
    checks["quantized_ort_vs_simulated"] = ort.comparison
    checks["int8_ort_vs_simulated"] = ort.comparison  # the name before MatMulNBits (same numbers)

    layers = _layer_records(rewritten, ort.kernels, routes)
    _check_integer_kernels(layers, strict)
    checks["kernels"] = counts = _kernel_counts(layers)
    logger.info("ONNX export: %s; ORT vs simulated max abs %.3g", counts, ort.comparison["max_abs"])
    return tuple(layers), checks
