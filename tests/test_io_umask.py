"""Files gapbench writes get the mode the umask gives, and a damaged checkpoint is met with a remedy that exists."""

import os
import stat

import pytest
import torch

from gapbench.io import save_torch, write_text
from tests.cli_runner import run_cli

WRITERS = {
    "write_text": lambda path: write_text(path, "x\n"),
    "save_torch": lambda path: save_torch(path, {"w": torch.zeros(2)}),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_respect_the_umask(tmp_path, writer):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        path = tmp_path / f"{writer}-{umask:03o}"
        before = os.umask(umask)
        try:
            WRITERS[writer](path)
        finally:
            os.umask(before)
        assert stat.S_IMODE(path.stat().st_mode) == mode, (writer, oct(umask), oct(path.stat().st_mode))


def test_damaged_checkpoint_asks_for_a_new_training_not_a_copy(tmp_path, capsys):
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run
    from tests.stages.conftest import TINY

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    train_run(load_recipe(recipe, ["train.num_epochs=1"]), run)
    (run / "checkpoint.pt").write_bytes(b"\x00 not a checkpoint " * 10)
    code, _, err = run_cli(["-q", "evaluate-gaps", run], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "checkpoint.pt" in lines[0] and "new --out" in lines[0], err
    assert "copy back" not in lines[0]  # only the latest checkpoint is kept: there is nothing to copy back
