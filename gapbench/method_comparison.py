"""Training methods side by side: one table and three figures for runs that differ only in train.method.

A column per run: log p̂(x), the bounds L[q*], L[q_refined] and L[q], the gaps
(mean ± standard error over datapoints, in nats), the amortization and inference
gaps' differences from the ``vae`` run paired over the same datapoints

    Δ_i = gap_i(method) − gap_i(vae),  mean ± sd(Δ) / √n,

the training seconds per epoch and the test-time cost of the method's q per point.
Pairing removes the datapoint-to-datapoint spread that both runs share, so two
methods evaluated on the same points are told apart with far smaller errors than
the columns' own standard errors suggest. Figures: the gaps stacked per method,
the amortization gap against training cost, and each method's validation bound
over training. Cremer et al. (2018) measure the gaps; the methods are those of
:mod:`gapbench.methods`.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from gapbench.errors import GapbenchError

#: The stage of an evaluation that produces each kind of q: the encoder's, then a method's refinement of it.
AMORTIZED_STAGE = "amortized"
REFINED_STAGE = "refined"
#: (key in the summary's stats, Markdown label, LaTeX label), in the order of the bounds; a row that no run has is
#: left out, except those of ALWAYS_SHOWN.
ESTIMATE_ROWS: List[Tuple[str, str, str]] = [
    ("log_px", "log p̂(x)", r"$\log \hat p(x)$"),
    ("elbo_flow", "L[q*_Flow]", r"$\mathcal{L}[q^*_{\mathrm{Flow}}]$"),
    ("elbo_realnvp", "L[q*_RealNVP]", r"$\mathcal{L}[q^*_{\mathrm{RealNVP}}]$"),
    ("elbo_ffg", "L[q*_FFG]", r"$\mathcal{L}[q^*_{\mathrm{FFG}}]$"),
    ("elbo_refined", "L[q_refined]", r"$\mathcal{L}[q_{\mathrm{refined}}]$"),
    ("elbo_q", "L[q]", r"$\mathcal{L}[q]$"),
    ("approximation_gap", "Approximation gap", "Approximation gap"),
    ("amortization_gap", "Amortization gap", "Amortization gap"),
    ("refinement_gain", "Amortization gap closed by refinement", r"\quad closed by refinement"),
    ("remaining_amortization_gap", "Amortization gap remaining", r"\quad remaining"),
    ("inference_gap", "Inference gap", "Inference gap"),
]
ESTIMATE_KEYS = {key for key, _, _ in ESTIMATE_ROWS}
ALWAYS_SHOWN = {"log_px", "elbo_ffg", "elbo_q", "approximation_gap", "amortization_gap", "inference_gap"}
GAP_ROWS = ("approximation_gap", "amortization_gap", "inference_gap")  # in bold
#: The per-datapoint columns whose difference from the reference run the table pairs: log p̂(x) (what
#: most methods' papers claim to raise) and the two gaps.
PAIRED_GAPS = (("log_px", "log p̂(x)"), ("amortization_gap", "amortization gap"), ("inference_gap", "inference gap"))
NOT_PAIRED = "not paired"


@dataclass
class MethodRun:
    """One run's evaluation and training record, as the comparison needs it."""

    path: Path
    method: str
    label: str
    setup: Dict  # what must match for a method comparison: the data and model sections and the seed
    summary: Dict  # gaps/<split>.json
    points: pd.DataFrame  # gaps/<split>.csv
    train_log: Optional[pd.DataFrame]  # train_log.csv; None when the run folder has none


def _recipe_of(path: Path):
    from gapbench.experiment import RECIPE_FILE
    from gapbench.recipe import load_recipe

    if not (path / RECIPE_FILE).is_file():
        raise GapbenchError(f"{path} has no {RECIPE_FILE}; pass run folders written by 'gapbench train'")
    return load_recipe(path / RECIPE_FILE)


def _setup_of(recipe) -> Dict:
    return {"data": dataclasses.asdict(recipe.data), "model": dataclasses.asdict(recipe.model), "seed": recipe.seed}


