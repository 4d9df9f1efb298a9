import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test in tests/models starts from the same global RNG state."""
    torch.manual_seed(0)
