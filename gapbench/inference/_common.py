"""Plumbing shared by the estimators: seeding, chunking, the prior, finiteness.

Nothing here is an estimator; the public functions live in their own modules.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from gapbench.models.posterior import Posterior, as_posterior
from gapbench.ops import log_standard_normal

logger = logging.getLogger("gapbench.inference")

# Default bound on S * N (sample-datapoint pairs) in one forward pass of the model: on a
# CPU, passes that stay in cache (4,096 pairs of 784 pixels) run fastest; a GPU wants
# large passes.
DEFAULT_PAIRS_PER_PASS = {"cpu": 4096, "cuda": 50_000}


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` without touching the caller's RNG.

    ``seed=None`` leaves the global generator as it is (and advances it).
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_model(model) -> int:
    """The model's latent dimension, after checking it has the model contract."""
    missing = [a for a in ("latent_dim", "log_prior", "log_likelihood") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a model: it lacks {', '.join(missing)} "
            "(a model has latent_dim, log_prior(z) and log_likelihood(x, z) with z [S, N, D] -> [S, N])"
        )
    return int(model.latent_dim)


def check_batch(x: Tensor) -> int:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a tensor with a leading batch dimension N >= 1, got {getattr(x, 'shape', x)!r}")
    return int(x.shape[0])


def float_dtype(x: Tensor) -> torch.dtype:
    """The floating dtype computations on x run in (float32 for integer data)."""
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _shape_text(value) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {list(shape)}" if shape is not None else f"a {type(value).__name__}, not a tensor"


def check_density_shape(value, z: Tensor, name: str) -> None:
    """Raise unless ``value`` (what model.``name`` returned for z [S, N, D]) has shape [S, N].

    A shape comparison, free next to the model's forward pass; without it a model
    that keeps a data or latent dimension ([S, N, 1]) fails later with a broadcasting
    error that does not say which function is wrong.
    """
    if getattr(value, "shape", None) == z.shape[:-1]:
        return
    summed = "data" if name == "log_likelihood" else "latent"
    raise ValueError(
        f"model.{name} returned {_shape_text(value)} for z of shape {list(z.shape)}; it must return "
        f"[S, N] = {list(z.shape[:-1])} (sum over {summed} dimensions)"
    )


def log_joint(model, x: Tensor, z: Tensor) -> Tensor:
    """log p(x, z) = log p(z) + log p(x|z); z [S, N, D] -> [S, N], each term's shape checked."""
    log_prior = model.log_prior(z)  # [S, N]
    check_density_shape(log_prior, z, "log_prior")
    log_likelihood = model.log_likelihood(x, z)  # [S, N]
    check_density_shape(log_likelihood, z, "log_likelihood")
    return log_prior + log_likelihood


def sample_chunks(num_samples: int, chunk_size: Optional[int], num_points: int, device=None) -> Iterator[int]:
    """Sizes of the sample chunks: at most ``chunk_size`` samples each.

    ``chunk_size=None`` keeps S_chunk * N under DEFAULT_PAIRS_PER_PASS for the device.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if chunk_size is None:
        kind = torch.device(device).type if device is not None else "cpu"
        chunk_size = max(1, DEFAULT_PAIRS_PER_PASS.get(kind, DEFAULT_PAIRS_PER_PASS["cuda"]) // max(num_points, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    done = 0
    while done < num_samples:
        size = min(chunk_size, num_samples - done)
        yield size
        done += size


def point_chunks(num_points: int, chunk_size: Optional[int]) -> Iterator[slice]:
    """Slices of at most ``chunk_size`` datapoints (all of them when None)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    step = num_points if chunk_size is None else chunk_size
    for start in range(0, num_points, step):
        yield slice(start, min(start + step, num_points))


def index_posterior(q: Posterior, idx: slice, num_points: int) -> Posterior:
    """q restricted to the datapoints ``idx``; falls back to a full-batch view."""
    if idx == slice(0, num_points):
        return q
    try:
        return q.index(torch.arange(num_points)[idx])
    except NotImplementedError:
        return _SlicedPosterior(q, idx, num_points)


