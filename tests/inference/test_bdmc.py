"""BDMC: the forward/reverse sandwich contains the exact log p(x)."""

import pytest
import torch

from gapbench.inference import bdmc
from gapbench.models.reference import QuadratureBernoulli
from tests.inference.test_ais import QUICK, stderr_from_ess
from tests.tolerance import assert_close_ulps


def test_sandwich_contains_exact_value(linear_gaussian):
    result = bdmc(linear_gaussian, 8, num_steps=100, seed=0, dtype=torch.float64, **QUICK)
    exact = linear_gaussian.log_marginal(result.x)
    assert result.x.shape == (8, 5) and result.z.shape == (8, 2)
    tol_lower = 4 * stderr_from_ess(result.forward) + 0.02
    tol_upper = 4 * stderr_from_ess(result.reverse) + 0.02
    assert (result.lower <= exact + tol_lower).all()
    assert (result.upper >= exact - tol_upper).all()
    assert result.width.mean() < 0.3 and result.finite.all()


def test_sandwich_closes_as_chains_lengthen():
    model = QuadratureBernoulli(latent_dim=2, num_pixels=40, seed=0)
    results = [bdmc(model, 6, num_steps=t, seed=1, dtype=torch.float64, **QUICK) for t in (3, 100)]
    widths = [r.width.mean() for r in results]
    assert widths[0] > 0.5 and widths[1] < 0.1 * widths[0]
    exact = model.log_marginal_quadrature(results[1].x, num_grid=201)
    assert (results[1].lower <= exact + 4 * stderr_from_ess(results[1].forward) + 0.02).all()
    assert (results[1].upper >= exact - 4 * stderr_from_ess(results[1].reverse) - 0.02).all()


def test_sample_x_fn_and_missing_simulator(linear_gaussian):
    class NoSampler:
        latent_dim = 2
        log_prior = linear_gaussian.log_prior
        log_likelihood = linear_gaussian.log_likelihood

    with pytest.raises(TypeError, match="sample_x_fn"):
        bdmc(NoSampler(), 2, num_steps=2)
    result = bdmc(NoSampler(), 3, num_steps=20, sample_x_fn=linear_gaussian.sample_x, dtype=torch.float64, seed=0,
                  **QUICK)
    assert result.lower.shape == (3,) and result.finite.all()


def test_encoder_start(linear_gaussian):
    # init_fn gives p0 = q(z|x) in both directions; with the exact posterior the sandwich is exact.
    result = bdmc(linear_gaussian, 4, num_steps=5, init_fn=linear_gaussian.posterior, dtype=torch.float64, seed=0,
                  **QUICK)
    exact = linear_gaussian.log_marginal(result.x)
    # Exact up to rounding: 5 increments, each a difference of densities summed over 5 pixels and 2 latents.
    assert_close_ulps(result.lower, exact, num_terms=5 * (5 + 2))
    assert_close_ulps(result.upper, exact, num_terms=5 * (5 + 2))
