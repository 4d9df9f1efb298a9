"""Annealed importance sampling (AIS) of log p(x) with HMC transitions, forward and reverse.

Intermediate densities, for each datapoint x,
    log f_t(z) = log p0(z) + beta_t (log p(x, z) - log p0(z)),   0 = beta_0 < ... < beta_T = 1,
from a start distribution p0 (the prior, or a q(z|x) with an exact density)
to the unnormalized posterior p(x, z). C chains per datapoint; all chains of
all datapoints in a chunk advance as one [C, N, D] tensor. Neal 2001;
Wu, Burda, Salakhutdinov & Grosse 2017 for decoder-based models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from gapbench.inference._common import (
    StandardNormalPrior,
    check_batch,
    check_model,
    float_dtype,
    index_posterior,
    point_chunks,
    seeded,
    start_distribution,
)
from gapbench.inference.compiled import compiled
from gapbench.inference.gradients import (
    flat_data,
    joint_density,
    mlp_decoder,
    mlp_log_joint_and_grad,
    value_and_grad,
)
from gapbench.inference.hmc import HMCState, hmc_transition
from gapbench.inference.progress import ProgressFn, throttled
from gapbench.models.posterior import DiagonalGaussian, FamilyPosterior
from gapbench.inference.schedule import annealing_schedule
from gapbench.ops import log_normal, log_standard_normal, logmeanexp

logger = logging.getLogger("gapbench.inference")

DEFAULT_NUM_STEPS = 1000
DEFAULT_NUM_CHAINS = 16
# Per-chain step-size adaptation (REFERENCE.md): start, target acceptance, factors, clamp.
ACCEPTANCE_SMOOTHING = 0.9  # exponential moving average of each chain's acceptance (as Wu et al. 2017)


@dataclass
class AISTrace:
    """Running estimate during annealing: ``log_z[k]`` [N] after ``steps[k]`` transitions, at ``beta[k]``.

    Forward: log Z_beta = log int p0(z)^(1-beta) p(x, z)^beta dz, which is log p(x) at beta = 1.
    For the estimate as a function of the schedule length T, run :func:`ais` once per T.
    """

    steps: Tensor  # [K] long
    beta: Tensor  # [K] float64
    log_z: Tensor  # [K, N] float64


@dataclass
class AISResult:
    """Result of :func:`ais` / :func:`ais_reverse` for N datapoints and C chains each.

    log_px [N] float64: logmeanexp of the chains' log-weights (forward: a stochastic
    lower bound on log p(x); reverse: minus that, a stochastic upper bound).
    log_weights [C, N] float64; acceptance [N]: mean HMC accept probability;
    step_size [C, N]: each chain's final step size; ess [N]: (sum w)^2 / sum w^2 over
    chains, in [1, C]; finite [N]: log_px is finite; z [C, N, D]: final chain states
    (approximate posterior samples, forward). trace: :class:`AISTrace` or None.
    """

    log_px: Tensor
    log_weights: Tensor
    acceptance: Tensor
    step_size: Tensor
    ess: Tensor
    finite: Tensor
    z: Tensor
    trace: Optional[AISTrace]
    num_steps: int
    num_chains: int
    reverse: bool = False

    @property
    def num_nonfinite(self) -> int:
        return int((~self.finite).sum())


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = (sum_c w_c)^2 / sum_c w_c^2 from log-weights [C, N]; returns [N] in [1, C]."""
    w = torch.softmax(log_weights, dim=0)  # normalized, max-shifted
    return 1.0 / (w**2).sum(0)


def _tempered(log_p0_fn, log_joint_fn, beta):
    """z -> (log f_beta [C, N], grad [C, N, D], aux) with one pass through the model.

    ``log_p0_fn(z, need_value)`` and ``log_joint_fn(z, need_value)`` give (log p0 or None,
    its gradient) and (log p(x, z) or None, its gradient). aux = (log p0, log p(x, z),
    grad log p0, grad log p(x, z)), which give f and its gradient at any other beta
    without evaluating the model again. With ``need_value=False`` (leapfrog steps
    before the last) only the gradient is computed and returned, as (None, grad,
    None), which saves the log-densities' own arithmetic. beta: a float or a 0-d tensor.
    """

    def fn(z: Tensor, need_value: bool = True):
        log_p0, grad_p0 = log_p0_fn(z, need_value)
        log_pxz, grad_pxz = log_joint_fn(z, need_value)
        if not need_value:
            return None, torch.lerp(grad_p0, grad_pxz, beta), None
        aux = (log_p0, log_pxz, grad_p0, grad_pxz)
        log_f, grad = _combine(beta, aux)
        return log_f, grad, aux

    return fn


