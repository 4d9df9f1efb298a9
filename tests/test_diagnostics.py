"""Diagnostics against known answers: unused latent dimensions, a Gaussian channel's mutual information,
the q~_k curve on the linear-Gaussian model, and hand-computed summaries of small gaps tables."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.diagnostics import (
    active_units,
    decoder_jacobian_spectrum,
    encoder_generalization,
    gaps_by_class,
    iwae_gap_curve,
    mutual_information,
)
from gapbench.errors import GapbenchError
from gapbench.models import build_vae
from gapbench.models.posterior import DiagonalGaussian
from gapbench.models.reference import LinearGaussian
from gapbench.ops import log_standard_normal
from tests.inference.conftest import make_linear_gaussian, simulate
from tests.tolerance import assert_close_ulps, float_tol, mc_tol

LATENT_DIM, IGNORED = 5, [1, 3]


def small_vae(seed=0):
    torch.manual_seed(seed)
    return build_vae((12,), latent_dim=LATENT_DIM, encoder_hidden=(9,), decoder_hidden=(16,))


def ffg(mean, log_var):
    return DiagonalGaussian(mean.shape[-1]).posterior({"mean": mean, "log_var": log_var}, mean.shape[0])


# ---------------------------------------------------------------- unused dimensions


def test_decoder_ignoring_k_dimensions_uses_exactly_d_minus_k():
    vae = small_vae()
    with torch.no_grad():
        vae.decoder.net[0].weight[:, IGNORED] = 0.0  # the decoder reads no input from these dimensions
    x = torch.rand(16, 12)
    res = decoder_jacobian_spectrum(vae, x, num_samples=2, seed=0)
    s = res.singular_values  # [S, N, D] float64, descending
    assert s.shape == res.z.shape == (2, 16, LATENT_DIM)
    assert (res.num_used == LATENT_DIM - len(IGNORED)).all()
    assert res.mean_num_used == res.median_num_used == LATENT_DIM - len(IGNORED)
    # The k zero columns give k singular values of zero, up to the float64 SVD's rounding.
    assert (s[..., -len(IGNORED):] <= float_tol(torch.float64, s[..., :1], num_terms=LATENT_DIM)).all()
    # The vectorized forward-mode Jacobians equal reverse-mode autograd's at the same latents.
    z = res.z.reshape(-1, LATENT_DIM)
    full = torch.autograd.functional.jacobian(lambda zz: vae.decoder(zz[None])[0], z)  # [M, P, M, D]
    rows = torch.arange(z.shape[0])
    jac = full[rows, :, rows]  # [M, P, D]: each output's Jacobian in its own latent
    hidden = vae.decoder.net[0].out_features  # both Jacobians are float32 sums over the hidden units
    torch.testing.assert_close(s.reshape(-1, LATENT_DIM), torch.linalg.svdvals(jac.double()), rtol=0,
                               atol=float_tol(torch.float32, s, num_terms=hidden + LATENT_DIM))


def test_linear_decoder_spectrum_is_that_of_its_weights():
    # W = U diag(1, 0.1, 1e-5): a relative threshold of 1e-3 counts two used dimensions at every z.
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen, dtype=torch.float64))
    scales = torch.tensor([1.0, 0.1, 1e-5], dtype=torch.float64)
    model = LinearGaussian(u * scales, torch.zeros(6, dtype=torch.float64), 0.5)
    x = simulate(model, 10)
    res = decoder_jacobian_spectrum(model, x, decoder_fn=lambda z: z @ model.W.T + model.b, num_samples=3, seed=0)
    assert_close_ulps(res.singular_values, scales.expand(3, 10, 3), num_terms=6)
    assert (res.num_used == 2).all()
    assert_close_ulps(res.relative_spectrum, scales, num_terms=6)


def test_encoder_ignoring_x_in_k_dimensions_has_exactly_k_inactive_units():
    vae = small_vae()
    with torch.no_grad():
        head = vae.encoder.head.weight  # rows [0, D) give the means, [D, 2D) the log-variances
        head[:LATENT_DIM] *= 20.0  # clearly active where x is read
        head[IGNORED] = 0.0  # these means are the bias alone, whatever x is
    x = torch.rand(64, 12)
    res = active_units(vae, x)
    expected = torch.ones(LATENT_DIM, dtype=torch.bool)
    expected[IGNORED] = False
    assert res.num_active == LATENT_DIM - len(IGNORED)
    assert torch.equal(res.active, expected)
    assert (res.activity[IGNORED] == 0).all()  # a constant's variance is exactly zero
    with torch.no_grad():
        means = vae.encoder(x)[0].double()
    torch.testing.assert_close(res.activity, means.var(0), rtol=0, atol=0)  # the same ops on the same inputs
    assert res.to_dict()["num_active"] == 3


def test_diagnostics_without_an_encoder_or_decoder_say_what_to_pass():
    class PriorOnly:
        latent_dim = 2

        def log_prior(self, z):
            return log_standard_normal(z)

        def log_likelihood(self, x, z):
            return torch.zeros(z.shape[:2])

    x = torch.zeros(4, 3)
    with pytest.raises(GapbenchError, match="has no encoder .* pass q"):
        active_units(PriorOnly(), x)
    q = ffg(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(GapbenchError, match="pass decoder_fn"):
        decoder_jacobian_spectrum(PriorOnly(), x, q=q)


# ---------------------------------------------------------------- mutual information


class GaussianChannel:
    """x ~ N(0, v) in 1-D, q(z|x) = N(a x + c, s^2), p(z) = N(0, 1): I(x; z) = 1/2 log(1 + a^2 v / s^2)."""

    latent_dim = 1

    def __init__(self, a, s2, c=0.0):
        self.a, self.s2, self.c = a, s2, c

    def log_prior(self, z):
        return log_standard_normal(z)

    def posterior(self, x):
        return ffg(self.a * x + self.c, torch.full_like(x, math.log(self.s2)))


def test_mutual_information_of_a_gaussian_channel():
    a, v, s2, num_points = 1.0, 1.0, 1 / 3, 2000
    x = math.sqrt(v) * torch.randn(num_points, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = mutual_information(GaussianChannel(a, s2), x, num_samples=10, seed=1)
    var_z = a * a * v + s2  # q(z) = N(0, a^2 v + s^2)
    # log q(z) is the log of a mean of N densities: its bias is first order in 1/N, from x_i's own component
    # (at most C / (N - 1), C = E[q(z|x) / q(z)] = var_z / s^2) and Jensen's inequality (chi^2 / 2(N - 1),
    # chi^2 = C - 1); 0.003 nats here, a twentieth of the Monte Carlo allowance.
    c = var_z / s2
    bias = (c + (c - 1) / 2) / (num_points - 1)
    assert abs(res.mutual_information - 0.5 * math.log(1 + a * a * v / s2)) < mc_tol(res.mutual_information_se) + bias
    # E_x KL(q(z|x) || p(z)) over these x, and KL(q(z) || p(z)), in closed form.
    kl_post = (0.5 * (s2 + a * a * x**2 - 1 - math.log(s2))).mean().item()
    assert abs(res.kl_posterior_prior - kl_post) < mc_tol(res.kl_posterior_prior_se)
    kl_agg = 0.5 * (var_z - 1 - math.log(var_z))
    assert abs(res.kl_aggregate_prior - kl_agg) < mc_tol(res.kl_aggregate_prior_se) + bias
    assert res.mutual_information == pytest.approx(res.kl_posterior_prior - res.kl_aggregate_prior, abs=1e-12)
    assert res.per_point.shape == (num_points,)


def test_encoder_ignoring_x_carries_no_information():
    # Every q(z|x) is the same N(0.3, 0.5): the aggregate posterior is that component, I = 0 up to rounding.
    x = torch.randn(300, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = mutual_information(GaussianChannel(0.0, 0.5, c=0.3), x, num_samples=4, seed=1)
    magnitude = res.per_point.abs().max() + math.log(300) + 10.0  # log q values are of order 10 at most here
    assert abs(res.mutual_information) <= float_tol(torch.float64, magnitude, num_terms=4)
    assert res.kl_aggregate_prior == pytest.approx(res.kl_posterior_prior, abs=float_tol(torch.float64, magnitude, 4))


def test_mutual_information_needs_a_tractable_log_q():
    torch.manual_seed(0)
    vae = build_vae((12,), latent_dim=2, encoder_hidden=(9,), decoder_hidden=(7,), encoder="flow", flow_hidden=5)
    with pytest.raises(GapbenchError, match="only bounds .* use an 'ffg' or 'realnvp' encoder"):
        mutual_information(vae, torch.rand(4, 12))


# ---------------------------------------------------------------- the q~_k curve


def chi_square_plus_one(post_cov, q_var):
    """E_q[(p/q)^2] for q = N(m, diag q_var), p = N(m, post_cov): |Sq|^1/2 / (|Sp| |2 Sp^-1 - Sq^-1|^1/2)."""
    a = 2 * torch.linalg.inv(post_cov) - torch.diag(1 / q_var)
    return (q_var.prod().sqrt() / (torch.det(post_cov) * torch.det(a).sqrt())).item()


def test_iwae_gap_curve_rises_to_the_exact_inference_gap():
    model = make_linear_gaussian()  # a correlated 2-D posterior
    x = simulate(model, 200)
    post_mean, post_cov = model.posterior_moments(x)
    # A factorized q at the exact mean, twice as wide as each marginal: the gap log p(x) - L[q] = KL(q || p(z|x))
    # is the same for every x, and p/q is bounded, so IWAE_k converges at rate chi^2 / 2k.
    q_var = 2 * torch.diagonal(post_cov)
    log_var = q_var.log().expand_as(post_mean)
    exact = model.kl_to_posterior(post_mean, log_var, x)  # [N]
    res = iwae_gap_curve(model, x, q=ffg(post_mean, log_var), num_elbo_samples=5000, seed=0)
    assert res.ks == [1, 2, 5, 10, 50, 100, 500, 1000, 5000]
    assert res.gap.shape == res.iwae.shape == (9, 200) and res.num_finite == 200
    mean, se = res.gap_mean, res.gap_se
    assert abs(mean[0]) < mc_tol(se[0])  # IWAE_1 is the ELBO
    for i in range(len(res.ks) - 1):  # non-decreasing in k
        assert mean[i + 1] > mean[i] - mc_tol(se[i], se[i + 1])
    bias = (chi_square_plus_one(post_cov, q_var) - 1) / (2 * res.ks[-1])  # log p(x) - E[IWAE_k], first order
    assert abs(mean[-1] - exact.mean()) < mc_tol(se[-1]) + bias
    assert mean[-1] - mean[0] > 10 * mc_tol(se[0], se[-1])  # the curve does rise: the test can fail


def test_exact_posterior_closes_the_gap_at_every_k():
    model = make_linear_gaussian()
    x = simulate(model, 8)
    res = iwae_gap_curve(model, x, q=model.posterior(x), ks=[1, 3, 40], num_elbo_samples=50, min_samples_per_k=20,
                         chunk_size=16, seed=0)  # k = 40 > chunk_size: its bound is taken in chunks
    assert res.num_replicates == [20, 7, 1]
    # log w = log p(x) for every z; rounding only (a sum over P + D terms and a log-sum-exp).
    tol = float_tol(torch.float64, model.log_marginal(x), num_terms=model.data_dim + model.latent_dim + 4)
    assert (res.gap.abs() <= 2 * tol).all()


# ---------------------------------------------------------------- gaps tables


def gaps_table(amortization, approximation, finite=None):
    df = pd.DataFrame({"amortization_gap": amortization, "approximation_gap": approximation})
    df["inference_gap"] = df["amortization_gap"] + df["approximation_gap"]
    if finite is not None:
        df["finite"] = finite
    return df


def test_gaps_by_class_against_hand_computed_values():
    # Class 0: amortization [1, 3] -> mean 2, sd sqrt(2), se 1. Class 1: [2, 4, 6] -> mean 4, sd 2, se 2/sqrt(3).
    # The sixth row is not finite and is left out, as in the gaps summary.
    gaps = gaps_table([1.0, 2.0, 3.0, 4.0, 6.0, 99.0], [0.5, 0.0, 0.5, 1.0, 2.0, 99.0],
                      finite=[True, True, True, True, True, False])
    out = gaps_by_class(gaps, np.array([0, 1, 0, 1, 1, 1]))
    assert list(out.index) == [0, 1] and list(out["count"]) == [2, 3]
    assert out.loc[0, "amortization_gap_mean"] == pytest.approx(2.0)
    assert out.loc[0, "amortization_gap_se"] == pytest.approx(1.0)
    assert out.loc[1, "amortization_gap_mean"] == pytest.approx(4.0)
    assert out.loc[1, "amortization_gap_se"] == pytest.approx(2 / math.sqrt(3))
    assert out.loc[0, "approximation_gap_se"] == pytest.approx(0.0)
    assert out.loc[1, "inference_gap_mean"] == pytest.approx((2.0 + 5.0 + 8.0) / 3)
    assert "refinement_gain_mean" not in out  # only the gap columns the table has
    single = gaps_by_class(gaps, [0, 1, 2, 1, 1, 1], columns=["amortization_gap"])
    assert math.isnan(single.loc[2, "amortization_gap_se"]) and list(single.columns) == [
        "count", "amortization_gap_mean", "amortization_gap_se"]


def test_gaps_by_class_errors():
    gaps = gaps_table([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(GapbenchError, match="the table has 2 rows but 3 labels"):
        gaps_by_class(gaps, [0, 1, 1])
    with pytest.raises(GapbenchError, match="class labels must be integers"):
        gaps_by_class(gaps, [0.5, 1.0])
    with pytest.raises(GapbenchError, match="no column 'log_px'"):
        gaps_by_class(gaps, [0, 1], columns=["log_px"])


def test_encoder_generalization_against_hand_computed_values():
    # Train [1, 2, 3]: mean 2, se 1/sqrt(3); held-out [2, 4, 6]: mean 4, se 2/sqrt(3); difference 2, se sqrt(5/3).
    train = gaps_table([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    heldout = gaps_table([2.0, 4.0, 6.0], [0.0, 0.0, 0.0])
    out = encoder_generalization(train, heldout)
    assert out["train"] == pytest.approx(2.0) and out["train_se"] == pytest.approx(1 / math.sqrt(3))
    assert out["heldout"] == pytest.approx(4.0) and out["heldout_se"] == pytest.approx(2 / math.sqrt(3))
    assert out["difference"] == pytest.approx(2.0) and out["difference_se"] == pytest.approx(math.sqrt(5 / 3))
    assert out["num_train"] == out["num_heldout"] == 3


def test_encoder_generalization_needs_equal_counts():
    train = gaps_table([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    with pytest.raises(GapbenchError, match="train table has 3 rows and the held-out table 2; evaluate both splits "
                                            "with the same evaluate.num_points"):
        encoder_generalization(train, train.iloc[:2])
    with pytest.raises(GapbenchError, match="held-out gaps table has no column 'amortization_gap'"):
        encoder_generalization(train, train.drop(columns="amortization_gap"))


def test_per_class_tables_name_fashion_mnist_and_cifar_classes():
    """Labels of datasets whose classes have names get them beside the label; digits' labels are their names."""
    from types import SimpleNamespace

    from gapbench.data.registry import class_name
    from gapbench.report import class_text, diagnostics_markdown, per_class_tables

    assert class_name("fashion-mnist", 0) == "T-shirt/top" and class_name("fashion-mnist", 9) == "Ankle boot"
    assert class_name("cifar10", 3) == "cat"
    assert class_name("digits", 3) == "" and class_name("mnist", 3) == "" and class_name(None, 3) == ""
    assert class_name("fashion-mnist", 10) == ""  # no such class: no name, no error
    points = pd.DataFrame({"label": [0, 0, 9, 9], "amortization_gap": [1.0, 2.0, 3.0, 5.0],
                           "approximation_gap": [0.5, 0.5, 1.0, 1.0], "finite": [True] * 4})
    points["inference_gap"] = points["amortization_gap"] + points["approximation_gap"]
    settings = {"diagnostics": ["per_class"]}
    fashion = SimpleNamespace(label="f", points=points, summary={"dataset": "fashion-mnist", "settings": settings})
    digits = SimpleNamespace(label="d", points=points, summary={"dataset": "digits", "settings": settings})
    (_, ft), (_, dt) = per_class_tables([fashion, digits])
    assert ft["name"].tolist() == ["T-shirt/top", "Ankle boot"] and "name" not in dt
    assert ft["amortization_gap_mean"].tolist() == [1.5, 4.0]
    assert [class_text(label, row) for label, row in ft.iterrows()] == ["0 (T-shirt/top)", "9 (Ankle boot)"]
    assert [class_text(label, row) for label, row in dt.iterrows()] == ["0", "9"]
    md = diagnostics_markdown([fashion, digits], [], [(fashion, ft), (digits, dt)])
    assert "| 9 (Ankle boot) | 2 |" in md and "| 9 | 2 |" in md
