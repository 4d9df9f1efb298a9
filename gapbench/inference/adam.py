"""Adam on per-datapoint parameter rows, with a step counter per datapoint.

The optimizer state is plain tensors whose first dimension is N, so
that a datapoint can leave (or join) the active batch by indexing, and each
datapoint's trajectory is the one it would have alone. Kingma & Ba 2015.
"""

from __future__ import annotations

from typing import Tuple

from torch import Tensor


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
    """One Adam step for each row (datapoint) of a flat [n, P] buffer, updating ``m`` and ``v`` in place.

    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

    The bias corrections are per-row [n, 1] factors applied once, so the step takes few passes
    over the buffer (a local flow has ~90k parameters per datapoint). ``step`` [n]: each row's t >= 1
    after this update; ``lr``: a float or [n, 1]. Returns the new parameters (a new tensor;
    ``param`` is not modified).
    """
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    t = step.to(param.dtype).unsqueeze(1)  # [n, 1]
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    update = (m / denom).mul_(lr / (1 - b1**t))
    return param - update
