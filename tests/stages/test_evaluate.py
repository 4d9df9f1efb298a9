"""evaluate-gaps, report and run on a tiny trained model: numbers, files, resume."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.evaluate import evaluate_run, select_points
from gapbench.errors import GapbenchError
from gapbench.report import make_report


@pytest.fixture
def run_copy(trained_tiny, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_tiny, dst)
    return dst


def test_points_are_chosen_reproducibly_per_split():
    a = select_points(300, 20, seed=0, split="test")
    assert torch.equal(a, select_points(300, 20, seed=0, split="test"))
    assert not torch.equal(a, select_points(300, 20, seed=1, split="test"))
    assert torch.equal(a, a.sort().values) and len(set(a.tolist())) == 20
    with pytest.raises(GapbenchError, match="has 300 datapoints; ask for at most 300"):
        select_points(300, 301, seed=0, split="test")


def test_evaluation_writes_every_estimate_and_gap_per_datapoint(run_copy):
    started = time.time()
    summary = evaluate_run(run_copy)
    wall = time.time() - started
    # each stage's time is the sum of its batches' own times: together no more than the wall time
    assert 0 < sum(summary.summary["stage_seconds"].values()) <= wall
    df = pd.read_csv(run_copy / "gaps" / "test.csv")
    assert len(df) == 12 and df["index"].is_monotonic_increasing
    for col in ("elbo_q", "elbo_ffg", "elbo_flow", "iwae", "ais", "log_px", "approximation_gap",
                "amortization_gap", "inference_gap", "converged_ffg", "steps_flow", "order_ok", "finite"):
        assert col in df, col
    # log p̂ is the larger of the two estimates, and the gaps add up, per datapoint
    assert np.allclose(df.log_px, np.maximum(df.iwae, df.ais), atol=1e-5)
    assert np.allclose(df.approximation_gap + df.amortization_gap, df.inference_gap, atol=1e-5)
    assert np.allclose(df.amortization_gap, df.elbo_ffg - df.elbo_q, atol=1e-5)
    # the order flag says exactly where a gap came out negative (kept, not clipped)
    negative = (df.approximation_gap_ffg < 0) | (df.amortization_gap_ffg < 0) | (df.approximation_gap_flow < 0) | (df.amortization_gap_flow < 0)
    assert (~df.order_ok.astype(bool) == negative).all()
    js = json.loads((run_copy / "gaps" / "test.json").read_text())
    assert js["num_order_violations"] == int(negative.sum())
    for key in ("elbo_q", "log_px", "approximation_gap", "amortization_gap"):
        assert js["stats"][key]["mean"] == pytest.approx(df[key].mean(), abs=1e-5)
        assert js["stats"][key]["se"] == pytest.approx(df[key].std(ddof=1) / math.sqrt(len(df)), abs=1e-5)
    # the tiny model's bounds are in the expected order on average
    assert df.elbo_q.mean() < df.elbo_ffg.mean() < df.log_px.mean()
    assert summary.summary["num_points"] == 12


def test_report_table_matches_the_csv(run_copy, tmp_path):
    evaluate_run(run_copy)
    out = tmp_path / "report"
    written = make_report([run_copy], out)
    names = {p.name for p in written}
    for base in ("gaps_stacked", "gap_distributions", "local_convergence", "ais_convergence"):
        assert {f"{base}.png", f"{base}.pdf"} <= names
    assert {"table.md", "table.tex", "table.csv"} <= names
    df = pd.read_csv(run_copy / "gaps" / "test.csv")
    table = pd.read_csv(out / "table.csv")
    md = (out / "table.md").read_text()
    for key in ("log_px", "elbo_ffg", "elbo_flow", "elbo_q", "approximation_gap", "amortization_gap", "inference_gap"):
        row = table[table.quantity == key].iloc[0]
        assert row["mean"] == pytest.approx(df[key].mean(), abs=1e-3)
        assert row["se"] == pytest.approx(df[key].std(ddof=1) / math.sqrt(len(df)), abs=1e-3)
        assert f"{df[key].mean():.2f} ± " in md
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex
    # the same gaps give the same files, byte for byte (no dates in the PDFs)
    again = tmp_path / "again"
    make_report([run_copy], again)
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_report_sets_training_against_held_out_points(run_copy, tmp_path, capsys):
    from tests.cli_runner import run_cli

    from tests.stages.conftest import TINY

    evaluate_run(run_copy)
    # the training points, with the evaluation settings of another recipe file (6 points, FFG only)
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("num_points: 12", "num_points: 6"))
    code, _, err = run_cli(["evaluate-gaps", run_copy, "--recipe", other, "--split", "train", "--families", "ffg"], capsys)
    assert code == 0, err
    train = pd.read_csv(run_copy / "gaps" / "train.csv")
    assert len(train) == 6 and "elbo_flow" not in train and (train.split == "train").all()
    out = tmp_path / "both"
    code, out_text, err = run_cli(["report", run_copy, "--split", "train,test", "--out", out], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "table.csv")
    assert sorted(table.run.unique()) == ["digits / FFG [test]", "digits / FFG [train]"]
    for split in ("train", "test"):
        df = pd.read_csv(run_copy / "gaps" / f"{split}.csv")
        row = table[(table.quantity == "amortization_gap") & (table.run == f"digits / FFG [{split}]")].iloc[0]
        assert row["mean"] == pytest.approx(df["amortization_gap"].mean(), abs=1e-3)
    code, _, err = run_cli(["report", run_copy, "--split", "train,tset", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "give train, valid or test" in err and not (tmp_path / "bad").exists()


def test_an_interrupted_evaluation_resumes_to_the_same_result(run_copy, trained_tiny, tmp_path):
    """SIGKILL evaluate-gaps after some batches; --resume recomputes nothing finished and ends identical."""
    reference = tmp_path / "reference"
    shutil.copytree(trained_tiny, reference)
    evaluate_run(reference)

    cmd = [sys.executable, "-m", "gapbench.cli", "evaluate-gaps", str(run_copy)]
    partial = run_copy / "gaps" / ".partial" / "test"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("*.pt"))) < 4:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in partial.glob("*.pt")}
    assert len(finished) >= 4 and not (run_copy / "gaps" / "test.csv").exists()
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True)
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was recomputed"
    a = pd.read_csv(reference / "gaps" / "test.csv")
    b = pd.read_csv(run_copy / "gaps" / "test.csv")
    pd.testing.assert_frame_equal(a, b)


def test_run_pipeline_skips_finished_stages(tiny_recipe, tmp_path):
    from gapbench.pipeline import run_pipeline

    messages = []
    run_dir, table = run_pipeline(tiny_recipe, out=str(tmp_path / "run"), stage_callback=messages.append)
    assert "Approximation gap" in table and (run_dir / "report" / "gaps_stacked.png").is_file()
    messages.clear()
    run_pipeline(tiny_recipe, out=str(tmp_path / "run"), stage_callback=messages.append)
    assert any("already trained, skipping" in m for m in messages)
    assert any("up to date, skipping" in m for m in messages)
    # a changed evaluation setting re-evaluates without retraining
    messages.clear()
    run_pipeline(tiny_recipe, overrides=["evaluate.num_points=6"], out=str(tmp_path / "run"), stage_callback=messages.append)
    assert any("already trained" in m for m in messages) and not any("up to date" in m for m in messages)
    assert len(pd.read_csv(tmp_path / "run" / "gaps" / "test.csv")) == 6
    # so does an edited recipe file: its evaluate section is what the evaluation uses
    tiny_recipe.write_text(tiny_recipe.read_text().replace("num_points: 12", "num_points: 7"))
    run_pipeline(tiny_recipe, out=str(tmp_path / "run"), stage_callback=messages.append)
    assert len(pd.read_csv(tmp_path / "run" / "gaps" / "test.csv")) == 7


def test_resume_keeps_the_stages_whose_settings_did_not_change(run_copy):
    """Changing AIS settings (or the families) on --resume recomputes AIS only."""
    evaluate_run(run_copy)
    partial = run_copy / "gaps" / ".partial" / "test"
    before = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.pt")}
    evaluate_run(run_copy, overrides=["evaluate.ais.num_steps=25", "evaluate.families=[ffg]"], resume=True)
    after = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.pt")}
    kept = [n for n in before if not n.startswith("ais")]
    assert kept and all(after[n] == before[n] for n in kept)
    new_ais = [n for n in after if n.startswith("ais") and n not in before]
    assert len(new_ais) == 4  # 3 AIS batches and the sweep, under the new settings' key
    df = pd.read_csv(run_copy / "gaps" / "test.csv")
    assert "elbo_flow" not in df and len(df) == 12


def test_compiling_ais_is_no_reason_to_recompute_it(run_copy):
    """evaluate.ais.compile changes speed, not estimates: --resume keeps every finished batch."""
    evaluate_run(run_copy)
    partial = run_copy / "gaps" / ".partial" / "test"
    before = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.pt")}
    evaluate_run(run_copy, overrides=["evaluate.ais.compile=true"], resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in partial.glob("*.pt")} == before


def test_ais_can_start_at_each_points_fitted_ffg(run_copy):
    """ais.init: ffg runs AIS from the q*_FFG of the same batch; its key follows the local settings."""
    from gapbench.evaluate import _stage_seed
    from gapbench.experiment import load_inputs, load_trained_model, open_run
    from gapbench.inference import ais
    from gapbench.models.posterior import DiagonalGaussian

    evaluate_run(run_copy, overrides=["evaluate.ais.init=ffg"])
    partial = run_copy / "gaps" / ".partial" / "test"
    df = pd.read_csv(run_copy / "gaps" / "test.csv")
    # batch 0, recomputed by hand from its saved FFG fit with the stage's seed
    run = open_run(run_copy, ["evaluate.ais.init=ffg"])
    inputs = load_inputs(run.recipe)
    model = load_trained_model(run, inputs, torch.device("cpu"))
    from gapbench.experiment import evaluation_split

    x = evaluation_split(inputs, run.recipe, "test")[torch.tensor(df["index"].tolist()[:5])]
    (ffg_file,) = partial.glob("local_ffg-*-0000.pt")
    traces = torch.load(ffg_file, weights_only=True)["traces"]
    q = DiagonalGaussian(model.latent_dim).posterior({"mean": traces["ffg_mean"], "log_var": traces["ffg_log_var"]})
    a = run.recipe.evaluate.ais
    expected = ais(model, x, num_steps=a.num_steps, num_chains=a.num_chains, num_leapfrog=a.num_leapfrog,
                   schedule=a.schedule, init=q, seed=_stage_seed(0, "ais", 0)).log_px
    assert np.allclose(df.ais.to_numpy()[:5], expected.double().numpy(), atol=1e-5)
    assert np.isfinite(df.ais).all() and (df.ais > df.elbo_q - 1.0).all()
    # changing the local fit changes where AIS starts, so AIS is recomputed with it
    before = {p.name for p in partial.glob("ais-*.pt")}
    evaluate_run(run_copy, overrides=["evaluate.ais.init=ffg", "evaluate.local.max_steps=150"], resume=True)
    assert {p.name for p in partial.glob("ais-*.pt")} - before
