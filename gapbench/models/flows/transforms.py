"""Invertible transforms with per-datapoint parameters; each returns ``(outputs, logabsdet)``.

A transform acts on the last dimension of inputs [S, N, F]; its parameters are a
dict of tensors with leading dimension N (one transform per datapoint) or 1
(shared). ``forward`` returns y and log|det dy/dx| [S, N]; ``inverse`` returns x
and log|det dx/dy| [S, N] (the negative of the forward one at the same point).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from gapbench.models.flows.layers import ConditionerNet, Params, soft_clamp

#: Bound on each coupling's per-dimension log-scale: |log s| < 2 keeps every step well conditioned.
MAX_LOG_SCALE = 2.0


class Transform:
    """An invertible map of R^F applied to the last dimension of [S, N, F]."""

    num_features: int

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Parameter names and shapes, without the leading N-or-1 dimension."""
        raise NotImplementedError

    def init_params(self, num_points: int, device=None, dtype=torch.float32, generator=None) -> Params:
        """Parameters [num_points, ...] of (exactly) the identity map."""
        raise NotImplementedError

    def forward(self, params: Params, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, params: Params, outputs: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError


class AffineCoupling(Transform):
    """Affine coupling (Dinh et al., "Density estimation using Real NVP", 2017).

        y_B = x_B * exp(s(x_A)) + t(x_A),   y_A = x_A,   log|det| = sum_B s(x_A)

    B = ``transform_features`` (the indices updated), A = the others (the
    conditioner's input, possibly empty). s = 2 tanh(raw / 2) is bounded so no
    step can blow up; the conditioner's output layer starts at 0, so a new
    coupling is the identity.
    """

    def __init__(self, num_features: int, transform_features: Sequence[int], prefix: str, hidden: int):
        transform_features = sorted(int(i) for i in transform_features)
        if not transform_features or not set(transform_features) <= set(range(num_features)):
            raise ValueError(f"transform_features must be a non-empty subset of 0..{num_features - 1}")
        self.num_features = num_features
        self.transform_idx = transform_features
        self.identity_idx = [i for i in range(num_features) if i not in set(transform_features)]
        perm = self.identity_idx + self.transform_idx
        self.inverse_perm = sorted(range(num_features), key=perm.__getitem__)
        # Contiguous blocks (the auxiliary flow's [z, v]) split and join by slicing, without gathers.
        self._blocks = None
        if all(b - a == 1 for idx in (self.identity_idx, self.transform_idx) for a, b in zip(idx, idx[1:])):
            block_a = slice(self.identity_idx[0], self.identity_idx[-1] + 1) if self.identity_idx else slice(0, 0)
            block_b = slice(self.transform_idx[0], self.transform_idx[-1] + 1)
            self._blocks = (block_a, block_b, block_a.start < block_b.start)
        self.net = ConditionerNet(prefix, len(self.identity_idx), 2 * len(self.transform_idx), hidden)

    def param_shapes(self):
        return self.net.param_shapes()

    def init_params(self, num_points, device=None, dtype=torch.float32, generator=None):
        return self.net.init_params(num_points, device, dtype, generator)

    def _split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self._blocks is not None:
            return x[..., self._blocks[0]], x[..., self._blocks[1]]
        idx_a = torch.as_tensor(self.identity_idx, device=x.device, dtype=torch.long)
        idx_b = torch.as_tensor(self.transform_idx, device=x.device, dtype=torch.long)
        return x.index_select(-1, idx_a), x.index_select(-1, idx_b)

    def _join(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        if self._blocks is not None:
            return torch.cat([x_a, x_b] if self._blocks[2] else [x_b, x_a], dim=-1)
        inv = torch.as_tensor(self.inverse_perm, device=x_a.device, dtype=torch.long)
        return torch.cat([x_a, x_b], dim=-1).index_select(-1, inv)

    def _scale_shift(self, params: Params, x_a: Tensor) -> Tuple[Tensor, Tensor]:
        raw_scale, shift = self.net(params, x_a).chunk(2, dim=-1)  # [S, N, |B|] each
        return soft_clamp(raw_scale, MAX_LOG_SCALE), shift

    def forward(self, params, inputs):
        x_a, x_b = self._split(inputs)
        log_scale, shift = self._scale_shift(params, x_a)
        y_b = x_b * torch.exp(log_scale) + shift
        return self._join(x_a, y_b), log_scale.sum(-1)

    def inverse(self, params, outputs):
        y_a, y_b = self._split(outputs)
        log_scale, shift = self._scale_shift(params, y_a)
        x_b = (y_b - shift) * torch.exp(-log_scale)
        return self._join(y_a, x_b), -log_scale.sum(-1)


class CompositeTransform(Transform):
    """T_K o ... o T_1; log|det| adds up. Parameter names must not collide."""

    def __init__(self, transforms: List[Transform]):
        if not transforms:
            raise ValueError("a composite transform needs at least one transform")
        self.transforms = list(transforms)
        self.num_features = transforms[0].num_features
        names = [k for t in self.transforms for k in t.param_shapes()]
        if len(names) != len(set(names)):
            raise ValueError("parameter names of the composed transforms collide")

    def param_shapes(self):
        return {k: v for t in self.transforms for k, v in t.param_shapes().items()}

    def init_params(self, num_points, device=None, dtype=torch.float32, generator=None):
        params = {}
        for t in self.transforms:
            params.update(t.init_params(num_points, device, dtype, generator))
        return params

    def forward(self, params, inputs):
        total = inputs.new_zeros(inputs.shape[:-1])
        for t in self.transforms:
            inputs, logabsdet = t.forward(params, inputs)
            total = total + logabsdet
        return inputs, total

    def inverse(self, params, outputs):
        total = outputs.new_zeros(outputs.shape[:-1])
        for t in reversed(self.transforms):
            outputs, logabsdet = t.inverse(params, outputs)
            total = total + logabsdet
        return outputs, total
