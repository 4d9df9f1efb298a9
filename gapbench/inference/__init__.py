"""Estimators of log p(x) and its bounds, for any model with the model contract.

A *model* has ``latent_dim``, ``log_prior(z)`` and ``log_likelihood(x, z)``
with z [S, N, D] -> [S, N]; nothing else is needed (the package's VAE is one
such model, a user's own decoder another). Every estimator returns one value
per datapoint, in nats, as float64.

* :func:`elbo`, :func:`iwae` -- bounds from a posterior q (bounds.py)
* :func:`fit_local` -- the optimal member q* of a family, per datapoint (local.py)
* :func:`ais`, :func:`ais_reverse` -- annealed importance sampling with HMC (ais.py, hmc.py)
* :func:`bdmc` -- the forward/reverse AIS sandwich on simulated data (bdmc.py)
"""

from gapbench.inference.ais import AISResult, AISTrace, ais, ais_reverse, effective_sample_size
from gapbench.inference.bdmc import BDMCResult, bdmc
from gapbench.inference.bounds import elbo, iwae
from gapbench.inference.hmc import HMCInfo, HMCState, hmc_init, hmc_step, hmc_transition, leapfrog
from gapbench.inference.local import FitTrace, LocalFit, fit_local
from gapbench.inference.schedule import annealing_schedule

__all__ = [
    "AISResult",
    "AISTrace",
    "BDMCResult",
    "FitTrace",
    "HMCInfo",
    "HMCState",
    "LocalFit",
    "ais",
    "ais_reverse",
    "annealing_schedule",
    "bdmc",
    "effective_sample_size",
    "elbo",
    "fit_local",
    "hmc_init",
    "hmc_step",
    "hmc_transition",
    "iwae",
    "leapfrog",
]
