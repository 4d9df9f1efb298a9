"""Iterative amortized inference (Marino, Yue & Mandt 2018): a learned update of q's parameters.

An update network f_ψ maps the parameters λ = (mean, log_var) of the diagonal Gaussian q and the
gradient of their ELBO to new parameters, by a gated (highway) update:

    λ_{t+1} = g ⊙ λ_t + (1 − g) ⊙ δ,   (g, δ) = f_ψ(λ_t, ∇_λ L(λ_t)),   λ_0 = the encoder's output.

The encoder and f_ψ maximize Σ_{t=0}^{T} L(λ_t) (each update trained on the ELBO it reaches, with
λ_t and its gradient taken as fixed inputs, as in the authors' code), the decoder L(λ_T). At test
time :meth:`Iterative.refine` applies the T learned updates to the encoder's q.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from gapbench.methods.base import Method, StepResult, decoder_parameters, elbo_terms, encoder_parameters

#: The name of the update network in ``model.method_modules`` (an "encoder..." name: q's parameters).
UPDATE_KEY = "encoder_iterative_update"
#: Bounds of the updated log-variance (the authors' code clamps it to [-15, 5]).
LOG_VAR_MIN, LOG_VAR_MAX = -15.0, 5.0
#: The constant inside log|g| of the "log_sign" encoding (log(|g| + 1e-5) in the authors' code).
LOG_GRAD_EPS = 1e-5


def encode_inputs(mean: Tensor, log_var: Tensor, grad_mean: Tensor, grad_log_var: Tensor, kind: str) -> Tensor:
    """The update network's input [N, K·D] from λ and ∇_λ L, all [N, D].

    log_sign:   (log(|∇| + 1e-5), sign ∇, mean, log_var)                     K = 6
    layer_norm: each of ∇_mean, ∇_log_var, mean, log_var standardized over its D units   K = 4
    """
    if kind == "log_sign":
        grads = torch.cat([grad_mean, grad_log_var], dim=-1)
        return torch.cat([torch.log(grads.abs() + LOG_GRAD_EPS), torch.sign(grads), mean, log_var], dim=-1)
    if kind == "layer_norm":
        parts = [grad_mean, grad_log_var, mean, log_var]
        return torch.cat([nn.functional.layer_norm(p, p.shape[-1:], eps=1e-5) for p in parts], dim=-1)
    raise ValueError(f"unknown gradient encoding {kind!r}; choose 'log_sign' or 'layer_norm'")


class HighwayMLP(nn.Module):
    """h_1 = s_1 ⊙ W_0 x + (1 − s_1) ⊙ φ(W_1 x),  h_k = s_k ⊙ h_{k−1} + (1 − s_k) ⊙ φ(W_k h_{k−1});
    s_k = sigmoid gates of the layer's input, φ = ELU (the authors' 'highway' connections)."""

    def __init__(self, in_dim: int, hidden: int, num_layers: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.gates = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.act = nn.ELU()

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for k, (layer, gate) in enumerate(zip(self.layers, self.gates)):
            s = torch.sigmoid(gate(h))
            carry = self.embed(h) if k == 0 else h
            h = s * carry + (1 - s) * self.act(layer(h))
        return h


class UpdateNetwork(nn.Module):
    """f_ψ: (λ, ∇_λ L) -> λ' by a gated update of each of mean and log_var (log_var clamped to [-15, 5])."""

    def __init__(self, latent_dim: int, hidden: int = 512, num_layers: int = 2, encoding: str = "log_sign"):
        super().__init__()
        self.encoding = encoding
        in_dim = (6 if encoding == "log_sign" else 4) * latent_dim
        self.body = HighwayMLP(in_dim, hidden, num_layers)
        self.mean_out, self.log_var_out = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)
        self.mean_gate, self.log_var_gate = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)

    def forward(self, mean: Tensor, log_var: Tensor, grad_mean: Tensor, grad_log_var: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.body(encode_inputs(mean, log_var, grad_mean, grad_log_var, self.encoding))
        g_mean, g_log_var = torch.sigmoid(self.mean_gate(h)), torch.sigmoid(self.log_var_gate(h))
        new_mean = g_mean * mean + (1 - g_mean) * self.mean_out(h)
        new_log_var = g_log_var * log_var + (1 - g_log_var) * self.log_var_out(h)
        return new_mean, new_log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)


