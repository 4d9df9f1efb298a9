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


@pytest.mark.parametrize("name", ["svi", "savae", "iterative", "bsvi"])
def test_a_method_refuses_an_encoder_it_cannot_refine_with_one_line(name, tiny_method_recipe, tmp_path, capsys):
    """The refining methods fit a factorized Gaussian: with a flow encoder `gapbench train` stops before
    writing anything, exit 2, one line naming the key."""
    from tests.cli_runner import run_cli

    recipe = tiny_method_recipe(name, epochs=1)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", recipe, "--set", "model.encoder=flow", "--out", out, "-q"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "model.encoder" in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_every_recipe_of_recipes_methods_names_its_method():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "recipes" / "methods"
    for name in METHODS:
        for prefix in ("digits", "fashion"):
            recipe = load_recipe(folder / f"{prefix}_{name}.yaml")
            assert recipe.train.method == name and recipe.evaluate.families == ("ffg",)
