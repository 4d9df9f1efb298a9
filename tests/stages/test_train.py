"""gapbench train: learning happens, checkpoints are safe and resumable, divergence is caught."""

import csv
import json
import math

import pytest
import torch

from gapbench.errors import GapbenchError
from gapbench.experiment import build_model, load_inputs
from gapbench.recipe import load_recipe
from gapbench.schedules import iwae_stage, kl_weight, learning_rate
from gapbench.train import TrainingDiverged, dataset_elbo, train_run


def test_iwae_schedule_has_3280_epochs_in_8_stages():
    stages = [iwae_stage(e) for e in range(3280)]
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)]
    assert learning_rate(0, 1e-3, "iwae") == pytest.approx(1e-3)
    assert learning_rate(1, 1e-3, "iwae") == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert learning_rate(3279, 1e-3, "iwae") == pytest.approx(1e-4)
    assert learning_rate(5000, 1e-3, "iwae") == pytest.approx(1e-4)  # stays at the last stage
    assert learning_rate(17, 2e-3, "constant") == 2e-3


def test_kl_warmup_is_linear_per_step():
    assert kl_weight(0, 0, 10, 0) == 1.0
    assert kl_weight(0, 4, 10, 2) == pytest.approx(0.25)
    assert kl_weight(1, 9, 10, 2) == 1.0
    assert kl_weight(7, 0, 10, 2) == 1.0


def test_training_improves_the_elbo_and_writes_a_run(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe, ["train.num_epochs=6"])
    torch.manual_seed(recipe.seed)
    inputs = load_inputs(recipe)
    untrained = build_model(recipe, inputs)
    before = dataset_elbo(untrained.eval(), inputs.test, "cpu", num_samples=10)
    result = train_run(recipe, tmp_path / "run")
    assert result.test_elbo > before + 5, (before, result.test_elbo)
    run = tmp_path / "run"
    for name in ("recipe.yaml", "meta.json", "checkpoint.pt", "train_log.csv"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    meta = json.loads((run / "meta.json").read_text())
    for key in ("seed", "gapbench_version", "git_commit", "torch_version", "device", "wall_seconds"):
        assert key in meta
    assert load_recipe(run / "recipe.yaml") == recipe
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 6 and set(ckpt["model"]) == set(untrained.state_dict())


def _tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return True  # plain numbers (timings) may differ


def test_resume_gives_the_same_checkpoint_as_an_uninterrupted_run(tiny_recipe, tmp_path):
    full = load_recipe(tiny_recipe)
    train_run(full, tmp_path / "full")
    half = load_recipe(tiny_recipe, ["train.num_epochs=2"])
    train_run(half, tmp_path / "split")
    # the same run, trained on to 4 epochs
    train_run(full, tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "best_model", "rng"):
        assert _tensors_equal(a[key], b[key]), key
    assert a["epoch"] == b["epoch"] == 4


def test_same_seed_same_checkpoint_other_seed_differs(tiny_recipe, tmp_path):
    r = load_recipe(tiny_recipe, ["train.num_epochs=1"])
    train_run(r, tmp_path / "a")
    train_run(r, tmp_path / "b")
    train_run(load_recipe(tiny_recipe, ["train.num_epochs=1", "seed=1"]), tmp_path / "c")
    a, b, c = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in "abc")
    assert _tensors_equal(a, b)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe, ["train.lr=1e9", "train.num_epochs=50"])
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch \d+.*last good checkpoint") as err:
        train_run(recipe, tmp_path / "run")
    assert "lower train.lr" in str(err.value)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_refuses_a_different_recipe(tiny_recipe, tmp_path):
    train_run(load_recipe(tiny_recipe, ["train.num_epochs=1"]), tmp_path / "run")
    other = load_recipe(tiny_recipe, ["train.num_epochs=1", "model.latent_dim=3"])
    with pytest.raises(GapbenchError, match="model.latent_dim"):
        train_run(other, tmp_path / "run", resume=True)


def test_existing_run_is_not_overwritten(tiny_recipe, tmp_path):
    r = load_recipe(tiny_recipe, ["train.num_epochs=1"])
    train_run(r, tmp_path / "run")
    with pytest.raises(GapbenchError, match="already holds a trained run"):
        train_run(r, tmp_path / "run")


def test_early_stopping_keeps_the_best_weights(tiny_recipe, tmp_path):
    r = load_recipe(tiny_recipe, ["train.num_epochs=30", "train.early_stopping_patience=1", "train.lr=0.05"])
    result = train_run(r, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert result.stopped_early and ckpt["epoch"] < 30
    assert ckpt["best_valid_elbo"] == max(row["valid_elbo"] for row in ckpt["log"])
    assert math.isfinite(result.test_elbo)


def test_sigkill_then_resume_ends_with_the_uninterrupted_checkpoint(tiny_recipe, tmp_path):
    """Kill `gapbench train` with SIGKILL mid-run; `--resume` finishes with identical tensors."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = ["--set", "train.num_epochs=60"]
    cmd = [sys.executable, "-m", "gapbench.cli", "train", str(tiny_recipe), *sets]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, capture_output=True)

    log = tmp_path / "killed" / "train_log.csv"
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) > 5:  # header + 5 epochs
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(log.read_text().splitlines()) - 1
    assert 5 <= done < 60, f"the kill landed after {done} epochs; it must land mid-training"
    assert not (tmp_path / "killed" / "meta.json").exists()
    subprocess.run(cmd + ["--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "best_model", "rng"):
        assert _tensors_equal(a[key], b[key]), key
    rows = list(csv.DictReader(log.open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 61))
