"""Bias correction: the corrected output's mean error vanishes (closed form) and its MSE drops
on Linear and grouped Conv layers; the clipped-normal expectation matches scipy quadrature and
Monte Carlo; error paths."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

from ptqkit.algorithms.bias_correction import (
    BiasCorrectionConfig,
    analytic_bias_correction,
    clipped_normal_mean,
    empirical_bias_correction,
    expected_activation_from_bn,
    output_mean_correction,
)
from ptqkit.core.errors import ConfigError, NonFiniteError
from ptqkit.core.primitives import fake_quantize, qparams_from_tensor
from ptqkit.core.qtypes import INT4, PerChannel
from ptqkit.core.spec import QuantSpec


def _quantize_up(w: torch.Tensor) -> torch.Tensor:
    """int4 per-tensor weights, rounding half away — plus a deliberate upward bias so the error
    has a clear non-zero mean effect on post-ReLU (positive-mean) inputs."""
    q = fake_quantize(w, qparams_from_tensor(w, QuantSpec(qtype=INT4)), rounding="half_away")
    return q + 0.02 * w.abs().max()


def test_linear_mean_error_vanishes_and_mse_drops():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    x = torch.relu(torch.randn(2048, 32, generator=g) + 0.5)  # positive mean, as after a ReLU
    wq = _quantize_up(w)
    ref, quant = F.linear(x, w, b), F.linear(x, wq, b)
    c = empirical_bias_correction(wq - w, x.mean(dim=0))
    corrected = F.linear(x, wq, b + c)
    before = (quant - ref).mean(dim=0)
    after = (corrected - ref).mean(dim=0)
    assert before.abs().max() > 0.5  # the layer has a real mean shift (measured ~1.3)
    assert after.abs().max() < 1e-4 * before.abs().max()  # closed form: ΔW(mean(x) - E[x]) = 0
    mse_before, mse_after = float(((quant - ref) ** 2).mean()), float(((corrected - ref) ** 2).mean())
    assert mse_after < 0.5 * mse_before, (mse_before, mse_after)
    # the seeds' form from output means gives the same correction
    torch.testing.assert_close(output_mean_correction(ref.mean(0), quant.mean(0)), c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_without_padding_is_exact_grouped(groups):
    g = torch.Generator().manual_seed(groups)
    c_in, c_out = 8, 8
    w = torch.randn(c_out, c_in // groups, 3, 3, generator=g)
    x = torch.relu(torch.randn(64, c_in, 10, 10, generator=g) + 0.3)
    wq = _quantize_up(w)
    ex = x.mean(dim=(0, 2, 3))  # [C_in]
    c = empirical_bias_correction(wq - w, ex, groups=groups)
    ref = F.conv2d(x, w, groups=groups)
    quant = F.conv2d(x, wq, groups=groups)
    corrected = F.conv2d(x, wq, c, groups=groups)
    # with padding=0 every output position sees interior inputs, but the per-position input mean
    # differs from the global mean only through sampling, so compare against the float64 brute force:
    brute = -(F.conv2d(x.double(), (wq - w).double(), groups=groups)).mean(dim=(0, 2, 3))
    # brute force uses every window's own mean; the correction uses the global channel mean
    assert (c.double() - brute).abs().max() < 0.05 * brute.abs().max()
    before = (quant - ref).mean(dim=(0, 2, 3)).abs().max()
    after = (corrected - ref).mean(dim=(0, 2, 3)).abs().max()
    assert after < 0.05 * before, (before, after)
    assert ((corrected - ref) ** 2).mean() < ((quant - ref) ** 2).mean()


def test_conv_constant_input_exact_interior_and_padding_overcorrects_border():
    """E[x] constant per channel: the correction is exact where the window lies inside the
    input; at the zero-padded border it overcorrects (the documented approximation)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, 3, 3, generator=g)
    wq = _quantize_up(w)
    means = torch.tensor([0.5, 1.0, 2.0])
    x = means.view(1, 3, 1, 1).expand(1, 3, 8, 8)
    c = empirical_bias_correction(wq - w, means)
    err = F.conv2d(x, wq, c, padding=1) - F.conv2d(x, w, padding=1)  # [1, 4, 8, 8]
    assert err[..., 1:-1, 1:-1].abs().max() < 1e-4  # interior: exact
    assert err[..., 0, 0].abs().min() > 1e-3  # corner: taps read padding zeros


