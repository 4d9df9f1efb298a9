"""gapbench train under torchrun: vae and iwae train data-parallel on 2 CPU ranks with one process's loss
curve (up to the order of float sums); other methods train on rank 0 alone, as one process would."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gapbench.models.posterior import BatchRowsPosterior
from gapbench.models.vae import build_vae
from gapbench.recipe import load_recipe
from gapbench.train import train_run
from tests.tolerance import float_tol

REPO = Path(__file__).resolve().parents[2]

# 300 digits in batches of 50: 6 steps an epoch, a few seconds for both ranks together.
TINY = """
name: tiny-ddp
seed: 0
device: cpu
num_threads: 1
data: {dataset: digits, binarize: dynamic, num_train: 300}
model: {latent_dim: 2, encoder_hidden: [32], decoder_hidden: [32]}
train: {batch_size: 50, num_epochs: 3, lr_schedule: constant, lr: 3.0e-3, warmup_epochs: 1}
evaluate: {num_points: 12}
"""


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout=240):
    """``gapbench ARGS`` on 2 CPU ranks; returns the finished process (stdout, stderr as text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GAPBENCH_RANK_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "gapbench.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _log(run_dir):
    return list(csv.DictReader((Path(run_dir) / "train_log.csv").open()))


def _checkpoint(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)


def _steps(recipe, epochs):
    return epochs * -(-recipe.data.num_train // recipe.train.batch_size)


def assert_same_training(two, one, num_steps, epochs):
    """2 ranks' run folder ``two`` trained what one process's ``one`` did, up to float rounding.

    The ranks draw the same data order, binarization and noise as one process (the generator
    states end equal, exactly) and sum the same per-datapoint gradients in another order: each
    step's gradient then differs by a few float32 eps relative, and so does the step Adam takes.
    Those differences carry into the weights and from them into every later value, growing about
    linearly while training is stable, so a value after ``num_steps`` steps may differ by
    FACTOR * num_steps * eps(float32) * its magnitude (tests.tolerance.float_tol). A rank drawing
    its own noise instead would differ by the Monte Carlo error of a 50-point batch, ~0.1 nats.
    """
    a, b = _log(two), _log(one)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [str(e) for e in range(1, epochs + 1)]
    for ra, rb in zip(a, b):
        for key in ("train_objective", "train_elbo", "valid_elbo"):
            x, y = float(ra[key]), float(rb[key])
            assert abs(x - y) <= float_tol(torch.float32, y, num_steps), (ra["epoch"], key, x, y)
    ca, cb = _checkpoint(two), _checkpoint(one)
    assert ca["epoch"] == cb["epoch"] == epochs
    # The same draws from torch's generator, in number and shape, as one process: exactly.
    assert torch.equal(ca["rng"], cb["rng"])
    for key, w in cb["model"].items():
        diff = (ca["model"][key] - w).abs().max().item()
        assert diff <= float_tol(torch.float32, w, num_steps), (key, diff)
    ma, mb = (json.loads((Path(d) / "meta.json").read_text()) for d in (two, one))
    assert ma["num_ranks"] == 2 and "num_ranks" not in mb
    assert abs(ma["test_elbo"] - mb["test_elbo"]) <= float_tol(torch.float32, mb["test_elbo"], num_steps)


@pytest.mark.parametrize("encoder", ["ffg", "flow", "realnvp"])
def test_rows_of_a_batch_get_the_noise_the_whole_batch_would(encoder):
    torch.manual_seed(0)
    model = build_vae((64,), latent_dim=3, encoder_hidden=(16,), decoder_hidden=(16,), encoder=encoder, flow_hidden=8)
    x = torch.rand(7, 64)
    for start, stop in [(0, 3), (3, 7), (2, 3)]:
        torch.manual_seed(1)
        z, log_q = model.posterior(x).sample_and_log_prob(4)  # [4, 7, 3], [4, 7]
        after_whole = torch.get_rng_state()
        torch.manual_seed(1)
        z_rows, log_q_rows = BatchRowsPosterior(model.posterior(x[start:stop]), 7, start).sample_and_log_prob(4)
        assert torch.equal(torch.get_rng_state(), after_whole)
        assert z_rows.shape == (4, stop - start, 3) and log_q_rows.shape == (4, stop - start)
        # The encoder's matrix products over 7 rows or over a few round alike only up to float32 eps.
        torch.testing.assert_close(z_rows, z[:, start:stop], rtol=0, atol=float_tol(torch.float32, z, 16))
        torch.testing.assert_close(log_q_rows, log_q[:, start:stop], rtol=0, atol=float_tol(torch.float32, log_q, 16))


def test_two_ranks_resume_a_run_and_train_what_one_process_does(recipe_path, tmp_path):
    """vae with dynamic binarization: epoch 1 by one process, epochs 2-3 by 2 ranks with --resume (every
    rank loads the checkpoint rank 0 opened), against 3 epochs by one process."""
    recipe = load_recipe(recipe_path)
    train_run(recipe, tmp_path / "one")
    train_run(load_recipe(recipe_path, ["train.num_epochs=1"]), tmp_path / "two")
    proc = torchrun(["train", recipe_path, "--out", tmp_path / "two", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 epochs") == 1, proc.stdout  # the summary, from rank 0 alone
    assert_same_training(tmp_path / "two", tmp_path / "one", _steps(recipe, 3), epochs=3)


def test_an_uneven_last_batch_and_a_rank_without_rows_train_what_one_process_does(recipe_path, tmp_path):
    """iwae on 101 digits in batches of 25: the ranks take 12 and 13 rows, and of the last batch of 1,
    rank 0 takes none (it steps on a stand-in row that adds nothing)."""
    sets = ["train.method=iwae", "train.num_samples=3", "data.binarize=threshold", "data.num_train=101",
            "train.batch_size=25", "train.num_epochs=2"]
    recipe = load_recipe(recipe_path, sets)
    train_run(recipe, tmp_path / "one")
    proc = torchrun(["train", recipe_path, "--out", tmp_path / "two", "-q", *[a for s in sets for a in ("--set", s)]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(tmp_path / "two", tmp_path / "one", _steps(recipe, 2), epochs=2)


def test_a_method_without_data_parallel_training_trains_on_rank_0_alone(recipe_path, tmp_path):
    sets = ["train.method=svi", "train.svi.num_steps=2", "data.num_train=100", "train.num_epochs=1"]
    train_run(load_recipe(recipe_path, sets), tmp_path / "one")
    proc = torchrun(["train", recipe_path, "--out", tmp_path / "two", "-q", *[a for s in sets for a in ("--set", s)]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("rank 0 trains alone") == 1, proc.stderr
    assert proc.stdout.count("trained 1 epoch") == 1, proc.stdout
    # Rank 0 runs one process's code on the same inputs: the same tensors, exactly.
    a, b = _checkpoint(tmp_path / "two"), _checkpoint(tmp_path / "one")
    assert a["model"].keys() == b["model"].keys()
    for key, w in b["model"].items():
        assert torch.equal(a["model"][key], w), key
    assert torch.equal(a["rng"], b["rng"])
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["epochs"] == 1

    # Rank 0 refuses to train over the finished run: both ranks stop (rank 1 is told, or torchrun
    # stops it), neither waits for the other, and the run is left as it was.
    before = (tmp_path / "two" / "checkpoint.pt").read_bytes()
    proc = torchrun(["train", recipe_path, "--out", tmp_path / "two", "-q", *[a for s in sets for a in ("--set", s)]],
                    timeout=120)
    assert proc.returncode != 0 and "already holds a trained run" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoint.pt").read_bytes() == before