def load_method_run(path, split: str) -> MethodRun:
    """A run folder's recipe, gaps files of ``split`` and training log; labelled by its method."""
    from gapbench.experiment import TRAIN_LOG_FILE
    from gapbench.methods import method_name
    from gapbench.report import load_run_gaps

    path = Path(path)
    gaps = load_run_gaps(path, split)
    recipe = _recipe_of(path)
    log_path = path / TRAIN_LOG_FILE
    try:
        train_log = pd.read_csv(log_path) if log_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise GapbenchError(f"{log_path} is not readable ({type(exc).__name__}); train the run again") from None
    method = method_name(recipe.train)
    return MethodRun(path=path, method=method, label=method, setup=_setup_of(recipe), summary=gaps.summary,
                     points=gaps.points, train_log=train_log)


def load_method_runs(run_dirs: Sequence, split: str) -> List[MethodRun]:
    """:func:`load_method_run` of each folder; runs that share a method get their folder's name (or path) too."""
    runs = [load_method_run(p, split) for p in run_dirs]
    for method in {r.method for r in runs}:
        group = [r for r in runs if r.method == method]
        if len(group) > 1:
            names = [r.path.name for r in group]
            words = names if len(set(names)) == len(group) else [str(r.path) for r in group]
            if len(set(words)) < len(group):  # one folder given twice
                words = [f"{w} #{i}" for i, w in enumerate(words, start=1)]
            for r, word in zip(group, words):
                r.label = f"{method} ({word})"
    return runs


def is_method_comparison(run_dirs: Sequence) -> bool:
    """Whether the runs differ in train.method and share the data, the model and the seed (their recipe.yaml).

    Whether they were evaluated on the same datapoints decides only whether the
    differences can be paired; the table says when they cannot (:func:`method_table`).
    """
    from gapbench.methods import method_name

    if len(run_dirs) < 2:
        return False
    try:
        recipes = [_recipe_of(Path(p)) for p in run_dirs]
    except GapbenchError:
        return False
    setups = [_setup_of(r) for r in recipes]
    return len({method_name(r.train) for r in recipes}) > 1 and all(s == setups[0] for s in setups[1:])


def reference_run(runs: Sequence[MethodRun]) -> MethodRun:
    """The run the Δ rows are paired against: the first ``vae`` run, else the first run."""
    return next((r for r in runs if r.method == "vae"), runs[0])


