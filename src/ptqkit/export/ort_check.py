"""ONNX Runtime checks of an exported graph: which kernel each quantized layer really ran on,
and numerical agreement against torch.

ORT rewrites the QDQ graph at session creation (QDQ fusion, MatMulIntegerToFloat,
DynamicQuantizeMatMul ...). `SessionOptions.optimized_model_filepath` saves the graph it will
run; each layer's int8 weight initializer is looked up there and the op consuming it decides
whether the layer runs on an integer kernel. onnxruntime is imported lazily.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ptqkit.core.errors import ExportError
from ptqkit.export.onnx_graph import ExampleInputs, flatten_example_inputs

__all__ = ["INTEGER_OPS", "LayerKernel", "cpu_has_vnni", "make_session", "run_session", "layer_kernels", "compare_outputs", "within_tolerance"]

logger = logging.getLogger(__name__)

# ORT CPU ops whose arithmetic is integer (weights consumed as integers, not dequantized first).
INTEGER_OPS = frozenset(
    {
        "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm",
        "QLinearConv", "ConvInteger", "MatMulNBits", "QAttention", "DynamicQuantizeLSTM", "GatherBlockQuantized",
    }
)


def cpu_has_vnni() -> bool:
    """True if this x86 CPU has VNNI/AMX int8 dot products (ORT's u8s8 kernels are exact there).

    Without them (plain AVX2) ORT's u8s8 path sums pairs in int16 with saturation. Non-x86
    CPUs count as True (their int8 dot products do not saturate).
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    from ptqkit.core.machine import cpu_flags

    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class LayerKernel:
    """The kernel that consumed one layer's quantized weight in ORT's optimized graph."""

    module: str
    op_type: str  # e.g. "MatMulIntegerToFloat"; "" if the weight vanished (folded to float)
    integer: bool


def make_session(
    path: str | Path, *, threads: int | None = None, optimized_path: str | Path | None = None, spinning: bool = False
) -> Any:
    """An ORT CPU session; `threads` sets intra-op threads, spinning is off unless asked."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ExportError(f"ONNX Runtime could not load {path}: {exc}") from exc


def _feeds(session: Any, example_inputs: ExampleInputs) -> dict[str, np.ndarray]:
    graph_inputs = [i.name for i in session.get_inputs()]
    flat = flatten_example_inputs(example_inputs)
    named = {k: v for k, v in flat if k is not None}
    if named:
        missing = [n for n in graph_inputs if n not in named]
        if missing:
            raise ExportError(f"graph inputs {missing} are not among example_inputs keys {sorted(named)}")
        return {n: named[n] for n in graph_inputs}
    if len(flat) != len(graph_inputs):
        raise ExportError(f"the graph takes {len(graph_inputs)} input(s) {graph_inputs}, example_inputs has {len(flat)}")
    return {n: v for n, (_, v) in zip(graph_inputs, flat)}


def run_session(session: Any, example_inputs: ExampleInputs) -> list[np.ndarray]:
    """Run `session` on the example inputs (matched by keyword name, else by position)."""
    return session.run(None, _feeds(session, example_inputs))


def layer_kernels(optimized_path: str | Path, weight_initializers: dict[str, str]) -> list[LayerKernel]:
    """For each module -> int8 weight initializer name, the op that consumes it in the optimized graph."""
    import onnx

    proto = onnx.load(str(optimized_path), load_external_data=False)
    consumers: dict[str, str] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, node.op_type)
    out = []
    for module, weight in weight_initializers.items():
        # ORT may re-lay an initializer out under a derived name ("<name>_T" for MatMulNBits)
        op = consumers.get(weight) or next((o for n, o in consumers.items() if n.startswith(weight + "_")), "")
        out.append(LayerKernel(module, op, op in INTEGER_OPS))
    return out


def compare_outputs(reference: Sequence[Any], actual: Sequence[np.ndarray]) -> dict[str, float]:
    """Max and 99th-percentile absolute difference over all outputs (reference: torch tensors or arrays).

    A NaN on either side makes `max_abs` NaN (and an Inf against a finite value, Inf), so a
    check `not max_abs <= tolerance` fails on it; the same infinity on both sides agrees.
    `ref_absmax` is the largest finite |reference| value."""
    if len(reference) != len(actual):
        raise ExportError(f"torch gave {len(reference)} output tensor(s), ONNX Runtime {len(actual)}")
    diffs, scale = [], 0.0
    for i, (ref, act) in enumerate(zip(reference, actual)):
        ref = ref.detach().cpu().float().numpy() if hasattr(ref, "detach") else np.asarray(ref, np.float32)
        act = np.asarray(act)
        if ref.shape != act.shape:
            raise ExportError(f"output {i}: torch shape {ref.shape} != ONNX Runtime shape {act.shape}")
        ref64, act64 = ref.astype(np.float64), act.astype(np.float64)
        with np.errstate(invalid="ignore"):
            diff = np.abs(ref64 - act64)
        diff[ref64 == act64] = 0.0  # equal infinities agree; NaN never equals anything
        diffs.append(diff.reshape(-1))
        finite = np.abs(ref[np.isfinite(ref)])
        scale = max(scale, float(np.max(finite)) if finite.size else 0.0)
    flat = np.concatenate(diffs) if diffs else np.zeros(1)
    with np.errstate(invalid="ignore"):
        p99 = float(np.percentile(flat, 99))
    return {"max_abs": float(flat.max()), "p99_abs": p99, "ref_absmax": scale}


def within_tolerance(difference: float, tolerance: float) -> bool:
    """`difference <= tolerance`, False for a NaN difference (a comparison that cannot fail on NaN)."""
    return bool(difference <= tolerance)
