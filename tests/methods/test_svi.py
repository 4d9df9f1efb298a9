"""Method svi (Krishnan, Liang & Hoffman 2018): the inner SVI loop, the step, the test-time refinement."""

import pytest
import torch

from gapbench.errors import GapbenchError
from gapbench.inference.bounds import elbo_and_stderr
from gapbench.inference.gradients import joint_density
from gapbench.methods.bsvi import BSVI
from gapbench.methods.base import decoder_parameters, encoder_parameters
from gapbench.methods.svi import SVI, ffg_elbo_gradient, svi_steps
from gapbench.models.posterior import DiagonalGaussian
from gapbench.models.vae import build_vae
from gapbench.recipe import SVIConfig, TrainConfig, load_recipe
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.inference.test_local import closed_form_elbo
from tests.tolerance import float_tol, mc_tol


def tiny_vae(likelihood="bernoulli", seed=0):
    torch.manual_seed(seed)
    kwargs = {"gaussian_std": 0.5} if likelihood == "gaussian" else {}
    return build_vae((1, 4, 4), latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), likelihood=likelihood,
                     **kwargs)


def binary_data(num_points, num_pixels=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((num_points, 1, 4, 4), 0.3), generator=gen)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_gradient_is_autograds_reparameterization_gradient(likelihood):
    """The written-out gradient of each datapoint's ELBO estimate equals autograd's through the FFG family
    (float64; a Bernoulli MLP takes the hand-derived ∇_z log p(x, z), a Gaussian one autograd's)."""
    model = tiny_vae(likelihood).double()
    x = binary_data(5).double()
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    log_var = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(3)
    eps = torch.randn(4, 5, 2, dtype=torch.float64)
    z, grad = ffg_elbo_gradient(joint_density(model, x), mean, log_var, eps)

    leaf = torch.cat([mean, log_var], 1).requires_grad_(True)
    torch.manual_seed(3)  # the family draws the same eps
    z_ref, log_q = DiagonalGaussian(2).sample_and_log_prob({"mean": leaf[:, :2], "log_var": leaf[:, 2:]}, 4)
    elbo = (model.log_prior(z_ref) + model.log_likelihood(x, z_ref) - log_q).mean(0)
    (expected,) = torch.autograd.grad(elbo.sum(), leaf)
    torch.testing.assert_close(z, z_ref.detach(), rtol=0, atol=float_tol(torch.float64, z_ref, 4))
    torch.testing.assert_close(grad, expected, rtol=0, atol=float_tol(torch.float64, expected.abs() + 1, 64))


def test_svi_steps_reach_the_optimal_ffg_of_a_linear_gaussian_model():
    """From a poor start, each datapoint's Adam steps end at the exact best FFG: its closed-form ELBO
    within 0.01 nats of the optimum's (and never above it), its parameters near the optimum's."""
    model = make_linear_gaussian()
    x = simulate(model, 6)
    mean, log_var = model.optimal_ffg(x)
    torch.manual_seed(0)
    run = svi_steps(model, x, mean + 1.0, log_var - 1.0, num_steps=1500, lr=0.01, num_samples=10)
    best = closed_form_elbo(model, x, {"mean": mean, "log_var": log_var})
    start = closed_form_elbo(model, x, {"mean": mean + 1.0, "log_var": log_var - 1.0})
    got = closed_form_elbo(model, x, run.params)
    assert (best - start > 1.0).all()  # the start is far from the optimum
    assert ((best - got) < 0.01).all() and ((best - got) > -float_tol(torch.float64, best, 64)).all()
    assert (run.params["mean"] - mean).abs().max() < 0.05
    assert (run.params["log_var"] - log_var).abs().max() < 0.2


def test_svi_steps_keep_the_samples_each_step_drew():
    """keep_samples: the buffer holds K + 1 draws, z_k from λ_k with its log q_{λ_k}; z_0 from the start."""
    model = make_linear_gaussian()
    x = simulate(model, 3)
    mean, log_var = model.optimal_ffg(x)
    torch.manual_seed(0)
    run = svi_steps(model, x, mean, log_var, num_steps=4, lr=0.1, num_samples=2, keep_samples=True)
    assert run.z.shape == (5, 2, 3, 2) and run.log_q.shape == (5, 2, 3)
    torch.manual_seed(0)
    z0, log_q0 = DiagonalGaussian(2).sample_and_log_prob({"mean": mean, "log_var": log_var}, 2)
    torch.testing.assert_close(run.z[0], z0, rtol=0, atol=float_tol(torch.float64, z0))
    torch.testing.assert_close(run.log_q[0], log_q0, rtol=0, atol=float_tol(torch.float64, log_q0, 8))
    last = DiagonalGaussian(2).log_prob(run.params, run.z[-1])
    torch.testing.assert_close(run.log_q[-1], last, rtol=0, atol=float_tol(torch.float64, last, 8))


