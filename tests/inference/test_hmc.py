"""HMC on Gaussian targets, where the exact answers are known."""

import math

import torch

from gapbench.inference.hmc import hmc_init, hmc_step, kinetic_energy, leapfrog
from tests.tolerance import assert_close_ulps


def gaussian_target(mean, var):
    """log N(z; mean, diag(var)) up to a constant, with its gradient: z [..., D]."""

    def fn(z):
        diff = z - mean
        return -0.5 * (diff**2 / var).sum(-1), -diff / var, ()

    return fn


def test_leapfrog_energy_error_is_second_order():
    torch.manual_seed(0)
    fn = gaussian_target(torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    z = torch.randn(200, 3, dtype=torch.float64)
    p = torch.randn(200, 3, dtype=torch.float64)
    log_f, grad, _ = fn(z)
    errors = []
    for eps in (0.1, 0.05, 0.025):
        num_steps = round(1.0 / eps)  # same integration time
        z1, p1, log_f1, _, _ = leapfrog(z, p, grad, eps, num_steps, fn)
        errors.append(((-log_f1 + kinetic_energy(p1)) - (-log_f + kinetic_energy(p))).abs().mean())
    # Halving eps divides the energy error by 4 (O(eps^2)); 3.5..4.5 leaves room for the O(eps^4) term.
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.5 < coarse / fine < 4.5


def test_leapfrog_is_exactly_reversible():
    torch.manual_seed(1)
    fn = gaussian_target(torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.2, 3.0], dtype=torch.float64))
    z = torch.randn(50, 2, dtype=torch.float64)
    p = torch.randn(50, 2, dtype=torch.float64)
    eps = torch.rand(50, dtype=torch.float64) * 0.3 + 0.05  # one step size per chain
    z1, p1, _, grad1, _ = leapfrog(z, p, fn(z)[1], eps, 17, fn)
    z2, p2, _, _, _ = leapfrog(z1, -p1, grad1, eps, 17, fn)
    # Reversible in exact arithmetic; in floating point each of the 2 x 17 steps rounds a few updates of
    # values as large as the trajectory's.
    size = max(t.abs().max() for t in (z, p, z1, p1))
    assert_close_ulps(z2, z, num_terms=2 * 17 * 3, magnitude=size)
    assert_close_ulps(-p2, p, num_terms=2 * 17 * 3, magnitude=size)


def test_leapfrog_evaluates_the_target_once_per_step():
    calls = []
    base = gaussian_target(torch.zeros(2), torch.ones(2))

    def fn(z):
        calls.append(1)
        return base(z)

    z = torch.zeros(4, 2)
    leapfrog(z, torch.ones(4, 2), torch.zeros(4, 2), 0.1, 10, fn)
    assert len(calls) == 10


def test_hmc_samples_a_conjugate_gaussian_posterior(linear_gaussian):
    # Target: p(z|x) of the linear-Gaussian model, known in closed form.
    torch.manual_seed(2)
    x = linear_gaussian.sample_x(torch.zeros(1, 2, dtype=torch.float64))
    mean, cov = linear_gaussian.posterior_moments(x)  # [1, D], [D, D]
    num_chains = 2000

    def fn(z):  # z [C, 1, D]
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            log_f = linear_gaussian.log_prior(z) + linear_gaussian.log_likelihood(x, z)
            (grad,) = torch.autograd.grad(log_f.sum(), z)
        return log_f.detach(), grad, ()

    state = hmc_init(torch.randn(num_chains, 1, 2, dtype=torch.float64) * 2, fn)
    accepted = []
    for _ in range(60):
        state, info = hmc_step(state, torch.full((num_chains, 1), 0.1, dtype=torch.float64), 5, fn)
        accepted.append(info.accepted.double().mean())
    z = state.z[:, 0]  # [C, D]
    se_mean = (torch.diagonal(cov) / num_chains).sqrt()
    se_var = torch.diagonal(cov) * math.sqrt(2 / (num_chains - 1))
    assert ((z.mean(0) - mean[0]).abs() < 4 * se_mean).all()
    assert ((z.var(0) - torch.diagonal(cov)).abs() < 4 * se_var).all()
    assert 0.5 < torch.stack(accepted).mean() <= 1.0


def test_nonfinite_proposals_are_rejected():
    def fn(z):
        bad = z[..., 0] > 0.5
        log_f = torch.where(bad, torch.full_like(z[..., 0], float("nan")), -0.5 * (z**2).sum(-1))
        return log_f, -z, ()

    z = torch.zeros(100, 1)
    state = hmc_init(z, fn)
    torch.manual_seed(0)
    for _ in range(20):
        state, info = hmc_step(state, 0.4, 3, fn)
        assert not info.accepted[torch.isnan(info.energy_change)].any()
    assert torch.isfinite(state.log_density).all() and (state.z[..., 0] <= 0.5).all()