def _gaussian_moments(p0) -> Optional[Tuple[Tensor, Tensor]]:
    """(mean, log_var) [n, D] of a diagonal-Gaussian start (the prior, an FFG q), else None."""
    if isinstance(p0, StandardNormalPrior):
        shape = (p0.num_points, p0.latent_dim)
        return (torch.zeros(shape, dtype=p0.dtype, device=p0.device),
                torch.zeros(shape, dtype=p0.dtype, device=p0.device))  # two tensors: compiled code guards on aliasing
    if isinstance(p0, FamilyPosterior) and isinstance(p0.family, DiagonalGaussian):
        return p0.params["mean"], p0.params["log_var"]
    return None


def _start_density(p0):
    """(z, need_value) -> (log p0(z) [C, N] or None, grad [C, N, D]), resolved once per chunk:
    closed forms for the prior and diagonal Gaussians, autograd for any other start."""
    if isinstance(p0, StandardNormalPrior):
        return _standard_normal_log_prob_and_grad
    moments = _gaussian_moments(p0)
    if moments is not None:
        mean, log_var = moments
        return partial(_gaussian_log_prob_and_grad, mean, log_var, torch.exp(-log_var))
    return partial(_autograd_log_prob_and_grad, p0)


def _autograd_log_prob_and_grad(p0, z: Tensor, need_value: bool = True) -> Tuple[Tensor, Tensor]:
    return value_and_grad(p0.log_prob, z)


def _standard_normal_log_prob_and_grad(z: Tensor, need_value: bool = True) -> Tuple[Optional[Tensor], Tensor]:
    return (log_standard_normal(z) if need_value else None), -z


def _gaussian_log_prob_and_grad(mean: Tensor, log_var: Tensor, precision: Tensor, z: Tensor,
                                need_value: bool = True) -> Tuple[Optional[Tensor], Tensor]:
    """log N(z; mean, diag exp(log_var)) [C, N] (or None) and its gradient (mean - z) * precision [C, N, D]."""
    return (log_normal(z, mean, log_var) if need_value else None), (mean - z) * precision


def _transition(start_fn, joint_fn, z, aux, eps, beta, momentum, uniform, num_leapfrog: int):
    """One AIS transition: an HMC step at temperature beta, its random draws given.

    start_fn, joint_fn as in :func:`_tempered`; z [C, N, D], aux as in :func:`_tempered`,
    eps [C, N], beta a float or 0-d tensor, momentum [C, N, D], uniform [C, N].
    Returns (z, aux, accept_prob) after the transition.
    """
    log_f, grad = _combine(beta, aux)
    state, info = hmc_transition(HMCState(z, log_f, grad, aux), eps, num_leapfrog,
                                 _tempered(start_fn, joint_fn, beta), momentum, uniform, takes_need_value=True)
    return state.z, state.aux, info.accept_prob


def _mlp_transition(z, aux, eps, beta, momentum, uniform, x_flat, mean, log_var, weights, biases,
                    activation: str, num_leapfrog: int):
    """:func:`_transition` for an MLP decoder from a diagonal-Gaussian p0, as a pure function of
    tensors that ``torch.compile`` can trace whole: x_flat [N, P], mean and log_var [N, D],
    the decoder's weights and biases; the rest as in :func:`_transition`.
    """
    start_fn = partial(_gaussian_log_prob_and_grad, mean, log_var, torch.exp(-log_var))
    joint_fn = partial(mlp_log_joint_and_grad, list(zip(weights, biases)), activation, x_flat)
    return _transition(start_fn, joint_fn, z, aux, eps, beta, momentum, uniform, num_leapfrog)


