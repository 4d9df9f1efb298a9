"""Aggressive inference-network training: the mutual-information estimate against exact values, the inner
loop's stopping rule, the switch to plain VAE steps once I(x; z) stops rising, and exact resume."""

import io
import math
import types

import pytest
import torch

from gapbench.methods import get_method
from gapbench.methods.aggressive import Aggressive, inner_steps_until_plateau, mutual_information
from gapbench.models.posterior import DiagonalGaussian
from gapbench.models.vae import build_vae
from gapbench.recipe import AggressiveConfig, TrainConfig, recipe_from_dict
from tests.tolerance import assert_close_ulps, mc_tol


def gaussians(mean, log_var):
    mean, log_var = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(log_var, dtype=torch.float64)
    return DiagonalGaussian(mean.shape[1]).posterior({"mean": mean, "log_var": log_var}, num_points=mean.shape[0])


def test_mutual_information_matches_quadrature():
    """Three 1-D Gaussian posteriors, x uniform over them: I = (1/3) Σ_i ∫ q_i log(q_i / q̄), q̄ their mean,
    by the midpoint rule; the estimate from 20,000 draws per point within 4 of its standard errors (the
    per-draw variances by the same quadrature)."""
    means, log_vars = [[-1.0], [0.3], [2.0]], [[0.0], [-1.0], [0.5]]
    m = torch.tensor(means, dtype=torch.float64)[:, 0]
    s = torch.tensor(log_vars, dtype=torch.float64)[:, 0].mul(0.5).exp()
    z = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    dz = z[1] - z[0]
    log_q = torch.distributions.Normal(m[:, None], s[:, None]).log_prob(z)  # [3, Z]
    log_bar = torch.logsumexp(log_q, 0) - math.log(3)
    f = log_q - log_bar  # the estimator's term for a draw z of q_i
    mean_i = (log_q.exp() * f).sum(1) * dz
    var_i = (log_q.exp() * (f - mean_i[:, None]) ** 2).sum(1) * dz
    exact = mean_i.mean()
    draws = 20_000
    se = (var_i.sum() / (draws * 9)).sqrt()

    torch.manual_seed(0)
    estimate = mutual_information(gaussians(means, log_vars), num_samples=draws)
    assert estimate.dtype == torch.float64
    assert abs(estimate - exact) < mc_tol(se), (estimate.item(), exact.item(), se.item())
    assert 0 < exact < math.log(3)


def test_mutual_information_is_zero_when_q_ignores_x():
    """Every datapoint with the same q: log q(z|x_i) = log q̄(z) for every draw, so I = 0 up to rounding."""
    torch.manual_seed(0)
    mean, log_var = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    q = gaussians(mean.expand(40, 5), log_var.expand(40, 5))
    estimate = mutual_information(q, num_samples=3)
    _, log_q = q.sample_and_log_prob(3)
    assert_close_ulps(estimate, torch.tensor(0.0, dtype=torch.float64), num_terms=40, magnitude=log_q.abs().max())


def test_mutual_information_is_log_n_for_separated_posteriors():
    """Posteriors 200 standard deviations apart: q̄(z) = q(z|x_i) / N at each draw of q_i, so I = log N."""
    n = 7
    q = gaussians([[200.0 * i, 0.0] for i in range(n)], [[0.0, 0.0]] * n)
    torch.manual_seed(0)
    estimate = mutual_information(q, num_samples=4)
    assert_close_ulps(estimate, torch.tensor(math.log(n), dtype=torch.float64), num_terms=n, magnitude=20.0)


def test_mutual_information_does_not_depend_on_the_chunking(monkeypatch):
    """The aggregate posterior is computed in blocks of draws: one block or many give the same numbers."""
    torch.manual_seed(0)
    q = gaussians(torch.randn(30, 3), torch.randn(30, 3))
    torch.manual_seed(1)
    whole = mutual_information(q, num_samples=5)
    import gapbench.methods.aggressive as agg

    monkeypatch.setattr(agg, "_MI_BLOCK", 7)  # one draw per block
    torch.manual_seed(1)
    assert_close_ulps(mutual_information(q, num_samples=5), whole, num_terms=30, magnitude=50.0)


