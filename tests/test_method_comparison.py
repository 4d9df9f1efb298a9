"""The method comparison: paired differences against vae, timings, notes and figures, on run folders made by hand
(recipe.yaml, train_log.csv, gaps/test.csv and .json) and on the committed digits runs."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gapbench.method_comparison import (NOT_PAIRED, compare_methods, is_method_comparison, load_method_runs,
                                        method_table, table_notes, wide_table)

COMMITTED = Path(__file__).resolve().parent.parent / "results" / "methods-digits"
METHODS = ["vae", "iwae", "svi", "savae", "iterative", "aggressive", "hmc", "air", "bsvi"]
NUM_POINTS = 40
QUANTITIES = ["log_px", "elbo_ffg", "elbo_refined", "elbo_q", "approximation_gap", "amortization_gap",
              "refinement_gain", "remaining_amortization_gap", "inference_gap"]


def _stats(df):
    ok = df[df["finite"]]
    n = len(ok)
    return {k: {"mean": float(ok[k].mean()), "se": float(ok[k].std(ddof=1) / math.sqrt(n)), "n": n}
            for k in QUANTITIES if k in ok}


def make_run(root, name, method, points, seconds, stage_seconds, seed=0):
    """A run folder as train and evaluate-gaps leave it (less the checkpoint), from per-point columns."""
    path = Path(root) / name
    (path / "gaps").mkdir(parents=True)
    recipe = yaml.safe_load((COMMITTED / "digits_vae" / "recipe.yaml").read_text())
    recipe.update(name=name, seed=seed)
    recipe["train"]["method"] = method
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    epochs = np.arange(1, len(seconds) + 1)
    pd.DataFrame({"epoch": epochs, "lr": 0.003, "kl_weight": 1.0, "train_objective": -20.0, "train_elbo": -20.0,
                  "valid_elbo": -30.0 + 10 * (1 - np.exp(-epochs / 3)), "seconds": seconds,
                  "images_per_s": 1000.0 / np.asarray(seconds)}).to_csv(path / "train_log.csv", index=False)
    df = pd.DataFrame(points)
    df["approximation_gap"] = df["log_px"] - df["elbo_ffg"]
    df["amortization_gap"] = df["elbo_ffg"] - df["elbo_q"]
    df["inference_gap"] = df["log_px"] - df["elbo_q"]
    if "elbo_refined" in df:
        df["refinement_gain"] = df["elbo_refined"] - df["elbo_q"]
        df["remaining_amortization_gap"] = df["elbo_ffg"] - df["elbo_refined"]
    if "finite" not in df:
        df["finite"] = True
    df.to_csv(path / "gaps" / "test.csv", index=False, float_format="%.6f")
    summary = {"num_points": len(df), "num_finite": int(df["finite"].sum()), "num_order_violations": 0,
               "encoder_family": "ffg", "families": ["ffg"], "stats": _stats(df), "dataset": "digits",
               "split": "test", "seed": seed, "device": "cpu", "stage_seconds": stage_seconds,
               "settings": {"elbo_samples": 5000}}
    (path / "gaps" / "test.json").write_text(json.dumps(summary))
    return path


def vae_points(rng):
    """Datapoints whose gaps spread widely (sd ≈ 3 nats) from point to point: what pairing cancels."""
    log_px = rng.normal(-100.0, 10.0, NUM_POINTS)
    approx = rng.uniform(0.2, 0.6, NUM_POINTS)
    amort = np.exp(rng.normal(0.5, 1.0, NUM_POINTS))
    return {"index": np.arange(NUM_POINTS) * 3, "log_px": log_px, "elbo_ffg": log_px - approx,
            "elbo_q": log_px - approx - amort}


def method_points(base, rng, shift=0.5, noise=0.05, refined=False, order=None):
    """The same datapoints, each amortization gap the vae's plus ``shift`` and a little noise; rows reordered."""
    pts = {k: v.copy() for k, v in base.items()}
    pts["elbo_q"] = pts["elbo_q"] - shift - rng.normal(0.0, noise, NUM_POINTS)
    if refined:
        pts["elbo_refined"] = pts["elbo_q"] + 0.8 * (pts["elbo_ffg"] - pts["elbo_q"])
    order = rng.permutation(NUM_POINTS) if order is None else order
    return {k: v[order] for k, v in pts.items()}


