"""Quantize / dequantize / rounding / packing / metrics: exact expected values."""
from __future__ import annotations

import math

import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ConfigError, NonFiniteError
from ptqkit.core.primitives import MIN_SCALE, round_values


def test_rounding_modes_on_ties() -> None:
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1.2, -1.7])
    assert round_values(v, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 1, -2]
    assert round_values(v, "half_away").tolist() == [-3, -2, -1, 1, 2, 3, 1, -2]
    with pytest.raises(ConfigError, match="rounding 'up' is unknown; valid: half_even, half_away, stochastic"):
        round_values(v, "up")


def test_stochastic_rounding_is_seeded_and_bounded() -> None:
    v = torch.full((1000,), 2.3)
    a = round_values(v, "stochastic", torch.Generator().manual_seed(0))
    b = round_values(v, "stochastic", torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {2.0, 3.0}


def test_all_zero_and_constant_tensors_get_valid_scales() -> None:
    spec = pq.QuantSpec(qtype="int8", granularity=pq.PerChannel(0), symmetric=False)
    w = torch.zeros(3, 5)
    w[1] = 4.0  # a constant, positive channel
    qp = pq.qparams_from_tensor(w, spec)
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    assert qp.scale[0].item() == pytest.approx(MIN_SCALE)
    assert torch.equal(pq.fake_quantize(w, qp), w)  # zero and the constant are both exact


def test_nan_and_inf_raise_clear_errors() -> None:
    spec = pq.QuantSpec(qtype="int8")
    with pytest.raises(NonFiniteError, match=r"tensor to quantize holds 1 NaN/Inf value\(s\) out of 3"):
        pq.qparams_from_tensor(torch.tensor([1.0, float("nan"), 2.0]), spec)
    with pytest.raises(NonFiniteError, match="range maximum holds 1 NaN/Inf"):
        pq.qparams_from_range(0.0, float("inf"), pq.INT8, symmetric=True)
    qp = pq.qparams_from_range(-1.0, 1.0, pq.INT8, symmetric=True)
    with pytest.raises(NonFiniteError, match="tensor to quantize holds"):
        pq.quantize_tensor(torch.tensor([float("-inf")]), qp)
    with pytest.raises(ConfigError, match="range minimum exceeds maximum"):
        pq.qparams_from_range(2.0, 1.0, pq.INT8, symmetric=False)
    with pytest.raises(ConfigError, match="nf4 is symmetric-only"):
        pq.qparams_from_range(-1.0, 1.0, pq.NF4, symmetric=False)


def test_unsigned_symmetric_uses_mid_code() -> None:
    qp = pq.qparams_from_range(-1.0, 1.0, pq.UINT8, symmetric=True)
    assert qp.zero_point.item() == 128
    assert qp.scale.item() == pytest.approx(2.0 / 255)


def test_range_is_widened_to_include_zero() -> None:
    qp = pq.qparams_from_range(2.0, 5.0, pq.UINT8, symmetric=False)
    assert qp.zero_point.item() == 0
    assert qp.scale.item() == pytest.approx(5.0 / 255)


def test_saturation() -> None:
    qp = pq.qparams_from_range(-1.0, 1.0, pq.INT8, symmetric=True)
    assert pq.quantize_tensor(torch.tensor([100.0, -100.0]), qp).tolist() == [127, -128]


def test_per_group_quantization_uses_each_groups_scale() -> None:
    w = torch.cat([torch.full((1, 4), 1.0), torch.full((1, 4), 100.0), torch.full((1, 2), 0.5)], dim=1)
    spec = pq.QuantSpec(qtype="int4", granularity=pq.PerGroup(4))
    qp = pq.qparams_from_tensor(w, spec)
    assert qp.scale.shape == (1, 3)
    assert torch.allclose(qp.scale[0], torch.tensor([1.0, 100.0, 0.5]) / 7.5)
    assert torch.allclose(pq.fake_quantize(w, qp), w, rtol=0.07)


def test_fp8_e4m3_rounding_and_saturation() -> None:
    qp = pq.QParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), pq.FP8_E4M3, pq.PerTensor())
    q = pq.quantize_tensor(torch.tensor([1000.0, 17.0, 0.3]), qp)
    assert q.dtype == torch.float8_e4m3fn
    # 1000 saturates to 448; 17 is a tie between 16 and 18 -> even mantissa 16; 0.3 -> 0.3125 (nearest)
    assert pq.dequantize(q, qp).tolist() == [448.0, 16.0, 0.3125]


