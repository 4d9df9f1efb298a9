"""elbo and iwae: exact values, bound ordering, chunking, input checks."""

import math

import pytest
import torch

from gapbench.inference import elbo, iwae
from gapbench.inference.bounds import elbo_and_stderr, log_weights
from gapbench.models.posterior import DiagonalGaussian


def ffg(mean, log_var):
    return DiagonalGaussian(mean.shape[-1]).posterior({"mean": mean, "log_var": log_var}, mean.shape[0])


def iwae_stderr(model, x, q, k):
    """Delta-method standard error of log(mean of k weights), from a separate draw of k weights."""
    with torch.no_grad():
        lw = log_weights(model, x, q, k).double()
    w = torch.softmax(lw, 0)
    return (k * (w**2).sum(0) - 1).clamp_min(0).sqrt() / math.sqrt(k)


def test_elbo_of_optimal_ffg_matches_closed_form(linear_gaussian, lg_data):
    mean, log_var = linear_gaussian.optimal_ffg(lg_data)
    torch.manual_seed(0)
    value, stderr = elbo_and_stderr(linear_gaussian, lg_data, ffg(mean, log_var), num_samples=5000)
    exact = linear_gaussian.log_marginal(lg_data) - linear_gaussian.kl_to_posterior(mean, log_var, lg_data)
    assert value.shape == (6,) and value.dtype == torch.float64
    assert ((value - exact).abs() < 4 * stderr).all()


def test_exact_posterior_as_q_gives_log_px_for_every_k(linear_gaussian, lg_data):
    exact = linear_gaussian.log_marginal(lg_data)
    q = linear_gaussian.posterior(lg_data)  # a torch Distribution is accepted as q
    torch.testing.assert_close(elbo(linear_gaussian, lg_data, q, num_samples=10), exact)
    torch.testing.assert_close(iwae(linear_gaussian, lg_data, q, num_samples=10), exact)


def test_bounds_in_order_and_iwae_increases_with_k(linear_gaussian, lg_data):
    # L[q] < E[IWAE_10] < E[IWAE_1000] <= log p(x) for a poor q, each point separately,
    # with every comparison beyond 4 Monte Carlo standard errors.
    mean, log_var = linear_gaussian.optimal_ffg(lg_data)
    q = ffg(mean + 0.6, log_var + 1.0)
    exact = linear_gaussian.log_marginal(lg_data)
    torch.manual_seed(1)
    l_q, se = elbo_and_stderr(linear_gaussian, lg_data, q, num_samples=4000)
    iw10 = torch.stack([iwae(linear_gaussian, lg_data, q, num_samples=10) for _ in range(200)])  # [R, N]
    iw1000 = torch.stack([iwae(linear_gaussian, lg_data, q, num_samples=1000) for _ in range(10)])
    se10, se1000 = iw10.std(0) / math.sqrt(200), iw1000.std(0) / math.sqrt(10)
    assert (l_q + 4 * se < iw10.mean(0) - 4 * se10).all()
    assert (iw10.mean(0) + 4 * se10 < iw1000.mean(0) - 4 * se1000).all()
    assert (iw1000.mean(0) < exact + 4 * se1000).all()
    assert (iw1000.mean(0) > exact - 0.1).all()  # nearly tight at k = 1000 for this q


def test_iwae_converges_to_quadrature_value(quad_model, quad_data):
    exact = quad_model.log_marginal_quadrature(quad_data)
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)), 1)
    k = 20000
    torch.manual_seed(0)
    value = iwae(quad_model, quad_data, prior, num_samples=k, chunk_size=3000)
    rel_se = iwae_stderr(quad_model, quad_data, prior, k)
    assert ((value - exact).abs() < 4 * rel_se + 1e-3).all()


def test_chunking_does_not_change_the_estimate_beyond_mc_error(linear_gaussian, lg_data):
    mean, log_var = linear_gaussian.optimal_ffg(lg_data)
    q = ffg(mean, log_var + 0.3)
    whole = iwae(linear_gaussian, lg_data, q, num_samples=3000, seed=0)
    chunked = iwae(linear_gaussian, lg_data, q, num_samples=3000, chunk_size=7, seed=0)
    se = iwae_stderr(linear_gaussian, lg_data, q, 3000)
    assert ((whole - chunked).abs() < 4 * math.sqrt(2) * se).all()


def test_seed_is_reproducible_and_leaves_global_rng_alone(linear_gaussian, lg_data):
    q = ffg(*linear_gaussian.optimal_ffg(lg_data))
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = elbo(linear_gaussian, lg_data, q, num_samples=50, seed=3)
    after = torch.rand(1)
    b = elbo(linear_gaussian, lg_data, q, num_samples=50, seed=3)
    assert torch.equal(a, b) and torch.equal(before, after)  # bit-exact: same seed, same ops, same process


def test_dtype_follows_x(linear_gaussian, lg_data):
    model32 = type(linear_gaussian)(linear_gaussian.W.float(), linear_gaussian.b.float(), linear_gaussian.sigma)
    x = lg_data.float()
    q = ffg(*(t.float() for t in linear_gaussian.optimal_ffg(lg_data)))
    assert torch.isfinite(iwae(model32, x, q, num_samples=100)).all()


def test_nonfinite_values_are_kept_and_logged(linear_gaussian, lg_data, caplog):
    x = lg_data.clone()
    x[2] = float("nan")
    q = ffg(*linear_gaussian.optimal_ffg(lg_data))
    value = iwae(linear_gaussian, x, q, num_samples=20)
    assert torch.isnan(value[2]) and torch.isfinite(value[[0, 1, 3, 4, 5]]).all()
    assert "1 of 6 datapoints" in caplog.text


def test_bad_inputs_raise(linear_gaussian, lg_data):
    q = ffg(*linear_gaussian.optimal_ffg(lg_data[:3]))
    with pytest.raises(ValueError, match="3 datapoints"):
        elbo(linear_gaussian, lg_data, q)
    with pytest.raises(TypeError, match="not a model"):
        iwae(object(), lg_data, q)
    with pytest.raises(TypeError, match="Posterior"):
        iwae(linear_gaussian, lg_data, "q")
    with pytest.raises(ValueError, match="num_samples"):
        elbo(linear_gaussian, lg_data[:3], q, num_samples=0)
