"""Shared pieces of the training-method tests: a tiny digits recipe per method."""

import pytest

TINY_METHOD = """
name: tiny_{method}
seed: 0
device: cpu
num_threads: 1
data: {{dataset: digits, binarize: threshold}}
model: {{latent_dim: 2, encoder_hidden: [32], decoder_hidden: [32], flow_hidden: 8}}
train: {{method: {method}, batch_size: 100, num_epochs: {epochs}, lr_schedule: constant, lr: 3.0e-3,
        warmup_epochs: 0, eval_every: 1}}
evaluate: {{num_points: 20, batch_size: 10}}
"""


@pytest.fixture
def tiny_method_recipe(tmp_path):
    """write(method, epochs=2, extra="") -> the path of a tiny digits recipe training with ``method``."""

    def write(method: str, epochs: int = 2, extra: str = ""):
        path = tmp_path / f"tiny_{method}_{epochs}.yaml"
        path.write_text(TINY_METHOD.format(method=method, epochs=epochs) + extra)
        return path

    return write
