"""The auxiliary-variable flow of Cremer et al. (2018) / Ranganath et al. (2016).

An auxiliary v in R^A rides along with z in R^D:

    z0 ~ N(mean, diag(exp(log_var))),   v0 ~ q(v0 | z0, h)
    for each step:  v <- v * exp(s1(z)) + t1(z);   z <- z * exp(s2(v)) + t2(v)
    r(vT | zT, h): a Gaussian "reverse model"

log q(zT) is intractable; the family returns, for each sample,

    log q(z0) + log q(v0|z0) - sum log|det| - log r(vT|zT)

whose expectation over v is log q(zT) + KL(q(vT|zT) || r(vT|zT)) >= log q(zT), so
an ELBO computed with it is a lower bound on the true ELBO (``exact_log_prob`` is False).
h is an optional context [N, C]: the encoder's features h(x) when amortized, or a
free per-datapoint tensor when fitted locally.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from gapbench.models.flows.base import FlowFamily, _check_positive
from gapbench.models.flows.hand_gradient import path_elbo_and_grad
from gapbench.models.flows.layers import ConditionerNet, Params, soft_clamp
from gapbench.models.flows.transforms import MAX_LOG_SCALE, AffineCoupling, CompositeTransform
from gapbench.ops import log_normal, log_standard_normal

#: Soft bound on the log-variances of q(v0|z0) and r(vT|zT).
MAX_AUX_LOG_VAR = 6.0


class AuxiliaryFlow(FlowFamily):
    """Auxiliary-variable flow (the paper's "Flow" q); log q is a per-sample upper bound.

    params: ``mean``, ``log_var`` [N|1, D]; ``context`` [N, C] when ``context_dim`` > 0;
    weights of q(v0|z0,h) (``qv_*``), r(vT|zT,h) (``rv_*``) and the couplings
    (``s{k}v_*`` updating v from z, ``s{k}z_*`` updating z from v), each [N|1, ...].
    At initialization the couplings are the identity and q(v|z) = r(v|z) = N(0, I),
    so the bound equals log N(z; mean, var) exactly.
    """

    name = "flow"
    exact_log_prob = False

    def __init__(
        self,
        latent_dim: int,
        num_flow_steps: int = 2,
        flow_hidden: int = 100,
        aux_dim: Optional[int] = None,
        context_dim: int = 0,
    ):
        super().__init__(latent_dim, num_flow_steps, flow_hidden)
        self.aux_dim = latent_dim if aux_dim is None else _check_positive("aux_dim", aux_dim)
        if isinstance(context_dim, bool) or int(context_dim) != context_dim or context_dim < 0:
            raise ValueError(f"context_dim must be a non-negative integer, got {context_dim!r}")
        self.context_dim = int(context_dim)
        d, a, hidden = latent_dim, self.aux_dim, self.flow_hidden
        self.q_v = ConditionerNet("qv", d, 2 * a, hidden, self.context_dim)
        self.r_v = ConditionerNet("rv", d, 2 * a, hidden, self.context_dim)
        steps = []
        for k in range(self.num_flow_steps):  # features: [z (D), v (A)]
            steps.append(AffineCoupling(d + a, range(d, d + a), f"s{k}v", hidden))  # v from z
            steps.append(AffineCoupling(d + a, range(d), f"s{k}z", hidden))  # z from v
        self.transform = CompositeTransform(steps)

    def init_flow_params(self, num_points, device=None, dtype=torch.float32, generator=None) -> Params:
        params = self.q_v.init_params(num_points, device, dtype, generator)
        params.update(self.r_v.init_params(num_points, device, dtype, generator))
        params.update(self.transform.init_params(num_points, device, dtype, generator))
        return params

    def init_params(self, num_points, init=None, device=None, dtype=torch.float32, generator=None) -> Params:
        """As :meth:`FlowFamily.init_params`, plus a zero ``context`` [N, C] when C > 0."""
        params = super().init_params(num_points, init, device, dtype, generator)
        if self.context_dim:
            params["context"] = params["mean"].new_zeros(num_points, self.context_dim)
        return params

    def _gaussian(self, net: ConditionerNet, params: Params, z: Tensor, record=None, replay=None):
        """Mean and bounded log-variance [N, S, A] of q(v|z) or r(v|z) at point-major z [N, S, D].

        ``record``: a list to which the network's (output, pre-activation) is appended; ``replay``:
        such a pair, from the same parameters at the same z, to reuse (see ConditionerNet.replay)."""
        mean, raw_log_var = self._net(net, params, z, params.get("context"), record, replay).chunk(2, dim=-1)
        return mean, soft_clamp(raw_log_var, MAX_AUX_LOG_VAR)

    @staticmethod
    def _net(net: ConditionerNet, params: Params, x: Tensor, context=None, record=None, replay=None) -> Tensor:
        if replay is not None:
            return net.replay(params, x, *replay)
        if record is None:
            return net.points(params, x, context)
        output, pre = net.points_and_hidden(params, x, context)
        record.append((output, pre))
        return output

    # The flow's arithmetic runs point-major ([N, S, F]: each datapoint's samples contiguous), on z
    # and v held apart: every per-datapoint network is then one baddbmm, and the couplings need no
    # concatenation or splitting. Its results are those of ``self.transform`` on [z, v].

    def _scale_shift(self, k: int, params: Params, inputs: Tensor, record=None, replay=None) -> Tuple[Tensor, Tensor]:
        raw = self._net(self.transform.transforms[k].net, params, inputs, None, record, replay)
        raw_scale, shift = raw.chunk(2, dim=-1)
        return soft_clamp(raw_scale, MAX_LOG_SCALE), shift

    def _flow(self, params: Params, z: Tensor, v: Tensor, record=None) -> Tuple[Tensor, Tensor, Tensor]:
        """(zT, vT, log|det|) from (z0, v0), point-major: even couplings update v from z, odd z from v.
        ``record``: a list that receives each coupling's network (output, pre-activation), in order."""
        logabsdet = 0.0
        for k in range(len(self.transform.transforms)):
            if k % 2 == 0:
                log_scale, shift = self._scale_shift(k, params, z, record)
                v = v * torch.exp(log_scale) + shift
            else:
                log_scale, shift = self._scale_shift(k, params, v, record)
                z = z * torch.exp(log_scale) + shift
            logabsdet = logabsdet + log_scale.sum(-1)
        return z, v, logabsdet

    def _flow_inverse(self, params: Params, z: Tensor, v: Tensor, replay=None) -> Tuple[Tensor, Tensor, Tensor]:
        """(z0, v0, log|det d(z0, v0)/d(zT, vT)|) from (zT, vT), point-major. ``replay``: what ``_flow``
        recorded with the same parameters on the way to (zT, vT): the couplings' networks are then not
        run again (their inputs here equal those up to rounding), only differentiated."""
        logabsdet = 0.0
        for k in reversed(range(len(self.transform.transforms))):
            again = None if replay is None else replay[k]
            if k % 2 == 0:
                log_scale, shift = self._scale_shift(k, params, z, replay=again)
                v = (v - shift) * torch.exp(-log_scale)
            else:
                log_scale, shift = self._scale_shift(k, params, v, replay=again)
                z = (z - shift) * torch.exp(-log_scale)
            logabsdet = logabsdet - log_scale.sum(-1)
        return z, v, logabsdet

    @staticmethod
    def _point_major(eps: Tensor) -> Tensor:
        return eps.transpose(0, 1).contiguous()  # [S, N, F] -> [N, S, F]

    @staticmethod
    def _base_points(params: Params) -> Params:
        """The base Gaussian's mean and log_var as [N, 1, D], to broadcast over point-major samples."""
        return {"mean": params["mean"].unsqueeze(1), "log_var": params["log_var"].unsqueeze(1)}

    def transform_noise(self, params: Params, eps_z: Tensor, eps_v: Tensor) -> Tuple[Tensor, Tensor]:
        """zT [S, N, D] and the bound on log q(zT) [S, N], from noise eps_z [S, N, D], eps_v [S, N, A]."""
        eps_z, eps_v = self._point_major(eps_z), self._point_major(eps_v)
        z0, log_q_z0 = self._base_sample(self._base_points(params), eps_z)  # [N, S, D], [N, S]
        mean_v, log_var_v = self._gaussian(self.q_v, params, z0)
        v0 = mean_v + torch.exp(0.5 * log_var_v) * eps_v  # [N, S, A]
        log_q_v0 = log_standard_normal(eps_v) - 0.5 * log_var_v.sum(-1)
        z, v, logabsdet = self._flow(params, z0, v0)
        mean_r, log_var_r = self._gaussian(self.r_v, params, z)
        log_r = log_normal(v, mean_r, log_var_r)
        return z.transpose(0, 1), (log_q_z0 + log_q_v0 - logabsdet - log_r).transpose(0, 1)

    def _noise(self, params: Params, num_samples: int, num_points: Optional[int]) -> Tuple[Tensor, Tensor]:
        eps_z = self._base_noise(params, num_samples, num_points)
        eps_v = torch.randn(eps_z.shape[:-1] + (self.aux_dim,), device=eps_z.device, dtype=eps_z.dtype)
        return eps_z, eps_v

    def sample_and_log_prob(self, params: Params, num_samples: int, num_points: Optional[int] = None):
        return self.transform_noise(params, *self._noise(params, num_samples, num_points))

    def path_elbo_and_grad(self, params: Params, num_samples: int, joint,
                           out: Optional[Params] = None) -> Optional[Tuple[Tensor, Params]]:
        """(ELBO samples [S, N], the path-derivative gradient of the loss -(1/S) sum_s ELBO_s in every
        parameter [N, ...]), derived by hand (see :mod:`gapbench.models.flows.hand_gradient`): what
        :meth:`sample_and_path_log_prob` and autograd give, up to rounding, in about half the time.
        ``joint``: point-major z [N, S, D] -> (log p(x, z) [N, S], its gradient in z). None when the
        flow has a context or shares parameters between datapoints (then use autograd). ``out``: a
        tensor [N, ...] per parameter to write the gradient into (it is returned in them)."""
        num_points = params["mean"].shape[0]
        if self.context_dim or any(p.shape[0] != num_points for p in params.values()):
            return None
        return path_elbo_and_grad(self, params, num_samples, joint, MAX_LOG_SCALE, MAX_AUX_LOG_VAR, out)

    def sample_and_path_log_prob(self, params: Params, num_samples: int, num_points: Optional[int] = None):
        """The bound on log q(zT) with the path derivative only for q's own parameters.

        q(zT, vT) = q(z0) q(v0|z0) / |det| is evaluated at the sampled (zT, vT) with
        its parameters detached: the couplings are inverted back to (z0, v0), which
        differ from the sampled ones only by rounding but carry the gradient of
        (zT, vT). The reverse model r(vT|zT) is not the sampling distribution, so it
        keeps its full gradient (its parameters are learned through it alone).
        """
        eps_z, eps_v = (self._point_major(e) for e in self._noise(params, num_samples, num_points))
        base = self._base_points(params)
        z0, _ = self._base_sample(base, eps_z)  # [N, S, D]
        q_v_seen, couplings_seen = [], []
        mean_v, log_var_v = self._gaussian(self.q_v, params, z0, record=q_v_seen)
        v0 = mean_v + torch.exp(0.5 * log_var_v) * eps_v
        z, v, _ = self._flow(params, z0, v0, record=couplings_seen)
        # The inverse meets every network at the inputs the forward pass gave it: its values are
        # reused, and only the networks' Jacobians in their inputs are applied in the backward pass.
        fixed = {k: p.detach() for k, p in params.items()}
        z0, v0, inv_logabsdet = self._flow_inverse(fixed, z, v, replay=couplings_seen)
        log_q_z0 = log_normal(z0, base["mean"].detach(), base["log_var"].detach())
        mean_v, log_var_v = self._gaussian(self.q_v, fixed, z0, replay=q_v_seen[0])
        log_q_v0 = log_normal(v0, mean_v, log_var_v)
        mean_r, log_var_r = self._gaussian(self.r_v, params, z)
        log_q = log_q_z0 + log_q_v0 + inv_logabsdet - log_normal(v, mean_r, log_var_r)
        return z.transpose(0, 1), log_q.transpose(0, 1)
