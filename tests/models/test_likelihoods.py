"""Likelihoods: normalization over every value of one pixel, agreement with torch.distributions, stability."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from gapbench.models.likelihoods import (
    Bernoulli,
    Categorical,
    DiscretizedLogistic,
    Gaussian,
    get_likelihood,
)
from tests.tolerance import assert_close_ulps, float_tol

D = torch.distributions


def _one_pixel_log_probs(lik, values, output):
    """log p(x = v | output) for every v in values, one pixel: output [K] -> [len(values)]."""
    x = torch.as_tensor(values, dtype=output.dtype).reshape(-1, 1)  # N values as N datapoints
    out = output.reshape(1, 1, -1, 1).expand(1, len(values), -1, 1)
    return lik.log_prob(x, out)[0]


def test_bernoulli_normalizes_and_matches_torch():
    lik = Bernoulli(1)
    for logit in [-80.0, -3.0, 0.0, 0.7, 80.0]:
        log_p = _one_pixel_log_probs(lik, [0.0, 1.0], torch.tensor([logit], dtype=torch.float64))
        assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=float_tol(torch.float64, log_p, 2))
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6) * 5
    x = torch.bernoulli(torch.full((4, 6), 0.4))
    expected = D.Bernoulli(logits=logits).log_prob(x).sum(-1)
    assert_close_ulps(Bernoulli(6).log_prob(x, logits), expected, num_terms=6)  # float32, 6 same-sign terms


@pytest.mark.parametrize("num_levels", [2, 3, 8, 256])
def test_discretized_logistic_sums_to_one(num_levels):
    lik = DiscretizedLogistic(1, num_levels)
    values = np.arange(num_levels) / (num_levels - 1)
    for mean in [-3.0, 0.0, 0.31, 0.5, 1.0, 4.0]:
        for log_scale in [-7.0, -4.0, -1.0, 0.0, 2.0]:
            log_p = _one_pixel_log_probs(lik, values, torch.tensor([mean, log_scale], dtype=torch.float64))
            assert torch.isfinite(log_p).all()
            # log_mid cancels terms as large as the standardized bin edges (|x - mean| + half) / scale;
            # the logsumexp adds num_levels terms. F.softplus returns x itself beyond 20, an error of up
            # to e^-20 in each of log_mid's two softplus terms (measured: 3.6e-11 at mean 0.31, log_scale -4).
            edge = (max(abs(mean), abs(1 - mean)) + 1.0) * math.exp(-log_scale)
            tol = float_tol(torch.float64, max(edge, log_p.abs().max().item()), num_levels + 4) + 2 * math.exp(-20)
            assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=tol), (mean, log_scale)


def test_discretized_logistic_matches_torch_logistic_cdf():
    num_levels, mean, log_scale = 8, 0.37, -1.3
    # Logistic(m, s) as a transformed Uniform: its cdf gives each bin's mass.
    logistic = D.TransformedDistribution(
        D.Uniform(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
        [D.transforms.SigmoidTransform().inv, D.transforms.AffineTransform(mean, math.exp(log_scale))],
    )
    half = 0.5 / (num_levels - 1)
    values = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)
    upper = torch.where(values < 1, logistic.cdf(values + half), torch.ones_like(values))
    lower = torch.where(values > 0, logistic.cdf(values - half), torch.zeros_like(values))
    expected = torch.log(upper - lower)
    got = _one_pixel_log_probs(DiscretizedLogistic(1, num_levels), values, torch.tensor([mean, log_scale], dtype=torch.float64))
    torch.testing.assert_close(got, expected)


def test_discretized_logistic_is_stable_far_in_the_tails():
    lik = DiscretizedLogistic(3, 256)
    x = torch.tensor([[0.0, 0.5, 1.0]])
    out = torch.tensor([[[[50.0, -50.0, 1e4], [-7.0, -20.0, -7.0]]]], requires_grad=True)  # [1, 1, 2, 3]
    log_p = lik.log_prob(x, out)
    log_p.backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(out.grad).all()
    assert log_p.item() < -1e3  # every pixel is far from its mean


@pytest.mark.parametrize("num_levels", [2, 8])
def test_categorical_normalizes_and_matches_torch(num_levels):
    torch.manual_seed(1)
    logits = torch.randn(num_levels, dtype=torch.float64) * 3
    values = np.arange(num_levels) / (num_levels - 1)
    log_p = _one_pixel_log_probs(Categorical(1, num_levels), values, logits)
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=float_tol(torch.float64, log_p, num_levels))
    torch.testing.assert_close(log_p, D.Categorical(logits=logits).log_prob(torch.arange(num_levels)))
    # several pixels and samples: the sum of per-pixel categoricals
    out = torch.randn(2, 3, num_levels, 5)
    k = torch.randint(num_levels, (3, 5))
    expected = D.Categorical(logits=out.permute(0, 1, 3, 2)).log_prob(k).sum(-1)
    # float32: a log-softmax over num_levels logits for each of 5 pixels, summed
    assert_close_ulps(Categorical(5, num_levels).log_prob(k / (num_levels - 1), out), expected, num_terms=5 * num_levels)


@pytest.mark.parametrize("std", [0.3, None, "decoder"])
def test_gaussian_integrates_to_one_and_matches_torch(std):
    lik = Gaussian(1, std).double()
    if std is None:
        with torch.no_grad():
            lik.log_std.fill_(math.log(0.7))
    output = torch.tensor([0.2, math.log(1.9)] if std == "decoder" else [0.2], dtype=torch.float64)

    def density(v):
        return _one_pixel_log_probs(lik, [v], output).exp().item()

    total, _ = integrate.quad(density, -60, 60, points=[0.2], limit=200)
    assert total == pytest.approx(1.0, abs=1e-8)  # the quadrature's own error allowance; rounding is ~1e-14
    sigma = {0.3: 0.3, None: 0.7, "decoder": 1.9}[std]
    values = torch.tensor([-1.0, 0.0, 0.45, 1.0], dtype=torch.float64)
    torch.testing.assert_close(_one_pixel_log_probs(lik, values, output), D.Normal(0.2, sigma).log_prob(values))


def test_learned_gaussian_std_gets_gradients():
    lik = Gaussian(4)
    lik.log_prob(torch.rand(2, 4), torch.randn(3, 2, 4)).sum().backward()
    assert lik.log_std.grad is not None and (lik.log_std.grad != 0).all()


def test_image_and_flat_inputs_agree():
    lik = get_likelihood("logistic", 2 * 3 * 3, num_levels=256)
    x = torch.randint(256, (4, 2, 3, 3)) / 255.0
    out = torch.randn(5, 4, 2, 18)
    expected = lik.log_prob(x.reshape(4, -1), out)
    # float32, 18 pixels summed; each pixel's log_mid cancels terms up to its standardized bin edge
    edges = ((out[:, :, 0].abs() + 2) * torch.exp(-out[:, :, 1].clamp(min=-7))).sum(-1)  # [S, N]
    assert_close_ulps(lik.log_prob(x, out.reshape(5, 4, 36)), expected, num_terms=18,
                      magnitude=(edges + expected.abs()).max())
    assert expected.shape == (5, 4)


def test_errors():
    with pytest.raises(ValueError, match="expects 5"):
        Bernoulli(5).log_prob(torch.rand(2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="num_levels"):
        get_likelihood("categorical", 4)
    with pytest.raises(ValueError, match="num_levels"):
        DiscretizedLogistic(4, 1)
    with pytest.raises(ValueError, match="gaussian_std"):
        Gaussian(4, -1.0)
    with pytest.raises(ValueError, match="unknown likelihood"):
        get_likelihood("poisson", 4)
