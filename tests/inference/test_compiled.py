"""AIS with ``compile=True``: the eager chains, compiled; and eager PyTorch wherever compiling fails."""

import logging
import os

import pytest
import torch

import gapbench.inference.compiled as compiled_mod
from gapbench.inference import ais, ais_reverse
from gapbench.inference.ais import _mlp_transition
from gapbench.inference.compiled import Compiled, compile_mode
from gapbench.models.vae import build_vae
from tests.tolerance import assert_close_ulps


def _model(dtype=torch.float64, likelihood="bernoulli"):
    torch.manual_seed(0)
    extra = {"gaussian_std": 0.5} if likelihood == "gaussian" else {}
    model = build_vae((1, 3, 4), latent_dim=3, decoder_hidden=(8, 8), encoder_hidden=(6,), likelihood=likelihood,
                      **extra)
    return model.to(dtype).requires_grad_(False)


def _data(num_points=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(num_points, 1, 3, 4, generator=gen) < 0.4).to(dtype)


def _ran_compiled():
    """Assert that the transition really ran compiled; skip where ATEN_CPU_CAPABILITY forces an ISA, under
    which inductor's generated C++ may not build (the fallback then works, as tested below)."""
    entry = compiled_mod._CACHE[(_mlp_transition, "cpu")]
    if entry.failed and os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("torch.compile cannot build under a forced ATEN_CPU_CAPABILITY here")
    assert not entry.failed


def _assert_same_chains(fast, eager, num_steps, num_leapfrog=10):
    """Compiled and eager chains agree up to rounding: fused kernels reorder the decoder's sums (8 hidden
    units on 3 latents, 12 pixels), at each leapfrog step of each transition."""
    num_terms = num_steps * num_leapfrog * (8 + 12)
    assert_close_ulps(fast.log_px, eager.log_px, num_terms=num_terms)
    if fast.z is not None:
        assert_close_ulps(fast.z, eager.z, num_terms=num_terms)


@pytest.fixture
def fresh_cache(monkeypatch):
    """Each test compiles (or fails to) on its own, whatever earlier tests did."""
    monkeypatch.setattr(compiled_mod, "_CACHE", {})


@pytest.mark.slow
@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_compiled_ais_follows_the_eager_chains(start, fresh_cache):
    """Same draws, same arithmetic: in float64 the compiled chains end where the eager ones do."""
    model, x = _model(), _data()
    init = model.posterior(x) if start == "encoder" else None
    kw = dict(num_steps=25, num_chains=4, init=init, seed=3, step_size="auto" if init is not None else 0.01)
    eager = ais(model, x, **kw)
    fast = ais(model, x, compile=True, **kw)
    _ran_compiled()
    _assert_same_chains(fast, eager, kw["num_steps"])
    # Step sizes only ever move by exact factors 1.02 / 0.98 of the same start: equal bit for bit
    # while every accept decision is the same.
    assert torch.equal(fast.step_size, eager.step_size)
    back_eager = ais_reverse(model, x, eager.z[0], **kw)
    back_fast = ais_reverse(model, x, eager.z[0], compile=True, **kw)
    _assert_same_chains(back_fast, back_eager, kw["num_steps"])


@pytest.mark.slow
def test_cuda_graph_mode_runs_its_step_protocol(fresh_cache):
    """The CUDA branch (graph-tree step marks, outputs copied out) on CPU tensors, where
    torch.compile skips the graph capture but runs everything else of that mode."""
    model, x = _model(), _data()
    kw = dict(num_steps=10, num_chains=3, seed=2)
    eager = ais(model, x, **kw)
    compiled_mod._CACHE[(_mlp_transition, "cpu")] = Compiled(_mlp_transition, "cuda")
    fast = ais(model, x, compile=True, **kw)
    _ran_compiled()
    _assert_same_chains(fast, eager, kw["num_steps"])


def test_a_failing_compile_falls_back_to_eager(monkeypatch, fresh_cache, caplog):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model, x = _model(), _data()
    kw = dict(num_steps=12, num_chains=3, seed=5)
    with caplog.at_level(logging.WARNING, logger="gapbench.inference"):
        fast = ais(model, x, compile=True, **kw)
        again = ais(model, x, compile=True, **kw)
    eager = ais(model, x, **kw)
    # Bit-exact: after the failed compile both calls run the eager function itself, in this process.
    assert torch.equal(fast.log_px, eager.log_px) and torch.equal(again.log_px, eager.log_px)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once, not once per transition or per call
    assert "no C++ compiler found" in warnings[0] and "second line" not in warnings[0]
    assert "without compiling" in warnings[0]


def test_torch_compile_missing_altogether_falls_back(monkeypatch, fresh_cache, caplog):
    def unavailable(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    model, x = _model(), _data()
    with caplog.at_level(logging.WARNING, logger="gapbench.inference"):
        fast = ais(model, x, num_steps=8, num_chains=2, seed=1, compile=True)
    assert torch.equal(fast.log_px, ais(model, x, num_steps=8, num_chains=2, seed=1).log_px)  # the eager ops
    assert any("not supported on this Python" in r.getMessage() for r in caplog.records)


def test_an_error_of_the_function_itself_still_propagates(monkeypatch, fresh_cache):
    """Falling back must not swallow a real bug: the eager call raises it again."""

    def bad(a):
        raise ValueError("shape mismatch in the caller")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with pytest.raises(ValueError, match="shape mismatch"):
        Compiled(bad, "cpu")(torch.zeros(1))


def test_models_outside_the_compiled_path_run_eagerly(monkeypatch, fresh_cache, caplog):
    """A Gaussian-pixel decoder has no written-out gradient: compile=True changes nothing and says why."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    model = _model(likelihood="gaussian")
    x = torch.rand(4, 1, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="gapbench.inference"):
        fast = ais(model, x, num_steps=8, num_chains=2, seed=1, compile=True)
    assert calls == []
    assert torch.equal(  # bit-exact: nothing was compiled, both runs are the same eager ops
        fast.log_px, ais(model, x, num_steps=8, num_chains=2, seed=1).log_px)
    assert any("runs without compiling" in r.getMessage() for r in caplog.records)


def test_compile_mode_uses_cuda_graphs_on_cuda_only():
    assert compile_mode(torch.device("cpu")) == "default"
    assert compile_mode(torch.device("cuda")) == "reduce-overhead"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_ais_on_cuda_matches_eager(fresh_cache):
    model, x = _model(torch.float32), _data(dtype=torch.float32)
    model, x = model.cuda(), x.cuda()
    kw = dict(num_steps=20, num_chains=8, seed=0)
    eager = ais(model, x, **kw)
    fast = ais(model, x, compile=True, **kw)
    assert not compiled_mod._CACHE[(_mlp_transition, "cuda")].failed
    assert torch.allclose(fast.log_px, eager.log_px, atol=1e-3)
