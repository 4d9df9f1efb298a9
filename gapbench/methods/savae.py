"""Semi-amortized VAE: the encoder's q refined by K steps of SGD with momentum, trained through them.

savae:  max_{θ,φ} L_β(x; λ_K, θ),  λ_0 = enc_φ(x),  v_{k+1} = m v_k + clip(∇_λ L_β(x; λ_k, θ)),
        λ_{k+1} = λ_k + η v_{k+1}                    (Kim, Wiseman, Miller, Sontag & Rush 2018)

λ = (mean, log_var) of a diagonal Gaussian, one per datapoint. The inner objective is the sum over
the minibatch of each datapoint's β-weighted ELBO, so every λ_i follows its own ELBO's gradient; the
clipping bounds each datapoint's gradient norm, of the mean and of the log-variance separately, at
``train.savae.max_grad_norm``. The inner gradients keep their graph, so the encoder's gradient is
the total derivative of L_β(λ_K) with respect to λ_0 (Hessian-vector products included, by
autograd), and the decoder's is the total derivative of L_β(λ_K, θ), through the steps as well.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from gapbench.methods.base import Method, StepResult
from gapbench.models.posterior import DiagonalGaussian
from gapbench.ops import log_standard_normal
from gapbench.recipe import SAVAEConfig


def ffg_elbo_terms(model, x: Tensor, mean: Tensor, log_var: Tensor, eps: Tensor) -> Tuple[Tensor, Tensor]:
    """log p(x|z) and log p(z) - log q(z) [S, N] at z = mean + exp(log_var / 2) * eps, eps [S, N, D] given."""
    z = mean + torch.exp(0.5 * log_var) * eps
    log_q = log_standard_normal(eps) - 0.5 * log_var.sum(-1)  # exact from eps, as DiagonalGaussian
    return model.log_likelihood(x, z), model.log_prior(z) - log_q


def clip_rows(g: Tensor, max_norm: Optional[float]) -> Tensor:
    """Each row of g [N, D] scaled to norm at most ``max_norm`` (None: unchanged); differentiable."""
    if max_norm is None:
        return g
    norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return g * (max_norm / norm.clamp(min=max_norm))


def unroll(model, x: Tensor, mean: Tensor, log_var: Tensor, noise: List[Tensor], beta: float, lr: float,
           momentum: float, max_grad_norm: Optional[float], create_graph: bool):
    """SGD with momentum on sum_i L_β(x_i; λ_i) from λ_0 = (mean, log_var), one step per noise tensor
    [S, N, D]. Returns λ_K = (mean, log_var) and the terms of step 0's ELBO (log p(x|z), log p(z) - log q).

    With ``create_graph`` λ_K is a differentiable function of λ_0 and of the model's parameters;
    without, each step's λ is detached (test-time refinement: no graph is kept).
    """
    params = [mean, log_var]
    velocity = [torch.zeros_like(mean), torch.zeros_like(log_var)]
    first = None
    for eps in noise:
        if not create_graph:
            params = [p.detach().requires_grad_(True) for p in params]
        log_lik, log_ratio = ffg_elbo_terms(model, x, params[0], params[1], eps)
        if first is None:
            first = (log_lik, log_ratio)
        objective = (log_lik + beta * log_ratio).mean(0).sum()
        grads = torch.autograd.grad(objective, params, create_graph=create_graph)
        velocity = [momentum * v + clip_rows(g, max_grad_norm) for v, g in zip(velocity, grads)]
        params = [p + lr * v for p, v in zip(params, velocity)]
    if not create_graph:
        params = [p.detach() for p in params]
    return params[0], params[1], first


class SAVAE(Method):
    """Semi-amortized VAE (train.savae): the ELBO at q refined from the encoder's output by
    ``num_steps`` steps of SGD with momentum, backpropagated through those steps."""

    name = "savae"
    paper = "Kim, Wiseman, Miller, Sontag & Rush 2018, Semi-Amortized Variational Autoencoders"
    objective = ("L_beta(x; lambda_K), lambda_K = K steps of SGD with momentum on L_beta from "
                 "lambda_0 = enc(x), differentiated through the steps")
    refines = True
    refines_ffg = "refines a diagonal Gaussian's mean and log-variance per datapoint"

    def __init__(self, model, train_cfg, settings=None):
        super().__init__(model, train_cfg, SAVAEConfig() if settings is None else settings)

    def _noise(self, mean: Tensor, count: int) -> List[Tensor]:
        """``count`` draws of eps [S, N, D] from torch's generator (saved with the checkpoint)."""
        shape = (self.train_cfg.num_samples,) + tuple(mean.shape)
        return [torch.randn(shape, device=mean.device, dtype=mean.dtype) for _ in range(count)]

    def _unroll(self, x, mean, log_var, beta, create_graph):
        s = self.settings
        return unroll(self.model, x, mean, log_var, self._noise(mean, s.num_steps), beta, s.lr, s.momentum,
                      s.max_grad_norm, create_graph)

    def step(self, x, beta):
        params = self.model.encode(x)
        mean, log_var, (lik0, ratio0) = self._unroll(x, params["mean"], params["log_var"], beta, create_graph=True)
        (eps,) = self._noise(mean, 1)
        log_lik, log_ratio = ffg_elbo_terms(self.model, x, mean, log_var, eps)
        obj = (log_lik + beta * log_ratio).mean(0)
        self.apply(-obj.mean())
        return StepResult(obj.detach(), (lik0 + ratio0).mean(0).detach())

    def refine(self, x):
        """q after ``num_steps`` steps from the encoder's output on the ELBO (β = 1), as in training."""
        with torch.no_grad():
            params = self.model.encode(x)
        with torch.enable_grad():
            mean, log_var, _ = self._unroll(x, params["mean"], params["log_var"], 1.0, create_graph=False)
        return DiagonalGaussian(mean.shape[-1]).posterior({"mean": mean, "log_var": log_var}, x.shape[0])
