"""A base Gaussian followed by a flow, as a functional :class:`~gapbench.models.posterior.Family`.

params always hold the base Gaussian's ``mean`` and ``log_var`` [N, D] (or [1, D])
and the flow's network weights, each with leading dimension N (local: a flow per
datapoint) or 1 (amortized: one flow shared by all).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from gapbench.models.flows.layers import Params
from gapbench.models.posterior import Family, Posterior
from gapbench.ops import log_standard_normal


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class FlowFamily(Family):
    """q(z) = base Gaussian N(mean, diag(exp(log_var))) pushed through a flow."""

    def __init__(self, latent_dim: int, num_flow_steps: int, flow_hidden: int):
        super().__init__(latent_dim)
        self.num_flow_steps = _check_positive("num_flow_steps", num_flow_steps)
        self.flow_hidden = _check_positive("flow_hidden", flow_hidden)

    def init_flow_params(self, num_points: int, device=None, dtype=torch.float32, generator=None) -> Params:
        """The flow's own parameters [num_points, ...] (no base Gaussian), at the identity."""
        raise NotImplementedError

    def init_params(
        self,
        num_points: int,
        init: Optional[Posterior] = None,
        device=None,
        dtype=torch.float32,
        generator: Optional[torch.Generator] = None,
    ) -> Params:
        """Local parameters [num_points, ...]: the base Gaussian at N(0, I) (or at the
        Gaussian moments of ``init``) and the flow at the identity.

        Hidden-layer weights are random: drawn from ``generator`` when given, else
        from torch's global RNG (seed it for reproducible fits).
        """
        mean, log_var = self._moments(num_points, init, device, dtype)
        params = {"mean": mean, "log_var": log_var}
        params.update(self.init_flow_params(num_points, device=mean.device, dtype=dtype, generator=generator))
        return params

    @staticmethod
    def _num_points(params: Params, num_points: Optional[int]) -> int:
        return num_points if num_points is not None else max(v.shape[0] for v in params.values())

    def _base_noise(self, params: Params, num_samples: int, num_points: Optional[int]) -> Tensor:
        mean = params["mean"]
        shape = (num_samples, self._num_points(params, num_points), self.latent_dim)
        return torch.randn(shape, device=mean.device, dtype=mean.dtype)

    @staticmethod
    def _base_sample(params: Params, eps: Tensor) -> Tuple[Tensor, Tensor]:
        """z0 = mean + exp(log_var / 2) * eps and log N(z0; mean, var), from eps [S, N, D]."""
        mean, log_var = params["mean"], params["log_var"]
        z0 = mean + torch.exp(0.5 * log_var) * eps  # [S, N, D]
        log_q0 = log_standard_normal(eps) - 0.5 * log_var.sum(-1)  # [S, N]
        return z0, log_q0
