"""The four binarization modes: exact where deterministic, reproducible per seed and epoch, unbiased."""

import math

import pytest
import torch

from gapbench.data import (
    BINARIZE_MODES,
    DataError,
    binarize,
    binarize_batch,
    epoch_generator,
    epoch_seed,
    prepare_split,
)


def test_modes():
    assert BINARIZE_MODES == ("none", "threshold", "static", "dynamic")


def test_none_and_threshold_are_exact():
    x = torch.tensor([[0.0, 0.5, 0.5001, 1.0]])
    assert binarize(x, "none") is x
    assert binarize(x, "threshold").tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert prepare_split(x, "threshold", seed=3).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_bernoulli_draw_is_u_below_x():
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    got = binarize_batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(got, (u < x).float()) and got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(binarize(x, "static", torch.Generator().manual_seed(5)), got)
    assert torch.equal(binarize(x, "dynamic", torch.Generator().manual_seed(5)), got)


def test_edges_are_deterministic():
    x = torch.tensor([0.0, 1.0]).repeat(1000)
    b = binarize_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(b, x)


def test_mean_is_unbiased():
    p = 0.3
    n = 200_000
    b = binarize_batch(torch.full((n,), p), torch.Generator().manual_seed(1))
    se = math.sqrt(p * (1 - p) / n)
    assert abs(b.mean().item() - p) < 4 * se


def test_static_split_is_fixed_per_seed():
    x = torch.full((50, 1, 4, 4), 0.5)
    a, b, c = prepare_split(x, "static", 7), prepare_split(x, "static", 7), prepare_split(x, "static", 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(prepare_split(x, "dynamic", 7), a)  # dynamic data is evaluated on the same fixed draw


def test_epoch_generator_reproducible_and_distinct():
    x = torch.full((1000,), 0.5)
    e3 = binarize_batch(x, epoch_generator(0, 3))
    assert torch.equal(e3, binarize_batch(x, epoch_generator(0, 3)))  # a resumed run redraws epoch 3 exactly
    assert not torch.equal(e3, binarize_batch(x, epoch_generator(0, 4)))
    assert not torch.equal(e3, binarize_batch(x, epoch_generator(1, 3)))
    seeds = {epoch_seed(s, e) for s in range(5) for e in range(50)}
    assert len(seeds) == 250 and all(0 <= v < 2**63 for v in seeds)
    assert epoch_seed(0, 3, stream=1) != epoch_seed(0, 3)


def test_unknown_mode():
    with pytest.raises(DataError, match="unknown binarization 'dynamc': did you mean 'dynamic'"):
        binarize(torch.zeros(2), "dynamc")
