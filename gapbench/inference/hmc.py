"""Hamiltonian Monte Carlo for many independent chains at once.

Pure functions in the style of blackjax: a kernel maps a state to a new state
and an info record. Every chain is an entry of the leading dimensions
(typically [C, N]: C chains for each of N datapoints) and has its own step size.

The target is given by ``log_density_and_grad_fn(z) -> (log_density [C, N],
grad [C, N, D], aux)``: one forward and one backward pass of the model per
call. A function that takes ``need_value`` may be told ``need_value=False`` for
the leapfrog steps before the last, whose log-density nobody reads; it may then
return (None, grad, None) (see :func:`leapfrog`). ``aux`` is a tuple of tensors with the chains' leading shape that the
caller wants carried along with the state (AIS keeps the two terms of its
tempered density there, so that moving to the next temperature needs no new
model evaluation). Neal 2011, "MCMC using Hamiltonian dynamics".
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

LogDensityAndGradFn = Callable[[Tensor], Tuple[Tensor, Tensor, tuple]]


class HMCState(NamedTuple):
    """Position z [..., D], its log-density [...] and gradient [..., D], and the caller's aux."""

    z: Tensor
    log_density: Tensor
    grad_log_density: Tensor
    aux: tuple = ()


class HMCInfo(NamedTuple):
    """accept_prob [...] = min(1, exp(-dH)); accepted [...] bool; energy_change [...] = H1 - H0."""

    accept_prob: Tensor
    accepted: Tensor
    energy_change: Tensor


def hmc_init(z: Tensor, log_density_and_grad_fn: LogDensityAndGradFn) -> HMCState:
    """The state at z, with one evaluation of the target."""
    log_density, grad, aux = log_density_and_grad_fn(z)
    return HMCState(z, log_density, grad, aux)


def kinetic_energy(momentum: Tensor) -> Tensor:
    """K(p) = |p|^2 / 2 (identity mass matrix); [..., D] -> [...]."""
    return 0.5 * (momentum**2).sum(-1)


def leapfrog(
    z: Tensor,
    momentum: Tensor,
    grad_log_density: Tensor,
    step_size: Tensor,
    num_steps: int,
    log_density_and_grad_fn: LogDensityAndGradFn,
    takes_need_value: Optional[bool] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, tuple]:
    """Integrate Hamilton's equations for H(z, p) = -log f(z) + |p|^2/2 by the leapfrog scheme.

    p <- p + (eps/2) grad log f(z);  z <- z + eps p;  p <- p + (eps/2) grad log f(z)   (x num_steps)

    Args:
        z, momentum, grad_log_density: [..., D] start position, momentum, gradient at z.
        step_size: eps, broadcastable to [...] (one per chain) or a float.
        num_steps: L, leapfrog steps (L evaluations of the target).
        log_density_and_grad_fn: z -> (log f [...], grad [..., D], aux).
        takes_need_value: whether that function takes ``need_value``; None: read off its signature.

    Returns:
        (z, momentum, log_density, grad_log_density, aux) at the end of the
        trajectory; the final log-density is the one the accept test needs.
        Volume-preserving and exactly reversible (negate p, integrate again).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    eps = torch.as_tensor(step_size, dtype=z.dtype, device=z.device)
    if eps.dim() > 0:
        eps = eps.unsqueeze(-1)  # [..., 1]
    half_eps = 0.5 * eps
    p = torch.addcmul(momentum, half_eps, grad_log_density)
    takes_flag = _takes_need_value(log_density_and_grad_fn) if takes_need_value is None else takes_need_value
    for i in range(num_steps):
        z = torch.addcmul(z, eps, p)
        last = i == num_steps - 1
        if takes_flag:
            log_density, grad, aux = log_density_and_grad_fn(z, need_value=last)
        else:
            log_density, grad, aux = log_density_and_grad_fn(z)
        p = torch.addcmul(p, half_eps if last else eps, grad)
    return z, p, log_density, grad, aux


def _takes_need_value(fn) -> bool:
    try:
        return "need_value" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _select(accepted: Tensor, new: Tensor, old: Tensor) -> Tensor:
    mask = accepted.reshape(accepted.shape + (1,) * (new.dim() - accepted.dim()))
    return torch.where(mask, new, old)


def hmc_step(
    state: HMCState,
    step_size: Tensor,
    num_leapfrog: int,
    log_density_and_grad_fn: LogDensityAndGradFn,
    generator: Optional[torch.Generator] = None,
) -> Tuple[HMCState, HMCInfo]:
    """One HMC transition per chain: fresh momentum, a leapfrog trajectory, a Metropolis test.

    accept with probability min(1, exp(H(z0, p0) - H(zL, pL))),  H = -log f(z) + |p|^2/2

    Leaves f invariant for each chain. A trajectory whose energy is NaN or inf
    is rejected (the chain stays where it was). Draws the momentum and the
    uniforms of the accept test, then calls :func:`hmc_transition`.

    Args:
        state: the current HMCState (positions [..., D]).
        step_size: eps per chain, [...] or a float.
        num_leapfrog: L, leapfrog steps per transition.
        log_density_and_grad_fn: z -> (log f [...], grad [..., D], aux).
        generator: optional torch.Generator for the momentum and the accept draw.

    Returns:
        (new_state, HMCInfo). Neal 2011.
    """
    z0 = state.z
    momentum = torch.randn(z0.shape, generator=generator, dtype=z0.dtype, device=z0.device)
    log_f0 = state.log_density
    uniform = torch.rand(log_f0.shape, generator=generator, dtype=log_f0.dtype, device=log_f0.device)
    return hmc_transition(state, step_size, num_leapfrog, log_density_and_grad_fn, momentum, uniform)


def hmc_transition(
    state: HMCState,
    step_size: Tensor,
    num_leapfrog: int,
    log_density_and_grad_fn: LogDensityAndGradFn,
    momentum: Tensor,
    uniform: Tensor,
    takes_need_value: Optional[bool] = None,
) -> Tuple[HMCState, HMCInfo]:
    """:func:`hmc_step` with its random draws given: a deterministic function of its inputs.

    ``momentum`` [..., D] ~ N(0, I) and ``uniform`` [...] ~ U(0, 1) per chain. Being free of
    random number generation, it can be compiled (``torch.compile``) without changing
    which random numbers a seeded run uses. ``takes_need_value`` as in :func:`leapfrog`.
    """
    z0, p0 = state.z, momentum
    z1, p1, log_f1, grad1, aux1 = leapfrog(z0, p0, state.grad_log_density, step_size, num_leapfrog,
                                           log_density_and_grad_fn, takes_need_value)
    energy_change = (-log_f1 + kinetic_energy(p1)) - (-state.log_density + kinetic_energy(p0))  # [...]
    log_accept = torch.nan_to_num(-energy_change, nan=-float("inf")).clamp(max=0.0)
    accept_prob = log_accept.exp()
    accepted = (uniform < accept_prob) & torch.isfinite(log_f1)
    new_state = HMCState(
        _select(accepted, z1, z0),
        _select(accepted, log_f1, state.log_density),
        _select(accepted, grad1, state.grad_log_density),
        tuple(_select(accepted, a1, a0) for a1, a0 in zip(aux1, state.aux)),
    )
    return new_state, HMCInfo(accept_prob, accepted, energy_change)
