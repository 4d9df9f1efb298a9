"""Method hmc (Hoffman 2017): its chain leaves the exact posterior invariant, each loss reaches only
its own parameters, and the adapted step size is resumable state."""

import copy

import pytest
import torch

import gapbench.methods.hmc as hmc_module
from gapbench.inference.hmc import hmc_transition
from gapbench.methods.hmc import HMC, hmc_refine
from gapbench.models.vae import build_vae
from gapbench.recipe import HMCConfig, TrainConfig, recipe_from_dict
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.tolerance import assert_close_ulps, mc_tol

NUM_CHAINS = 4000


def moment_errors(num_steps=3, num_leapfrog=5, step_size=0.4):
    """Start NUM_CHAINS chains per datapoint from the exact posterior of a linear-Gaussian model, run
    the method's chain, and return (|mean error| / allowance, |covariance error| / allowance): both
    below 1 when the chain leaves p(z|x) invariant (allowances: mc_tol of the exact standard errors)."""
    model = make_linear_gaussian()
    x = simulate(model, 3)
    mean, cov = model.posterior_moments(x)  # [N, D], [D, D]
    gen = torch.Generator().manual_seed(0)
    z0 = mean + torch.randn(NUM_CHAINS, 3, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    torch.manual_seed(1)
    z, accept = hmc_refine(model, x, z0, step_size, num_steps, num_leapfrog)
    d = z - mean
    emp_cov = torch.einsum("cni,cnj->nij", d, d) / NUM_CHAINS  # [N, D, D], about the exact mean
    var = torch.diagonal(cov)
    mean_se = (var / NUM_CHAINS).sqrt()  # [D]
    cov_se = ((var[:, None] * var[None, :] + cov**2) / NUM_CHAINS).sqrt()  # [D, D]
    return (d.mean(0).abs() / mc_tol(mean_se)).max().item(), (((emp_cov - cov).abs()) / mc_tol(cov_se)).max().item(), \
        accept.mean().item()


def test_the_chain_leaves_the_exact_posterior_invariant():
    mean_err, cov_err, accept = moment_errors()
    # A step size at which about a third of the proposals are rejected: the accept test is doing work.
    assert 0.45 < accept < 0.85
    assert mean_err < 1 and cov_err < 1, (mean_err, cov_err)


def test_a_chain_without_the_accept_test_fails_the_invariance_check(monkeypatch):
    def always_accept(state, step_size, num_leapfrog, fn, generator=None):
        momentum = torch.randn(state.z.shape, dtype=state.z.dtype)
        return hmc_transition(state, step_size, num_leapfrog, fn, momentum, torch.zeros(state.z.shape[:-1],
                                                                                      dtype=state.z.dtype))

    monkeypatch.setattr(hmc_module, "hmc_step", always_accept)
    mean_err, cov_err, _ = moment_errors()
    assert max(mean_err, cov_err) > 1


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return build_vae((12,), latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,))


def tiny_data(n=6, seed=1):
    return (torch.rand(n, 12, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def test_the_encoder_gets_its_elbo_gradient_and_the_decoder_that_of_log_p_at_the_chain_end():
    settings = HMCConfig(num_steps=2, num_leapfrog=3, step_size=0.1)
    model, x, beta = tiny_vae(), tiny_data(), 0.5
    before = copy.deepcopy(model)
    method = HMC(model, TrainConfig(num_samples=2), settings)
    torch.manual_seed(5)
    method.step(x, beta)
    got = {name: p.grad for name, p in model.named_parameters()}

    # The same draws, by hand, on the weights before the update.
    torch.manual_seed(5)
    z0, log_q = before.posterior(x).sample_and_log_prob(2)
    elbo = (before.log_likelihood(x, z0) + beta * (before.log_prior(z0) - log_q)).mean()
    z_m, _ = hmc_refine(before, x, z0, 0.1, 2, 3)
    joint = (before.log_likelihood(x, z_m) + before.log_prior(z_m)).mean()
    assert not torch.equal(z_m, z0)
    for name, p in before.named_parameters():
        loss = -elbo if name.startswith("encoder.") else -joint
        (expected,) = torch.autograd.grad(loss, p, retain_graph=True)
        assert_close_ulps(got[name], expected, num_terms=64, magnitude=expected.abs().max() + 1e-6)


@pytest.mark.parametrize("start, factor", [(5.0, 0.98), (1e-4, 1.02)])
def test_the_step_size_shrinks_when_too_few_proposals_are_accepted_and_grows_when_nearly_all_are(start, factor):
    method = HMC(tiny_vae(), TrainConfig(), HMCConfig(num_steps=3, num_leapfrog=5, step_size=start))
    torch.manual_seed(0)
    method.step(tiny_data(), 1.0)
    assert (method.last_acceptance < 0.65) == (factor < 1)
    assert method.step_size == start * factor


def test_the_adapted_step_size_is_resumed():
    settings = HMCConfig(num_steps=2, num_leapfrog=2, step_size=0.3)
    method = HMC(tiny_vae(), TrainConfig(), settings)
    for _ in range(3):
        method.step(tiny_data(), 1.0)
    fresh = HMC(tiny_vae(), TrainConfig(), settings)
    fresh.load_state_dict(copy.deepcopy(method.state_dict()))
    assert fresh.step_size == method.step_size != 0.3


def test_check_refuses_a_target_acceptance_of_one():
    assert HMC.check(recipe_from_dict({"train": {"method": "hmc"}})) is None
    problem = HMC.check(recipe_from_dict({"train": {"method": "hmc", "hmc": {"target_acceptance": 1.0}}}))
    assert problem.startswith("train.hmc.target_acceptance:")
