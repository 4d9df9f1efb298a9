"""benchmarks/before_after.py: an earlier commit's evaluate-gaps against this checkout's, side by side.

With the checkout's own last commit as "before", both sides run the same code on the
same run, points and seeds, so every per-datapoint estimate must agree exactly: that
checks the two evaluations really share their model, points and settings.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "before_after.py"


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def _bench(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


needs_history = pytest.mark.skipif(_git("rev-parse", "HEAD").returncode != 0,
                                   reason="needs the repository's git history")


@needs_history
def test_the_last_commit_against_the_checkout_gives_the_same_estimates(trained_tiny, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text((trained_tiny / "recipe.yaml").read_text())
    result = _bench("--run", trained_tiny, "--before", "HEAD", "--points", 5, "--recipe", recipe,
                    "--work", tmp_path / "work")
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    for stage in ("L[q]", "local FFG", "local flow", "IWAE", "AIS", "**all stages**", "**evaluate-gaps, wall**"):
        assert f"| {stage} |" in out, out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"elbo_q", "elbo_ffg", "elbo_flow", "iwae", "ais", "log_px"} <= set(rows)
    clean = _git("status", "--porcelain", "--", "gapbench").stdout.strip() == ""
    if clean:  # the checkout is its last commit: the same numbers, to the CSV's last digit
        for col in ("elbo_q", "elbo_ffg", "elbo_flow", "iwae", "ais", "log_px"):
            cells = [c.strip() for c in rows[col].split("|")[1:-1]]
            assert cells[1] == cells[2] and cells[3] == "+0.000 ± 0.000", rows[col]
    assert not (tmp_path / "work" / "before_code").exists()  # its worktree is removed
    assert str(tmp_path / "work" / "before_code") not in _git("worktree", "list").stdout


@needs_history
def test_bracket_runs_the_checkout_before_and_after_and_averages(trained_tiny, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text((trained_tiny / "recipe.yaml").read_text())
    result = _bench("--run", trained_tiny, "--before", "HEAD", "--points", 3, "--recipe", recipe,
                    "--alone", "--bracket", "--work", tmp_path / "work")
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    walls = {}
    for name in ("after", "before", "after2"):  # in that order, each framed by the machine's speed
        line = next(line for line in out.splitlines() if line.startswith(f"{name}: "))
        walls[name] = float(line.split()[1].replace(",", ""))
        assert "GFLOP/s before it" in line, line
        assert (tmp_path / "work" / f"{name}_run" / "gaps" / "test.json").is_file()
    starts = [line.split(":")[0] for line in out.splitlines()]
    assert starts.index("after") < starts.index("before") < starts.index("after2")
    # the wall compared is the mean of the checkout's two runs
    row = next(line for line in out.splitlines() if line.startswith("| **evaluate-gaps, wall**"))
    cells = [c.strip(" *") for c in row.split("|")[1:-1]]
    assert float(cells[1].replace(",", "")) == pytest.approx(walls["before"], abs=0.06)
    assert float(cells[2].replace(",", "")) == pytest.approx((walls["after"] + walls["after2"]) / 2, abs=0.06)
    # the same code, seeds and points twice: the same estimates
    assert "estimates differ by at most 0 nats" in out, out


def test_bad_input_is_one_line_and_exit_2(trained_tiny, tmp_path):
    result = _bench("--run", tmp_path, "--before", "HEAD")
    assert result.returncode == 2 and "no checkpoint.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if _git("rev-parse", "HEAD").returncode == 0:
        result = _bench("--run", trained_tiny, "--before", "no-such-commit", "--work", tmp_path / "w")
        assert result.returncode == 2 and "is not a commit" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = _bench("--run", trained_tiny, "--before", "HEAD", "--bracket")
    assert result.returncode == 2 and "--bracket needs --alone" in result.stderr
