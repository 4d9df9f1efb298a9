"""A tiny trained run and its gap evaluation, made once and shared read-only by the reliability tests.

Tests that change a run copy it first (:func:`copy_run`).
"""

import shutil

import pytest
import torch

from tests.stages.conftest import TINY

NUM_EPOCHS = 16
# The tiny recipe, trained a little longer so that a run writes enough files to kill it at many points.
RECIPE = TINY.replace("num_epochs: 4", f"num_epochs: {NUM_EPOCHS}")
assert RECIPE != TINY




@pytest.fixture(scope="session")
def reliability_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    (root / "tiny.yaml").write_text(RECIPE)
    return root


@pytest.fixture(scope="session")
def recipe_file(reliability_root):
    return reliability_root / "tiny.yaml"


@pytest.fixture(scope="session")
def trained_run(reliability_root, recipe_file):
    """An uninterrupted training run of RECIPE (the reference for resumed training)."""
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run

    torch.set_num_threads(1)
    run = reliability_root / "trained"
    train_run(load_recipe(recipe_file), run)
    return run


@pytest.fixture(scope="session")
def evaluated_run(reliability_root, trained_run):
    """trained_run with an uninterrupted gap evaluation (the reference for resumed evaluation)."""
    from gapbench.evaluate import evaluate_run

    torch.set_num_threads(1)
    run = copy_run(trained_run, reliability_root / "evaluated")
    evaluate_run(run)
    return run


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst
