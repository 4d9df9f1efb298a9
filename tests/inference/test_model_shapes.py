"""A model whose log_prior or log_likelihood returns anything but [S, N] gets a message naming it, in every estimator."""

import pytest
import torch

from gapbench.inference import ais, elbo, fit_local, iwae
from gapbench.inference._common import log_joint
from gapbench.inference.gradients import log_joint_and_grad

from .conftest import make_linear_gaussian, simulate


class Reshaped:
    """``model`` with one of its densities reshaped by ``fn`` (e.g. keeping a trailing dimension)."""

    def __init__(self, model, which, fn):
        self.model, self.which, self.fn, self.latent_dim = model, which, fn, model.latent_dim

    def log_prior(self, z):
        out = self.model.log_prior(z)
        return self.fn(out) if self.which == "log_prior" else out

    def log_likelihood(self, x, z):
        out = self.model.log_likelihood(x, z)
        return self.fn(out) if self.which == "log_likelihood" else out


@pytest.fixture
def model_and_data():
    model = make_linear_gaussian(data_dim=4, latent_dim=2)
    return model, simulate(model, 3)


def _q(x, dim=2):
    n = x.shape[0]
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(n, dim, dtype=x.dtype), torch.ones(n, dim, dtype=x.dtype)), 1
    )


def test_log_joint_names_the_function_and_both_shapes(model_and_data):
    model, x = model_and_data
    z = torch.randn(5, 3, 2, dtype=x.dtype)
    bad = Reshaped(model, "log_likelihood", lambda v: v.unsqueeze(-1))
    with pytest.raises(ValueError) as err:
        log_joint(bad, x, z)
    assert str(err.value) == (
        "model.log_likelihood returned shape [5, 3, 1] for z of shape [5, 3, 2]; "
        "it must return [S, N] = [5, 3] (sum over data dimensions)"
    )


@pytest.mark.parametrize(
    "which, fn, shown",
    [
        ("log_likelihood", lambda v: v.unsqueeze(-1), "shape [{S}, 3, 1]"),
        ("log_likelihood", lambda v: v.sum(0), "shape [3]"),
        ("log_prior", lambda v: v.unsqueeze(-1).expand(*v.shape, 2), "shape [{S}, 3, 2]"),
        ("log_prior", lambda v: float(v.detach().sum()), "a float, not a tensor"),
    ],
)
def test_every_estimator_reports_the_shape(model_and_data, which, fn, shown):
    model, x = model_and_data
    bad = Reshaped(model, which, fn)
    summed = "data" if which == "log_likelihood" else "latent"
    runs = {
        "elbo": (lambda: elbo(bad, x, _q(x), num_samples=7), 7),
        "iwae": (lambda: iwae(bad, x, _q(x), num_samples=7), 7),
        "fit_local": (lambda: fit_local(bad, x, "ffg", num_samples=4, max_steps=2, num_final_samples=4), 4),
        "ais": (lambda: ais(bad, x, num_steps=3, num_chains=2, num_leapfrog=2), 2),
        "log_joint_and_grad": (lambda: log_joint_and_grad(bad, x, torch.randn(6, 3, 2, dtype=x.dtype)), 6),
    }
    for name, (run, num_samples) in runs.items():
        with pytest.raises(ValueError) as err:
            run()
        message = str(err.value)
        assert message.startswith(f"model.{which} returned {shown.format(S=num_samples)} for z of shape"), (name, message)
        assert f"(sum over {summed} dimensions)" in message, (name, message)


def test_right_shapes_pass_and_cost_no_extra_call(model_and_data):
    """The check reads shapes only: one call of each density per joint, as before."""
    model, x = model_and_data
    calls = {"log_prior": 0, "log_likelihood": 0}

    class Counting(Reshaped):
        def log_prior(self, z):
            calls["log_prior"] += 1
            return super().log_prior(z)

        def log_likelihood(self, x, z):
            calls["log_likelihood"] += 1
            return super().log_likelihood(x, z)

    z = torch.randn(5, 3, 2, dtype=x.dtype)
    value = log_joint(Counting(model, None, None), x, z)
    assert value.shape == (5, 3) and calls == {"log_prior": 1, "log_likelihood": 1}
    torch.testing.assert_close(value, model.log_prior(z) + model.log_likelihood(x, z), rtol=0, atol=0)
