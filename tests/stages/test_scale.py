"""evaluate-gaps at any scale: one process, torchrun ranks (gloo on CPU) and job-array shards.

The per-datapoint CSV must be the same file at every scale, since each (stage,
batch) carries its own seed and each batch is computed by exactly one worker.
Faults: a rank that fails makes the others stop non-zero naming it; a killed
rank leaves its finished batches, and a rerun computes only the missing ones.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gapbench.errors import GapbenchError
from gapbench.scale import Workers, detect, parse_shard

REPO_ROOT = Path(__file__).resolve().parents[2]

# Loaded as sitecustomize in the child processes: at the k-th batch file that the process of
# rank FAULT["rank"] writes into the evaluation's partial folder, raise or SIGKILL itself.
FAULT_HOOK = '''\
import json, os, signal
_spec = os.environ.get("GAPBENCH_TEST_FAULT")
if _spec and os.environ.get("RANK") == str(json.loads(_spec)["rank"]):
    _spec = json.loads(_spec)
    _real = os.replace
    _count = [0]

    def _replace(src, dst, *args, **kwargs):
        if ".partial" in os.fspath(dst) and os.fspath(dst).endswith(".pt"):
            _count[0] += 1
            if _count[0] == _spec["count"]:
                if _spec["mode"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(28, "No space left on device (injected)")
        return _real(src, dst, *args, **kwargs)

    os.replace = _replace
'''


# ----------------------------------------------------------------------------- layouts


def test_detect_reads_torchrun_and_array_variables():
    assert detect(env={}) == Workers()
    assert detect(env={"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Workers(1, 4, 1, "torchrun")
    assert detect(env={"RANK": "0", "WORLD_SIZE": "1"}) == Workers()  # one torchrun process is one process
    assert detect("2/5", env={}) == Workers(2, 5, 0, "shard")
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "5"}
    assert detect(env=slurm) == Workers(2, 3, 0, "shard")
    assert detect("0/2", env=slurm) == Workers(0, 2, 0, "shard")  # --shard wins over the scheduler's


@pytest.mark.parametrize("text, fragment", [("3/3", "numbered 0 to 2"), ("a/b", "give I/N"), ("1/0", "numbered"),
                                            ("", "give I/N")])
def test_bad_shard_is_one_clear_error(text, fragment):
    with pytest.raises(GapbenchError, match=fragment):
        parse_shard(text)


def test_torchrun_and_array_together_is_an_error():
    with pytest.raises(GapbenchError, match="use one or the other"):
        detect("0/2", env={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(GapbenchError, match="not one of tasks"):
        detect(env={"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3"})


@pytest.mark.parametrize("num_batches", [1, 2, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_batch_has_exactly_one_worker(num_batches, world):
    shares = [Workers(r, world, kind="shard").share(num_batches) for r in range(world)]
    flat = sorted(b for share in shares for b in share)
    assert flat == list(range(num_batches))  # no padding, no duplicates


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, fault=None, **extra) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GAPBENCH_TEST_FAULT")
           and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["GAPBENCH_TEST_FAULT"] = json.dumps(fault)
    env.update(extra)
    return env


def _torchrun(args, env, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), "-m", "gapbench.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _ranks_by_hand(args, env, nproc=2, timeout=240):
    """Start the ranks as torchrun would (same variables), but without its agent, which would kill
    the survivors itself: what the ranks do on their own is what is tested."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "gapbench.cli", *map(str, args)], cwd=REPO_ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _copy(run, dest) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("gaps", "report", ".gapbench.lock"))
    return dest


def _parts(run: Path):
    return {p.name: p.stat().st_mtime_ns for p in (run / "gaps" / ".partial" / "test").glob("*.pt")}


# ----------------------------------------------------------------------------- the same numbers at any scale


@pytest.fixture(scope="module")
def one_process(trained_tiny, tmp_path_factory):
    """The tiny run evaluated by one process: the reference CSV."""
    from gapbench.evaluate import evaluate_run

    run = _copy(trained_tiny, tmp_path_factory.mktemp("one") / "run")
    evaluate_run(run)
    return run


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_one_process_csv(one_process, trained_tiny, tmp_path):
    run = _copy(trained_tiny, tmp_path / "run")
    proc = _torchrun(["-q", "evaluate-gaps", run], _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "gaps" / "test.csv").read_bytes() == (one_process / "gaps" / "test.csv").read_bytes()
    summary = json.loads((run / "gaps" / "test.json").read_text())
    reference = json.loads((one_process / "gaps" / "test.json").read_text())
    assert summary["convergence"] == reference["convergence"]  # the AIS sweep, by whichever rank took it
    assert summary["provenance"]["layout"]["kind"] == "torchrun"
    assert summary["provenance"]["layout"]["world_size"] == 2
    # one summary line, from rank 0 only
    assert proc.stdout.count("test points:") == 1


