"""report on several runs of one recipe: a distinct column label for each; and when a report is current."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import gapbench
from gapbench.evaluate import evaluate_run
from tests.cli_runner import run_cli


def gapbench_cli(*args):
    """(exit status, stdout, stderr) of ``gapbench ARGS`` in a fresh process: a crash shows as its traceback."""
    root = str(Path(gapbench.__file__).resolve().parent.parent)  # the package under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "gapbench.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Runs A and B of the tiny recipe, seeds 1 and 2, both evaluated: the same dataset, family and run name."""
    from tests.stages.conftest import TINY

    root = tmp_path_factory.mktemp("seeds")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY)
    runs = []
    for seed, name in ((1, "A"), (2, "B")):
        assert _run_cli_plain(["train", recipe, "--set", f"seed={seed}", "--out", root / name]) == 0
        evaluate_run(root / name)
        runs.append(root / name)
    return runs


def _run_cli_plain(args):
    """Exit status of ``gapbench ARGS`` in-process, for set-up steps whose output nobody reads."""
    from gapbench.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _labels(out):
    table = pd.read_csv(out / "table.csv")
    return list(dict.fromkeys(table.run))


def _report_labels(runs, out):
    """(labels, stdout) of `gapbench report RUNS --out OUT`, which must give two distinct labels."""
    code, stdout, err = gapbench_cli("report", *runs, "--out", out)
    assert code == 0 and "Traceback" not in err, err
    labels = _labels(out)
    assert len(labels) == 2 and labels[0] != labels[1], labels
    return labels, stdout


def test_runs_of_one_recipe_get_distinct_labels_naming_their_seeds(two_seeds, tmp_path):
    a, b = two_seeds
    out = tmp_path / "both"
    labels, stdout = _report_labels([a, b], out)
    assert all(label.startswith("digits / FFG") for label in labels)
    assert "seed 1" in labels[0] and "seed 2" in labels[1], labels
    # the same labels head the Markdown and LaTeX tables
    md = (out / "table.md").read_text()
    assert md.splitlines()[0] == f"| | {labels[0]} | {labels[1]} |"
    assert md in stdout
    tex = (out / "table.tex").read_text()
    assert all(label in tex for label in labels)


def test_the_same_run_given_twice_gets_two_labels(two_seeds, tmp_path):
    a, _ = two_seeds
    out = tmp_path / "twice"
    labels, _ = _report_labels([a, a], out)
    table = pd.read_csv(out / "table.csv")
    # the same gaps under both labels
    for quantity in ("log_px", "amortization_gap"):
        rows = table[table.quantity == quantity]
        assert rows.iloc[0]["mean"] == rows.iloc[1]["mean"]


def test_a_report_is_current_until_its_gaps_change(two_seeds, tmp_path, capsys):
    from gapbench.report import report_is_current

    a, b = two_seeds
    run = tmp_path / "A"
    shutil.copytree(a, run)
    report = run / "report"
    assert not report_is_current([run], report)
    code, _, err = run_cli(["report", run], capsys)
    assert code == 0, err
    assert report_is_current([run], report)
    # made from other runs or another split, it is not this report
    assert not report_is_current([run, b], report)
    assert not report_is_current([run], report, split="train")
    # the gaps change (other points) while the report stays as it was
    evaluate_run(run, overrides=["evaluate.num_points=6"], refresh_report=False)
    assert not report_is_current([run], report)
    assert "| datapoints (finite / all) | 12 / 12 |" in (report / "table.md").read_text()
    # evaluate-gaps rebuilds the run's own report from the new gaps, so it is current again
    code, _, err = run_cli(["evaluate-gaps", run, "--num-points", "8"], capsys)
    assert code == 0, err
    assert report_is_current([run], report)
    assert "| datapoints (finite / all) | 8 / 8 |" in (report / "table.md").read_text()
