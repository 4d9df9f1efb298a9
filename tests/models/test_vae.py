"""The VAE: the model contract, an ELBO computed by hand, gradients, stability, errors, checkpoints."""

import io
import math

import numpy as np
import pytest
import torch

from gapbench.models import VAE, ModelError, build_vae, load_state
from gapbench.models.posterior import FamilyPosterior
from tests.tolerance import assert_close_ulps

LIKELIHOODS = [
    dict(likelihood="bernoulli"),
    dict(likelihood="logistic", num_levels=256),
    dict(likelihood="categorical", num_levels=8),
    dict(likelihood="gaussian", gaussian_std=0.1),
    dict(likelihood="gaussian"),
    dict(likelihood="gaussian", gaussian_std="decoder"),
]
ARCHITECTURES = [
    ((1, 6, 6), dict(architecture="mlp", encoder_hidden=(9, 8), decoder_hidden=(7,))),
    ((3, 32, 32), dict(architecture="conv", conv_channels=(4, 6, 8))),
]


@pytest.mark.parametrize("encoder", ["ffg", "flow", "realnvp"])
@pytest.mark.parametrize("arch", range(len(ARCHITECTURES)))
@pytest.mark.parametrize("lik", range(len(LIKELIHOODS)))
def test_shapes(lik, arch, encoder):
    shape, arch_kwargs = ARCHITECTURES[arch]
    vae = build_vae(shape, latent_dim=3, encoder=encoder, flow_hidden=5, **arch_kwargs, **LIKELIHOODS[lik])
    x = torch.randint(8, (4,) + shape) / 7.0
    q = vae.posterior(x)
    assert isinstance(q, FamilyPosterior) and q.num_points == 4 and q.latent_dim == 3 == vae.latent_dim
    z, log_q = q.sample_and_log_prob(2)
    assert z.shape == (2, 4, 3) and log_q.shape == (2, 4)
    log_lik = vae.log_likelihood(x, z)
    assert log_lik.shape == (2, 4) and torch.isfinite(log_lik).all()
    torch.testing.assert_close(vae.log_likelihood(x.reshape(4, -1), z), log_lik)  # flat x works too
    assert vae.decode(z).shape == (2, 4, vae.likelihood.num_params, math.prod(shape))
    assert vae.decode_mean(z).shape == (2, 4) + shape


def test_default_model_is_the_papers():
    vae = build_vae((1, 28, 28))
    assert vae.latent_dim == 50 and vae.family.name == "ffg"
    assert sum(p.numel() for p in vae.parameters()) == (784 * 200 + 200 + 200 * 200 + 200 + 200 * 100 + 100) + (
        50 * 200 + 200 + 200 * 200 + 200 + 200 * 784 + 784
    )
    conv = build_vae((3, 32, 32), architecture="conv", likelihood="logistic", num_levels=8, encoder="flow")
    assert conv.family.context_dim == 256 * 4 * 4 and conv.family.num_flow_steps == 2


def test_log_prior_is_the_standard_normal():
    vae = build_vae((4,), latent_dim=3)
    z = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(vae.log_prior(z), expected)


def test_elbo_of_a_tiny_vae_matches_a_hand_computation():
    """P = 3 pixels, D = 2, no hidden layers: every step of the ELBO written out in numpy."""
    vae = build_vae((3,), latent_dim=2, encoder_hidden=(), decoder_hidden=()).double()
    w_enc = np.array([[0.5, -1.0, 0.2], [0.1, 0.3, -0.4], [-0.6, 0.2, 0.1], [0.3, -0.2, 0.5]])
    b_enc = np.array([0.1, -0.2, -0.5, 0.3])
    w_dec = np.array([[1.0, -2.0], [0.5, 0.5], [-1.5, 0.3]])
    b_dec = np.array([0.2, -0.1, 0.4])
    with torch.no_grad():
        vae.encoder.head.weight.copy_(torch.tensor(w_enc)), vae.encoder.head.bias.copy_(torch.tensor(b_enc))
        vae.decoder.net[0].weight.copy_(torch.tensor(w_dec)), vae.decoder.net[0].bias.copy_(torch.tensor(b_dec))
    x = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    num_samples = 4

    torch.manual_seed(5)
    z, log_q = vae.posterior(torch.tensor(x)).sample_and_log_prob(num_samples)
    elbo = (vae.log_likelihood(torch.tensor(x), z) + vae.log_prior(z) - log_q).mean(0)

    torch.manual_seed(5)
    eps = torch.randn(num_samples, 2, 2, dtype=torch.float64).numpy()  # the same draw
    head = x @ w_enc.T + b_enc
    mean, log_var = head[:, :2], head[:, 2:]
    z_hand = mean + np.exp(0.5 * log_var) * eps
    log_q_hand = (-0.5 * np.log(2 * np.pi) - 0.5 * log_var - 0.5 * eps**2).sum(-1)
    log_prior_hand = (-0.5 * np.log(2 * np.pi) - 0.5 * z_hand**2).sum(-1)
    p = 1.0 / (1.0 + np.exp(-(z_hand @ w_dec.T + b_dec)))
    log_lik_hand = (x * np.log(p) + (1 - x) * np.log(1 - p)).sum(-1)
    elbo_hand = (log_lik_hand + log_prior_hand - log_q_hand).mean(0)
    # numpy and torch round differently (other summation orders, exp/log from other libraries): equal up
    # to rounding of the largest intermediate value -- the encoder's head sums 3 inputs and a bias, the
    # ELBO sums 3 pixels, 2 latent dimensions and 3 densities, then averages 4 samples.
    assert_close_ulps(z.detach(), torch.tensor(z_hand), num_terms=4, magnitude=np.abs(head).max() * np.abs(eps).max())
    terms = np.abs(np.stack([log_lik_hand, log_prior_hand, log_q_hand])).max()
    assert_close_ulps(elbo.detach(), torch.tensor(elbo_hand), num_terms=3 + 2 + 3 + 4, magnitude=terms + np.abs(z_hand @ w_dec.T).max())


