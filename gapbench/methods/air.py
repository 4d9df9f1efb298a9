"""Amortized inference regularization: a smoother encoder (Shu, Bui, Zhao, Kochenderfer & Ermon 2018).

Shu et al., "Amortized inference regularization" (NeurIPS 2018), regularize the VAE through its
amortization family: an encoder that cannot follow every datapoint's own optimum overfits less, and
so does the decoder trained with it. Two ways, ``train.air.kind``:

denoise:    max E_{x̃ ~ N(x, σ²I)} [ E_{q(z|x̃)}[log p(x|z)] − β KL(q(z|x̃) || p(z)) ]
            The encoder reads the datapoint corrupted by Gaussian noise of std σ (``noise_std``);
            the decoder's target is the clean x (the denoising VAE of Im et al. 2017). The noise is
            drawn in the training step only: the model's q(z|x) (evaluation, the gap tables) reads
            x as it is.
lipschitz:  max E_{q(z|x)}[log p(x|z)] − β KL(q(z|x) || p(z)),  Lip(x ↦ encoder(x)) ≤ L
            Each of the encoder's K linear layers has its weight rescaled to spectral norm at most
            L^(1/K) (W = V · min(1, L^(1/K) / ||V||₂), ||V||₂ computed exactly); with 1-Lipschitz
            activations the encoder's outputs (mean, log_var and its features) move by at most
            L·||dx||. The bounded layers replace the encoder's own (see :func:`bound_encoder`), so
            checkpoints and evaluation carry them. MLP encoders only.

No inner loop and no test-time refinement (``refines = False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapbench.methods.base import Method, StepResult, elbo_terms
from gapbench.models.networks import ACTIVATIONS
from gapbench.recipe import RecipeError

#: Activations that are 1-Lipschitz (ELU with alpha 1, ReLU, tanh, softplus): layers between them keep the bound.
_ONE_LIPSCHITZ = tuple(ACTIVATIONS.values())


def spectral_norm(v: Tensor) -> Tensor:
    """||V||₂, the largest singular value of a matrix, exactly: the square root of the largest eigenvalue
    of its smaller Gram matrix (a few times faster than an SVD of a 200 x 784 weight on a CPU)."""
    a = v if v.shape[0] <= v.shape[1] else v.T
    return torch.linalg.eigvalsh(a @ a.T)[-1].clamp(min=0).sqrt()


class BoundedLinear(nn.Module):
    """A linear layer whose weight has spectral norm at most ``bound``: y = x (V s)^T + b,
    s = min(1, bound / ||V||₂). Holds the original layer as ``linear`` (its V and b) and the bound
    as a buffer, so a checkpoint says that the layer is bounded and by how much."""

    def __init__(self, linear: nn.Linear, bound: float):
        super().__init__()
        self.linear = linear
        self.register_buffer("bound", torch.tensor(float(bound), dtype=linear.weight.dtype,
                                                   device=linear.weight.device))

    def weight(self) -> Tensor:
        v = self.linear.weight
        return v * (self.bound / torch.maximum(spectral_norm(v), self.bound))  # scale 1 while ||V||₂ <= bound

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.linear.bias)


def bound_encoder(encoder: nn.Module, lipschitz: float) -> nn.Module:
    """Replace each nn.Linear of ``encoder`` by a :class:`BoundedLinear` of spectral norm at most
    lipschitz^(1/K) (K linear layers), in place; returns ``encoder``.

    Raises ValueError where the bound would not hold: a layer other than nn.Linear and the
    1-Lipschitz activations (a convolution, dropout), or an encoder bounded already.
    """
    layers = []
    for parent in encoder.modules():
        if isinstance(parent, BoundedLinear):
            raise ValueError("the encoder's layers are bounded already")
        known = isinstance(parent, (nn.Linear, nn.Sequential, nn.Identity, *_ONE_LIPSCHITZ))
        # Any other module must be a container that composes its children (the encoder itself):
        # no weights of its own, and children to hold them.
        if not known and (list(parent.parameters(recurse=False)) or next(parent.children(), None) is None):
            raise ValueError(f"cannot bound the Lipschitz constant through a {type(parent).__name__} layer")
        layers += [(parent, name, child) for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if not layers:
        raise ValueError("the encoder has no linear layers to bound")
    per_layer = float(lipschitz) ** (1.0 / len(layers))
    for parent, name, layer in layers:
        setattr(parent, name, BoundedLinear(layer, per_layer))
    return encoder


class AIR(Method):
    name = "air"
    paper = "Shu, Bui, Zhao, Kochenderfer & Ermon 2018, Amortized inference regularization"
    objective = ("denoise: E_{x~ ~ N(x, s^2 I)}[E_{q(z|x~)} log p(x|z) - beta KL(q(z|x~) || p(z))]; "
                 "lipschitz: E_q[log p(x|z)] - beta KL(q(z|x) || p(z)) with Lip(encoder) <= L")
    refines = False

    @classmethod
    def prepare_model(cls, model, settings) -> None:
        if settings is not None and settings.kind == "lipschitz":
            try:
                bound_encoder(model.encoder, settings.lipschitz)
            except ValueError as exc:
                err = RecipeError(f"train.air.kind: 'lipschitz' needs an MLP encoder: {exc}")
                err.key, err.problem = "train.air.kind", str(exc)
                raise err from None

    @classmethod
    def check(cls, recipe):
        air = recipe.train.air
        if air.kind == "lipschitz" and recipe.model.architecture != "mlp":
            return ("train.air.kind: 'lipschitz' bounds the linear layers of an MLP encoder, not a "
                    f"{recipe.model.architecture!r} one; use kind 'denoise' or model.architecture 'mlp'")
        if air.kind == "denoise" and air.noise_std == 0:
            return ("train.air.noise_std: 0 corrupts nothing (that is method vae); set a positive std, "
                    "e.g. 0.1, or train.method vae")
        return None

    def step(self, x, beta):
        s = self.settings
        x_in = x + s.noise_std * torch.randn_like(x) if s.kind == "denoise" else x
        log_lik, log_ratio = elbo_terms(self.model, x, self.model.posterior(x_in), self.train_cfg.num_samples)
        obj = (log_lik + beta * log_ratio).mean(0)
        self.apply(-obj.mean())
        return StepResult(obj.detach(), (log_lik + log_ratio).mean(0).detach())
