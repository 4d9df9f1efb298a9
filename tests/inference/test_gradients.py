"""The hand-derived gradient of log p(x, z) against autograd on the same models."""

import pytest
import torch

from gapbench.inference.gradients import log_joint_and_grad, mlp_decoder
from gapbench.models.vae import build_vae
from tests.tolerance import assert_close_ulps


def _autograd(model, x, z):
    z = z.detach().requires_grad_(True)
    value = model.log_prior(z) + model.log_likelihood(x, z)
    (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), grad


@pytest.mark.parametrize("activation", ["elu", "relu", "tanh", "softplus"])
@pytest.mark.parametrize("hidden", [(), (7,), (9, 5)])
def test_hand_derived_gradient_equals_autograd(activation, hidden):
    torch.manual_seed(0)
    model = build_vae((1, 3, 4), latent_dim=3, decoder_hidden=hidden, encoder_hidden=(6,), activation=activation)
    model = model.double().requires_grad_(False)
    assert mlp_decoder(model) is not None
    x = (torch.rand(4, 1, 3, 4) < 0.4).double()
    x[0] = torch.rand(1, 3, 4)  # a fractional image: the cross-entropy, as log_bernoulli gives
    z = 2 * torch.randn(5, 4, 3, dtype=torch.float64)
    value, grad = log_joint_and_grad(model, x, z)
    ref_value, ref_grad = _autograd(model, x, z)
    # Written-out chain rule vs autograd: the same sums in other orders, over 12 pixels and at most 9
    # hidden units per layer, through up to 3 layers.
    num_terms = (12 + 9) * (len(hidden) + 1)
    assert_close_ulps(value, ref_value, num_terms=num_terms)
    assert_close_ulps(grad, ref_grad, num_terms=num_terms, magnitude=ref_grad.abs().max() + ref_value.abs().max())
    none, grad_only = log_joint_and_grad(model, x, z, need_value=False)
    assert none is None
    assert_close_ulps(grad_only, ref_grad, num_terms=num_terms, magnitude=ref_grad.abs().max() + ref_value.abs().max())


def test_models_without_a_written_out_gradient_use_autograd():
    torch.manual_seed(0)
    model = build_vae((1, 2, 3), latent_dim=2, decoder_hidden=(5,), encoder_hidden=(5,), likelihood="gaussian",
                      gaussian_std=0.5).double().requires_grad_(False)
    assert mlp_decoder(model) is None
    x = torch.rand(3, 1, 2, 3, dtype=torch.float64)
    z = torch.randn(4, 3, 2, dtype=torch.float64)
    value, grad = log_joint_and_grad(model, x, z, need_value=False)
    ref_value, ref_grad = _autograd(model, x, z)
    assert torch.allclose(value, ref_value) and torch.allclose(grad, ref_grad)


def test_pretrained_fixture_decoder_gradient(mnist_vae):
    model = mnist_vae
    torch.manual_seed(1)
    z = torch.randn(3, 2, model.latent_dim)
    x = model.sample_x(z[0])
    value, grad = log_joint_and_grad(model, x, z)
    ref_value, ref_grad = _autograd(model, x, z)
    assert torch.allclose(value, ref_value, rtol=1e-5, atol=1e-3)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-3)


class _Opaque:
    """The same model without its written-out decoder: every gradient goes through autograd."""

    def __init__(self, model):
        self.latent_dim, self.log_prior, self.log_likelihood = model.latent_dim, model.log_prior, model.log_likelihood


@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_ais_gives_the_same_chains_with_either_gradient(start):
    from gapbench.inference import ais

    torch.manual_seed(0)
    model = build_vae((1, 3, 4), latent_dim=3, decoder_hidden=(8, 8), encoder_hidden=(6,)).double().requires_grad_(False)
    x = (torch.rand(5, 1, 3, 4) < 0.4).double()
    init = model.posterior(x) if start == "encoder" else None
    fast = ais(model, x, num_steps=30, num_chains=3, init=init, seed=4)
    slow = ais(_Opaque(model), x, num_steps=30, num_chains=3, init=init, seed=4)
    # The gradients differ by rounding (previous test); the chains carry it through 30 transitions of
    # 10 leapfrog steps, each through the decoder's sums (8 hidden units, 12 pixels).
    num_terms = 30 * 10 * (8 + 12)
    assert_close_ulps(fast.log_px, slow.log_px, num_terms=num_terms)
    assert_close_ulps(fast.z, slow.z, num_terms=num_terms)


def test_a_changed_density_falls_back_to_autograd(monkeypatch):
    """A subclass or a patch that changes log p(x|z) must not get the plain MLP's gradient."""
    from gapbench.models.vae import VAE

    torch.manual_seed(0)
    model = build_vae((1, 2, 3), latent_dim=2, decoder_hidden=(5,), encoder_hidden=(5,)).double().requires_grad_(False)
    x = (torch.rand(3, 1, 2, 3) < 0.5).double()
    z = torch.randn(4, 3, 2, dtype=torch.float64)

    class Tempered(VAE):
        def log_likelihood(self, x, z):
            return 0.5 * super().log_likelihood(x, z)

    tempered = Tempered(model.encoder, model.decoder, model.likelihood, model.family, model.input_shape)
    assert mlp_decoder(model) is not None and mlp_decoder(tempered) is None
    value, grad = log_joint_and_grad(tempered, x, z)
    ref_value, ref_grad = _autograd(tempered, x, z)
    assert torch.allclose(value, ref_value) and torch.allclose(grad, ref_grad)
    monkeypatch.setattr(VAE, "log_likelihood", Tempered.log_likelihood)
    assert mlp_decoder(model) is None


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_log_joint_in_z_for_local_fits(likelihood):
    """The local fits' log p(x, z): log_joint's value, and in z (through any function of z, here a
    scaled, shifted z) autograd's gradient; the hand-derived path where the model has one."""
    from gapbench.inference.gradients import log_joint_in_z

    torch.manual_seed(1)
    extra = {"gaussian_std": 0.5} if likelihood == "gaussian" else {}
    model = build_vae((1, 3, 4), latent_dim=3, decoder_hidden=(7,), encoder_hidden=(6,), likelihood=likelihood,
                      **extra).double().requires_grad_(False)
    assert (mlp_decoder(model) is not None) == (likelihood == "bernoulli")
    x = (torch.rand(4, 1, 3, 4) < 0.4).double()
    scale = torch.rand(4, 3, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(5, 4, 3, dtype=torch.float64)
    weights = torch.rand(5, 4, dtype=torch.float64)
    value = log_joint_in_z(model)(x, 2 * scale * eps + 1)
    (grad,) = torch.autograd.grad((weights * value).sum(), scale)
    ref_value, ref_grad_z = _autograd(model, x, 2 * scale.detach() * eps + 1)
    ref_grad = (weights.unsqueeze(-1) * ref_grad_z * 2 * eps).sum(0)
    num_terms = (12 + 7) * 2 + 5
    assert_close_ulps(value.detach(), ref_value, num_terms=num_terms)
    assert_close_ulps(grad, ref_grad, num_terms=num_terms, magnitude=4 * ref_grad_z.abs().max() * eps.abs().max() * 5)
    # No gradient reaches the model's own parameters (the fits move q only).
    model.requires_grad_(True)
    value = log_joint_in_z(model)(x, 2 * scale * eps + 1)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
    if likelihood == "bernoulli":
        assert all(g is None for g in grads)