@pytest.mark.parametrize("encoder", ["ffg", "flow", "realnvp"])
def test_gradients_reach_encoder_decoder_and_flow(encoder):
    vae = build_vae((1, 5, 5), latent_dim=3, encoder=encoder, encoder_hidden=(6,), decoder_hidden=(6,), flow_hidden=4)
    x = torch.bernoulli(torch.full((8, 1, 5, 5), 0.3))
    z, log_q = vae.posterior(x).sample_and_log_prob(3)
    (vae.log_likelihood(x, z) + vae.log_prior(z) - log_q).mean().backward()
    for name, param in vae.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for module in (vae.encoder, vae.decoder):
        assert all(p.grad.abs().sum() > 0 for p in module.parameters())
    if encoder != "ffg":
        assert all(v.shape[0] == 1 for v in vae.flow_params.values())
        assert any(p.grad.abs().sum() > 0 for p in vae.flow_params.values())


@pytest.mark.parametrize("lik", range(len(LIKELIHOODS)))
def test_no_nan_for_extreme_inputs(lik):
    vae = build_vae((1, 4, 4), latent_dim=2, encoder="flow", encoder_hidden=(5,), decoder_hidden=(5,), **LIKELIHOODS[lik])
    x = torch.cat([torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)])
    z_far = torch.tensor([[[1e4, -1e4], [-1e4, 1e4]], [[0.0, 0.0], [1e-30, 0.0]]])
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(30.0)  # a saturated decoder
    log_lik = vae.log_likelihood(x, z_far)
    assert torch.isfinite(log_lik).all()
    z, log_q = vae.posterior(x).sample_and_log_prob(3)
    assert torch.isfinite(z).all() and torch.isfinite(log_q).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(architecture="conv"), "model.architecture 'conv' needs 3x32x32"),
        (dict(likelihood="categorical"), "model.num_levels is required"),
        (dict(likelihood="logistic", num_levels=1), "model.num_levels must be at least 2"),
        (dict(gaussian_std=0.1), "model.gaussian_std is only used"),
        (dict(likelihood="gaussian", gaussian_std=-1.0), "model.gaussian_std"),
        (dict(latent_dim=0), "model.latent_dim must be a positive integer, got 0"),
        (dict(latent_dim=2.5), "model.latent_dim"),
        (dict(encoder_hidden=200), "model.encoder_hidden"),
        (dict(activation="gelu"), "model.activation must be one of"),
        (dict(encoder="iaf"), "model.encoder must be one of"),
        (dict(architecture="resnet"), "model.architecture"),
        (dict(likelihood="poisson"), "model.likelihood"),
        (dict(encoder="flow", num_flow_steps=0), "model.num_flow_steps"),
        (dict(encoder="realnvp", flow_hidden=-3), "model.flow_hidden"),
    ],
)
def test_build_vae_errors(kwargs, match):
    with pytest.raises(ModelError, match=match) as info:
        build_vae((1, 28, 28), **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_num_levels_is_ignored_by_continuous_likelihoods():
    vae = build_vae((1, 4, 4), num_levels=256, latent_dim=2)  # the data's grey levels, passed along
    assert vae.config["num_levels"] is None and vae.likelihood.name == "bernoulli"


def test_conv_channels_error():
    with pytest.raises(ModelError, match="model.conv_channels"):
        build_vae((3, 32, 32), architecture="conv", conv_channels=(8,) * 6)


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("encoder", ["ffg", "flow"])
def test_checkpoint_round_trip(encoder):
    kwargs = dict(latent_dim=3, encoder=encoder, encoder_hidden=(6,), decoder_hidden=(6,), likelihood="gaussian")
    vae = build_vae((1, 4, 4), **kwargs)
    state = vae.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = load_state(build_vae((1, 4, 4), **kwargs), _round_trip(state))
    z = torch.randn(2, 3, 3)
    x = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(other.log_likelihood(x, z), vae.log_likelihood(x, z))
    assert isinstance(other, VAE) and other.config == vae.config


def test_checkpoint_from_another_architecture_fails_clearly():
    state = build_vae((1, 4, 4), latent_dim=3, encoder_hidden=(6,)).state_dict()
    with pytest.raises(ModelError, match=r"'encoder.body.0.weight' has shape \(6, 16\) but the model expects \(7, 16\)"):
        load_state(build_vae((1, 4, 4), latent_dim=3, encoder_hidden=(7,)), state)
    with pytest.raises(ModelError, match=r"has no tensor 'flow_params\.qv_"):
        load_state(build_vae((1, 4, 4), latent_dim=3, encoder_hidden=(6,), encoder="flow"), state)
    with pytest.raises(ModelError, match="unexpected tensor 'likelihood.log_std'"):
        load_state(build_vae((1, 4, 4), latent_dim=3, encoder_hidden=(6,)), {**state, "likelihood.log_std": torch.zeros(16)})
