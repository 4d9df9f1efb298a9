"""The path-derivative ("sticking the landing") gradient of the local fits, against exact answers.

Each family's ``sample_and_path_log_prob`` must give (1) the same values as
``sample_and_log_prob`` on the same noise, (2) an unbiased gradient (its mean over many
independent draws equals the total gradient's, and for the FFG on a linear-Gaussian model
the exact gradient of the closed-form ELBO), and (3) a zero gradient, sample by sample,
when q is the exact posterior, where the total gradient is not zero.
"""

import pytest
import torch

from gapbench.inference import fit_local
from gapbench.models.posterior import get_family
from gapbench.models.reference import LinearGaussian
from tests.inference.conftest import simulate
from tests.inference.test_local import FAST, closed_form_elbo
from tests.tolerance import float_tol

FAMILIES = ["ffg", "realnvp", "flow"]


def diagonal_posterior_model(data_dim=5, latent_dim=2, sigma=0.7, seed=0) -> LinearGaussian:
    """A linear-Gaussian model whose posterior covariance is diagonal (orthogonal columns of W),
    so the exact posterior is a member of every family here."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=gen, dtype=torch.float64))
    W = q * torch.tensor([1.5, 0.6], dtype=torch.float64)[:latent_dim]
    b = torch.randn(data_dim, generator=gen, dtype=torch.float64)
    return LinearGaussian(W, b, sigma)


def _family(name, dim):
    kwargs = {} if name == "ffg" else {"num_flow_steps": 2, "flow_hidden": 8}
    return get_family(name, dim, **kwargs)


def _params(fam, n, seed, perturb=0.0):
    """Per-datapoint float64 parameters at the standard normal, every weight moved by ``perturb`` * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    params = fam.init_params(n, dtype=torch.float64, generator=gen)
    return {k: (v + perturb * torch.randn(v.shape, generator=gen, dtype=v.dtype)).requires_grad_(True)
            for k, v in params.items()}


def _objective_grads(fam, model, x, params, path: bool, num_samples=1, seed=0):
    """Per-datapoint ELBO estimates [n] and the gradient of their sum, under a fixed seed."""
    torch.manual_seed(seed)
    sample = fam.sample_and_path_log_prob if path else fam.sample_and_log_prob
    z, log_q = sample(params, num_samples, x.shape[0])
    elbo = (model.log_prior(z) + model.log_likelihood(x, z) - log_q).mean(0)
    grads = torch.autograd.grad(elbo.sum(), list(params.values()), allow_unused=True)
    return elbo.detach(), {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(params.items(), grads)}


