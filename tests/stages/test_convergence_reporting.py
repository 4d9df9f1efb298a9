"""Convergence in the open: local fits cut off at their step cap and AIS still rising are counted in the
summary line, the tables and the JSON, and warned about on stderr without -v, naming the key that fixes them."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gapbench
from gapbench.report import ROWS
from tests.tolerance import float_tol

MAX_STEPS = 20  # two checks of check_every 10: patience 2 cannot fire, so no fit converges by the rule
NUM_POINTS = 12  # the tiny recipe's evaluate.num_points


def gapbench_cli(*args):
    """(exit status, stdout, stderr) of ``gapbench ARGS`` in a fresh process, as a user's shell sees them.

    A fresh process, because whether a warning reaches stderr without -v depends on the logging
    set-up of the command itself, which pytest's own log handlers would hide in-process.
    """
    root = str(Path(gapbench.__file__).resolve().parent.parent)  # the package under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "gapbench.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def warning_lines(err):
    return [line for line in err.splitlines() if line.startswith("WARNING")]


@pytest.fixture(scope="module")
def capped(trained_tiny, tmp_path_factory):
    """A copy of the tiny run evaluated with every local fit cut off at MAX_STEPS, and its report."""
    run = tmp_path_factory.mktemp("capped") / "run"
    shutil.copytree(trained_tiny, run)
    evaluated = gapbench_cli("evaluate-gaps", run, "--set", f"evaluate.local.max_steps={MAX_STEPS}")
    reported = gapbench_cli("report", run)
    return run, evaluated, reported


def test_fits_cut_off_at_the_step_cap_are_counted_and_warned_about(capped):
    run, (code, out, err), _ = capped
    assert code == 0, err
    assert "Traceback" not in err
    # the summary line says how many fits converged, family by family
    assert "q*_FFG converged 0/12" in out and "q*_Flow converged 0/12" in out, out
    # one warning per family on stderr, printed without -v, naming the key that fixes it
    warned = warning_lines(err)
    for label in ("q*_FFG", "q*_Flow"):
        mine = [w for w in warned if label + ":" in w]
        assert len(mine) == 1, warned
        assert f"12 of 12 local fits stopped at the step cap (evaluate.local.max_steps={MAX_STEPS})" in mine[0]
        assert "raise evaluate.local.max_steps" in mine[0]
    # the gaps file: the counts, agreeing with the per-datapoint columns, and the warnings
    js = json.loads((run / "gaps" / "test.json").read_text())
    df = pd.read_csv(run / "gaps" / "test.csv")
    for fam in ("ffg", "flow"):
        c = js["convergence"]["local"][fam]
        assert (c["converged"], c["at_step_cap"], c["failed"], c["num_points"], c["max_steps"]) == \
            (0, NUM_POINTS, 0, NUM_POINTS, MAX_STEPS)
        assert (df[f"converged_{fam}"] == 0).all() and (df[f"steps_{fam}"] == MAX_STEPS).all()
    assert isinstance(js["warnings"], list) and len(js["warnings"]) == 2
    assert all("evaluate.local.max_steps" in w for w in js["warnings"])
    assert js["settings"]["local"]["max_steps"] == MAX_STEPS


def test_the_tables_show_the_converged_counts(capped):
    run, _, (code, out, err) = capped
    assert code == 0 and "Traceback" not in err, err
    md = (run / "report" / "table.md").read_text()
    tex = (run / "report" / "table.tex").read_text()
    csv = pd.read_csv(run / "report" / "table.csv")
    for label, name in (("FFG", "ffg"), ("Flow", "flow")):
        assert f"| q*_{label} converged (stopping rule) | 0 / 12 (12 at step cap) |" in md, md
        assert rf"$q^*_{{\mathrm{{{label}}}}}$ converged & 0 / 12 (12 at step cap) \\" in tex, tex
        row = csv[csv.quantity == f"converged_{name}"]
        assert len(row) == 1 and row.iloc[0]["mean"] == 0 and row.iloc[0]["n"] == NUM_POINTS
    # the report printed by the command is the Markdown table
    assert "0 / 12 (12 at step cap)" in out


def _md_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("|")][2:]  # after the header and the rule
    return [line.split("|")[1].strip().strip("*") for line in lines]


def _tex_rows(tex):
    lines = [line for line in tex.splitlines() if line.endswith(r"\\")][1:]  # after the column labels
    return [line.split(" & ")[0] for line in lines]


def test_markdown_latex_and_csv_tables_have_the_same_rows(capped):
    run, _, (code, _, err) = capped
    assert code == 0, err
    md = _md_rows((run / "report" / "table.md").read_text())
    tex = _tex_rows((run / "report" / "table.tex").read_text())
    quantities = list(dict.fromkeys(pd.read_csv(run / "report" / "table.csv").quantity))
    extra = ["num_finite", "num_order_violations", "converged_ffg", "converged_flow", "ais_last_doubling_change"]
    assert quantities == [key for key, _, _ in ROWS] + extra
    assert len(md) == len(tex) == len(quantities), (md, tex, quantities)
    assert md[: len(ROWS)] == [label for _, label, _ in ROWS]
    assert tex[: len(ROWS)] == [label for _, _, label in ROWS]
    # the rows the LaTeX table used to lack, in the same place as in the Markdown one
    for label in ("datapoints (finite / all)", "bounds out of order", "AIS change at the end of the sweep"):
        assert md.index(label) == tex.index(label), label
    tex_text = (run / "report" / "table.tex").read_text()
    assert r"datapoints (finite / all) & 12 / 12 \\" in tex_text


TIGHT = 1e-6  # nats: far below any change AIS makes between 10 and 20 steps from the prior


@pytest.fixture(scope="module")
def rising(trained_tiny, tmp_path_factory):
    """A copy of the tiny run whose AIS starts at the prior with 20 steps, judged with a tolerance it cannot meet."""
    run = tmp_path_factory.mktemp("rising") / "run"
    shutil.copytree(trained_tiny, run)
    result = gapbench_cli("evaluate-gaps", run, "--set", "evaluate.ais.init=prior", "--set", "evaluate.ais.num_steps=20",
                          "--set", f"evaluate.ais.convergence_tolerance={TIGHT}")
    return run, result


def test_ais_still_rising_is_measured_over_the_last_doubling_and_warned_about(rising):
    run, (code, out, err) = rising
    assert code == 0 and "Traceback" not in err, err
    js = json.loads((run / "gaps" / "test.json").read_text())
    a = js["convergence"]["ais"]
    assert (a["from_steps"], a["to_steps"]) == (10, 20)
    sweep = js["traces"]["ais_sweep"]
    assert sweep["num_steps"] == [2, 6, 10, 20]
    # the change is the mean over the sweep's points of (estimate at 20 steps - estimate at 10)
    log_px = np.array([[math.nan if v is None else v for v in point] for point in sweep["log_px"]])  # [n, G]
    diff = log_px[:, 3] - log_px[:, 2]
    diff = diff[np.isfinite(diff)]
    assert a["num_points"] == diff.size > 1
    tol = float_tol(torch.float64, np.abs(log_px).max(), num_terms=diff.size)
    assert abs(a["change"] - diff.mean()) <= tol
    assert abs(a["se"] - diff.std(ddof=1) / math.sqrt(diff.size)) <= tol
    assert abs(a["change"]) > TIGHT and a["tolerance"] == TIGHT and a["converged"] is False
    # warned on stderr without -v, and recorded, naming the key that fixes it
    warned = [w for w in warning_lines(err) if "AIS moved" in w]
    assert len(warned) == 1, err
    assert "from 10 to 20 steps" in warned[0] and "raise evaluate.ais.num_steps" in warned[0]
    assert f"evaluate.ais.convergence_tolerance={TIGHT:g}" in warned[0]
    recorded = [w for w in js["warnings"] if "AIS moved" in w]
    assert len(recorded) == 1 and recorded[0] in warned[0]
    assert "over the last doubling of steps (10 -> 20)" in out


def test_the_sweep_takes_its_longest_run_from_the_evaluation_own_ais(rising):
    """The sweep's run at the recipe's num_steps is the evaluation's AIS of batch 0's first points
    (the same numbers, not a second run), and its shorter runs are its own."""
    run, (code, _, err) = rising
    assert code == 0, err
    js = json.loads((run / "gaps" / "test.json").read_text())
    sweep = js["traces"]["ais_sweep"]
    log_px = np.array([[math.nan if v is None else v for v in point] for point in sweep["log_px"]])  # [n, G]
    df = pd.read_csv(run / "gaps" / "test.csv")
    main = df["ais"].to_numpy()[: log_px.shape[0]]
    csv_resolution = 0.5e-6  # the CSV's values are written with 6 decimals
    assert np.all(np.abs(log_px[:, -1] - main) <= csv_resolution)
    assert np.all(np.abs(log_px[:, -2] - main) > csv_resolution)  # 10 steps: a run of its own


def _resume_with_tolerance(rising, tmp_path, tolerance):
    run = tmp_path / "run"
    shutil.copytree(rising[0], run)
    partial = run / "gaps" / ".partial" / "test"
    before = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.pt")}
    result = gapbench_cli("evaluate-gaps", run, "--set", "evaluate.ais.init=prior", "--set", "evaluate.ais.num_steps=20",
                          "--set", f"evaluate.ais.convergence_tolerance={tolerance}", "--resume")
    after = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.pt")}
    return run, result, before, after


def test_a_new_tolerance_is_no_reason_to_recompute_ais(rising, tmp_path):
    """The tolerance only decides whether to warn: it is not part of the AIS stages' key."""
    _, (code, _, err), before, after = _resume_with_tolerance(rising, tmp_path, 100)
    assert code == 0 and "Traceback" not in err, err
    ais = [n for n in before if n.startswith("ais")]
    assert any(n.startswith("ais_sweep") for n in ais) and any(n.startswith("ais-") for n in ais)
    assert after == before  # no batch file was rewritten, AIS's least of all


def test_a_new_tolerance_judges_the_same_ais_estimates_again(rising, tmp_path):
    run, (code, out, err), _, _ = _resume_with_tolerance(rising, tmp_path, 100)
    assert code == 0, err
    js = json.loads((run / "gaps" / "test.json").read_text())
    assert js["settings"]["ais"]["convergence_tolerance"] == 100
    assert js["convergence"]["ais"]["tolerance"] == 100 and js["convergence"]["ais"]["converged"] is True
    assert not [w for w in js["warnings"] if "AIS moved" in w]
    assert not [w for w in warning_lines(err) if "AIS moved" in w]
