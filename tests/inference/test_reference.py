"""The reference models' exact answers agree with each other."""

import pytest
import torch

from gapbench.inference import elbo
from gapbench.inference.bounds import elbo_and_stderr
from gapbench.models.reference import LinearGaussian, QuadratureBernoulli, load_npz_vae
from tests.inference.conftest import simulate
from tests.tolerance import assert_close_ulps, float_tol


def test_linear_gaussian_exact_posterior_gives_zero_variance_weights(linear_gaussian, lg_data):
    # With q = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z.
    q = linear_gaussian.posterior(lg_data)
    z = q.sample((7,))
    terms = [linear_gaussian.log_prior(z), linear_gaussian.log_likelihood(lg_data, z), q.log_prob(z)]
    log_w = terms[0] + terms[1] - terms[2]
    exact = linear_gaussian.log_marginal(lg_data)
    # Equal in exact arithmetic; each side sums over P = 5 pixels and D = 2 latents (and a Cholesky
    # factor of a 5 x 5 covariance), rounded relative to the largest of the three densities.
    size = max(t.abs().max() for t in terms)
    assert_close_ulps(log_w, exact.expand_as(log_w), num_terms=2 * (5 + 2), magnitude=size)


def test_linear_gaussian_kl_closed_form_matches_elbo_identity(linear_gaussian, lg_data):
    # log p(x) - L[q] = KL(q || p(z|x)) for any q; compare with a 1-D quadrature-free MC estimate.
    mean, log_var = linear_gaussian.optimal_ffg(lg_data)
    mean = mean + 0.3
    q = torch.distributions.Independent(torch.distributions.Normal(mean, (0.5 * log_var).exp()), 1)
    torch.manual_seed(0)
    value, stderr = elbo_and_stderr(linear_gaussian, lg_data, q, num_samples=20000)
    expected = linear_gaussian.log_marginal(lg_data) - linear_gaussian.kl_to_posterior(mean, log_var, lg_data)
    assert ((value - expected).abs() < 4 * stderr).all()
    assert (linear_gaussian.kl_to_posterior(*linear_gaussian.optimal_ffg(lg_data), lg_data) >= 0).all()


def test_optimal_ffg_is_stationary_point_of_kl(linear_gaussian, lg_data):
    mean, log_var = linear_gaussian.optimal_ffg(lg_data)
    mean.requires_grad_(True)
    log_var = log_var.clone().requires_grad_(True)
    kl = linear_gaussian.kl_to_posterior(mean, log_var, lg_data).sum()
    g_mean, g_log_var = torch.autograd.grad(kl, [mean, log_var])
    # Zero up to rounding: the gradient cancels terms as large as precision x |mean| and the KL's own terms.
    precision = torch.linalg.inv(linear_gaussian.posterior_moments(lg_data)[1])
    size = precision.abs().max() * (1 + mean.abs().max()) ** 2 + kl.abs()
    tol = float_tol(torch.float64, size, num_terms=2 * linear_gaussian.latent_dim)
    assert g_mean.abs().max() < tol and g_log_var.abs().max() < tol


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_quadrature_converges_with_grid(latent_dim):
    model = QuadratureBernoulli(latent_dim=latent_dim, num_pixels=20, seed=1)
    x = simulate(model, 3)
    fine = model.log_marginal_quadrature(x, num_grid=(2001 if latent_dim == 1 else 201))
    coarse = model.log_marginal_quadrature(x, num_grid=(1001 if latent_dim == 1 else 101))
    torch.testing.assert_close(fine, coarse, rtol=0, atol=1e-4)  # midpoint rule: error ~ h^2


def test_quadrature_matches_linear_gaussian_style_check():
    # A model with no pixels has p(x) = 1: the grid must integrate the prior to 1.
    model = QuadratureBernoulli(latent_dim=2, num_pixels=0, seed=0)
    x = torch.zeros(2, 0, dtype=torch.float64)
    # 1e-8: the grid's discretization error for the prior's mass; rounding is ~1e-14
    torch.testing.assert_close(model.log_marginal_quadrature(x), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-8)


def test_linear_gaussian_rejects_bad_shapes():
    with pytest.raises(ValueError):
        LinearGaussian(torch.randn(3, 2), torch.randn(2), 1.0)


def test_npz_vae_loads_and_has_the_model_contract(mnist_vae):
    assert mnist_vae.latent_dim == 50 and mnist_vae.data_dim == 784
    torch.manual_seed(0)
    x = mnist_vae.sample_x(torch.randn(3, 50))
    assert x.shape == (3, 784) and set(x.unique().tolist()) <= {0.0, 1.0}
    q = mnist_vae.posterior(x)
    z, log_q = q.sample_and_log_prob(4)
    assert z.shape == (4, 3, 50) and log_q.shape == (4, 3)
    log_lik = mnist_vae.log_likelihood(x, z)
    assert log_lik.shape == (4, 3) and torch.isfinite(log_lik).all()
    value = elbo(mnist_vae, x, q, num_samples=100, seed=0)
    # A trained MNIST VAE's ELBO on its own samples lies in the usual range of nats.
    assert ((value > -200) & (value < -20)).all()


def test_load_npz_vae_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE weights"):
        load_npz_vae(tmp_path / "absent.npz")