@pytest.fixture
def runs(tmp_path):
    """vae, svi (refines; rows shuffled; one point non-finite) and iwae on the same 40 points."""
    rng = np.random.default_rng(0)
    base = vae_points(rng)
    svi = method_points(base, rng, refined=True)
    svi["finite"] = np.ones(NUM_POINTS, dtype=bool)
    svi["finite"][7] = False
    dirs = [
        make_run(tmp_path, "run_vae", "vae", base, [1.0, 5.0, 2.0, 100.0, 3.0], {"amortized": 1.0, "local_ffg": 50.0}),
        make_run(tmp_path, "run_svi", "svi", svi, [10.0, 12.0, 11.0, 13.0],
                 {"amortized": 2.0, "refined": 3.0, "local_ffg": 50.0, "ais": 20.0}),
        make_run(tmp_path, "run_iwae", "iwae", method_points(base, rng, shift=1.0), [0.5, 0.7, 0.6],
                 {"amortized": 0.8, "iwae": 4.0}),
    ]
    return dirs, base, svi


def _cell(frame, quantity, run):
    return frame[(frame.quantity == quantity) & (frame.run == run)].iloc[0]


def test_paired_difference_is_the_mean_and_se_of_per_point_differences(runs):
    dirs, base, svi = runs
    frame = method_table(load_method_runs(dirs, "test"))
    # by hand: match each svi row to its vae datapoint, drop the non-finite one
    order = np.argsort(base["index"])
    at = order[np.searchsorted(base["index"], svi["index"], sorter=order)]
    vae_amort = (base["elbo_ffg"] - base["elbo_q"])[at]
    diff = ((svi["elbo_ffg"] - svi["elbo_q"]) - vae_amort)[svi["finite"]]
    cell = _cell(frame, "delta_amortization_gap", "svi")
    # the CSVs hold 6 decimals: each difference is off by at most 1e-6, and so is their mean
    assert cell["n"] == NUM_POINTS - 1
    assert abs(cell["mean"] - diff.mean()) < 2e-6
    assert abs(cell["se"] - diff.std(ddof=1) / math.sqrt(diff.size)) < 2e-6
    assert cell["text"] == f"{diff.mean():+.2f} ± {diff.std(ddof=1) / math.sqrt(diff.size):.2f}"
    # pairing matters: the unpaired SE of the difference of the two columns' means is far larger
    unpaired = math.hypot(_cell(frame, "amortization_gap", "svi")["se"], _cell(frame, "amortization_gap", "vae")["se"])
    assert cell["se"] < unpaired / 10
    # log p̂(x) is paired the same way
    ll = (svi["log_px"] - base["log_px"][at])[svi["finite"]]
    cell = _cell(frame, "delta_log_px", "svi")
    assert abs(cell["mean"] - ll.mean()) < 2e-6 and abs(cell["se"] - ll.std(ddof=1) / math.sqrt(ll.size)) < 2e-6
    assert cell["label"] == "Δ log p̂(x) vs vae"
    for quantity in ("delta_log_px", "delta_amortization_gap", "delta_inference_gap"):
        assert _cell(frame, quantity, "vae")["text"] == "—"
        assert pd.isna(_cell(frame, quantity, "vae")["mean"])


