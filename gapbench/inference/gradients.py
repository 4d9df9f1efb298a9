"""log p(x, z) and its gradient in z, with a hand-derived backward pass where the model allows one.

AIS and HMC need grad_z log p(x, z) at every leapfrog step and the value only at
the end of a trajectory. For the
models of Cremer et al. (an MLP decoder with one pointwise activation and
Bernoulli pixels) the backward pass is short enough to write out:

    l = W_L h_{L-1} + b_L,  h_k = act(W_k h_{k-1} + b_k),  h_0 = z
    log p(x|z) = sum_p x_p l_p - softplus(l_p)
    d log p / d l = x - sigmoid(l),  d/d h_{k-1} = (d/d h_k * act'(h_k)) W_k

with act' read off the stored outputs h_k. Compared with autograd on the same
model it skips the graph bookkeeping, the softplus of the value when the value
is not asked for, and the prior's graph (grad log N(z; 0, I) = -z). Every other
model goes through autograd. A model opts in by returning its decoder from
``mlp_decoder()`` (see :func:`mlp_decoder`).
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gapbench.inference._common import log_joint
from gapbench.ops import log_standard_normal

def _elu_(a: Tensor) -> Tensor:
    """ELU (alpha 1), overwriting a: max(a, 0) + exp(min(a, 0)) - 1, ~1.7x faster than F.elu on a CPU."""
    positive = a.clamp(min=0.0)
    return a.clamp_(max=0.0).exp_().sub_(1.0).add_(positive)


ACTIVATION_NAMES = ("elu", "relu", "tanh", "softplus")
_ACT_FN = {"elu": _elu_, "relu": F.relu, "tanh": torch.tanh, "softplus": F.softplus}


def mlp_decoder(model) -> Optional[Tuple[List[Tuple[Tensor, Tensor]], str]]:
    """The model's decoder as ([(weight [out, in], bias [out]), ...], activation), or None.

    A model opts in by defining ``mlp_decoder()`` returning that pair when (and only
    when) p(x|z) is Bernoulli with logits = the MLP's last layer, the prior is
    N(0, I) and the activation is one of ACTIVATION_NAMES.
    """
    fn = getattr(model, "mlp_decoder", None)
    spec = fn() if callable(fn) else None
    if spec is None:
        return None
    layers, activation = spec
    if activation not in _ACT_FN or not layers:
        return None
    return spec


def _act_grad(h: Tensor, activation: str) -> Tensor:
    """act'(a) from the output h = act(a), for the activations of ACTIVATION_NAMES."""
    if activation == "elu":  # a > 0 <=> h > 0; for a <= 0, act'(a) = exp(a) = h + 1
        return h.clamp(max=0.0).add_(1.0)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "tanh":
        return 1.0 - h * h
    return -torch.expm1(-h)  # softplus: sigmoid(a) = 1 - exp(-h)


