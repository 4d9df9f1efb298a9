"""SVI from the encoder's output: each datapoint's FFG refined by its own Adam steps before the decoder's update.

Krishnan, Liang & Hoffman 2018, "On the challenges of learning with inference networks on sparse,
high-dimensional data" (Algorithm 1):

    decoder: max_θ L(x; θ, λ_K),  λ_{k+1} = λ_k + Adam(∇_λ L(x; θ, λ_k)),  λ_0 = encoder_φ(x)
    encoder: max_φ L(x; θ, λ_0)

:func:`svi_steps` is the inner loop (shared with method bsvi): K Adam steps of every datapoint's own
(mean, log_var) on its own ELBO estimate, the model held fixed, all datapoints of the batch advancing
as one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from gapbench.errors import GapbenchError
from gapbench.inference.gradients import joint_density
from gapbench.inference.adam import adam_update_, finite_rows
from gapbench.methods.base import Method, StepResult, decoder_parameters, elbo_terms, encoder_parameters
from gapbench.models.posterior import DiagonalGaussian
from gapbench.ops import log_standard_normal
from gapbench.recipe import SVIConfig


@dataclass
class SVITrajectory:
    """What :func:`svi_steps` returns for N datapoints.

    params: the last step's λ_K, ``mean`` and ``log_var`` [N, D], detached.
    z, log_q: with ``keep_samples``, the samples z_k ~ q_{λ_k} of every step k = 0 .. K, [K+1, S, N, D],
    and log q_{λ_k}(z_k) [K+1, S, N], detached: z_k for k < K are the samples step k's gradient used,
    z_K fresh ones from λ_K. Else None.
    """

    params: Dict[str, Tensor]
    z: Optional[Tensor] = None
    log_q: Optional[Tensor] = None


def ffg_elbo_gradient(density, mean: Tensor, log_var: Tensor, eps: Tensor):
    """z = mean + exp(log_var / 2) eps [S, N, D], and the gradient [N, 2D] (mean's, then log_var's) of
    each datapoint's ELBO estimate (1/S) Σ_s [log p(x, z_s) - log q(z_s)] with respect to its own
    parameters, from ``density(z, need_value) -> (value, ∇_z log p(x, z))`` (see ``joint_density``).

    With log q(z_s) = log N(eps_s; 0, I) - Σ log_var / 2 (the FFG family's, from eps):
    d/d mean = (1/S) Σ_s g_s and d/d log_var = (1/S) Σ_s g_s eps_s exp(log_var / 2) / 2 + 1/2,
    g_s = ∇_z log p(x, z_s): the reparameterization gradient autograd would give, without its graph.
    """
    std = torch.exp(0.5 * log_var)
    z = mean + std * eps
    _, g = density(z, need_value=False)
    return z, torch.cat([g.mean(0), (g * eps).mean(0) * (0.5 * std) + 0.5], dim=1)


def svi_steps(model, x: Tensor, mean: Tensor, log_var: Tensor, num_steps: int, lr: float,
              num_samples: int = 1, keep_samples: bool = False) -> SVITrajectory:
    """``num_steps`` Adam steps (Kingma & Ba 2015, betas 0.9, 0.999) of each datapoint's FFG from (mean, log_var).

    λ_{k+1} = Adam step of λ_k on -(1/S) Σ_s [log p(x, z_s) - log q_{λ_k}(z_s)],  z_s = mean + exp(log_var / 2) ε_s

    The gradient is the reparameterization gradient of that estimate (:func:`ffg_elbo_gradient`, from
    ∇_z log p(x, z): hand-derived for an MLP decoder with Bernoulli pixels, else autograd). Every
    datapoint has its own parameters and Adam moments; the loss is the SUM over datapoints of their
    own estimates, so a datapoint's steps do not depend on the others in its batch. The model is
    fixed: nothing of it changes and no gradient reaches it. A datapoint whose gradient is not
    finite at a step keeps its parameters there.

    Args:
        model: ``log_prior(z)``, ``log_likelihood(x, z)``: z [S, N, D] -> [S, N].
        x: data [N, ...]. mean, log_var: the start λ_0 [N, D] (detached here).
        num_steps: K >= 0. lr: Adam's rate. num_samples: S, samples per step.
        keep_samples: also return every step's samples and their log q (for a buffered bound).
    """
    n, d = mean.shape
    density = joint_density(model, x)
    flat = torch.cat([mean.detach(), log_var.detach()], dim=1).clone()  # [N, 2D]: one row per datapoint
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    zs, log_qs = [], []
    with torch.no_grad():
        for t in range(1, num_steps + 1):
            mu, lv = flat[:, :d], flat[:, d:]
            eps = torch.randn((num_samples, n, d), dtype=flat.dtype, device=flat.device)
            z, grad = ffg_elbo_gradient(density, mu, lv, eps)
            grad = grad.neg_()  # the loss's: minus the ELBO estimate's
            if keep_samples:
                zs.append(z)
                log_qs.append(log_standard_normal(eps) - 0.5 * lv.sum(-1))
            ok = finite_rows(grad)
            all_ok = bool(ok.all())
            if not all_ok:
                grad = torch.where(ok[:, None], grad, torch.zeros_like(grad))
            step = torch.full((n,), t, dtype=torch.long, device=flat.device)
            new = adam_update_(flat, grad, m, v, step, lr)
            flat = new if all_ok else torch.where(ok[:, None], new, flat)
        params = {"mean": flat[:, :d], "log_var": flat[:, d:]}
        if not keep_samples:
            return SVITrajectory(params)
        z, log_q = DiagonalGaussian(d).sample_and_log_prob(params, num_samples)
    return SVITrajectory(params, torch.stack(zs + [z]), torch.stack(log_qs + [log_q]))


class SVI(Method):
    """Krishnan, Liang & Hoffman 2018: the decoder trained on the ELBO of SVI-refined FFGs.

    Per minibatch: λ_0 = the encoder's (mean, log_var); K = ``train.svi.num_steps`` Adam steps
    (rate ``train.svi.lr``, ``train.svi.num_samples`` samples each) of every datapoint's own ELBO
    from there (:func:`svi_steps`); then one Adam step of the decoder on L(x; λ_K) (λ_K fixed) and
    one of the encoder on L(x; λ_0) (the decoder fixed in it), each with ``train.num_samples``
    samples and the KL warm-up weight β on log p(z) - log q(z). The inner steps maximize the full
    ELBO (β = 1), as the authors' code does. :meth:`refine` runs the same K steps at test time.
    The inner optimizer is Adam with the usual betas (0.9, 0.999); the authors' code writes its
    inner Adam with 1 - β and sets 0.9 there, which is β1 = 0.1 (little momentum).
    """

    name = "svi"
    paper = ("Krishnan, Liang & Hoffman 2018, On the challenges of learning with inference networks "
             "on sparse, high-dimensional data")
    objective = ("decoder: L(x; λ_K), λ_K = K Adam steps of each datapoint's ELBO from λ_0; "
                 "encoder: L(x; λ_0 = encoder(x))")
    refines = True
    refines_ffg = "refines an FFG's mean and log-variance per datapoint"
    #: The settings section's dataclass, whose defaults serve when no settings are given.
    settings_class = SVIConfig

    def __init__(self, model, train_cfg, settings=None):
        if getattr(getattr(model, "family", None), "name", "ffg") != "ffg":
            raise GapbenchError(f"train.method {self.name} refines an FFG q; this model's q is "
                                f"{model.family.name!r} (set model.encoder: ffg)")
        super().__init__(model, train_cfg, self.settings_class() if settings is None else settings)

    def build_optimizers(self):
        t = self.train_cfg
        return {"encoder": torch.optim.Adam(encoder_parameters(self.model), lr=t.lr, eps=t.adam_eps),
                "decoder": torch.optim.Adam(decoder_parameters(self.model), lr=t.lr, eps=t.adam_eps)}

    # ----------------------------------------------------------------- pieces
    def trajectory(self, x: Tensor, q0, keep_samples: bool = False) -> SVITrajectory:
        """The SVI steps of this method's settings from the FFG ``q0`` (a FamilyPosterior)."""
        s = self.settings
        return svi_steps(self.model, x, q0.params["mean"], q0.params["log_var"], s.num_steps, s.lr,
                         s.num_samples, keep_samples=keep_samples)

    def encoder_objective(self, x: Tensor, q0, beta: float):
        """The encoder's ELBO [N] weighted by β (differentiable), and its plain ELBO [N] (detached)."""
        log_lik, log_ratio = elbo_terms(self.model, x, q0, self.train_cfg.num_samples)
        return (log_lik + beta * log_ratio).mean(0), (log_lik + log_ratio).mean(0).detach()

    # ----------------------------------------------------------------- the method
    def step(self, x, beta):
        q0 = self.model.posterior(x)
        refined = DiagonalGaussian(self.model.latent_dim).posterior(self.trajectory(x, q0).params)
        log_lik, log_ratio = elbo_terms(self.model, x, refined, self.train_cfg.num_samples)
        decoder_obj = (log_lik + beta * log_ratio).mean(0)  # [N]: λ_K is fixed, only θ moves
        encoder_obj, elbo = self.encoder_objective(x, q0, beta)
        self.apply_parts([(-decoder_obj.mean(), decoder_parameters(self.model)),
                          (-encoder_obj.mean(), encoder_parameters(self.model))])
        return StepResult(decoder_obj.detach(), elbo)

    def refine(self, x):
        """The FFG λ_K of each datapoint: the K SVI steps of training, from the encoder's output."""
        with torch.no_grad():
            q0 = self.model.posterior(x)
        return DiagonalGaussian(self.model.latent_dim).posterior(self.trajectory(x, q0).params)
