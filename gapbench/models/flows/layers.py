"""Batched building blocks: one small network per datapoint, run as one tensor computation.

A flow's parameters have a leading dimension of N (a separate network for each
datapoint: a local fit) or 1 (one network shared by every datapoint: an
amortized posterior). :func:`batched_linear` multiplies [S, N, I] inputs by
[N, I, O] weights with a single batched matmul, and by [1, I, O] weights with a
single ordinary matmul, so N local flows never need a Python loop.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Params = Dict[str, Tensor]


def batched_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y[s, n] = x[s, n] @ weight[n] + bias[n], broadcasting a leading dim of 1.

    x: [S, N, I] (or [S, 1, I]); weight: [N, I, O] or [1, I, O]; bias: [N, O] or [1, O].
    Returns [S, N, O].
    """
    if weight.shape[0] == 1:
        y = x @ weight[0]  # one [S*N, I] x [I, O] product
    else:
        y = torch.matmul(x.transpose(0, 1), weight).transpose(0, 1)  # N products [S, I] x [I, O]
    return y if bias is None else y + bias


def point_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`batched_linear` for point-major inputs: y[n, s] = x[n, s] @ weight[n] + bias[n].

    x: [N, S, I] (or [N, 1, I]); weight: [N, I, O] or [1, I, O]; bias: [N, O] or [1, O].
    Returns [N, S, O]. Each datapoint's S rows are contiguous, so N networks are one batched
    matmul with the bias added in the same call, and no transposes or copies are needed.
    """
    if weight.shape[0] == 1:
        y = x @ weight[0]
        return y if bias is None else y + bias.unsqueeze(1)
    if bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(bias.unsqueeze(1), x, weight)


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """bound * tanh(x / bound): the identity near 0, smoothly limited to (-bound, bound)."""
    return bound * torch.tanh(x / bound)


def _uniform(shape: Tuple[int, ...], bound: float, device, dtype, generator) -> Tensor:
    if generator is None:
        return (torch.rand(shape, device=device, dtype=dtype) * 2.0 - 1.0) * bound
    sample = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    return ((sample * 2.0 - 1.0) * bound).to(device=device)


class ConditionerNet:
    """A one-hidden-layer MLP whose weights are entries of a parameter dict.

        y = W1 elu(W0 x + Wc c + b0) + b1,   x [S, N, I], context c [N, C] -> y [S, N, O]

    Keys: ``{prefix}_w0`` [*, I, H], ``{prefix}_b0`` [*, H], ``{prefix}_w1`` [*, H, O],
    ``{prefix}_b1`` [*, O], and ``{prefix}_wc`` [*, C, H] when C > 0; * is N or 1.
    The output layer starts at zero, so a new network outputs exactly 0.
    """

    def __init__(self, prefix: str, in_dim: int, out_dim: int, hidden: int, context_dim: int = 0):
        self.prefix, self.in_dim, self.out_dim = prefix, in_dim, out_dim
        self.hidden, self.context_dim = hidden, context_dim

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        p, shapes = self.prefix, {}
        shapes[f"{p}_w0"] = (self.in_dim, self.hidden)
        if self.context_dim:
            shapes[f"{p}_wc"] = (self.context_dim, self.hidden)
        shapes[f"{p}_b0"] = (self.hidden,)
        shapes[f"{p}_w1"] = (self.hidden, self.out_dim)
        shapes[f"{p}_b1"] = (self.out_dim,)
        return shapes

    def init_params(self, num_points: int, device=None, dtype=torch.float32, generator=None) -> Params:
        """Hidden layer ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's Linear default), output layer 0.

        Random numbers come from ``generator`` when given, else from torch's global RNG.
        """
        bound = 1.0 / math.sqrt(max(self.in_dim + self.context_dim, 1))
        params = {}
        for key, shape in self.param_shapes().items():
            shape = (num_points,) + shape
            if key.endswith(("_w0", "_wc", "_b0")):
                params[key] = _uniform(shape, bound, device, dtype, generator)
            else:
                params[key] = torch.zeros(shape, device=device, dtype=dtype)
        return params

    def __call__(self, params: Params, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """The network on sample-major inputs: x [S, N, I], context [N, C] -> [S, N, O]."""
        return self.points(params, x.transpose(0, 1), context).transpose(0, 1)

    def points(self, params: Params, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """The same network on point-major inputs: x [N, S, I], context [N, C] -> [N, S, O]."""
        return self.points_and_hidden(params, x, context)[0]

    def points_and_hidden(self, params: Params, x: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """:meth:`points` and the hidden layer's pre-activation [N, S, H], for :meth:`replay`."""
        p = self.prefix
        pre = point_linear(x, params[f"{p}_w0"], params[f"{p}_b0"])  # [N, S, H]
        if self.context_dim:
            if context is None:
                raise ValueError(f"network {p!r} needs a context vector of size {self.context_dim}")
            pre = pre + point_linear(context.unsqueeze(1), params[f"{p}_wc"])  # [N, 1, H]
        return point_linear(F.elu(pre), params[f"{p}_w1"], params[f"{p}_b1"]), pre  # [N, S, O]

    def replay(self, params: Params, x: Tensor, output: Tensor, pre: Tensor) -> Tensor:
        """The network at x [N, S, I] with its parameters held fixed, when x equals (up to rounding) an
        input it has already seen with the same parameters: ``output`` and ``pre`` are what
        :meth:`points_and_hidden` gave there. Returns ``output`` itself, and in the backward pass the
        gradient in x through the network's Jacobian at that point, without running it again."""
        return _Replay.apply(x, output.detach(), pre.detach(), params[f"{self.prefix}_w0"].detach(),
                             params[f"{self.prefix}_w1"].detach())


class _Replay(torch.autograd.Function):
    """y = W1 elu(W0 x + ...) at a point already evaluated: its value, and x's gradient by the chain rule."""

    @staticmethod
    def forward(ctx, x, output, pre, w0, w1):
        ctx.save_for_backward(pre, w0, w1)
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        pre, w0, w1 = ctx.saved_tensors
        # times elu'(pre) (1 for pre > 0, exp(pre) below), in the one kernel autograd's own ELU uses
        grad_hidden = torch.ops.aten.elu_backward(point_linear(grad_output, w1.transpose(1, 2)), 1.0, 1.0, 1.0,
                                                  False, pre)
        return point_linear(grad_hidden, w0.transpose(1, 2)), None, None, None, None
