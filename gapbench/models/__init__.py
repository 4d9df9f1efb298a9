"""Likelihoods, encoders, decoders, posterior families and the VAE."""

from gapbench.models.posterior import (
    DiagonalGaussian,
    Family,
    FamilyPosterior,
    Posterior,
    as_posterior,
    get_family,
)

__all__ = ["DiagonalGaussian", "Family", "FamilyPosterior", "Posterior", "as_posterior", "get_family"]
