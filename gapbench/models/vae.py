"""The variational autoencoder: prior, decoder p(x|z) and amortized encoder q(z|x).

It satisfies the model contract every estimator relies on (``latent_dim``,
``log_prior(z)``, ``log_likelihood(x, z)`` with z [S, N, D] -> [S, N]) and adds
``posterior(x)``, the encoder's q(z|x) as a :class:`FamilyPosterior`.
Kingma & Welling, "Auto-Encoding Variational Bayes" (2014); architecture and
families of Cremer, Li & Duvenaud (2018).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from gapbench.errors import GapbenchError
from gapbench.models.flows import FlowFamily
from gapbench.models.likelihoods import LIKELIHOODS, Bernoulli, Likelihood, get_likelihood
from gapbench.models.networks import ACTIVATIONS, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from gapbench.models.posterior import Family, FamilyPosterior, Params, get_family
from gapbench.ops import log_standard_normal

ARCHITECTURES = ("mlp", "conv")
ENCODER_FAMILIES = ("ffg", "flow", "realnvp")


class ModelError(GapbenchError, ValueError):
    """An invalid model setting, or a checkpoint that does not fit the model."""


class VAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = likelihood(decoder(z)), q(z|x) = family(encoder(x)).

    The flow families' network weights are shared by all datapoints: they live in
    ``flow_params`` as parameters with leading dimension 1, beside the per-datapoint
    base Gaussian (and, for "flow", the encoder's features h(x) as ``context``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        family: Family,
        input_shape: Sequence[int],
        config: Optional[Mapping] = None,
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.family = family
        self.input_shape = tuple(int(s) for s in input_shape)
        self.config: Dict = dict(config or {})  # the build_vae settings; not part of state_dict
        shared = family.init_flow_params(1) if isinstance(family, FlowFamily) else {}
        self.flow_params = nn.ParameterDict({k: nn.Parameter(v) for k, v in shared.items()})

    @property
    def latent_dim(self) -> int:
        return self.family.latent_dim

    def log_prior(self, z: Tensor) -> Tensor:
        """log N(z; 0, I): [S, N, D] -> [S, N]."""
        return log_standard_normal(z)

    def decode(self, z: Tensor) -> Tensor:
        """The likelihood's parameters [S, N, K, P] for z [S, N, D] (K per pixel-channel)."""
        out = self.decoder(z)  # [S, N, K*P]
        return out.reshape(z.shape[0], z.shape[1], self.likelihood.num_params, self.likelihood.num_pixels)

    def decode_mean(self, z: Tensor) -> Tensor:
        """E[x|z] as images: [S, N, D] -> [S, N, *input_shape]."""
        return self.likelihood.mean(self.decode(z)).reshape(z.shape[0], z.shape[1], *self.input_shape)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) summed over pixels; x [N, C, H, W] or [N, P], z [S, N, D] -> [S, N]."""
        return self.likelihood.log_prob(x, self.decode(z))

    def mlp_decoder(self):
        """([(weight, bias), ...], activation) of an MLP decoder with Bernoulli pixels, else None.

        Lets the estimators use a hand-derived gradient (gapbench.inference.gradients).
        """
        if not isinstance(self.decoder, MLPDecoder) or not isinstance(self.likelihood, Bernoulli):
            return None
        if overrides_density(self, VAE):  # a subclass's (or a patched) density is not this MLP's
            return None
        modules = list(self.decoder.net)
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        acts = {type(m) for m in modules if not isinstance(m, nn.Linear)}
        names = [name for name, cls in ACTIVATIONS.items() if {cls} == acts]
        if len(linears) + max(len(linears) - 1, 0) != len(modules) or (len(linears) > 1 and len(names) != 1):
            return None
        return [(m.weight, m.bias) for m in linears], (names[0] if names else "elu")

    def encode(self, x: Tensor) -> Params:
        """The amortized family parameters for x [N, ...]: base ``mean``, ``log_var`` [N, D], flow weights [1, ...]."""
        mean, log_var, features = self.encoder(x)
        params = {"mean": mean, "log_var": log_var}
        if getattr(self.family, "context_dim", 0):
            params["context"] = features  # h(x) [N, F]
        params.update(self.flow_params.items())
        return params

    def posterior(self, x: Tensor) -> FamilyPosterior:
        """q(z|x) for the N datapoints of x."""
        return self.family.posterior(self.encode(x), num_points=x.shape[0])


_DENSITY_METHODS = ("log_prior", "log_likelihood")
_ORIGINAL_DENSITIES: Dict[type, Dict] = {}


def remember_densities(cls: type) -> type:
    """Record ``cls``'s own log_prior and log_likelihood, for :func:`overrides_density`."""
    _ORIGINAL_DENSITIES[cls] = {m: cls.__dict__[m] for m in _DENSITY_METHODS}
    return cls


def overrides_density(model, cls: type) -> bool:
    """Whether ``model`` computes log p(z) or log p(x|z) otherwise than ``cls`` was defined to.

    True for a subclass that overrides either, a method patched on the class or the
    instance: then a written-out gradient of cls's density would be of the wrong function.
    """
    original = _ORIGINAL_DENSITIES[cls]
    return any(getattr(type(model), m) is not original[m] or m in vars(model) for m in _DENSITY_METHODS)


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ModelError(f"model.{key} must be a positive integer, got {value!r}")
    return int(value)


def _widths(key: str, value, allow_empty: bool = True) -> tuple:
    if isinstance(value, (int, str)) or not isinstance(value, Sequence):
        raise ModelError(f"model.{key} must be a list of layer widths, got {value!r}")
    if not value and not allow_empty:
        raise ModelError(f"model.{key} must not be empty")
    return tuple(_positive_int(key, v) for v in value)


