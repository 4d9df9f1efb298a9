"""Method bsvi (Shu, Bui, Whang & Ermon 2019): the buffered bound of the SVI trajectory, and its step."""

import copy
import math

import torch

from gapbench.methods.bsvi import BSVI, buffer_log_weights, buffered_bound
from gapbench.methods.svi import SVI, svi_steps
from gapbench.models.posterior import DiagonalGaussian
from gapbench.recipe import BSVIConfig, TrainConfig
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.inference.test_local import closed_form_elbo
from tests.methods.test_svi import binary_data, tiny_vae
from tests.tolerance import float_tol, mc_tol

REPEATS = 500  # independent trajectories per datapoint


def _mean_se(values):
    """Mean over the trajectories [REPEATS, N] -> [N], and its standard error."""
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


def _one_hot_log(index, size):
    log_pi = torch.full((size,), -math.inf, dtype=torch.float64)
    log_pi[index] = 0.0
    return log_pi


def test_buffered_bound_lies_between_the_last_svi_elbo_and_log_px():
    """On a linear-Gaussian model, from a poor start, 20 SVI steps: with buffer weights learned on one set of
    trajectories, the bound of fresh ones lies above the exact ELBO of their last step λ_K (beyond Monte
    Carlo error) and below the exact log p(x). With all weight on λ_K it is λ_K's ELBO, with all on λ_0
    λ_0's, and with uniform weights still below log p(x)."""
    model = make_linear_gaussian()
    x = simulate(model, 6)
    mean, log_var = model.optimal_ffg(x)
    xr = x.repeat(REPEATS, 1)
    start = ((mean + 1.5).repeat(REPEATS, 1), (log_var - 1.0).repeat(REPEATS, 1))
    steps = 21

    torch.manual_seed(0)
    learn = svi_steps(model, xr, *start, num_steps=20, lr=0.1, keep_samples=True)
    log_w = buffer_log_weights(model, xr, learn)
    logits = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        (-buffered_bound(log_w, torch.log_softmax(logits, 0)).mean()).backward()
        opt.step()
    log_pi = torch.log_softmax(logits.detach(), 0)

    torch.manual_seed(1)
    fresh = svi_steps(model, xr, *start, num_steps=20, lr=0.1, keep_samples=True)
    log_w = buffer_log_weights(model, xr, fresh)
    last_elbo = closed_form_elbo(model, xr, fresh.params).reshape(REPEATS, 6)
    log_px = model.log_marginal(x)

    def bound(log_pi):
        return buffered_bound(log_w, log_pi).reshape(REPEATS, 6)

    above_last, se_above = _mean_se(bound(log_pi) - last_elbo)
    assert (above_last > mc_tol(se_above)).all(), (above_last, se_above)
    value, se = _mean_se(bound(log_pi))
    assert (value < log_px + mc_tol(se)).all(), (value, log_px)

    on_last, se_last = _mean_se(bound(_one_hot_log(-1, steps)) - last_elbo)
    assert (on_last.abs() < mc_tol(se_last)).all(), on_last
    first_elbo = closed_form_elbo(model, x, {"mean": mean + 1.5, "log_var": log_var - 1.0})
    on_first, se_first = _mean_se(bound(_one_hot_log(0, steps)))
    assert ((on_first - first_elbo).abs() < mc_tol(se_first)).all(), (on_first, first_elbo)
    uniform, se_uniform = _mean_se(bound(torch.full((steps,), -math.log(steps), dtype=torch.float64)))
    assert (uniform < log_px + mc_tol(se_uniform)).all()


def test_buffered_bound_weighs_each_sample_by_its_step():
    """log Σ_k π_k (1/S) Σ_s w_ks, exactly, on hand-made log-weights."""
    log_w = torch.tensor([[[0.0, 1.0]], [[2.0, -1.0]], [[-3.0, 0.5]]], dtype=torch.float64)  # [3, 1, 2]
    log_w = torch.cat([log_w, log_w - 1.0], dim=1)  # S = 2
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = torch.log((pi[:, None, None] * log_w.exp()).sum((0, 1)) / 2)
    got = buffered_bound(log_w, pi.log())
    torch.testing.assert_close(got, expected, rtol=0, atol=float_tol(torch.float64, expected.abs() + 1, 8))


