"""The real data: Fashion-MNIST as Debian's dataset-fashion-mnist installs it, and scikit-learn's digits."""

from pathlib import Path

import pytest
import torch

from gapbench.data import load_dataset

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent: apt-get install dataset-fashion-mnist (CI installs it)"
)


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@needs_fashion
def test_fashion_sizes_and_source(fashion):
    assert fashion.source == str(FASHION_DIR)
    assert fashion.train.shape == (50_000, 1, 28, 28)
    assert fashion.valid.shape == (10_000, 1, 28, 28)
    assert fashion.test.shape == (10_000, 1, 28, 28)
    assert fashion.train.dtype == torch.float32 and fashion.num_levels is None


@needs_fashion
def test_fashion_classes_are_balanced(fashion):
    train_labels = torch.cat([fashion.train_labels, fashion.valid_labels])
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_labels).tolist() == [1000] * 10


@needs_fashion
def test_fashion_pixel_statistics(fashion):
    x = torch.cat([fashion.train, fashion.valid]).double()
    assert x.min() == 0 and x.max() == 1
    # measured on the 60,000 training images: mean 0.28604, std 0.35302
    assert x.mean().item() == pytest.approx(0.2860, abs=1e-4)
    assert x.std().item() == pytest.approx(0.3530, abs=1e-4)
    levels = torch.unique(x[:100] * 255)
    assert torch.allclose(levels, levels.round())  # bytes / 255


@needs_fashion
def test_fashion_split_reproducible(fashion):
    again = load_dataset("fashion-mnist")  # decoded files are cached in memory: only the split is redone
    assert torch.equal(again.valid, fashion.valid) and torch.equal(again.train_labels, fashion.train_labels)
    other = load_dataset("fashion-mnist", split_seed=1)
    assert not torch.equal(other.valid_labels, fashion.valid_labels)
    assert torch.equal(other.test, fashion.test)  # the test split never depends on the seed


def test_digits():
    ds = load_dataset("digits")
    assert (ds.train.shape, ds.valid.shape, ds.test.shape) == ((1197, 1, 8, 8), (300, 1, 8, 8), (300, 1, 8, 8))
    assert ds.image_shape == (1, 8, 8) and ds.source.startswith("scikit-learn")
    allx = torch.cat([ds.train, ds.valid, ds.test])
    assert allx.min() == 0 and allx.max() == 1
    assert torch.allclose(allx * 16, (allx * 16).round())  # counts 0..16 scaled by 1/16
    counts = torch.bincount(torch.cat([ds.train_labels, ds.valid_labels, ds.test_labels]))
    assert counts.sum() == 1797 and counts.min() >= 174 and counts.max() <= 183
    # the three splits together are exactly the 1,797 images, each once
    from sklearn.datasets import load_digits

    ref = torch.from_numpy(load_digits().images / 16).flatten(1)
    # Integer weights below 2^20 on pixels k/16: every product and partial sum is a multiple of 1/16 below
    # 2^30, exact in float64, so the row sums are bit-exact in any summation order (any BLAS, any CPU).
    key = torch.randint(1, 2**20, (64,), generator=torch.Generator().manual_seed(0)).double()
    assert torch.equal((allx.flatten(1).double() @ key).sort().values, (ref @ key).sort().values)
    assert not torch.equal(load_dataset("digits", split_seed=1).test, ds.test)
    assert torch.equal(load_dataset("digits").test, ds.test)
    assert load_dataset("digits", num_valid=100).train.shape[0] == 1397
