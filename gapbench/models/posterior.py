"""Posteriors q(z|x) for a batch of N datapoints, and the families they come from.

Two views of the same thing:

* A *posterior* is an object with ``sample_and_log_prob(num_samples)`` giving
  reparameterized samples z of shape [S, N, D] and their log-densities [S, N].
  Estimators only ever use this. Any ``torch.distributions.Distribution`` with
  batch shape [N] and event shape [D] that supports ``rsample`` is accepted too
  (:func:`as_posterior` wraps it).

* A *family* is functional: its members are described by a dict of parameter
  tensors whose first dimension is N (one member per datapoint, "local") or 1
  (shared by every datapoint). ``family.sample_and_log_prob(params, S)``
  is the same computation whether the parameters came out of an encoder
  (amortized) or are free per-datapoint tensors being optimized (local).
  Keeping the parameters as plain tensors is what lets fit_local run one Adam
  update over N datapoints at once and drop converged ones by indexing.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from gapbench.ops import log_normal, log_standard_normal

Params = Dict[str, Tensor]


class Posterior:
    """q(z|x) for N datapoints: samples [S, N, D] and log-densities [S, N].

    ``exact_log_prob`` is False for families whose log-density is itself a
    bound (the auxiliary-variable flow), which cannot serve as an AIS start.
    """

    exact_log_prob: bool = True

    @property
    def num_points(self) -> int:
        raise NotImplementedError

    @property
    def latent_dim(self) -> int:
        raise NotImplementedError

    def sample_and_log_prob(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) for z of shape [S, N, D]; returns [S, N]."""
        raise NotImplementedError(f"{type(self).__name__} has no tractable log-density")

    def sample(self, num_samples: int) -> Tensor:
        return self.sample_and_log_prob(num_samples)[0]

    def index(self, idx: Tensor) -> "Posterior":
        """The posterior of the datapoints ``idx`` only."""
        raise NotImplementedError

    def detach(self) -> "Posterior":
        raise NotImplementedError


