"""AIS: exact answers on reference models, convergence, diagnostics, errors."""

import math

import pytest
import torch

from gapbench.inference import ais, ais_reverse, annealing_schedule, effective_sample_size
from gapbench.models.posterior import Posterior
from gapbench.models.reference import QuadratureBernoulli
from tests.inference.conftest import NaNWhere, simulate
from tests.tolerance import assert_close_ulps

# Small-model settings: a larger first step and fewer leapfrog steps than the defaults.
QUICK = dict(num_chains=64, num_leapfrog=3, step_size=0.2)


def stderr_from_ess(result):
    """Delta-method standard error of log p_hat from the chains' ESS: sqrt((C/ESS - 1) / C)."""
    c = result.num_chains
    return ((c / result.ess - 1) / c).clamp_min(0).sqrt()


def test_schedules():
    for name in ("sigmoid", "linear"):
        beta = annealing_schedule(100, name)
        assert beta.shape == (101,) and beta.dtype == torch.float64
        assert beta[0] == 0 and beta[-1] == 1 and (beta.diff() > 0).all()
    sig = annealing_schedule(100, "sigmoid")
    torch.testing.assert_close(sig + sig.flip(0), torch.ones(101, dtype=torch.float64))  # symmetric
    assert sig[1] < 0.01  # small first steps, where the tempered density changes fastest
    with pytest.raises(ValueError, match="schedule"):
        annealing_schedule(10, "cosine")


def test_ais_matches_quadrature(quad_model, quad_data):
    exact = quad_model.log_marginal_quadrature(quad_data)
    result = ais(quad_model, quad_data, num_steps=300, seed=0, **QUICK)
    assert result.log_px.shape == (4,) and result.log_weights.shape == (64, 4)
    assert ((result.log_px - exact).abs() < 4 * stderr_from_ess(result) + 0.02).all()
    assert result.finite.all() and (result.ess >= 1).all() and (result.ess <= 64).all()


def test_ais_error_shrinks_with_more_steps():
    model = QuadratureBernoulli(latent_dim=2, num_pixels=40, seed=0)
    x = simulate(model, 8, seed=3)
    exact = model.log_marginal_quadrature(x, num_grid=201)
    errors = [(ais(model, x, num_steps=t, seed=0, **QUICK).log_px - exact).abs().mean() for t in (3, 100)]
    assert errors[0] > 0.2 and errors[1] < 0.5 * errors[0]


def test_start_at_exact_posterior_gives_exact_answer(linear_gaussian, lg_data):
    # With p0 = p(z|x), log p(x, z) - log p0(z) = log p(x) everywhere: every weight is exact.
    result = ais(linear_gaussian, lg_data, num_steps=5, init=linear_gaussian.posterior(lg_data), seed=0, **QUICK)
    # Exact up to rounding: 5 increments, each a difference of densities summed over 5 pixels and 2 latents.
    assert_close_ulps(result.log_px, linear_gaussian.log_marginal(lg_data), num_terms=5 * (5 + 2))
    torch.testing.assert_close(result.ess, torch.full((6,), 64.0, dtype=torch.float64))


def test_reverse_ais_is_an_upper_bound(linear_gaussian):
    torch.manual_seed(0)
    z = torch.randn(6, 2, dtype=torch.float64)
    x = linear_gaussian.sample_x(z)
    exact = linear_gaussian.log_marginal(x)
    short = ais_reverse(linear_gaussian, x, z, num_steps=3, seed=0, **QUICK)
    longer = ais_reverse(linear_gaussian, x, z, num_steps=200, seed=0, **QUICK)
    assert short.reverse and (short.log_px - exact).mean() > 0.3  # short chains: a loose upper bound
    assert ((longer.log_px - exact) > -4 * stderr_from_ess(longer) - 0.02).all()
    assert (longer.log_px - exact).mean() < 0.5 * (short.log_px - exact).mean()


def test_record_every_traces_the_running_estimate(quad_model, quad_data):
    result = ais(quad_model, quad_data, num_steps=20, record_every=5, seed=0, **QUICK)
    assert result.trace.steps.tolist() == [5, 10, 15, 20]
    assert result.trace.log_z.shape == (4, 4) and result.trace.beta[-1] == 1.0
    torch.testing.assert_close(result.trace.log_z[-1], result.log_px)
    assert (result.trace.log_z[0] > result.trace.log_z[-1]).all()  # log Z_beta decreases with beta here


def test_step_size_adapts_within_its_range(quad_model, quad_data):
    result = ais(quad_model, quad_data, num_steps=100, num_chains=8, num_leapfrog=2, step_size=0.01, seed=0)
    assert result.step_size.shape == (8, 4)
    assert (result.step_size >= 1e-4).all() and (result.step_size <= 0.5).all()
    assert (result.step_size > 0.01).any()  # it grew from its start on an easy target
    assert 0.0 < float(result.acceptance.mean()) <= 1.0