@pytest.mark.parametrize("name", FAMILIES)
def test_values_equal_the_total_estimates(name):
    fam = _family(name, 2)
    params = _params(fam, 4, seed=1, perturb=0.3)
    torch.manual_seed(7)
    z1, lq1 = fam.sample_and_log_prob(params, 16, 4)
    torch.manual_seed(7)
    z2, lq2 = fam.sample_and_path_log_prob(params, 16, 4)
    assert torch.equal(z1, z2)
    # The path version inverts the flow instead of reading log q off the noise: equal up to rounding.
    tol = float_tol(torch.float64, lq1.abs().max().item(), num_terms=100)
    assert (lq1 - lq2).abs().max().item() < tol


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_gradient_at_the_exact_posterior(name):
    """At q = p(z|x), log p(x, z) - log q(z) = log p(x) for every z: the path gradient of every
    parameter of q is zero per sample. The total gradient is not (its score term is pure noise),
    and the auxiliary flow's reverse model r(v|z), not the sampling distribution, keeps its own."""
    model = diagonal_posterior_model()
    x = simulate(model, 3)
    mean, cov = model.posterior_moments(x)
    assert (cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))).abs().max() < 1e-12
    fam = _family(name, 2)
    params = _params(fam, 3, seed=2)
    with torch.no_grad():
        params["mean"].copy_(mean)
        params["log_var"].copy_(torch.diagonal(cov, dim1=-2, dim2=-1).log())
    elbo, path = _objective_grads(fam, model, x, params, path=True, num_samples=32)
    _, total = _objective_grads(fam, model, x, params, path=False, num_samples=32)
    log_px = model.log_marginal(x)
    assert (elbo - log_px).abs().max() < float_tol(torch.float64, log_px.abs().max().item(), num_terms=100)
    q_keys = [k for k in params if not k.startswith("rv_")]
    scale = max(g.abs().max().item() for g in total.values())
    assert scale > 1e-3  # the total gradient is noisy here
    worst = max(path[k].abs().max().item() for k in q_keys)
    # Rounding only: the gradient of a constant built from terms of size ~|log p(x)|.
    assert worst < float_tol(torch.float64, log_px.abs().max().item(), num_terms=1000), f"path gradient {worst:.3g} at the exact posterior"
    if name == "flow":
        assert max(path[k].abs().max().item() for k in params if k.startswith("rv_")) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_path_gradient_is_unbiased(name):
    """Away from the optimum, with flows that are not the identity: over 4,000 independent draws (one
    per copy of the same datapoint) the per-draw difference between the total and the path gradient,
    the score term, has mean zero within 5 Monte Carlo standard errors, every coordinate."""
    model = diagonal_posterior_model()
    copies = 4000
    x = simulate(model, 1).expand(copies, -1).contiguous()
    fam = _family(name, 2)
    one = _params(fam, 1, seed=3, perturb=0.4)
    params = {k: v.detach().expand((copies,) + v.shape[1:]).clone().requires_grad_(True) for k, v in one.items()}
    _, path = _objective_grads(fam, model, x, params, path=True, seed=5)
    _, total = _objective_grads(fam, model, x, params, path=False, seed=5)
    for k in params:
        diff = (total[k] - path[k]).reshape(copies, -1)
        mean, se = diff.mean(0), diff.std(0) / copies**0.5
        bad = (mean.abs() > 5 * se + 1e-12)
        assert not bad.any(), f"{k}: score term mean {mean[bad][:3].tolist()} vs se {se[bad][:3].tolist()}"
    # And the path gradient is not the total one (the test can tell them apart).
    assert any((total[k] - path[k]).abs().max() > 1e-6 for k in params)


