"""Simulated quantized modules: integer weights + QParams, fake-quantized inputs.

These are the single source of truth of a quantized model: exporters and packed kernels read
`weight_codes`, `weight_qparams` and `input_quantizer.qparams` from them. Weights are kept as
integer codes in the qtype's storage dtype (int4 codes in int8; packing happens on export);
the dequantized float weight is cached once for the forward pass.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.core.primitives import dequantize, quantize
from ptqkit.core.spec import QParams, QuantSpec
from ptqkit.nn.act_quant import InputQuantizer, SmoothedInputQuantizer

__all__ = ["QuantizedModule", "QuantLinear", "QuantConv", "QuantEmbedding", "InputOnly", "quantized_weight"]


def quantized_weight(weight: torch.Tensor, qparams: QParams, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of `weight` under `qparams` (round-to-nearest with the spec's rounding)."""
    return quantize(weight.detach(), qparams, spec.rounding)


class QuantizedModule(nn.Module):
    """Base of every ptqkit quantized module: holds codes, weight QParams and an optional input quantizer."""

    float_type: str = ""

    def _init_weight(
        self, weight: torch.Tensor, qparams: QParams, spec: QuantSpec, codes: torch.Tensor | None
    ) -> None:
        self.weight_spec = spec
        if codes is None:
            codes = quantized_weight(weight, qparams, spec)
        if codes.shape != weight.shape:
            raise ValueError(f"weight codes shape {tuple(codes.shape)} != weight shape {tuple(weight.shape)}")
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", qparams.scale.detach().clone())
        self.register_buffer("weight_zero_point", qparams.zero_point.detach().clone())
        self.register_buffer("_weight", dequantize(codes, qparams, dtype=weight.dtype), persistent=False)

    def drop_float_weight_(self) -> None:
        """Free the cached dequantized weight (it moves to the meta device): the module then
        holds its codes only, can be saved, and no longer runs (layer onloading)."""
        self._weight = torch.empty(self._weight.shape, dtype=self._weight.dtype, device="meta")

    @property
    def weight_qparams(self) -> QParams:
        return QParams(self.weight_scale, self.weight_zero_point, self.weight_spec.qtype, self.weight_spec.granularity)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (simulated) weight in the original float dtype and layout."""
        return self._weight

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.input_quantizer
        return x if quantizer is None else quantizer(x)

    def to_float(self) -> nn.Module:
        """An ordinary float module with the dequantized weight (input quantization dropped)."""
        raise NotImplementedError

    def _fill_float(self, module: nn.Module) -> nn.Module:
        """Copy the dequantized weight (and the bias, if any) into a fresh float `module`."""
        with torch.no_grad():
            module.weight.copy_(self._weight)
            if getattr(self, "bias", None) is not None:
                module.bias.copy_(self.bias)
        return module

    def weight_nbytes(self) -> int:
        """Bytes of the deployed weight: codes at their bit width plus scales and zero points."""
        bits = self.weight_spec.qtype.bits
        codes = (self.weight_codes.numel() * bits + 7) // 8
        params = self.weight_scale.numel() * 4
        if not self.weight_spec.symmetric:
            params += self.weight_zero_point.numel() * max(1, bits // 8)
        return codes + params


class QuantLinear(QuantizedModule):
    """y = fq(x) · Ŵᵀ + b. Also stands in for Hugging Face's GPT-2 `Conv1D` (weight transposed)."""

    float_type = "Linear"

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_qparams: QParams,
        weight_spec: QuantSpec,
        input_quantizer: InputQuantizer | None = None,
        codes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_weight(weight, weight_qparams, weight_spec, codes)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        return F.linear(x, self._weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_float(self) -> nn.Linear:
        """A float Linear (after input smoothing: the dequantized weight's input columns divided
        back by the divisors, which the quantized layer divides its input by)."""
        linear = self._fill_float(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self._weight.dtype))
        if isinstance(self.input_quantizer, SmoothedInputQuantizer):
            with torch.no_grad():
                linear.weight.div_(self.input_quantizer.divisors.to(linear.weight.dtype))
        return linear

    def extra_repr(self) -> str:
        spec = self.weight_spec
        return f"in={self.in_features}, out={self.out_features}, weights={spec.qtype.name} {type(spec.granularity).__name__}"


class QuantConv(QuantizedModule):
    """Conv1d/Conv2d with quantized weights (zeros padding) and fake-quantized input."""

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d,
        weight_qparams: QParams,
        weight_spec: QuantSpec,
        input_quantizer: InputQuantizer | None = None,
        codes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (zeros only)")
        self.float_type = type(conv).__name__
        self.conv_args: dict[str, Any] = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self._init_weight(conv.weight, weight_qparams, weight_spec, codes)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = input_quantizer
        self._conv = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv(x, self._weight.to(x.dtype), bias, **self.conv_args)

    def to_float(self) -> nn.Module:
        cls = nn.Conv1d if self.float_type == "Conv1d" else nn.Conv2d
        conv = cls(
            self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
            dtype=self._weight.dtype, **self.conv_args,
        )
        return self._fill_float(conv)

    def extra_repr(self) -> str:
        spec = self.weight_spec
        return f"{self.float_type} {self.in_channels}->{self.out_channels}, k={self.kernel_size}, weights={spec.qtype.name} {type(spec.granularity).__name__}"


class QuantEmbedding(QuantizedModule):
    """Embedding with quantized rows (weight-only: its input is indices)."""

    float_type = "Embedding"

    def __init__(self, embedding: nn.Embedding, weight_qparams: QParams, weight_spec: QuantSpec, codes: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self._init_weight(embedding.weight, weight_qparams, weight_spec, codes)
        self.input_quantizer = None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self._weight, self.padding_idx)

    def to_float(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, dtype=self._weight.dtype)
        return self._fill_float(emb)


class InputOnly(nn.Module):
    """A float module whose input is fake-quantized (a scheme with inputs but no weights)."""

    def __init__(self, module: nn.Module, input_quantizer: InputQuantizer | None) -> None:
        super().__init__()
        self.module = module
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(self.input_quantizer(x) if self.input_quantizer is not None else x, *args, **kwargs)