def test_training_seconds_are_the_median_and_cost_uses_the_q_stages(runs):
    dirs, _, _ = runs
    frame = method_table(load_method_runs(dirs, "test"))
    assert _cell(frame, "train_seconds_per_epoch", "vae")["mean"] == 3.0  # the mean would be 22.2
    assert _cell(frame, "train_seconds_per_epoch", "svi")["mean"] == 11.5
    assert _cell(frame, "train_seconds_per_epoch", "vae")["text"] == "3.00"
    # ms per point: amortized (+ refined) stage seconds / points; local fits, IWAE and AIS are not the method's q
    assert _cell(frame, "inference_ms_per_point", "vae")["mean"] == pytest.approx(1000 * 1.0 / NUM_POINTS, rel=1e-12)
    assert _cell(frame, "inference_ms_per_point", "svi")["mean"] == pytest.approx(1000 * 5.0 / NUM_POINTS, rel=1e-12)
    assert _cell(frame, "inference_ms_per_point", "iwae")["mean"] == pytest.approx(1000 * 0.8 / NUM_POINTS, rel=1e-12)
    assert _cell(frame, "inference_ms_per_point", "svi")["note"] == "amortized + refined stages"
    wide = wide_table(frame)
    assert list(wide.columns) == ["vae", "svi", "iwae"]
    assert wide.loc["L[q_refined]", "vae"] == "—" and wide.loc["L[q_refined]", "svi"] != "—"
    assert wide.loc["datapoints (finite / all)", "svi"] == f"{NUM_POINTS - 1} / {NUM_POINTS}"


def test_other_points_are_not_paired_and_the_note_says_so(tmp_path):
    rng = np.random.default_rng(1)
    base = vae_points(rng)
    moved = method_points(base, rng)
    moved["index"] = moved["index"] + 1  # other datapoints of the split
    dirs = [make_run(tmp_path, "a", "vae", base, [1.0], {"amortized": 1.0}),
            make_run(tmp_path, "b", "hmc", moved, [1.0], {"amortized": 1.0})]
    runs = load_method_runs(dirs, "test")
    frame = method_table(runs)
    assert _cell(frame, "delta_amortization_gap", "hmc")["text"] == NOT_PAIRED
    assert pd.isna(_cell(frame, "delta_inference_gap", "hmc")["mean"])
    notes = table_notes(runs)
    assert any("hmc: evaluated on other datapoints than vae" in n and "cannot be paired" in n for n in notes)
    assert is_method_comparison(dirs)  # still a comparison of methods; only the pairing is lost


def test_without_vae_the_first_run_is_the_reference(tmp_path):
    """And a run without train_log.csv shows no training time (its figures leave it out)."""
    rng = np.random.default_rng(2)
    base = vae_points(rng)
    dirs = [make_run(tmp_path, "first", "iwae", base, [1.0], {"amortized": 1.0}),
            make_run(tmp_path, "second", "air", method_points(base, rng), [1.0], {"amortized": 1.0})]
    (dirs[1] / "train_log.csv").unlink()  # a run folder without its training log: no training time
    runs = load_method_runs(dirs, "test")
    frame = method_table(runs)
    assert _cell(frame, "train_seconds_per_epoch", "air")["text"] == "—"
    assert _cell(frame, "delta_amortization_gap", "iwae")["text"] == "—"
    assert _cell(frame, "delta_amortization_gap", "air")["label"] == "Δ amortization gap vs iwae"
    assert table_notes(runs)[0] == "No vae run: the Δ rows are paired against the first run, iwae."
    written = compare_methods(dirs, "test", tmp_path / "out")
    assert (tmp_path / "out" / "validation_curves.png") in written


def test_which_runs_make_a_method_comparison(tmp_path):
    rng = np.random.default_rng(3)
    base = vae_points(rng)
    vae = make_run(tmp_path, "vae", "vae", base, [1.0], {"amortized": 1.0})
    iwae = make_run(tmp_path, "iwae", "iwae", base, [1.0], {"amortized": 1.0})
    vae2 = make_run(tmp_path, "vae2", "vae", base, [1.0], {"amortized": 1.0})
    other_seed = make_run(tmp_path, "svi_seed1", "svi", base, [1.0], {"amortized": 1.0}, seed=1)
    assert is_method_comparison([vae, iwae])
    assert is_method_comparison([vae, iwae, vae2])  # two runs of one method among others
    assert not is_method_comparison([vae, vae2])  # one method
    assert not is_method_comparison([vae, other_seed])  # the seed differs too
    assert not is_method_comparison([vae])
    assert not is_method_comparison([vae, tmp_path])  # not a run folder
    labels = [r.label for r in load_method_runs([vae, iwae, vae2], "test")]
    assert labels == ["vae (vae)", "iwae", "vae (vae2)"]


