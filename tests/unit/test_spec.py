"""QuantSpec validation and serialization; QParams invariants."""
from __future__ import annotations

import json

import pytest
import torch

import ptqkit as pq
from ptqkit.core.errors import ConfigError, NonFiniteError


def test_defaults_and_string_qtype() -> None:
    spec = pq.QuantSpec(qtype="int8")
    assert spec.qtype == pq.INT8
    assert spec.granularity == pq.PerTensor()
    assert spec.symmetric and spec.rounding == "half_even" and not spec.dynamic
    assert spec.observer == "minmax"


def test_json_round_trip_is_exact() -> None:
    spec = pq.QuantSpec(
        qtype="uint4",
        granularity=pq.PerGroup(128),
        symmetric=False,
        rounding="stochastic",
        observer="ema_minmax",
        observer_options={"momentum": 0.9},
    )
    text = json.dumps(spec.to_dict(), sort_keys=True)
    back = pq.QuantSpec.from_dict(json.loads(text))
    assert back == spec
    assert hash(back) == hash(spec)
    assert json.dumps(back.to_dict(), sort_keys=True) == text


def test_to_dict_writes_every_default() -> None:
    assert set(pq.QuantSpec(qtype="int8").to_dict()) == {
        "qtype", "granularity", "symmetric", "rounding", "dynamic", "observer", "observer_options",
    }


def test_spec_is_frozen() -> None:
    spec = pq.QuantSpec(qtype="int8")
    with pytest.raises(AttributeError):
        spec.symmetric = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.observer_options["x"] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qtype": "nf4", "symmetric": False}, r"nf4 is a symmetric format and has no zero point"),
        ({"qtype": "fp8_e4m3", "symmetric": False}, r"fp8_e4m3 is a symmetric format"),
        ({"qtype": "int8", "rounding": "nearest"}, r"^rounding: 'nearest' is unknown; valid: half_even, half_away, stochastic$"),
        ({"qtype": "fp8_e4m3", "rounding": "stochastic"}, r"stochastic rounding is implemented for integer qtypes only"),
        ({"qtype": "int8", "granularity": pq.PerToken()}, r"per-token granularity needs dynamic=true"),
        ({"qtype": "int8", "symmetric": "yes"}, r"^symmetric: 'yes' must be true or false$"),
        ({"qtype": "int8", "observer": ""}, r"^observer: '' is unknown; valid: minmax, ema_minmax, percentile, mse, kl$"),
        ({"qtype": "int8", "observer_options": {"bins": [1, 2]}}, r"observer_options\['bins'\] = \[1, 2\]"),
        ({"qtype": 8}, r"qtype must be a QType or a name like 'int8', got 8"),
        ({"qtype": "int12"}, r"bits=12 is not supported"),
    ],
)
def test_impossible_specs_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pq.QuantSpec(**kwargs)


def test_the_observer_names_are_the_observer_option_types() -> None:
    """`QuantSpec.observer` is a Literal; its values are exactly the observers with option types."""
    from ptqkit.core.observer_options import OBSERVER_OPTIONS
    from ptqkit.core.spec import OBSERVERS

    assert OBSERVERS == tuple(OBSERVER_OPTIONS)


def test_from_dict_errors_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"weights: unknown key\(s\) \['bitz'\]; valid keys:"):
        pq.QuantSpec.from_dict({"qtype": "int8", "bitz": 4}, where="weights")
    with pytest.raises(ConfigError, match=r"weights: 'qtype' is required"):
        pq.QuantSpec.from_dict({"symmetric": True}, where="weights")
    with pytest.raises(ConfigError, match=r"weights\.granularity\.kind: 'rows' is unknown"):
        pq.QuantSpec.from_dict({"qtype": "int8", "granularity": {"kind": "rows"}}, where="weights")
    with pytest.raises(ConfigError, match=r"weights: nf4 is a symmetric format"):
        pq.QuantSpec.from_dict({"qtype": "nf4", "symmetric": False}, where="weights")
    with pytest.raises(ConfigError, match=r"^weights\.rounding: 'up' is unknown; valid: half_even, half_away, stochastic$"):
        pq.QuantSpec.from_dict({"qtype": "int8", "rounding": "up"}, where="weights")
    with pytest.raises(ConfigError, match=r"spec: expected a mapping, got list"):
        pq.QuantSpec.from_dict([1, 2])  # type: ignore[arg-type]


def test_qparams_invariants() -> None:
    ok = pq.QParams(torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), pq.INT8, pq.PerTensor())
    assert ok.to("cpu").scale.item() == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"scale shape \(2,\) != zero_point shape \(\)"):
        pq.QParams(torch.ones(2), torch.tensor(0), pq.INT8, pq.PerTensor())
    with pytest.raises(NonFiniteError, match="scale holds NaN/Inf"):
        pq.QParams(torch.tensor(float("nan")), torch.tensor(0), pq.INT8, pq.PerTensor())
    with pytest.raises(ConfigError, match="scale must be > 0, got min 0.0"):
        pq.QParams(torch.tensor(0.0), torch.tensor(0), pq.INT8, pq.PerTensor())
    with pytest.raises(ConfigError, match="zero_point must be an integer tensor"):
        pq.QParams(torch.tensor(1.0), torch.tensor(0.0), pq.INT8, pq.PerTensor())
    with pytest.raises(ConfigError, match=r"zero_point outside int8's range \[-128, 127\]"):
        pq.QParams(torch.tensor(1.0), torch.tensor(200), pq.INT8, pq.PerTensor())