def test_buffer_log_weights_are_each_samples_own_proposals():
    """log w_0s = log p(x, z_0s) - log q_{λ_0}(z_0s) with λ_0 the start, log w_Ks the same with λ_K the end;
    with β, log p(x|z) + β (log p(z) - log q(z))."""
    model = make_linear_gaussian()
    x = simulate(model, 4)
    mean, log_var = model.optimal_ffg(x)
    torch.manual_seed(0)
    run = svi_steps(model, x, mean + 1.0, log_var + 1.0, num_steps=5, lr=0.2, num_samples=3, keep_samples=True)
    ffg = DiagonalGaussian(2)
    for beta in (1.0, 0.25):
        log_w = buffer_log_weights(model, x, run, beta)
        assert log_w.shape == (6, 3, 4)
        for k, params in ((0, {"mean": mean + 1.0, "log_var": log_var + 1.0}), (-1, run.params)):
            z = run.z[k]
            want = model.log_likelihood(x, z) + beta * (model.log_prior(z) - ffg.log_prob(params, z))
            torch.testing.assert_close(log_w[k], want, rtol=0, atol=float_tol(torch.float64, want.abs() + 1, 16))


def _method(**settings):
    return BSVI(tiny_vae(), TrainConfig(lr=1e-3), BSVIConfig(**settings))


def test_step_trains_the_decoder_and_weights_on_the_bound_and_the_encoder_on_its_elbo():
    """With the rate at 0 (nothing moves), a step's gradients are: the decoder's and the buffer logits',
    of the buffered bound (β on log p(z) - log q inside each weight); the encoder's, of its own ELBO."""
    method = _method(num_steps=3, lr=0.05, num_samples=2)
    model = method.model
    method.set_lr(0.0)
    x = binary_data(6)
    beta = 0.5
    torch.manual_seed(7)
    result = method.step(x, beta)
    dec = [p.grad.clone() for p in model.decoder.parameters()]
    enc = [p.grad.clone() for p in model.encoder.parameters()]

    torch.manual_seed(7)
    q0 = model.posterior(x)
    run = svi_steps(model, x, q0.params["mean"], q0.params["log_var"], 3, 0.05, 2, keep_samples=True)
    z = run.z.reshape(8, 6, 2)
    log_w = (model.log_likelihood(x, z) + beta * (model.log_prior(z) - run.log_q.reshape(8, 6))).reshape(4, 2, 6)
    logits = torch.zeros(4, requires_grad=True)
    bound = torch.logsumexp(log_w + torch.log_softmax(logits, 0)[:, None, None] - math.log(2), dim=(0, 1))
    expected = torch.autograd.grad(-bound.mean(), list(model.decoder.parameters()) + [logits])
    z, log_q = q0.sample_and_log_prob(1)
    own = (model.log_likelihood(x, z) + beta * (model.log_prior(z) - log_q)).mean(0)
    expected_enc = torch.autograd.grad(-own.mean(), list(model.encoder.parameters()))
    for got, want in zip(dec + [method.buffer_logits.grad] + enc, list(expected) + list(expected_enc)):
        torch.testing.assert_close(got, want, rtol=0, atol=float_tol(torch.float32, want.abs().max() + 1, 64))
    torch.testing.assert_close(result.objective, bound.detach())


def test_buffer_weights_resume_exactly():
    """The learned weights travel in the method's state: a method loaded from it steps as the original."""
    a = _method(num_steps=2)
    x = binary_data(10)
    for seed in range(3):
        torch.manual_seed(seed)
        a.step(x, 1.0)
    assert not torch.equal(a.buffer_weights(), torch.full((3,), 1 / 3))
    b = BSVI(tiny_vae(seed=9), TrainConfig(lr=1e-3), BSVIConfig(num_steps=2))
    b.model.load_state_dict(a.model.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a checkpoint: no tensor shared with a
    assert torch.equal(b.buffer_logits, a.buffer_logits)
    assert b.optimizers["buffer"].param_groups[0]["params"][0] is b.buffer_logits
    for m in (a, b):
        torch.manual_seed(10)
        m.step(x, 1.0)
    assert torch.equal(a.buffer_logits, b.buffer_logits)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_refine_is_svis_last_step():
    """refine(x) is λ_K of the same SVI steps as method svi's."""
    model = tiny_vae()
    x = binary_data(5)
    torch.manual_seed(0)
    got = BSVI(model, TrainConfig(), BSVIConfig(num_steps=4, lr=0.05)).refine(x)
    torch.manual_seed(0)
    want = SVI(model, TrainConfig(), SVI.settings_class(num_steps=4, lr=0.05)).refine(x)
    assert isinstance(got.family, DiagonalGaussian)
    for k in ("mean", "log_var"):
        assert torch.equal(got.params[k], want.params[k])
