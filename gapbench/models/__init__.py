"""Likelihoods, encoders, decoders, posterior families and the VAE.

Importing this package registers the flow families ("flow", "realnvp") next to
"ffg" in :data:`gapbench.models.posterior.FAMILIES`.
"""

from gapbench.models.posterior import (
    DiagonalGaussian,
    Family,
    FamilyPosterior,
    Posterior,
    as_posterior,
    get_family,
)
from gapbench.models.flows import AuxiliaryFlow, FlowFamily, RealNVP
from gapbench.models.likelihoods import (
    Bernoulli,
    Categorical,
    DiscretizedLogistic,
    Gaussian,
    Likelihood,
    get_likelihood,
)
from gapbench.models.vae import VAE, ModelError, build_vae, load_state

__all__ = [
    "AuxiliaryFlow",
    "Bernoulli",
    "Categorical",
    "DiagonalGaussian",
    "DiscretizedLogistic",
    "Family",
    "FamilyPosterior",
    "FlowFamily",
    "Gaussian",
    "Likelihood",
    "ModelError",
    "Posterior",
    "RealNVP",
    "VAE",
    "as_posterior",
    "build_vae",
    "get_family",
    "get_likelihood",
    "load_state",
]
