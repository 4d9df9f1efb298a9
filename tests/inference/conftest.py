"""Reference models with exact answers, shared by the inference tests."""

from pathlib import Path

import pytest
import torch

from gapbench.models.reference import LinearGaussian, QuadratureBernoulli

REPO_ROOT = Path(__file__).resolve().parents[2]
MNIST_VAE = REPO_ROOT.parent / "shared" / "fixtures" / "mnist_vae_bdmc.npz"


def make_linear_gaussian(data_dim=5, latent_dim=2, sigma=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(data_dim, latent_dim, generator=gen, dtype=torch.float64)
    # Nearly parallel columns: a correlated posterior, so the best FFG has a real approximation gap.
    W[:, 1:] = 0.3 * W[:, :1] + 0.7 * W[:, 1:]
    b = torch.randn(data_dim, generator=gen, dtype=torch.float64)
    return LinearGaussian(W, b, sigma)


def simulate(model, num_points, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_points, model.latent_dim, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    return model.sample_x(z)




@pytest.fixture
def linear_gaussian():
    return make_linear_gaussian()


@pytest.fixture
def lg_data(linear_gaussian):
    return simulate(linear_gaussian, 6)


@pytest.fixture
def quad_model():
    return QuadratureBernoulli(latent_dim=1, num_pixels=20, seed=0)


@pytest.fixture
def quad_data(quad_model):
    return simulate(quad_model, 4, seed=3)


@pytest.fixture
def mnist_vae():
    if not MNIST_VAE.is_file():
        pytest.skip(f"pretrained VAE fixture not found at ../shared/fixtures/{MNIST_VAE.name}")
    from gapbench.models.reference import load_npz_vae

    return load_npz_vae(MNIST_VAE)


class NaNWhere:
    """``model`` with the same prior, whose log-likelihood is NaN where ``is_bad(x)`` ([N] bool) holds."""

    def __init__(self, model, is_bad):
        self.model, self.latent_dim, self.is_bad = model, model.latent_dim, is_bad

    def log_prior(self, z):
        return self.model.log_prior(z)

    def log_likelihood(self, x, z):
        ll = self.model.log_likelihood(x, z)
        return torch.where(self.is_bad(x)[None, :], torch.full_like(ll, float("nan")), ll)
