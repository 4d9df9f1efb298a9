"""gapbench plan: what `gapbench run` would do, and a time per stage from a short calibration."""

import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from gapbench.plan import PointCost, duration, local_batch_seconds, make_plan
from gapbench.recipe import load_recipe
from tests.cli_runner import run_cli
from tests.stages.conftest import TINY, trained_tiny  # noqa: F401  (the fixture, shared with tests/stages)

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
LABELS = ["train (vae)", "L[q] (amortized)", "L[q*_FFG] (local)", "L[q*_Flow] (local)", "IWAE", "AIS",
          "AIS convergence sweep"]
_SECONDS = {"s": 1, "min": 60, "h": 3600, "days": 86400}


def _table(out: str):
    """{stage label: (work, estimate s, upper s or None)} from the printed table's rows (between its rules)."""
    lines = out.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-----")]
    assert len(rules) == 2, out
    rows = {}
    for line in lines[rules[0] + 1 : rules[1]]:
        m = re.match(r"^(.+?)  +(.+?)  +(\d+(?:\.\d+)?) (s|min|h|days)(?:  +(\d+(?:\.\d+)?) (s|min|h|days))?$", line)
        assert m, f"unreadable row: {line!r}"
        upper = float(m[5]) * _SECONDS[m[6]] if m[5] else None
        rows[m[1].strip()] = (m[2].strip(), float(m[3]) * _SECONDS[m[4]], upper)
    return rows


def test_quickstart_plan_prints_every_stage_with_a_positive_estimate(tmp_path, capsys):
    started = time.perf_counter()
    code, out, err = run_cli(["plan", QUICKSTART, "--out", tmp_path / "run"], capsys)
    took = time.perf_counter() - started
    assert code == 0, err
    assert took < 20, f"planning took {took:.1f} s"
    rows = _table(out)
    assert list(rows) == LABELS
    for label, (work, seconds, upper) in rows.items():
        assert seconds > 0, label
        if upper is not None:  # local fits: the bound takes every point to max_steps
            assert upper > seconds, label
    # The work is the recipe's: 60 epochs of ceil(1,197 / 50) = 24 steps; one batch of 100 points.
    assert rows["train (vae)"][0].startswith("60 epochs x 24 steps of 50")
    assert rows["AIS"][0] == "1 batch x 100 points x 16 chains x 200 steps of 10 leapfrog"
    assert rows["L[q*_FFG] (local)"][0] == "1 batch x 100 points, <= 5,000 steps each"
    assert "train quickstart from scratch (60 epochs)" in out
    assert "every stage, on the new checkpoint" in out
    assert "1 CPU thread" in out  # what the estimate assumes
    assert not (tmp_path / "run").exists()  # a plan writes nothing


@pytest.mark.parametrize("power", [0.0, 0.6, 1.0, 1.7])
def test_a_batch_of_local_fits_costs_the_sum_over_its_steps(power):
    """The closed form against the sum over steps of c(active points), for points whose step counts
    are spread evenly between L = 2 mean - slowest and slowest."""
    n, mean, slowest = 400, 900.0, 1400.0
    cost = PointCost(at_n=0.02, n=n, power=power)
    low = 2 * mean - slowest
    stops = low + (slowest - low) * (torch.arange(n, dtype=torch.float64) + 0.5) / n  # [n], mean 900
    t = torch.arange(1, int(slowest) + 1, dtype=torch.float64)
    active = (stops[None, :] >= t[:, None]).sum(1).double()  # [steps] points still running at step t
    summed = (cost.at_n * (active / n) ** power).sum().item()
    # Step counts are whole numbers: each point's stop is off by < 1 step, ~1/mean of the total.
    assert local_batch_seconds(cost, n, mean, slowest) == pytest.approx(summed, rel=2 / mean)


def test_the_cost_per_point_is_fitted_through_two_timings(tmp_path):
    """Work that takes 2 ms x m^1.5 per unit on m points gives power 1.5 and its cost on n points."""
    from gapbench.plan import _Timer

    timer = _Timer(torch.device("cpu"), budget=0.05)
    unit = lambda m: 0.002 * m**1.5  # noqa: E731
    cost = timer.per_point("sleeping", lambda m: (lambda k: time.sleep(k * unit(m))), 8, max_units=1000)
    # time.sleep overshoots by about 0.1 ms a call, spread over the units of a timed call.
    assert cost.power == pytest.approx(1.5, abs=0.1)
    assert cost(8) == pytest.approx(unit(8), rel=0.1)
    assert cost(20) == pytest.approx(unit(20), rel=0.2)


