"""Observers: brute-force references, invariance, merge, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptqkit as pq
from ptqkit.core.errors import ConfigError, NonFiniteError
from ptqkit.observers import OBSERVERS, make_observer, observer_from_state


def _spec(
    observer: str,
    qtype: str = "int8",
    symmetric: bool = True,
    granularity: pq.Granularity | None = None,
    **options,
) -> pq.QuantSpec:
    return pq.QuantSpec(
        qtype=qtype,
        symmetric=symmetric,
        observer=observer,
        observer_options=options,
        granularity=granularity or pq.PerTensor(),
    )


def _heavy_tailed(n: int = 60_000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.distributions.StudentT(3.0).sample((n,)) * 0.5 + 0.1
    x[:4] = torch.tensor([30.0, -22.0, 17.0, 12.0])
    return x


def _observe(spec: pq.QuantSpec, chunks) -> object:
    obs = make_observer(spec)
    for c in chunks:
        obs.update(c)
    return obs


def _np_fake_quant_mse(
    x: np.ndarray, lo: float, hi: float, qtype: pq.QType, symmetric: bool
) -> float:
    """Float64 reference, written independently of ptqkit.core.primitives."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = float(qtype.qmin), float(qtype.qmax)
    if symmetric:
        a = max(-lo, hi)
        scale = 2 * a / (qmax - qmin)
        zp = 0.0 if qtype.signed else (qmin + qmax + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return float(np.mean(((q - zp) * scale - x) ** 2))


@pytest.mark.parametrize(
    ("qtype", "symmetric"), [("int8", True), ("uint8", False), ("int4", True), ("uint4", False)]
)
def test_mse_observer_within_half_percent_of_brute_force(qtype: str, symmetric: bool) -> None:
    x = _heavy_tailed()
    obs = _observe(_spec("mse", qtype, symmetric), x.split(9_000))
    lo, hi = obs.compute_range()
    xs = x.double().numpy()
    qt = pq.QType.parse(qtype)
    ours = _np_fake_quant_mse(xs, lo.item(), hi.item(), qt, symmetric)
    lo0, hi0 = min(xs.min(), 0.0), max(xs.max(), 0.0)
    if symmetric:
        a = max(-lo0, hi0)
        lo0, hi0 = -a, a
    brute = min(
        _np_fake_quant_mse(xs, r * lo0, r * hi0, qt, symmetric)
        for r in np.linspace(0.01, 1.0, 2000)
    )
    assert ours <= brute * 1.005, (ours, brute)


def test_per_channel_mse_on_weights_beats_minmax_and_matches_brute_force() -> None:
    torch.manual_seed(1)
    w = torch.distributions.Laplace(0.0, 0.02).sample((16, 256)) * torch.linspace(
        0.5, 3, 16
    ).unsqueeze(1)
    spec = _spec("mse", "int4", True, pq.PerChannel(0))
    obs = _observe(spec, [w])
    lo, hi = obs.compute_range()
    assert lo.shape == (16,)
    qt = pq.INT4
    for c in range(16):
        row = w[c].double().numpy()
        ours = _np_fake_quant_mse(row, lo[c].item(), hi[c].item(), qt, True)
        a = np.abs(row).max()
        brute = min(
            _np_fake_quant_mse(row, -r * a, r * a, qt, True) for r in np.linspace(0.01, 1, 1000)
        )
        assert ours <= brute * 1.005 + 1e-12
    minmax_err = pq.mse(w, pq.fake_quantize(w, pq.qparams_from_tensor(w, spec)))
    assert pq.mse(w, pq.fake_quantize(w, obs.qparams())) < 0.8 * minmax_err


def test_kl_on_heavy_tails_clips_inside_and_quantizes_the_bulk_better() -> None:
    x = _heavy_tailed()
    kl = _observe(_spec("kl"), x.split(10_000))
    lo, hi = kl.compute_range()
    assert x.min() < lo < 0 < hi < x.max()
    bulk = x[x.abs() <= hi]
    err_kl = pq.mse(bulk, pq.fake_quantize(bulk, kl.qparams()))
    err_minmax = pq.mse(bulk, pq.fake_quantize(bulk, _observe(_spec("minmax"), [x]).qparams()))
    assert err_kl < err_minmax / 4, (err_kl, err_minmax)  # measured: ~ 1/20


@pytest.mark.parametrize(
    "name", sorted(set(OBSERVERS) - {"ema_minmax"})
)  # an EMA depends on order by definition
def test_identical_for_any_batch_split_and_order(name: str) -> None:
    x = _heavy_tailed(30_000)
    spec = _spec(name, "uint8", symmetric=False)
    a = _observe(spec, x.split(1_000))
    b = _observe(spec, x.flip(0).split(7_777))
    c = _observe(spec, [x])
    for other in (b, c):
        for u, v in zip(a.compute_range(), other.compute_range()):
            assert torch.equal(u, v)


@pytest.mark.parametrize("name", sorted(set(OBSERVERS) - {"ema_minmax"}))
def test_merge_equals_one_observer_over_both(name: str) -> None:
    x, y = _heavy_tailed(20_000, 0), _heavy_tailed(20_000, 1) * 3
    spec = _spec(name)
    merged = _observe(spec, x.split(5_000))
    merged.merge_(_observe(spec, y.split(5_000)))
    single = _observe(spec, [*x.split(5_000), *y.split(5_000)])
    assert merged.num_batches == single.num_batches == 8
    for u, v in zip(merged.compute_range(), single.compute_range()):
        assert torch.equal(u, v)


def test_ema_merge_is_the_documented_batch_weighted_average() -> None:
    spec = _spec("ema_minmax")
    a = _observe(spec, [torch.tensor([-1.0, 1.0])] * 3)
    b = _observe(spec, [torch.tensor([-5.0, 9.0])])
    a.merge_(b)
    lo, hi = a.compute_range()
    assert (lo.item(), hi.item()) == pytest.approx(((3 * -1 + -5) / 4, (3 * 1 + 9) / 4))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_state_round_trip_and_resume(name: str) -> None:
    x = _heavy_tailed(20_000)
    spec = _spec(name, granularity=pq.PerChannel(0) if name in ("minmax", "mse") else None)
    data = x.reshape(4, -1) if name in ("minmax", "mse") else x
    first, second = data.chunk(2, dim=-1)
    obs = _observe(spec, [first])
    tensors, meta = obs.state()
    restored = observer_from_state({k: v.clone() for k, v in tensors.items()}, meta)
    for u, v in zip(obs.compute_range(), restored.compute_range()):
        assert torch.equal(u, v)
    assert restored.history == obs.history
    obs.update(second)
    restored.update(second)
    for u, v in zip(obs.compute_range(), restored.compute_range()):
        assert torch.equal(u, v)


def test_memory_does_not_grow_with_batches() -> None:
    obs = make_observer(_spec("kl"))
    obs.update(torch.randn(1000))
    size = sum(t.numel() for t in obs.state()[0].values())
    for _ in range(50):
        obs.update(torch.randn(1000) * 10)
    assert sum(t.numel() for t in obs.state()[0].values()) == size


def test_ema_follows_its_formula() -> None:
    obs = _observe(
        _spec("ema_minmax", momentum=0.5), [torch.tensor([0.0, 4.0]), torch.tensor([-2.0, 2.0])]
    )
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0)


