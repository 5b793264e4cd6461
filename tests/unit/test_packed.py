"""Packed weight-only modules on torch CPU kernels vs the simulated QuantLinear and a float64 reference."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError
from ptqkit.core.primitives import qparams_from_tensor
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Override, Recipe, Scheme
from ptqkit.export.pack import fastest_float_dtype, pack
from ptqkit.nn.modules import QuantLinear
from ptqkit.nn.packed import (
    CastLinear,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    int4_refusal,
    int8_dynamic_refusal,
    int8_refusal,
)

# Tolerances (bf16 activations, fp32 accumulation, bf16 output):
# vs a float64 reference that uses the same bf16-rounded x, scales and zeros: the only errors left are
# fp32 accumulation and the final bf16 rounding of y (relative 2^-9 = 0.2% of |y|), so 1% of max |y|.
# vs the simulated fp32 QuantLinear: x is also rounded to bf16 (2^-9 relative per element, random-walk
# over K terms) and so are the scales. Measured here: every comparison below <= 0.53% of max |y|.
REF_TOL = 0.01
SIM_TOL = 0.02


def _linear(k: int, n: int, seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, n, bias=bias)).eval()


def _quantize(model: nn.Module, weights: QuantSpec) -> nn.Module:
    return pq.quantize(model, Recipe(scheme=Scheme(weights=weights)), progress=False)


def _ref_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 x_bf16 · wᵀ + b_bf16 with w given in float64."""
    y = x.to(torch.bfloat16).double() @ w.t()
    if bias is not None:
        y = y + bias.to(torch.bfloat16).double()
    return y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:


    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("k,n", [(64, 48), (576, 192), (48, 5)])
def test_int8_packed_matches_reference_and_simulation(k: int, n: int) -> None:
    qmodel = _quantize(_linear(k, n), QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True))
    sim: QuantLinear = qmodel[0]
    packed = pack(qmodel)
    assert isinstance(packed[0], Int8WeightOnlyLinear)
    x = torch.randn(3, 7, k)
    y = packed(x)
    assert y.shape == (3, 7, n) and y.dtype == torch.float32
    w = sim.weight_codes.double() * sim.weight_scale.to(torch.bfloat16).double()[:, None]  # bf16 scales
    assert _rel(y, _ref_bf16(x, w, sim.bias)) < REF_TOL
    assert _rel(y, sim(x)) < SIM_TOL


@pytest.mark.parametrize("group,k,n,qtype,symmetric", [
    (32, 64, 32, "int4", True),
    (64, 576, 192, "int4", True),
    (128, 256, 48, "uint4", False),
    (256, 512, 16, "int4", False),
])
def test_int4_packed_matches_reference_and_simulation(group: int, k: int, n: int, qtype: str, symmetric: bool) -> None:
    spec = QuantSpec(qtype=qtype, granularity=PerGroup(group), symmetric=symmetric)
    qmodel = _quantize(_linear(k, n, seed=group), spec)
    sim: QuantLinear = qmodel[0]
    packed = pack(qmodel)
    assert isinstance(packed[0], Int4WeightOnlyLinear)
    x = torch.randn(5, k)
    y = packed(x)
    # Independent reference in the kernel's own convention: q in [0, 15], w = (q - 8)·s + z, with s and z
    # rounded to bf16 as the kernel holds them.
    q = sim.weight_codes.double() - sim.weight_spec.qtype.qmin
    s = sim.weight_scale.double()
    z = (sim.weight_spec.qtype.qmin + 8 - sim.weight_zero_point.double()) * s
    s16 = s.to(torch.bfloat16).double().repeat_interleave(group, dim=1)  # [N, K]
    z16 = z.to(torch.bfloat16).double().repeat_interleave(group, dim=1)
    w = (q - 8) * s16 + z16
    assert _rel(y, _ref_bf16(x, w, sim.bias)) < REF_TOL
    assert _rel(y, sim(x)) < SIM_TOL
    # the dequantized weight agrees with ptqkit's exactly before bf16 rounding
    w64 = (q - 8) * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
    torch.testing.assert_close(w64, sim.weight.double(), rtol=0, atol=1e-6)


