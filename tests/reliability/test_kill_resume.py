"""SIGKILL `gapbench train` and `gapbench evaluate-gaps` at random file writes; `--resume` ends identical.

Each child is a real ``python -m gapbench.cli`` process. A ``sitecustomize``
put on its PYTHONPATH counts the files it writes into the run folder (every
gapbench write ends in ``os.replace``) and sends the process SIGKILL at the
k-th one, either while that file is being written ("torn": its temporary is
cut to half its size, the target never replaced) or just after it is in place
("after"). The kill points come from a fixed-seed RNG, so a failure replays
exactly; killing at a write rather than at a wall-clock offset keeps the kill
points the same on a slow or loaded machine.

After every kill, every file in the run folder must be complete: each .pt
loads with ``torch.load(weights_only=True)``, each .json and .csv parses. At
the end the resumed run must equal an uninterrupted one (checkpoint tensors,
gaps CSV), hold the same files, and show that nothing finished was redone: the
training log has every epoch once, and partial evaluation batches keep their
modification times.
"""

import csv
import json
import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.reliability.conftest import NUM_EPOCHS, copy_run

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20180711
NUM_RANDOM_KILLS = 4  # per command, plus one aimed kill each: 10 kill points in all

KILL_HOOK = '''\
"""Test hook, loaded as sitecustomize: SIGKILL this process at the k-th file write into a folder."""
import json
import os
import signal

_spec = os.environ.get("GAPBENCH_KILL_AT")
if _spec:
    _spec = json.loads(_spec)
    _root = os.path.realpath(_spec["root"]) + os.sep
    _real_replace = os.replace
    _count = [0]

    def _replace(src, dst, *args, **kwargs):
        path = os.path.realpath(os.fspath(dst))
        if not path.startswith(_root) or _spec["name"] not in (None, os.path.basename(path)):
            return _real_replace(src, dst, *args, **kwargs)
        _count[0] += 1
        if _count[0] != _spec["count"]:
            return _real_replace(src, dst, *args, **kwargs)
        if _spec["mode"] == "torn":
            os.truncate(src, os.path.getsize(src) // 2)
        else:
            _real_replace(src, dst, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = _replace
'''

# Columns of train_log.csv that are timings; every other column must match exactly.
TIMING_COLUMNS = {"seconds", "images_per_s"}


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def assert_no_half_written_file(run_dir: Path) -> None:
    """Every file a reader would take for complete is complete."""
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and not _is_temporary(p)):
        try:
            if path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                frame = pd.read_csv(path)
                assert len(frame.columns) > 1 and not frame.isna().all(axis=1).any()
            elif path.suffix == ".yaml":
                assert isinstance(yaml.safe_load(path.read_text()), dict)
        except Exception as exc:  # noqa: BLE001 - the message names the file
            raise AssertionError(f"{path.relative_to(run_dir)} is half-written: {exc!r}") from None


