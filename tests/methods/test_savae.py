"""savae: the inner SGD reaches the exact optimal FFG, the gradient through the unrolled steps matches
finite differences in float64, each datapoint steps on its own, refine runs the same steps, check refuses flows."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import gapbench.methods.savae as savae
from gapbench.methods.savae import SAVAE, ffg_elbo_terms, unroll
from gapbench.models.posterior import DiagonalGaussian, FamilyPosterior
from gapbench.models.reference import QuadratureBernoulli
from gapbench.ops import log_normal
from gapbench.recipe import SAVAEConfig, TrainConfig, load_recipe
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.inference.test_local import closed_form_elbo
from tests.tolerance import assert_close_ulps, float_tol

F64 = torch.float64


def cubature_noise(num_steps, num_points, dim):
    """eps = ±sqrt(D) e_d (2D points): mean 0 and second moment I exactly, so the "sampled" ELBO of a
    model with a quadratic log p(x, z) (the linear Gaussian) is its exact ELBO, and its gradient exact."""
    pts = torch.cat([torch.eye(dim, dtype=F64), -torch.eye(dim, dtype=F64)]) * math.sqrt(dim)
    return [pts[:, None, :].expand(2 * dim, num_points, dim) for _ in range(num_steps)]


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_inner_steps_reach_the_exact_optimal_ffg(beta):
    """On the linear Gaussian the β-ELBO of q = N(m, diag s²) is, with H = WᵀW/σ² + βI and c = Wᵀ(x-b)/σ²,
    -½ mᵀHm + mᵀc - ½ Σ_d H_dd s_d² + β Σ_d log s_d: its maximum is m = H⁻¹c, s_d² = β / H_dd (at β = 1
    the optimal FFG of p(z|x)). Exact gradients (cubature noise), so SGD with momentum converges to it;
    from 0 the first gradients exceed the clipping norm, so the clipped steps are covered too."""
    model = make_linear_gaussian()
    x = simulate(model, 6)
    n, d = x.shape[0], model.latent_dim
    A = model.W.T @ model.W / model.sigma**2
    H = A + beta * torch.eye(d, dtype=F64)
    c = (x - model.b) @ model.W / model.sigma**2
    best_mean = torch.linalg.solve(H, c.T).T
    best_log_var = torch.log(beta / torch.diagonal(H)).expand(n, d)
    if beta == 1.0:
        opt_mean, opt_log_var = model.optimal_ffg(x)
        assert_close_ulps(best_mean, opt_mean, num_terms=d)
        assert_close_ulps(best_log_var, opt_log_var, num_terms=d)

    clip = 5.0
    zeros = torch.zeros(n, d, dtype=F64)
    assert (torch.linalg.vector_norm(c, dim=-1) > clip).any()  # the first steps are clipped
    # lr 0.12: stable for the mean's largest curvature (0.12 * 21.8 < 2 (1 + momentum)); 500 steps contract
    # the slowest direction (log-variance, curvature β/2: a factor ~0.94 a step at β = 0.5) below float64
    # resolution. (With momentum 0.7 or more the clipped steps can lock into an oscillation.)
    mean, log_var, _ = unroll(model, x, zeros, zeros, cubature_noise(500, n, d), beta, lr=0.12, momentum=0.5,
                              max_grad_norm=clip, create_graph=False)
    # At the fixed point the computed gradient is zero up to rounding (eps times its largest term, here
    # |c| or |H||m|), which moves the parameters by that over the smallest curvature (β/2, or H's least eigenvalue).
    grad_scale = max(c.abs().max().item(), (H.abs().max() * best_mean.abs().max()).item(), 1.0)
    curvature = min(beta / 2, torch.linalg.eigvalsh(H).min().item())
    tol = float_tol(F64, grad_scale / curvature, num_terms=model.data_dim)
    torch.testing.assert_close(mean, best_mean, rtol=0, atol=tol)
    torch.testing.assert_close(log_var, best_log_var, rtol=0, atol=tol)
    if beta == 1.0:  # the refined q's exact ELBO is the best FFG's
        best = closed_form_elbo(model, x, {"mean": opt_mean, "log_var": opt_log_var})
        got = closed_form_elbo(model, x, {"mean": mean, "log_var": log_var})
        assert_close_ulps(got, best, num_terms=model.data_dim, magnitude=model.log_marginal(x))


# ------------------------------------------------------------ gradients through the unrolled steps
def _models():
    return {"linear_gaussian": make_linear_gaussian(),
            "quadrature_bernoulli": QuadratureBernoulli(latent_dim=2, num_pixels=20, seed=0)}


def _problem(model, num_points=3, num_steps=5, num_samples=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = simulate(model, num_points, seed=3).to(F64).detach()
    d = model.latent_dim
    mean0 = torch.randn(num_points, d, generator=gen, dtype=F64)
    log_var0 = 0.5 * torch.randn(num_points, d, generator=gen, dtype=F64) - 1.0
    noise = [torch.randn(num_samples, num_points, d, generator=gen, dtype=F64) for _ in range(num_steps + 1)]
    return x, mean0, log_var0, noise


def _final_elbo(model, x, mean0, log_var0, noise, beta, clip):
    """F_i = L_β(x_i; λ_K) [N] with fixed noise: K = len(noise) - 1 steps, the last noise for the final ELBO."""
    mean, log_var, _ = unroll(model, x, mean0, log_var0, noise[:-1], beta, lr=0.05, momentum=0.5,
                              max_grad_norm=clip, create_graph=True)
    log_lik, log_ratio = ffg_elbo_terms(model, x, mean, log_var, noise[-1])
    return (log_lik + beta * log_ratio).mean(0)


def _central(f, h):
    return (f(h) - f(-h)) / (2 * h)


def _fd_tolerance(f, value, h, num_evaluations):
    """Allowance for a central difference of step h: its truncation error, estimated from the same
    difference at 2h (error ~ h², so |D(2h) - D(h)| ~ 3x the error at h), plus the rounding of F
    (float64 resolution times |F|, over the chained evaluations) divided by h."""
    truncation = (_central(f, 2 * h) - _central(f, h)).abs()
    return truncation + float_tol(F64, value, num_terms=num_evaluations) / h


@pytest.mark.parametrize("clip", [None, 2.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("name", ["linear_gaussian", "quadrature_bernoulli"])
def test_gradient_wrt_encoder_output_matches_finite_differences(name, clip, monkeypatch):
    """dF_i/dλ_0 by autograd through the K steps (second-order terms included) equals central differences
    of F in float64; and with the inner gradient detached (a first-order shortcut) it does not."""
    model = _models()[name]
    x, mean0, log_var0, noise = _problem(model)
    beta, h = 0.7, 1e-5
    if clip is not None:  # the clipping is active: the first inner gradient of some datapoint exceeds it
        m, lv = mean0.clone().requires_grad_(), log_var0.clone().requires_grad_()
        lik, ratio = ffg_elbo_terms(model, x, m, lv, noise[0])
        g = torch.autograd.grad((lik + beta * ratio).mean(0).sum(), [m, lv])
        assert max(torch.linalg.vector_norm(t, dim=-1).max().item() for t in g) > clip

    def autograd_gradient():
        m, lv = mean0.clone().requires_grad_(), log_var0.clone().requires_grad_()
        value = _final_elbo(model, x, m, lv, noise, beta, clip)
        return value.detach(), torch.autograd.grad(value.sum(), [m, lv])

    value, (grad_mean, grad_log_var) = autograd_gradient()
    for which, grad in (("mean", grad_mean), ("log_var", grad_log_var)):
        for dim in range(model.latent_dim):
            # Datapoints step independently: shifting dimension `dim` of every λ_0,i at once gives each F_i's partial.
            def f(step):
                shift = torch.zeros_like(mean0)
                shift[:, dim] = step
                m = (mean0 + shift if which == "mean" else mean0).requires_grad_()
                lv = (log_var0 + shift if which == "log_var" else log_var0).requires_grad_()
                return _final_elbo(model, x, m, lv, noise, beta, clip).detach()

            fd = _central(f, h)
            tol = _fd_tolerance(f, value, h, num_evaluations=len(noise))
            assert ((grad[:, dim] - fd).abs() <= tol).all(), (which, dim, grad[:, dim], fd, tol)

    # The test can fail: detaching the inner gradient leaves dλ_K/dλ_0 = I, off by far more than the allowance.
    clip_rows = savae.clip_rows
    monkeypatch.setattr(savae, "clip_rows", lambda g, max_norm: clip_rows(g.detach(), max_norm))
    _, (broken_mean, broken_log_var) = autograd_gradient()
    assert (broken_mean - grad_mean).abs().max() > 1e3 * float_tol(F64, value, len(noise)) / h
    assert (broken_log_var - grad_log_var).abs().max() > 1e3 * float_tol(F64, value, len(noise)) / h


@pytest.mark.parametrize("name", ["linear_gaussian", "quadrature_bernoulli"])
def test_gradient_wrt_decoder_matches_finite_differences(name, monkeypatch):
    """The decoder's gradient is the total derivative of Σ_i L_β(λ_K) in θ, through the steps (λ_K depends
    on θ): autograd equals central differences in float64; without the path through the steps it does not."""
    model = _models()[name]
    weight = model.W if name == "linear_gaussian" else model.w1  # a decoder weight matrix
    weight.requires_grad_(True)
    x, mean0, log_var0, noise = _problem(model)
    beta, h, clip = 0.7, 1e-5, 2.0

    def autograd_gradient():
        value = _final_elbo(model, x, mean0.clone().requires_grad_(), log_var0.clone().requires_grad_(),
                            noise, beta, clip).sum()
        return value.detach(), torch.autograd.grad(value, weight)[0]

    value, grad = autograd_gradient()
    fd = torch.zeros_like(grad)
    tol = torch.zeros_like(grad)
    base = weight.detach().clone()
    for idx in range(base.numel()):
        def f(step):
            with torch.no_grad():
                weight.copy_(base)
                weight.view(-1)[idx] += step
            return _final_elbo(model, x, mean0.clone().requires_grad_(), log_var0.clone().requires_grad_(),
                               noise, beta, clip).sum().detach()

        fd.view(-1)[idx] = _central(f, h)
        tol.view(-1)[idx] = _fd_tolerance(f, value, h, num_evaluations=len(noise))
    with torch.no_grad():
        weight.copy_(base)
    assert ((grad - fd).abs() <= tol).all(), (grad, fd, tol)

    clip_rows = savae.clip_rows
    monkeypatch.setattr(savae, "clip_rows", lambda g, max_norm: clip_rows(g.detach(), max_norm))
    _, broken = autograd_gradient()
    assert (broken - fd).abs().max() > 1e3 * tol.max()


def test_each_datapoint_steps_on_its_own():
    """The inner objective is a sum over datapoints and the clipping is per datapoint: a datapoint's
    refined λ is the same in any batch (up to rounding), also where some rows are clipped and others not."""
    model = QuadratureBernoulli(latent_dim=2, num_pixels=20, seed=0)
    x, mean0, log_var0, _ = _problem(model, num_points=6)
    mean0 = 3 * mean0  # far from the posterior: large first gradients, clipped
    s = SAVAEConfig(max_grad_norm=5.0)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(1, 6, 2, generator=gen, dtype=F64) for _ in range(s.num_steps)]
    args = (1.0, s.lr, s.momentum, s.max_grad_norm)
    m0, lv0 = mean0.clone().requires_grad_(), log_var0.clone().requires_grad_()
    lik, ratio = ffg_elbo_terms(model, x, m0, lv0, noise[0])
    g = torch.autograd.grad((lik + ratio).mean(0).sum(), [m0, lv0])
    norms = torch.stack([torch.linalg.vector_norm(t, dim=-1) for t in g])
    assert (norms > s.max_grad_norm).any() and (norms < s.max_grad_norm).any()  # some rows clipped, some not

    full = unroll(model, x, mean0, log_var0, noise, *args, create_graph=False)
    keep = torch.tensor([0, 2, 3])
    part = unroll(model, x[keep], mean0[keep], log_var0[keep], [e[:, keep] for e in noise], *args,
                  create_graph=False)
    for a, b in zip(full[:2], part[:2]):
        assert_close_ulps(b, a[keep], num_terms=s.num_steps, magnitude=a.abs().max() + 1)


# ------------------------------------------------------------ the method
class LinearGaussianVAE(nn.Module):
    """The linear-Gaussian model with an affine FFG encoder and its affine decoder z -> Wz + b as
    parameters: the model contract a Method needs."""

    def __init__(self):
        super().__init__()
        self.reference = make_linear_gaussian()
        self.latent_dim, self.sigma = self.reference.latent_dim, self.reference.sigma
        self.encoder = nn.Linear(self.reference.data_dim, 2 * self.latent_dim).to(F64)
        self.decoder = nn.Linear(self.latent_dim, self.reference.data_dim).to(F64)
        with torch.no_grad():
            self.decoder.weight.copy_(self.reference.W)
            self.decoder.bias.copy_(self.reference.b)
        self.flow_params = nn.ParameterDict()
        self.likelihood = None

    def encode(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return {"mean": mean, "log_var": log_var}

    def log_likelihood(self, x, z):
        return log_normal(x, self.decoder(z), torch.full_like(x, 2 * math.log(self.sigma)))

    def log_prior(self, z):
        return self.reference.log_prior(z)


def _method(num_steps=4):
    torch.manual_seed(0)
    model = LinearGaussianVAE()
    settings = SAVAEConfig(num_steps=num_steps, lr=0.05)
    return SAVAE(model, TrainConfig(method="savae"), settings), model


def test_refine_runs_the_inner_steps_from_the_encoder_without_a_graph():
    method, model = _method()
    x = simulate(model.reference, 5)
    torch.manual_seed(7)
    with torch.no_grad():  # as evaluation calls it
        q = method.refine(x)
    assert isinstance(q, FamilyPosterior) and isinstance(q.family, DiagonalGaussian) and q.num_points == 5
    assert not any(v.requires_grad for v in q.params.values())
    torch.manual_seed(7)
    noise = [torch.randn(1, 5, 2, dtype=F64) for _ in range(method.settings.num_steps)]
    params = model.encode(x)
    s = method.settings
    mean, log_var, _ = unroll(model, x, params["mean"].detach(), params["log_var"].detach(), noise, 1.0, s.lr,
                              s.momentum, s.max_grad_norm, create_graph=False)
    # Same ops on the same inputs in the same process: bit-exact.
    assert torch.equal(q.params["mean"], mean) and torch.equal(q.params["log_var"], log_var)
    assert all(p.grad is None for p in model.parameters())


def test_step_trains_encoder_and_decoder_through_the_steps(monkeypatch):
    """The loss a step minimizes, -mean_i L_β(λ_K), has the encoder's and the decoder's gradients through
    the unrolled steps: autograd equals central differences in the encoder's and the decoder's biases,
    the step's noise fixed by reseeding."""
    method, model = _method()
    x = simulate(model.reference, 4)
    z = torch.randn(1, 4, 2, dtype=F64)
    assert torch.allclose(model.log_likelihood(x, z), model.reference.log_likelihood(x, z))  # the same model
    losses = []
    monkeypatch.setattr(method, "apply", lambda loss, *a, **k: losses.append(loss))

    def loss_at(seed=3):
        losses.clear()
        torch.manual_seed(seed)
        result = method.step(x, 0.8)
        assert torch.allclose(losses[0], -result.objective.mean())
        return losses[0]

    loss = loss_at()
    for bias in (model.encoder.bias, model.decoder.bias):
        grad = torch.autograd.grad(loss, bias, retain_graph=True)[0]
        h, base = 1e-5, bias.detach().clone()
        for idx in range(bias.numel()):
            def f(step):
                with torch.no_grad():
                    bias.copy_(base)
                    bias[idx] += step
                return loss_at().detach()

            fd = _central(f, h)
            tol = _fd_tolerance(f, loss.detach(), h, num_evaluations=method.settings.num_steps + 1)
            assert (grad[idx] - fd).abs() <= tol, (idx, grad[idx], fd, tol)
        with torch.no_grad():
            bias.copy_(base)


def test_check_refuses_encoders_other_than_ffg(tiny_method_recipe):
    recipe = load_recipe(tiny_method_recipe("savae"))
    assert SAVAE.check(recipe) is None
    flow = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, encoder="flow"))
    message = SAVAE.check(flow)
    assert "model.encoder" in message and "ffg" in message and "\n" not in message
