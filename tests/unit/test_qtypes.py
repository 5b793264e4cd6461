"""QType ranges, grids and parsing; Granularity reduction/expansion."""
from __future__ import annotations

import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import NF4_LEVELS, granularity_from_dict


@pytest.mark.parametrize(
    ("name", "qmin", "qmax", "dtype"),
    [
        ("int8", -128, 127, torch.int8),
        ("uint8", 0, 255, torch.uint8),
        ("int8_narrow", -127, 127, torch.int8),
        ("int4", -8, 7, torch.int8),
        ("uint4", 0, 15, torch.uint8),
        ("int3", -4, 3, torch.int8),
        ("int2", -2, 1, torch.int8),
        ("int16", -32768, 32767, torch.int16),
        ("uint16", 0, 65535, torch.int32),
    ],
)
def test_integer_ranges(name: str, qmin: int, qmax: int, dtype: torch.dtype) -> None:
    qtype = pq.QType.parse(name)
    assert (qtype.qmin, qtype.qmax) == (qmin, qmax)
    assert qtype.name == name
    assert qtype.storage_dtype == dtype
    levels = qtype.levels()
    assert levels[0] == qmin and levels[-1] == qmax and len(levels) == qmax - qmin + 1


def test_float_format_ranges() -> None:
    assert pq.FP8_E4M3.max_value == 448.0
    assert pq.FP8_E5M2.max_value == 57344.0
    assert pq.FP4_E2M1.max_value == 6.0
    assert pq.NF4.max_value == 1.0
    # fp8 e4m3fn: 2 * 126 finite non-zero values + one zero (±0 collapse) = 253
    assert len(pq.FP8_E4M3.levels()) == 253
    assert pq.FP4_E2M1.levels().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert pq.FP8_E4M3.storage_dtype == torch.float8_e4m3fn
    assert pq.NF4.storage_dtype == torch.uint8


def test_nf4_levels_match_published_construction() -> None:
    # QLoRA's NF4: quantiles of N(0, 1) with offset 0.9677, 8 positive and 7 negative levels plus
    # zero, normalized to [-1, 1]. Rebuilt here with scipy as an independent reference.
    scipy_stats = pytest.importorskip("scipy.stats")
    offset = 0.9677083
    positive = scipy_stats.norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy()).tolist()
    negative = (-scipy_stats.norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(positive + [0.0] + negative), dtype=torch.float64)
    values = values / values.abs().max()
    assert torch.allclose(values, torch.tensor(NF4_LEVELS, dtype=torch.float64), atol=1e-6)
    assert torch.equal(pq.NF4.levels(), torch.tensor(NF4_LEVELS, dtype=torch.float64))


@pytest.mark.parametrize("name", ["int8", "uint4", "int8_narrow", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4"])
def test_parse_round_trips(name: str) -> None:
    assert pq.QType.parse(name).name == name
    assert pq.QType.parse(name) == pq.QType.parse(pq.QType.parse(name).name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "int", "bits": 9}, r"bits=9 is not supported; valid: 2\.\.8 or 16"),
        ({"format": "int", "bits": 1}, r"bits=1 is not supported"),
        ({"format": "fp8_e4m3", "bits": 3}, r"fp8_e4m3 is a 8-bit format; bits=3 is impossible"),
        ({"format": "nf4", "signed": False}, r"nf4 is signed"),
        ({"format": "int", "bits": 8, "signed": False, "narrow": True}, r"narrow range applies to signed"),
        ({"format": "fp16"}, r"format 'fp16' is unknown; valid: int, fp8_e4m3"),
    ],
)
def test_invalid_qtypes_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pq.QType(**kwargs)


@pytest.mark.parametrize("name", ["int9", "float8", "int", "uint8_narrow", ""])
def test_parse_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ConfigError, match="qtype|bits|narrow"):
        pq.QType.parse(name)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match="qtype must be a name string, got int 8"):
        pq.QType.parse(8)  # type: ignore[arg-type]


def test_per_group_reduce_with_ragged_last_group() -> None:
    # 576 columns in groups of 128: four full groups and one of 64 (SmolLM2's projections).
    w = torch.arange(2 * 576, dtype=torch.float32).reshape(2, 576)
    g = pq.PerGroup(128)
    mx = g.reduce(w, torch.amax)
    assert mx.shape == (2, 5)
    assert mx[0].tolist() == [127, 255, 383, 511, 575]
    assert g.expand(mx, w.shape).shape == w.shape
    assert g.expand(mx, w.shape)[0, 540].item() == 575
    assert g.num_groups(576) == 5
    assert g.param_shape(torch.Size([3, 576])) == (3, 5)


def test_per_channel_and_per_token_shapes() -> None:
    x = torch.randn(4, 6, 8)
    assert pq.PerChannel(0).reduce(x, torch.amax).shape == (4,)
    assert pq.PerChannel(-1).reduce(x, torch.amax).shape == (8,)
    assert torch.equal(pq.PerChannel(-1).reduce(x, torch.amax), x.amax(dim=(0, 1)))
    assert pq.PerChannel(1).expand(torch.ones(6), x.shape).shape == (1, 6, 1)
    assert pq.PerToken().reduce(x, torch.amax).shape == (4, 6, 1)
    assert pq.PerTensor().reduce(x, torch.amax).shape == ()


def test_granularity_dict_round_trip_and_errors() -> None:
    for g in (pq.PerTensor(), pq.PerChannel(1), pq.PerGroup(64), pq.PerToken()):
        assert granularity_from_dict(g.to_dict()) == g
    with pytest.raises(ConfigError, match=r"granularity\.kind: 'per_block' is unknown; valid: per_tensor"):
        granularity_from_dict({"kind": "per_block"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['group'\] for per_group"):
        granularity_from_dict({"kind": "per_group", "size": 4, "group": 2})
    with pytest.raises(ConfigError, match="expected a mapping with a 'kind' key"):
        granularity_from_dict("per_tensor")
    with pytest.raises(ConfigError, match="per-group size must be a positive integer, got 0"):
        pq.PerGroup(0)
    with pytest.raises(ConfigError, match="per-channel axis=3 is out of range for a tensor with 2 dimensions"):
        pq.PerChannel(3).reduce(torch.ones(2, 2), torch.amax)