def flat_data(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x [N, ...] as [N, P] in ``dtype``, the layout of :func:`mlp_log_joint_and_grad`."""
    return x.reshape(x.shape[0], -1).to(dtype)


def value_and_grad(fn, z: Tensor) -> Tuple[Tensor, Tensor]:
    """(fn(z), grad_z of fn(z).sum()) by autograd, both without a graph: [...] and z's shape."""
    z1 = z.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fn(z1)
        (grad,) = torch.autograd.grad(value.sum(), z1)
    return value.detach(), grad


def log_joint_and_grad(model, x: Tensor, z: Tensor, need_value: bool = True) -> Tuple[Optional[Tensor], Tensor]:
    """(log p(x, z) [S, N] or None, grad_z log p(x, z) [S, N, D]) for z [S, N, D]; no graph is kept.

    Hand-derived for models with :func:`mlp_decoder`, autograd otherwise. With
    ``need_value=False`` the value is not computed where that saves time (None is returned).
    """
    return joint_density(model, x)(z, need_value)


def joint_density(model, x: Tensor):
    """(z, need_value) -> :func:`log_joint_and_grad` (model, x, z, need_value), with the model's
    decoder looked up once: for loops that evaluate the same model and data many times."""
    spec = mlp_decoder(model)
    if spec is None:
        return partial(_autograd_log_joint_and_grad, model, x)
    layers, activation = spec
    return partial(mlp_log_joint_and_grad, layers, activation, flat_data(x, layers[-1][0].dtype))


class _MLPLogJoint(torch.autograd.Function):
    """log p(x, z) [S, N] whose backward in z is the hand-derived gradient, computed in the forward pass."""

    @staticmethod
    def forward(ctx, z, x_flat, layers, activation):
        value, grad = mlp_log_joint_and_grad(layers, activation, x_flat, z, True)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        (grad,) = ctx.saved_tensors
        return grad_value.unsqueeze(-1) * grad, None, None, None


def log_joint_in_z(model):
    """(x, z) -> log p(x, z) [S, N], differentiable in z only: for fits of q's parameters.

    For models with :func:`mlp_decoder` the gradient is the hand-derived one, computed with
    the value (no autograd graph through the decoder: ~10% of a local flow step); no gradient
    reaches the model's own parameters. Other models go through autograd (:func:`log_joint`).
    """
    spec = mlp_decoder(model)
    if spec is None:
        return partial(log_joint, model)
    layers, activation = spec
    dtype = layers[-1][0].dtype
    return lambda x, z: _MLPLogJoint.apply(z, flat_data(x, dtype), layers, activation)


def point_major_joint(model):
    """(x [N, ...], z [N, S, D]) -> (log p(x, z) [N, S], its gradient in z [N, S, D]), no graph kept:
    :func:`log_joint_and_grad` for point-major samples (each datapoint's S samples contiguous), the
    layout of a local flow fit's hand-derived gradient (``AuxiliaryFlow.path_elbo_and_grad``)."""
    spec = mlp_decoder(model)
    if spec is None:
        def joint(x, z):
            value, grad = _autograd_log_joint_and_grad(model, x, z.transpose(0, 1))
            return value.transpose(0, 1), grad.transpose(0, 1)
        return joint
    layers, activation = spec
    dtype = layers[-1][0].dtype
    # The MLP's arithmetic is row-wise: point-major z [N, S, D] runs as it is, x broadcast over S.
    return lambda x, z: mlp_log_joint_and_grad(layers, activation, flat_data(x, dtype).unsqueeze(1), z)


def _autograd_log_joint_and_grad(model, x: Tensor, z: Tensor, need_value: bool = True) -> Tuple[Tensor, Tensor]:
    return value_and_grad(partial(log_joint, model, x), z)


def mlp_log_joint_and_grad(
    layers: List[Tuple[Tensor, Tensor]], activation: str, x_flat: Tensor, z: Tensor, need_value: bool = True
) -> Tuple[Optional[Tensor], Tensor]:
    """:func:`log_joint_and_grad` for an MLP decoder given as tensors (see :func:`mlp_decoder`).

    layers [(weight [out, in], bias [out]), ...], x_flat [N, P] in z's dtype, z [S, N, D] (or
    z [N, S, D] with x_flat [N, 1, P]: every row is its own sample).
    A pure function of tensors, which ``torch.compile`` can trace whole.
    """
    act = _ACT_FN[activation]
    num_samples, num_points, dim = z.shape
    with torch.no_grad():
        h = z.reshape(num_samples * num_points, dim)
        hidden = []
        for weight, bias in layers[:-1]:
            h = act(F.linear(h, weight, bias))
            hidden.append(h)
        weight, bias = layers[-1]
        logits = F.linear(h, weight, bias)  # [S * N, P]
        # The sums over pixels that involve x run through the last layer once per datapoint, not per
        # sample: sum_p x_p l_p = h . (x W) + x . b, and (x - sigmoid(l)) W = x W - sigmoid(l) W. That
        # spares three passes over the [S * N, P] logits (x * l, the difference, x - sigmoid(l)).
        x_w = x_flat @ weight  # [N, H] (or [N, 1, H])
        value = None
        if need_value:
            x_l = (h.reshape(num_samples, num_points, -1) * x_w).sum(-1) + x_flat @ bias  # sum_p x_p l_p
            value = log_standard_normal(z) + x_l - F.softplus(logits).sum(-1).reshape(num_samples, num_points)
        g = (x_w - (logits.sigmoid_() @ weight).reshape(num_samples, num_points, -1))  # (x - sigmoid(l)) W
        g = g.reshape(num_samples * num_points, -1)
        for (weight, _), h in zip(reversed(layers[:-1]), reversed(hidden)):
            g = g.mul_(_act_grad(h, activation)) @ weight
        grad = g.reshape(num_samples, num_points, dim) - z
    return value, grad
