"""What every training method must do: train, resume exactly, and say what it is."""

import pytest
import torch

from gapbench.methods import METHODS, get_method
from gapbench.recipe import load_recipe
from gapbench.train import train_run


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_documents_itself(name):
    cls = get_method(name)
    assert cls.name == name and cls.paper and cls.objective and cls.__doc__ or cls.__module__


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_improves_the_validation_bound_and_resumes_exactly(name, tiny_method_recipe, tmp_path):
    """Three epochs improve the validation ELBO over the first epoch's; and two epochs, then one more
    after a resume from the checkpoint, end with exactly the tensors of three uninterrupted epochs."""
    straight = train_run(load_recipe(tiny_method_recipe(name, epochs=3)), tmp_path / "straight")
    log = (tmp_path / "straight" / "train_log.csv").read_text().splitlines()[1:]
    valid = [float(row.split(",")[5]) for row in log]
    assert valid[-1] > valid[0], f"{name}: validation ELBO {valid}"

    train_run(load_recipe(tiny_method_recipe(name, epochs=2)), tmp_path / "split")
    train_run(load_recipe(tiny_method_recipe(name, epochs=3)), tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{name}: {key} differs after resume"