def _method(cls=SVI, model=None, **settings):
    model = tiny_vae() if model is None else model
    cfg = cls.settings_class(**settings)
    return cls(model, TrainConfig(lr=1e-3), cfg)


def test_refine_beats_the_encoders_elbo_and_leaves_the_model_alone():
    """refine(x): K steps from the encoder's q give each datapoint a higher ELBO than the (untrained)
    encoder's, beyond Monte Carlo error; it works under no_grad and changes nothing of the model."""
    method = _method()
    model = method.model
    x = binary_data(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        q = method.refine(x)
    assert q.family.name == "ffg" and q.params["mean"].shape == (8, 2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    refined, se_r = elbo_and_stderr(model, x, q, 4000)
    amortized, se_a = elbo_and_stderr(model, x, model.posterior(x), 4000)
    assert (refined - amortized > mc_tol(se_r, se_a)).all(), (refined, amortized)


def test_each_part_is_updated_on_its_own_bound():
    """With the rate at 0 (nothing moves), a step's gradients are: the decoder's, of L(x; λ_K) with λ_K
    fixed; the encoder's, of its own L(x; λ_0), the decoder fixed in it; β weighting log p(z) - log q."""
    method = _method(num_steps=3, lr=0.05)
    model = method.model
    method.set_lr(0.0)
    x = binary_data(6)
    beta = 0.3
    torch.manual_seed(5)
    result = method.step(x, beta)
    dec = [p.grad.clone() for p in model.decoder.parameters()]
    enc = [p.grad.clone() for p in model.encoder.parameters()]

    torch.manual_seed(5)
    q0 = model.posterior(x)
    run = svi_steps(model, x, q0.params["mean"], q0.params["log_var"], 3, 0.05, 1)
    z, log_q = DiagonalGaussian(2).sample_and_log_prob(run.params, 1)
    refined = (model.log_likelihood(x, z) + beta * (model.log_prior(z) - log_q)).mean(0)
    expected_dec = torch.autograd.grad(-refined.mean(), list(model.decoder.parameters()))
    z, log_q = q0.sample_and_log_prob(1)
    own = (model.log_likelihood(x, z) + beta * (model.log_prior(z) - log_q)).mean(0)
    expected_enc = torch.autograd.grad(-own.mean(), list(model.encoder.parameters()))
    for got, want in zip(dec + enc, list(expected_dec) + list(expected_enc)):
        torch.testing.assert_close(got, want, rtol=0, atol=float_tol(torch.float32, want.abs().max() + 1, 64))
    torch.testing.assert_close(result.objective, refined.detach())


def test_update_sends_each_loss_to_its_own_parameters():
    """apply_parts([(a, decoder), (b, encoder)]): the decoder's gradient is a's alone, the encoder's b's alone,
    though both losses depend on both networks."""
    method = _method()
    model = method.model
    method.set_lr(0.0)

    def losses():
        d = sum(p.sum() for p in model.decoder.parameters())
        e = sum((p**2).sum() for p in model.encoder.parameters())
        return d * e, d + 3 * e**2

    a, b = losses()
    method.apply_parts([(a, decoder_parameters(model)), (b, encoder_parameters(model))])
    a, b = losses()
    for p, g in zip(model.decoder.parameters(), torch.autograd.grad(a, list(model.decoder.parameters()))):
        torch.testing.assert_close(p.grad, g)
    for p, g in zip(model.encoder.parameters(), torch.autograd.grad(b, list(model.encoder.parameters()))):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("cls", [SVI, BSVI])
def test_check_refuses_a_flow_encoder_in_one_line(cls, tiny_method_recipe):
    path = tiny_method_recipe(cls.name)
    assert cls.check(load_recipe(path)) is None
    problem = cls.check(load_recipe(path, ["model.encoder=flow"]))
    assert problem and "\n" not in problem and problem.startswith("model.encoder:") and "ffg" in problem
    flow = build_vae((1, 4, 4), latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), encoder="flow",
                     flow_hidden=4)
    with pytest.raises(GapbenchError, match="model.encoder: ffg"):
        cls(flow, TrainConfig(), None)


def test_defaults_are_the_papers():
    s = SVIConfig()
    assert (s.num_steps, s.lr, s.num_samples) == (100, 0.01, 1)