def paired_difference(points: pd.DataFrame, ref_points: pd.DataFrame, column: str) -> Optional[Dict]:
    """Mean and standard error of ``column``'s per-datapoint difference from the reference, joined on ``index``.

    Δ_i = column_i − ref_column_i over the points finite in both; SE = sd(Δ) / √n.
    None when the two were evaluated on different datapoints (no pairing is possible).
    """
    def distinct(df):
        return "index" in df and not df["index"].duplicated().any()

    if not (distinct(points) and distinct(ref_points)) or set(points["index"]) != set(ref_points["index"]):
        return None
    both = points[["index", column, "finite"]].merge(ref_points[["index", column, "finite"]], on="index",
                                                     suffixes=("", "_ref"))
    ok = both["finite"].astype(bool) & both["finite_ref"].astype(bool)
    diff = (both.loc[ok, column] - both.loc[ok, f"{column}_ref"]).to_numpy(dtype=float)
    n = diff.size
    return {"mean": float(diff.mean()) if n else math.nan,
            "se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "n": int(n)}


def seconds_per_epoch(run: MethodRun) -> Optional[Dict]:
    """Median over epochs of train_log.csv's seconds (the epoch's training steps, without validation)."""
    if run.train_log is None or "seconds" not in run.train_log:
        return None
    s = run.train_log["seconds"].dropna().to_numpy(dtype=float)
    return {"mean": float(np.median(s)), "se": None, "n": int(s.size)} if s.size else None


def inference_stages(run: MethodRun) -> List[str]:
    """The evaluation stages that produce the method's q: the amortized one, and the refined one if it refines."""
    return [s for s in (AMORTIZED_STAGE, REFINED_STAGE) if s in (run.summary.get("stage_seconds") or {})]


def inference_ms_per_point(run: MethodRun) -> Optional[Dict]:
    """Milliseconds per datapoint of the stages of :func:`inference_stages`, summed over their batches."""
    stages = inference_stages(run)
    n = run.summary.get("num_points")
    if AMORTIZED_STAGE not in stages or not n:
        return None
    seconds = sum(float(run.summary["stage_seconds"][s]) for s in stages)
    return {"mean": 1000.0 * seconds / n, "se": None, "n": int(n)}


def _pm(mean, se, latex: bool = False, signed: bool = False) -> str:
    """``mean ± se`` with two decimals, as the report's table; '—' for a missing value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "--" if latex else "—"
    pm = r" $\pm$ " if latex else " ± "
    se_txt = "n/a" if se is None or (isinstance(se, float) and math.isnan(se)) else f"{se:.2f}"
    return f"{mean:+.2f}{pm}{se_txt}" if signed else f"{mean:.2f}{pm}{se_txt}"


def _estimate_rows(runs: Sequence[MethodRun]) -> List[Tuple[str, str, str]]:
    return [row for row in ESTIMATE_ROWS if row[0] in ALWAYS_SHOWN or any(row[0] in r.summary["stats"] for r in runs)]


def method_table(runs: Sequence[MethodRun]) -> pd.DataFrame:
    """Long table: one row per (quantity, run) with mean, se, n, the cell's text and a note where it needs one.

    Quantities: the estimates and gaps of the summaries; ``delta_<gap>`` paired against
    :func:`reference_run` ('—' in its own column, 'not paired' where the datapoints differ);
    ``train_seconds_per_epoch``; ``inference_ms_per_point``; ``num_points``.
    """
    ref = reference_run(runs)
    rows = []

    def add(key, label, r, stat, text, note="", latex=None):
        rows.append({"quantity": key, "label": label, "latex_label": latex or _latex_escape(label), "run": r.label,
                     "method": r.method, "mean": None if stat is None else stat["mean"],
                     "se": None if stat is None else stat["se"], "n": None if stat is None else stat["n"],
                     "text": text, "note": note})

    for key, label, latex in _estimate_rows(runs):
        for r in runs:
            stat = r.summary["stats"].get(key)
            add(key, label, r, stat, _pm(None, None) if stat is None else _pm(stat["mean"], stat["se"]), latex=latex)
    for key, name in PAIRED_GAPS:
        label = f"Δ {name} vs {ref.label}"
        for r in runs:
            if r is ref:
                add(f"delta_{key}", label, r, None, "—", "the reference")
                continue
            stat = paired_difference(r.points, ref.points, key)
            if stat is None:
                add(f"delta_{key}", label, r, None, NOT_PAIRED, f"evaluated on other datapoints than {ref.label}")
            else:
                add(f"delta_{key}", label, r, stat, _pm(stat["mean"], stat["se"], signed=True),
                    f"paired over {stat['n']} datapoints")
    for r in runs:
        stat = seconds_per_epoch(r)
        add("train_seconds_per_epoch", "training s / epoch (median)", r, stat,
            "—" if stat is None else f"{stat['mean']:.2f}", "" if stat is None else f"median of {stat['n']} epochs")
    for r in runs:
        stat = inference_ms_per_point(r)
        add("inference_ms_per_point", "test-time inference ms / point", r, stat,
            "—" if stat is None else f"{stat['mean']:.2f}", " + ".join(inference_stages(r)) + " stages")
    for r in runs:
        s = r.summary
        add("num_points", "datapoints (finite / all)", r, {"mean": s["num_finite"], "se": None, "n": s["num_points"]},
            f"{s['num_finite']} / {s['num_points']}")
    frame = pd.DataFrame(rows)
    frame["n"] = frame["n"].astype("Int64")  # counts, blank where there is none
    return frame


def table_notes(runs: Sequence[MethodRun]) -> List[str]:
    """The lines under the table: what Δ is paired against, what the timings measure, what differs."""
    ref = reference_run(runs)
    notes = []
    if ref.method != "vae":
        notes.append(f"No vae run: the Δ rows are paired against the first run, {ref.label}.")
    others = [r for r in runs if r is not ref]
    unpaired = [r.label for r in others if paired_difference(r.points, ref.points, "inference_gap") is None]
    if len(unpaired) < len(others):
        notes.append(f"Δ: the per-datapoint difference from {ref.label} over the same datapoints, mean ± its "
                     "standard error (paired, so the spread of the gaps over datapoints cancels).")
    if unpaired:
        notes.append(f"{', '.join(unpaired)}: evaluated on other datapoints than {ref.label} (the index column of "
                     "the gaps CSV), so their Δ rows cannot be paired; evaluate every run on the same points to "
                     "pair them.")
    samples = sorted({str((r.summary.get("settings") or {}).get("elbo_samples", "?")) for r in runs})
    devices = sorted({str(r.summary.get("device", "?")) for r in runs})
    notes.append("Training s / epoch: median over epochs of train_log.csv's seconds (training steps, without "
                 "validation). Test-time inference: seconds of the evaluation's 'amortized' stage (encoder and L[q]), "
                 "plus its 'refined' stage for methods that refine q at test time (refinement and L[q_refined]), "
                 f"summed over batches, per datapoint; each stage includes its {'/'.join(samples)}-sample bound "
                 f"estimate (measured on {', '.join(devices)}).")
    if any(r.setup != runs[0].setup for r in runs[1:]):
        notes.append("The runs differ in data, model or seed, not only in the training method.")
    return notes


def wide_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as shown: a row per quantity (its label), a column per run, each cell's text."""
    wide = frame.pivot(index="quantity", columns="run", values="text")
    wide = wide.loc[list(dict.fromkeys(frame["quantity"])), list(dict.fromkeys(frame["run"]))]
    wide.index = [frame.loc[frame.quantity == k, "label"].iloc[0] for k in wide.index]
    wide.columns.name = None
    return wide


def table_markdown(runs: Sequence[MethodRun], frame: pd.DataFrame, notes: Sequence[str]) -> str:
    keys = list(dict.fromkeys(frame["quantity"]))
    wide = wide_table(frame)
    lines = ["| | " + " | ".join(wide.columns) + " |", "|---|" + "---:|" * len(wide.columns)]
    for key, (label, cells) in zip(keys, wide.iterrows()):
        name = f"**{label}**" if key in GAP_ROWS else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{note}  " for note in notes).rstrip() + "\n"


def _latex_escape(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")
            .replace("#", r"\#").replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "--")
            .replace("p̂", r"$\hat p$").replace("q*", r"$q^*$"))


