"""The speed benchmark's reference implementations compute what gapbench computes, and the benchmark runs.

On a linear-Gaussian model log p(x), the posterior and the optimal FFG are
known in closed form, so each reference estimator is checked against the exact
value (and so against gapbench's estimator, which the inference tests check the
same way); then one model's worth of the benchmark runs at tiny sizes.
"""

import sys
from pathlib import Path

import pytest
import torch

from gapbench.inference import ais, ais_reverse, fit_local
from gapbench.models.posterior import DiagonalGaussian
from gapbench.models.reference import LinearGaussian
from tests.tolerance import assert_close_ulps, float_tol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reference_impl  # noqa: E402
import speed  # noqa: E402




@pytest.fixture
def model():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    W[:, 1:] = 0.3 * W[:, :1] + 0.7 * W[:, 1:]  # a correlated posterior: a real approximation gap
    return LinearGaussian(W, torch.randn(5, generator=gen, dtype=torch.float64), 0.7)


@pytest.fixture
def data(model):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    return z, model.sample_x(z)


def test_iwae_reference_is_exact_with_the_posterior_as_proposal(model, data):
    # w = p(x, z) / p(z|x) = p(x) for every z: the bound is log p(x) up to rounding.
    _, x = data
    got = reference_impl.iwae_one_at_a_time(model, x, model.posterior(x), num_samples=50, chunk_size=20)
    # each weight sums densities over 5 pixels and 2 latents; the log-mean adds 50 of them
    assert_close_ulps(got, model.log_marginal(x), num_terms=2 * (5 + 2) + 50)


def test_local_reference_reaches_the_optimal_ffg_like_gapbench(model, data):
    _, x = data
    x = x[:2]
    mean, log_var = model.optimal_ffg(x)
    exact = model.log_marginal(x) - model.kl_to_posterior(mean, log_var, x)  # L[q*_FFG]
    settings = dict(lr=5e-2, num_samples=50, check_every=30, patience=3, max_steps=600, num_final_samples=10_000)
    torch.manual_seed(0)
    ref = reference_impl.fit_local_one_at_a_time(model, x, "ffg", seed=0, **settings)
    ours = fit_local(model, x, "ffg", seed=0, **settings)
    # The ELBO is flat at its optimum (a nat moves by the square of the parameter error);
    # 10,000 final samples put the Monte Carlo error near 0.01.
    assert (ref.elbo - exact).abs().max() < 0.05
    assert (ref.elbo.mean() - ours.elbo.mean()).abs() < 0.03
    assert bool(ref.converged.all()) and (ref.num_steps % 30 == 0).all()


def test_ais_reference_is_gapbench_ais_without_reuse(model, data):
    # Same algorithm, same random draws in the same order: only the bookkeeping differs,
    # so at one seed both directions agree to rounding.
    z, x = data
    kw = dict(num_steps=40, num_chains=8, num_leapfrog=5)
    # Rounding carried through 40 transitions of 5 leapfrog steps, each summing 5 pixels and 2 latents.
    num_terms = 40 * 5 * (5 + 2)
    assert_close_ulps(reference_impl.ais_no_reuse(model, x, seed=3, **kw).log_px,
                      ais(model, x, seed=3, **kw).log_px, num_terms=num_terms)
    assert_close_ulps(reference_impl.ais_no_reuse(model, x, z_start=z, seed=4, **kw).log_px,
                      ais_reverse(model, x, z, seed=4, **kw).log_px, num_terms=num_terms)


class _WithEncoder(torch.nn.Module):
    """The linear-Gaussian model with its exact posterior's diagonal as the 'encoder' q(z|x)."""

    def __init__(self, base):
        super().__init__()
        self.base, self.latent_dim = base, base.latent_dim

    def log_prior(self, z):
        return self.base.log_prior(z)

    def log_likelihood(self, x, z):
        return self.base.log_likelihood(x, z)

    def posterior(self, x):
        mean, cov = self.base.posterior_moments(x)
        log_var = torch.diagonal(cov).log().expand_as(mean)
        return DiagonalGaussian(self.latent_dim).posterior({"mean": mean, "log_var": log_var}, x.shape[0])


def _simulator(model):
    """simulate(num_points, seed) -> (z, x) from the linear-Gaussian model, as bench_model wants."""

    def simulate(num_points, seed):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_points, 2, generator=gen, dtype=torch.float64)
        torch.manual_seed(seed)
        return z, model.sample_x(z)

    return simulate