def test_fp4_e2m1_ties_go_to_even_mantissa() -> None:
    qp = pq.QParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), pq.FP4_E2M1, pq.PerTensor())
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0, -0.1, 2.6])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0, 0.0, 3.0]
    assert pq.fake_quantize(x, qp).tolist() == expected
    codes = pq.quantize_tensor(torch.tensor([6.0, -6.0, 0.5]), qp)
    assert codes.tolist() == [0b0111, 0b1111, 0b0001]  # the E2M1 bit patterns, sign in bit 3


def test_nf4_maps_to_nearest_level() -> None:
    qp = pq.qparams_from_range(-2.0, 2.0, pq.NF4, symmetric=True)  # scale 2
    x = torch.tensor([-2.0, 0.0, 2.0, 0.15, 1.2])
    codes = pq.quantize_tensor(x, qp)
    assert codes[:3].tolist() == [0, 7, 15]
    levels = pq.NF4.levels()
    y = pq.dequantize(codes, qp).double()
    brute = levels[(x.double().unsqueeze(1) / 2 - levels).abs().argmin(dim=1)] * 2
    assert torch.allclose(y, brute)


def test_float_formats_refuse_other_rounding() -> None:
    qp = pq.qparams_from_range(-1.0, 1.0, pq.NF4, symmetric=True)
    with pytest.raises(ConfigError, match="nf4 rounds to nearest-even only, got rounding='half_away'"):
        pq.quantize_tensor(torch.zeros(2), qp, rounding="half_away")


def test_pack_int4_layout_and_round_trip() -> None:
    codes = torch.tensor([[1, -1, 7, -8, 3]], dtype=torch.int8)
    packed = pq.pack_lowbit(codes, 4)
    # low nibble first, two's complement, last byte zero-padded
    assert packed.tolist() == [[0xF1, 0x87, 0x03]]
    assert torch.equal(pq.unpack_lowbit(packed, 4, 5, signed=True), codes)
    codes2 = torch.tensor([0, 1, 2, 3, 3, 2, 1], dtype=torch.uint8)
    assert torch.equal(pq.unpack_lowbit(pq.pack_lowbit(codes2, 2), 2, 7, signed=False), codes2)


def test_pack_errors() -> None:
    with pytest.raises(ConfigError, match="packs 1, 2 or 4 bits per value, got bits=3"):
        pq.pack_lowbit(torch.zeros(4, dtype=torch.int8), 3)
    with pytest.raises(ConfigError, match=r"codes in \[0, 16\] do not fit 4 bits \(valid \[-8, 15\]\)"):
        pq.pack_lowbit(torch.tensor([0, 16]), 4)
    with pytest.raises(ConfigError, match="takes integer codes, got torch.float32"):
        pq.pack_lowbit(torch.zeros(2), 4)
    with pytest.raises(ConfigError, match="length 9 does not match 2 packed bytes of 2 values each"):
        pq.unpack_lowbit(torch.zeros(2, dtype=torch.uint8), 4, 9, signed=True)
    with pytest.raises(ConfigError, match="packed data must be uint8, got torch.int8"):
        pq.unpack_lowbit(torch.zeros(2, dtype=torch.int8), 4, 4, signed=True)


def test_error_metrics() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert pq.mse(ref, torch.tensor([3.0, 5.0])) == 0.5
    assert pq.sqnr_db(ref, torch.tensor([3.0, 5.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert pq.sqnr_db(ref, ref) == math.inf
    assert pq.sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf


def test_bf16_input_keeps_dtype() -> None:
    x = torch.randn(16, dtype=torch.bfloat16)
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype="int8"))
    y = pq.fake_quantize(x, qp)
    assert y.dtype == torch.bfloat16