def test_unsupported_layers_stay_simulated_and_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 32)).eval()
    spec = QuantSpec(qtype="int4", granularity=PerGroup(128), symmetric=True)
    qmodel = _quantize(model, spec)
    with caplog.at_level(logging.WARNING, logger="ptqkit.export.pack"):
        packed = pack(qmodel)
    report = packed.ptqkit_pack_report
    kernels = {layer.name: layer.kernel for layer in report.layers}
    assert kernels == {"0": "simulated", "2": "simulated", "4": "simulated"}
    reasons = {layer.name: layer.reason for layer in report.simulated}
    assert "in_features=576 is not a multiple of the group size 128 (4.5 groups)" in reasons["0"]
    assert "in_features=64 is not a multiple of the group size 128" in reasons["2"]
    assert "576" in caplog.text and "stays on the simulated path" in caplog.text
    assert isinstance(packed[0], QuantLinear)
    x = torch.randn(2, 576)
    torch.testing.assert_close(packed(x), qmodel(x), rtol=0, atol=0)  # the simulated path is unchanged
    with pytest.raises(ConfigError, match=r"strict=True.*3 layer\(s\).*0: in_features=576"):
        pack(qmodel, strict=True)


def test_mixed_model_reports_every_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 16), nn.Linear(16, 8)).eval()
    recipe = Recipe(
        scheme=Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0))),
        ignore=("3",),
        overrides=(
            Override(match=("1",), scheme=Scheme(weights=QuantSpec(qtype="int4", granularity=PerGroup(32)))),
            Override(match=("2",), scheme=Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=False))),
        ),
    )
    qmodel = pq.quantize(model, recipe, progress=False)
    packed = pack(qmodel, float_linear_dtype=torch.bfloat16)
    by_name = {l.name: l for l in packed.ptqkit_pack_report.layers}
    assert by_name["0"].kernel == "int8_weight_only"
    assert by_name["1"].kernel == "int4_grouped"
    assert by_name["2"].kernel == "simulated" and "asymmetric" in by_name["2"].reason
    assert by_name["3"].kernel == "float_linear" and isinstance(packed[3], CastLinear)
    x = torch.randn(4, 64)
    assert _rel(packed(x), qmodel(x)) < SIM_TOL


def test_refusals_name_the_constraint() -> None:
    def ql(k: int, n: int, weights: QuantSpec, inputs: bool = False) -> QuantLinear:
        recipe = Recipe(scheme=Scheme(weights=weights, inputs=QuantSpec(qtype="uint8", granularity=pq.PerToken(), symmetric=False, dynamic=True) if inputs else None))
        return pq.quantize(_linear(k, n), recipe, progress=False)[0]

    int8 = QuantSpec(qtype="int8", granularity=PerChannel(0))
    assert int8_refusal(ql(64, 16, int8)) is None
    assert "not a multiple of 16" in int8_refusal(ql(36, 16, int8))
    assert "not a multiple of 16" in int8_refusal(ql(40, 16, int8))  # K = 40 crashed bf16 on AVX512-BF16
    assert "not weight-only" in int8_refusal(ql(64, 16, int8, inputs=True))
    assert "per-channel (axis 0)" in int8_refusal(ql(64, 16, QuantSpec(qtype="int8", granularity=PerGroup(32))))
    assert "signed 8-bit" in int8_refusal(ql(64, 16, QuantSpec(qtype="uint8", granularity=PerChannel(0))))
    int4 = QuantSpec(qtype="int4", granularity=PerGroup(32))
    assert int4_refusal(ql(64, 16, int4)) is None
    assert "multiple of 16" in int4_refusal(ql(64, 24, int4))
    assert "group size 16" in int4_refusal(ql(64, 16, QuantSpec(qtype="int4", granularity=PerGroup(16))))
    assert "per_group" in int4_refusal(ql(64, 16, QuantSpec(qtype="int4", granularity=PerChannel(0))))
    assert "fp8_e4m3" in int4_refusal(ql(64, 16, QuantSpec(qtype="fp8_e4m3", granularity=PerChannel(0))))


def test_pack_errors() -> None:
    qmodel = _quantize(_linear(64, 16), QuantSpec(qtype="int8", granularity=PerChannel(0)))
    with pytest.raises(ConfigError, match=r"backend 'onnx' is unknown; valid: torch"):
        pack(qmodel, backend="onnx")
    with pytest.raises(ConfigError, match=r"activation_dtype=torch.int8 is not supported"):
        pack(qmodel, activation_dtype=torch.int8)
    with pytest.raises(ConfigError, match=r"Sequential has no ptqkit quantized modules"):
        pack(_linear(64, 16))
    with pytest.raises(ConfigError, match=r"float_linear_dtype='fast' is not supported; valid: None, 'fastest', torch.bfloat16"):
        pack(qmodel, float_linear_dtype="fast")


