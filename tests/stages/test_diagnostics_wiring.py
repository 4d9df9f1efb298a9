"""evaluate.diagnostics through evaluate-gaps and report, on the tiny trained model.

The model diagnostics are one unit of work (the stage "diagnostics") on all the
evaluated points: its numbers must be those of gapbench.diagnostics on exactly
those points, the same on resume and in any shard; the CSV carries each point's
class label; the report tabulates and plots what the JSON holds.
"""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.errors import GapbenchError
from gapbench.evaluate import evaluate_run
from gapbench.report import make_report
from gapbench.scale import parse_shard
from tests.cli_runner import run_cli

MODEL_DIAGNOSTICS = ["active_units", "mutual_information", "jacobian", "iwae_curve"]
KS = [1, 2, 5, 10, 50, 100, 500, 1000, 5000]  # evaluate.diagnostic_ks' default
# One local family and no AIS keep each evaluation near a second; the diagnostics see none of it.
CHEAP = ["evaluate.families=[ffg]", "evaluate.ais.enabled=false"]
ASK = ["evaluate.diagnostics=[active_units,mutual_information,jacobian,iwae_curve,per_class,generalization]"]


def _copy(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("gaps", "report", ".gapbench.lock"))
    return dest


def _parts(run, split="test"):
    """Every finished (stage, batch) file: name -> (mtime, bytes)."""
    folder = run / "gaps" / ".partial" / split
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.pt"))}


def _summary(run, split="test"):
    return json.loads((run / "gaps" / f"{split}.json").read_text())


@pytest.fixture(scope="module")
def evaluated(trained_tiny, tmp_path_factory):
    """The tiny run with its test split evaluated with every diagnostic, and its train split with as many points."""
    run = _copy(trained_tiny, tmp_path_factory.mktemp("diag") / "run")
    evaluate_run(run, overrides=CHEAP + ASK)
    evaluate_run(run, overrides=CHEAP + ASK + ["evaluate.split=train"])
    return run


def _model_and_points(run, split="test"):
    from gapbench.evaluate import select_points
    from gapbench.experiment import evaluation_split, load_inputs, load_trained_model, open_run

    r = open_run(run)
    inputs = load_inputs(r.recipe)
    x_all = evaluation_split(inputs, r.recipe, split)
    idx = select_points(x_all.shape[0], r.recipe.evaluate.num_points, r.recipe.seed, split)
    return load_trained_model(r, inputs, torch.device("cpu")), x_all[idx], idx


def test_the_json_holds_each_diagnostic_of_exactly_the_evaluated_points(evaluated):
    from gapbench.diagnostics import active_units

    js = _summary(evaluated)
    diag = js["diagnostics"]
    assert set(MODEL_DIAGNOSTICS) | {"per_class"} == set(diag)
    assert js["provenance"]["stages"]["diagnostics"]["settings"]["diagnostics"] == MODEL_DIAGNOSTICS
    latent_dim, num_points = 2, 12
    # active units: the FFG encoder's means are exact, so the activity is a deterministic function of the points
    au = diag["active_units"]
    model, x, _ = _model_and_points(evaluated)
    want = active_units(model, x)
    assert au["latent_dim"] == latent_dim and len(au["activity"]) == latent_dim
    assert 0 <= au["num_active"] <= latent_dim and au["num_active"] == want.num_active
    # float64 variances of float32 means: agreement to float32 resolution of the activity's size
    tol = 4 * torch.finfo(torch.float32).eps * max(1.0, max(au["activity"]))
    assert np.allclose(au["activity"], want.activity.numpy(), rtol=0, atol=tol)
    # I(x; z) is the difference of the two KLs, and (own component included) at most log N
    mi = diag["mutual_information"]
    assert mi["num_points"] == num_points
    assert mi["mutual_information"] == pytest.approx(mi["kl_posterior_prior"] - mi["kl_aggregate_prior"], abs=1e-9)
    assert 0 <= mi["mutual_information"] <= math.log(num_points) + 1e-9
    jac = diag["jacobian"]
    assert jac["latent_dim"] == latent_dim and len(jac["relative_spectrum"]) == latent_dim
    assert 0 <= jac["mean_num_used"] <= latent_dim and jac["median_num_used"] in range(latent_dim + 1)
    assert jac["relative_spectrum"][0] == pytest.approx(1.0)  # each point's largest over itself
    curve = diag["iwae_curve"]
    assert curve["ks"] == KS and len(curve["gap_mean"]) == len(curve["gap_se"]) == len(KS)
    assert curve["num_finite"] == num_points and all(se > 0 for se in curve["gap_se"])
    # IWAE_1 is an unbiased estimate of the ELBO: its gap is zero within a few standard errors
    assert abs(curve["gap_mean"][0]) < 4 * curve["gap_se"][0]
    assert js["stage_seconds"]["diagnostics"] > 0


