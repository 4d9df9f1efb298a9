"""gapbench run --seeds: one run per seed in sibling folders, and the report's mean over seeds (seeds.md)."""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from gapbench.cli import main
from gapbench.pipeline import parse_seeds
from gapbench.report import make_report
from tests.cli_runner import run_cli
from tests.stages.conftest import TINY

# The tiny recipe, evaluated more cheaply: one local family, six points.
CHEAP = ["--set", "evaluate.families=[ffg]", "--set", "evaluate.num_points=6", "-q"]
GAPS = ("approximation_gap", "amortization_gap", "inference_gap")


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    """(exit status, stdout, stderr, the seeds' folder) of ``gapbench run tiny.yaml --seeds 0,1 --out DIR``,
    run once for the module (a module fixture has no capsys: the streams are redirected instead)."""
    root = tmp_path_factory.mktemp("seeds")
    (root / "tiny.yaml").write_text(TINY)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in ["run", root / "tiny.yaml", "--seeds", "0,1", "--out", root / "S", *CHEAP]])
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue(), root / "S"


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3, 0-1") == [3, 0, 1]
    assert parse_seeds("7") == [7]


def test_seeds_make_sibling_runs_and_a_report(seeds_run):
    code, out, err, base = seeds_run
    assert code == 0, err
    for seed in (0, 1):
        recipe = yaml.safe_load((base / f"seed_{seed}" / "recipe.yaml").read_text())
        assert recipe["seed"] == seed
        assert (base / f"seed_{seed}" / "gaps" / "test.json").is_file()
    report = base / "report"
    for name in ("table.md", "table.csv", "seeds.md", "seeds.tex", "seeds.csv"):
        assert (report / name).is_file(), name
    # table.md keeps a column per run; seeds.md one per group of seeds, printed after it
    assert "(seed 0)" in (report / "table.md").read_text() and "(seed 1)" in (report / "table.md").read_text()
    assert "# Seeds" in out and "| seeds | 2 (0, 1) |" in out
    assert "select" in (report / "seeds.md").read_text()  # the note that each seed evaluates its own points


def test_between_seed_mean_and_se_match_the_runs(seeds_run):
    code, _, err, base = seeds_run
    assert code == 0, err
    table = pd.read_csv(base / "report" / "seeds.csv").set_index("quantity")
    stats = [json.loads((base / f"seed_{s}" / "gaps" / "test.json").read_text())["stats"] for s in (0, 1)]
    for key in ("log_px", "elbo_q", *GAPS):
        means = np.array([st[key]["mean"] for st in stats])
        ses = np.array([st[key]["se"] for st in stats])
        # two seeds: sd(m) / sqrt(2) = |m0 - m1| / 2; the CSV holds 4 decimals (rounding: 5e-5)
        expected = {"mean": means.mean(), "se_between_seeds": abs(means[0] - means[1]) / 2,
                    "se_within_runs": ses.mean()}
        for column, value in expected.items():
            assert table.loc[key, column] == pytest.approx(value, abs=5e-5 + 1e-12), (key, column)
        assert table.loc[key, "num_seeds"] == 2
    assert math.isnan(table.loc["elbo_flow", "mean"])  # not evaluated: a dash, not a number


def test_runs_differing_in_more_than_the_seed_make_no_seeds_table(seeds_run, tmp_path, monkeypatch):
    code, _, err, base = seeds_run
    assert code == 0, err
    monkeypatch.setattr("gapbench.figures.all_figures", lambda runs: [])  # tables only: figures take seconds
    other = tmp_path / "other_lr"
    shutil.copytree(base / "seed_1", other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["train"]["lr"] = 1.0e-3  # as if trained with another learning rate
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "report"
    make_report([base / "seed_0", base / "seed_1"], out_dir)
    assert (out_dir / "seeds.md").is_file()
    make_report([base / "seed_0", other], out_dir)  # a stale seeds table is removed
    assert (out_dir / "table.md").is_file()
    assert not any((out_dir / name).exists() for name in ("seeds.md", "seeds.tex", "seeds.csv"))
    make_report([base / "seed_0", base / "seed_0"], out_dir)  # one folder twice is one seed, not two
    assert not (out_dir / "seeds.md").exists()


@pytest.mark.parametrize("bad", ["a", "1-0", "0,,1", "0,0", "-1"])
def test_bad_seeds_are_one_line_errors(bad, tiny_recipe, tmp_path, capsys):
    code, out, err = run_cli(["run", tiny_recipe, "--seeds", bad, "--out", tmp_path / "S"], capsys)
    assert code == 2
    assert err.startswith("error: --seeds") and err.count("\n") == 1, err
    assert not (tmp_path / "S").exists()


def test_seeds_refuse_a_seed_override_and_a_run_folder(seeds_run, tiny_recipe, tmp_path, capsys):
    code, out, err = run_cli(["run", tiny_recipe, "--seeds", "0", "--set", "seed=3", "--out", tmp_path / "S"],
                             capsys)
    assert code == 2 and "--set seed" in err and err.count("\n") == 1
    base = seeds_run[3]
    code, out, err = run_cli(["run", tiny_recipe, "--seeds", "0", "--out", base / "seed_0"], capsys)
    assert code == 2 and "run folder" in err and err.count("\n") == 1