def _compiled_step(model, x: Tensor, p0, num_leapfrog: int):
    """The compiled transition (z, aux, eps, beta, momentum, uniform) -> (z, aux, accept_prob), or None.

    Compiling covers models with :func:`mlp_decoder` annealed from a diagonal
    Gaussian (the prior, an FFG q or q*_FFG): every model and start of gapbench's own
    recipes. Others run eagerly (said in an info-level log line).
    """
    spec, moments = mlp_decoder(model), _gaussian_moments(p0)
    if spec is None or moments is None:
        logger.info("AIS compile: applies to MLP decoders with Bernoulli pixels from a Gaussian start; "
                    "%s from %s runs without compiling", type(model).__name__, type(p0).__name__)
        return None
    layers, activation = spec
    weights, biases = [w for w, _ in layers], [b for _, b in layers]
    # Contiguous copies: the compiled code is specialized to its inputs' strides.
    mean, log_var = (t.contiguous() for t in moments)
    x_flat = flat_data(x, mean.dtype).contiguous()
    step = compiled(_mlp_transition, x.device)

    def fn(z, aux, eps, beta, momentum, uniform):
        beta_t = torch.tensor(beta, dtype=z.dtype, device=z.device)  # a tensor: no recompile per beta
        return step(z, aux, eps, beta_t, momentum, uniform, x_flat, mean, log_var, weights, biases,
                    activation, num_leapfrog)

    return fn


def _combine(beta: float, aux) -> Tuple[Optional[Tensor], Tensor]:
    """log f_beta and its gradient from aux; the value is None where log p(x, z) was not computed."""
    log_p0, log_pxz, grad_p0, grad_pxz = aux
    log_f = None if log_pxz is None else torch.lerp(log_p0, log_pxz, beta)
    return log_f, torch.lerp(grad_p0, grad_pxz, beta)


def _anneal(model, x, p0, z, betas, num_leapfrog, step_size, target_acceptance, step_size_range, record_every,
            compile=False, progress=None):
    """Run C chains per datapoint through the densities f_{betas[0]} .. f_{betas[-1]}.

    log w = sum_i (betas[i] - betas[i-1]) (log p(x, z_{i-1}) - log p0(z_{i-1})), accumulated in float64.
    ``progress(i)``, when given, is called after transition i (a Python count: no device sync).
    """
    num_chains, num_points = z.shape[0], z.shape[1]
    lo, hi = step_size_range
    eps = torch.as_tensor(step_size, dtype=z.dtype, device=z.device).expand(num_chains, num_points).clone()
    log_w = torch.zeros(num_chains, num_points, dtype=torch.float64, device=z.device)
    accept_sum = torch.zeros_like(log_w)
    smoothed = None
    steps, beta_rec, log_z_rec = [], [], []
    start_fn, joint_fn = _start_density(p0), joint_density(model, x)  # resolved once for all transitions
    aux = _tempered(start_fn, joint_fn, float(betas[0]))(z)[2]
    step = (_compiled_step(model, x, p0, num_leapfrog) if compile else None) or partial(
        _transition, start_fn, joint_fn, num_leapfrog=num_leapfrog)
    num_transitions = len(betas) - 1
    for i in range(1, num_transitions + 1):
        beta = float(betas[i])
        log_w += (betas[i] - betas[i - 1]) * (aux[1] - aux[0]).double()
        # The draws of hmc_step, in its order: compiled or not, a seed gives the same chains.
        momentum = torch.randn(z.shape, dtype=z.dtype, device=z.device)
        uniform = torch.rand(z.shape[:-1], dtype=aux[0].dtype, device=z.device)
        z, aux, accept_prob = step(z, aux, eps, beta, momentum, uniform)
        accept = accept_prob.double()
        accept_sum += accept
        smoothed = accept if smoothed is None else ACCEPTANCE_SMOOTHING * smoothed + (1 - ACCEPTANCE_SMOOTHING) * accept
        eps = torch.where(smoothed > target_acceptance, eps * 1.02, eps * 0.98).clamp(lo, hi)
        if record_every and (i % record_every == 0 or i == num_transitions):
            steps.append(i)
            beta_rec.append(beta)
            log_z_rec.append(logmeanexp(log_w, dim=0))
        if progress is not None:
            progress(i)
    record = (steps, beta_rec, log_z_rec) if record_every else None
    return log_w, accept_sum / num_transitions, eps, z, record


def _report_transitions(report, offset: int, total: int, i: int) -> None:
    report(offset + i, total)


AUTO_STEP_FRACTION = 0.1


def _auto_step_size(p0, step_size_range) -> Tensor:
    """A starting step size per datapoint [n]: 0.1 x the geometric mean of p0's standard deviations.

    The published 0.01 suits the prior (scale 1) and long schedules, where the
    adaptation has time to grow it; a short schedule from a narrow q(z|x) spends
    most of its transitions growing the step size instead (see benchmarks/speed.py).
    """
    moments = _gaussian_moments(p0)
    if moments is not None:
        log_std = 0.5 * moments[1].mean(-1)
    else:
        with torch.no_grad():
            log_std = p0.sample(64).std(0).clamp_min(1e-12).log().mean(-1)
    lo, hi = step_size_range
    return (AUTO_STEP_FRACTION * log_std.exp()).clamp(lo, hi)