def table_latex(runs: Sequence[MethodRun], frame: pd.DataFrame, notes: Sequence[str]) -> str:
    lines = [r"\begin{tabular}{l" + "r" * len(runs) + "}", r"\toprule",
             " & ".join([""] + [_latex_escape(r.label) for r in runs]) + r" \\", r"\midrule"]
    for key in dict.fromkeys(frame["quantity"]):
        if key in ("approximation_gap", "delta_amortization_gap", "train_seconds_per_epoch"):
            lines.append(r"\midrule")
        sub = frame[frame.quantity == key].set_index("run")
        cells = []
        for r in runs:
            row = sub.loc[r.label]
            if (key in ESTIMATE_KEYS or key.startswith("delta_")) and not pd.isna(row["mean"]):
                cells.append(_pm(row["mean"], row["se"], latex=True, signed=key.startswith("delta_")))
            else:
                cells.append(_latex_escape(row["text"]))
        lines.append(" & ".join([sub["latex_label"].iloc[0]] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [r"\par\smallskip{\footnotesize " + _latex_escape(note) + "}" for note in notes]
    return "\n".join(lines) + "\n"


# --- figures ---------------------------------------------------------------------------------------------------


def _stat(run: MethodRun, key: str) -> Tuple[float, float]:
    s = run.summary["stats"].get(key)
    if s is None:
        return math.nan, math.nan
    return s["mean"], (math.nan if s["se"] is None else s["se"])


#: A figure's value axis stops short of a method whose value is this many times the median of all of
#: them (e.g. a SA-VAE whose amortized q is hundreds of nats from its posteriors), so that the other
#: methods stay readable; the clipped values are written at the axis' edge.
OUTLIER_FACTOR = 4.0


def _clip_limit(values: Sequence[float]) -> Optional[float]:
    """The top of an axis for nonnegative ``values`` that leaves out the outliers (None: show them all)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if finite.size < 3:
        return None
    med = float(np.median(finite))
    kept = finite[finite <= OUTLIER_FACTOR * max(med, 1e-12)]
    if kept.size == finite.size or kept.size == 0:
        return None
    return 1.3 * float(kept.max())


def gaps_by_method(runs: Sequence[MethodRun]):
    """Approximation and amortization gap stacked per method; a refining method's amortization bar splits into
    the part its test-time refinement closes and the part that remains. Whiskers: the inference gap's SE."""
    from gapbench import figures
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6 + 1.0 * len(runs), 4.2))
    x = np.arange(len(runs))
    approx = np.array([_stat(r, "approximation_gap")[0] for r in runs])
    amort = np.array([_stat(r, "amortization_gap")[0] for r in runs])
    gain = np.array([_stat(r, "refinement_gain")[0] for r in runs])
    remaining = np.array([_stat(r, "remaining_amortization_gap")[0] for r in runs])
    refines = ~np.isnan(gain)
    total_se = np.array([_stat(r, "inference_gap")[1] for r in runs])
    ax.bar(x, approx, color=figures.APPROX_COLOR, label="approximation gap  log p̂(x) − L[q*]")
    ax.bar(x[~refines], amort[~refines], bottom=approx[~refines], color=figures.AMORT_COLOR,
           label="amortization gap  L[q*] − L[q]")
    if refines.any():
        ax.bar(x[refines], remaining[refines], bottom=approx[refines], color=figures.AMORT_COLOR, edgecolor="black",
               linewidth=0.4, label="amortization gap remaining  L[q*] − L[q_refined]")
        ax.bar(x[refines], gain[refines], bottom=(approx + remaining)[refines], color=figures.AMORT_COLOR, alpha=0.35,
               hatch="//", edgecolor=figures.AMORT_COLOR, label="closed by test-time refinement  L[q_refined] − L[q]")
    total = approx + amort
    ax.errorbar(x, total, yerr=total_se, fmt="none", ecolor="black", capsize=3, linewidth=1)
    top = _clip_limit(total)
    for xi, t in zip(x, total):
        if top is not None and t > top:  # clipped: its value at the top edge
            ax.annotate(f"{t:.1f} ↑", (xi, top), textcoords="offset points", xytext=(0, -12), ha="center",
                        fontsize=7, fontweight="bold")
        else:
            ax.annotate(f"{t:.2f}", (xi, t), textcoords="offset points", xytext=(7, 2), ha="left", fontsize=7)
    if top is not None:
        ax.set_ylim(top=top)
    ax.set_xticks(x)
    ax.set_xticklabels([r.label for r in runs], rotation=25, ha="right")
    ax.set_ylabel("gap (nats)")
    ax.set_title("Inference gap per training method\n(whiskers: SE of the inference gap"
                 + ("; ↑ bars cut at the top, their value written)" if top is not None else ")"), fontsize=10)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    return fig


