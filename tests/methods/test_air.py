"""Method air (Shu et al. 2018): the bounded encoder is L-Lipschitz (and the bound is attained where it
can be), the bound survives training and checkpoints, and denoising corrupts only what the encoder
reads in a training step."""

import pytest
import torch

from gapbench.methods.air import AIR, BoundedLinear, bound_encoder
from gapbench.models.vae import ModelError, build_vae, load_state
from gapbench.recipe import AIRConfig, RecipeError, TrainConfig, recipe_from_dict
from tests.tolerance import float_tol, mc_tol


def encoder_output(model, x):
    mean, log_var, _ = model.encoder(x)
    return torch.cat([mean, log_var], dim=-1)


def wide_vae(hidden=(16, 8), activation="elu", seed=0):
    """A float64 VAE whose encoder weights are scaled up until its Lipschitz constant is far above 2."""
    torch.manual_seed(seed)
    model = build_vae((20,), latent_dim=3, encoder_hidden=hidden, decoder_hidden=(8,), activation=activation).double()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(4.0)
    return model


def max_ratio(model, num_pairs=2000, seed=1):
    """max over random pairs (near and far) of |f(x1) - f(x2)| / |x1 - x2|, f the encoder's (mean, log_var)."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.rand(num_pairs, 20, generator=gen, dtype=torch.float64)
    scale = 10.0 ** torch.empty(num_pairs, 1, dtype=torch.float64).uniform_(-4, 0, generator=gen)
    x2 = x1 + scale * torch.randn(num_pairs, 20, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ratio = (encoder_output(model, x1) - encoder_output(model, x2)).norm(dim=-1) / (x1 - x2).norm(dim=-1)
    return ratio.max().item()


@pytest.mark.parametrize("activation", ["elu", "tanh", "relu", "softplus"])
def test_the_bounded_encoder_moves_at_most_L_times_the_input(activation):
    lipschitz = 2.0
    model = wide_vae(activation=activation)
    assert max_ratio(model) > 2 * lipschitz  # unbounded, these weights move the outputs much more
    AIR.prepare_model(model, AIRConfig(kind="lipschitz", lipschitz=lipschitz))
    bounded = [m for m in model.encoder.modules() if isinstance(m, BoundedLinear)]
    assert len(bounded) == 3  # two hidden layers and the head
    for layer in bounded:  # the scaled weights exceed the bound, so each layer sits exactly on it
        sigma = torch.linalg.matrix_norm(layer.weight(), ord=2).item()
        assert abs(sigma - lipschitz ** (1 / 3)) <= float_tol(torch.float64, sigma, num_terms=20)
    assert max_ratio(model) <= lipschitz * (1 + float_tol(torch.float64, 1.0, num_terms=100))


def test_the_bound_is_attained_by_a_single_layer_encoder():
    lipschitz = 0.7
    model = wide_vae(hidden=())
    bound_encoder(model.encoder, lipschitz)
    w = model.encoder.head.weight().detach()
    _, _, vh = torch.linalg.svd(w)
    x = torch.rand(1, 20, dtype=torch.float64)
    dx = 0.3 * vh[:1]  # the top right singular vector: f moves by exactly L |dx| along it
    with torch.no_grad():
        moved = (encoder_output(model, x + dx) - encoder_output(model, x)).norm().item()
    assert abs(moved / dx.norm().item() - lipschitz) <= float_tol(torch.float64, 1.0, num_terms=40)
    assert max_ratio(model) <= lipschitz * (1 + float_tol(torch.float64, 1.0, num_terms=40))


def test_layers_within_the_bound_are_left_as_they_are():
    torch.manual_seed(0)
    model = build_vae((20,), latent_dim=3, encoder_hidden=(16,), decoder_hidden=(8,)).double()
    x = torch.rand(5, 20, dtype=torch.float64)
    before = encoder_output(model, x)
    bound_encoder(model.encoder, 1e4)  # 100 per layer: far above these weights' norms
    torch.testing.assert_close(encoder_output(model, x), before, rtol=0, atol=float_tol(torch.float64, before, 20))


def binary_batch(n=32, seed=2):
    return (torch.rand(n, 20, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def test_the_bound_holds_after_training_and_travels_with_the_checkpoint():
    settings = AIRConfig(kind="lipschitz", lipschitz=1.5)
    torch.manual_seed(0)
    model = build_vae((20,), latent_dim=3, encoder_hidden=(16,), decoder_hidden=(8,))
    AIR.prepare_model(model, settings)
    method = AIR(model, TrainConfig(lr=0.1), settings)
    for _ in range(20):  # a large rate: the raw weights grow well past the bound
        method.step(binary_batch(), 1.0)
    per_layer = 1.5 ** 0.5
    for layer in (model.encoder.body[0], model.encoder.head):
        assert torch.linalg.matrix_norm(layer.linear.weight, ord=2).item() > per_layer
        assert torch.linalg.matrix_norm(layer.weight(), ord=2).item() <= per_layer * (1 + 1e-5)

    state = model.state_dict()
    assert "encoder.head.linear.weight" in state and state["encoder.head.bound"].item() == pytest.approx(per_layer)
    torch.manual_seed(7)
    again = build_vae((20,), latent_dim=3, encoder_hidden=(16,), decoder_hidden=(8,))
    AIR.prepare_model(again, settings)
    load_state(again, state)
    x = binary_batch(seed=3)
    assert torch.equal(encoder_output(again, x), encoder_output(model, x))
    plain = build_vae((20,), latent_dim=3, encoder_hidden=(16,), decoder_hidden=(8,))
    with pytest.raises(ModelError):  # an unbounded model cannot take the bounded encoder's weights silently
        load_state(plain, state)


def test_denoising_corrupts_only_what_the_encoder_reads_in_a_training_step():
    noise_std = 0.3
    torch.manual_seed(0)
    model = build_vae((20,), latent_dim=3, encoder_hidden=(16,), decoder_hidden=(8,))
    method = AIR(model, TrainConfig(num_samples=3), AIRConfig(kind="denoise", noise_std=noise_std))
    x = binary_batch(n=500)
    seen = {}
    encoder_forward, log_likelihood = model.encoder.forward, model.log_likelihood
    model.encoder.forward = lambda x_in: (seen.setdefault("encoder", x_in), encoder_forward(x_in))[1]
    model.log_likelihood = lambda x_in, z: (seen.setdefault("decoder", x_in), log_likelihood(x_in, z))[1]
    model.train()
    method.step(x, 1.0)
    noise = seen["encoder"] - x
    # The noise's std, within Monte Carlo error (the sample std of n Gaussians has s.e. std / sqrt(2n)).
    assert abs(noise.std().item() - noise_std) < mc_tol(noise_std / (2 * noise.numel()) ** 0.5).item()
    assert abs(noise.mean().item()) < mc_tol(noise_std / noise.numel() ** 0.5).item()
    assert torch.equal(seen["decoder"], x)  # the decoder's target is the clean datapoint

    del model.encoder.forward, model.log_likelihood
    for mode in (model.train, model.eval):  # the model itself reads x as it is, in either mode
        mode()
        first, second = model.encode(x), model.encode(x)
        assert torch.equal(first["mean"], second["mean"]) and torch.equal(first["log_var"], second["log_var"])


def test_check_refuses_unserviceable_settings():
    def recipe(**air):
        return recipe_from_dict({"data": {"dataset": "cifar10", "binarize": "none", "quantize_bits": 3},
                                 "model": {"architecture": "conv", "likelihood": "logistic"},
                                 "train": {"method": "air", "air": air}})

    assert AIR.check(recipe(kind="denoise")) is None
    assert AIR.check(recipe(kind="lipschitz")).startswith("train.air.kind:")
    assert AIR.check(recipe_from_dict({"train": {"method": "air", "air": {"kind": "lipschitz"}}})) is None
    assert AIR.check(recipe_from_dict({"train": {"method": "air", "air": {"noise_std": 0}}})).startswith(
        "train.air.noise_std:")


def test_a_conv_encoder_cannot_be_bounded():
    torch.manual_seed(0)
    model = build_vae((3, 32, 32), architecture="conv", latent_dim=2, conv_channels=(4,))
    with pytest.raises(RecipeError, match="train.air.kind"):
        AIR.prepare_model(model, AIRConfig(kind="lipschitz"))
    with pytest.raises(ValueError, match="bounded already"):
        bound_encoder(bound_encoder(build_vae((20,), latent_dim=2).encoder, 1.0), 1.0)
