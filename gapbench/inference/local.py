"""The optimal member q* of a variational family for each datapoint, fitted locally.

Each datapoint gets its own variational parameters, optimized by its own Adam
on its own ELBO; all active datapoints advance as one batch, and a datapoint
leaves the batch (by indexing) as soon as its own stopping rule fires.
Cremer, Li & Duvenaud 2018, section 5 ("local optimization").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from gapbench.inference._common import check_batch, check_model, float_dtype, seeded
from gapbench.inference.adam import adam_step_, finite_rows
from gapbench.inference.bounds import elbo_and_stderr
from gapbench.inference.gradients import log_joint_in_z, point_major_joint
from gapbench.inference.progress import ProgressFn, throttled
from gapbench.models.posterior import Family, FamilyPosterior, as_posterior, get_family

logger = logging.getLogger("gapbench.inference")


@dataclass
class FitTrace:
    """Convergence record: ``elbo[k, i]`` is datapoint i's ELBO averaged over its
    steps ``steps[k] - check_every + 1 .. steps[k]``; NaN after it stopped."""

    steps: Tensor  # [K] long
    elbo: Tensor  # [K, N] float64


@dataclass
class LocalFit:
    """Result of :func:`fit_local` for N datapoints.

    elbo [N] float64: L[q*] from ``num_final_samples`` fresh samples; elbo_stderr [N] its MC error.
    q: the fitted posterior (FamilyPosterior, detached); params: its parameter dict [N, ...].
    num_steps [N]: Adam steps taken; converged [N]: the stopping rule fired before max_steps
    and the fit had not collapsed; finite [N]: no NaN/inf met (loss, gradient or final ELBO);
    collapsed [N]: the fit's last check averaged a loss more than :data:`COLLAPSE_NATS` nats (plus
    5 standard errors) worse than its best check, or than its first step at the start (a step size
    too large for it), so q* holds the parameters there instead of its last ones. trace: :class:`FitTrace`.
    """

    elbo: Tensor
    elbo_stderr: Tensor
    q: FamilyPosterior
    params: Dict[str, Tensor]
    num_steps: Tensor
    converged: Tensor
    finite: Tensor
    trace: FitTrace
    collapsed: Tensor

    @property
    def num_nonfinite(self) -> int:
        return int((~self.finite).sum())


#: A fit has collapsed when its last check's average loss is worse than its best check's by more
#: than this many nats plus 5 of that best average's standard errors (or worse than the loss of its
#: first step, at its start, by as much, counted in that loss's standard errors): far beyond the
#: Monte Carlo noise, so only a fit that left its optimum (a step size too large) is caught.
COLLAPSE_NATS = 1.0


def _per_point(params: Dict[str, Tensor], num_points: int) -> Dict[str, Tensor]:
    """Every floating parameter as its own copy per datapoint, [N, ...]."""
    out = {}
    for k, v in params.items():
        v = v.detach()
        if v.is_floating_point():
            v = v.expand((num_points,) + tuple(v.shape[1:])).clone()
        out[k] = v
    return out


def _final_seed(seed: int) -> int:
    """The seed of a fit's final ELBO estimate: another stream than the optimization's."""
    return (int(seed) ^ 0x5DEECE66D) % (2**63)


def fit_local(
    model,
    x: Tensor,
    family: Union[str, Family] = "ffg",
    init=None,
    *,
    lr: float = 1e-3,
    num_samples: int = 50,
    check_every: int = 100,
    patience: int = 10,
    max_steps: int = 20_000,
    num_final_samples: int = 1000,
    chunk_size: Optional[int] = None,
    seed: Optional[int] = None,
    family_kwargs: Optional[dict] = None,
    progress_fn: Optional[ProgressFn] = None,
    lr_decay: float = 1.0,
    improvement_se: float = 0.0,
    gradient: str = "total",
) -> LocalFit:
    """Fit the best member q* of ``family`` to each datapoint's posterior separately.

    q*(z|x) = argmax_{q in family} E_q[log p(x, z) - log q(z)]   (one q per datapoint)

    Adam (lr ``lr``) on the per-datapoint parameters; the loss is the SUM over
    datapoints of each one's negative ELBO estimate from ``num_samples``
    samples, so a datapoint's gradient, step and stopping do not depend on
    which others share its batch. Stopping rule, per datapoint: every
    ``check_every`` of its steps, average its loss over those steps; stop after
    ``patience`` checks without a new best, or at ``max_steps``. Two refinements,
    both off by default (the paper's rule): a check counts as a new best only when
    its average beats the best by more than ``improvement_se`` standard errors of
    that average (from the spread of the window's losses), so Monte Carlo noise
    alone does not keep a fit running; and each check without a new best multiplies
    that datapoint's learning rate by ``lr_decay`` (< 1: a fit that has stopped
    improving takes smaller, less noisy steps before it stops).

    Args:
        model: ``latent_dim``, ``log_prior(z)``, ``log_likelihood(x, z)``; z [S, N, D] -> [S, N].
        x: data [N, ...]; the parameters take x's device and floating dtype.
        family: "ffg", "flow", "realnvp" (any name in the family registry) or a Family instance.
        init: None (start at the prior N(0, I)) or a Posterior / torch Distribution [N] x [D]
            (start at the family member closest to it, e.g. the encoder's q).
        lr, num_samples, check_every, patience, max_steps: the optimization (defaults from the paper).
        lr_decay: factor on a datapoint's learning rate at each check without a new best (1: constant).
        improvement_se: how many standard errors a check's average must beat the best by to count
            as a new best (0: any improvement, the paper's rule).
        gradient: "total" (the reparameterization gradient of the ELBO estimate, the paper's) or
            "path" (its path derivative only: log q's parameters held fixed where it is evaluated,
            which drops a zero-mean score term; see ``Family.sample_and_path_log_prob``). Families
            with a ``path_elbo_and_grad`` (the FFG and the auxiliary flow, local parameters) then take
            each step by their hand-derived gradient instead of autograd: the same step up to rounding.
        num_final_samples: fresh samples for the final L[q*] (chunked).
        chunk_size: most datapoints optimized at once (None: all); a converged
            datapoint's place is taken by the next waiting one.
        seed: run under this seed without disturbing the global generator. The final estimate
            uses a stream derived from it alone (common random numbers across fits of the same points).
        family_kwargs: extra arguments for ``get_family`` (e.g. flow sizes).
        progress_fn: None, or called as ``progress_fn(done, total)`` in point-steps (one
            datapoint's one Adam step, or its one rejected step when the loss was not finite):
            done = steps taken so far, summed over datapoints;
            total = done + every unfinished datapoint's steps left before ``max_steps``. It
            starts at ``N * max_steps`` and shrinks to the exact count as datapoints stop
            early, so done/total never overstates the progress and the time left it implies
            is an upper bound that tightens as the fit goes on. Called at most every 0.2 s
            and once at the very end (after the final ELBO) with done == total; it does not
            change any result.

    Returns:
        :class:`LocalFit`. Cremer, Li & Duvenaud 2018.
    """
    latent_dim = check_model(model)
    num_points = check_batch(x)
    if check_every < 1 or patience < 1 or max_steps < 1 or num_samples < 1:
        raise ValueError("check_every, patience, max_steps and num_samples must be at least 1")
    fam = get_family(family, latent_dim, **(family_kwargs or {})) if isinstance(family, str) else family
    device, dtype = x.device, float_dtype(x)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    capacity = num_points if chunk_size is None else min(chunk_size, num_points)
    if gradient not in ("total", "path"):
        raise ValueError(f"gradient must be 'total' or 'path', got {gradient!r}")
    sample = fam.sample_and_path_log_prob if gradient == "path" else fam.sample_and_log_prob
    # A family may give the path-derivative step's ELBOs and gradient by hand, without autograd.
    by_hand = getattr(fam, "path_elbo_and_grad", None) if gradient == "path" else None
    point_joint = point_major_joint(model) if by_hand is not None else None
    report = throttled(progress_fn)
    joint = log_joint_in_z(model)  # gradients reach q's parameters only
    # Point-steps: every pass of the loop is one step of each active datapoint (one that
    # fails stops at it), so a datapoint's steps when it stops are its t then.
    steps_done, steps_total = 0, num_points * max_steps

    with seeded(seed, device):
        init_q = None if init is None else as_posterior(init)
        params = _per_point(fam.init_params(num_points, init=init_q, device=device, dtype=dtype), num_points)
        names = [k for k, v in params.items() if v.is_floating_point()]
        shapes = [tuple(params[k].shape[1:]) for k in names]
        sizes = [params[k][:1].numel() for k in names]
        # Every floating parameter of a datapoint lives in one row of a contiguous [N, P]
        # buffer, so that Adam, the finiteness check, gathering and scattering are one
        # tensor operation each instead of one per parameter tensor (a flow has dozens).
        flat = torch.cat([params[k].reshape(num_points, -1) for k in names], dim=1)  # [N, P]
        m_all, v_all = torch.zeros_like(flat), torch.zeros_like(flat)
        fixed = {k: v for k, v in params.items() if k not in names}

        steps = torch.zeros(num_points, dtype=torch.long, device=device)
        window = torch.zeros(num_points, dtype=torch.float64, device=device)
        window_sq = torch.zeros(num_points, dtype=torch.float64, device=device)  # for the window's standard error
        # Each datapoint's learning rate: one number unless it decays per datapoint.
        per_point_lr = lr_decay != 1.0
        lr_now = torch.full((num_points,), float(lr), dtype=dtype, device=device) if per_point_lr else None
        best = torch.full((num_points,), float("inf"), dtype=torch.float64, device=device)
        # What a collapsed fit falls back to: each datapoint's parameters at its lowest check average
        # (those of the window's last step) with that average's standard error, and its start with the
        # loss of its first step and that loss's standard error (a fit may blow up within its first window).
        best_flat, start_flat = flat.clone(), flat.clone()
        best_se = torch.zeros(num_points, dtype=torch.float64, device=device)
        start_loss = torch.full((num_points,), float("inf"), dtype=torch.float64, device=device)
        # (no standard error from a single sample: then the start never counts as the better one)
        start_se = torch.full((num_points,), float("inf"), dtype=torch.float64, device=device)
        fresh_points = True  # some active datapoint is at its first step
        bad_checks = torch.zeros(num_points, dtype=torch.long, device=device)
        num_checks = torch.zeros(num_points, dtype=torch.long, device=device)
        converged = torch.zeros(num_points, dtype=torch.bool, device=device)
        failed = torch.zeros(num_points, dtype=torch.bool, device=device)
        max_checks = max_steps // check_every
        trace = torch.full((max(max_checks, 1), num_points), float("nan"), dtype=torch.float64, device=device)

        def unflatten(rows: Tensor, idx) -> Dict[str, Tensor]:
            """The parameter dict of the datapoints ``idx`` from their rows [n, P] (views, differentiable)."""
            n = rows.shape[0]
            p = {k: (v[idx] if v.shape[0] == num_points else v) for k, v in fixed.items()}
            for k, shape, part in zip(names, shapes, rows.split(sizes, dim=1)):
                p[k] = part.reshape((n,) + shape)
            return p

        active = torch.arange(capacity, device=device)
        next_point = capacity
        # The active datapoints' state, compact: parameters, Adam moments, data.
        f_act, m_act, v_act, x_act = flat[active], m_all[active], v_all[active], x[active]
        while active.numel() > 0:
            n = active.numel()
            step = None
            if by_hand is not None:  # the gradient lands in grad's rows
                grad = torch.empty_like(f_act)  # [n, P]
                step = by_hand(unflatten(f_act, active), num_samples, partial(point_joint, x_act),
                               out=unflatten(grad, active))
            if step is not None:
                elbos = step[0]  # [S, n]; the gradient is in grad already
                loss = -elbos.mean(0)  # [n]
            else:
                leaf = f_act.requires_grad_(True)
                z, log_q = sample(unflatten(leaf, active), num_samples, n)  # [S, n, D], [S, n]
                elbos = joint(x_act, z) - log_q  # [S, n]
                loss = -elbos.mean(0)  # [n]
                (grad,) = torch.autograd.grad(loss.sum(), [leaf], allow_unused=True)
                grad = torch.zeros_like(f_act) if grad is None else grad  # [n, P]
                loss = loss.detach()
            ok = torch.isfinite(loss) & finite_rows(grad)
            all_ok = bool(ok.all())
            t = steps[active] + 1
            f_act = f_act.detach()
            # The rows at a check, before this step's update (a new best check keeps them).
            checking = t % check_every == 0
            before = f_act[checking] if bool(checking.any()) else None
            old = None if all_ok else f_act.clone()
            if not all_ok:
                grad = torch.where(ok[:, None], grad, torch.zeros_like(grad))
            # f_act, m_act and v_act updated in place
            adam_step_(f_act, grad, m_act, v_act, t, lr_now[active] if per_point_lr else lr)
            if not all_ok:  # a datapoint whose loss or gradient is not finite keeps its last parameters
                f_act = torch.where(ok[:, None], f_act, old)
            steps[active] = torch.where(ok, t, steps[active])
            if fresh_points:
                first = ok & (t == 1)
                start_loss[active[first]] = loss[first].double()
                if num_samples > 1:  # its standard error, from the spread of the step's samples
                    start_se[active[first]] = (elbos.detach().double().std(0) / num_samples**0.5)[first]
                fresh_points = False
            kept = torch.where(ok, loss.double(), torch.zeros_like(loss, dtype=torch.float64))
            window[active] += kept
            window_sq[active] += kept * kept

            # The stopping rule, for the datapoints at a check (all active ones share t % check_every
            # unless the batch was refilled, so this branch is rare).
            done = ~ok
            at_check = ok & checking
            if bool(at_check.any()):
                idx = active[at_check]
                avg = window[idx] / check_every
                trace[num_checks[idx], idx] = -avg
                se = ((window_sq[idx] / check_every - avg * avg).clamp_min(0.0) / check_every).sqrt()
                window_sq[idx] = 0.0
                improved = avg < best[idx] - improvement_se * se if improvement_se else avg < best[idx]
                lowest = avg < best[idx]
                if bool(lowest.any()):
                    # The parameters of the window's last loss (before this step's update).
                    best_flat[idx[lowest]] = before[ok[checking]][lowest]
                    best_se[idx[lowest]] = se[lowest]
                best[idx] = torch.minimum(best[idx], avg)
                bad_checks[idx] = torch.where(improved, torch.zeros_like(bad_checks[idx]), bad_checks[idx] + 1)
                if per_point_lr:
                    lr_now[idx] = torch.where(improved, lr_now[idx], lr_now[idx] * lr_decay)
                num_checks[idx] += 1
                window[idx] = 0.0
                stop = bad_checks[idx] >= patience
                converged[idx] = stop
                done[at_check] = stop
            done |= t >= max_steps
            failed[active[~ok]] = True

            if bool(done.any()):
                if report is not None:
                    steps_total -= int((max_steps - t[done]).sum())
                flat[active], m_all[active], v_all[active] = f_act, m_act, v_act
                active = active[~done]
                num_new = min(capacity - active.numel(), num_points - next_point)
                if num_new > 0:
                    fresh = torch.arange(next_point, next_point + num_new, device=device)
                    active = torch.cat([active, fresh])
                    fresh_points = True
                    next_point += num_new
                f_act, m_act, v_act, x_act = flat[active], m_all[active], v_all[active], x[active]
            if report is not None:
                steps_done += n
                report(steps_done, steps_total)

        # A fit whose last check is far worse than its best check, or than its start, has left its
        # optimum: it falls back to the better of the two and does not count as converged.
        last = -trace[(num_checks - 1).clamp_min(0), torch.arange(num_points, device=device)]
        from_start = start_loss < best
        ref = torch.where(from_start, start_loss, best)
        margin = COLLAPSE_NATS + 5.0 * torch.where(from_start, start_se, best_se)
        collapsed = (num_checks > 0) & ~failed & (last > ref + margin)
        if bool(collapsed.any()):
            flat[collapsed] = torch.where(from_start[:, None], start_flat, best_flat)[collapsed]
            converged &= ~collapsed
            logger.warning("fit_local: %d of %d datapoints collapsed (their last check up to %.3g nats below "
                           "their best or their start); their q* is taken there; a smaller learning rate avoids it",
                           int(collapsed.sum()), num_points, float((last - ref)[collapsed].max()))
        params = unflatten(flat, slice(None))
        q_star = fam.posterior({k: v.detach() for k, v in params.items()}, num_points)
    # The final estimate draws from its own stream, seeded from ``seed`` alone: two fits of the same
    # points with the same seed (a fast one and its reference) share its noise where their q* agree.
    with seeded(None if seed is None else _final_seed(seed), device):
        value, stderr = elbo_and_stderr(model, x, q_star, num_final_samples)

    finite = torch.isfinite(value) & ~failed
    if int((~finite).sum()):
        logger.warning("fit_local: %d of %d datapoints met a non-finite loss, gradient or final ELBO",
                       int((~finite).sum()), num_points)
    if int((~converged).sum()):
        logger.info("fit_local: %d of %d datapoints stopped at max_steps=%d before converging",
                    int((~converged & ~failed).sum()), num_points, max_steps)
    used = int(num_checks.max()) if num_points else 0
    if report is not None:
        report.finish(steps_done, steps_total)
    fit_trace = FitTrace(
        steps=torch.arange(1, used + 1, device=device) * check_every,
        elbo=trace[:used],
    )
    return LocalFit(value, stderr, q_star, q_star.params, steps, converged, finite, fit_trace, collapsed)