def test_compare_methods_writes_the_tables_and_figures(runs, tmp_path):
    dirs, _, _ = runs
    out = tmp_path / "report"
    written = compare_methods(dirs, "test", out)
    names = {p.name for p in written}
    stems = ("gaps_by_method", "amortization_vs_cost", "validation_curves")
    assert names == {"methods.md", "methods.tex", "methods.csv"} | {f"{s}.{e}" for s in stems for e in ("png", "pdf")}
    for stem in stems:
        png = (out / f"{stem}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        import matplotlib.image

        pixels = matplotlib.image.imread(out / f"{stem}.png")
        assert pixels.std() > 0.05  # something drawn, not a blank canvas
    md = (out / "methods.md").read_text()
    assert md.splitlines()[0] == "| | vae | svi | iwae |"
    assert "| Δ amortization gap vs vae | — |" in md
    csv = pd.read_csv(out / "methods.csv")
    assert set(csv["run"]) == {"vae", "svi", "iwae"}
    tex = (out / "methods.tex").read_text()
    assert r"\begin{tabular}{lrrr}" in tex and "±" not in tex and "Δ" not in tex


def test_committed_digits_runs_make_a_nine_column_table():
    dirs = [COMMITTED / f"digits_{m}" for m in METHODS]
    assert is_method_comparison(dirs)
    runs = load_method_runs(dirs, "test")
    frame = method_table(runs)
    wide = wide_table(frame)
    assert list(wide.columns) == METHODS
    assert (wide.loc["Δ amortization gap vs vae", "vae"], wide.loc["Δ inference gap vs vae", "vae"]) == ("—", "—")
    # the same 100 points, all finite: the mean of the paired differences is the difference of the means
    vae = runs[0].summary["stats"]["amortization_gap"]["mean"]
    for r in runs[1:]:
        cell = _cell(frame, "delta_amortization_gap", r.label)
        assert cell["n"] == 100
        assert abs(cell["mean"] - (r.summary["stats"]["amortization_gap"]["mean"] - vae)) < 2e-6
    assert not wide.loc["L[q_refined]"].eq("—").all()
    assert "refined" in _cell(frame, "inference_ms_per_point", "svi")["note"]


def test_an_outlying_method_is_cut_at_the_axis_edge_with_its_value(tmp_path):
    """A method whose amortization gap is 100x the others' (a SA-VAE's amortized q) would flatten the other
    bars: the gaps and cost figures stop their value axis short of it and write its value at the edge, and
    the validation curves leave a curve that ends far below the others out of their range, saying so."""
    import matplotlib.pyplot as plt

    from gapbench.method_comparison import (
        _clip_limit, amortization_vs_cost, gaps_by_method, load_method_runs, validation_curves)

    assert _clip_limit([1.0, 1.2, 0.9, 1.1]) is None  # nothing to cut
    assert _clip_limit([1.0, 1.2, 100.0]) == pytest.approx(1.3 * 1.2)
    rng = np.random.default_rng(1)
    base = vae_points(rng)
    dirs = [make_run(tmp_path, "run_vae", "vae", base, [1.0, 1.0], {"amortized": 1.0}),
            make_run(tmp_path, "run_air", "air", method_points(base, rng, shift=0.2), [1.0, 1.0], {"amortized": 1.0}),
            make_run(tmp_path, "run_savae", "savae", method_points(base, rng, shift=300.0), [9.0, 9.0],
                     {"amortized": 1.0})]
    log = pd.read_csv(dirs[2] / "train_log.csv")
    log["valid_elbo"] = log["valid_elbo"] - 500.0
    log.to_csv(dirs[2] / "train_log.csv", index=False)
    runs = load_method_runs(dirs, "test")
    totals = [r.summary["stats"]["inference_gap"]["mean"] for r in runs]
    for fig in (gaps_by_method(runs), amortization_vs_cost(runs)):
        ax = fig.axes[0]
        top = ax.get_ylim()[1]
        assert max(totals[:2]) < top < totals[2] / 10
        texts = [t.get_text() for t in ax.texts]
        assert any("↑" in t for t in texts), texts
        plt.close(fig)
    fig = validation_curves(runs)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("savae (ends at") for label in labels)
    assert ax.get_ylim()[0] > -100  # the others' range, not savae's -480
    plt.close(fig)
