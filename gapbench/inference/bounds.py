"""Monte Carlo bounds on log p(x) from a posterior q: the ELBO and the IWAE bound.

Both draw samples from q in chunks so that any number of samples fits in
memory, and accumulate in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from gapbench.inference._common import (
    check_batch,
    check_model,
    flag_nonfinite,
    log_joint,
    sample_chunks,
    seeded,
)
from gapbench.models.posterior import as_posterior


def _check_q(q, num_points: int, latent_dim: int):
    q = as_posterior(q)
    if q.num_points != num_points or q.latent_dim != latent_dim:
        raise ValueError(
            f"q describes {q.num_points} datapoints of dimension {q.latent_dim}, "
            f"but x has {num_points} datapoints and the model's latent_dim is {latent_dim}"
        )
    return q


def log_weights(model, x: Tensor, q, num_samples: int) -> Tensor:
    """log w = log p(x, z) - log q(z|x) for z ~ q: [S, N], in the model's dtype (differentiable)."""
    z, log_q = as_posterior(q).sample_and_log_prob(num_samples)  # [S, N, D], [S, N]
    return log_joint(model, x, z) - log_q


def elbo_and_stderr(
    model, x: Tensor, q, num_samples: int = 1000, chunk_size: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """ELBO estimate [N] and its Monte Carlo standard error [N], both float64, without gradients."""
    num_points = check_batch(x)
    q = _check_q(q, num_points, check_model(model))
    total = torch.zeros(num_points, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)
    with torch.no_grad():
        for size in sample_chunks(num_samples, chunk_size, num_points, x.device):
            lw = log_weights(model, x, q, size).double()  # [s, N]
            total += lw.sum(0)
            total_sq += (lw**2).sum(0)
    mean = total / num_samples
    var = (total_sq / num_samples - mean**2).clamp_min(0.0) * num_samples / max(num_samples - 1, 1)
    return mean, (var / num_samples).sqrt()


def elbo(
    model,
    x: Tensor,
    q,
    num_samples: int = 1000,
    chunk_size: Optional[int] = None,
    seed: Optional[int] = None,
) -> Tensor:
    """Evidence lower bound of q for each datapoint.

    L[q] = E_{z~q(z|x)} [log p(x, z) - log q(z|x)]  <=  log p(x)

    Args:
        model: ``latent_dim``, ``log_prior(z)``, ``log_likelihood(x, z)``; z [S, N, D] -> [S, N].
        x: data [N, ...].
        q: a gapbench Posterior or a torch Distribution with batch [N], event [D], rsample.
        num_samples: S, Monte Carlo samples per datapoint.
        chunk_size: samples per forward pass (None: S_chunk * N <= 4,096 on a CPU, 50,000 on a GPU).
        seed: run under this seed without disturbing the global generator.

    Returns:
        [N] float64 on x's device, without gradients. A non-finite value is kept
        (and logged), never dropped. Kingma & Welling 2014.
    """
    with seeded(seed, x.device):
        value, _ = elbo_and_stderr(model, x, q, num_samples, chunk_size)
    flag_nonfinite("elbo", value)
    return value


def iwae(
    model,
    x: Tensor,
    q,
    num_samples: int = 5000,
    chunk_size: Optional[int] = None,
    seed: Optional[int] = None,
) -> Tensor:
    """Importance-weighted bound on log p(x) with q as proposal, for each datapoint.

    L_k = E[log (1/k) sum_i p(x, z_i) / q(z_i|x)],  z_i ~ q(z|x);  L_1 = ELBO <= L_k <= log p(x)

    Args:
        model: ``latent_dim``, ``log_prior(z)``, ``log_likelihood(x, z)``; z [S, N, D] -> [S, N].
        x: data [N, ...].
        q: a gapbench Posterior or a torch Distribution with batch [N], event [D], rsample.
        num_samples: k, importance samples per datapoint (5,000 is the standard test value).
        chunk_size: samples per forward pass (None: S_chunk * N <= 4,096 on a CPU, 50,000 on a GPU); the
            log-sum-exp is combined across chunks, so k = 5,000 never sits in memory at once.
        seed: run under this seed without disturbing the global generator.

    Returns:
        [N] float64 on x's device, without gradients. Burda, Grosse & Salakhutdinov 2016.
    """
    num_points = check_batch(x)
    q = _check_q(q, num_points, check_model(model))
    parts = []
    with seeded(seed, x.device), torch.no_grad():
        for size in sample_chunks(num_samples, chunk_size, num_points, x.device):
            lw = log_weights(model, x, q, size).double()  # [s, N]
            parts.append(torch.logsumexp(lw, dim=0))  # [N]
    value = torch.logsumexp(torch.stack(parts), dim=0) - math.log(num_samples)
    # A +inf or NaN weight poisons the bound; -inf weights are simply zero weights.
    flag_nonfinite("iwae", value)
    return value