def test_per_channel_minmax_on_any_axis() -> None:
    x = torch.randn(3, 5, 7)
    lo, hi = _observe(_spec("minmax", granularity=pq.PerChannel(1)), [x[:1], x[1:]]).compute_range()
    assert torch.equal(hi, x.amax(dim=(0, 2))) and torch.equal(lo, x.amin(dim=(0, 2)))


@settings(max_examples=25, deadline=None)
@given(st.floats(55, 99.0), st.floats(0.1, 0.99), st.integers(0, 1000))
def test_percentile_is_monotone_in_p(p: float, delta: float, seed: int) -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(seed)) ** 3
    low = _observe(_spec("percentile", "uint8", False, percentile=p), [x])
    high = _observe(_spec("percentile", "uint8", False, percentile=min(100.0, p + delta)), [x])
    (lo1, hi1), (lo2, hi2) = low.compute_range(), high.compute_range()
    assert lo2 <= lo1 and hi1 <= hi2
    s1 = _observe(_spec("percentile", percentile=p), [x]).compute_range()[1]
    s2 = _observe(_spec("percentile", percentile=min(100.0, p + delta)), [x]).compute_range()[1]
    assert s1 <= s2


def test_errors() -> None:
    with pytest.raises(
        ConfigError,
        match="observer: 'entropy' is unknown; valid: minmax, ema_minmax, percentile, mse, kl",
    ):
        make_observer(_spec("entropy"))
    with pytest.raises(
        ConfigError,
        match=r"observer 'percentile': unknown option\(s\) \['pct'\]; valid options: percentile \(default 99\.99\)",
    ):
        make_observer(_spec("percentile", pct=99.0))
    with pytest.raises(ConfigError, match=r"percentile=40 must be in \(50, 100\]"):
        make_observer(_spec("percentile", percentile=40))
    with pytest.raises(ConfigError, match=r"bins=1000 must be a power of two >= 8"):
        make_observer(_spec("kl", bins=1000))
    with pytest.raises(ConfigError, match=r"momentum=1\.5 must be in \[0, 1\)"):
        make_observer(_spec("ema_minmax", momentum=1.5))
    with pytest.raises(
        ConfigError,
        match="observer 'kl' does not support per_channel granularity; valid: per_tensor",
    ):
        make_observer(_spec("kl", granularity=pq.PerChannel(0)))
    with pytest.raises(ConfigError, match="observer 'minmax' has seen no data"):
        make_observer(_spec("minmax")).qparams()
    with pytest.raises(NonFiniteError, match="input to observer 'mse' holds 1 NaN/Inf"):
        make_observer(_spec("mse")).update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="cannot merge observer 'kl'"):
        _observe(_spec("minmax"), [torch.ones(2)]).merge_(_observe(_spec("kl"), [torch.ones(2)]))
    tensors, meta = _observe(_spec("minmax"), [torch.ones(2)]).state()
    with pytest.raises(
        ConfigError, match="observer state is for 'minmax' version 1; expected 'kl'"
    ):
        OBSERVERS["kl"].from_state(tensors, meta)
    obs = _observe(_spec("minmax", granularity=pq.PerChannel(0)), [torch.ones(3, 2)])
    with pytest.raises(
        ConfigError, match=r"batch gives \(4,\) parameters but earlier batches gave \(3,\)"
    ):
        obs.update(torch.ones(4, 2))


