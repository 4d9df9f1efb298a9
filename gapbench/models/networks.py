"""Encoders and decoders: MLPs (Cremer et al. 2018, MNIST) and convolutional nets (CIFAR).

An encoder maps x [N, ...] to the base Gaussian's ``mean`` and ``log_var`` [N, D]
and a feature vector h(x) [N, F] (its last hidden layer), which the auxiliary
flow's q(v0|z0, x) and r(vT|zT, x) may read. A decoder maps z [S, N, D] to the
likelihood's parameters [S, N, K*P]: it flattens S*N into one batch internally.
Weights are initialized by torch's defaults from the global RNG: seed with
``torch.manual_seed`` before building.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor, nn

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def get_activation(name: str) -> nn.Module:
    """A fresh activation module: "elu", "relu", "tanh" or "softplus"."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def _mlp(in_dim: int, hidden: Sequence[int], activation: str) -> Tuple[nn.Sequential, int]:
    layers = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), get_activation(activation)]
        in_dim = width
    return nn.Sequential(*layers), in_dim


class MLPEncoder(nn.Module):
    """x [N, P] -> (mean [N, D], log_var [N, D], h [N, F]); default 784-200-200-(2x50), ELU."""

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "elu"):
        super().__init__()
        self.body, self.feature_dim = _mlp(input_dim, hidden, activation)
        self.head = nn.Linear(self.feature_dim, 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = self.body(x.reshape(x.shape[0], -1))  # [N, F]
        mean, log_var = self.head(h).chunk(2, dim=-1)  # [N, D] each
        return mean, log_var, h


class MLPDecoder(nn.Module):
    """z [S, N, D] -> [S, N, output_dim]; default 50-200-200-784, ELU."""

    def __init__(self, latent_dim: int, output_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "elu"):
        super().__init__()
        body, width = _mlp(latent_dim, hidden, activation)
        self.net = nn.Sequential(*body, nn.Linear(width, output_dim))

    def forward(self, z: Tensor) -> Tensor:
        num_samples, num_points = z.shape[:2]
        out = self.net(z.reshape(num_samples * num_points, -1))  # [S*N, K*P]
        return out.reshape(num_samples, num_points, -1)


def _conv_check(input_shape: Sequence[int], channels: Sequence[int]) -> None:
    if tuple(input_shape) != (3, 32, 32):
        raise ValueError(f"the conv architecture needs 3x32x32 images, got input_shape {tuple(input_shape)}")
    if not 1 <= len(channels) <= 5 or any(int(c) < 1 for c in channels):
        raise ValueError(f"conv_channels must be 1 to 5 positive widths, got {tuple(channels)}")


class ConvEncoder(nn.Module):
    """x [N, 3, 32, 32] -> (mean, log_var [N, D], h [N, F]).

    Convolutions with kernel 4, stride 2, padding 1 (each halves the side), widths
    ``channels`` (default 64/128/256: 32 -> 16 -> 8 -> 4), then a linear head on the
    flattened features h (F = 256*4*4 by default).
    """

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int] = (64, 128, 256),
        activation: str = "elu",
        input_shape: Sequence[int] = (3, 32, 32),
    ):
        super().__init__()
        _conv_check(input_shape, channels)
        layers, in_ch = [], input_shape[0]
        for ch in channels:
            layers += [nn.Conv2d(in_ch, ch, kernel_size=4, stride=2, padding=1), get_activation(activation)]
            in_ch = ch
        self.body = nn.Sequential(*layers, nn.Flatten())
        side = input_shape[1] // 2 ** len(channels)
        self.feature_dim = in_ch * side * side
        self.head = nn.Linear(self.feature_dim, 2 * latent_dim)
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = self.body(x.reshape(x.shape[0], *self.input_shape))  # [N, F]
        mean, log_var = self.head(h).chunk(2, dim=-1)
        return mean, log_var, h


class ConvDecoder(nn.Module):
    """z [S, N, D] -> [S, N, K*3*32*32]: the mirror of :class:`ConvEncoder`.

    A linear layer to channels[-1] x 4 x 4, then transposed convolutions (kernel 4,
    stride 2, padding 1; each doubles the side) through the reversed widths, the
    last one giving K*3 channels (K = likelihood parameters per pixel-channel).
    """

    def __init__(
        self,
        latent_dim: int,
        num_params: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        activation: str = "elu",
        output_shape: Sequence[int] = (3, 32, 32),
    ):
        super().__init__()
        _conv_check(output_shape, channels)
        self.side = output_shape[1] // 2 ** len(channels)
        self.top_channels = channels[-1]
        self.fc = nn.Sequential(nn.Linear(latent_dim, channels[-1] * self.side**2), get_activation(activation))
        layers = []
        widths = list(reversed(channels))  # 256, 128, 64
        for in_ch, out_ch in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1), get_activation(activation)]
        layers.append(nn.ConvTranspose2d(widths[-1], num_params * output_shape[0], kernel_size=4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        num_samples, num_points = z.shape[:2]
        h = self.fc(z.reshape(num_samples * num_points, -1))
        h = h.reshape(-1, self.top_channels, self.side, self.side)
        out = self.body(h)  # [S*N, K*C, 32, 32]; channel index = k*C + c
        return out.reshape(num_samples, num_points, -1)
