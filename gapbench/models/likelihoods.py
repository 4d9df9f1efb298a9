"""Likelihoods p(x|z): from a decoder's output to log p(x|z), summed over pixels.

Every likelihood reads a decoder output of shape [S, N, K, P] (or [S, N, K*P],
reshaped): S samples of z for each of N datapoints, K numbers per pixel-channel
(``num_params``: 1 for Bernoulli logits, 2 for a mean and a log-scale, L for
categorical logits), P = C*H*W pixel-channels. Data x is [N, C, H, W] or
already flattened [N, P], with values in [0, 1]. ``log_prob`` returns [S, N].
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gapbench.ops import LOG_2PI, log_bernoulli

#: Lower bound on log-scales (PixelCNN++ uses the same floor): keeps densities finite.
MIN_LOG_SCALE = -7.0


class Likelihood(nn.Module):
    """Base class: decoder output [S, N, K, P] and data [N, P] -> log p(x|z) [S, N]."""

    name: str = ""
    num_params: int = 1

    def __init__(self, num_pixels: int):
        super().__init__()
        if num_pixels < 1:
            raise ValueError(f"num_pixels must be at least 1, got {num_pixels}")
        self.num_pixels = num_pixels

    def log_prob(self, x: Tensor, output: Tensor) -> Tensor:
        """log p(x|z) = sum_p log p(x_p | output_p).

        x: [N, C, H, W] or [N, P] in [0, 1]; output: [S, N, K, P] or [S, N, K*P].
        Returns [S, N].
        """
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.num_pixels:
            raise ValueError(f"x has {x.shape[1]} values per datapoint, the likelihood expects {self.num_pixels}")
        output = output.reshape(output.shape[0], output.shape[1], self.num_params, self.num_pixels)
        return self._log_prob(x.to(output.dtype), output)

    def mean(self, output: Tensor) -> Tensor:
        """E[x|z] per pixel-channel: [S, N, K, P] -> [S, N, P]."""
        output = output.reshape(output.shape[0], output.shape[1], self.num_params, self.num_pixels)
        return self._mean(output)

    def _log_prob(self, x: Tensor, output: Tensor) -> Tensor:
        raise NotImplementedError

    def _mean(self, output: Tensor) -> Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """p(x|z) = prod_p sigmoid(l_p)^x_p (1 - sigmoid(l_p))^(1 - x_p); K = 1 logit per pixel.

    Fractional x gives the cross-entropy (continuous Bernoulli without its normalizer).
    """

    name = "bernoulli"
    num_params = 1

    def _log_prob(self, x, output):
        return log_bernoulli(x, output[:, :, 0])

    def _mean(self, output):
        return torch.sigmoid(output[:, :, 0])


def _level_index(x: Tensor, num_levels: int) -> Tensor:
    """The level k in {0, ..., L-1} of x = k / (L-1), as a long tensor."""
    return torch.round(x * (num_levels - 1)).clamp(0, num_levels - 1).long()


def _check_levels(num_levels) -> int:
    if num_levels is None or int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer of at least 2, got {num_levels!r}")
    return int(num_levels)


class DiscretizedLogistic(Likelihood):
    """Logistic(mean, exp(log_scale)) integrated over the bin of x, as in PixelCNN++.

    x takes the values k/(L-1), k = 0..L-1; bin k is [x - 1/(2(L-1)), x + 1/(2(L-1))],
    with the first and last bins open to -inf and +inf, so the L probabilities sum to 1:

        P(x) = sigmoid((x + h - m)/s) - sigmoid((x - h - m)/s),   h = 1/(2(L-1)).

    K = 2: output[:, :, 0] is the mean m, output[:, :, 1] the log-scale (floored at -7).
    Salimans et al., "PixelCNN++" (2017).
    """

    name = "logistic"
    num_params = 2

    def __init__(self, num_pixels: int, num_levels: int):
        super().__init__(num_pixels)
        self.num_levels = _check_levels(num_levels)

    def _log_prob(self, x, output):
        num_levels = self.num_levels
        mean, log_scale = output[:, :, 0], output[:, :, 1].clamp(min=MIN_LOG_SCALE)  # [S, N, P]
        k = _level_index(x, num_levels)  # [N, P]
        x = k.to(output.dtype) / (num_levels - 1)  # snap to the grid
        half = 0.5 / (num_levels - 1)
        inv_scale = torch.exp(-log_scale)
        upper = (x - mean + half) * inv_scale  # a
        lower = (x - mean - half) * inv_scale  # b
        width = 2.0 * half * inv_scale  # a - b > 0, computed without cancellation
        # log(sigmoid(a) - sigmoid(b)) = a + log(1 - exp(-(a - b))) - softplus(a) - softplus(b)
        log_mid = upper + torch.log(-torch.expm1(-width)) - F.softplus(upper) - F.softplus(lower)
        log_first = -F.softplus(-upper)  # log sigmoid(a): bin open below
        log_last = -F.softplus(lower)  # log (1 - sigmoid(b)): bin open above
        log_p = torch.where(k == 0, log_first, torch.where(k == num_levels - 1, log_last, log_mid))
        return log_p.sum(-1)

    def _mean(self, output):
        return output[:, :, 0].clamp(0.0, 1.0)


class Categorical(Likelihood):
    """Independent L-way categorical per pixel-channel; x = k/(L-1) is class k.

    K = L logits per pixel-channel: output [S, N, L, P].
    """

    name = "categorical"

    def __init__(self, num_pixels: int, num_levels: int):
        super().__init__(num_pixels)
        self.num_levels = _check_levels(num_levels)
        self.num_params = self.num_levels

    def _log_prob(self, x, output):
        log_probs = torch.log_softmax(output, dim=2)  # [S, N, L, P]
        k = _level_index(x, self.num_levels)  # [N, P]
        index = k.unsqueeze(0).unsqueeze(2).expand(output.shape[0], -1, 1, -1)  # [S, N, 1, P]
        return torch.gather(log_probs, 2, index).squeeze(2).sum(-1)

    def _mean(self, output):
        levels = torch.arange(self.num_levels, device=output.device, dtype=output.dtype) / (self.num_levels - 1)
        return (torch.softmax(output, dim=2) * levels[:, None]).sum(2)


class Gaussian(Likelihood):
    """p(x|z) = prod_p N(x_p; m_p, sigma_p^2), a density on R^P.

    ``std`` selects sigma:
      * a positive number: fixed, K = 1 (the decoder outputs the mean);
      * None or "learned": one learned log-sigma per pixel-channel (initialized at 0), K = 1;
      * "decoder": output by the decoder, K = 2 (output[:, :, 1] is log-sigma).
    Learned log-sigmas are floored at -7 so a constant pixel cannot send the density to infinity.
    """

    name = "gaussian"

    def __init__(self, num_pixels: int, std: Optional[Union[float, str]] = None):
        super().__init__(num_pixels)
        self.fixed_log_std: Optional[float] = None
        self.std_from_decoder = False
        if std is None or std == "learned":
            self.log_std = nn.Parameter(torch.zeros(num_pixels))
        elif std == "decoder":
            self.std_from_decoder = True
            self.num_params = 2
        elif isinstance(std, (int, float)) and not isinstance(std, bool) and std > 0 and math.isfinite(std):
            self.fixed_log_std = math.log(float(std))
        else:
            raise ValueError(f"gaussian_std must be a positive number, 'learned' or 'decoder', got {std!r}")

    def _log_std(self, output: Tensor) -> Tensor:
        if self.std_from_decoder:
            return output[:, :, 1].clamp(min=MIN_LOG_SCALE)
        if self.fixed_log_std is not None:
            return torch.full_like(output[:, :, 0], self.fixed_log_std)
        return self.log_std.clamp(min=MIN_LOG_SCALE).to(output.dtype)

    def _log_prob(self, x, output):
        mean, log_std = output[:, :, 0], self._log_std(output)
        z = (x - mean) * torch.exp(-log_std)
        return -(0.5 * LOG_2PI + log_std + 0.5 * z**2).expand_as(mean).sum(-1)

    def _mean(self, output):
        return output[:, :, 0]


LIKELIHOODS = {"bernoulli": Bernoulli, "logistic": DiscretizedLogistic, "categorical": Categorical, "gaussian": Gaussian}


def get_likelihood(
    name: str, num_pixels: int, *, num_levels: Optional[int] = None, gaussian_std: Optional[Union[float, str]] = None
) -> Likelihood:
    """The likelihood called ``name`` ("bernoulli", "logistic", "categorical", "gaussian") over P pixels."""
    if name == "bernoulli":
        return Bernoulli(num_pixels)
    if name in ("logistic", "categorical"):
        if num_levels is None:
            raise ValueError(f"likelihood {name!r} needs num_levels (e.g. 256 for 8-bit, 8 for 3-bit images)")
        return LIKELIHOODS[name](num_pixels, num_levels)
    if name == "gaussian":
        return Gaussian(num_pixels, gaussian_std)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