def test_chunks_and_dtypes(quad_model, quad_data):
    chunked = ais(quad_model, quad_data.float(), num_steps=10, chunk_size=3, seed=0, **QUICK)
    assert chunked.log_px.dtype == torch.float64 and chunked.log_weights.dtype == torch.float64
    assert chunked.z.dtype == torch.float32 and chunked.z.shape == (64, 4, 1)
    exact = quad_model.log_marginal_quadrature(quad_data)
    assert ((chunked.log_px - exact).abs() < 4 * stderr_from_ess(chunked) + 0.3).all()


def test_effective_sample_size():
    log_w = torch.log(torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(effective_sample_size(log_w), torch.tensor([3.0, 1.0], dtype=torch.float64))


class BoundPosterior(Posterior):
    exact_log_prob = False
    num_points, latent_dim = 6, 2


def test_start_without_exact_density_is_refused(linear_gaussian, lg_data):
    with pytest.raises(ValueError, match="exact log-density"):
        ais(linear_gaussian, lg_data, num_steps=2, init=BoundPosterior())


def test_aux_flow_start_is_refused_when_registered(linear_gaussian, lg_data):
    from gapbench.models.posterior import FAMILIES, get_family

    if "flow" not in FAMILIES:
        pytest.skip("the 'flow' family is not registered yet")
    family = get_family("flow", 2)
    q = family.posterior(family.init_params(6, dtype=torch.float64), 6)
    with pytest.raises(ValueError, match="exact log-density"):
        ais(linear_gaussian, lg_data, num_steps=2, init=q)


def test_realnvp_start_is_accepted_when_registered(linear_gaussian, lg_data):
    from gapbench.models.posterior import FAMILIES, get_family

    if "realnvp" not in FAMILIES:
        pytest.skip("the 'realnvp' family is not registered yet")
    family = get_family("realnvp", 2)
    q = family.posterior(family.init_params(6, dtype=torch.float64), 6)
    result = ais(linear_gaussian, lg_data, num_steps=50, init=q, seed=0, **QUICK)
    exact = linear_gaussian.log_marginal(lg_data)
    assert ((result.log_px - exact).abs() < 4 * stderr_from_ess(result) + 0.05).all()


class ShiftedPrior:
    """A model whose prior is N(1, I): init=None must refuse it rather than assume N(0, I)."""

    latent_dim = 2

    def log_prior(self, z):
        return -0.5 * ((z - 1) ** 2).sum(-1) - math.log(2 * math.pi)

    def log_likelihood(self, x, z):
        return -((x - z) ** 2).sum(-1)


def test_non_standard_prior_must_be_passed_as_init():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="pass the prior as init"):
        ais(ShiftedPrior(), x, num_steps=2)
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.ones(3, 2), torch.ones(3, 2)), 1)
    result = ais(ShiftedPrior(), x, num_steps=50, init=prior, seed=0, **QUICK)
    # Closed form: p(x) = int N(z; 1, I) exp(-|x - z|^2) dz = prod_d sqrt(pi) N(x_d; 1, 1 + 1/2).
    exact = 2 * (0.5 * math.log(math.pi) - 0.5 * math.log(2 * math.pi * 1.5) - 1 / (2 * 1.5))
    assert ((result.log_px - exact).abs() < 4 * stderr_from_ess(result) + 0.02).all()


def test_nonfinite_datapoint_is_flagged(quad_model, quad_data, caplog):
    x = quad_data.clone()
    x[2, 0] = float("nan")
    result = ais(NaNWhere(quad_model, lambda x: torch.isnan(x[:, 0])), x, num_steps=10, seed=0, **QUICK)
    assert result.finite.tolist() == [True, True, False, True] and result.num_nonfinite == 1
    assert torch.isfinite(result.log_px[[0, 1, 3]]).all()
    assert "1 of 4 datapoints" in caplog.text


def test_auto_step_size_starts_at_a_tenth_of_the_start_distributions_scale(linear_gaussian, lg_data):
    from gapbench.models.posterior import DiagonalGaussian

    n, d = lg_data.shape[0], linear_gaussian.latent_dim
    log_var = torch.log(torch.linspace(0.01, 4.0, n, dtype=torch.float64))[:, None].expand(n, d).contiguous()
    q = DiagonalGaussian(d).posterior({"mean": torch.zeros(n, d, dtype=torch.float64), "log_var": log_var}, n)
    # after one transition each chain's step size is its start times 1.02 or 0.98
    for init, start in ((None, torch.full((n,), 0.1, dtype=torch.float64)), (q, 0.1 * log_var[:, 0].mul(0.5).exp())):
        res = ais(linear_gaussian, lg_data, num_steps=1, num_chains=3, init=init, step_size="auto", seed=0)
        ratio = res.step_size / start
        assert torch.all(torch.isclose(ratio, torch.tensor(1.02, dtype=torch.float64))
                         | torch.isclose(ratio, torch.tensor(0.98, dtype=torch.float64)))