class FamilyPosterior(Posterior):
    """A member of a :class:`Family` per datapoint, given by its parameters."""

    def __init__(self, family: "Family", params: Params, num_points: int):
        self.family = family
        self.params = params
        self._num_points = num_points
        self.exact_log_prob = family.exact_log_prob

    @property
    def num_points(self) -> int:
        return self._num_points

    @property
    def latent_dim(self) -> int:
        return self.family.latent_dim

    def sample_and_log_prob(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        return self.family.sample_and_log_prob(self.params, num_samples, self._num_points)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.family.log_prob(self.params, z)

    def index(self, idx: Tensor) -> "FamilyPosterior":
        params = {k: (v if v.shape[0] == 1 else v[idx]) for k, v in self.params.items()}
        return FamilyPosterior(self.family, params, int(idx.numel()))

    def detach(self) -> "FamilyPosterior":
        return FamilyPosterior(self.family, {k: v.detach() for k, v in self.params.items()}, self._num_points)

    def __repr__(self) -> str:
        return f"FamilyPosterior({self.family.name}, N={self._num_points}, D={self.latent_dim})"


class BatchRowsPosterior(Posterior):
    """Rows [start, start + n) of q over a batch of ``total`` datapoints, given those rows' q alone.

    z_i = the sample the whole batch's q would give row start + i from the same generator state:
    the family is sampled for all ``total`` rows (the other rows' per-datapoint parameters are
    zero placeholders, the shared ones [1, ...] broadcast) and the rows kept. Data-parallel
    training gives each process its rows of a global batch this way, so every process draws the
    noise one process would and all generators stay in step; one process never uses it. The cost:
    the family's own computation (a flow's networks) runs over the whole batch, the encoder and
    the decoder over the rows only.
    """

    def __init__(self, q: FamilyPosterior, total: int, start: int):
        if not 0 <= start <= start + q.num_points <= total:
            raise ValueError(f"rows [{start}, {start + q.num_points}) are not within a batch of {total}")
        self.q, self.total, self.start = q, int(total), int(start)
        self.exact_log_prob = q.exact_log_prob

    @property
    def num_points(self) -> int:
        return self.q.num_points

    @property
    def latent_dim(self) -> int:
        return self.q.latent_dim

    def sample_and_log_prob(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        n = self.q.num_points
        if n == self.total:
            return self.q.sample_and_log_prob(num_samples)
        rows = slice(self.start, self.start + n)

        def whole(v: Tensor) -> Tensor:
            """[n, ...] -> [total, ...] with v at the rows (when n = 1, shared [1, ...] tensors too: harmless)."""
            if v.shape[0] != n:
                return v
            before = v.new_zeros((self.start,) + tuple(v.shape[1:]))
            after = v.new_zeros((self.total - self.start - n,) + tuple(v.shape[1:]))
            return torch.cat([before, v, after])

        params = {k: whole(v) for k, v in self.q.params.items()}
        z, log_q = self.q.family.sample_and_log_prob(params, num_samples, self.total)  # [S, total, D], [S, total]
        return z[:, rows], log_q[:, rows]

    def log_prob(self, z: Tensor) -> Tensor:
        return self.q.log_prob(z)


class DistributionPosterior(Posterior):
    """Adapter: a torch Distribution with batch shape [N] and event shape [D]."""

    def __init__(self, dist: torch.distributions.Distribution):
        if len(dist.batch_shape) != 1 or len(dist.event_shape) != 1:
            raise ValueError(
                "a distribution used as q must have batch shape [N] and event shape [D], "
                f"got batch {tuple(dist.batch_shape)} and event {tuple(dist.event_shape)}; "
                "wrap a Normal in torch.distributions.Independent(normal, 1)"
            )
        if not dist.has_rsample:
            raise ValueError(f"{type(dist).__name__} does not support rsample; q must be reparameterizable")
        self.dist = dist

    @property
    def num_points(self) -> int:
        return self.dist.batch_shape[0]

    @property
    def latent_dim(self) -> int:
        return self.dist.event_shape[0]

    def sample_and_log_prob(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        z = self.dist.rsample((num_samples,))
        return z, self.dist.log_prob(z)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.dist.log_prob(z)

    def gaussian_moments(self) -> Tuple[Tensor, Tensor]:
        return self.dist.mean, torch.log(self.dist.variance)


def as_posterior(q) -> Posterior:
    """Accept a :class:`Posterior` or a torch Distribution; return a Posterior."""
    if isinstance(q, Posterior):
        return q
    if isinstance(q, torch.distributions.Distribution):
        return DistributionPosterior(q)
    raise TypeError(
        f"q must be a gapbench Posterior or a torch.distributions.Distribution, got {type(q).__name__}"
    )


def gaussian_moments(q) -> Tuple[Tensor, Tensor]:
    """Mean and log-variance [N, D] that summarize q, used to start a local fit from it.

    Exact for Gaussians; for other families the moments of their base Gaussian
    when they have one, else estimated from 256 samples.
    """
    q = as_posterior(q)
    if isinstance(q, FamilyPosterior) and "mean" in q.params and "log_var" in q.params:
        n = q.num_points
        return q.params["mean"].expand(n, -1), q.params["log_var"].expand(n, -1)
    if isinstance(q, DistributionPosterior):
        try:
            return q.gaussian_moments()
        except NotImplementedError:
            pass
    with torch.no_grad():
        z, _ = q.sample_and_log_prob(256)
    return z.mean(0), torch.log(z.var(0) + 1e-8)


class Family:
    """A variational family over z in R^D, described functionally by parameter dicts.

    Subclasses implement ``init_params`` and ``sample_and_log_prob``; every
    parameter tensor's first dimension is N (per datapoint) or 1 (shared).
    """

    name: str = ""
    exact_log_prob: bool = True

    def __init__(self, latent_dim: int):
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
        self.latent_dim = latent_dim

    def init_params(
        self, num_points: int, init: Optional[Posterior] = None, device=None, dtype=torch.float32, generator=None
    ) -> Params:
        """Per-datapoint parameters [N, ...]: the prior N(0, I) when ``init`` is None,
        else the member closest to ``init`` (its Gaussian moments, identity flow).
        Families with random hidden weights draw them from ``generator``, else from
        torch's global RNG."""
        raise NotImplementedError

    def sample_and_log_prob(self, params: Params, num_samples: int, num_points: int) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, params: Params, z: Tensor) -> Tensor:
        raise NotImplementedError(f"the {self.name} family has no tractable log-density")

    def sample_and_path_log_prob(self, params: Params, num_samples: int, num_points: int) -> Tuple[Tensor, Tensor]:
        """As :meth:`sample_and_log_prob`, but log q's gradient is its path derivative only.

        log q is evaluated at the reparameterized z with the parameters held fixed
        (detached), so d/dparams [log p(x, z) - log q(z)] drops the score term
        E_q[d log q / dparams], which is zero in expectation: the same expected
        gradient with less variance, none at all when q is the exact posterior
        ("sticking the landing": Roeder, Wu & Duvenaud 2017). The values equal
        :meth:`sample_and_log_prob`'s up to rounding. This default needs
        :meth:`log_prob`; families without a tractable density override it.
        """
        z, _ = self.sample_and_log_prob(params, num_samples, num_points)
        return z, self.log_prob({k: v.detach() for k, v in params.items()}, z)

    def posterior(self, params: Params, num_points: Optional[int] = None) -> FamilyPosterior:
        if num_points is None:
            num_points = max(v.shape[0] for v in params.values())
        return FamilyPosterior(self, params, num_points)

    def _moments(self, num_points, init, device, dtype) -> Tuple[Tensor, Tensor]:
        if init is None:
            zeros = torch.zeros(num_points, self.latent_dim, device=device, dtype=dtype)
            return zeros, zeros.clone()
        mean, log_var = gaussian_moments(init)
        if mean.shape != (num_points, self.latent_dim):
            raise ValueError(
                f"init has shape {tuple(mean.shape)}, expected [{num_points}, {self.latent_dim}]"
            )
        return mean.detach().to(device=device, dtype=dtype).clone(), log_var.detach().to(device=device, dtype=dtype).clone()


class DiagonalGaussian(Family):
    """Fully-factorized Gaussian (FFG): q(z) = N(z; mean, diag(exp(log_var))).

    params: ``mean`` [N, D], ``log_var`` [N, D].
    """

    name = "ffg"

    def init_params(self, num_points, init=None, device=None, dtype=torch.float32, generator=None) -> Params:
        mean, log_var = self._moments(num_points, init, device, dtype)
        return {"mean": mean, "log_var": log_var}

    def sample_and_log_prob(self, params, num_samples, num_points=None):
        mean, log_var = params["mean"], params["log_var"]  # [N, D]
        eps = torch.randn((num_samples,) + tuple(mean.shape), device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * log_var) * eps  # [S, N, D]
        # log q from eps directly: exact, and avoids (z - mean)^2 / var cancellation.
        log_q = log_normal(eps, torch.zeros_like(mean), torch.zeros_like(log_var)) - 0.5 * log_var.sum(-1)
        return z, log_q

    def log_prob(self, params, z):
        return log_normal(z, params["mean"], params["log_var"])

    def sample_and_path_log_prob(self, params, num_samples, num_points=None):
        z, _ = self.sample_and_log_prob(params, num_samples, num_points)
        return z, log_normal(z, params["mean"].detach(), params["log_var"].detach())

    def path_elbo_and_grad(self, params: Params, num_samples: int, joint,
                           out: Optional[Params] = None) -> Optional[Tuple[Tensor, Params]]:
        """(ELBO samples [S, N], the path-derivative gradient of the loss -(1/S) sum_s ELBO_s in ``mean`` and
        ``log_var`` [N, D]) without autograd: what :meth:`sample_and_path_log_prob` and autograd give, up to
        rounding, on the same noise. With z = mean + sd eps and f = log p(x, z) - log q_bar(z) (q's
        parameters held fixed in log q_bar): df/dz = grad_z log p(x, z) + eps / sd, df/dmean = df/dz and
        df/dlog_var = df/dz * eps * sd / 2. ``joint``: point-major z [N, S, D] -> (log p(x, z) [N, S],
        its gradient in z). None when the parameters are shared between datapoints (then use autograd).
        ``out``: tensors [N, D] for ``mean`` and ``log_var`` to write the gradient into (then returned)."""
        mean, log_var = params["mean"], params["log_var"]
        if mean.shape[0] != log_var.shape[0]:
            return None
        eps = torch.randn((num_samples,) + tuple(mean.shape), device=mean.device, dtype=mean.dtype)
        eps = eps.transpose(0, 1)  # [N, S, D], the draw of sample_and_log_prob
        sd = torch.exp(0.5 * log_var).unsqueeze(1)
        log_p, grad_z = joint(mean.unsqueeze(1) + sd * eps)
        elbo = log_p - (log_standard_normal(eps) - 0.5 * log_var.sum(-1, keepdim=True))
        grad_z = grad_z.add_(eps / sd).mul_(-1.0 / num_samples)  # the loss's, per sample
        if out is None:
            out = {"mean": grad_z.sum(1), "log_var": (grad_z * eps).sum(1)}
        else:
            torch.sum(grad_z, 1, out=out["mean"])
            torch.sum(grad_z.mul_(eps), 1, out=out["log_var"])
        out["log_var"].mul_(0.5 * sd.squeeze(1))
        return elbo.transpose(0, 1), out


FAMILIES: Dict[str, type] = {"ffg": DiagonalGaussian}


def get_family(name: str, latent_dim: int, **kwargs) -> Family:
    """The family called ``name`` ("ffg", "flow", ...) over a latent of ``latent_dim``."""
    try:
        cls = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown posterior family {name!r}; choose one of {sorted(FAMILIES)}") from None
    return cls(latent_dim, **kwargs)
