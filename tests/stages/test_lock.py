"""One writer per run folder: a second is refused at once, a killed one blocks nothing, one process may nest."""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

import gapbench
from tests.cli_runner import run_cli
from tests.stages.conftest import TINY

WAIT_S = 60  # every wait on another process is bounded by this

HOLD = textwrap.dedent("""
    import sys, time
    from gapbench.lock import folder_lock
    with folder_lock(sys.argv[1], "gapbench run x"):
        print("locked", flush=True)
        time.sleep(120)
""")

TRY = textwrap.dedent("""
    import sys
    from gapbench.lock import FolderInUse, folder_lock
    try:
        with folder_lock(sys.argv[1], "probe"):
            print("got it")
    except FolderInUse:
        print("in use")
""")


def _env() -> dict:
    """This interpreter's environment, importing the same gapbench as the tests do."""
    root = str(Path(gapbench.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _read_line(proc: subprocess.Popen, timeout: float = WAIT_S) -> str:
    """The next line ``proc`` prints, waiting at most ``timeout`` seconds."""
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"no output from process {proc.pid} within {timeout} s")
    if not line:
        proc.wait(timeout=timeout)
        pytest.fail(f"process {proc.pid} exited with {proc.returncode}: {proc.stderr.read()}")
    return line.strip()


def _start(code: str, *args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)


def _probe(folder: Path) -> str:
    """What another process gets when it asks for ``folder``'s lock now."""
    proc = _start(TRY, folder)
    try:
        out, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the lock probe did not finish")
    assert proc.returncode == 0, err
    return out.strip()


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _recipe(tmp_path: Path) -> Path:
    tree = yaml.safe_load(TINY)
    tree["train"]["num_epochs"] = 2
    tree["evaluate"].update(num_points=6, batch_size=3, families=["ffg"])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_a_second_writer_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    from gapbench.pipeline import run_pipeline

    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    run_pipeline(recipe, out=str(run))
    commands = [
        ["train", recipe, "--out", run, "--resume"],
        ["evaluate-gaps", run, "--resume"],
        ["run", recipe, "--out", run],
        ["report", run],
    ]
    holder = _start(HOLD, run)
    try:
        assert _read_line(holder) == "locked"
        before = _files(run)
        for argv in commands:
            code, _, err = run_cli(["-q", *argv], capsys)
            assert code == 2, (argv, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1, (argv, err)
            assert f"process {holder.pid}" in lines[0] and "choose another --out" in lines[0], (argv, err)
            assert _files(run) == before, argv
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=WAIT_S)
    # The kernel released the lock with the process: no stale lock to delete.
    for argv in commands:
        code, _, err = run_cli(["-q", *argv], capsys)
        assert code == 0, (argv, err)


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    from gapbench.lock import folder_lock, holds_lock

    folder = tmp_path / "run"
    with folder_lock(folder, "outer"):
        with folder_lock(folder / ".." / "run", "inner"):  # the same folder, spelled differently
            assert holds_lock(folder)
            assert _probe(folder) == "in use"
        # leaving the inner block keeps the outer one's lock
        assert holds_lock(folder)
        assert _probe(folder) == "in use"
    assert not holds_lock(folder)
    assert _probe(folder) == "got it"


RACE = textwrap.dedent("""
    import os, sys, time
    import gapbench.cli, gapbench.evaluate, gapbench.pipeline, gapbench.report, gapbench.train
    print("ready", flush=True)
    deadline = time.time() + 60
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:
        time.sleep(0.002)
    gapbench.cli.main(sys.argv[2:])
""")


def test_two_runs_into_one_folder_one_wins_and_its_seed_is_what_the_folder_says(tmp_path):
    recipe = _recipe(tmp_path)
    out = tmp_path / "run"
    go = tmp_path / "go"
    # Both import everything first, then start on the same signal: started at the same time.
    procs = {seed: _start(RACE, go, "-q", "run", recipe, "--set", f"seed={seed}", "--out", out, cwd=tmp_path)
             for seed in (1, 2)}
    results = {}
    try:
        for proc in procs.values():
            assert _read_line(proc) == "ready"
        go.write_text("go")
        for seed, proc in procs.items():
            _, err = proc.communicate(timeout=WAIT_S * 3)
            results[seed] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT_S)
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 2], results
    winner = next(seed for seed, (code, _) in results.items() if code == 0)
    loser_err = next(err for code, err in results.values() if code == 2)
    lines = loser_err.strip().splitlines()
    assert len(lines) == 1 and "is in use by process" in lines[0] and "choose another --out" in lines[0], loser_err
    assert yaml.safe_load((out / "recipe.yaml").read_text())["seed"] == winner
    gaps = json.loads((out / "gaps" / "test.json").read_text())
    assert gaps["seed"] == gaps["provenance"]["seed"] == winner


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """Locking a folder whose lock file cannot be created names the folder and the fix, not an OSError."""
    import errno as _errno

    from gapbench import lock
    from gapbench.errors import GapbenchError

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(lock.LOCK_FILE):
            raise PermissionError(_errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(lock.os, "open", refuse)
    with pytest.raises(GapbenchError) as info:
        with lock.folder_lock(tmp_path / "run"):
            pass
    message = str(info.value)
    assert "cannot write to" in message and "Permission denied" in message and "\n" not in message


def test_a_holder_that_has_not_written_its_note_yet_is_still_named(tmp_path):
    """The refused writer reads the holder's PID even when it looks in the instant between the
    holder's taking the lock and its writing the note (the race two simultaneous runs hit)."""
    import fcntl

    from gapbench import lock

    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / lock.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, note not yet written
        timer = threading.Timer(0.2, lambda: os.pwrite(fd, json.dumps({"pid": 424242, "command": "gapbench run"}).encode(), 0))
        timer.start()
        with pytest.raises(lock.FolderInUse) as info:
            with lock.folder_lock(folder):
                pass
        timer.join()
        assert "process 424242 (gapbench run)" in str(info.value)
    finally:
        os.close(fd)