def test_three_shards_give_the_one_process_csv(one_process, trained_tiny, tmp_path):
    """Shards in any order; --merge before the last fails naming what is missing; the last one assembles."""
    from gapbench.evaluate import evaluate_run

    run = _copy(trained_tiny, tmp_path / "run")
    first = evaluate_run(run, workers=parse_shard("2/3"))
    assert first.waiting and "shard 0/3" in first.waiting and "shard 1/3" in first.waiting
    assert not (run / "gaps" / "test.csv").exists()
    evaluate_run(run, workers=parse_shard("0/3"))
    with pytest.raises(GapbenchError, match=r"batches 1 of 3 .*shard 1/3"):
        evaluate_run(run, merge=True)
    last = evaluate_run(run, workers=parse_shard("1/3"))
    assert not last.waiting
    assert (run / "gaps" / "test.csv").read_bytes() == (one_process / "gaps" / "test.csv").read_bytes()
    evaluate_run(run, merge=True)  # all there: --merge writes (or keeps) the same result
    assert (run / "gaps" / "test.csv").read_bytes() == (one_process / "gaps" / "test.csv").read_bytes()


def test_array_variables_pick_the_shard_from_the_command_line(trained_tiny, tmp_path, capsys, monkeypatch):
    from tests.cli_runner import run_cli

    run = _copy(trained_tiny, tmp_path / "run")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    code, out, err = run_cli(["-q", "evaluate-gaps", run], capsys)
    assert code == 0, err
    assert "this shard's batches are done" in out and "shard 0/3, shard 2/3" in out
    assert {name.rsplit("-", 1)[1] for name in _parts(run)} == {"0001.pt"}  # batch 1 only
    code, out, err = run_cli(["-q", "evaluate-gaps", run, "--merge"], capsys)
    assert code == 2 and "missing" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_naming_it(trained_tiny, tmp_path):
    run = _copy(trained_tiny, tmp_path / "run")
    started = time.time()
    proc = _torchrun(["-q", "evaluate-gaps", run], _env(tmp_path, fault={"rank": 1, "count": 2, "mode": "raise"}))
    assert proc.returncode != 0
    assert "rank 0 of 2 stops: rank 1 of 2 failed" in proc.stderr
    assert "No space left on device (injected)" in proc.stderr
    assert time.time() - started < 200
    assert not (run / "gaps" / "test.csv").exists()


@pytest.mark.slow
def test_a_killed_rank_is_noticed_and_a_rerun_computes_only_the_missing_batches(one_process, trained_tiny, tmp_path):
    run = _copy(trained_tiny, tmp_path / "run")
    env = _env(tmp_path, fault={"rank": 1, "count": 2, "mode": "kill"}, GAPBENCH_RANK_TIMEOUT="4")
    (code0, _, err0), (code1, _, _) = _ranks_by_hand(["-q", "evaluate-gaps", run], env)
    assert code1 == -9  # killed at its second batch file
    assert code0 == 2 and "rank 1 of 2 has not answered for 4 s" in err0, err0[-2000:]
    assert "Traceback" not in err0
    assert not (run / "gaps" / "test.csv").exists()
    before = _parts(run)
    assert before  # rank 0's batches, and rank 1's first, survive

    proc = _torchrun(["-q", "evaluate-gaps", run], _env(tmp_path))
    assert proc.returncode != 0 and "pass --resume to keep them" in proc.stderr
    proc = _torchrun(["-q", "evaluate-gaps", run, "--resume"], _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _parts(run)
    assert {k: after[k] for k in before} == before  # nothing finished was recomputed
    assert len(after) > len(before)
    assert (run / "gaps" / "test.csv").read_bytes() == (one_process / "gaps" / "test.csv").read_bytes()


def test_shards_wait_for_each_others_brief_holds_but_not_for_a_whole_run(tmp_path):
    from gapbench.lock import FolderInUse, folder_lock

    holder = ("import sys, time\nfrom gapbench.lock import folder_lock\n"
              "with folder_lock(sys.argv[1], 'holder', wait=float(sys.argv[2])):\n"
              "    print('held', flush=True); time.sleep(float(sys.argv[3]))\n")
    env = _env(tmp_path)
    for brief, expect_wait in ((1.0, True), (0.0, False)):
        p = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "run"), str(brief), "1.5"], env=env,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        started = time.monotonic()
        if expect_wait:
            with folder_lock(tmp_path / "run", "shard", wait=30):
                waited = time.monotonic() - started
            assert 0.5 < waited < 30
        else:
            with pytest.raises(FolderInUse, match="holder"):
                with folder_lock(tmp_path / "run", "shard", wait=30):
                    pass
            assert time.monotonic() - started < 5
        p.wait(timeout=30)


def test_the_repository_array_script_runs_as_three_tasks(one_process, trained_tiny, tmp_path):
    """scripts/slurm/evaluate_array.sbatch, run as a scheduler would run its three array tasks."""
    script = REPO_ROOT / "scripts" / "slurm" / "evaluate_array.sbatch"
    run = _copy(trained_tiny, tmp_path / "run")
    env = _env(tmp_path, RUN=str(run), SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_TASK_MIN="0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for task in (1, 0, 2):
        proc = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert ("this shard's batches are done" in proc.stdout) == (task != 2)
    assert (run / "gaps" / "test.csv").read_bytes() == (one_process / "gaps" / "test.csv").read_bytes()
