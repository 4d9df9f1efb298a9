"""Encoders and decoders: layer sizes of Cremer et al. (2018), shapes, flattening of S*N."""

import pytest
import torch
from torch import nn

from gapbench.models.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, get_activation


def _linear_shapes(module):
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear)]


def test_mlp_default_sizes_match_the_paper():
    enc, dec = MLPEncoder(784, 50), MLPDecoder(50, 784)
    assert _linear_shapes(enc) == [(200, 784), (200, 200), (100, 200)]  # 784-200-200-(2x50)
    assert _linear_shapes(dec) == [(200, 50), (200, 200), (784, 200)]
    assert isinstance(enc.body[1], nn.ELU) and enc.feature_dim == 200


def test_mlp_shapes_and_sample_flattening():
    enc, dec = MLPEncoder(12, 3, hidden=(7,), activation="tanh"), MLPDecoder(3, 24, hidden=(5, 6), activation="softplus")
    mean, log_var, h = enc(torch.rand(4, 3, 2, 2))
    assert mean.shape == log_var.shape == (4, 3) and h.shape == (4, 7)
    z = torch.randn(2, 4, 3)
    out = dec(z)
    assert out.shape == (2, 4, 24)
    torch.testing.assert_close(out[1, 2], dec(z[1:2, 2:3])[0, 0])  # sample s of datapoint n is decoded alone


def test_conv_shapes():
    enc = ConvEncoder(10)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256] and all(c.kernel_size == (4, 4) for c in convs)
    mean, log_var, h = enc(torch.rand(2, 3, 32, 32))
    assert mean.shape == (2, 10) and h.shape == (2, 256 * 4 * 4)
    dec = ConvDecoder(10, num_params=2, channels=(8, 16))
    assert dec(torch.randn(3, 2, 10)).shape == (3, 2, 2 * 3 * 32 * 32)


def test_bad_settings():
    with pytest.raises(ValueError, match="activation"):
        get_activation("gelu")
    with pytest.raises(ValueError, match="3x32x32"):
        ConvEncoder(10, input_shape=(1, 28, 28))
