"""Output fake quantization: a module's output quantized once, where an integer runtime would.

An integer CNN graph (ONNX Runtime's QLinearConv / QLinearAdd / QLinearGlobalAveragePool)
quantizes every tensor that flows between integer ops, including tensors that no quantized
layer reads as its input: a convolution's output before a residual add, the residual stream
itself (read again by the next add), the last activation before global average pooling. The
simulated model has to quantize them too, at the same place, or it computes something else.

A module's output quantizer is a static `InputQuantizer` registered as its submodule
`output_quantizer` and applied by a forward hook, so the module keeps its parameter names (a
torchvision state dict still loads) and the module tree keeps its shape. The hook is a
module-level function: it survives `copy.deepcopy` and reads the quantizer at call time.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["output_quantizers", "remove_output_quantizer_", "set_output_quantizer_"]

_ATTRIBUTE = "output_quantizer"


def _quantize_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    quantizer = getattr(module, _ATTRIBUTE, None)
    if quantizer is None or not isinstance(output, torch.Tensor):
        return output
    return quantizer(output)


def _hooked(module: nn.Module) -> bool:
    # nn.Module keeps forward hooks in `_forward_hooks` (id -> function); there is no public lookup
    return any(hook is _quantize_output for hook in module._forward_hooks.values())


def set_output_quantizer_(module: nn.Module, quantizer: nn.Module) -> None:
    """Quantize `module`'s output with `quantizer` (an `InputQuantizer`, or any tensor -> tensor
    module, e.g. an observing tap while calibrating); replaces a previous one."""
    setattr(module, _ATTRIBUTE, quantizer)
    if not _hooked(module):
        module.register_forward_hook(_quantize_output)


def remove_output_quantizer_(module: nn.Module) -> None:
    """Undo `set_output_quantizer_` (no-op on a module without one)."""
    for key in [k for k, hook in module._forward_hooks.items() if hook is _quantize_output]:
        del module._forward_hooks[key]
    if _ATTRIBUTE in module._modules:
        delattr(module, _ATTRIBUTE)


def output_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified module name -> output quantizer, for every module of `model` that has one."""
    return {
        name: getattr(module, _ATTRIBUTE)
        for name, module in model.named_modules()
        if _hooked(module) and getattr(module, _ATTRIBUTE, None) is not None
    }