@pytest.mark.parametrize(
    "losses, check_every, cap, steps",
    [
        ([5.0 - 0.01 * k for k in range(200)], 10, 100, 100),  # always improving: the cap
        ([1.0] * 10 + [2.0] * 10 + [0.0] * 50, 10, 100, 20),  # the second block is worse
        ([3.0] * 10 + [2.0] * 10 + [2.0] * 10 + [1.0] * 10, 10, 100, 40),  # equal is not worse; the end of the losses
        ([3.0] * 3 + [2.0] * 3 + [2.5] * 3, 3, 100, 9),
        ([1.0] * 10, 10, 5, 5),
    ],
)
def test_the_inner_loop_stops_by_the_authors_rule(losses, check_every, cap, steps):
    assert inner_steps_until_plateau(losses, check_every, cap) == steps


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return build_vae((16,), latent_dim=2, encoder_hidden=(16,), decoder_hidden=(16,))


def tiny_inputs(n=500):
    data = torch.bernoulli(torch.rand(n, 16, generator=torch.Generator().manual_seed(0)))
    return types.SimpleNamespace(train=data, valid=data[:100], dynamic=False)


def test_the_inner_loop_runs_while_the_encoder_improves_and_stops_on_a_plateau():
    """From an encoder far from its optimum the first inner loop reaches the cap; with the encoder's steps
    made negligible (a plateau: only the draws of z and the minibatches vary) every loop stops between the
    second check and the cap. The decoder is never touched by the inner loop."""
    inputs = tiny_inputs()
    model = tiny_vae()
    with torch.no_grad():
        model.encoder.head.bias[:2] += 5.0  # the means far from the posterior
    method = Aggressive(model, TrainConfig(lr=1e-2), AggressiveConfig(max_inner_steps=40))
    method.begin_epoch(1, inputs, "cpu")
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert method.inner_loop(inputs.train[:50], 1.0) == 40
    assert all(torch.equal(v, decoder[k]) for k, v in model.decoder.state_dict().items())
    assert not all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())

    method = Aggressive(tiny_vae(), TrainConfig(lr=1e-12), AggressiveConfig())
    method.begin_epoch(1, inputs, "cpu")
    counts = [method.inner_loop(inputs.train[:50], 1.0) for _ in range(8)]
    assert all(20 <= c < 100 and c % 10 == 0 for c in counts), counts


@pytest.mark.parametrize("dynamic", [False, True])
def test_inner_steps_after_the_first_take_fresh_minibatches_of_the_training_data(dynamic):
    """The first inner step is on the step's batch, each later one on distinct training points drawn afresh
    (binarized afresh when binarization is dynamic)."""
    codes = ((torch.arange(300)[:, None] >> torch.arange(16)) & 1).float()  # 300 distinct binary rows
    train = codes * 0.8 + 0.1 if dynamic else codes  # grey levels: binarized per batch
    inputs = types.SimpleNamespace(train=train, valid=codes[:50], dynamic=dynamic)
    method = Aggressive(tiny_vae(), TrainConfig(), AggressiveConfig(max_inner_steps=6))
    method.begin_epoch(1, inputs, "cpu")
    seen = []
    objective = method._objective
    method._objective = lambda x, beta: seen.append(x) or objective(x, beta)
    x0 = codes[:20]
    assert method.inner_loop(x0, 1.0) == 6
    assert seen[0] is x0 and len(seen) == 6
    rows = []
    for batch in seen[1:]:
        assert batch.shape == x0.shape and set(batch.unique().tolist()) <= {0.0, 1.0}
        if not dynamic:
            index = (batch.long() << torch.arange(16)).sum(1)  # which training row
            assert index.unique().numel() == 20
            rows.append(tuple(sorted(index.tolist())))
    assert len(set(rows)) == len(rows)  # a fresh draw each time


def test_aggressive_steps_update_the_decoder_only_after_the_inner_loop_then_plain_steps_both():
    inputs = tiny_inputs()
    method = Aggressive(tiny_vae(), TrainConfig(lr=1e-3), AggressiveConfig(max_inner_steps=3))
    method.begin_epoch(1, inputs, "cpu")
    model = method.model
    method.step(inputs.train[:50], 1.0)
    assert method.inner_step_counts == [3]
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    steps = []
    orig = method.inner_loop
    method.inner_loop = lambda x, beta: steps.append(1) or 0  # no inner steps: the decoder's step alone
    method.step(inputs.train[:50], 1.0)
    assert all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())
    assert not all(torch.equal(v, decoder[k]) for k, v in model.decoder.state_dict().items())

    method.inner_loop = orig
    method.aggressive = False
    method.step(inputs.train[:50], 1.0)
    assert steps == [1] and method.inner_step_counts == [3, 0]
    assert not all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())


