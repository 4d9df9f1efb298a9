"""The path-derivative ELBO gradient of a local auxiliary flow, written out by hand.

A local flow fit spends most of its time in one computation: S samples of the auxiliary
flow for each of N datapoints, the ELBO of each, and the path derivative of their mean
in every datapoint's own parameters (``AuxiliaryFlow.sample_and_path_log_prob`` and
autograd). Autograd records some 200 operations for it and replays them backwards, with
copies and temporaries of its own. Here the same gradient is derived once:

    f(theta) = log p(x, zT) - log q_bar(zT, vT) + log r(vT | zT),

(zT, vT) = T_theta(z0, v0) the flow of reparameterized base samples, q_bar the flow's
density with its parameters held fixed (the path derivative), r the reverse model with
its own. Then df/dtheta = a . d(zT, vT)/dtheta + (d log r / d theta_r), where the
cotangent a = d f / d(zT, vT) needs the gradient of log q_bar in (zT, vT): the couplings
inverted back to (z0, v0), whose values the forward pass already holds, so that only
their Jacobians are applied. Each network is evaluated once; its ELU derivative is kept
from the forward pass and serves both backward passes.

The values agree with ``sample_and_path_log_prob`` and the gradients with autograd on it
up to rounding (tests/models/test_hand_gradient.py compares them in float64).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from gapbench.models.flows.layers import ConditionerNet, Params
from gapbench.ops import LOG_2PI, log_standard_normal

#: (z [N, S, D], point-major) -> (log p(x, z) [N, S], its gradient in z [N, S, D]).
PointJoint = Callable[[Tensor], Tuple[Tensor, Tensor]]


def _forward(net: ConditionerNet, params: Params, inputs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(output [N, S, O], hidden [N, S, H], ELU derivative at the hidden pre-activation [N, S, H])."""
    p = net.prefix
    pre = torch.baddbmm(params[f"{p}_b0"].unsqueeze(1), inputs, params[f"{p}_w0"])
    slope = pre.clamp(max=0.0).exp_()  # ELU'(pre): 1 above 0, exp(pre) below
    hidden = pre.clamp_(min=0.0).add_(slope).sub_(1.0)  # ELU(pre) = max(pre, 0) + exp(min(pre, 0)) - 1
    return torch.baddbmm(params[f"{p}_b1"].unsqueeze(1), hidden, params[f"{p}_w1"]), hidden, slope


def _backward(net: ConditionerNet, params: Params, seen, grad_out: Tensor, grads: Optional[Params]) -> Tensor:
    """The gradient in the network's input of <grad_out, output>; with ``grads`` (a dict) also its
    gradient in the network's weights, stored there. ``seen``: (inputs, hidden, slope) of its forward."""
    p = net.prefix
    inputs, hidden, slope = seen
    grad_pre = torch.bmm(grad_out, params[f"{p}_w1"].transpose(1, 2)).mul_(slope)
    if grads is not None:
        _bmm_into(grads, f"{p}_w1", hidden.transpose(1, 2), grad_out)
        _sum_into(grads, f"{p}_b1", grad_out)
        _bmm_into(grads, f"{p}_w0", inputs.transpose(1, 2), grad_pre)
        _sum_into(grads, f"{p}_b0", grad_pre)
    return torch.bmm(grad_pre, params[f"{p}_w0"].transpose(1, 2))


def _bmm_into(grads: Dict[str, Tensor], key: str, a: Tensor, b: Tensor) -> None:
    """grads[key] = a @ b, written into the tensor already there (a view of a caller's buffer) if any."""
    if key in grads:
        torch.bmm(a, b, out=grads[key])
    else:
        grads[key] = torch.bmm(a, b)


def _sum_into(grads: Dict[str, Tensor], key: str, t: Tensor) -> None:
    """grads[key] = t summed over the samples (dim 1), likewise."""
    if key in grads:
        torch.sum(t, 1, out=grads[key])
    else:
        grads[key] = t.sum(1)


def _soft_clamp_grad(clamped: Tensor, bound: float) -> Tensor:
    """d/dx of bound * tanh(x / bound), from its value: 1 - (value / bound)^2."""
    return 1.0 - (clamped / bound) ** 2


