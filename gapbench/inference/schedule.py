"""Annealing schedules: the inverse temperatures 0 = beta_0 < ... < beta_T = 1 of AIS."""

from __future__ import annotations

import torch
from torch import Tensor

SCHEDULES = ("sigmoid", "linear")


def annealing_schedule(num_steps: int, schedule: str = "sigmoid", delta: float = 4.0) -> Tensor:
    """beta_0..beta_T as a float64 tensor [T + 1], from 0 to 1.

    linear:  beta_t = t / T
    sigmoid: beta_t = (s(t) - s(0)) / (s(T) - s(0)),  s(t) = sigma(delta (2t/T - 1))   (Wu et al. 2017, delta = 4)

    The sigmoid schedule spends more of its steps near beta = 0 and 1, where the
    tempered densities change fastest in log p(x, z).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    if schedule == "linear":
        return t
    if schedule == "sigmoid":
        s = torch.sigmoid(delta * (2 * t - 1))
        beta = (s - s[0]) / (s[-1] - s[0])
        beta[0], beta[-1] = 0.0, 1.0
        return beta
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
