"""On the pretrained MNIST VAE, AIS at the default settings is within 1 nat of log p(x)."""

import pytest

from gapbench.inference import bdmc
from gapbench.inference.ais import DEFAULT_NUM_CHAINS, DEFAULT_NUM_STEPS


@pytest.mark.slow
def test_bdmc_width_under_one_nat_at_defaults(mnist_vae):
    # Defaults (prior start, sigmoid schedule, 10 leapfrog steps); 2 simulated points to stay < 60 s.
    result = bdmc(mnist_vae, 2, seed=0)
    assert result.forward.num_steps == DEFAULT_NUM_STEPS and result.forward.num_chains == DEFAULT_NUM_CHAINS
    assert result.finite.all()
    # The sandwich holds (up to MC noise) and is tight: lower <= upper + 0.1, mean width < 1 nat.
    assert (result.width > -0.1).all()
    assert result.width.mean() < 1.0