def _choice(key: str, value, choices) -> str:
    if value not in choices:
        raise ModelError(f"model.{key} must be one of {list(choices)}, got {value!r}")
    return value


def build_vae(
    input_shape: Sequence[int],
    *,
    architecture: str = "mlp",
    latent_dim: int = 50,
    encoder_hidden: Sequence[int] = (200, 200),
    decoder_hidden: Sequence[int] = (200, 200),
    activation: str = "elu",
    likelihood: str = "bernoulli",
    gaussian_std: Optional[Union[float, str]] = None,
    encoder: str = "ffg",
    num_flow_steps: int = 2,
    flow_hidden: int = 100,
    conv_channels: Sequence[int] = (64, 128, 256),
    num_levels: Optional[int] = None,
) -> VAE:
    """Build a VAE for images of ``input_shape`` (C, H, W) (or (P,)); raises ModelError on bad settings.

    architecture "mlp" uses encoder_hidden/decoder_hidden; "conv" (3x32x32 only) uses
    conv_channels. likelihood: "bernoulli", "logistic" or "categorical" (both need
    num_levels, the data's grey levels; other likelihoods ignore it), "gaussian" (gaussian_std: a number = fixed, None/"learned" = one per
    pixel, "decoder" = output by the decoder). encoder: "ffg", "flow" (auxiliary flow)
    or "realnvp"; num_flow_steps and flow_hidden size the flows. Weights are drawn from
    torch's global RNG.
    """
    input_shape = _widths("input_shape", input_shape, allow_empty=False)
    _choice("architecture", architecture, ARCHITECTURES)
    latent_dim = _positive_int("latent_dim", latent_dim)
    _choice("activation", activation, sorted(ACTIVATIONS))
    _choice("likelihood", likelihood, sorted(LIKELIHOODS))
    _choice("encoder", encoder, ENCODER_FAMILIES)
    if likelihood in ("logistic", "categorical"):
        if num_levels is None:
            raise ModelError(f"model.num_levels is required by the {likelihood} likelihood (e.g. 256 for 8-bit images)")
        if _positive_int("num_levels", num_levels) < 2:
            raise ModelError(f"model.num_levels must be at least 2, got {num_levels!r}")
    else:
        num_levels = None  # the data's number of grey levels; only the discrete likelihoods use it
    if gaussian_std is not None and likelihood != "gaussian":
        raise ModelError(f"model.gaussian_std is only used by the gaussian likelihood, not {likelihood!r}")
    num_pixels = math.prod(input_shape)
    try:
        lik = get_likelihood(likelihood, num_pixels, num_levels=num_levels, gaussian_std=gaussian_std)
    except ValueError as err:
        raise ModelError(f"model.gaussian_std: {err}") from None

    if architecture == "conv":
        conv_channels = _widths("conv_channels", conv_channels, allow_empty=False)
        if input_shape != (3, 32, 32):
            raise ModelError(f"model.architecture 'conv' needs 3x32x32 images, got input_shape {input_shape}")
        if len(conv_channels) > 5:
            raise ModelError(f"model.conv_channels allows at most 5 layers for 32x32 images, got {conv_channels}")
        enc = ConvEncoder(latent_dim, conv_channels, activation, input_shape)
        dec = ConvDecoder(latent_dim, lik.num_params, conv_channels, activation, input_shape)
    else:
        encoder_hidden = _widths("encoder_hidden", encoder_hidden)
        decoder_hidden = _widths("decoder_hidden", decoder_hidden)
        enc = MLPEncoder(num_pixels, latent_dim, encoder_hidden, activation)
        dec = MLPDecoder(latent_dim, lik.num_params * num_pixels, decoder_hidden, activation)

    family_kwargs = {}
    if encoder != "ffg":
        family_kwargs = {
            "num_flow_steps": _positive_int("num_flow_steps", num_flow_steps),
            "flow_hidden": _positive_int("flow_hidden", flow_hidden),
        }
        if encoder == "flow":
            family_kwargs["context_dim"] = enc.feature_dim
    family = get_family(encoder, latent_dim, **family_kwargs)
    config = dict(
        input_shape=list(input_shape), architecture=architecture, latent_dim=latent_dim,
        encoder_hidden=list(encoder_hidden), decoder_hidden=list(decoder_hidden), activation=activation,
        likelihood=likelihood, gaussian_std=gaussian_std, encoder=encoder, num_flow_steps=num_flow_steps,
        flow_hidden=flow_hidden, conv_channels=list(conv_channels), num_levels=num_levels,
    )  # fmt: skip
    return VAE(enc, dec, lik, family, input_shape, config)


def load_state(vae: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load weights into ``vae`` after checking every name and shape; returns ``vae``.

    Raises ModelError naming the first missing, unexpected or mis-shaped tensor:
    the usual sign of a checkpoint from another architecture or recipe.
    """
    expected = vae.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise ModelError(f"checkpoint has no tensor {key!r}: it was saved from a different model architecture")
        got = state_dict[key]
        if not isinstance(got, Tensor):
            raise ModelError(f"checkpoint entry {key!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(tensor.shape):
            raise ModelError(
                f"checkpoint tensor {key!r} has shape {tuple(got.shape)} but the model expects "
                f"{tuple(tensor.shape)}: it was saved from a different model architecture"
            )
    for key in state_dict:
        if key not in expected:
            raise ModelError(f"checkpoint has an unexpected tensor {key!r}: it was saved from a different model architecture")
    vae.load_state_dict(state_dict)
    return vae


remember_densities(VAE)
