"""Provenance decides reuse: results of another checkpoint, other points, settings or code are never served.

Each test reproduces one way a run folder could hand out numbers that no longer
describe it (gaps of an older checkpoint, a report of older gaps, an evaluation
discarded or resumed behind the user's back), or a recipe that could only fail
after training, and checks what gapbench does instead.
"""

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.cli_runner import run_cli
from tests.stages.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# TINY with one local family, 6 points in 2 batches and 2 epochs: a whole pipeline in about 2 s.
EPOCHS = 2
MORE = 4


def _small_recipe_text() -> str:
    tree = yaml.safe_load(TINY)
    tree["train"]["num_epochs"] = EPOCHS
    tree["evaluate"].update(num_points=6, batch_size=3, families=["ffg"])
    return yaml.safe_dump(tree, sort_keys=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _files(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _batch_files(run: Path, split: str = "test") -> dict:
    partial = run / "gaps" / ".partial" / split
    return {p.name: p.read_bytes() for p in sorted(partial.glob("*.pt"))}


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _last_line_error(err: str) -> str:
    """`gapbench run` may name the stage it starts before that stage refuses: one error line, the last."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert all(line.split(":")[0] in ("train", "evaluate-gaps", "report") for line in lines[:-1]), err
    return lines[-1]


def _gaps(run: Path) -> dict:
    return json.loads((run / "gaps" / "test.json").read_text())


def _reuse_warnings(caplog, summary) -> list:
    """The evaluation's warnings other than its convergence ones (those are recorded in the summary)."""
    convergence = {f"evaluate-gaps: {w}" for w in summary.summary.get("warnings", [])}
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("gapbench") and r.getMessage() not in convergence]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder after a whole `gapbench run` of the small recipe (train, evaluate-gaps, report)."""
    from gapbench.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("finished")
    recipe = root / "tiny.yaml"
    recipe.write_text(_small_recipe_text())
    torch.set_num_threads(1)
    run_pipeline(recipe, out=str(root / "run"))
    return root / "run"


@pytest.fixture
def run(finished, tmp_path):
    """(recipe path, a private copy of the finished run folder)."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(_small_recipe_text())
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return recipe, dst


def test_gaps_are_recomputed_after_more_training(run, tmp_path, capsys):
    recipe, r = run
    before = (r / "gaps" / "test.csv").read_text()
    code, _, err = run_cli(["-q", "train", recipe, "--set", f"train.num_epochs={MORE}", "--out", r, "--resume"], capsys)
    assert code == 0, err
    # The same checkpoint evaluated from scratch in another folder.
    fresh = tmp_path / "fresh"
    shutil.copytree(r, fresh)
    shutil.rmtree(fresh / "gaps")
    shutil.rmtree(fresh / "report")
    code, _, err = run_cli(["-q", "evaluate-gaps", fresh], capsys)
    assert code == 0, err

    code, _, err = run_cli(["-q", "evaluate-gaps", r, "--resume"], capsys)
    assert code == 0, err
    after = (r / "gaps" / "test.csv").read_text()
    # Same checkpoint, points, seeds and settings on the same CPU: the same operations, so the same digits.
    assert after == (fresh / "gaps" / "test.csv").read_text()
    assert after != before
    old, new = pd.read_csv(io.StringIO(before)), pd.read_csv(r / "gaps" / "test.csv")
    assert (old.elbo_q != new.elbo_q).all()
    assert _gaps(r)["provenance"]["checkpoint_sha256"] == _sha256(r / "checkpoint.pt")


def test_run_with_more_epochs_continues_training_and_evaluates_again(run, capsys):
    recipe, r = run
    rows_before = pd.read_csv(r / "train_log.csv")
    assert len(rows_before) == EPOCHS
    gaps_before = (r / "gaps" / "test.csv").read_text()
    code, _, err = run_cli(["-q", "run", recipe, "--set", f"train.num_epochs={MORE}", "--out", r], capsys)
    assert code == 0, err
    assert "continuing" in err and f"from epoch {EPOCHS} to {MORE}" in err, err
    rows = pd.read_csv(r / "train_log.csv")
    assert rows.epoch.tolist() == list(range(1, MORE + 1))
    assert rows.iloc[:EPOCHS].equals(rows_before)  # the first epochs are kept, not retrained
    assert yaml.safe_load((r / "recipe.yaml").read_text())["train"]["num_epochs"] == MORE
    assert (r / "gaps" / "test.csv").read_text() != gaps_before
    assert _gaps(r)["provenance"]["checkpoint_sha256"] == _sha256(r / "checkpoint.pt")


def test_run_with_a_changed_model_is_refused_naming_the_key(run, capsys):
    recipe, r = run
    before = _files(r)
    code, _, err = run_cli(["-q", "run", recipe, "--set", "model.latent_dim=3", "--out", r], capsys)
    assert code == 2
    line = _one_line_error(err)
    assert "model.latent_dim" in line and "--out" in line
    assert "--resume" not in line  # the user ran `gapbench run`, not `train --resume`
    after = _files(r)
    after.pop(".gapbench.lock", None), before.pop(".gapbench.lock", None)  # the lock note names the last holder
    assert after == before


def test_fewer_epochs_than_trained_are_refused_naming_both_numbers(run, capsys):
    recipe, r = run
    before = _sha256(r / "checkpoint.pt")
    fewer = EPOCHS - 1
    for argv in (["train", recipe, "--resume"], ["run", recipe]):
        code, _, err = run_cli(["-q", *argv, "--set", f"train.num_epochs={fewer}", "--out", r], capsys)
        assert code == 2, (argv, err)
        line = _one_line_error(err)
        assert f"{EPOCHS} epochs" in line and f"train.num_epochs={fewer}" in line, line
        assert _sha256(r / "checkpoint.pt") == before
        assert pd.read_csv(r / "train_log.csv").epoch.max() == EPOCHS


def test_batches_and_gaps_record_their_provenance(run):
    from gapbench import provenance as prov

    _, r = run
    p = _gaps(r)["provenance"]
    assert p["checkpoint_sha256"] == _sha256(r / "checkpoint.pt")
    for key in ("points_sha256", "values_sha256", "split", "num_points", "dataset"):
        assert key in p["data"], key
    assert p["data"]["num_points"] == 6
    for key in ("gapbench_version", "git_commit", "git_dirty", "torch_version", "device", "date", "seed"):
        assert key in p, key
    assert p["device"] == "cpu" and p["torch_version"] == torch.__version__
    # Every finished batch carries the fingerprint of that context (the context itself is in settings.json).
    stamp = json.loads((r / "gaps" / ".partial" / "test" / "settings.json").read_text())
    assert stamp["context"] == prov.compared({k: v for k, v in p.items() if k not in ("fingerprint", "stages")})
    assert prov.fingerprint(stamp["context"]) == p["fingerprint"] == stamp["fingerprint"]
    batches = sorted((r / "gaps" / ".partial" / "test").glob("*.pt"))
    assert batches
    for path in batches:
        saved = torch.load(path, weights_only=True)
        assert saved["provenance"]["fingerprint"] == p["fingerprint"], path.name
        assert saved["provenance"]["date"], path.name
        stage = path.name.split("-")[0]
        assert saved["provenance"]["stage_key"] == p["stages"][stage]["key"] == path.name.split("-")[1]


def test_resume_recomputes_batches_of_another_checkpoint_with_one_warning(run, caplog):
    from gapbench.evaluate import evaluate_run
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run

    recipe, r = run
    old_hash = _sha256(r / "checkpoint.pt")
    train_run(load_recipe(recipe, [f"train.num_epochs={MORE}"]), r, resume=True)
    new_hash = _sha256(r / "checkpoint.pt")
    assert new_hash != old_hash
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = evaluate_run(r, resume=True)
    assert not summary.reused
    warnings = _reuse_warnings(caplog, summary)
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    assert "checkpoint_sha256" in warnings[0] and f"{old_hash[:8]} -> {new_hash[:8]}" in warnings[0], warnings[0]
    assert _gaps(r)["provenance"]["checkpoint_sha256"] == new_hash
    for path in (r / "gaps" / ".partial" / "test").glob("*.pt"):
        assert torch.load(path, weights_only=True)["provenance"]["fingerprint"] == _gaps(r)["provenance"]["fingerprint"]


def test_changed_ais_setting_recomputes_only_ais(run, caplog, monkeypatch):
    import gapbench.evaluate as ev

    _, r = run
    before = _batch_files(r)
    csv_before = pd.read_csv(r / "gaps" / "test.csv")
    ran = []
    real_stage, real_sweep = ev.run_stage, ev._ais_sweep
    monkeypatch.setattr(ev, "run_stage", lambda stage, *a, **k: (ran.append(stage), real_stage(stage, *a, **k))[1])
    monkeypatch.setattr(ev, "_ais_sweep", lambda *a, **k: (ran.append("ais_sweep"), real_sweep(*a, **k))[1])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = ev.evaluate_run(r, overrides=["evaluate.ais.num_steps=30"], resume=True)
    assert sorted(set(ran)) == ["ais", "ais_sweep"] and ran.count("ais") == 2 and ran.count("ais_sweep") == 1
    warnings = _reuse_warnings(caplog, summary)
    assert warnings and all("num_steps 20 -> 30" in w and "\n" not in w for w in warnings), warnings
    assert not any("discarding" in w for w in warnings), warnings
    after = _batch_files(r)
    for name, data in before.items():
        if name.startswith("ais"):
            assert name not in after, name  # made with 20 steps: gone
        else:
            assert after[name] == data, name  # untouched
    assert {n.split("-")[0] for n in set(after) - set(before)} == {"ais", "ais_sweep"}
    csv = pd.read_csv(r / "gaps" / "test.csv")
    for col in ("elbo_q", "elbo_ffg", "iwae"):
        assert csv[col].equals(csv_before[col]), col
    assert not csv.ais.equals(csv_before.ais)
    assert _gaps(r)["settings"]["ais"]["num_steps"] == 30


def test_interrupted_evaluation_is_neither_dropped_nor_reused_silently(run, capsys, monkeypatch):
    import gapbench.evaluate as ev

    _, r = run
    (r / "gaps" / "test.json").unlink()
    (r / "gaps" / "test.csv").unlink()
    before = _files(r / "gaps")
    code, _, err = run_cli(["-q", "evaluate-gaps", r], capsys)
    assert code == 2
    line = _one_line_error(err)
    assert "--resume" in line and "--restart" in line
    assert _files(r / "gaps") == before

    ran = []
    real = ev.run_stage
    monkeypatch.setattr(ev, "run_stage", lambda stage, *a, **k: (ran.append(stage), real(stage, *a, **k))[1])
    code, _, err = run_cli(["-q", "evaluate-gaps", r, "--restart"], capsys)
    assert code == 0, err
    assert ran.count("amortized") == 2  # both batches computed again
    assert (r / "gaps" / "test.json").is_file() and (r / "gaps" / "test.csv").is_file()

    # After a complete evaluation, evaluate-gaps without --resume simply computes it again.
    ran.clear()
    code, _, err = run_cli(["-q", "evaluate-gaps", r], capsys)
    assert code == 0, err
    assert ran.count("amortized") == 2


def test_report_is_rebuilt_when_evaluate_gaps_changes_the_gaps(run, capsys):
    _, r = run
    assert "| datapoints (finite / all) | 6 / 6 |" in (r / "report" / "table.md").read_text()
    code, _, err = run_cli(["-q", "evaluate-gaps", r, "--set", "evaluate.num_points=4"], capsys)
    assert code == 0, err
    table = (r / "report" / "table.md").read_text()
    assert "| datapoints (finite / all) | 4 / 4 |" in table, table
    inputs = json.loads((r / "report" / "inputs.json").read_text())
    assert inputs["runs"][0]["gaps"]["test.json"] == _sha256(r / "gaps" / "test.json")
    assert inputs["runs"][0]["gaps"]["test.csv"] == _sha256(r / "gaps" / "test.csv")


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training builds a model (the checks must come first)."""
    import gapbench.train as train

    built = []
    real = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    return built


def test_too_many_points_are_refused_before_training(tmp_path, capsys, no_training):
    from gapbench.experiment import load_inputs
    from gapbench.recipe import load_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(_small_recipe_text())
    available = int(load_inputs(load_recipe(recipe)).split("test").shape[0])
    out = tmp_path / "new"
    code, _, err = run_cli(["-q", "run", recipe, "--set", "evaluate.num_points=100000", "--out", out], capsys)
    assert code == 2
    line = _last_line_error(err)
    assert "evaluate.num_points" in line and f"{available} datapoints" in line, line
    assert not out.exists()
    code, _, err = run_cli(["-q", "train", recipe, "--set", "evaluate.num_points=100000", "--out", out], capsys)
    assert code == 2
    assert "evaluate.num_points" in _one_line_error(err)
    assert not out.exists()
    assert not no_training


def test_absurd_latent_is_refused_before_training(tmp_path, capsys, monkeypatch, no_training):
    import gapbench.preflight as preflight

    # As on a machine with 32 GiB free, whatever this one has: the flow fits alone need far more.
    monkeypatch.setattr(preflight, "available_memory", lambda dev: 32 * 2**30)
    out = tmp_path / "new"
    code, _, err = run_cli(["-q", "run", QUICKSTART, "--set", "model.latent_dim=100000", "--set", "train.num_epochs=3",
                            "--set", "evaluate.families=[ffg,flow]", "--out", out], capsys)
    assert code == 2
    line = _last_line_error(err)
    assert "memory" in line and "model.latent_dim" in line, line
    assert not out.exists()
    assert not no_training


@pytest.mark.parametrize("family, kwargs", [
    ("ffg", {}),
    ("flow", {"num_flow_steps": 2, "flow_hidden": 8}),
    ("flow", {"num_flow_steps": 3, "flow_hidden": 32}),
    ("realnvp", {"num_flow_steps": 2, "flow_hidden": 8}),
])
def test_family_parameter_count_is_exact(family, kwargs):
    from gapbench.models import get_family
    from gapbench.preflight import _family_params

    for d in (1, 2, 3, 8, 16, 17, 24, 40, 64):  # counted below 17, extrapolated above
        params = get_family(family, d, **kwargs).init_params(3, device=torch.device("cpu"))
        real = sum(v[0].numel() for v in params.values())  # one datapoint's share
        assert _family_params(family, d, kwargs) == real, (family, kwargs, d)
