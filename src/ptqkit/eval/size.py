"""Model size: bytes of the quantized layers' weights as deployed, against their float size."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptqkit.nn.modules import QuantizedModule

__all__ = ["SizeReport", "model_size"]


@dataclass(frozen=True)
class SizeReport:
    """Weight bytes of the quantized layers (float vs deployed) and of everything else."""

    quantized_layers: int
    float_bytes: int  # the quantized layers' weights in their original float dtype
    quantized_bytes: int  # the same weights as deployed: packed codes + scales (+ zero points)
    other_bytes: int  # every other parameter and persistent buffer, at its own dtype

    @property
    def ratio(self) -> float:
        """quantized_bytes / float_bytes for the quantized layers."""
        return self.quantized_bytes / self.float_bytes if self.float_bytes else 1.0

    @property
    def total_float_bytes(self) -> int:
        return self.float_bytes + self.other_bytes

    @property
    def total_quantized_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def model_size(model: nn.Module) -> SizeReport:
    """Measure a (quantized) model. Quantized weights count at their bit width: int8 one byte,
    int4 half a byte, plus float32 scales; biases and unquantized modules count as they are."""
    layers = float_bytes = quantized_bytes = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantizedModule):
            layers += 1
            float_bytes += module.weight.numel() * module.weight.element_size()
            quantized_bytes += module.weight_nbytes()
            # codes/scales are counted above; the dequantized cache is not part of the deployed model
            counted.update(id(t) for t in (module.weight_codes, module.weight_scale, module.weight_zero_point, module.weight))
    other = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in counted:
            counted.add(id(tensor))
            other += tensor.numel() * tensor.element_size()
    return SizeReport(layers, float_bytes, quantized_bytes, other)