def _run(model, x, init, z_start, reverse, num_steps, num_chains, num_leapfrog, schedule, step_size,
         target_acceptance, step_size_range, chunk_size, record_every, seed, compile,
         progress_fn: Optional[ProgressFn] = None) -> AISResult:
    latent_dim = check_model(model)
    num_points = check_batch(x)
    if num_chains < 1 or num_leapfrog < 1:
        raise ValueError("num_chains and num_leapfrog must be at least 1")
    device, dtype = x.device, float_dtype(x)
    betas = annealing_schedule(num_steps, schedule)
    if reverse:
        betas = betas.flip(0)
    p0_all = start_distribution(model, init, num_points, latent_dim, device, dtype, need_exact=True)
    if hasattr(p0_all, "detach"):
        try:
            p0_all = p0_all.detach()
        except NotImplementedError:
            pass
    parts: List[tuple] = []
    chunks = list(point_chunks(num_points, chunk_size))
    # Progress in transitions: each chunk's chains take len(betas) - 1 of them.
    report = throttled(progress_fn)
    num_transitions = len(betas) - 1
    total = len(chunks) * num_transitions
    with seeded(seed, device):
        for k, idx in enumerate(chunks):
            p0 = index_posterior(p0_all, idx, num_points)
            if reverse:
                z0 = z_start[:, idx].to(device=device, dtype=dtype)
                z0 = z0.expand(num_chains, -1, -1).clone() if z0.shape[0] == 1 else z0
            else:
                with torch.no_grad():
                    z0 = p0.sample(num_chains).detach()  # [C, n, D]
            eps0 = _auto_step_size(p0, step_size_range) if step_size == "auto" else float(step_size)
            progress = None if report is None else partial(_report_transitions, report, k * num_transitions, total)
            parts.append(_anneal(model, x[idx], p0, z0, betas, num_leapfrog, eps0, target_acceptance,
                                 step_size_range, record_every, compile, progress))
    log_w = torch.cat([p[0] for p in parts], dim=1)
    acceptance = torch.cat([p[1] for p in parts], dim=1).mean(0)
    eps = torch.cat([p[2] for p in parts], dim=1)
    z = torch.cat([p[3] for p in parts], dim=1)
    log_px = logmeanexp(log_w, dim=0)
    if reverse:
        log_px = -log_px
    trace = None
    if record_every:
        steps, beta_rec, _ = parts[0][4]
        log_z = torch.cat([torch.stack(p[4][2]) for p in parts], dim=1)  # [K, N]
        trace = AISTrace(torch.tensor(steps, dtype=torch.long), torch.tensor(beta_rec, dtype=torch.float64),
                         -log_z if reverse else log_z)
    if report is not None:
        report.finish(total, total)
    finite = torch.isfinite(log_px)
    if int((~finite).sum()):
        logger.warning("%s AIS: %d of %d datapoints gave a non-finite estimate (kept, flagged in .finite)",
                       "reverse" if reverse else "forward", int((~finite).sum()), num_points)
    return AISResult(log_px, log_w, acceptance, eps, effective_sample_size(log_w), finite, z, trace,
                     num_steps, num_chains, reverse)


