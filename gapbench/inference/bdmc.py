"""Bidirectional Monte Carlo: a sandwich lower <= log p(x) <= upper on simulated data.

Simulate z ~ p(z), x ~ p(x|z); then z is an exact posterior sample for x.
Forward AIS from p0 gives a stochastic lower bound, reverse AIS started at z
a stochastic upper bound; the width upper - lower bounds how far either AIS
estimate is from log p(x) at those settings. Grosse, Ghahramani & Adams 2015;
Wu et al. 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from gapbench.inference._common import check_model, seeded
from gapbench.inference.ais import DEFAULT_NUM_CHAINS, DEFAULT_NUM_STEPS, AISResult, ais, ais_reverse


@dataclass
class BDMCResult:
    """x [N, ...] and z [N, D] simulated; lower [N], upper [N] float64; the two AIS runs;
    finite [N]: both bounds finite. ``width`` = upper - lower [N]."""

    x: Tensor
    z: Tensor
    lower: Tensor
    upper: Tensor
    forward: AISResult
    reverse: AISResult
    finite: Tensor

    @property
    def width(self) -> Tensor:
        return self.upper - self.lower


def _model_device_dtype(model):
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device, p.dtype
        for b in model.buffers():
            return b.device, b.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def bdmc(
    model,
    num_points: int,
    num_steps: int = DEFAULT_NUM_STEPS,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_leapfrog: int = 10,
    schedule: str = "sigmoid",
    *,
    sample_x_fn: Optional[Callable[[Tensor], Tensor]] = None,
    init_fn: Optional[Callable[[Tensor], object]] = None,
    chunk_size: Optional[int] = None,
    seed: Optional[int] = None,
    device=None,
    dtype=None,
    **ais_kwargs,
) -> BDMCResult:
    """Sandwich log p(x) between forward and reverse AIS on data simulated from the model.

    E[lower] <= log p(x) <= E[upper],  (z, x) ~ p(z) p(x|z)

    Args:
        model: the model contract, plus a way to simulate: ``sample_x_fn`` if given,
            else ``model.sample_x(z)``; either maps z [N, D] to one sample x [N, ...] of p(x|z).
            The prior must be N(0, I) (z is drawn from it), as checked by :func:`ais`.
        num_points: N, datapoints to simulate.
        num_steps, num_chains, num_leapfrog, schedule: AIS settings, used in both directions.
        init_fn: optional x -> q(z|x) (e.g. an encoder) used as p0 in both directions instead
            of the prior; it needs an exact log-density.
        chunk_size: most datapoints annealed at once.
        seed: run under this seed without disturbing the global generator.
        device, dtype: of the simulation (default: those of the model's parameters, else CPU float32).
        **ais_kwargs: step_size, target_acceptance, step_size_range, record_every.

    Returns:
        :class:`BDMCResult`. Grosse et al. 2015.
    """
    latent_dim = check_model(model)
    if sample_x_fn is None:
        if not hasattr(model, "sample_x"):
            raise TypeError(
                f"bdmc must simulate data: pass sample_x_fn(z) -> x or give {type(model).__name__} a sample_x(z) method"
            )
        sample_x_fn = model.sample_x
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    model_device, model_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    dtype = dtype or model_dtype
    with seeded(seed, device):
        with torch.no_grad():
            z = torch.randn(num_points, latent_dim, device=device, dtype=dtype)
            x = sample_x_fn(z)
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        init = None if init_fn is None else init_fn(x)
        settings = dict(num_steps=num_steps, num_chains=num_chains, num_leapfrog=num_leapfrog, schedule=schedule,
                        init=init, chunk_size=chunk_size, **ais_kwargs)
        forward = ais(model, x, **settings)
        reverse = ais_reverse(model, x, z, **settings)
    finite = forward.finite & reverse.finite
    return BDMCResult(x, z, forward.log_px, reverse.log_px, forward, reverse, finite)