def _settings(settings):
    if settings is None:
        from gapbench.recipe import IterativeConfig

        return IterativeConfig()
    return settings


class Iterative(Method):
    name = "iterative"
    paper = "Marino, Yue & Mandt 2018, Iterative Amortized Inference"
    objective = ("encoder and update network: sum_{t=0..T} L(lambda_t), lambda_{t+1} = f(lambda_t, grad L(lambda_t)); "
                 "decoder: L(lambda_T)")
    refines = True
    refines_ffg = "learns an update of a diagonal Gaussian's mean and log-variance"

    def __init__(self, model, train_cfg, settings=None):
        super().__init__(model, train_cfg, _settings(settings))

    @classmethod
    def prepare_model(cls, model, settings) -> None:
        s = _settings(settings)
        if getattr(model, "method_modules", None) is None:
            model.method_modules = nn.ModuleDict()
        model.method_modules[UPDATE_KEY] = UpdateNetwork(model.latent_dim, s.hidden, s.num_layers, s.gradient_encoding)

    @property
    def update(self) -> UpdateNetwork:
        return self.model.method_modules[UPDATE_KEY]

    def trajectory(self, x: Tensor, beta: float = 1.0, num_samples: int = 1,
                   create_graph: bool = True) -> Tuple[List[Tensor], List[Tuple[Tensor, Tensor]], Tensor]:
        """The T + 1 objectives [N] (log p(x|z) + β (log p(z) − log q(z)), averaged over ``num_samples``
        samples), the parameters λ_t = (mean, log_var) of each, and the encoder's ELBO [N] (β = 1).

        ``create_graph`` False: λ_t carries no graph to the encoder or the update network, and the last
        objective is not computed (test time).
        """
        model = self.model
        with torch.set_grad_enabled(create_graph):
            params = model.encode(x)
        mean, log_var = params["mean"], params["log_var"]
        objectives, lambdas = [], []
        elbo0 = None
        for t in range(self.settings.num_steps + 1):
            if t == self.settings.num_steps and not create_graph:
                lambdas.append((mean, log_var))
                break
            if not mean.requires_grad:  # a frozen encoder or test time: a leaf, so its ELBO has a gradient
                mean = mean.detach().requires_grad_()
            if not log_var.requires_grad:
                log_var = log_var.detach().requires_grad_()
            q = model.family.posterior({"mean": mean, "log_var": log_var}, num_points=x.shape[0])
            log_lik, log_ratio = elbo_terms(model, x, q, num_samples)
            obj = (log_lik + beta * log_ratio).mean(0)
            if t == 0:
                elbo0 = (log_lik + log_ratio).mean(0).detach()
            objectives.append(obj)
            lambdas.append((mean, log_var))
            if t == self.settings.num_steps:
                break
            # ∇_λ L(λ_t) per datapoint: each datapoint's objective depends on its own λ only.
            grad_mean, grad_log_var = torch.autograd.grad(obj.sum(), (mean, log_var), retain_graph=create_graph)
            mean_in, log_var_in = mean.detach(), log_var.detach()
            if create_graph:
                mean, log_var = self.update(mean_in, log_var_in, grad_mean, grad_log_var)
            else:
                with torch.no_grad():
                    mean, log_var = self.update(mean_in, log_var_in, grad_mean, grad_log_var)
        return objectives, lambdas, elbo0

    def step(self, x, beta):
        objectives, _, elbo0 = self.trajectory(x, beta, self.train_cfg.num_samples)
        enc_loss = -torch.stack(objectives).sum(0).mean()
        dec_loss = -objectives[-1].mean()
        self.apply_parts([(dec_loss, decoder_parameters(self.model)), (enc_loss, encoder_parameters(self.model))])
        return StepResult(objectives[-1].detach(), elbo0)

    def refine(self, x):
        """q_λ_T: the encoder's q after the T learned updates (their gradients from train.num_samples samples)."""
        with torch.enable_grad():
            _, lambdas, _ = self.trajectory(x, 1.0, self.train_cfg.num_samples, create_graph=False)
        mean, log_var = lambdas[-1]
        return self.model.family.posterior({"mean": mean.detach(), "log_var": log_var.detach()},
                                           num_points=x.shape[0])
