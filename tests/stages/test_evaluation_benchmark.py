"""benchmarks/evaluation.py: every evaluation stage of a run, timed, with the local fits against a 4x-budget reference."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluation():
    spec = importlib.util.spec_from_file_location("evaluation_bench", REPO / "benchmarks" / "evaluation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_stage_is_timed_and_the_local_fits_meet_their_reference(evaluation, trained_tiny, capsys):
    rows = evaluation.main(["--run", str(trained_tiny), "--points", "4"])
    assert [r["stage"] for r in rows] == ["amortized", "local_ffg", "local_flow", "iwae", "ais"]
    assert all(r["seconds"] > 0 and r["points"] == 4 for r in rows)
    for r in rows[1:3]:
        # The reference is the same fit with 4x the steps and twice the patience: it takes at least as
        # many steps, and its L[q*] is a different Monte Carlo estimate of (nearly) the same optimum.
        assert r["ref_mean_steps"] >= r["mean_steps"] and 0 <= r["converged"] <= 4
        assert abs(r["diff_mean"]) < 1.0 and r["worst_shortfall"] > -1.0
    out = capsys.readouterr().out
    assert "| local_flow | 4 |" in out and "**all stages**" in out


def test_overrides_change_the_fast_fit_but_not_the_reference(evaluation, trained_tiny):
    rows = evaluation.main(["--run", str(trained_tiny), "--points", "3", "--set", "evaluate.local.max_steps=20"])
    ffg = rows[1]
    assert ffg["mean_steps"] <= 20 < ffg["ref_mean_steps"]  # the reference keeps the run's own 200 (x4)
