"""RealNVP: a Gaussian pushed through affine couplings with alternating masks; exact log q."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from gapbench.models.flows.base import FlowFamily
from gapbench.models.flows.layers import Params
from gapbench.models.flows.transforms import AffineCoupling, CompositeTransform
from gapbench.ops import log_normal


class RealNVP(FlowFamily):
    """z = f_K o ... o f_1 (z0), z0 ~ N(mean, diag(exp(log_var))); exact density

        log q(z) = log N(f^{-1}(z); mean, var) + log|det d f^{-1}(z) / dz|.

    Coupling k updates the dimensions d with d % 2 == k % 2 from the others (for
    D = 1 every coupling is an affine map of z with learned constant scale and shift).
    params: ``mean``, ``log_var`` [N|1, D] and ``c{k}_*`` conditioner weights [N|1, ...].
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP" (2017).
    """

    name = "realnvp"
    exact_log_prob = True

    def __init__(self, latent_dim: int, num_flow_steps: int = 4, flow_hidden: int = 100):
        super().__init__(latent_dim, num_flow_steps, flow_hidden)
        couplings = []
        for k in range(self.num_flow_steps):
            updated = [d for d in range(latent_dim) if d % 2 == k % 2] or list(range(latent_dim))
            couplings.append(AffineCoupling(latent_dim, updated, f"c{k}", self.flow_hidden))
        self.transform = CompositeTransform(couplings)

    def init_flow_params(self, num_points, device=None, dtype=torch.float32, generator=None) -> Params:
        return self.transform.init_params(num_points, device, dtype, generator)

    def transform_noise(self, params: Params, eps: Tensor) -> Tuple[Tensor, Tensor]:
        """z [S, N, D] and log q(z) [S, N] from standard-normal noise eps [S, N, D]."""
        z0, log_q0 = self._base_sample(params, eps)
        z, logabsdet = self.transform.forward(params, z0)
        return z, log_q0 - logabsdet

    def sample_and_log_prob(self, params: Params, num_samples: int, num_points: Optional[int] = None):
        return self.transform_noise(params, self._base_noise(params, num_samples, num_points))

    def log_prob(self, params: Params, z: Tensor) -> Tensor:
        """log q(z) for z [S, N, D] -> [S, N]."""
        z0, logabsdet = self.transform.inverse(params, z)
        return log_normal(z0, params["mean"], params["log_var"]) + logabsdet
