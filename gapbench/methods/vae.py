"""The amortized baselines: the VAE's ELBO and the IWAE bound, maximized jointly over encoder and decoder.

vae:  max_{θ,φ} E_{q_φ(z|x)}[log p_θ(x|z)] − β KL(q_φ(z|x) || p(z))      (Kingma & Welling 2014)
iwae: max_{θ,φ} E[log (1/k) Σ_i p_θ(x, z_i) / q_φ(z_i|x)],  z_i ~ q_φ      (Burda et al. 2016)
"""

from __future__ import annotations

from torch import Tensor

from gapbench.methods.base import Method, StepResult, elbo_terms
from gapbench.models.posterior import BatchRowsPosterior
from gapbench.ops import logmeanexp


class VAE(Method):
    name = "vae"
    paper = "Kingma & Welling 2014, Auto-Encoding Variational Bayes"
    objective = "E_q[log p(x|z)] - beta KL(q(z|x) || p(z)), train.num_samples samples"
    data_parallel = True

    def bound(self, log_lik: Tensor, log_ratio: Tensor, beta: float) -> Tensor:
        """The per-datapoint objective [N] from log p(x|z) and log p(z) - log q(z), both [S, N]."""
        return (log_lik + beta * log_ratio).mean(0)

    def step(self, x, beta):
        q = self.model.posterior(x)
        if self.share is not None:  # x is rows of a global batch: draw the noise one process would
            q = BatchRowsPosterior(q, self.share.total, self.share.start)
        log_lik, log_ratio = elbo_terms(self.model, x, q, self.train_cfg.num_samples)
        obj = self.bound(log_lik, log_ratio, beta)
        self.apply(-self.batch_mean(obj))
        return StepResult(obj.detach(), (log_lik + log_ratio).mean(0).detach())


class IWAE(VAE):
    name = "iwae"
    paper = "Burda, Grosse & Salakhutdinov 2016, Importance Weighted Autoencoders"
    objective = "log (1/k) sum_i p(x, z_i) / q(z_i|x), k = train.num_samples"

    def bound(self, log_lik, log_ratio, beta):
        return logmeanexp(log_lik + log_ratio, dim=0)  # no warm-up: train.py passes beta = 1