def test_a_calls_own_cost_is_not_counted_per_unit():
    """Work of 2 ms a unit behind 40 ms a call (a local fit's setup and final estimate): 2 ms a unit,
    where t(k) / k at the k the budget allows would be several times that."""
    from gapbench.plan import _Timer

    timer = _Timer(torch.device("cpu"), budget=0.05)
    per_unit = timer.per_unit(lambda k: time.sleep(0.040 + 0.002 * k), max_units=1000)
    # time.sleep overshoots by about 0.1 ms a call: within 0.2 ms over the units of the timed calls.
    assert per_unit == pytest.approx(0.002, abs=2e-4)
    # at max_units the timed run is the whole work: its time per unit, call cost included
    assert timer.per_unit(lambda k: time.sleep(0.040 + 0.002 * k), max_units=4) == pytest.approx(0.012, rel=0.1)


def test_a_trained_run_is_not_trained_again(trained_tiny, tmp_path, capsys):  # noqa: F811
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    code, out, err = run_cli(["plan", recipe, "--out", trained_tiny], capsys)
    assert code == 0, err
    assert f"{trained_tiny} is already trained, skipping (4 epochs)" in out
    train = next(line for line in out.splitlines() if line.startswith("train (vae)"))
    assert "4 epochs (already trained)" in train and "reused" in train
    assert "every stage (no finished evaluation" in out


def test_a_run_that_would_stop_says_why_and_is_not_timed(trained_tiny, tmp_path, capsys):  # noqa: F811
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    code, out, err = run_cli(["plan", recipe, "--out", trained_tiny, "--set", "model.latent_dim=3"], capsys)
    assert code == 0, err
    assert "refuse to continue the run folder" in out
    assert "was trained with other settings (model.latent_dim 2 -> 3)" in out
    assert "no time estimate" in out


def test_a_finished_evaluation_is_reused_and_a_missing_batch_recomputed(trained_tiny, tmp_path):  # noqa: F811
    from gapbench.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(trained_tiny, run)
    (tmp_path / "tiny.yaml").write_text(TINY)
    recipe = load_recipe(tmp_path / "tiny.yaml")
    evaluate_run(run)

    plan = make_plan(recipe, run, budget=0.02)
    assert dict(plan.actions)["evaluate"].startswith(f"reuse {run / 'gaps' / 'test.json'}")
    assert all(s.seconds == 0 and s.reused for s in plan.stages)

    # Without the gaps file, the finished batches are reused and only the missing one is computed.
    (run / "gaps" / "test.json").unlink()
    (next((run / "gaps" / ".partial" / "test").glob("ais-*-0002.pt"))).unlink()
    plan = make_plan(recipe, run, budget=0.02)
    stages = {s.stage: s for s in plan.stages}
    # 12 points in batches of 5: 3 batches per stage, one AIS sweep: 6 x 3 + 1 = 16, one missing.
    assert dict(plan.actions)["evaluate"] == "resume: 15 of 16 stage batches are finished and reused"
    assert stages["ais"].reused == "2 of 3 batches reused" and stages["ais"].seconds > 0
    assert stages["iwae"].reused == "all 3 reused" and stages["iwae"].seconds == 0


def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: digits}\ntrain: {num_epoch: 3}\n")
    code, out, err = run_cli(["plan", bad], capsys)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if not line.startswith("plan:")]
    assert len(lines) == 1 and "unknown key train.num_epoch" in lines[0] and "num_epochs" in lines[0]


def test_without_the_data_the_registry_gives_the_shapes(tmp_path, monkeypatch):
    """When the dataset cannot be loaded, the plan still times every stage, on random images of the
    registry's shape, with the split sizes loading would have given."""
    import gapbench.experiment
    from gapbench.data.errors import DataError
    from gapbench.plan import _registry_inputs

    recipe = load_recipe(QUICKSTART, ["data.num_valid=200", "data.num_train=900", "evaluate.num_points=10",
                                      "evaluate.local.max_steps=200"])
    loaded = gapbench.experiment.load_inputs(recipe)
    stand_in = _registry_inputs(recipe)
    for split in ("train", "valid", "test"):
        assert stand_in.split(split).shape == loaded.split(split).shape, split

    def missing(recipe):
        raise DataError("digits is not on this machine; gapbench datasets --download digits")

    monkeypatch.setattr(gapbench.experiment, "load_inputs", missing)
    plan = make_plan(recipe, tmp_path / "run", budget=0.02)
    assert plan.data.startswith("not loaded (digits is not on this machine)")
    stages = ["train", "amortized", "local_ffg", "local_flow", "iwae", "ais", "ais_sweep"]
    assert [s.stage for s in plan.stages] == stages
    assert all(s.seconds > 0 for s in plan.stages)
    assert any("random images" in n for n in plan.notes)


@pytest.mark.parametrize("seconds, shown", [(0.42, "0.4 s"), (45, "45 s"), (192, "3.2 min"), (5400, "90.0 min"),
                                            (7200, "2.0 h"), (3 * 86400, "3.0 days")])
def test_duration(seconds, shown):
    assert duration(seconds) == shown