def test_kl_coarse_to_fine_matches_the_full_scan() -> None:
    from ptqkit.observers.kl import kl_threshold_bin

    x = _heavy_tailed()
    obs = _observe(_spec("kl", bins=512), [x])
    counts = obs._hist.abs_counts()[0].numpy()
    assert kl_threshold_bin(counts, 128, stride=8) == kl_threshold_bin(counts, 128, stride=1)


def test_quant_spec_rejects_an_unknown_observer_where_it_is_written() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^recipe\.activations\.observer: 'entropy' is unknown; valid: minmax, ema_minmax, percentile, mse, kl$",
    ):
        pq.QuantSpec.from_dict({"qtype": "int8", "observer": "entropy"}, where="recipe.activations")


def test_per_token_specs_are_dynamic_and_need_no_observer() -> None:
    spec = pq.QuantSpec(qtype="uint8", symmetric=False, granularity=pq.PerToken(), dynamic=True)
    with pytest.raises(
        ConfigError,
        match=r"'minmax' does not support per_token granularity; valid: per_tensor, per_channel, per_group \(per-token parameters are computed",
    ):
        make_observer(spec)


def test_every_observer_has_its_options_registered_in_core() -> None:
    """The spec checks options against core's table; the observers must use the same classes."""
    from ptqkit.core.observer_options import OBSERVER_OPTIONS
    from ptqkit.observers import OBSERVERS

    assert list(OBSERVERS) == list(OBSERVER_OPTIONS)
    for name, observer in OBSERVERS.items():
        assert observer.name == name and observer.options_type is OBSERVER_OPTIONS[name]


def test_bad_observer_options_fail_when_the_recipe_loads() -> None:
    data = pq.Recipe.from_preset("w8a8").to_dict()
    data["scheme"]["inputs"]["observer"] = "kl"
    data["scheme"]["inputs"]["observer_options"] = {"bins": 1000}
    with pytest.raises(ConfigError, match=r"observer 'kl': bins=1000 must be a power of two >= 8"):
        pq.Recipe.from_dict(data)