@pytest.mark.parametrize(
    "patience, mis, flags",
    [
        (1, [0.1, 0.3, 0.5, 0.4, 0.9], [1, 1, 1, 0, 0]),
        (1, [0.2, 0.2, 0.1], [1, 1, 0]),  # equal is not below
        (2, [0.1, 0.3, 0.2, 0.4, 0.35, 0.5], [1, 1, 1, 1, 0, 0]),  # epochs below the best, in all (image.py)
    ],
)
def test_aggressive_training_ends_when_the_mutual_information_stops_rising(patience, mis, flags):
    method = Aggressive(tiny_vae(), TrainConfig(), AggressiveConfig(mi_patience=patience))
    values = iter(mis)
    calls = []
    method.validation_mi = lambda x, device: calls.append(1) or next(values)
    got = [method.end_epoch(e + 1, tiny_inputs(), "cpu") for e in range(len(mis))]
    assert [g["aggressive"] for g in got] == flags
    stopped = flags.index(0) + 1 if 0 in flags else len(flags)
    assert len(calls) == stopped  # no estimate once plain
    assert [g["mutual_info"] for g in got[:stopped]] == mis[:stopped]
    assert all(math.isnan(g["mutual_info"]) for g in got[stopped:])


def test_end_epoch_estimates_the_mutual_information_on_the_validation_set():
    inputs = tiny_inputs()
    method = Aggressive(tiny_vae(), TrainConfig(), AggressiveConfig())
    torch.manual_seed(3)
    got = method.end_epoch(1, inputs, "cpu")
    torch.manual_seed(3)
    with torch.no_grad():
        want = mutual_information(method.model.posterior(inputs.valid)).item()
    assert got == {"mutual_info": pytest.approx(want, abs=1e-6), "aggressive": 1, "inner_steps": 0.0}
    assert method.best_mi == got["mutual_info"]
    torch.manual_seed(3)  # the encoder in batches of 30: the same q, so the same estimate
    assert method.validation_mi(inputs.valid, "cpu", batch_size=30) == pytest.approx(want, abs=1e-6)


def test_a_resumed_method_continues_exactly():
    """Steps after state_dict() -> bytes -> load_state_dict() (and the model's weights and torch's generator)
    equal the steps of the method that went on: the inner loop's minibatches and the flags carry over."""
    inputs = tiny_inputs()
    torch.manual_seed(0)
    a = Aggressive(tiny_vae(), TrainConfig(lr=1e-3), AggressiveConfig(max_inner_steps=25))
    a.begin_epoch(1, inputs, "cpu")
    for i in range(2):
        a.step(inputs.train[50 * i : 50 * i + 50], 1.0)
    a.best_mi, a.epochs_below_best = 0.7, 0
    buf = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "method": a.state_dict(), "rng": torch.get_rng_state()}, buf)

    for i in range(2, 4):
        a.step(inputs.train[50 * i : 50 * i + 50], 1.0)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a fresh process: another generator state until the checkpoint's is loaded
    b = Aggressive(tiny_vae(seed=5), TrainConfig(lr=1e-3), AggressiveConfig(max_inner_steps=25))
    b.model.load_state_dict(saved["model"])
    b.load_state_dict(saved["method"])
    torch.set_rng_state(saved["rng"])
    b.begin_epoch(1, inputs, "cpu")
    assert b.best_mi == 0.7 and b.aggressive
    for i in range(2, 4):
        b.step(inputs.train[50 * i : 50 * i + 50], 1.0)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_check_asks_for_an_exact_log_q():
    cls = get_method("aggressive")
    assert cls is Aggressive and not cls.refines
    assert cls.check(recipe_from_dict({"train": {"method": "aggressive"}})) is None
    problem = cls.check(recipe_from_dict({"train": {"method": "aggressive"}, "model": {"encoder": "flow"}}))
    assert problem.startswith("model.encoder") and "ffg" in problem
