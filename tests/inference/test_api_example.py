"""The README's "Python API" example, verbatim: estimators on a user's own model class."""

import pytest


@pytest.mark.slow
def test_readme_python_api_example():
    # --- README example begins ---
    import torch
    from torch import nn

    from gapbench.inference import ais, elbo, fit_local, iwae
    from gapbench.ops import log_bernoulli, log_standard_normal

    class MyModel(nn.Module):
        """Any model with latent_dim, log_prior(z) and log_likelihood(x, z) works."""

        latent_dim = 2

        def __init__(self):
            super().__init__()
            self.decoder = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 100))

        def log_prior(self, z):  # z [S, N, D] -> [S, N]
            return log_standard_normal(z)

        def log_likelihood(self, x, z):  # x [N, 100], z [S, N, D] -> [S, N]
            return log_bernoulli(x, self.decoder(z))

    torch.manual_seed(0)
    model = MyModel().requires_grad_(False)
    x = torch.bernoulli(torch.sigmoid(model.decoder(torch.randn(4, 2))))  # 4 binary datapoints

    # q(z|x): your encoder's output, as any torch Distribution with batch [N] and event [D].
    q = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4, 2), torch.ones(4, 2)), 1)

    l_q = elbo(model, x, q, num_samples=1000)  # L[q], [N]
    fit = fit_local(model, x, "ffg", lr=1e-2)  # L[q*_FFG], the best Gaussian per datapoint
    log_px = torch.maximum(
        iwae(model, x, fit.q, num_samples=5000),  # IWAE with q* as proposal
        ais(model, x, num_steps=200, num_chains=16).log_px,  # AIS from the prior
    )
    print(f"log p(x) {log_px.mean():.2f}  approximation gap {(log_px - fit.elbo).mean():.2f}  "
          f"amortization gap {(fit.elbo - l_q).mean():.2f}  (nats, mean over {len(x)} points)")
    # --- README example ends ---
    assert fit.converged.all() and fit.finite.all()
    assert (log_px - fit.elbo > -0.05).all() and (fit.elbo - l_q > -0.05).all()
