"""Straightforward reference estimators, written the way published gap code runs them.

They are what gapbench's estimators are timed against in ``benchmarks/speed.py``,
and they compute the same quantities with the same settings:

* :func:`fit_local_one_at_a_time` -- the optimal local q*, fitted ONE datapoint at
  a time: a Python loop over datapoints, a ``torch.optim.Adam`` on that
  datapoint's own parameters, the same stopping rule as
  :func:`gapbench.inference.fit_local` (every ``check_every`` steps average the
  loss; stop after ``patience`` checks without a new best, or at ``max_steps``).
* :func:`ais_no_reuse` -- AIS with HMC over all chains of all datapoints as one
  batch, but with no reuse of model evaluations: the weight update evaluates the
  intermediate log-density twice (at beta_{t-1} and beta_t), the leapfrog
  evaluates a fresh gradient at its start and after every position update
  (L + 1 gradients), and the accept test evaluates the log-density at the start
  and the end of the trajectory again. gapbench's AIS needs L gradients per
  transition and nothing else.
* :func:`iwae_one_at_a_time` -- the IWAE bound for one datapoint at a time.

Same step-size adaptation, schedule and stopping rules as gapbench, so that
the estimates agree within Monte Carlo error and only the time differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from gapbench.inference._common import index_posterior
from gapbench.inference.ais import ACCEPTANCE_SMOOTHING
from gapbench.inference.schedule import annealing_schedule
from gapbench.models.posterior import as_posterior, get_family


@dataclass
class ReferenceFit:
    """elbo [N] float64, num_steps [N] long, converged [N] bool."""

    elbo: Tensor
    num_steps: Tensor
    converged: Tensor


def fit_local_one_at_a_time(
    model,
    x: Tensor,
    family: str = "ffg",
    init=None,
    *,
    lr: float = 1e-3,
    num_samples: int = 50,
    check_every: int = 100,
    patience: int = 10,
    max_steps: int = 20_000,
    num_final_samples: int = 1000,
    family_kwargs: Optional[dict] = None,
    seed: Optional[int] = None,
) -> ReferenceFit:
    """L[q*] per datapoint, fitting each datapoint's q* alone with torch.optim.Adam.

    q*_i = argmax_q E_q[log p(x_i, z) - log q(z)]  for i = 1..N, one after the other.

    ``init`` (None: the prior) and ``family_kwargs`` as in gapbench's fit_local; the
    initial parameters are drawn the same way (seeded by ``seed``), so both start
    from the same q for every datapoint.
    """
    if seed is not None:
        torch.manual_seed(seed)
    num_points = x.shape[0]
    fam = get_family(family, model.latent_dim, **(family_kwargs or {}))
    init_q = None if init is None else as_posterior(init)
    all_params = fam.init_params(num_points, init=init_q, device=x.device, dtype=x.dtype)
    elbos, num_steps, converged = [], [], []
    for i in range(num_points):
        params = {}
        for k, v in all_params.items():
            v = v[i : i + 1] if v.shape[0] == num_points else v
            params[k] = v.detach().clone().requires_grad_(v.is_floating_point())
        optimizer = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=lr)
        x_i = x[i : i + 1]
        best, bad, window, step, stopped = math.inf, 0, 0.0, 0, False
        while step < max_steps:
            optimizer.zero_grad()
            z, log_q = fam.sample_and_log_prob(params, num_samples, 1)  # [S, 1, D], [S, 1]
            loss = -(model.log_prior(z) + model.log_likelihood(x_i, z) - log_q).mean()
            loss.backward()
            optimizer.step()
            step += 1
            window += loss.item()
            if step % check_every == 0:
                avg, window = window / check_every, 0.0
                if avg < best:
                    best, bad = avg, 0
                else:
                    bad += 1
                if bad >= patience:
                    stopped = True
                    break
        with torch.no_grad():
            z, log_q = fam.sample_and_log_prob(params, num_final_samples, 1)
            elbos.append((model.log_prior(z) + model.log_likelihood(x_i, z) - log_q).double().mean())
        num_steps.append(step)
        converged.append(stopped)
    return ReferenceFit(torch.stack(elbos), torch.tensor(num_steps), torch.tensor(converged))


@dataclass
class ReferenceAIS:
    """log_px [N] float64 (forward: lower estimate; reverse: upper), acceptance [N]."""

    log_px: Tensor
    acceptance: Tensor


def ais_no_reuse(
    model,
    x: Tensor,
    num_steps: int,
    num_chains: int,
    num_leapfrog: int = 10,
    schedule: str = "sigmoid",
    *,
    z_start: Optional[Tensor] = None,
    step_size: float = 0.01,
    target_acceptance: float = 0.65,
    step_size_range=(1e-4, 0.5),
    seed: Optional[int] = None,
) -> ReferenceAIS:
    """AIS from the prior N(0, I) to p(z|x) (or, given ``z_start`` [N, D], reverse AIS from it).

    log f_beta(z) = log p(z) + beta log p(x|z);  log w = sum_t log f_{beta_t}(z_{t-1}) - log f_{beta_{t-1}}(z_{t-1})

    Every log-density and gradient is computed afresh where it is used (see the module
    docstring). Returns the log-mean-exp over chains per datapoint (negated for reverse).
    """
    if seed is not None:
        torch.manual_seed(seed)
    reverse = z_start is not None
    betas = annealing_schedule(num_steps, schedule)
    if reverse:
        betas = betas.flip(0)
    num_points, dim = x.shape[0], model.latent_dim
    if reverse:
        z = z_start.to(x.dtype).unsqueeze(0).expand(num_chains, -1, -1).clone()  # [C, N, D]
    else:
        z = torch.randn(num_chains, num_points, dim, dtype=x.dtype, device=x.device)

    def log_f(z, beta):  # [C, N]
        return model.log_prior(z) + beta * model.log_likelihood(x, z)

    def grad_log_f(z, beta):  # [C, N, D]
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(log_f(z, beta).sum(), z)[0]

    lo, hi = step_size_range
    eps = torch.full((num_chains, num_points, 1), float(step_size), dtype=x.dtype, device=x.device)
    log_w = torch.zeros(num_chains, num_points, dtype=torch.float64, device=x.device)
    accept_sum = torch.zeros_like(log_w)
    smoothed = None
    for i in range(1, num_steps + 1):
        b0, b1 = float(betas[i - 1]), float(betas[i])
        with torch.no_grad():
            log_w += (log_f(z, b1) - log_f(z, b0)).double()
        v0 = torch.randn_like(z)
        # Leapfrog, a fresh gradient at every position.
        v = v0 + 0.5 * eps * grad_log_f(z, b1)
        z1 = z
        for step in range(num_leapfrog):
            z1 = z1 + eps * v
            v = v + (eps if step < num_leapfrog - 1 else 0.5 * eps) * grad_log_f(z1, b1)
        with torch.no_grad():
            h0 = -log_f(z, b1) + 0.5 * (v0**2).sum(-1)
            h1 = -log_f(z1, b1) + 0.5 * (v**2).sum(-1)
            accept_prob = torch.nan_to_num(h0 - h1, nan=-math.inf).clamp(max=0.0).exp()
            accepted = (torch.rand_like(accept_prob) < accept_prob) & torch.isfinite(h1)
            z = torch.where(accepted.unsqueeze(-1), z1, z)
            accept = accept_prob.double()
            accept_sum += accept
            smoothed = accept if smoothed is None else ACCEPTANCE_SMOOTHING * smoothed + (1 - ACCEPTANCE_SMOOTHING) * accept
            eps = torch.where(smoothed.unsqueeze(-1) > target_acceptance, eps * 1.02, eps * 0.98).clamp(lo, hi)
    log_px = torch.logsumexp(log_w, dim=0) - math.log(num_chains)
    return ReferenceAIS(-log_px if reverse else log_px, (accept_sum / num_steps).mean(0))


def iwae_one_at_a_time(model, x: Tensor, q, num_samples: int = 5000, chunk_size: int = 1000) -> Tensor:
    """IWAE bound [N] float64, one datapoint at a time, its k samples in chunks of ``chunk_size``.

    L_k = log (1/k) sum_i p(x, z_i) / q(z_i|x),  z_i ~ q(z|x)
    """
    q = as_posterior(q)
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            q_i = index_posterior(q, slice(i, i + 1), x.shape[0])
            x_i = x[i : i + 1]
            parts = []
            for start in range(0, num_samples, chunk_size):
                z, log_q = q_i.sample_and_log_prob(min(chunk_size, num_samples - start))  # [s, 1, D]
                log_w = model.log_prior(z) + model.log_likelihood(x_i, z) - log_q
                parts.append(torch.logsumexp(log_w.double(), dim=0))
            out.append(torch.logsumexp(torch.cat(parts), dim=0) - math.log(num_samples))
    return torch.stack(out)
