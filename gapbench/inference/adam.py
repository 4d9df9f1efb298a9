"""Adam on per-datapoint parameter tensors, with a step counter per datapoint.

The optimizer state is a dict of plain tensors whose first dimension is N, so
that a datapoint can leave (or join) the active batch by indexing, and each
datapoint's trajectory is the one it would have alone. Kingma & Ba 2015.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor


def adam_init(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Zero first and second moments for every parameter tensor [N, ...]."""
    state = {}
    for k, v in params.items():
        state["m_" + k] = torch.zeros_like(v)
        state["v_" + k] = torch.zeros_like(v)
    return state


def adam_update(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    step: Tensor,
    lr: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One Adam step for each datapoint; returns the new (param, m, v).

    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

    Args:
        param, grad, m, v: [n, ...] for the n active datapoints.
        step: [n] the step number t >= 1 of each datapoint (after this update).
    """
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    t = step.to(param.dtype).reshape((-1,) + (1,) * (param.dim() - 1))  # [n, 1, ...]
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


def adam_update_(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    step: Tensor,
    lr,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """:func:`adam_update` for rows of a flat [n, P] buffer, updating ``m`` and ``v`` in place.

    The same step in fewer passes over the buffer (about 10 instead of 14; a local flow
    has ~90k parameters per datapoint): the bias corrections are per-row [n, 1] factors
    applied once, lr / (1 - b1^t) to the step and 1 / (1 - b2^t) inside the root. Returns
    the new parameters (a new tensor; ``param`` is not modified). ``lr``: a float or [n, 1].
    """
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    t = step.to(param.dtype).unsqueeze(1)  # [n, 1]
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    update = (m / denom).mul_(lr / (1 - b1**t))
    return param - update