def path_elbo_and_grad(flow, params: Params, num_samples: int, joint: PointJoint,
                       log_scale_bound: float, aux_log_var_bound: float,
                       out: Optional[Params] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(ELBO samples [S, N], gradient of the loss -(1/S) sum_s ELBO_s in each parameter [N, ...]).

    ``flow``: an AuxiliaryFlow without a context; ``params``: its per-datapoint parameters (leading
    dimension N); ``joint``: log p(x, z) and its gradient in z, point-major; the bounds: those of
    the couplings' log-scales and of the auxiliary log-variances. The noise is drawn as
    ``sample_and_path_log_prob`` draws it, so under the same seed both see the same samples.
    ``out``: tensors [N, ...] per parameter (e.g. views of one [N, P] buffer) that receive the gradient,
    which is then returned in them.
    """
    n = params["mean"].shape[0]
    eps_z, eps_v = (flow._point_major(e) for e in flow._noise(params, num_samples, n))  # [N, S, D], [N, S, A]
    half_log_var = 0.5 * params["log_var"].unsqueeze(1)
    sd = torch.exp(half_log_var)
    z = params["mean"].unsqueeze(1) + sd * eps_z  # z0

    # Forward: q(v0 | z0), the couplings, r(vT | zT); every network's (inputs, hidden, slope) kept.
    net_out, *q_seen = _forward(flow.q_v, params, z)
    q_seen = (z, *q_seen)
    mean_v, raw = net_out.chunk(2, dim=-1)
    log_var_v = aux_log_var_bound * torch.tanh(raw / aux_log_var_bound)
    sd_v = torch.exp(0.5 * log_var_v)
    v = mean_v + sd_v * eps_v  # v0
    couplings = [t.net for t in flow.transform.transforms]
    seen: List[tuple] = []  # per coupling: (network's forward, updated variable before, dlog-scale/draw, scale)
    log_det = None
    for k, net in enumerate(couplings):
        src = z if k % 2 == 0 else v  # even couplings update v from z, odd ones z from v
        net_out, *hidden = _forward(net, params, src)
        raw_scale, shift = net_out.chunk(2, dim=-1)
        log_scale = log_scale_bound * torch.tanh(raw_scale / log_scale_bound)
        scale = torch.exp(log_scale)
        before = v if k % 2 == 0 else z
        after = torch.addcmul(shift, before, scale)
        if k % 2 == 0:
            v = after
        else:
            z = after
        seen.append(((src, *hidden), before, _soft_clamp_grad(log_scale, log_scale_bound), scale))
        log_det = log_scale.sum(-1) if log_det is None else log_det + log_scale.sum(-1)
    net_out, *r_seen = _forward(flow.r_v, params, z)
    r_seen = (z, *r_seen)
    mean_r, raw = net_out.chunk(2, dim=-1)
    log_var_r = aux_log_var_bound * torch.tanh(raw / aux_log_var_bound)
    precision_r = torch.exp(-log_var_r)
    resid_r = (v - mean_r) * precision_r  # (vT - mean_r) / var_r
    log_r = -0.5 * (LOG_2PI + log_var_r + (v - mean_r) * resid_r).sum(-1)
    log_q = (log_standard_normal(eps_z) - half_log_var.sum(-1) + log_standard_normal(eps_v)
             - 0.5 * log_var_v.sum(-1) - log_det - log_r)
    log_p, grad_p = joint(z)  # [N, S], [N, S, D]
    elbo = log_p - log_q  # [N, S]

    # d log q_bar / d(zT, vT): back through the inverse couplings to (z0, v0), parameters held fixed.
    eps_v_sd = eps_v / sd_v
    dlog_var_v = _soft_clamp_grad(log_var_v, aux_log_var_bound)  # d log_var_v / d its raw output
    grad_raw_v = (0.5 * eps_v * eps_v - 0.5) * dlog_var_v
    c_z = _backward(flow.q_v, params, q_seen, torch.cat([eps_v_sd, grad_raw_v], dim=-1), None).sub_(eps_z / sd)
    c_v = -eps_v_sd
    for k, net in enumerate(couplings):
        hidden, before, dlog_scale, scale = seen[k]
        c_out = c_v if k % 2 == 0 else c_z  # the cotangent of the variable this coupling updates, at its input
        c_new = c_out / scale
        grad_scale = (c_out * before + 1.0).neg_().mul_(dlog_scale)
        c_in = _backward(net, params, hidden, torch.cat([grad_scale, c_new.neg()], dim=-1), None)
        if k % 2 == 0:
            c_v, c_z = c_new, c_z + c_in
        else:
            c_z, c_v = c_new, c_v + c_in

    # The loss's cotangent at (zT, vT), and r's own gradient: loss = -(1/S) sum_s f_s.
    grads: Dict[str, Tensor] = dict(out) if out is not None else {}
    w = -1.0 / num_samples
    grad_out_r = torch.cat([resid_r, (0.5 * (v - mean_r) * resid_r - 0.5)
                            * _soft_clamp_grad(log_var_r, aux_log_var_bound)], dim=-1).mul_(w)
    a_z = _backward(flow.r_v, params, r_seen, grad_out_r, grads).add_(grad_p.sub_(c_z), alpha=w)
    a_v = c_v.add_(resid_r).mul_(-w)

    # Back through the couplings with their parameters, to (z0, v0), then q(v0 | z0) and the base.
    for k in reversed(range(len(couplings))):
        hidden, before, dlog_scale, scale = seen[k]
        a_out = a_v if k % 2 == 0 else a_z
        grad_scale = (a_out * before * scale).mul_(dlog_scale)
        a_in = _backward(couplings[k], params, hidden, torch.cat([grad_scale, a_out], dim=-1), grads)
        if k % 2 == 0:
            a_v, a_z = a_out * scale, a_z + a_in
        else:
            a_z, a_v = a_out * scale, a_v + a_in
    grad_raw_v = (a_v * eps_v * sd_v).mul_(dlog_var_v).mul_(0.5)
    a_z = a_z + _backward(flow.q_v, params, q_seen, torch.cat([a_v, grad_raw_v], dim=-1), grads)
    _sum_into(grads, "mean", a_z)
    _sum_into(grads, "log_var", a_z.mul_(eps_z).mul_(sd))
    grads["log_var"].mul_(0.5)
    return elbo.transpose(0, 1), grads