def test_ffg_path_gradient_matches_the_closed_form_gradient():
    """FFG on a correlated linear-Gaussian posterior: the mean path gradient over 20,000 draws equals
    the exact gradient of the closed-form ELBO within 5 standard errors, coordinate by coordinate."""
    from tests.inference.conftest import make_linear_gaussian

    model = make_linear_gaussian()
    x = simulate(model, 2)
    fam = _family("ffg", 2)
    base = _params(fam, 2, seed=4, perturb=0.5)
    exact = torch.autograd.grad(closed_form_elbo(model, x, base).sum(), [base["mean"], base["log_var"]])
    num = 20000
    torch.manual_seed(11)
    z, log_q = fam.sample_and_path_log_prob(base, num, 2)
    per_sample = model.log_prior(z) + model.log_likelihood(x, z) - log_q  # [S, N]
    # Per-sample gradients via the sum over samples of one datapoint at a time is the mean times S;
    # the spread comes from splitting the draws into 40 blocks.
    blocks = per_sample.reshape(40, num // 40, 2).mean(1)  # [40, N]
    grads = []
    for b in range(40):
        g = torch.autograd.grad(blocks[b].sum(), [base["mean"], base["log_var"]], retain_graph=True)
        grads.append(torch.cat([gi.reshape(-1) for gi in g]))
    grads = torch.stack(grads)  # [40, 2 * N * D]
    mean, se = grads.mean(0), grads.std(0) / 40**0.5
    want = torch.cat([e.reshape(-1) for e in exact])
    assert ((mean - want).abs() <= 5 * se + 1e-9).all(), (mean - want, se)
    assert (want.abs() > 10 * se).any()  # a gradient of zero would not pass


def test_fit_with_the_path_gradient_reaches_the_optimal_ffg(linear_gaussian, lg_data):
    """The same stopping rule and settings as the total-gradient fit of test_local: the fitted q is
    within 0.01 nats of the exact optimal FFG, closed form, for every datapoint."""
    fit = fit_local(linear_gaussian, lg_data, "ffg", seed=0, gradient="path", **FAST)
    mean, log_var = linear_gaussian.optimal_ffg(lg_data)
    best = closed_form_elbo(linear_gaussian, lg_data, {"mean": mean, "log_var": log_var})
    got = closed_form_elbo(linear_gaussian, lg_data, fit.params)
    assert ((best - got) < 0.01).all() and ((best - got) > -1e-9).all()
    assert fit.converged.all()


def test_exact_posterior_start_stays_put():
    """Started at the exact posterior (a member of the FFG family), a path-gradient fit has nothing to
    follow: every step's gradient is zero up to rounding, while the total gradient's noise moves it."""
    model = diagonal_posterior_model()
    x = simulate(model, 3)
    post = model.posterior(x)
    mean, cov = post.mean, post.covariance_matrix
    init = torch.distributions.Independent(torch.distributions.Normal(mean, torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()), 1)
    fit = fit_local(model, x, "ffg", init=init, seed=0, gradient="path", **{**FAST, "max_steps": 200})
    total = fit_local(model, x, "ffg", init=init, seed=0, **{**FAST, "max_steps": 200})
    moved = (total.params["mean"] - mean).abs().max()
    assert moved > 1e-3
    # Not exactly still: Adam divides by the root of the squared gradients (plus its eps of 1e-8), so
    # gradients of rounding size (~1e-14) still move it by ~1e-7 a step. A hundredth of the other's drift.
    assert (fit.params["mean"] - mean).abs().max() < 1e-2 * moved


def test_unknown_gradient_is_refused(linear_gaussian, lg_data):
    with pytest.raises(ValueError, match="gradient must be"):
        fit_local(linear_gaussian, lg_data, "ffg", gradient="score")


def test_the_flows_replayed_inverse_gives_the_inverted_flows_gradient(monkeypatch):
    """The auxiliary flow's path gradient reuses the forward pass's networks in the inverse (their
    inputs agree up to rounding) instead of running them again: every parameter's gradient must be
    the one of the plain inverse, up to rounding, on a non-identity flow."""
    from gapbench.models.flows import AuxiliaryFlow

    model = diagonal_posterior_model()
    x = simulate(model, 3, seed=2)
    fam = _family("flow", 2)
    params = _params(fam, 3, seed=5, perturb=0.4)
    value, grads = _objective_grads(fam, model, x, params, path=True, num_samples=6, seed=3)
    plain_inverse = AuxiliaryFlow._flow_inverse
    monkeypatch.setattr(AuxiliaryFlow, "_flow_inverse",
                        lambda self, p, z, v, replay=None: plain_inverse(self, p, z, v))
    real_net = AuxiliaryFlow._net
    monkeypatch.setattr(AuxiliaryFlow, "_net", staticmethod(
        lambda net, p, x_, context=None, record=None, replay=None: real_net(net, p, x_, context, record, None)))
    ref_value, ref_grads = _objective_grads(fam, model, x, params, path=True, num_samples=6, seed=3)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    tol = float_tol(torch.float64, scale + ref_value.abs().max().item(), num_terms=200)
    assert (value - ref_value).abs().max().item() < tol
    for key, g in ref_grads.items():
        assert (grads[key] - g).abs().max().item() < tol, key
    assert any(g.abs().max().item() > 1e3 * tol for g in ref_grads.values())  # a gradient that is not ~0