def test_benchmark_runs_and_prints_every_comparison(model, capsys):
    wrapped = _WithEncoder(model)
    simulate = _simulator(model)

    cfg = speed.Config(3, 2, 3, 2, ais_steps=8, ais_chains=4, ais_ladder=(2,), iwae_samples=100,
                       max_steps=60, published_max_steps=60, digits_epochs=1)
    rows = speed.bench_model("toy", wrapped, simulate, 3, 2, cfg, seed=0, log=lambda msg: None)
    assert [(r.estimator, r.compared_at) for r in rows] == [
        ("local FFG", "equal settings"), ("local FFG", "equal final ELBO"), ("local flow", "equal settings"),
        ("AIS (BDMC)", "equal settings"), ("AIS (BDMC)", "equal BDMC width"), ("IWAE-100", "equal settings"),
    ]
    for r in rows:
        assert r.ours.seconds > 0 and r.ref.seconds > 0 and r.ours.peak_mb >= 0
    text = speed.table(rows)
    assert text.count("\n") == len(rows) + 1 and "| toy | local FFG | equal final ELBO | 3 |" in text


def test_references_on_a_subset_are_scaled_to_all_points(model, monkeypatch):
    """With reference_points=k the one-at-a-time local references see only the first k points, their time
    is scaled by N/k, and their accuracy is compared on those k points (the GPU sizes' setting)."""
    wrapped = _WithEncoder(model)
    seen = []
    real = speed.fit_local_one_at_a_time

    def spy(model_, x, *args, **kwargs):
        seen.append(x.shape[0])
        return real(model_, x, *args, **kwargs)

    monkeypatch.setattr(speed, "fit_local_one_at_a_time", spy)
    simulate = _simulator(model)

    cfg = speed.Config(4, 2, 4, 2, ais_steps=4, ais_chains=2, ais_ladder=(2,), iwae_samples=50,
                       max_steps=40, published_max_steps=40, digits_epochs=1, reference_points=1)
    clock = {"t": 0.0}

    def fake_measure(fn, device=None):
        value = fn()
        clock["t"] += 1.0  # every measured call "takes" one second
        return speed.Measured(value, 1.0, 0.0)

    monkeypatch.setattr(speed, "_measure", fake_measure)
    rows = speed.bench_model("toy", wrapped, simulate, 4, 2, cfg, seed=0, log=lambda msg: None)
    assert seen == [1, 1, 1]  # local FFG x2, local flow: one point each
    local = [r for r in rows if r.estimator.startswith("local")]
    assert [r.ref.seconds for r in local] == [4.0, 4.0, 4.0] and all(r.ours.seconds == 1.0 for r in local)
    assert all("timed on 1 of 4 points, scaled" in r.ref_settings for r in local)


def test_best_of_repeats_alternates_and_keeps_each_fastest_run(monkeypatch):
    order = []
    clock = iter([0.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 9.0])  # durations: a 3, b 1, a 1, b 4
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(clock))
    best = speed.measure_best([lambda: order.append("a") or "a", lambda: order.append("b") or "b"], 2,
                              torch.device("cpu"))
    assert order == ["a", "b", "a", "b"]
    assert [m.seconds for m in best] == [1.0, 1.0] and [m.value for m in best] == ["a", "b"]


def test_inner_loop_utilization_counts_the_decoders_flops():
    from gapbench.models.vae import build_vae

    vae = build_vae((1, 4, 4), latent_dim=3, decoder_hidden=(5, 7), encoder_hidden=(6,)).requires_grad_(False)
    # 20 transitions x 4 leapfrog gradients x 4 FLOPs x 6 rows x (3*5 + 5*7 + 7*16) = 311,040 FLOPs in 1 ms
    u = speed.inner_loop_utilization(vae, num_rows=6, num_leapfrog=4, num_transitions=20, seconds=1e-3,
                                     device=torch.device("cpu"))
    assert u["layers"] == "3 -> 5 -> 7 -> 16"
    assert abs(u["ais_gflops"] - 311_040 / 1e-3 / 1e9) < float_tol(torch.float64, 311.04, num_terms=3)  # 2 divisions
    rel = float_tol(torch.float64, 1.0, num_terms=4)  # rounding only: GFLOP/s on one side, FLOP/s on the other
    assert 0 < u["fraction_of_peak"] == pytest.approx(u["ais_gflops"] / u["peak_gflops"], rel=rel)
    assert u["matmul_fraction"] > 0 and u["peak_gflops"] > 0
    assert speed.inner_loop_utilization(_WithEncoder(_lg()), 6, 4, 20, 1e-3, torch.device("cpu")) is None


def _lg():
    gen = torch.Generator().manual_seed(0)
    return LinearGaussian(torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), 0.7)