def _files(run_dir: Path) -> set:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _child_env(hook_dir: Path, kill=None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("GAPBENCH_KILL_AT", None)
    if kill is not None:
        env["GAPBENCH_KILL_AT"] = json.dumps(kill)
    return env


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "gapbench.cli", *map(str, args)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _kill_then_check(args, run_dir, hook_dir, count, mode, name=None):
    kill = {"root": str(run_dir), "count": count, "mode": mode, "name": name}
    proc = _run(args, _child_env(hook_dir, kill))
    assert proc.returncode == -signal.SIGKILL, (
        f"{args[0]} was to be killed at {kill} but exited {proc.returncode}: {proc.stderr[-2000:]}"
    )
    assert_no_half_written_file(run_dir)


def _checkpoint_epoch(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"])


def kill_training(recipe_file, run_dir, hook_dir, rng):
    """Train with NUM_RANDOM_KILLS random kills and one in the last epoch, then resume to the end.

    Writes of a training process: recipe.yaml, the initial checkpoint, then a
    checkpoint and the log after each epoch, and meta.json. The first kill
    comes after the initial checkpoint (before it there is nothing to resume).
    The aimed kill lands just after the last epoch's checkpoint, before its log.
    """
    cmd = ["train", recipe_file, "--out", run_dir]
    kills = []
    for i in range(NUM_RANDOM_KILLS):
        remaining = 2 * (NUM_EPOCHS - (_checkpoint_epoch(run_dir) if i else 0))
        count = rng.randint(3 if i == 0 else 1, min(remaining, 6))
        mode = rng.choice(["torn", "after"])
        _kill_then_check(cmd + (["--resume"] if i else []), run_dir, hook_dir, count, mode)
        kills.append((count, mode, _checkpoint_epoch(run_dir)))
    last = NUM_EPOCHS - _checkpoint_epoch(run_dir)
    assert last >= 1, kills
    _kill_then_check(cmd + ["--resume"], run_dir, hook_dir, last, "after", name="checkpoint.pt")
    kills.append((last, "after checkpoint.pt", _checkpoint_epoch(run_dir)))
    assert _checkpoint_epoch(run_dir) == NUM_EPOCHS and not (run_dir / "meta.json").exists()
    proc = _run(cmd + ["--resume"], _child_env(hook_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return kills


def kill_evaluation(run_dir, hook_dir, rng):
    """Evaluate with NUM_RANDOM_KILLS random kills and one between the CSV and the JSON, then resume.

    Returns the kills and, for every partial batch file that existed after some
    kill, its modification time then.
    """
    cmd = ["evaluate-gaps", run_dir]
    partial = run_dir / "gaps" / ".partial" / "test"
    kills, finished = [], {}
    for i in range(NUM_RANDOM_KILLS):
        count = rng.randint(1, 4)
        mode = rng.choice(["torn", "after"])
        _kill_then_check(cmd + (["--resume"] if i else []), run_dir, hook_dir, count, mode)
        done = sorted(p for p in partial.glob("*.pt"))
        for path in done:
            finished.setdefault(path, path.stat().st_mtime_ns)
        kills.append((count, mode, len(done)))
    _kill_then_check(cmd + ["--resume"], run_dir, hook_dir, 1, "after", name="test.csv")
    kills.append((1, "after test.csv", len(list(partial.glob("*.pt")))))
    assert (run_dir / "gaps" / "test.csv").exists() and not (run_dir / "gaps" / "test.json").exists()
    for path in partial.glob("*.pt"):
        finished.setdefault(path, path.stat().st_mtime_ns)
    proc = _run(cmd + ["--resume"], _child_env(hook_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return kills, finished


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, recipe_file, trained_run, evaluated_run):
    """Both kill sequences, run side by side (each child uses one thread)."""
    root = tmp_path_factory.mktemp("killed")
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILL_HOOK)
    train_dir = root / "train"
    eval_dir = copy_run(trained_run, root / "evaluate")
    rng_train, rng_eval = random.Random(SEED), random.Random(SEED + 1)
    with ThreadPoolExecutor(max_workers=2) as pool:
        train_job = pool.submit(kill_training, recipe_file, train_dir, hook_dir, rng_train)
        eval_job = pool.submit(kill_evaluation, eval_dir, hook_dir, rng_eval)
        train_kills = train_job.result()
        eval_kills, finished = eval_job.result()
    return {"train": (train_dir, train_kills), "evaluate": (eval_dir, eval_kills, finished)}


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_the_kill_hook_kills_at_the_chosen_write(tmp_path):
    """The hook itself, on gapbench's atomic writes: 'torn' never replaces the target, 'after' does."""
    from gapbench.io import remove_stale_temporaries

    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILL_HOOK)
    code = "import sys; from gapbench.io import write_text; [write_text(p, p * 40) for p in sys.argv[1:]]"
    for mode, count in (("torn", 2), ("after", 1)):
        root = tmp_path / mode
        root.mkdir()
        kill = {"root": str(root), "count": count, "mode": mode, "name": None}
        proc = subprocess.run([sys.executable, "-c", code, str(root / "a.txt"), str(root / "b.txt")],
                              env=_child_env(hook_dir, kill), cwd=REPO_ROOT, capture_output=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert (root / "a.txt").read_text() == str(root / "a.txt") * 40
        assert not (root / "b.txt").exists()
        temporaries = [p for p in root.iterdir() if _is_temporary(p)]
        if mode == "torn":
            (temporary,) = temporaries
            assert temporary.name.startswith(".b.txt.") and temporary.stat().st_size == len(str(root / "b.txt")) * 20
            assert remove_stale_temporaries(root, ["a.txt"]) == []
            assert remove_stale_temporaries(root) == [temporary] and not temporary.exists()
        else:
            assert temporaries == []
        assert sorted(p.name for p in root.iterdir()) == ["a.txt"]


def test_killed_training_resumes_to_the_uninterrupted_checkpoint(killed_runs, trained_run):
    run_dir, kills = killed_runs["train"]
    assert len(kills) == NUM_RANDOM_KILLS + 1
    # the kills landed at different epochs, the aimed one in the last
    assert len({epoch for _, _, epoch in kills}) >= 3, kills
    a = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "best_model", "rng", "epoch", "best_epoch", "best_valid_elbo"):
        assert _tensors_equal(a[key], b[key]), key
    # the training log holds each epoch exactly once, with the uninterrupted run's numbers
    ref = list(csv.DictReader((trained_run / "train_log.csv").open()))
    got = list(csv.DictReader((run_dir / "train_log.csv").open()))
    assert [int(r["epoch"]) for r in got] == list(range(1, NUM_EPOCHS + 1))
    for r, g in zip(ref, got):
        assert {k: v for k, v in r.items() if k not in TIMING_COLUMNS} == {
            k: v for k, v in g.items() if k not in TIMING_COLUMNS
        }
    assert json.loads((run_dir / "meta.json").read_text())["test_elbo"] == json.loads(
        (trained_run / "meta.json").read_text()
    )["test_elbo"]


def test_killed_training_leaves_the_files_of_an_uninterrupted_run(killed_runs, trained_run):
    run_dir, _ = killed_runs["train"]
    assert _files(run_dir) == _files(trained_run)  # no temporaries of torn writes left behind


def test_killed_evaluation_resumes_to_the_uninterrupted_result(killed_runs, evaluated_run):
    run_dir, kills, finished = killed_runs["evaluate"]
    assert len(kills) == NUM_RANDOM_KILLS + 1
    a = pd.read_csv(evaluated_run / "gaps" / "test.csv")
    b = pd.read_csv(run_dir / "gaps" / "test.csv")
    pd.testing.assert_frame_equal(a, b)
    sa = json.loads((evaluated_run / "gaps" / "test.json").read_text())
    sb = json.loads((run_dir / "gaps" / "test.json").read_text())
    for key in ("stats", "order_violations", "num_points", "num_finite", "num_nonfinite", "traces"):
        assert sa[key] == sb[key], key


def test_killed_evaluation_recomputes_nothing_that_finished(killed_runs):
    run_dir, kills, finished = killed_runs["evaluate"]
    # 3 batches x 5 stages + the AIS sweep: the random kills landed at different points of them
    assert len({n for _, _, n in kills[:-1]}) >= 3 and max(n for _, _, n in kills[:-1]) < 16, kills
    assert len(finished) == 16
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was recomputed"


def test_killed_evaluation_leaves_the_files_of_an_uninterrupted_run(killed_runs, evaluated_run):
    run_dir, _, _ = killed_runs["evaluate"]
    assert _files(run_dir) == _files(evaluated_run)