def test_the_csv_carries_each_points_class_label(evaluated):
    from gapbench.data import load_dataset
    from gapbench.diagnostics import gaps_by_class

    ds = load_dataset("digits")
    for split, labels in (("test", ds.test_labels), ("train", ds.train_labels)):
        df = pd.read_csv(evaluated / "gaps" / f"{split}.csv")
        assert list(df.columns[:3]) == ["index", "split", "label"]
        assert (df["label"].to_numpy() == labels.numpy()[df["index"].to_numpy()]).all(), split
    # the per-class summary in the JSON is gaps_by_class of that CSV
    df = pd.read_csv(evaluated / "gaps" / "test.csv")
    per_class = _summary(evaluated)["diagnostics"]["per_class"]
    table = gaps_by_class(df, df["label"])
    assert sorted(per_class, key=int) == [str(c) for c in table.index]
    assert sum(c["count"] for c in per_class.values()) == int(df["finite"].sum())
    for label, row in table.iterrows():
        assert per_class[str(label)]["amortization_gap_mean"] == pytest.approx(row["amortization_gap_mean"], abs=1e-5)


def test_every_splits_labels_line_up_with_its_images():
    """Inputs keeps the dataset's labels row for row, and each label is one of its image's in the raw file."""
    from gapbench.data import binarize, load_dataset
    from gapbench.data.digits import load_digits_set
    from gapbench.experiment import load_inputs
    from gapbench.recipe import recipe_from_dict

    recipe = recipe_from_dict({"data": {"dataset": "digits", "binarize": "threshold", "num_train": 500}})
    inputs, ds = load_inputs(recipe), load_dataset("digits")
    raw_x, raw_y = (torch.as_tensor(np.array(a)) for a in load_digits_set())
    raw_x = raw_x.reshape(raw_x.shape[0], -1).float()
    for split in ("train", "valid", "test"):
        images, labels = getattr(ds, split), getattr(ds, f"{split}_labels")
        n = inputs.split(split).shape[0]
        assert inputs.labels(split).shape == (n,)
        assert torch.equal(inputs.labels(split), labels[:n])
        assert torch.equal(inputs.split(split), binarize(images[:n], "threshold"))
        # each image's label is among the labels of the raw images equal to it (duplicates may exist)
        flat = images.reshape(images.shape[0], -1)
        same = torch.cdist(flat, raw_x, compute_mode="donot_use_mm_for_euclid_dist") == 0  # [N, 1797]: equal images
        assert same.any(1).all()
        assert (same & (raw_y[None, :] == labels[:, None])).any(1).all(), split


def test_the_report_shows_the_diagnostics_table_the_curve_and_the_classes(evaluated, tmp_path):
    from gapbench.diagnostics import encoder_generalization, gaps_by_class

    out = tmp_path / "report"
    names = {p.name for p in make_report([evaluated], out)}
    assert {"diagnostics.md", "diagnostics.tex", "diagnostics.csv", "per_class.csv",
            "iwae_gap_curve.png", "iwae_gap_curve.pdf"} <= names
    diag = _summary(evaluated)["diagnostics"]
    md = (out / "diagnostics.md").read_text()
    au, mi, jac = diag["active_units"], diag["mutual_information"], diag["jacobian"]
    assert f"| active units (of D) | {au['num_active']} / 2 |" in md
    assert f"| I(x; z) (nats) | {mi['mutual_information']:.2f} ± {mi['mutual_information_se']:.2f} |" in md
    assert f"{mi['kl_posterior_prior']:.2f} ± " in md and f"{mi['kl_aggregate_prior']:.2f} ± " in md
    assert f"(median {jac['median_num_used']:g})" in md
    table = pd.read_csv(out / "diagnostics.csv").set_index("quantity")
    assert table.loc["mutual_information", "mean"] == pytest.approx(mi["mutual_information"], abs=1e-4)
    assert table.loc["average_kl", "se"] == pytest.approx(mi["kl_posterior_prior_se"], abs=1e-4)
    assert table.loc["aggregate_kl", "mean"] == pytest.approx(mi["kl_aggregate_prior"], abs=1e-4)
    assert table.loc["jacobian_used", "mean"] == pytest.approx(jac["mean_num_used"], abs=1e-4)
    assert table.loc["jacobian_median_used", "mean"] == jac["median_num_used"]
    assert table.loc["iwae_curve_gap", "mean"] == pytest.approx(diag["iwae_curve"]["gap_mean"][-1], abs=1e-4)
    # the encoder's generalization, from the two gaps tables of equally many points
    train, test = (pd.read_csv(evaluated / "gaps" / f"{s}.csv") for s in ("train", "test"))
    g = encoder_generalization(train, test)
    assert table.loc["generalization", "mean"] == pytest.approx(g["difference"], abs=1e-4)
    assert table.loc["generalization", "se"] == pytest.approx(g["difference_se"], abs=1e-4)
    assert "encoder generalization" in md and r"\toprule" in (out / "diagnostics.tex").read_text()
    # gaps per class: the CSV's summary by label
    per_class = pd.read_csv(out / "per_class.csv")
    want = gaps_by_class(test, test["label"])
    assert per_class["class"].tolist() == want.index.tolist() and per_class["count"].tolist() == want["count"].tolist()
    assert np.allclose(per_class["inference_gap_mean"], want["inference_gap_mean"], atol=1e-4)
    assert "## Gaps per class: digits / FFG" in md
    # the report records the train split's gaps it read, so it is out of date once they change
    from gapbench.report import report_is_current

    inputs = json.loads((out / "inputs.json").read_text())
    assert set(inputs["runs"][0]["gaps"]) == {"test.json", "test.csv", "train.json", "train.csv"}
    assert report_is_current([evaluated], out)


