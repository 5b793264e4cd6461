"""Quantized modules (simulated: integer weights + QParams, fake-quantized inputs)."""
from ptqkit.nn.act_quant import InputQuantizer
from ptqkit.nn.modules import (
    QuantConv,
    QuantEmbedding,
    QuantizedModule,
    QuantLinear,
    quantized_weight,
)

__all__ = ["InputQuantizer", "QuantConv", "QuantEmbedding", "QuantizedModule", "QuantLinear", "quantized_weight"]
