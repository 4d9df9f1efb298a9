"""Properties of the estimators on random linear-Gaussian models, where log p(x) is exact.

For z ~ N(0, I_D), x|z ~ N(Wz + b, sigma^2 I_P) with random W, b, sigma,
D, P in 1..4 and N in 1..5 datapoints (float32 or float64):

* elbo, iwae, fit_local, ais return [N] float64, finite;
* per datapoint, within Monte Carlo error: L[q] <= IWAE_k <= log p(x),
  L[q*_FFG] <= log p(x) - min KL(FFG || posterior), AIS <= log p(x);
* E[IWAE_k] is non-decreasing in k;
* permuting the datapoints permutes the outputs (up to Monte Carlo noise,
  since a seed draws one noise tensor for the whole batch).

Tolerances are 5 Monte Carlo standard errors (IWAE and AIS: the delta-method
error of a log-mean of importance weights) plus a rounding allowance for
float32. Examples are derandomized, so a failure replays exactly.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapbench.inference import ais, elbo, fit_local, iwae
from gapbench.inference.bounds import elbo_and_stderr, log_weights
from gapbench.models.posterior import DiagonalGaussian
from gapbench.models.reference import LinearGaussian

SETTINGS = dict(deadline=None, derandomize=True, database=None)


@st.composite
def problems(draw):
    """A random LinearGaussian, N datapoints drawn from it, and an FFG q near its posterior."""
    latent_dim = draw(st.integers(1, 4))
    data_dim = draw(st.integers(1, 4))
    num_points = draw(st.integers(1, 5))
    sigma = draw(st.floats(0.3, 2.0))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**20))
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(data_dim, latent_dim, generator=gen, dtype=torch.float64)
    b = torch.randn(data_dim, generator=gen, dtype=torch.float64)
    model64 = LinearGaussian(W, b, sigma)
    z = torch.randn(num_points, latent_dim, generator=gen, dtype=torch.float64)
    x = z @ W.T + b + sigma * torch.randn(num_points, data_dim, generator=gen, dtype=torch.float64)
    # q: the posterior's marginals, widened so that importance weights have finite variance
    # (D diag(S) >= S, so D/2 diag(S) e^u with u > 0 is wider than S/2 in every direction),
    # its mean moved by up to half a marginal sd.
    post_mean, cov = model64.posterior_moments(x)
    marginal_var = torch.diagonal(cov).expand_as(post_mean)
    shift, widen = (torch.rand(post_mean.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    mean = post_mean + 0.5 * (2 * shift - 1) * marginal_var.sqrt()
    log_var = marginal_var.log() + math.log(max(1.0, latent_dim / 2)) + 0.1 + 0.5 * widen
    model = LinearGaussian(W.to(dtype), b.to(dtype), sigma)
    return {
        "model": model,
        "x": x.to(dtype),
        "mean": mean.to(dtype),
        "log_var": log_var.to(dtype),
        "log_px": model64.log_marginal(x),  # exact, float64
        "best_ffg": model64.log_marginal(x) - model64.kl_to_posterior(*model64.optimal_ffg(x), x),
        "atol": 1e-6 if dtype == torch.float64 else 2e-4 * (1 + model64.log_marginal(x).abs().max().item()),
    }


def ffg(mean, log_var):
    return DiagonalGaussian(mean.shape[-1]).posterior({"mean": mean, "log_var": log_var}, mean.shape[0])


def log_mean_stderr(log_w):
    """Delta-method standard error of log(mean w) from log-weights [K, N]: sqrt(K sum w~^2 - 1) / sqrt(K)."""
    k = log_w.shape[0]
    w = torch.softmax(log_w.double(), dim=0)
    return (k * (w**2).sum(0) - 1).clamp_min(0).sqrt() / math.sqrt(k)


def iwae_stderr(model, x, q, k, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return log_mean_stderr(log_weights(model, x, q, k))


def _fit(model, x, q, seed):
    """The local FFG fit, started (as evaluations do) from an amortized-like q near the posterior."""
    return fit_local(model, x, init=q, lr=0.05, num_samples=10, check_every=10, patience=3, max_steps=200,
                     num_final_samples=500, seed=seed)


def _ais(model, x, seed):
    return ais(model, x, num_steps=50, num_chains=32, num_leapfrog=3, schedule="sigmoid", seed=seed)


def _check_output(value, num_points):
    assert value.shape == (num_points,) and value.dtype == torch.float64
    assert torch.isfinite(value).all(), value


@settings(max_examples=25, **SETTINGS)
@given(problems())
def test_elbo_and_iwae_are_finite_float64_and_ordered_below_log_px(p):
    model, x, n = p["model"], p["x"], p["x"].shape[0]
    q = ffg(p["mean"], p["log_var"])
    value_elbo = elbo(model, x, q, num_samples=2000, seed=1)
    torch.manual_seed(1)
    _, se_elbo = elbo_and_stderr(model, x, q, 2000)
    k = 500
    value_iwae = iwae(model, x, q, num_samples=k, seed=2)
    se_iwae = iwae_stderr(model, x, q, k, seed=3)
    for value in (value_elbo, value_iwae):
        _check_output(value, n)
    tol = p["atol"]
    assert (value_elbo <= value_iwae + 5 * (se_elbo**2 + se_iwae**2).sqrt() + tol).all(), (value_elbo, value_iwae)
    assert (value_iwae <= p["log_px"] + 5 * se_iwae + tol).all(), (value_iwae, p["log_px"])
    # the ELBO's gap is a KL divergence: it is at least that of the best FFG
    assert (value_elbo <= p["best_ffg"] + 5 * se_elbo + tol).all()


@settings(max_examples=10, **SETTINGS)
@given(problems())
def test_iwae_is_non_decreasing_in_k_on_average(p):
    """E[IWAE_k] over R independent replicates per datapoint, for k = 1, 4, 16, 64."""
    model, x, n = p["model"], p["x"], p["x"].shape[0]
    reps = 200
    q = ffg(p["mean"].repeat(reps, 1), p["log_var"].repeat(reps, 1))
    x_rep = x.repeat(reps, 1)  # [R * N, P], replicate r of point i at r * N + i
    means, ses = [], []
    for i, k in enumerate((1, 4, 16, 64)):
        values = iwae(model, x_rep, q, num_samples=k, seed=10 + i).reshape(reps, n)
        means.append(values.mean(0))
        ses.append(values.std(0) / math.sqrt(reps))
    for (m1, s1), (m2, s2) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert (m1 <= m2 + 5 * (s1**2 + s2**2).sqrt() + p["atol"]).all(), (m1, m2)
    assert (means[-1] <= p["log_px"] + 5 * ses[-1] + p["atol"]).all()


@settings(max_examples=8, **SETTINGS)
@given(problems())
def test_fit_local_is_finite_float64_and_never_beats_the_best_ffg(p):
    model, x, n = p["model"], p["x"], p["x"].shape[0]
    q = ffg(p["mean"], p["log_var"])
    fit = _fit(model, x, q, seed=0)
    _check_output(fit.elbo, n)
    assert fit.elbo_stderr.shape == (n,) and bool(fit.finite.all())
    assert (fit.elbo <= p["best_ffg"] + 5 * fit.elbo_stderr + p["atol"]).all(), (fit.elbo, p["best_ffg"])
    # and it gets close to it: the fitted q* is near the optimum (flat there, so within a small slack)
    assert (fit.elbo >= p["best_ffg"] - 5 * fit.elbo_stderr - 0.1).all(), (fit.elbo, p["best_ffg"])


@settings(max_examples=6, **SETTINGS)
@given(problems())
def test_ais_is_finite_float64_and_below_log_px(p):
    model, x, n = p["model"], p["x"], p["x"].shape[0]
    res = _ais(model, x, seed=0)
    _check_output(res.log_px, n)
    se = log_mean_stderr(res.log_weights)
    assert (res.log_px <= p["log_px"] + 5 * se + p["atol"]).all(), (res.log_px, p["log_px"], se)


def _permuted(p, rnd):
    n = p["x"].shape[0]
    perm = list(range(n))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    return perm, ffg(p["mean"], p["log_var"]), ffg(p["mean"][perm], p["log_var"][perm])


def _assert_close(name, a, b, se_a, se_b, atol):
    """a and b agree within 5 standard errors of their difference."""
    assert (a - b).abs().le(5 * (se_a**2 + se_b**2).sqrt() + atol).all(), (name, a, b, se_a, se_b)


@settings(max_examples=15, **SETTINGS)
@given(problems(), st.randoms(use_true_random=False))
def test_permuting_the_datapoints_permutes_elbo_and_iwae(p, rnd):
    model, x = p["model"], p["x"]
    perm, q, q_perm = _permuted(p, rnd)
    torch.manual_seed(0)
    a, se_a = elbo_and_stderr(model, x, q, 2000)
    torch.manual_seed(0)
    b, se_b = elbo_and_stderr(model, x[perm], q_perm, 2000)
    _assert_close("elbo", a[perm], b, se_a[perm], se_b, p["atol"])
    a = iwae(model, x, q, num_samples=500, seed=0)
    b = iwae(model, x[perm], q_perm, num_samples=500, seed=0)
    se = iwae_stderr(model, x, q, 500, seed=1)
    _assert_close("iwae", a[perm], b, se[perm], se[perm], p["atol"])


@settings(max_examples=5, **SETTINGS)
@given(problems(), st.randoms(use_true_random=False))
def test_permuting_the_datapoints_permutes_fit_local_and_ais(p, rnd):
    model, x = p["model"], p["x"]
    perm, q, q_perm = _permuted(p, rnd)
    fa, fb = _fit(model, x, q, seed=0), _fit(model, x[perm], q_perm, seed=0)
    # two fits on different noise end at different points of a flat optimum: 0.1 nats of slack
    _assert_close("fit_local", fa.elbo[perm], fb.elbo, fa.elbo_stderr[perm], fb.elbo_stderr, p["atol"] + 0.1)
    ra, rb = _ais(model, x, seed=0), _ais(model, x[perm], seed=0)
    _assert_close("ais", ra.log_px[perm], rb.log_px, log_mean_stderr(ra.log_weights)[perm],
                  log_mean_stderr(rb.log_weights), p["atol"])