def test_generalization_refuses_unequal_point_counts(trained_tiny, tmp_path, capsys):
    run = _copy(trained_tiny, tmp_path / "run")
    evaluate_run(run, overrides=CHEAP + ["evaluate.diagnostics=[generalization]", "evaluate.num_points=6"])
    evaluate_run(run, overrides=CHEAP + ["evaluate.split=train", "evaluate.num_points=4"], refresh_report=False)
    code, _, err = run_cli(["report", run, "--out", tmp_path / "report"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "train table has 4 rows and the held-out table 6" in err and str(run) in err
    assert not (tmp_path / "report").exists()


def test_resume_recomputes_nothing_and_a_changed_list_only_the_diagnostics(evaluated, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(evaluated, run)
    before, diag = _parts(run), _summary(run)["diagnostics"]
    # a setting no stage depends on: the gaps files are made again from the saved batches alone
    evaluate_run(run, overrides=CHEAP + ASK + ["evaluate.ais.convergence_tolerance=0.5"], resume=True)
    assert _parts(run) == before
    assert _summary(run)["diagnostics"] == diag
    # fewer model diagnostics: a new key for the diagnostics unit only, the other stages' batches kept
    evaluate_run(run, overrides=CHEAP + ["evaluate.diagnostics=[active_units,iwae_curve]"], resume=True)
    after = _parts(run)
    kept = {k: v for k, v in before.items() if not k.startswith("diagnostics-")}
    assert {k: v for k, v in after.items() if not k.startswith("diagnostics-")} == kept
    new = [k for k in after if k.startswith("diagnostics-")]
    assert len(new) == 1 and new[0] not in before
    again = _summary(run)["diagnostics"]
    assert set(again) == {"active_units", "iwae_curve"}
    # each diagnostic draws from its own seed: the same numbers whatever else is computed
    assert again["active_units"] == diag["active_units"] and again["iwae_curve"] == diag["iwae_curve"]


def test_two_shards_give_the_one_process_diagnostics(evaluated, trained_tiny, tmp_path):
    run = _copy(trained_tiny, tmp_path / "run")
    first = evaluate_run(run, overrides=CHEAP + ASK, workers=parse_shard("1/2"))
    assert first.waiting and not any(k.startswith("diagnostics-") for k in _parts(run))  # one unit: shard 0's
    evaluate_run(run, overrides=CHEAP + ASK, workers=parse_shard("0/2"))
    assert _summary(run)["diagnostics"] == _summary(evaluated)["diagnostics"]
    assert (run / "gaps" / "test.csv").read_bytes() == (evaluated / "gaps" / "test.csv").read_bytes()


def test_an_unknown_diagnostic_is_one_line_and_exit_2(trained_tiny, tmp_path, capsys):
    run = _copy(trained_tiny, tmp_path / "run")
    code, _, err = run_cli(["evaluate-gaps", run, "--set", "evaluate.diagnostics=[active_units,jacobain]"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "evaluate.diagnostics[1]" in lines[0] and "did you mean 'jacobian'" in lines[0]
    for name in ("active_units", "mutual_information", "jacobian", "iwae_curve", "per_class", "generalization"):
        assert repr(name) in lines[0]
    assert not (run / "gaps").exists()


@pytest.mark.parametrize("overrides, fragment", [
    (["model.encoder=flow", "evaluate.diagnostics=[mutual_information]"], "needs an exact log q(z|x)"),
    (["evaluate.diagnostics=[active_units]", "evaluate.num_points=1"], "needs at least 2 datapoints"),
    (["evaluate.diagnostics=[iwae_curve]", "evaluate.diagnostic_ks=[]"], "needs at least one k"),
    (["evaluate.diagnostic_ks=[1, 0]"], "evaluate.diagnostic_ks=[1, 0]: must be at least 1, got 0"),
])
def test_diagnostics_that_cannot_be_computed_are_refused_with_the_recipe(tmp_path, overrides, fragment):
    from gapbench.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("data: {dataset: digits}\n")
    with pytest.raises(GapbenchError) as info:
        load_recipe(path, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)
