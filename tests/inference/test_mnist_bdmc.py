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
    # The sandwich holds up to MC noise and is tight. At 16 chains from the prior each bound of a
    # point moves by 0.2-0.3 nats between seeds (or between rounding-level changes of the chains),
    # so a single point's width may dip to about -0.15 (measured at seeds 0 and 2); a width
    # below -0.3, or a negative mean, would be a sandwich that does not hold.
    assert (result.width > -0.3).all() and result.width.mean() > -0.1
    assert result.width.mean() < 1.0
