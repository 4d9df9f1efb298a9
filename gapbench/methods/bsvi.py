"""BSVI: the decoder trained on a bound that importance-weights every proposal of the SVI trajectory.

Shu, Bui, Whang & Ermon 2019, "Training variational autoencoders with buffered stochastic variational
inference":

    decoder: max_{θ, π} E[log Σ_{k=0..K} π_k p_θ(x, z_k) / q_{λ_k}(z_k)],  z_k ~ q_{λ_k}
    encoder: max_φ L(x; θ, λ_0)

λ_0 = encoder_φ(x), λ_1 .. λ_K the SVI steps of method svi (:func:`gapbench.methods.svi.svi_steps`),
z_k the sample that step k drew (z_K a fresh one from λ_K): the buffer. For any π in the simplex
the buffered bound is a lower bound on log p(x), because each λ_k depends only on the samples
before z_k, so every w_k has mean p(x) given them; by Jensen it is at least Σ_k π_k L(x; λ_k),
and with π all on λ_K it is SVI's L(x; λ_K). Here π is learned with the decoder, by gradient ascent
on the same bound (its expectation: never on one draw's samples, whose maximum over π is no bound):
one weight per step, shared by every datapoint, uniform at the start.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gapbench.inference._common import log_joint
from gapbench.methods.base import StepResult, decoder_parameters, encoder_parameters
from gapbench.methods.svi import SVI, SVITrajectory
from gapbench.recipe import BSVIConfig

__all__ = ["BSVI", "buffer_log_weights", "buffered_bound"]


def buffer_log_weights(model, x: Tensor, trajectory: SVITrajectory, beta: float = 1.0) -> Tensor:
    """log w_ks = log p(x|z_ks) + β [log p(z_ks) - log q_{λ_k}(z_ks)] of the buffer: [K+1, S, N]
    (differentiable in the model; the samples and their log q are fixed).

    trajectory: :func:`gapbench.methods.svi.svi_steps` with ``keep_samples`` (z [K+1, S, N, D], log_q [K+1, S, N]).
    beta: the KL warm-up weight; 1 gives the importance weights p(x, z) / q(z) themselves.
    """
    z, log_q = trajectory.z, trajectory.log_q
    steps, num_samples, num_points, dim = z.shape
    flat = z.reshape(steps * num_samples, num_points, dim)
    if beta == 1.0:
        return log_joint(model, x, flat).reshape(steps, num_samples, num_points) - log_q
    log_lik = model.log_likelihood(x, flat).reshape(steps, num_samples, num_points)
    return log_lik + beta * (model.log_prior(flat).reshape(steps, num_samples, num_points) - log_q)


def buffered_bound(log_w: Tensor, log_pi: Tensor) -> Tensor:
    """log Σ_k π_k (1/S) Σ_s w_ks for each datapoint: [N] from log_w [K+1, S, N] and log π [K+1]
    (the log-softmax of the buffer's logits); differentiable in both."""
    steps, num_samples, num_points = log_w.shape
    if log_pi.shape != (steps,):
        raise ValueError(f"log_pi has shape {tuple(log_pi.shape)}; the buffer has {steps} proposals")
    terms = log_w + (log_pi.to(log_w.dtype)[:, None, None] - math.log(num_samples))
    return torch.logsumexp(terms.reshape(steps * num_samples, num_points), dim=0)


class BSVI(SVI):
    """Shu, Bui, Whang & Ermon 2019: the decoder trained on the buffered bound of the SVI trajectory.

    Per minibatch: the SVI steps of method svi from the encoder's output (``train.bsvi.num_steps``,
    ``lr``, ``num_samples``), keeping each step's samples; one Adam step of the decoder and of the
    buffer weights π = softmax(logits) (one per proposal λ_0 .. λ_K, uniform at the start) on the
    buffered bound (:func:`buffered_bound`; the samples and their log q fixed), and one of the encoder
    on its own ELBO (the decoder fixed in it). β, the KL warm-up weight, multiplies log p(z) - log q(z)
    inside each importance weight and in the encoder's ELBO. :meth:`refine` gives SVI's λ_K.
    """

    name = "bsvi"
    paper = ("Shu, Bui, Whang & Ermon 2019, Training variational autoencoders with buffered stochastic "
             "variational inference")
    objective = ("decoder, π: log Σ_k π_k p(x, z_k) / q_{λ_k}(z_k), z_k ~ q_{λ_k} along K SVI steps from λ_0; "
                 "encoder: L(x; λ_0 = encoder(x))")
    settings_class = BSVIConfig

    def build_optimizers(self):
        optimizers = super().build_optimizers()
        device = next(self.model.parameters()).device
        self.buffer_logits = nn.Parameter(torch.zeros(self.settings.num_steps + 1, device=device))
        t = self.train_cfg
        optimizers["buffer"] = torch.optim.Adam([self.buffer_logits], lr=t.lr, eps=t.adam_eps)
        return optimizers

    def buffer_weights(self) -> Tensor:
        """π [K+1], detached."""
        return torch.softmax(self.buffer_logits.detach(), 0)

    def step(self, x, beta):
        q0 = self.model.posterior(x)
        trajectory = self.trajectory(x, q0, keep_samples=True)
        log_w = buffer_log_weights(self.model, x, trajectory, beta)
        bound = buffered_bound(log_w, torch.log_softmax(self.buffer_logits, 0))
        encoder_obj, elbo = self.encoder_objective(x, q0, beta)
        loss = -bound.mean()
        self.apply_parts([(loss, decoder_parameters(self.model) + [self.buffer_logits]),
                          (-encoder_obj.mean(), encoder_parameters(self.model))])
        return StepResult(bound.detach(), elbo)

    def extra_state(self) -> dict:
        return {"buffer_logits": self.buffer_logits.detach().clone()}

    def load_extra_state(self, state: dict) -> None:
        if "buffer_logits" in state:
            with torch.no_grad():
                self.buffer_logits.copy_(state["buffer_logits"])
