"""Property tests (hypothesis) of the core maths."""
from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptqkit as pq

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

int_qtypes = st.sampled_from([pq.INT8, pq.UINT8, pq.INT8_NARROW, pq.INT4, pq.QType.int(4, signed=False), pq.QType.int(3), pq.QType.int(2)])
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def ranges(draw: st.DrawFn) -> tuple[float, float]:
    lo = draw(st.floats(min_value=-1e3, max_value=0.0, width=32))
    hi = draw(st.floats(min_value=0.0, max_value=1e3, width=32))
    return lo, hi


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@SETTINGS
@given(int_qtypes, st.booleans(), ranges(), st.lists(st.floats(0, 1), min_size=1, max_size=64), st.sampled_from(["half_even", "half_away"]))
def test_in_range_round_trip_error_at_most_half_a_step(qtype, symmetric, rng, fractions, rounding) -> None:
    lo, hi = rng
    qp = pq.qparams_from_range(lo, hi, qtype, symmetric=symmetric)
    # points inside the representable range [scale*(qmin-zp), scale*(qmax-zp)]
    low = (qtype.qmin - qp.zero_point.item()) * qp.scale.item()
    high = (qtype.qmax - qp.zero_point.item()) * qp.scale.item()
    x = _tensor([low + f * (high - low) for f in fractions]).clamp(low, high)
    err = (pq.fake_quantize(x, qp, rounding) - x).abs()
    assert err.max().item() <= qp.scale.item() / 2 * (1 + 1e-4) + 1e-6


@SETTINGS
@given(int_qtypes, st.booleans(), ranges())
def test_zero_is_exactly_representable(qtype, symmetric, rng) -> None:
    qp = pq.qparams_from_range(rng[0], rng[1], qtype, symmetric=symmetric)
    assert pq.fake_quantize(torch.zeros(3), qp).tolist() == [0.0, 0.0, 0.0]


@SETTINGS
@given(int_qtypes, st.booleans(), st.lists(finite, min_size=1, max_size=64))
def test_fake_quantize_is_idempotent(qtype, symmetric, values) -> None:
    x = _tensor(values)
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype=qtype, symmetric=symmetric))
    once = pq.fake_quantize(x, qp)
    assert torch.equal(pq.fake_quantize(once, qp), once)


@SETTINGS
@given(int_qtypes, st.booleans(), st.lists(finite, min_size=2, max_size=64))
def test_quantization_is_monotone(qtype, symmetric, values) -> None:
    x = torch.sort(_tensor(values)).values
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype=qtype, symmetric=symmetric))
    q = pq.quantize_tensor(x, qp).to(torch.int32)
    assert (q[1:] >= q[:-1]).all()


@SETTINGS
@given(st.sampled_from([1, 2, 4]), st.booleans(), st.integers(1, 5), st.integers(1, 37), st.randoms(use_true_random=False))
def test_pack_unpack_is_identity(bits, signed, rows, cols, rnd) -> None:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = torch.tensor([[rnd.randint(lo, hi) for _ in range(cols)] for _ in range(rows)], dtype=torch.int8 if signed else torch.uint8)
    packed = pq.pack_lowbit(codes, bits)
    assert packed.shape == (rows, math.ceil(cols * bits / 8))
    assert torch.equal(pq.unpack_lowbit(packed, bits, cols, signed), codes)


# A 3-standard-error bound fails by chance 0.27% of the time per example: the examples are
# derandomized (a fixed, reproducible set) so the suite cannot flake on a lucky draw.
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.floats(min_value=-100, max_value=100, allow_nan=False, width=32), st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased(value, seed) -> None:
    n = 4000
    qp = pq.qparams_from_range(-128.0, 127.0, pq.INT8, symmetric=False)  # scale 1, codes = rounded values
    x = torch.full((n,), value)
    y = pq.fake_quantize(x, qp, "stochastic", torch.Generator().manual_seed(seed))
    frac = value - math.floor(value)
    std_err = math.sqrt(frac * (1 - frac) / n)
    assert abs(y.double().mean().item() - value) <= 3 * std_err + 1e-5
    assert set(y.unique().tolist()) <= {math.floor(value), math.floor(value) + 1.0}


@SETTINGS
@given(int_qtypes, st.floats(min_value=1e-2, max_value=1e3), st.integers(0, 2**31 - 1))
def test_uniform_input_mse_is_scale_squared_over_twelve(qtype, width, seed) -> None:
    # The seeds' MSE ≈ Δ²/12 for inputs uniform inside the quantizer's range.
    qp = pq.qparams_from_range(-width, width, qtype, symmetric=True)
    low = (qtype.qmin - qp.zero_point.item()) * qp.scale.item()
    high = (qtype.qmax - qp.zero_point.item()) * qp.scale.item()
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(200_000, generator=g, dtype=torch.float64)
    x = x.to(torch.float32)
    measured = pq.mse(x, pq.fake_quantize(x, qp))
    expected = qp.scale.item() ** 2 / 12
    assert abs(measured - expected) <= 0.05 * expected


granularities = st.sampled_from([pq.PerTensor(), pq.PerChannel(0), pq.PerChannel(-1), pq.PerGroup(64), pq.PerGroup(7, axis=0)])


@SETTINGS
@given(
    st.sampled_from(["int8", "uint8", "int4", "int8_narrow", "fp8_e4m3", "nf4", "fp4_e2m1"]),
    granularities,
    st.booleans(),
    st.sampled_from(["half_even", "half_away", "stochastic"]),
    st.booleans(),
    st.sampled_from([
        ("minmax", {}),
        ("ema_minmax", {"momentum": 0.25}),
        ("percentile", {"percentile": 99.9, "bins": 512}),
        ("mse", {"bins": 64, "grid": 20, "min_ratio": 0.5}),
        ("kl", {"bins": 4096, "levels": 0, "stride": 1}),
    ]),
)
def test_quant_spec_json_round_trip(qtype, granularity, symmetric, rounding, dynamic, observer) -> None:
    qt = pq.QType.parse(qtype)
    if not qt.is_integer:
        symmetric, rounding = True, "half_even"
    name, options = observer  # options are checked against the observer when the spec is built
    spec = pq.QuantSpec(
        qtype=qt, granularity=granularity, symmetric=symmetric, rounding=rounding, dynamic=dynamic, observer=name, observer_options=options
    )
    back = pq.QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.to_dict() == spec.to_dict()


@SETTINGS
@given(granularities, st.integers(1, 6), st.integers(1, 150), st.integers(0, 2**31 - 1))
def test_every_granularity_round_trips_within_half_step(granularity, rows, cols, seed) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    qp = pq.qparams_from_tensor(x, pq.QuantSpec(qtype="int8", granularity=granularity))
    step = granularity.expand(qp.scale, x.shape)
    # full-range symmetric puts +absmax at code 127.5, so the top element sits exactly half a step out
    assert ((pq.fake_quantize(x, qp) - x).abs() <= step / 2 * (1 + 1e-4)).all()