def amortization_vs_cost(runs: Sequence[MethodRun]):
    """Amortization gap (mean ± SE) against training seconds per epoch; hollow: what remains after refinement."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4.2))
    placed = sorted((seconds_per_epoch(r)["mean"], i) for i, r in enumerate(runs) if seconds_per_epoch(r) is not None)
    top = _clip_limit([_stat(runs[i], "amortization_gap")[0] for _, i in placed])
    for rank, (cost, i) in enumerate(placed):
        r = runs[i]
        mean, se = _stat(r, "amortization_gap")
        if top is not None and mean > top:  # clipped: a marker at the top edge with its value
            ax.plot([cost], [top], marker="^", color=f"C{i}", clip_on=False)
            ax.annotate(f"{r.label} {mean:.1f} ↑", (cost, top), textcoords="offset points", xytext=(5, -12),
                        fontsize=8, color=f"C{i}")
        else:
            ax.errorbar([cost], [mean], yerr=[se], fmt="o", color=f"C{i}", capsize=3)
            # neighbours along x take turns above and below their point, so close labels do not overlap
            ax.annotate(r.label, (cost, mean), textcoords="offset points", xytext=(5, 5 if rank % 2 == 0 else -11),
                        fontsize=8, color=f"C{i}")
        rem, rem_se = _stat(r, "remaining_amortization_gap")
        if not math.isnan(rem):
            ax.errorbar([cost], [rem], yerr=[rem_se], fmt="o", mfc="none", color=f"C{i}", capsize=3)
            ax.plot([cost] * 2, [min(mean, top) if top is not None else mean, rem], color=f"C{i}", linestyle=":",
                    linewidth=1)
    if top is not None:
        ax.set_ylim(top=top)
    ax.set_xscale("log")
    # Plain numbers at 1, 2 and 5 of each decade instead of powers of ten, no unlabelled minor ticks.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("training seconds per epoch (median, log scale)")
    ax.set_ylabel("amortization gap  L[q*] − L[q] (nats)")
    ax.set_title("Amortization gap against training cost (bars: ± SE)", fontsize=10)
    if any("remaining_amortization_gap" in r.summary["stats"] for r in runs):
        ax.legend(handles=[Line2D([], [], marker="o", color="gray", linestyle="none", label="amortized q"),
                           Line2D([], [], marker="o", mfc="none", color="gray", linestyle="none",
                                  label="after test-time refinement (remaining gap)")], fontsize=7)
    fig.tight_layout()
    return fig


def validation_curves(runs: Sequence[MethodRun]):
    """Each method's validation ELBO against epoch (epochs without validation left out)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    logs = {i: r.train_log.dropna(subset=["valid_elbo"]) for i, r in enumerate(runs)
            if r.train_log is not None and "valid_elbo" in r.train_log}
    logs = {i: log for i, log in logs.items() if len(log)}
    # A method whose last validation bound is far below the best method's (OUTLIER_FACTOR times the median
    # distance) leaves the plot at its bottom, so the others stay readable.
    finals = {i: float(log["valid_elbo"].iloc[-1]) for i, log in logs.items()}
    best = max(finals.values(), default=math.nan)
    limit = _clip_limit([best - f for f in finals.values()])
    outliers = {i for i, f in finals.items() if limit is not None and best - f > limit}
    bottom = None
    if outliers:
        kept = [float(log["valid_elbo"].min()) for i, log in logs.items() if i not in outliers]
        span = best - min(kept)
        bottom = min(kept) - 0.05 * span
        ax.set_ylim(bottom=bottom, top=best + 0.05 * span)
    for i, log in logs.items():
        below = bottom is not None and finals[i] < bottom
        label = runs[i].label + (f" (ends at {finals[i]:.1f}, below the plot)" if below else "")
        ax.plot(log["epoch"], log["valid_elbo"], color=f"C{i}", linewidth=1.3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO of the amortized q (nats)")
    ax.set_title("Validation bound over training", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


FIGURES = {"gaps_by_method": gaps_by_method, "amortization_vs_cost": amortization_vs_cost,
           "validation_curves": validation_curves}
# Everything compare_methods writes (a report of runs that no longer compare methods drops them).
METHOD_FILES = ("methods.md", "methods.tex", "methods.csv") + tuple(
    f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf"))


def _save_figure(fig, stem: Path) -> List[Path]:
    from gapbench import figures
    from gapbench.io import write_bytes

    written = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # no creation date in the PDF: the same runs give byte-identical figures
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight",
                    metadata={"CreationDate": None} if ext == "pdf" else None)
        write_bytes(stem.with_suffix(f".{ext}"), buf.getvalue())
        written.append(stem.with_suffix(f".{ext}"))
    figures.close(fig)
    return written


def compare_methods(run_dirs: Sequence, split: str, out_dir) -> List[Path]:
    """Write methods.{md,csv,tex} and the figures of :data:`FIGURES` (PNG and PDF) into ``out_dir``.

    The caller holds the output folder's lock; returns the paths written.
    """
    from gapbench.io import check_writable, write_text

    out_dir = Path(out_dir)
    runs = load_method_runs(run_dirs, split)
    if not runs:
        raise GapbenchError("no runs to compare; pass the run folders of the training methods")
    check_writable(out_dir)
    frame = method_table(runs)
    notes = table_notes(runs)
    written = []
    for name, text in (("methods.md", table_markdown(runs, frame, notes)),
                       ("methods.tex", table_latex(runs, frame, notes)),
                       ("methods.csv", frame.drop(columns=["latex_label"]).to_csv(index=False, float_format="%.4f"))):
        write_text(out_dir / name, text)
        written.append(out_dir / name)
    for name, draw_fn in FIGURES.items():
        written += _save_figure(draw_fn(runs), out_dir / name)
    return written
