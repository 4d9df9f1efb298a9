"""A tiny recipe on the bundled digits that trains and evaluates in seconds."""

import pytest
import torch

TINY = """
name: tiny
seed: 0
device: cpu
num_threads: 1
data: {dataset: digits, binarize: threshold}
model: {latent_dim: 2, encoder_hidden: [32], decoder_hidden: [32], flow_hidden: 8}
train: {batch_size: 100, num_epochs: 4, lr_schedule: constant, lr: 3.0e-3, warmup_epochs: 2}
evaluate:
  num_points: 12
  batch_size: 5
  families: [ffg, flow]
  elbo_samples: 200
  iwae_samples: 500
  local: {lr: 1.0e-2, flow_lr: 3.0e-3, num_samples: 10, check_every: 10, patience: 2, max_steps: 200,
          num_final_samples: 200, init: encoder, flow_init: ffg}
  ais: {num_steps: 20, num_chains: 4, num_leapfrog: 5, init: encoder}
"""




@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A trained tiny run folder, shared read-only by tests that only evaluate or report."""
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run

    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.yaml").write_text(TINY)
    torch.set_num_threads(1)
    train_run(load_recipe(root / "tiny.yaml"), root / "run")
    return root / "run"