class _SlicedPosterior(Posterior):
    """View of datapoints ``idx`` of a posterior that cannot be indexed itself.

    Evaluates the full posterior and keeps the slice: correct because every
    datapoint's density is independent of the others', and cheap next to a model.
    """

    def __init__(self, q: Posterior, idx: slice, num_points: int):
        self.q, self.idx, self.full_num_points = q, idx, num_points
        self.exact_log_prob = q.exact_log_prob

    @property
    def num_points(self) -> int:
        return len(range(*self.idx.indices(self.full_num_points)))

    @property
    def latent_dim(self) -> int:
        return self.q.latent_dim

    def sample_and_log_prob(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        z, log_q = self.q.sample_and_log_prob(num_samples)
        return z[:, self.idx], log_q[:, self.idx]

    def log_prob(self, z: Tensor) -> Tensor:
        full = torch.zeros(z.shape[0], self.full_num_points, z.shape[-1], dtype=z.dtype, device=z.device)
        full[:, self.idx] = z
        return self.q.log_prob(full)[:, self.idx]


class StandardNormalPrior(Posterior):
    """p0(z) = N(0, I) for N datapoints, checked against the model's own log_prior."""

    def __init__(self, num_points: int, latent_dim: int, device, dtype):
        self._n, self._d, self.device, self.dtype = num_points, latent_dim, device, dtype

    @property
    def num_points(self) -> int:
        return self._n

    @property
    def latent_dim(self) -> int:
        return self._d

    def sample_and_log_prob(self, num_samples: int) -> Tuple[Tensor, Tensor]:
        z = torch.randn(num_samples, self._n, self._d, device=self.device, dtype=self.dtype)
        return z, log_standard_normal(z)

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def index(self, idx: Tensor) -> "StandardNormalPrior":
        return StandardNormalPrior(int(idx.numel()), self._d, self.device, self.dtype)


def check_standard_normal_prior(model, z: Tensor) -> None:
    """Raise unless model.log_prior(z) is log N(z; 0, I) at the given points."""
    with torch.no_grad():
        got = model.log_prior(z)
        want = log_standard_normal(z)
    check_density_shape(got, z, "log_prior")
    if not torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-3):
        raise ValueError(
            "init=None starts from the prior, assumed N(0, I), but model.log_prior differs from "
            "log N(z; 0, I); pass the prior as init (a torch Distribution with batch [N] and event [D])"
        )


def start_distribution(model, init, num_points: int, latent_dim: int, device, dtype, need_exact: bool) -> Posterior:
    """p0 for N datapoints: the standard-normal prior (init=None) or ``init`` as a Posterior."""
    if init is None:
        p0 = StandardNormalPrior(num_points, latent_dim, device, dtype)
        check_standard_normal_prior(model, p0.sample(2))
        return p0
    p0 = as_posterior(init)
    if need_exact and not p0.exact_log_prob:
        raise ValueError(
            f"{type(p0).__name__} has no exact log-density (its log q is a bound), so it cannot be "
            "an AIS start distribution; start from the prior (init=None) or an FFG/RealNVP q"
        )
    if p0.num_points != num_points or p0.latent_dim != latent_dim:
        raise ValueError(
            f"init describes {p0.num_points} datapoints of dimension {p0.latent_dim}, "
            f"expected {num_points} of dimension {latent_dim}"
        )
    return p0


def flag_nonfinite(name: str, values: Tensor) -> Tensor:
    """Boolean [N]: which values are finite; logs a warning with the count of those that are not."""
    finite = torch.isfinite(values)
    num_bad = int((~finite).sum())
    if num_bad:
        logger.warning("%s: %d of %d datapoints gave a non-finite value (kept as NaN/inf, not averaged)",
                       name, num_bad, values.numel())
    return finite


__all__ = [
    "StandardNormalPrior",
    "check_batch",
    "check_density_shape",
    "check_model",
    "flag_nonfinite",
    "index_posterior",
    "log_joint",
    "point_chunks",
    "sample_chunks",
    "seeded",
    "start_distribution",
]
