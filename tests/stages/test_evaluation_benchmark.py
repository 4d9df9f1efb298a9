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
    rows = evaluation.main(["--run", str(trained_tiny), "--recipe", str(trained_tiny.parent / "tiny.yaml"),
                            "--points", "4"])
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
    rows = evaluation.main(["--run", str(trained_tiny), "--recipe", str(trained_tiny.parent / "tiny.yaml"),
                            "--points", "3", "--set", "evaluate.local.max_steps=20"])
    ffg = rows[1]
    assert ffg["mean_steps"] <= 20 < ffg["ref_mean_steps"]  # the reference keeps the recipe's own 200 (x4)


def test_before_times_the_papers_local_fits_beside_the_fast_ones(evaluation, trained_tiny, capsys, tmp_path):
    """--before reruns every stage with the paper's local procedure (from the same starts) and prints
    the speedup per stage; the two differ in their settings, so in their step counts."""
    out_json = tmp_path / "rows.json"
    evaluation.main(["--run", str(trained_tiny), "--recipe", str(trained_tiny.parent / "tiny.yaml"), "--points", "3",
                     "--no-reference", "--before", "--json", str(out_json)])
    import json

    result = json.loads(out_json.read_text())
    before, after = result["before"], result["after"]
    assert [r["stage"] for r in before] == [r["stage"] for r in after]
    # The tiny recipe's own local keys (lr, num_samples, check_every, patience) are set in the file and
    # win over the preset; what --before changes is the gradient, the decay and the stopping threshold.
    assert any(b["mean_steps"] != a["mean_steps"] for b, a in zip(before[1:3], after[1:3]))
    out = capsys.readouterr().out
    assert "speedup" in out and "evaluate.local.procedure=paper" in out
    # --compare joins two outputs made apart (here both halves of the one above) into the same table.
    evaluation.main(["--compare", str(out_json), str(out_json)])
    table = capsys.readouterr().out
    assert table.strip() == out.strip().split("\n\n")[-1].strip()


def test_points_run_in_the_recipes_batches_with_each_batchs_seeds(evaluation, trained_tiny):
    """With evaluate.batch_size 2, 4 points are two batches (as evaluate-gaps runs them); the rows add
    their seconds and counts and average their estimates over datapoints."""
    rows = evaluation.main(["--run", str(trained_tiny), "--recipe", str(trained_tiny.parent / "tiny.yaml"),
                            "--points", "4", "--no-reference", "--set", "evaluate.batch_size=2"])
    assert all(r["points"] == 4 for r in rows) and 0 <= rows[1]["converged"] <= 4
    merged = evaluation._merge_rows([
        {"stage": "local_ffg", "seconds": 1.0, "points": 1, "estimate": -3.0, "max_steps_taken": 5, "converged": 1},
        {"stage": "local_ffg", "seconds": 2.0, "points": 3, "estimate": -1.0, "max_steps_taken": 9, "converged": 2},
    ])
    assert merged == {"stage": "local_ffg", "seconds": 3.0, "points": 4, "estimate": -1.5, "max_steps_taken": 9,
                      "converged": 3}
