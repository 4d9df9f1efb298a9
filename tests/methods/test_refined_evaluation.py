"""evaluate-gaps and report for a method with a test-time refinement (``Method.refines``).

A fake method stands in for the real ones (registered for the test as method svi): its refinement is
a few Adam steps of the local FFG fit from the encoder's q, with ``train.svi.num_steps`` and
``train.svi.lr``. The run is the tiny trained digits run of the stage tests with its recipe's
train.method set to svi; the fake adds nothing to the model, so the checkpoint loads as it is.
"""

import json
import logging
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import gapbench.methods
from gapbench.errors import GapbenchError
from gapbench.evaluate import evaluate_run
from gapbench.gaps import decompose, order_pairs, summarize
from gapbench.methods.vae import VAE
from gapbench.models.posterior import DiagonalGaussian
from gapbench.report import ROWS, make_report
from tests.stages.conftest import trained_tiny  # noqa: F401 (a fixture)
from tests.tolerance import float_tol

# Faster than the tiny recipe's own evaluation, and enough for every check here.
FAST = ["evaluate.families=[ffg]", "evaluate.ais.enabled=false", "evaluate.local.max_steps=60"]
CSV_ROUNDING = 0.5e-6  # the gaps CSV keeps six decimals


class FakeSVI(VAE):
    """A stand-in for SVI's test-time refinement: train.svi.num_steps Adam steps of each point's FFG from q."""

    name = "svi"
    paper = "(test)"
    objective = "the VAE's ELBO"
    refines = True

    def refine(self, x):
        from gapbench.inference import fit_local

        s = self.settings
        return fit_local(self.model, x, family="ffg", init=self.model.posterior(x).detach(), lr=s.lr,
                         num_samples=s.num_samples, check_every=s.num_steps, patience=1, max_steps=s.num_steps,
                         num_final_samples=1).q


class FarOff(FakeSVI):
    """A deliberately bad refinement: q's means moved 5 standard deviations away, so L[q_refined] < L[q]."""

    def refine(self, x):
        p = self.model.encode(x)
        return DiagonalGaussian(self.model.latent_dim).posterior(
            {"mean": p["mean"] + 5 * (0.5 * p["log_var"]).exp(), "log_var": p["log_var"]})


class Meddling(FakeSVI):
    """A refinement that trains the decoder: not allowed."""

    def refine(self, x):
        with torch.no_grad():
            next(self.model.decoder.parameters()).add_(1.0)
        return self.model.posterior(x)


def _register(monkeypatch, cls):
    """Method svi is ``cls`` for this test; every other method is the registry's own."""
    real = gapbench.methods.get_method
    monkeypatch.setattr(gapbench.methods, "get_method", lambda name: cls if name == "svi" else real(name))


