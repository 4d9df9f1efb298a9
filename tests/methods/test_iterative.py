"""Iterative amortized inference: the learned update finds each datapoint's posterior from ELBO gradients
(checked in closed form on a linear-Gaussian model), and each part is trained on its own objective."""

import pytest
import torch

from gapbench.methods import encoder_parameters, get_method
from gapbench.methods.iterative import UPDATE_KEY, Iterative, UpdateNetwork
from gapbench.models.vae import build_vae
from gapbench.recipe import IterativeConfig, TrainConfig, recipe_from_dict
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.tolerance import assert_close_ulps


def linear_gaussian_vae(lg, settings):
    """A gapbench VAE whose decoder is ``lg`` (x|z ~ N(Wz + b, sigma^2 I)), float64, with the update network."""
    torch.manual_seed(0)
    model = build_vae((lg.data_dim,), latent_dim=lg.latent_dim, encoder_hidden=(), decoder_hidden=(),
                      likelihood="gaussian", gaussian_std=lg.sigma)
    Iterative.prepare_model(model, settings)
    model.double()
    with torch.no_grad():
        model.decoder.net[0].weight.copy_(lg.W)
        model.decoder.net[0].bias.copy_(lg.b)
    return model


def test_the_learned_update_finds_each_posterior_from_gradients_alone():
    """On a fixed linear-Gaussian decoder, with an encoder that outputs the prior for every x (so the
    update's only information about x is the ELBO's gradient), 100 training steps of the update network
    bring the refined ELBO on held-out points (closed form: log p(x) − KL(q || p(z|x))) most of the way from
    the best x-independent Gaussian to the best diagonal Gaussian per point, L[q*_FFG]."""
    lg = make_linear_gaussian(data_dim=10, latent_dim=4, sigma=0.7, seed=0)
    settings = IterativeConfig(num_steps=5, hidden=64, num_layers=2)
    model = linear_gaussian_vae(lg, settings)
    with torch.no_grad():
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()  # q_0 = N(0, I) = p(z) for every x
    for p in list(model.encoder.parameters()) + list(model.decoder.parameters()):
        p.requires_grad_(False)  # only the update network learns
    method = Iterative(model, TrainConfig(lr=3e-3, num_samples=1), settings)
    for i in range(100):
        method.step(simulate(lg, 100, seed=1000 + i), 1.0)

    x = simulate(lg, 500, seed=99)  # held out
    torch.manual_seed(5)
    q = method.refine(x)
    assert q.family.name == "ffg" and q.num_points == 500

    def elbo(mean, log_var):
        return (lg.log_marginal(x) - lg.kl_to_posterior(mean, log_var, x)).mean().item()

    start = elbo(*[torch.zeros(500, 4, dtype=torch.float64)] * 2)
    refined = elbo(q.params["mean"], q.params["log_var"])
    best = elbo(*lg.optimal_ffg(x))
    # The best q that ignores x: KL(q || N(mu_i, S)) averaged over i is KL(q || N(mean mu, S)) plus half the
    # spread of the posterior means in the posterior precision P; its best diagonal q leaves only that spread.
    mu, _ = lg.posterior_moments(x)
    dev = mu - mu.mean(0)
    blind = best - 0.5 * ((dev @ lg.posterior_precision()) * dev).sum(-1).mean().item()
    assert start < blind < best
    assert refined <= best
    assert (refined - blind) / (best - blind) > 0.75, (start, blind, refined, best)


def test_the_decoder_learns_from_the_last_elbo_and_the_encoder_from_every_step():
    """One step's gradients equal those of L(λ_T) for the decoder and of Σ_t L(λ_t) for the encoder and
    the update network (same draws: same seed; Adam at learning rate 0 leaves the weights as they were)."""
    torch.manual_seed(0)
    settings = IterativeConfig(num_steps=3, hidden=8, num_layers=1)
    model = build_vae((12,), latent_dim=3, encoder_hidden=(8,), decoder_hidden=(8,))
    Iterative.prepare_model(model, settings)
    model.double()
    x = torch.bernoulli(torch.full((6, 12), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    method = Iterative(model, TrainConfig(lr=1e-3, num_samples=2), settings)
    method.set_lr(0.0)
    torch.manual_seed(7)
    method.step(x, 0.5)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    torch.manual_seed(7)
    objectives, _, _ = method.trajectory(x, 0.5, 2)
    dec = dict(model.decoder.named_parameters(prefix="decoder"))
    enc = {n: p for n, p in model.named_parameters() if n not in dec}
    want = dict(zip(dec, torch.autograd.grad(-objectives[-1].mean(), list(dec.values()), retain_graph=True)))
    want.update(zip(enc, torch.autograd.grad(-torch.stack(objectives).sum(0).mean(), list(enc.values()))))
    assert set(got) == set(want) and any(n.startswith("method_modules." + UPDATE_KEY) for n in got)
    for name in want:
        assert_close_ulps(got[name], want[name], num_terms=64), name
    # and the decoder's gradient is not the sum's
    whole = torch.autograd.grad(-torch.stack(method.trajectory(x, 0.5, 2)[0]).sum(0).mean(),
                                [model.decoder.net[-1].bias])[0]
    assert not torch.allclose(whole, got["decoder.net.2.bias"])


def test_the_update_network_belongs_to_the_encoder_and_the_checkpoint():
    model = build_vae((12,), latent_dim=3, encoder_hidden=(8,), decoder_hidden=(8,))
    Iterative.prepare_model(model, IterativeConfig(hidden=8))
    assert isinstance(model.method_modules[UPDATE_KEY], UpdateNetwork)
    update_ids = {id(p) for p in model.method_modules[UPDATE_KEY].parameters()}
    assert update_ids <= {id(p) for p in encoder_parameters(model)}
    assert any(k.startswith(f"method_modules.{UPDATE_KEY}.") for k in model.state_dict())


@pytest.mark.parametrize("encoding", ["log_sign", "layer_norm"])
def test_refine_is_a_diagonal_gaussian_and_leaves_the_model_alone(encoding):
    torch.manual_seed(0)
    settings = IterativeConfig(num_steps=2, hidden=8, gradient_encoding=encoding)
    model = build_vae((12,), latent_dim=3, encoder_hidden=(8,), decoder_hidden=(8,))
    Iterative.prepare_model(model, settings)
    method = Iterative(model, TrainConfig(), settings)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.bernoulli(torch.full((5, 12), 0.5))
    with torch.no_grad():  # a caller without gradients still gets the refinement, which takes them
        q = method.refine(x)
    assert q.params["mean"].shape == (5, 3) and q.params["log_var"].shape == (5, 3)
    assert not q.params["mean"].requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(q.params["mean"], model.encode(x)["mean"])


def test_check_asks_for_an_ffg_encoder():
    cls = get_method("iterative")
    assert cls is Iterative and cls.refines
    assert cls.check(recipe_from_dict({"train": {"method": "iterative"}})) is None
    problem = cls.check(recipe_from_dict({"train": {"method": "iterative"}, "model": {"encoder": "realnvp"}}))
    assert problem.startswith("model.encoder") and "ffg" in problem