def test_clipped_normal_mean_matches_scipy_and_monte_carlo():
    mus = [-2.0, -0.3, 0.0, 0.7, 3.0, 7.0]
    sigmas = [0.5, 1.0, 2.0, 0.1, 3.0, 1.5]
    for lower, upper in ((0.0, math.inf), (0.0, 6.0), (-1.0, 2.5), (-math.inf, 1.0)):
        got = clipped_normal_mean(torch.tensor(mus, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64), lower, upper)
        for i, (mu, sigma) in enumerate(zip(mus, sigmas)):
            pdf = stats.norm(mu, sigma).pdf
            lo, hi = max(lower, mu - 12 * sigma), min(upper, mu + 12 * sigma)
            inner = integrate.quad(lambda t: t * pdf(t), lo, hi, epsabs=1e-12)[0] if lo < hi else 0.0
            tails = (lower * stats.norm(mu, sigma).cdf(lower) if lower > -math.inf else 0.0) + (
                upper * stats.norm(mu, sigma).sf(upper) if upper < math.inf else 0.0
            )
            assert abs(float(got[i]) - (inner + tails)) < 1e-8, (lower, upper, mu, sigma)
    # Monte Carlo for ReLU6, and the sigma = 0 limit
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2_000_000, generator=gen, dtype=torch.float64) * 2.0 + 4.0
    mc = float(sample.clamp(0, 6).mean())
    assert abs(float(clipped_normal_mean(torch.tensor(4.0), torch.tensor(2.0), 0.0, 6.0)) - mc) < 5e-3
    torch.testing.assert_close(
        clipped_normal_mean(torch.tensor([-1.0, 3.0, 9.0]), torch.zeros(3), 0.0, 6.0),
        torch.tensor([0.0, 3.0, 6.0], dtype=torch.float64),
    )


def test_analytic_correction_matches_empirical_on_bn_distributed_inputs():
    g = torch.Generator().manual_seed(5)
    beta, gamma = torch.randn(12, generator=g), torch.rand(12, generator=g) * 2 + 0.2
    y = torch.randn(200_000, 12, generator=g) * gamma + beta  # BN output model N(β, γ²)
    for act, fn in (("relu", torch.relu), ("relu6", lambda t: t.clamp(0, 6)), ("identity", lambda t: t)):
        expected = expected_activation_from_bn(beta, gamma, act)
        assert (expected - fn(y).double().mean(0)).abs().max() < 0.02, act
    w = torch.randn(6, 12, generator=g)
    dw = _quantize_up(w) - w
    analytic = analytic_bias_correction(dw, beta, gamma, "relu")
    empirical = empirical_bias_correction(dw, torch.relu(y).mean(0))
    assert (analytic - empirical).abs().max() < 0.02 * empirical.abs().max()


def test_errors():
    dw = torch.randn(4, 3)
    with pytest.raises(ConfigError, match=r"mean_input has shape \(4,\), expected \(3,\)"):
        empirical_bias_correction(dw, torch.zeros(4))
    with pytest.raises(ConfigError, match="groups=3 must be a positive integer dividing 4"):
        empirical_bias_correction(torch.randn(4, 1, 3, 3), torch.zeros(3), groups=3)
    with pytest.raises(ConfigError, match=r"delta_w must be a floating weight .* got \(4,\)"):
        empirical_bias_correction(torch.randn(4), torch.zeros(4))
    with pytest.raises(NonFiniteError, match="mean_input holds 1 NaN"):
        empirical_bias_correction(dw, torch.tensor([0.0, math.nan, 1.0]))
    with pytest.raises(ConfigError, match="activation 'gelu' is unknown; valid: identity, relu, relu6"):
        analytic_bias_correction(dw, torch.zeros(3), torch.ones(3), "gelu")
    with pytest.raises(ConfigError, match=r"bn_beta \(3,\) and bn_gamma \(2,\)"):
        expected_activation_from_bn(torch.zeros(3), torch.ones(2), "relu")
    with pytest.raises(ConfigError, match="lower=1.0 must be below upper=0.0"):
        clipped_normal_mean(torch.zeros(1), torch.ones(1), 1.0, 0.0)
    with pytest.raises(ConfigError, match=r"output means have shapes \(2,\) and \(3,\)"):
        output_mean_correction(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ConfigError, match="bias_correction.mode: 'both' is unknown; valid: empirical, analytic"):
        BiasCorrectionConfig(mode="both")


def test_per_channel_int4_layer_also_corrected():
    """The same closed form holds for per-channel grids (the usual CNN setting)."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(8, 16, generator=g)
    wq = fake_quantize(w, qparams_from_tensor(w, QuantSpec(qtype=INT4, granularity=PerChannel(0))))
    x = torch.relu(torch.randn(2048, 16, generator=g) + 1.0)
    c = empirical_bias_correction(wq - w, x.mean(0))
    err = F.linear(x, wq, c) - F.linear(x, w)
    assert err.mean(0).abs().max() < 1e-4
