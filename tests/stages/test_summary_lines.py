"""Summary lines read as English: one epoch is 'epoch', several are 'epochs'."""

from pathlib import Path

import pytest

from gapbench.train import TrainResult


@pytest.mark.parametrize("num_epochs, words", [(1, "trained 1 epoch in"), (2, "trained 2 epochs in"), (40, "trained 40 epochs in")])
def test_trained_epochs_are_counted_in_english(num_epochs, words):
    result = TrainResult(run_dir=Path("runs/x"), num_epochs=num_epochs, best_epoch=1, best_valid_elbo=-20.0,
                         test_elbo=-21.0, wall_seconds=2.2, stopped_early=False)
    line = result.summary_line()
    assert line.startswith(words), line
    assert "1 epochs" not in line
