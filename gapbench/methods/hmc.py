"""The decoder trained on samples of an HMC chain started at the encoder's q (Hoffman 2017).

Hoffman, "Learning deep latent Gaussian models with Markov chain Monte Carlo" (ICML 2017): for each
datapoint draw z_0 ~ q(z|x) (reparameterized), run M Hamiltonian Monte Carlo transitions (L leapfrog
steps each, a Metropolis test) that leave p(z|x) ∝ p(x, z) invariant under the decoder's current
weights, and update

    decoder:  max_θ log p_θ(x, z_M),  z_M = HMC^M(z_0) held fixed (no gradient through the chain)
    encoder:  max_φ E_{q_φ(z|x)}[log p_θ(x|z)] − β KL(q_φ(z|x) || p(z))   (its own ELBO, at z_0)

The chain's step size ε is shared by all chains and adapted between minibatches toward a target
acceptance rate: after each step, ε × 1.02 when the minibatch's mean acceptance probability is above
``train.hmc.target_acceptance``, ε × 0.98 when below. Within one chain ε is fixed, so every
transition leaves p(z|x) exactly invariant; the adapted ε is method state (kept for exact resume).

No test-time refinement (``refines = False``): q followed by M HMC transitions is a distribution of
z_M with no tractable density (it integrates over z_0, the momenta and the accept decisions), so
log q_refined(z_M), and with it an ELBO of the refined q, is not available. Auxiliary-variable bounds
(Salimans, Kingma & Welling 2015) bound that ELBO from below with a learned reverse model and would
report a looser number than the distribution deserves; the gap tables would then mix two kinds of
bound. The method's effect is measured through the decoder it trains.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from gapbench.inference.gradients import joint_density
from gapbench.inference.hmc import hmc_init, hmc_step
from gapbench.methods.base import Method, StepResult, decoder_parameters, encoder_parameters

#: Multiplicative step-size adaptation per minibatch (the rule this project's AIS uses, Wu et al. 2017).
GROW, SHRINK = 1.02, 0.98


def hmc_refine(model, x: Tensor, z: Tensor, step_size, num_steps: int, num_leapfrog: int,
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """``num_steps`` HMC transitions targeting p(z|x) ∝ p(x, z) from z [S, N, D], under the model's
    current weights; no graph is kept.

    Returns (z_M [S, N, D], mean acceptance probability per chain [S, N]). Every transition leaves
    p(z|x) invariant (Neal 2011); a trajectory whose energy is not finite is rejected.
    """
    density = joint_density(model, x)  # (z, need_value) -> (log p(x, z), grad_z)

    def target(z, need_value=True):
        log_p, grad = density(z, need_value)
        return log_p, grad, ()

    state = hmc_init(z.detach(), target)
    accept = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    for _ in range(num_steps):
        state, info = hmc_step(state, step_size, num_leapfrog, target, generator)
        accept += info.accept_prob
    return state.z, accept / num_steps


class HMC(Method):
    name = "hmc"
    paper = "Hoffman 2017, Learning deep latent Gaussian models with Markov chain Monte Carlo"
    objective = ("decoder: log p(x, z_M), z_M = M HMC transitions on p(z|x) from z_0 ~ q(z|x), held fixed; "
                 "encoder: E_q[log p(x|z)] - beta KL(q(z|x) || p(z))")
    refines = False

    def __init__(self, model, train_cfg, settings=None):
        super().__init__(model, train_cfg, settings)
        self.step_size = float(self.settings.step_size)
        self.last_acceptance: Optional[float] = None  # the last minibatch's mean acceptance probability
        self._encoder = encoder_parameters(model)
        self._decoder = decoder_parameters(model)

    @classmethod
    def check(cls, recipe):
        if recipe.train.hmc.target_acceptance >= 1:
            return ("train.hmc.target_acceptance: 1 is never exceeded, so the step size would only shrink; "
                    "set it below 1 (0.65 is HMC's optimal rate)")
        return None

    def step(self, x, beta):
        s, model = self.settings, self.model
        q = model.posterior(x)
        z0, log_q = q.sample_and_log_prob(self.train_cfg.num_samples)  # [S, N, D], [S, N]
        log_lik = model.log_likelihood(x, z0)
        log_ratio = model.log_prior(z0) - log_q
        encoder_obj = (log_lik + beta * log_ratio).mean(0)  # [N]

        z_m, accept = hmc_refine(model, x, z0, self.step_size, s.num_steps, s.num_leapfrog)
        decoder_obj = (model.log_likelihood(x, z_m) + model.log_prior(z_m)).mean(0)  # [N]

        # Each loss reaches only its own parameters: the ELBO's gradient stops at the decoder, and
        # log p(x, z_M) has no path to the encoder (z_M is a constant).
        self.apply_parts([(-encoder_obj.mean(), self._encoder), (-decoder_obj.mean(), self._decoder)])

        rate = accept.mean().item()
        self.step_size *= GROW if rate > s.target_acceptance else SHRINK
        self.last_acceptance = rate
        return StepResult(decoder_obj.detach(), (log_lik + log_ratio).mean(0).detach())

    def extra_state(self):
        return {"step_size": self.step_size}

    def load_extra_state(self, state):
        if "step_size" in state:
            self.step_size = float(state["step_size"])
