"""train.keep_checkpoints and evaluate-gaps --checkpoint: gaps over training from one run.

One tiny run trained 4 epochs keeping epochs 2 and 4; one trained 2 epochs (keeping 2), then
copied and resumed to 4 with [2, 4]. On CPU with one thread every comparison is exact.
"""

import hashlib
import shutil

import pandas as pd
import pytest
import torch

from gapbench.errors import GapbenchError
from gapbench.io import load_torch, read_json
from gapbench.recipe import load_recipe
from gapbench.train import train_run
from tests.cli_runner import run_cli
from tests.stages.conftest import TINY


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kept")
    (root / "tiny.yaml").write_text(TINY)
    torch.set_num_threads(1)
    four = load_recipe(root / "tiny.yaml", ["train.keep_checkpoints=[2, 4]"])
    two = load_recipe(root / "tiny.yaml", ["train.num_epochs=2", "train.keep_checkpoints=[2]"])
    train_run(four, root / "four")
    train_run(two, root / "two")
    shutil.copytree(root / "two", root / "resumed")
    train_run(four, root / "resumed", resume=True)  # 2 more epochs, now keeping [2, 4]
    return root


def _weights(path):
    return load_torch(path)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keeps_exactly_the_asked_epochs_with_their_weights(runs):
    four, two, resumed = runs / "four", runs / "two", runs / "resumed"
    assert sorted(p.name for p in (four / "checkpoints").iterdir()) == ["epoch_2.pt", "epoch_4.pt"]
    kept2 = load_torch(four / "checkpoints" / "epoch_2.pt")
    assert set(kept2) == {"model", "epoch"} and kept2["epoch"] == 2  # weights only
    # the weights at the end of epoch 2: those of a run trained to 2 epochs, bit for bit
    assert _same(kept2["model"], _weights(two / "checkpoint.pt"))
    assert _same(_weights(four / "checkpoints" / "epoch_4.pt"), _weights(four / "checkpoint.pt"))
    # resumed: the epoch kept before is still there, unchanged; the later one written, as uninterrupted
    assert (resumed / "checkpoints" / "epoch_2.pt").read_bytes() == (two / "checkpoints" / "epoch_2.pt").read_bytes()
    assert _same(_weights(resumed / "checkpoints" / "epoch_4.pt"), _weights(four / "checkpoints" / "epoch_4.pt"))
    assert _same(_weights(resumed / "checkpoint.pt"), _weights(four / "checkpoint.pt"))
    assert (resumed / "train_log.csv").read_text().count("\n") == 5


def test_keep_checkpoints_is_validated(tiny_recipe):
    for value, words in (("[4, 2]", "increasing"), ("[2, 2]", "increasing"), ("[5]", "beyond train.num_epochs"),
                         ("[0]", "at least 1"), ("3", "list")):
        with pytest.raises(GapbenchError, match="train.keep_checkpoints") as info:
            load_recipe(tiny_recipe, [f"train.keep_checkpoints={value}"])
        assert words in str(info.value) and "\n" not in str(info.value)


def test_evaluates_a_kept_epoch_apart_from_the_final_model(runs, capsys):
    from gapbench.evaluate import evaluate_run

    four, two = runs / "four", runs / "two"
    code, out, err = run_cli(["evaluate-gaps", four, "--checkpoint", "2"], capsys)
    assert code == 0, err
    kept = four / "gaps" / "epoch_2"
    assert (kept / "test.csv").is_file() and (kept / "test.json").is_file()
    assert not (four / "gaps" / "test.csv").exists()  # never mixed with the final model's gaps
    summary = read_json(kept / "test.json")
    digest = hashlib.sha256((four / "checkpoints" / "epoch_2.pt").read_bytes()).hexdigest()
    assert summary["provenance"]["checkpoint_sha256"] == digest
    assert summary["provenance"]["checkpoint_epoch"] == 2

    # The 2-epoch run evaluated as usual (its best weights are its last: checked) gives the same numbers.
    assert load_torch(two / "checkpoint.pt")["best_epoch"] == 2
    evaluate_run(two)
    mine, theirs = pd.read_csv(kept / "test.csv"), pd.read_csv(two / "gaps" / "test.csv")
    pd.testing.assert_frame_equal(mine, theirs, check_exact=True)

    code, _, err = run_cli(["evaluate-gaps", four, "--checkpoint", "2", "--resume"], capsys)
    assert code == 0 and "up to date" in err  # reuse keys on the kept file's hash

    code, out, err = run_cli(["evaluate-gaps", four, "--checkpoint", "3"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "epoch 3" in lines[0] and "2, 4" in lines[0]

    # the report: a column per kept epoch, and the training curves
    code, out, err = run_cli(["report", four, "--checkpoint", "2"], capsys)
    assert code == 0, err
    report = four / "report_checkpoints"
    assert "[epoch 2]" in (report / "table.md").read_text()
    png = report / "training_curves.png"
    assert png.is_file() and png.stat().st_size > 10_000
    code, _, err = run_cli(["report", four, "--checkpoint", "2,4"], capsys)
    assert code == 2 and "--checkpoint 4" in err  # epoch 4 not evaluated yet: says what to run
