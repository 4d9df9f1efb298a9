"""The local fits' hand-derived path-derivative steps against autograd, and their use by fit_local.

``AuxiliaryFlow.path_elbo_and_grad`` (and the FFG's) must give the ELBO samples of ``sample_and_path_log_prob`` and the
gradient autograd takes through it, on the same noise, for every parameter, up to rounding: on a VAE
whose decoder has its own written-out gradient and on a model that goes through autograd, with flows
far from the identity and an auxiliary size unlike the latent one (a mixed-up index shows).
"""

import pytest
import torch

from gapbench.inference import fit_local
from gapbench.inference.gradients import point_major_joint
from gapbench.models.flows import AuxiliaryFlow
from gapbench.models.posterior import DiagonalGaussian
from gapbench.models.vae import build_vae
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.inference.test_path_gradient import diagonal_posterior_model
from tests.tolerance import float_tol


def _vae():
    torch.manual_seed(0)
    model = build_vae((1, 3, 4), latent_dim=3, decoder_hidden=(9, 5), encoder_hidden=(6,), activation="elu")
    return model.double().requires_grad_(False)


def _case(case):
    """A model with a written-out decoder gradient ("vae") or one that goes through autograd, and 4 points."""
    if case == "vae":
        return _vae(), (torch.rand(4, 1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    model = make_linear_gaussian(data_dim=5, latent_dim=3)
    return model, simulate(model, 4)


def _params(fam, n, seed, perturb):
    gen = torch.Generator().manual_seed(seed)
    params = fam.init_params(n, dtype=torch.float64, generator=gen)
    return {k: v + perturb * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


def _autograd_step(fam, model, x, params, num_samples, seed):
    """ELBO samples [S, N] and the gradient of -(1/S) sum_s ELBO_s, by autograd through sample_and_path_log_prob."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch.manual_seed(seed)
    z, log_q = fam.sample_and_path_log_prob(leaves, num_samples, x.shape[0])
    elbo = model.log_prior(z) + model.log_likelihood(x, z) - log_q
    grads = torch.autograd.grad(-elbo.mean(0).sum(), list(leaves.values()))
    return elbo.detach(), dict(zip(leaves, grads))


def _hand_step(fam, model, x, params, num_samples, seed):
    joint = point_major_joint(model)
    torch.manual_seed(seed)
    return fam.path_elbo_and_grad(params, num_samples, lambda z: joint(x, z))


@pytest.mark.parametrize("case", ["vae", "linear_gaussian"])
@pytest.mark.parametrize("num_flow_steps", [1, 3])
def test_hand_step_equals_autograd(case, num_flow_steps):
    model, x = _case(case)
    fam = AuxiliaryFlow(3, num_flow_steps=num_flow_steps, flow_hidden=7, aux_dim=2)
    params = _params(fam, 4, seed=3, perturb=0.4)
    ref_elbo, ref_grads = _autograd_step(fam, model, x, params, num_samples=5, seed=11)
    elbo, grads = _hand_step(fam, model, x, params, num_samples=5, seed=11)
    assert set(grads) == set(ref_grads)
    # The same sums in other orders: through every network (7 hidden units, widths up to 6) and every
    # coupling, forwards and back; the allowance scales with the largest value involved.
    scale = ref_elbo.abs().max().item() + max(g.abs().max().item() for g in ref_grads.values())
    tol = float_tol(torch.float64, scale, num_terms=200)
    assert (elbo - ref_elbo).abs().max().item() < tol
    for key, g in ref_grads.items():
        assert grads[key].shape == g.shape, key
        assert (grads[key] - g).abs().max().item() < tol, key
    assert min(g.abs().max().item() for g in ref_grads.values()) > 1e3 * tol  # no parameter's gradient is ~0


@pytest.mark.parametrize("case", ["vae", "linear_gaussian"])
def test_ffg_hand_step_equals_autograd(case):
    model, x = _case(case)
    fam = DiagonalGaussian(3)
    params = _params(fam, 4, seed=3, perturb=0.7)
    ref_elbo, ref_grads = _autograd_step(fam, model, x, params, num_samples=6, seed=11)
    elbo, grads = _hand_step(fam, model, x, params, num_samples=6, seed=11)
    scale = ref_elbo.abs().max().item() + max(g.abs().max().item() for g in ref_grads.values())
    tol = float_tol(torch.float64, scale, num_terms=50)
    assert (elbo - ref_elbo).abs().max().item() < tol
    for key, g in ref_grads.items():
        assert grads[key].shape == g.shape and (grads[key] - g).abs().max().item() < tol, key
    assert min(g.abs().max().item() for g in ref_grads.values()) > 1e3 * tol


@pytest.mark.parametrize("family", ["flow", "ffg"])
def test_hand_step_is_zero_for_q_at_the_exact_posterior(family):
    """At q = p(z|x) the path gradient of every parameter of q vanishes sample by sample; the
    reverse model r(v|z) keeps its own (it is not the sampling distribution)."""
    model = diagonal_posterior_model()
    x = simulate(model, 3)
    mean, cov = model.posterior_moments(x)
    fam = AuxiliaryFlow(2, num_flow_steps=2, flow_hidden=8) if family == "flow" else DiagonalGaussian(2)
    params = _params(fam, 3, seed=2, perturb=0.0)
    params["mean"] = mean.clone()
    params["log_var"] = torch.diagonal(cov, dim1=-2, dim2=-1).log().expand(3, -1).clone()  # one covariance for all x
    elbo, grads = _hand_step(fam, model, x, params, num_samples=32, seed=4)
    log_px = model.log_marginal(x)
    tol = float_tol(torch.float64, log_px.abs().max().item(), num_terms=1000)
    assert (elbo - log_px).abs().max().item() < tol
    assert max(g.abs().max().item() for k, g in grads.items() if not k.startswith("rv_")) < tol
    if family == "flow":
        assert max(g.abs().max().item() for k, g in grads.items() if k.startswith("rv_")) > 1e-3


def test_shared_parameters_or_a_context_go_to_autograd():
    model = _vae()
    fam = AuxiliaryFlow(3, num_flow_steps=1, flow_hidden=4)
    shared = _params(fam, 1, seed=0, perturb=0.1)
    shared["mean"] = shared["mean"].expand(2, -1)
    assert fam.path_elbo_and_grad(shared, 3, lambda z: point_major_joint(model)(None, z)) is None
    with_context = AuxiliaryFlow(3, num_flow_steps=1, flow_hidden=4, context_dim=2)
    assert with_context.path_elbo_and_grad(_params(with_context, 2, seed=0, perturb=0.1), 3, None) is None


@pytest.mark.parametrize("family", [AuxiliaryFlow, DiagonalGaussian])
def test_fit_local_takes_the_hand_step_and_fits_as_autograd_does(monkeypatch, family):
    """A short fit (float64) with the hand-derived step ends where the same fit through autograd
    ends, up to rounding; and the hand step is the one fit_local runs."""
    model = _vae()
    x = (torch.rand(3, 1, 3, 4, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    kwargs = dict(family=family.name, lr=3e-3, num_samples=4, check_every=5, patience=2, max_steps=30,
                  num_final_samples=50, seed=9, gradient="path",
                  family_kwargs={"num_flow_steps": 2, "flow_hidden": 6} if family is AuxiliaryFlow else None)
    calls = []
    real = family.path_elbo_and_grad

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(family, "path_elbo_and_grad", counted)
    hand = fit_local(model, x, **kwargs)
    assert len(calls) == int(hand.num_steps.max())
    monkeypatch.setattr(family, "path_elbo_and_grad", lambda self, *args, **kwargs: None)
    ref = fit_local(model, x, **kwargs)
    assert torch.equal(hand.num_steps, ref.num_steps)
    scale = max(v.abs().max().item() for v in ref.params.values())
    for key, value in ref.params.items():
        # 30 Adam steps, each moving a parameter by at most lr, from gradients equal up to rounding
        assert (hand.params[key] - value).abs().max().item() < float_tol(torch.float64, scale, num_terms=1e4), key
    assert (hand.elbo - ref.elbo).abs().max().item() < float_tol(torch.float64, ref.elbo.abs().max(), num_terms=1e4)