def ais(
    model,
    x: Tensor,
    num_steps: int = DEFAULT_NUM_STEPS,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_leapfrog: int = 10,
    schedule: str = "sigmoid",
    init=None,
    *,
    step_size: Union[float, str] = 0.01,
    target_acceptance: float = 0.65,
    step_size_range: Tuple[float, float] = (1e-4, 0.5),
    chunk_size: Optional[int] = None,
    record_every: Optional[int] = None,
    seed: Optional[int] = None,
    compile: bool = False,
    progress_fn: Optional[ProgressFn] = None,
) -> AISResult:
    """Estimate log p(x) per datapoint by annealed importance sampling with HMC.

    log p_hat(x) = log (1/C) sum_c exp(log w_c),  log w_c = sum_t (beta_t - beta_{t-1}) (log p(x, z_{t-1}) - log p0(z_{t-1}))

    E[p_hat(x)] = p(x), so E[log p_hat(x)] <= log p(x): a stochastic lower bound
    that tightens as num_steps grows. Each transition is one HMC step with
    ``num_leapfrog`` leapfrog steps whose step size adapts per chain (start
    ``step_size``, times 1.02 or 0.98 as the chain's smoothed acceptance is above
    or below ``target_acceptance``, clamped to ``step_size_range``).

    Args:
        model: ``latent_dim``, ``log_prior(z)``, ``log_likelihood(x, z)``; z [S, N, D] -> [S, N].
        x: data [N, ...]; chains take x's device and floating dtype.
        num_steps: T, intermediate distributions (transitions) per chain.
        num_chains: C, independent chains per datapoint.
        num_leapfrog: leapfrog steps per HMC transition.
        schedule: "sigmoid" (Wu et al. 2017) or "linear" spacing of beta_t.
        init: p0. None: the prior, which must be N(0, I) (checked against
            model.log_prior; pass a non-standard prior as init). Else a Posterior or torch
            Distribution [N] x [D] with an exact log-density, e.g. the encoder's q; a
            family whose log q is only a bound (``exact_log_prob=False``) raises ValueError.
        step_size: the starting step size (0.01, as published), or "auto": 0.1 x the
            geometric mean of p0's standard deviations, per datapoint -- much better
            for short schedules from a q(z|x) (fewer transitions spent adapting it).
        chunk_size: most datapoints annealed at once (memory ~ C * chunk_size); None: all.
        record_every: also return the running estimate every this many transitions (:class:`AISTrace`).
        seed: run under this seed without disturbing the global generator.
        compile: run each transition through ``torch.compile`` (on a CUDA device also as a
            CUDA graph); falls back to eager PyTorch, with a warning, where compiling fails.
            Applies to MLP decoders with Bernoulli pixels from a diagonal-Gaussian start;
            the same random draws as without it, so results agree up to rounding. The first
            call per chunk shape compiles (about 10 s on a CPU).
        progress_fn: None, or called as ``progress_fn(done, total)`` in transitions: done of
            total = (number of chunks) x num_steps, all chains of a chunk advancing together;
            at most every 0.2 s and once at the end with done == total. It does not change
            any result.

    Returns:
        :class:`AISResult`. Neal 2001; Wu et al. 2017.
    """
    return _run(model, x, init, None, False, num_steps, num_chains, num_leapfrog, schedule, step_size,
                target_acceptance, step_size_range, chunk_size, record_every, seed, compile, progress_fn)


def ais_reverse(
    model,
    x: Tensor,
    z: Tensor,
    num_steps: int = DEFAULT_NUM_STEPS,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_leapfrog: int = 10,
    schedule: str = "sigmoid",
    init=None,
    *,
    step_size: Union[float, str] = 0.01,
    target_acceptance: float = 0.65,
    step_size_range: Tuple[float, float] = (1e-4, 0.5),
    chunk_size: Optional[int] = None,
    record_every: Optional[int] = None,
    seed: Optional[int] = None,
    compile: bool = False,
    progress_fn: Optional[ProgressFn] = None,
) -> AISResult:
    """Reverse AIS: anneal from the posterior back to p0, starting at exact posterior samples z.

    log p_hat(x) = -log (1/C) sum_c exp(log w_c),  log w_c = sum_t (beta_{t-1} - beta_t) (log p(x, z_t) - log p0(z_t))

    The reverse weights estimate 1/p(x) without bias, so the result is a
    stochastic UPPER bound on log p(x) -- valid only when z is an exact sample of
    p(z|x), as it is for data simulated from the model (see :func:`bdmc`).

    Args:
        z: [N, D] (one exact posterior sample per datapoint, shared by its C chains)
            or [C, N, D]. Other arguments (``progress_fn`` too) as in :func:`ais`.

    Returns:
        :class:`AISResult` with ``reverse=True`` (``log_px`` is the upper estimate).
        Grosse, Ghahramani & Adams 2015.
    """
    if z.dim() == 2:
        z = z.unsqueeze(0)
    if z.dim() != 3 or z.shape[1] != x.shape[0] or z.shape[0] not in (1, num_chains):
        raise ValueError(f"z must be [N, D] or [C, N, D] with N = {x.shape[0]} and C = {num_chains}, got {tuple(z.shape)}")
    return _run(model, x, init, z, True, num_steps, num_chains, num_leapfrog, schedule, step_size,
                target_acceptance, step_size_range, chunk_size, record_every, seed, compile, progress_fn)
