"""Flow families: identity start, exact log-density (RealNVP), the auxiliary bound, batching, seeding."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from gapbench.models.flows import AuxiliaryFlow, RealNVP
from gapbench.models.posterior import FAMILIES, DiagonalGaussian, gaussian_moments, get_family
from gapbench.ops import log_normal
from tests.models.flow_checks import perturbed, slice_params
from tests.tolerance import assert_close_ulps

DIMS = (1, 2, 5)


def _family(name, dim, **kwargs):
    return AuxiliaryFlow(dim, flow_hidden=8, **kwargs) if name == "flow" else RealNVP(dim, flow_hidden=8)


def _gaussian_init(num_points, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ffg = DiagonalGaussian(dim)
    mean = torch.randn(num_points, dim, generator=gen, dtype=torch.float64)
    log_var = torch.randn(num_points, dim, generator=gen, dtype=torch.float64) * 0.5
    return ffg.posterior({"mean": mean, "log_var": log_var})


def test_families_are_registered():
    assert FAMILIES["flow"] is AuxiliaryFlow and FAMILIES["realnvp"] is RealNVP
    family = get_family("flow", 3, num_flow_steps=3, flow_hidden=11)
    assert (family.num_flow_steps, family.flow_hidden, family.exact_log_prob) == (3, 11, False)
    assert get_family("realnvp", 3).exact_log_prob and get_family("realnvp", 3).num_flow_steps == 4


@pytest.mark.parametrize("name", ["flow", "realnvp"])
@pytest.mark.parametrize("dim", DIMS)
def test_identity_start_reproduces_the_given_gaussian(name, dim):
    family = _family(name, dim)
    init = _gaussian_init(4, dim)
    params = family.init_params(4, init=init, dtype=torch.float64)
    assert all(v.shape[0] == 4 for v in params.values())
    torch.testing.assert_close(params["mean"], init.params["mean"])
    z, log_q = family.sample_and_log_prob(params, 6, 4)
    assert z.shape == (6, 4, dim) and log_q.shape == (6, 4)
    expected = log_normal(z, init.params["mean"], init.params["log_var"])
    # Equal in exact arithmetic for both families; computed by other ops (the flow adds log q(v0) and
    # subtracts log r(vT), each a sum over the A = D auxiliary dimensions), so equal up to rounding.
    assert_close_ulps(log_q, expected, num_terms=4 * dim)
    if name == "realnvp":
        assert_close_ulps(family.log_prob(params, z), expected, num_terms=4 * dim)


def test_prior_start():
    params = AuxiliaryFlow(3).init_params(2)
    assert torch.equal(params["mean"], torch.zeros(2, 3)) and torch.equal(params["log_var"], torch.zeros(2, 3))


@pytest.mark.parametrize("leading", [1, 4])
@pytest.mark.parametrize("dim", DIMS)
def test_realnvp_log_prob_of_its_samples(dim, leading):
    family = RealNVP(dim, flow_hidden=8)
    params = perturbed(family.init_params(leading, init=_gaussian_init(leading, dim), dtype=torch.float64))
    params["mean"] = torch.randn(4, dim, dtype=torch.float64)  # per-datapoint base with shared flow
    z, log_q = family.sample_and_log_prob(params, 5, 4)
    assert z.shape == (5, 4, dim)
    # The inverse pass recomputes every coupling's conditioner (a hidden layer of flow_hidden units on
    # up to D inputs) for each of the num_flow_steps steps: rounding of that many accumulated terms,
    # relative to log q and to its sensitivity to z's own rounding, |z . grad log q|.
    z_grad = z.detach().requires_grad_()
    log_prob = family.log_prob(params, z_grad)
    (grad,) = torch.autograd.grad(log_prob.sum(), z_grad)
    size = (log_prob.abs() + (grad * z).abs().sum(-1)).max()
    num_terms = family.num_flow_steps * (family.flow_hidden + dim)
    assert_close_ulps(log_prob.detach(), log_q, num_terms=num_terms, magnitude=size)


@pytest.mark.parametrize("dim", [1, 2])
def test_realnvp_density_integrates_to_one(dim):
    family = RealNVP(dim, flow_hidden=8)
    params = perturbed(family.init_params(1, dtype=torch.float64), scale=0.2, seed=3)
    params["log_var"] -= 1.0  # keep the mass well inside the integration range
    if dim == 1:
        total, _ = integrate.quad(
            lambda v: family.log_prob(params, torch.tensor([[[v]]], dtype=torch.float64)).exp().item(), -40, 40, limit=200
        )
    else:
        grid = torch.linspace(-16, 16, 801, dtype=torch.float64)
        zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
        density = family.log_prob(params, zz).exp().reshape(801, 801).numpy()
        total = integrate.simpson(integrate.simpson(density, x=grid.numpy()), x=grid.numpy())
    # 1e-5 bounds the quadrature's discretization error; rounding of the 801^2-term sum is ~1e-10.
    assert total == pytest.approx(1.0, abs=1e-5)


def _aux_log_joint(family, params, zv):
    """log q(zT, vT) [S, N] of the auxiliary flow, by inverting the couplings (D = A = 1)."""
    x, logabsdet = family.transform.inverse(params, zv)
    z0, v0 = x[..., :1], x[..., 1:]
    mean_v, log_var_v = family._gaussian(family.q_v, params, z0)
    return log_normal(z0, params["mean"], params["log_var"]) + log_normal(v0, mean_v, log_var_v) + logabsdet


@pytest.mark.slow
def test_aux_bound_by_quadrature():
    """1-D z and v, quadrature on a grid:
    * the joint q(zT, vT) integrates to one (couplings and log-determinants are right);
    * E[bound] - E[log q(zT)] = E KL(q(vT|zT) || r(vT|zT)) >= 0, with q(zT) = int q(zT, v) dv;
    * E[log f(zT) - bound] <= log Z for an unnormalized target f with Z by quadrature.
    """
    family = AuxiliaryFlow(1, flow_hidden=16, aux_dim=1)
    params = perturbed(family.init_params(1, dtype=torch.float64), scale=0.1, seed=0)
    params["mean"] += 0.8
    num_grid = 401
    grid = torch.linspace(-10, 10, num_grid, dtype=torch.float64)
    zv = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
    density = _aux_log_joint(family, params, zv).exp().reshape(num_grid, num_grid).numpy()
    total = integrate.simpson(integrate.simpson(density, x=grid.numpy()), x=grid.numpy())
    assert total == pytest.approx(1.0, abs=1e-6)  # Simpson's discretization error; rounding is ~1e-11

    num_samples = 1000
    z, bound = family.sample_and_log_prob(params, num_samples, 1)  # [S, 1, 1], [S, 1]
    points = torch.stack([z[:, 0, 0, None].expand(-1, num_grid), grid.expand(num_samples, -1)], -1)
    joint = _aux_log_joint(family, params, points.reshape(-1, 1, 2)).exp().reshape(num_samples, num_grid)
    log_q_exact = torch.log(torch.as_tensor(integrate.simpson(joint.numpy(), x=grid.numpy(), axis=1)))
    kl = bound[:, 0] - log_q_exact
    assert kl.mean() > 4 * kl.std() / math.sqrt(num_samples)  # strictly looser than the exact log q

    def log_f(v):
        return -0.25 * v**4 + v

    log_z = math.log(integrate.quad(lambda v: math.exp(log_f(v)), -np.inf, np.inf)[0])
    elbo = log_f(z[:, 0, 0]) - bound[:, 0]
    assert elbo.mean() + 4 * elbo.std() / math.sqrt(num_samples) < log_z
    exact_elbo = log_f(z[:, 0, 0]) - log_q_exact
    assert (exact_elbo - elbo).mean() > 0 and exact_elbo.mean() < log_z + 4 * exact_elbo.std() / math.sqrt(num_samples)


@pytest.mark.parametrize("name", ["flow", "realnvp"])
def test_local_flows_are_batch_independent(name):
    family = _family(name, 3, **({"context_dim": 2} if name == "flow" else {}))
    params = perturbed(family.init_params(4, init=_gaussian_init(4, 3), dtype=torch.float64))
    if name == "flow":
        params["context"] = torch.randn(4, 2, dtype=torch.float64)
    eps = [torch.randn(5, 4, 3, dtype=torch.float64)]
    if name == "flow":
        eps.append(torch.randn(5, 4, family.aux_dim, dtype=torch.float64))
    z, log_q = family.transform_noise(params, *eps)
    # Alone or in the batch, the same arithmetic in another vectorization and summation order (SIMD width
    # and batch size decide it): equal up to rounding of the conditioners' sums (flow_hidden units on D + A
    # inputs, per coupling step). The perturbed aux flow's log r(vT|zT) reaches |log q| ~ 4e5 here, so the
    # allowance is ~1e-8 absolute -- still 1e8 times below what mixing up two datapoints would change.
    num_terms = family.num_flow_steps * (family.flow_hidden + 3 + getattr(family, "aux_dim", 0))
    for i in range(4):
        z_i, log_q_i = family.transform_noise(slice_params(params, i), *[e[:, i : i + 1] for e in eps])
        assert_close_ulps(z_i[:, 0], z[:, i], num_terms=num_terms)
        assert_close_ulps(log_q_i[:, 0], log_q[:, i], num_terms=num_terms)
    sub = family.posterior(params).index(torch.tensor([2, 0]))  # FamilyPosterior.index keeps working
    assert sub.num_points == 2 and sub.params["mean"].shape == (2, 3)


def test_amortized_flow_with_shared_weights_and_context():
    family = AuxiliaryFlow(3, flow_hidden=8, context_dim=6)
    shared = perturbed(family.init_flow_params(1, dtype=torch.float64))
    params = {"mean": torch.randn(5, 3, dtype=torch.float64), "log_var": torch.zeros(5, 3, dtype=torch.float64),
              "context": torch.randn(5, 6, dtype=torch.float64), **shared}  # fmt: skip
    assert all(v.shape[0] == 1 for v in shared.values())
    q = family.posterior(params)
    z, log_q = q.sample_and_log_prob(7)
    assert z.shape == (7, 5, 3) and torch.isfinite(log_q).all() and not q.exact_log_prob
    mean, log_var = gaussian_moments(q)  # a local fit starts at the base Gaussian
    torch.testing.assert_close(mean, params["mean"])
    with pytest.raises(NotImplementedError):
        q.log_prob(z)


@pytest.mark.parametrize("name", ["flow", "realnvp"])
def test_initialization_is_seeded_by_the_generator(name):
    family = _family(name, 4)
    a = family.init_params(3, generator=torch.Generator().manual_seed(7))
    b = family.init_params(3, generator=torch.Generator().manual_seed(7))
    c = family.init_params(3, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact: the same draws by the same ops, in one process
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["flow", "realnvp"])
def test_gradients_reach_every_parameter_and_stay_finite(name):
    family = _family(name, 3)
    params = {k: v.requires_grad_() for k, v in family.init_params(4).items()}
    z, log_q = family.sample_and_log_prob(params, 8, 4)
    (-(z**2).sum(-1) - log_q).mean().backward()
    for key, value in params.items():
        assert torch.isfinite(value.grad).all(), key
        if key.endswith("_w1") or key in ("mean", "log_var"):
            assert value.grad.abs().sum() > 0, key  # output layers start at 0 but learn at once


@pytest.mark.parametrize("name", ["flow", "realnvp"])
def test_huge_weights_stay_finite(name):
    family = _family(name, 3)
    params = perturbed(family.init_params(2), scale=10.0)  # ten times the hidden layers' init range
    z, log_q = family.sample_and_log_prob(params, 4, 2)
    assert torch.isfinite(z).all() and torch.isfinite(log_q).all()


def test_bad_settings():
    with pytest.raises(ValueError, match="num_flow_steps"):
        RealNVP(2, num_flow_steps=0)
    with pytest.raises(ValueError, match="flow_hidden"):
        AuxiliaryFlow(2, flow_hidden=0)
    with pytest.raises(ValueError, match="latent_dim"):
        AuxiliaryFlow(0)


@pytest.mark.parametrize("context_dim", [0, 3])
def test_auxiliary_flow_point_major_arithmetic_equals_its_transform(context_dim):
    """The auxiliary flow computes point-major on z and v apart; its couplings must be exactly
    ``family.transform`` on [z, v] (the generic, sample-major code), forward and inverse."""
    dim, num_points, num_samples = 4, 3, 5
    family = AuxiliaryFlow(dim, num_flow_steps=3, flow_hidden=6, context_dim=context_dim)
    params = perturbed(family.init_params(num_points, dtype=torch.float64), scale=0.4)
    if context_dim:
        params["context"] = torch.randn(num_points, context_dim, dtype=torch.float64)
    zv = torch.randn(num_samples, num_points, 2 * dim, dtype=torch.float64)
    expected, expected_logdet = family.transform.forward(params, zv)
    pm = zv.transpose(0, 1)
    z, v, logdet = family._flow(params, pm[..., :dim], pm[..., dim:])
    num_terms = 6 * 6 * 2
    assert_close_ulps(torch.cat([z, v], -1).transpose(0, 1), expected, num_terms=num_terms)
    assert_close_ulps(logdet.transpose(0, 1), expected_logdet, num_terms=num_terms)
    back_z, back_v, inv_logdet = family._flow_inverse(params, z, v)
    inv_expected, inv_expected_logdet = family.transform.inverse(params, expected)
    assert_close_ulps(torch.cat([back_z, back_v], -1).transpose(0, 1), inv_expected, num_terms=num_terms,
                      magnitude=zv.abs().max() + expected.abs().max())
    assert_close_ulps(inv_logdet.transpose(0, 1), inv_expected_logdet, num_terms=num_terms)