def test_fastest_float_dtype_measures_both_16_bit_formats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 512)).eval()
    qmodel = pq.quantize(model, Recipe(scheme=Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0))), ignore=("1",)), progress=False)
    packed = pack(qmodel, float_linear_dtype="fastest")
    head = packed[1]
    assert isinstance(head, CastLinear) and head.activation_dtype in (torch.bfloat16, torch.float16)
    reason = {l.name: l.reason for l in packed.ptqkit_pack_report.layers}["1"]
    assert f"float layer run in {head.activation_dtype}, the faster here (one row, 512 x 32: bfloat16 " in reason
    assert "float16" in reason.split("bfloat16", 1)[1]  # both timings are reported
    x = torch.randn(3, 64)
    assert _rel(packed(x), qmodel(x)) < SIM_TOL  # 16-bit head weights and activations (module comment)
    dtype, timings = fastest_float_dtype(model[1], reps=2)
    assert set(timings) == {"bfloat16", "float16"} and all(ms > 0 for ms in timings.values())
    assert dtype == min((torch.bfloat16, torch.float16), key=lambda d: timings[str(d).removeprefix("torch.")])


def test_pack_returns_a_copy_and_fp32_activations_work() -> None:
    qmodel = _quantize(_linear(64, 32), QuantSpec(qtype="int4", granularity=PerGroup(32)))
    packed = pack(qmodel, activation_dtype=torch.float32)
    assert isinstance(qmodel[0], QuantLinear)
    x = torch.randn(3, 64)
    assert _rel(packed(x), qmodel(x)) < 1e-3  # fp32 activations and scales: only accumulation order differs


def _dynamic_emulation(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """float64 reference of the dynamic int8 kernel: x quantized per tensor, asymmetric, to 7 bits
    ([0, 127], range widened to include 0), exact integer products, then both scales."""
    x = x.double()
    low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (high - low) / 127
    zero = min(127, max(0, round(-low / scale)))
    xq = torch.clamp(torch.round(x / scale) + zero, 0, 127)
    return ((xq - zero) @ codes.double().t()) * scale * scales.double().reshape(1, -1) + bias.double()


@pytest.mark.parametrize(("k", "n", "outlier"), [(384, 1536, 1.0), (1536, 384, 1.0), (100, 36, 1.0), (384, 1536, 30.0)])
def test_int8_dynamic_matches_an_exact_emulation(k: int, n: int, outlier: float) -> None:
    """The kernel computes exactly the 7-bit per-tensor scheme it documents (no int16 saturation:
    with 8-bit activations this AVX2 kernel was 5-15% off the same emulation), on shapes that are
    not multiples of 8 too and with an outlier input channel."""
    torch.manual_seed(0)
    linear = nn.Linear(k, n)
    spec = QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=True)
    module = QuantLinear(linear.weight.detach(), linear.bias, qparams_from_tensor(linear.weight.detach(), spec), spec)
    packed = Int8DynamicLinear(module)
    x = torch.randn(3, 20, k)
    x[..., 3] *= outlier
    with torch.no_grad():
        got = packed(x).double()
    reference = _dynamic_emulation(x.reshape(-1, k), module.weight_codes, module.weight_scale, linear.bias.detach()).reshape(3, 20, n)
    assert got.shape == (3, 20, n)
    error = float((got - reference).abs().max() / reference.abs().max())
    assert error < 1e-3, error  # measured <= 1e-7 (rounding ties of the activation codes aside)


def test_int8_dynamic_refusals() -> None:
    linear = nn.Linear(64, 32)
    weight = linear.weight.detach()
    asymmetric = QuantSpec(qtype="int8", granularity=PerChannel(0), symmetric=False)
    grouped = QuantSpec(qtype="int8", granularity=PerGroup(32), symmetric=True)
    four_bit = QuantSpec(qtype="int4", granularity=PerChannel(0), symmetric=True)
    for spec, reason in ((asymmetric, "asymmetric"), (grouped, "per-channel"), (four_bit, "signed 8-bit")):
        module = QuantLinear(weight + 0.5, linear.bias, qparams_from_tensor(weight + 0.5, spec), spec)
        assert reason in int8_dynamic_refusal(module)
        with pytest.raises(ValueError, match="dynamic int8 kernel"):
            Int8DynamicLinear(module)
