"""The seed article's worked examples, exactly (shared/seeds/000: "Numeric Example")."""
from __future__ import annotations

import pytest
import torch

import ptqkit as pq


@pytest.fixture()
def seed_qparams() -> pq.QParams:
    return pq.qparams_from_range(-2.4, 3.6, pq.UINT8, symmetric=False)


def test_range_to_uint8_gives_article_scale_and_zero_point(seed_qparams: pq.QParams) -> None:
    # s = 6.0 / 255, z = round(0 - (-2.4 / s)) = 102
    assert seed_qparams.scale.item() == pytest.approx(6.0 / 255, rel=1e-7)
    assert seed_qparams.zero_point.item() == 102


def test_one_quantizes_to_145_with_half_away(seed_qparams: pq.QParams) -> None:
    # 1.0 / (6/255) = 42.5 exactly in float32: the article rounds the tie away from zero.
    q = pq.quantize_tensor(torch.tensor([1.0]), seed_qparams, rounding="half_away")
    assert q.dtype == torch.uint8
    assert q.item() == 145
    assert pq.dequantize(q, seed_qparams).item() == pytest.approx(43 * 6 / 255, rel=1e-6)  # ≈ 1.012
    assert pq.dequantize(q, seed_qparams).item() == pytest.approx(1.012, abs=5e-4)


def test_one_quantizes_to_144_with_half_even(seed_qparams: pq.QParams) -> None:
    # The default, like PyTorch and ONNX QuantizeLinear, sends the tie 42.5 to the even 42:
    # q = 42 + 102 = 144 and the dequantized value is 42 * 6/255 ≈ 0.988 (error -0.012).
    q = pq.quantize_tensor(torch.tensor([1.0]), seed_qparams)
    assert q.item() == 144
    assert pq.dequantize(q, seed_qparams).item() == pytest.approx(42 * 6 / 255, rel=1e-6)


def test_range_endpoints_map_to_code_ends(seed_qparams: pq.QParams) -> None:
    q = pq.quantize_tensor(torch.tensor([-2.4, 0.0, 3.6]), seed_qparams)
    assert q.tolist() == [0, 102, 255]


def test_symmetric_int8_narrow_range() -> None:
    # Symmetric int8 in [-127, 127]: scale = absmax / 127, zero point 0.
    qp = pq.qparams_from_range(-3.0, 2.0, pq.INT8_NARROW, symmetric=True)
    assert qp.scale.item() == pytest.approx(3.0 / 127, rel=1e-7)
    assert qp.zero_point.item() == 0
    q = pq.quantize_tensor(torch.tensor([-3.0, -1.0, 0.0, 2.0, 5.0]), qp)
    assert q.tolist() == [-127, round(-127 / 3), 0, round(2 * 127 / 3), 127]
    assert pq.INT8_NARROW.qmin == -127 and pq.INT8_NARROW.qmax == 127


def test_symmetric_int8_full_range_matches_pytorch_convention() -> None:
    # Full-range signed symmetric: scale = 2·absmax / (127 - (-128)) = absmax / 127.5 (torch observers).
    qp = pq.qparams_from_range(-3.0, 2.0, pq.INT8, symmetric=True)
    assert qp.scale.item() == pytest.approx(3.0 / 127.5, rel=1e-7)
    assert qp.zero_point.item() == 0


def test_example_table_shows_both_roundings_of_the_tie() -> None:
    from ptqkit.examples.seed_table import render, seed_table

    rows = seed_table()
    uint8_one = {r["rounding"]: r["q"] for r in rows if str(r["format"]).startswith("uint8") and r["x"] == 1.0}
    assert uint8_one["half_even"] == 144 and uint8_one["half_away"] == 145
    assert uint8_one["stochastic"] in (144, 145)
    assert {str(r["format"]).split()[0] for r in rows} == {"uint8", "int8"}
    assert "dequantized" in render(rows).splitlines()[0]