def _as_method_run(src, dst, method="svi", **settings):
    """A copy of run ``src`` whose recipe says it was trained with ``method`` (its section updated)."""
    shutil.copytree(src, dst)
    recipe = yaml.safe_load((dst / "recipe.yaml").read_text())
    recipe["train"]["method"] = method
    recipe["train"].setdefault(method, {}).update(settings)
    (dst / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return dst


@pytest.fixture
def refined_run(trained_tiny, tmp_path, monkeypatch):  # noqa: F811
    _register(monkeypatch, FakeSVI)
    return _as_method_run(trained_tiny, tmp_path / "svi", num_steps=20, lr=0.05, num_samples=5)


def _gaps(run):
    return pd.read_csv(run / "gaps" / "test.csv"), json.loads((run / "gaps" / "test.json").read_text())


def _files(run):
    return {p.name: p.stat().st_mtime_ns for p in (run / "gaps" / ".partial" / "test").glob("*.pt")}


def test_refined_stage_follows_the_amortized_one_and_splits_the_amortization_gap(refined_run):
    summary = evaluate_run(refined_run, overrides=FAST)
    df, js = _gaps(refined_run)
    assert list(js["stage_seconds"])[:2] == ["amortized", "refined"]
    for col in ("elbo_refined", "elbo_refined_se", "refinement_gain", "remaining_amortization_gap"):
        assert col in df and np.isfinite(df[col]).all(), col
    assert (df.elbo_refined_se > 0).all()
    # the split adds up to the amortization gap, per point (up to the CSV's rounding of three numbers)
    assert np.abs(df.refinement_gain + df.remaining_amortization_gap - df.amortization_gap).max() <= 3 * CSV_ROUNDING
    assert np.abs(df.refinement_gain - (df.elbo_refined - df.elbo_q)).max() <= 3 * CSV_ROUNDING
    # and on average: means over the same points, straight from the summary
    s = js["stats"]
    total = s["refinement_gain"]["mean"] + s["remaining_amortization_gap"]["mean"]
    assert abs(total - s["amortization_gap"]["mean"]) <= float_tol(torch.float64, s["elbo_q"]["mean"], num_terms=24)
    for key in ("elbo_refined", "refinement_gain", "remaining_amortization_gap"):
        assert s[key]["mean"] == pytest.approx(df[key].mean(), abs=CSV_ROUNDING)
        assert s[key]["se"] == pytest.approx(df[key].std(ddof=1) / math.sqrt(len(df)), abs=CSV_ROUNDING)
    # 20 Adam steps from q close part of the gap, not all of it
    assert 0 < s["refinement_gain"]["mean"] < s["amortization_gap"]["mean"]
    assert js["refinement"] == {"method": "svi", "family": "ffg"}
    assert {"elbo_q > elbo_refined", "elbo_refined > elbo_ffg", "elbo_refined > log_px"} <= set(js["order_violations"])
    assert "closed by refinement" in summary.summary_line()


def test_refined_elbo_is_the_methods_refinement_under_the_stage_seed(refined_run):
    """Batch 0 recomputed by hand: the method built on the loaded model, seeded as its stage, many samples."""
    from gapbench.evaluate import _stage_seed
    from gapbench.experiment import evaluation_split, load_inputs, load_trained_model, open_run
    from gapbench.inference.bounds import elbo_and_stderr

    evaluate_run(refined_run, overrides=FAST)
    df, _ = _gaps(refined_run)
    run = open_run(refined_run, FAST)
    inputs = load_inputs(run.recipe)
    model = load_trained_model(run, inputs, torch.device("cpu"))
    x = evaluation_split(inputs, run.recipe, "test")[torch.tensor(df["index"].tolist()[:5])]
    method = gapbench.methods.build_method(model, run.recipe.train)
    torch.manual_seed(_stage_seed(run.recipe.seed, "refined", 0))
    value, se = elbo_and_stderr(model, x, method.refine(x), run.recipe.evaluate.elbo_samples)
    assert np.abs(df.elbo_refined.to_numpy()[:5] - value.numpy()).max() <= CSV_ROUNDING + 1e-6
    assert np.abs(df.elbo_refined_se.to_numpy()[:5] - se.numpy()).max() <= CSV_ROUNDING + 1e-6


def test_a_refinement_worse_than_q_is_flagged_per_point_and_kept(trained_tiny, tmp_path, monkeypatch):  # noqa: F811
    _register(monkeypatch, FarOff)
    run = _as_method_run(trained_tiny, tmp_path / "far")
    evaluate_run(run, overrides=FAST)
    df, js = _gaps(run)
    assert (df.elbo_refined < df.elbo_q).all() and (df.refinement_gain < 0).all()  # kept, never clipped
    assert np.abs(df.refinement_gain + df.remaining_amortization_gap - df.amortization_gap).max() <= 3 * CSV_ROUNDING
    assert not df.order_ok.astype(bool).any()
    v = js["order_violations"]["elbo_q > elbo_refined"]
    assert v["count"] == len(df) == js["num_order_violations"]
    assert v["max_size"] == pytest.approx(-df.refinement_gain.min(), abs=CSV_ROUNDING)


def test_a_refinement_that_changes_the_model_is_an_error(trained_tiny, tmp_path, monkeypatch):  # noqa: F811
    _register(monkeypatch, Meddling)
    run = _as_method_run(trained_tiny, tmp_path / "meddling")
    with pytest.raises(GapbenchError, match="refine\\(\\) changed the model"):
        evaluate_run(run, overrides=FAST)


def test_resume_recomputes_the_refinement_when_the_method_settings_change(refined_run, caplog):
    evaluate_run(refined_run, overrides=FAST)
    before, (df_before, _) = _files(refined_run), _gaps(refined_run)
    assert evaluate_run(refined_run, overrides=FAST, resume=True).reused
    recipe = yaml.safe_load((refined_run / "recipe.yaml").read_text())
    recipe["train"]["svi"]["num_steps"] = 40
    (refined_run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="gapbench.evaluate"):
        summary = evaluate_run(refined_run, overrides=FAST, resume=True)
    assert not summary.reused
    after, (df_after, _) = _files(refined_run), _gaps(refined_run)
    kept = [n for n in before if not n.startswith("refined-")]
    assert kept and all(after.get(n) == before[n] for n in kept)  # every other stage kept as it was
    new = [n for n in after if n.startswith("refined-") and n not in before]
    assert len(new) == 3  # 12 points in batches of 5
    assert any("settings.num_steps 20 -> 40" in r.getMessage() for r in caplog.records), caplog.text
    assert (df_after.elbo_refined != df_before.elbo_refined).all()
    pd.testing.assert_series_equal(df_after.elbo_ffg, df_before.elbo_ffg)


def test_report_shows_the_refinement_rows_only_for_runs_that_have_them(refined_run, trained_tiny, tmp_path):  # noqa: F811
    vae = tmp_path / "vae"
    shutil.copytree(trained_tiny, vae)
    evaluate_run(vae, overrides=FAST)
    evaluate_run(refined_run, overrides=FAST)

    make_report([vae], tmp_path / "plain")
    plain = pd.read_csv(tmp_path / "plain" / "table.csv")
    base = [key for key, _, _ in ROWS]
    assert list(dict.fromkeys(plain.quantity))[: len(base)] == base
    assert "refined" not in (tmp_path / "plain" / "table.md").read_text()

    make_report([vae, refined_run], tmp_path / "both")
    table = pd.read_csv(tmp_path / "both" / "table.csv")
    quantities = list(dict.fromkeys(table.quantity))
    assert quantities[: len(base) + 3] == ["log_px", "elbo_flow", "elbo_ffg", "elbo_refined", "elbo_q",
                                           "approximation_gap", "amortization_gap", "refinement_gain",
                                           "remaining_amortization_gap", "inference_gap"]
    df, _ = _gaps(refined_run)
    runs = list(dict.fromkeys(table.run))
    for key in ("elbo_refined", "refinement_gain", "remaining_amortization_gap"):
        cells = table[table.quantity == key].set_index("run")
        assert cells.loc[runs[1], "mean"] == pytest.approx(df[key].mean(), abs=1e-3)
        assert math.isnan(cells.loc[runs[0], "mean"])  # the vae run has no refinement: an empty cell
    md = (tmp_path / "both" / "table.md").read_text().splitlines()
    tex = (tmp_path / "both" / "table.tex").read_text()
    labels = [line.split("|")[1].strip().strip("*") for line in md if line.startswith("|")][2:]
    assert labels[2:9] == ["L[q*_FFG]", "L[q_refined]", "L[q]", "Approximation gap", "Amortization gap",
                           "Amortization gap closed by refinement", "Amortization gap remaining"]
    row = next(line for line in md if "L[q_refined]" in line)
    assert row.split("|")[2].strip() == "—" and f"{df.elbo_refined.mean():.2f} ± " in row.split("|")[3]
    assert r"$\mathcal{L}[q_{\mathrm{refined}}]$" in tex and r"\quad closed by refinement" in tex


def test_a_vae_run_gets_no_refined_stage_or_columns(trained_tiny, tmp_path):  # noqa: F811
    run = tmp_path / "vae"
    shutil.copytree(trained_tiny, run)
    evaluate_run(run, overrides=FAST)
    df, js = _gaps(run)
    assert not [c for c in df.columns if "refine" in c]
    assert not [k for k in js["stats"] if "refine" in k] and "refinement" not in js
    assert "refined" not in js["stage_seconds"] and "refined" not in js["provenance"]["stages"]
    assert not [n for n in _files(run) if n.startswith("refined")]
    assert not [name for name in js["order_violations"] if "refined" in name]


def _columns(**extra):
    base = {"elbo_q": [-10.0, -10.0], "elbo_ffg": [-9.0, -9.0], "iwae": [-8.0, -8.0]}
    return {k: np.array(v) for k, v in {**base, **extra}.items()}


@pytest.mark.parametrize("refined, bad", [
    ([-9.5, -9.5], None),  # L[q] <= L[q_refined] <= L[q*_FFG] <= log p̂: in order
    ([-9.5, -10.5], "elbo_q > elbo_refined"),
    ([-9.5, -8.5], "elbo_refined > elbo_ffg"),
    ([-9.5, -7.5], "elbo_refined > log_px"),
])
def test_each_refined_bound_order_is_checked_per_point(refined, bad):
    df = decompose(_columns(elbo_refined=refined), "ffg", ["ffg"], refined_family="ffg")
    summary = summarize(df, "ffg", ["ffg"], refined_family="ffg")
    assert df.order_ok.tolist() == [True, bad is None]
    for name, v in summary["order_violations"].items():
        assert v["count"] == (1 if name == bad or (bad == "elbo_refined > log_px" and name == "elbo_refined > elbo_ffg")
                              else 0), name
    assert df.refinement_gain.tolist() == [r + 10.0 for r in refined]
    assert df.remaining_amortization_gap.tolist() == [-9.0 - r for r in refined]


def test_a_refinement_of_no_known_family_is_held_to_log_px_only():
    pairs = order_pairs("ffg", ["ffg"], refined=True, refined_family=None)
    assert [p for p in pairs if "refined" in p[0]] == [("elbo_refined > log_px", "elbo_refined", "log_px")]
    assert order_pairs("ffg", ["ffg", "flow"]) == order_pairs("ffg", ["ffg", "flow"], refined=False,
                                                              refined_family="ffg")
