"""Reference models with known log p(x), for tests, benchmarks and examples.

* :class:`LinearGaussian` -- z ~ N(0, I), x|z ~ N(Wz + b, sigma^2 I): log p(x)
  and the posterior in closed form.
* :class:`QuadratureBernoulli` -- a 1- or 2-D latent, a small fixed random
  tanh network giving Bernoulli logits: log p(x) by quadrature on a grid.
* :func:`load_npz_vae` -- a pretrained MNIST VAE stored as plain NumPy arrays.

Each has the model contract (``latent_dim``, ``log_prior(z)``,
``log_likelihood(x, z)`` with z [S, N, D] -> [S, N]) and ``sample_x(z)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapbench.models.posterior import DiagonalGaussian, FamilyPosterior
from gapbench.models.vae import overrides_density, remember_densities
from gapbench.ops import LOG_2PI, log_bernoulli, log_standard_normal


class LinearGaussian(nn.Module):
    """z ~ N(0, I_D),  x | z ~ N(W z + b, sigma^2 I_P).

    log p(x) = log N(x; b, W W^T + sigma^2 I);  p(z|x) = N(S W^T (x - b) / sigma^2, S),  S = (I + W^T W / sigma^2)^-1

    Args:
        W: [P, D]; b: [P]; sigma: observation noise (a float > 0). The dtype of W is the model's.
    """

    def __init__(self, W: Tensor, b: Tensor, sigma: float):
        super().__init__()
        if W.dim() != 2 or b.shape != (W.shape[0],) or sigma <= 0:
            raise ValueError("W must be [P, D], b [P] and sigma > 0")
        self.register_buffer("W", W)
        self.register_buffer("b", b.to(W.dtype))
        self.sigma = float(sigma)
        self.latent_dim = W.shape[1]
        self.data_dim = W.shape[0]

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, I): [S, N, D] -> [S, N]."""
        return log_standard_normal(z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log N(x; W z + b, sigma^2 I): x [N, P], z [S, N, D] -> [S, N]."""
        mean = z @ self.W.T + self.b  # [S, N, P]
        return -0.5 * (self.data_dim * (LOG_2PI + 2 * math.log(self.sigma)) + ((x - mean) ** 2).sum(-1) / self.sigma**2)

    def sample_x(self, z: Tensor) -> Tensor:
        """One x ~ p(x|z) per z: [..., D] -> [..., P]."""
        mean = z @ self.W.T + self.b
        return mean + self.sigma * torch.randn_like(mean)

    def marginal_covariance(self) -> Tensor:
        """W W^T + sigma^2 I: [P, P]."""
        return self.W @ self.W.T + self.sigma**2 * torch.eye(self.data_dim, dtype=self.W.dtype, device=self.W.device)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log N(x; b, W W^T + sigma^2 I): [N, P] -> [N]."""
        dist = torch.distributions.MultivariateNormal(self.b, covariance_matrix=self.marginal_covariance())
        return dist.log_prob(x)

    def posterior_precision(self) -> Tensor:
        """S^-1 = I + W^T W / sigma^2: [D, D] (the same for every x)."""
        return torch.eye(self.latent_dim, dtype=self.W.dtype, device=self.W.device) + self.W.T @ self.W / self.sigma**2

    def posterior_moments(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Exact posterior mean [N, D] and covariance [D, D] of z given x."""
        cov = torch.linalg.inv(self.posterior_precision())
        mean = (x - self.b) @ self.W @ cov.T / self.sigma**2
        return mean, cov

    def posterior(self, x: Tensor) -> torch.distributions.MultivariateNormal:
        """The exact posterior p(z|x) as a distribution with batch [N], event [D]."""
        mean, cov = self.posterior_moments(x)
        return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], -1, -1))

    def optimal_ffg(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The best diagonal Gaussian under KL(q || p(z|x)): mean = posterior mean,
        variance_d = 1 / (S^-1)_dd. Returns mean [N, D], log_var [N, D]."""
        mean, _ = self.posterior_moments(x)
        log_var = -torch.log(torch.diagonal(self.posterior_precision()))
        return mean, log_var.expand_as(mean)

    def kl_to_posterior(self, mean: Tensor, log_var: Tensor, x: Tensor) -> Tensor:
        """KL(N(mean, diag exp(log_var)) || p(z|x)) in closed form: [N, D] -> [N].

        KL = 1/2 [tr(P V) + (m - mu)^T P (m - mu) - D + log det S - sum log_var],  P = S^-1
        """
        post_mean, cov = self.posterior_moments(x)
        prec = self.posterior_precision()
        diff = mean - post_mean
        trace = (torch.diagonal(prec) * log_var.exp()).sum(-1)
        quad = ((diff @ prec) * diff).sum(-1)
        return 0.5 * (trace + quad - self.latent_dim + torch.logdet(cov) - log_var.sum(-1))


class QuadratureBernoulli(nn.Module):
    """z ~ N(0, I_D) with D in {1, 2};  x | z ~ Bernoulli(sigmoid(f(z))), f a fixed random tanh MLP.

    log p(x) = log int N(z; 0, I) prod_p Bernoulli(x_p; sigmoid(f_p(z))) dz,  computed on a grid.

    Args:
        latent_dim: 1 or 2.
        num_pixels: P, Bernoulli outputs.
        hidden: width of the MLP's hidden layer.
        scale: multiplies the output logits (larger: sharper, more non-Gaussian posteriors).
        seed: the network's weights are drawn from this seed (float64).
    """

    def __init__(self, latent_dim: int = 1, num_pixels: int = 20, hidden: int = 16, scale: float = 2.0, seed: int = 0):
        super().__init__()
        if latent_dim not in (1, 2):
            raise ValueError(f"quadrature needs latent_dim 1 or 2, got {latent_dim}")
        gen = torch.Generator().manual_seed(seed)
        self.latent_dim = latent_dim
        self.register_buffer("w1", torch.randn(hidden, latent_dim, generator=gen, dtype=torch.float64) * 1.5)
        self.register_buffer("b1", torch.randn(hidden, generator=gen, dtype=torch.float64))
        self.register_buffer("w2", torch.randn(num_pixels, hidden, generator=gen, dtype=torch.float64) * scale / math.sqrt(hidden))
        self.register_buffer("b2", torch.randn(num_pixels, generator=gen, dtype=torch.float64) * 0.5)

    def logits(self, z: Tensor) -> Tensor:
        """f(z): [..., D] -> [..., P]."""
        h = torch.tanh(z @ self.w1.T.to(z.dtype) + self.b1.to(z.dtype))
        return h @ self.w2.T.to(z.dtype) + self.b2.to(z.dtype)

    def log_prior(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """sum_p log Bernoulli(x_p; sigmoid(f_p(z))): x [N, P], z [S, N, D] -> [S, N]."""
        return log_bernoulli(x.to(z.dtype), self.logits(z))

    def sample_x(self, z: Tensor) -> Tensor:
        """One binary x ~ p(x|z) per z: [..., D] -> [..., P]."""
        return torch.bernoulli(torch.sigmoid(self.logits(z)))

    def log_marginal_quadrature(self, x: Tensor, num_grid: Optional[int] = None, limit: float = 7.0) -> Tensor:
        """log p(x) [N] (float64) by the midpoint rule on [-limit, limit]^D.

        The integrand is smooth and its tails beyond |z| = 7 carry < 1e-11 of the
        prior's mass, so the rule converges fast (checked by halving the grid in tests).
        """
        num_grid = num_grid or (4001 if self.latent_dim == 1 else 401)
        h = 2 * limit / num_grid
        axis = -limit + h * (torch.arange(num_grid, dtype=torch.float64) + 0.5)
        if self.latent_dim == 1:
            grid = axis[:, None]
        else:
            grid = torch.cartesian_prod(axis, axis)
        x = x.to(torch.float64)
        out = []
        for start in range(0, grid.shape[0], 20_000):
            g = grid[start:start + 20_000, None, :].expand(-1, x.shape[0], -1)  # [G, N, D]
            out.append(self.log_prior(g) + self.log_likelihood(x, g))
        log_f = torch.cat(out)  # [G, N]
        return torch.logsumexp(log_f, dim=0) + self.latent_dim * math.log(h)


class NpzVAE(nn.Module):
    """A VAE read from plain arrays: ELU MLP encoder (mean, log-variance), ELU MLP decoder, Bernoulli logits.

    Model contract: p(z) = N(0, I); p(x|z) = prod_p Bernoulli(x_p; sigmoid(decoder(z)_p)).
    ``posterior(x)`` is the encoder's FFG q(z|x); ``sample_x(z)`` draws binary images.
    Layers are ``fc1..fc3`` (encoder) and ``fc4..fc6`` (decoder), as in the arrays.
    """

    def __init__(self, arrays: dict):
        super().__init__()
        for i in range(1, 7):
            w = torch.as_tensor(np.asarray(arrays[f"fc{i}_weight"]), dtype=torch.float32)
            b = torch.as_tensor(np.asarray(arrays[f"fc{i}_bias"]), dtype=torch.float32)
            layer = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            layer.requires_grad_(False)
            setattr(self, f"fc{i}", layer)
        self.latent_dim = self.fc4.in_features
        self.data_dim = self.fc6.out_features
        if self.fc3.out_features != 2 * self.latent_dim or self.fc1.in_features != self.data_dim:
            raise ValueError("inconsistent layer sizes: fc3 must give 2 x latent_dim, fc1 take data_dim inputs")

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x): [N, P] -> [N, D], [N, D]."""
        h = F.elu(self.fc2(F.elu(self.fc1(x))))
        out = self.fc3(h)
        return out[..., : self.latent_dim], out[..., self.latent_dim :]

    def logits(self, z: Tensor) -> Tensor:
        """Decoder Bernoulli logits: [..., D] -> [..., P]."""
        return self.fc6(F.elu(self.fc5(F.elu(self.fc4(z)))))

    def mlp_decoder(self):
        """The decoder's layers and activation, for the hand-derived gradient of gapbench.inference.gradients."""
        if overrides_density(self, NpzVAE):
            return None
        return [(m.weight, m.bias) for m in (self.fc4, self.fc5, self.fc6)], "elu"

    def posterior(self, x: Tensor) -> FamilyPosterior:
        """The encoder's FFG q(z|x) for x [N, P] (detached)."""
        with torch.no_grad():
            mean, log_var = self.encode(x.to(self.fc1.weight.dtype))
        return DiagonalGaussian(self.latent_dim).posterior({"mean": mean, "log_var": log_var}, x.shape[0])

    def log_prior(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """x [N, P] in [0, 1], z [S, N, D] -> [S, N]."""
        return log_bernoulli(x.to(z.dtype), self.logits(z))

    def sample_x(self, z: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One binary image per z: [..., D] -> [..., P]."""
        return torch.bernoulli(torch.sigmoid(self.logits(z)), generator=generator)


def load_npz_vae(path: Union[str, Path]) -> NpzVAE:
    """Load the VAE stored in ``path`` (arrays fc1..fc6 weight/bias, [out, in]) as an :class:`NpzVAE`.

    Reads with ``numpy.load(allow_pickle=False)``; a missing file or array raises a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no VAE weights at {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [f"fc{i}_{k}" for i in range(1, 7) for k in ("weight", "bias") if f"fc{i}_{k}" not in data.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {', '.join(missing)}")
        arrays = {k: data[k] for k in data.files}
    return NpzVAE(arrays)


remember_densities(NpzVAE)
