"""Progress callbacks of fit_local and ais: honest counts, throttled calls, results unchanged."""

import itertools
from types import SimpleNamespace

import pytest
import torch

import gapbench.inference.progress as progress_mod
from gapbench.inference import ais, ais_reverse, fit_local
from tests.inference.conftest import NaNWhere

SMALL_FIT = dict(lr=2e-2, num_samples=20, check_every=10, patience=2, max_steps=300, num_final_samples=200)


@pytest.fixture
def every_call(monkeypatch):
    """No throttling: every pass of the loop reports."""
    monkeypatch.setattr(progress_mod, "INTERVAL_S", 0.0)


def _recorder():
    calls = []
    return calls, lambda done, total: calls.append((done, total))


def _assert_same_fit(a, b):
    for name in ("elbo", "elbo_stderr", "num_steps", "converged", "finite"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    assert torch.equal(a.trace.steps, b.trace.steps)
    assert torch.equal(a.trace.elbo.nan_to_num(7.0), b.trace.elbo.nan_to_num(7.0))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_fit_local_counts_point_steps_and_keeps_its_result(linear_gaussian, lg_data, every_call, chunk_size):
    plain = fit_local(linear_gaussian, lg_data, "ffg", seed=0, chunk_size=chunk_size, **SMALL_FIT)
    calls, fn = _recorder()
    fit = fit_local(linear_gaussian, lg_data, "ffg", seed=0, chunk_size=chunk_size, progress_fn=fn, **SMALL_FIT)
    _assert_same_fit(plain, fit)

    num_points, max_steps = lg_data.shape[0], SMALL_FIT["max_steps"]
    exact = int(fit.num_steps.sum())
    done = [d for d, _ in calls]
    total = [t for _, t in calls]
    assert calls[-1] == (exact, exact)  # the last report: everything done, the exact total
    assert exact < num_points * max_steps  # some points stopped early, so the total did shrink
    assert all(d1 >= d0 for d0, d1 in zip(done, done[1:]))
    assert all(t1 <= t0 for t0, t1 in zip(total, total[1:]))
    assert all(d <= t <= num_points * max_steps for d, t in calls)
    # Each pass of the loop is one step of each active datapoint.
    capacity = num_points if chunk_size is None else chunk_size
    assert all(0 < d1 - d0 <= capacity for d0, d1 in zip(done[:-2], done[1:-1]))


def test_fit_local_counts_a_failed_point_once(linear_gaussian, lg_data, every_call):
    """A datapoint whose loss is NaN stops at its first step: one point-step, and its rest leaves the total."""
    x = lg_data.clone()
    x[2, 0] = 1234.0
    model = NaNWhere(linear_gaussian, lambda x: x[:, 0] == 1234.0)
    calls, fn = _recorder()
    fit = fit_local(model, x, "ffg", seed=0, progress_fn=fn, **SMALL_FIT)
    assert not bool(fit.finite[2])
    attempts = fit.num_steps.clone()
    attempts[2] += 1  # its one step was taken and rejected
    assert calls[-1] == (int(attempts.sum()), int(attempts.sum()))


def test_fit_local_reports_at_most_every_interval(linear_gaussian, lg_data, monkeypatch):
    """A clock that advances 1/16 s per reading: a report every fourth pass (0.25 s >= 0.2 s), plus the last."""
    clock = itertools.count()
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(monotonic=lambda: next(clock) / 16))
    calls, fn = _recorder()
    fit = fit_local(linear_gaussian, lg_data, "ffg", seed=0, progress_fn=fn, **SMALL_FIT)
    num_passes = int(fit.num_steps.max())  # all points start together, one clock reading per pass
    assert len(calls) == num_passes // 4 + 1


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_ais_counts_transitions_and_keeps_its_result(linear_gaussian, lg_data, every_call, chunk_size):
    kw = dict(num_steps=15, num_chains=3, num_leapfrog=2, seed=1, chunk_size=chunk_size, record_every=5)
    plain = ais(linear_gaussian, lg_data, **kw)
    calls, fn = _recorder()
    res = ais(linear_gaussian, lg_data, progress_fn=fn, **kw)
    for name in ("log_px", "log_weights", "acceptance", "step_size", "z"):
        assert torch.equal(getattr(plain, name), getattr(res, name)), name
    assert torch.equal(plain.trace.log_z, res.trace.log_z)
    num_chunks = 1 if chunk_size is None else -(-lg_data.shape[0] // chunk_size)
    total = num_chunks * 15
    assert [d for d, _ in calls] == list(range(1, total + 1)) + [total]
    assert all(t == total for _, t in calls)

    back_calls, back_fn = _recorder()
    back = ais_reverse(linear_gaussian, lg_data, res.z[0], progress_fn=back_fn, **kw)
    assert torch.equal(back.log_px, ais_reverse(linear_gaussian, lg_data, res.z[0], **kw).log_px)
    assert back_calls[-1] == (total, total)


@pytest.mark.slow
def test_ais_compiled_path_reports_too(every_call):
    """compile=True (or its eager fallback, where compiling fails): the same transitions reported."""
    from gapbench.models.vae import build_vae

    torch.manual_seed(0)
    model = build_vae((1, 3, 4), latent_dim=3, decoder_hidden=(8,), encoder_hidden=(6,)).double().requires_grad_(False)
    x = (torch.rand(4, 1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.4).double()
    calls, fn = _recorder()
    kw = dict(num_steps=6, num_chains=2, num_leapfrog=2, seed=0, compile=True)
    res = ais(model, x, progress_fn=fn, **kw)
    assert torch.equal(res.log_px, ais(model, x, **kw).log_px)
    assert [d for d, _ in calls] == [1, 2, 3, 4, 5, 6, 6]


@pytest.mark.parametrize("stage", ["amortized", "local_ffg", "iwae", "ais"])
def test_run_stage_passes_progress_on(stage, tmp_path, every_call):
    """Each evaluation stage reports within its batch, ending at done == total; its columns are unchanged."""
    from gapbench.gaps import run_stage
    from gapbench.models.vae import build_vae
    from gapbench.recipe import load_recipe
    from tests.stages.conftest import TINY

    (tmp_path / "tiny.yaml").write_text(TINY)
    cfg = load_recipe(tmp_path / "tiny.yaml").evaluate
    torch.manual_seed(0)
    model = build_vae((1, 3, 4), latent_dim=2, decoder_hidden=(8,), encoder_hidden=(6,)).requires_grad_(False)
    x = (torch.rand(3, 1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    plain, _ = run_stage(stage, model, x, cfg, seed=5)
    calls, fn = _recorder()
    cols, _ = run_stage(stage, model, x, cfg, seed=5, progress_fn=fn)
    for k in plain:
        assert torch.equal(plain[k], cols[k]), k
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert len(calls) > 2 or stage in ("amortized", "iwae")
