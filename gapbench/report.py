"""gapbench report: the table of Cremer et al. (2018, Table 2) and figures, for one or more runs.

A column per run (dataset × encoder family); rows log p̂(x), L[q*_Flow],
L[q*_FFG], L[q], and the approximation, amortization and inference gaps; every
cell is a mean over datapoints ± its standard error, in nats. When a run was
trained with a method that refines q at test time, L[q_refined] stands between
L[q*_FFG] and L[q], and the amortization gap splits into the part the refinement
closes and the part that remains. Written as Markdown, LaTeX (booktabs) and CSV,
with figures as PNG and PDF, and all of it on one self-contained page, report.html
(:mod:`gapbench.report_html`).

Runs evaluated with ``evaluate.diagnostics`` get diagnostics.{md,tex,csv} too: active
units, I(x; z), the average and aggregate KL, the latent dimensions the decoder's
Jacobian uses, the q~_k gap at the largest k and the encoder's generalization (train
against held-out points); gaps per class (per_class.csv, and in diagnostics.md); and
the figure iwae_gap_curve of IWAE_k - L[q] against k.

Runs that differ only in their seed (``gapbench run --seeds``) get seeds.{md,tex,csv} too:
a column per group of them, each quantity's mean over the seeds ± its standard error
between seeds, beside the runs' average standard error over datapoints.

Runs with a train_log.csv get the figure training_curves (bounds, learning rate and KL
weight against epoch). ``checkpoints=[E1, E2, ...]`` (``gapbench report --checkpoint``)
tabulates the evaluations of the weights kept at those epochs (gaps/epoch_<E>/, made by
``gapbench evaluate-gaps RUN --checkpoint E``): a column per run and epoch.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd

from gapbench.errors import GapbenchError
from gapbench.io import read_json, read_json_or_none, write_bytes, write_text

ROWS: List[Tuple[str, str, str]] = [
    # (key in the summary, Markdown label, LaTeX label)
    ("log_px", "log p̂(x)", r"$\log \hat p(x)$"),
    ("elbo_flow", "L[q*_Flow]", r"$\mathcal{L}[q^*_{\mathrm{Flow}}]$"),
    ("elbo_ffg", "L[q*_FFG]", r"$\mathcal{L}[q^*_{\mathrm{FFG}}]$"),
    ("elbo_q", "L[q]", r"$\mathcal{L}[q]$"),
    ("approximation_gap", "Approximation gap", "Approximation"),
    ("amortization_gap", "Amortization gap", "Amortization"),
    ("inference_gap", "Inference gap", "Inference"),
]
FAMILY_LABEL = {"ffg": "FFG", "flow": "Flow", "realnvp": "RealNVP"}
#: Rows of a test-time refinement, each placed after the row named first; shown when a run has them.
REFINED_ROWS: List[Tuple[str, Tuple[str, str, str]]] = [
    ("elbo_ffg", ("elbo_refined", "L[q_refined]", r"$\mathcal{L}[q_{\mathrm{refined}}]$")),
    ("amortization_gap", ("refinement_gain", "Amortization gap closed by refinement", r"\quad closed by refinement")),
    ("refinement_gain", ("remaining_amortization_gap", "Amortization gap remaining", r"\quad remaining")),
]
GAP_ROWS = ("approximation_gap", "amortization_gap", "inference_gap")  # in bold


def table_rows(runs: Sequence["RunGaps"]) -> List[Tuple[str, str, str]]:
    """ROWS, with the rows of a test-time refinement when any run has them (old gaps files have not)."""
    rows = list(ROWS)
    if any("elbo_refined" in r.summary["stats"] for r in runs):
        for after, row in REFINED_ROWS:
            rows.insert([key for key, _, _ in rows].index(after) + 1, row)
    return rows


@dataclass
class RunGaps:
    """One run's evaluation, as the report needs it."""

    path: Path
    label: str
    summary: Dict
    points: pd.DataFrame
    epoch: Optional[int] = None  # the kept checkpoint's epoch evaluated (gaps/epoch_<E>/); None: the final model


def gaps_folder(path: Path, epoch: Optional[int] = None) -> Path:
    """A run's gaps of its final model (gaps/) or of the weights it kept at ``epoch`` (gaps/epoch_<E>/)."""
    return Path(path) / "gaps" if epoch is None else Path(path) / "gaps" / f"epoch_{int(epoch)}"


def load_run_gaps(path: Path, split: str, epoch: Optional[int] = None) -> RunGaps:
    summary_path = gaps_folder(path, epoch) / f"{split}.json"
    csv_path = gaps_folder(path, epoch) / f"{split}.csv"
    if not path.is_dir():
        raise GapbenchError(f"{path} is not a folder; pass run folders written by 'gapbench train'")
    if not summary_path.is_file() or not csv_path.is_file():
        at = "" if epoch is None else f" at epoch {epoch}"
        option = "" if epoch is None else f" --checkpoint {epoch}"
        raise GapbenchError(
            f"{path} has no gap evaluation of the {split} split{at}; "
            f"run 'gapbench evaluate-gaps {path}{option} --split {split}' first"
        )
    try:
        summary = read_json(summary_path)
        points = pd.read_csv(csv_path)
    except (OSError, ValueError) as exc:
        raise GapbenchError(
            f"{summary_path} or its CSV is not readable ({type(exc).__name__}); "
            f"recompute it with 'gapbench evaluate-gaps {path} --split {split} --restart'"
        ) from None
    if not isinstance(summary, dict) or "stats" not in summary or "encoder_family" not in summary:
        raise GapbenchError(
            f"{summary_path} is not a gapbench gaps summary; recompute it with 'gapbench evaluate-gaps {path} --restart'"
        )
    label = f"{summary.get('dataset', '?')} / {FAMILY_LABEL.get(summary['encoder_family'], summary['encoder_family'])}"
    return RunGaps(path=path, label=label, summary=summary, points=points, epoch=epoch)


def _seed_of(r: RunGaps):
    if "seed" in r.summary:
        return r.summary["seed"]
    try:  # evaluations made before the summary recorded the seed
        import yaml

        return (yaml.safe_load((r.path / "recipe.yaml").read_text()) or {}).get("seed")
    except (OSError, ValueError, AttributeError):
        return None


def _unique_labels(runs: List[RunGaps]) -> None:
    """Make every column label unique: runs that share one get the first of their run name, seed,
    folder name or path that tells them apart (a folder given twice: its path and a number)."""
    groups: Dict[str, List[RunGaps]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    for label, group in groups.items():
        if len(group) < 2:
            continue
        for extra in (
            lambda r: r.summary.get("run"),
            lambda r: None if _seed_of(r) is None else f"seed {_seed_of(r)}",
            lambda r: r.path.name,
            lambda r: str(r.path),
        ):
            words = [extra(r) for r in group]
            if None not in words and len(set(words)) == len(group):
                for r, word in zip(group, words):
                    r.label = f"{label} ({word})"
                break
        else:
            for i, r in enumerate(group, start=1):
                r.label = f"{label} ({r.path}) #{i}"


def convergence_of(r: RunGaps) -> Dict:
    """The run's convergence record; for gaps files made before it was recorded, worked out from
    the per-point CSV (converged flags, steps) and the AIS sweep in the summary's traces."""
    if r.summary.get("convergence") is not None:
        return r.summary["convergence"]
    from gapbench.convergence import ais_convergence, local_convergence

    settings = r.summary.get("settings") or {}
    families = [f for f in r.summary.get("families", []) if f"converged_{f}" in r.points]
    max_steps = (settings.get("local") or {}).get("max_steps")
    out: Dict = {"local": local_convergence(r.points, families, max_steps) if max_steps else {}}
    sweep = (r.summary.get("traces") or {}).get("ais_sweep")
    if sweep:
        import numpy as np

        tolerance = (settings.get("ais") or {}).get("convergence_tolerance", 0.1)
        values = np.array(sweep["log_px"], dtype=float).T  # saved [n, G]
        ais = ais_convergence(sweep["num_steps"], values, tolerance)
        if ais is not None:
            out["ais"] = ais
    r.summary["convergence"] = out
    return out


def _families_shown(runs: Sequence[RunGaps]) -> List[str]:
    fams: List[str] = []
    for r in runs:
        for fam in convergence_of(r).get("local", {}):
            if fam not in fams:
                fams.append(fam)
    return fams


def _not_converged_note(c: Dict) -> str:
    """' (3 at step cap, 1 collapsed)' for a family's local convergence; '' when every fit converged."""
    parts = [f"{c['at_step_cap']} at step cap"] if c.get("at_step_cap") else []
    if c.get("collapsed"):
        parts.append(f"{c['collapsed']} collapsed")
    return f" ({', '.join(parts)})" if parts else ""


def extra_rows(runs: Sequence[RunGaps]) -> List[Tuple[str, str, str, List[Dict]]]:
    """Rows below the estimates: datapoints, bounds out of order, convergence of each local family and of AIS.

    Each is (key, Markdown label, LaTeX label, one {"mean", "se", "n", "text"} per run; None where absent).
    """
    rows = [
        ("num_finite", "datapoints (finite / all)", "datapoints (finite / all)",
         [{"mean": r.summary["num_finite"], "se": None, "n": r.summary["num_points"],
           "text": f"{r.summary['num_finite']} / {r.summary['num_points']}"} for r in runs]),
        ("num_order_violations", "bounds out of order", "bounds out of order",
         [{"mean": r.summary["num_order_violations"], "se": None, "n": r.summary["num_points"],
           "text": str(r.summary["num_order_violations"])} for r in runs]),
    ]
    for fam in _families_shown(runs):
        name = FAMILY_LABEL.get(fam, fam)
        cells = []
        for r in runs:
            c = convergence_of(r).get("local", {}).get(fam)
            cells.append(None if c is None else {
                "mean": c["converged"], "se": None, "n": c["num_points"],
                "text": f"{c['converged']} / {c['num_points']}" + _not_converged_note(c),
            })
        rows.append((f"converged_{fam}", f"q*_{name} converged (stopping rule)",
                     rf"$q^*_{{\mathrm{{{name}}}}}$ converged", cells))
    if any(convergence_of(r).get("ais") for r in runs):
        cells = []
        for r in runs:
            a = convergence_of(r).get("ais")
            cells.append(None if a is None else {
                "mean": a["change"], "se": a["se"], "n": a["num_points"],
                "text": f"{a['change']:+.2f} ± {_fmt_se(a['se'])} ({a['from_steps']} → {a['to_steps']})"
                        + ("" if a["converged"] else " ⚠"),
            })
        rows.append(("ais_last_doubling_change", "AIS change at the end of the sweep",
                     "AIS change at the end of the sweep", cells))
    return rows


def _fmt_se(se) -> str:
    return "n/a" if se is None or (isinstance(se, float) and math.isnan(se)) else f"{se:.2f}"


def table_frame(runs: Sequence[RunGaps]) -> pd.DataFrame:
    """Long table: one row per (quantity, run) with mean, standard error and n (counts: mean = count, n = points)."""
    rows = []
    for key, label, _ in table_rows(runs):
        for r in runs:
            stat = r.summary["stats"].get(key)
            rows.append(
                {
                    "quantity": key,
                    "label": label,
                    "run": r.label,
                    "mean": None if stat is None else stat["mean"],
                    "se": None if stat is None else stat["se"],
                    "n": None if stat is None else stat["n"],
                }
            )
    rows += _cell_rows(runs, extra_rows(runs))
    return pd.DataFrame(rows)


def _cell_rows(runs: Sequence[RunGaps], rows) -> List[Dict]:
    """Long-table rows of (key, Markdown label, LaTeX label, cells) rows, cells as in :func:`extra_rows`."""
    out = []
    for key, label, _, cells in rows:
        for r, cell in zip(runs, cells):
            out.append({"quantity": key, "label": label, "run": r.label,
                        "mean": None if cell is None else cell["mean"],
                        "se": None if cell is None else cell["se"],
                        "n": None if cell is None else cell["n"]})
    return out


def _cell(mean, se, latex=False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—" if not latex else "--"
    pm = r" $\pm$ " if latex else " ± "
    se_txt = "n/a" if se is None or (isinstance(se, float) and math.isnan(se)) else f"{se:.2f}"
    return f"{mean:.2f}{pm}{se_txt}"


def table_markdown(runs: Sequence[RunGaps], frame: pd.DataFrame) -> str:
    head = "| | " + " | ".join(r.label for r in runs) + " |"
    sep = "|---|" + "---:|" * len(runs)
    lines = [head, sep]
    for key, label, _ in table_rows(runs):
        sub = frame[frame.quantity == key].set_index("run")
        cells = [_cell(sub.loc[r.label, "mean"], sub.loc[r.label, "se"]) for r in runs]
        bold = key in GAP_ROWS
        name = f"**{label}**" if bold else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for _, label, _, cells in extra_rows(runs):
        lines.append(f"| {label} | " + " | ".join("—" if c is None else c["text"] for c in cells) + " |")
    return "\n".join(lines) + "\n"


def table_latex(runs: Sequence[RunGaps], frame: pd.DataFrame) -> str:
    def esc(text: str) -> str:
        return text.replace("_", r"\_").replace("&", r"\&")

    lines = [
        r"\begin{tabular}{l" + "r" * len(runs) + "}",
        r"\toprule",
        " & ".join([""] + [esc(r.label) for r in runs]) + r" \\",
        r"\midrule",
    ]
    for key, _, label in table_rows(runs):
        if key == "approximation_gap":
            lines.append(r"\midrule")
        sub = frame[frame.quantity == key].set_index("run")
        cells = [_cell(sub.loc[r.label, "mean"], sub.loc[r.label, "se"], latex=True) for r in runs]
        lines.append(" & ".join([label] + cells) + r" \\")
    lines.append(r"\midrule")
    for _, _, label, cells in extra_rows(runs):
        texts = ["--" if c is None else esc(c["text"]).replace("±", r"$\pm$").replace("→", r"$\to$").replace("⚠", r"(!)")
                 for c in cells]
        lines.append(" & ".join([label] + texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- diagnostics

#: What each diagnostics row shows, printed under the table in diagnostics.md.
DIAGNOSTIC_NOTES = {
    "active_units": "active units: latent dimensions d with Cov_x(E_q[z_d|x]) > 0.01, of D (Burda et al. 2016)",
    "mutual_information": "I(x; z) = average KL − aggregate KL, with q(z) the mixture of the evaluated points' "
                          "q(z|x), so at most log N (Hoffman & Johnson 2016)",
    "jacobian_used": "decoder dimensions used: singular values of d decoder / dz above 1e-3 of the largest, at "
                     "z ~ q(z|x), mean ± SE over points (median) (Hoffman 2017)",
    "iwae_curve_gap": "IWAE_k − L[q]: the part of the inference gap that importance sampling with k draws from q "
                      "closes (Cremer, Morris & Duvenaud 2017); figure iwae_gap_curve",
    "generalization": "amortization gap on held-out points − on training points (equally many), its SE from "
                      "both (Cremer, Li & Duvenaud 2018, section 5.3); it needs the train split evaluated too "
                      "(gapbench evaluate-gaps RUN --split train, as many points)",
}
#: The files a report writes only when its runs have diagnostics (removed otherwise, never left stale).
DIAGNOSTIC_FILES = ("diagnostics.md", "diagnostics.tex", "diagnostics.csv", "per_class.csv",
                    "iwae_gap_curve.png", "iwae_gap_curve.pdf")


def _in_tables(key: str) -> bool:
    """Whether a diagnostics row is shown in the md and tex tables (the median is in the Jacobian row's
    text there, a row of its own in the CSV)."""
    return key != "jacobian_median_used"


def asked(summary: Optional[Dict], name: str) -> bool:
    """Whether the evaluation of a gaps summary asked for diagnostic ``name`` (evaluate.diagnostics)."""
    return isinstance(summary, dict) and name in ((summary.get("settings") or {}).get("diagnostics") or ())


def _stat_cell(d: Dict, key: str, n_key: str = "num_points") -> Dict:
    mean, se = d.get(key), d.get(f"{key}_se")
    return {"mean": mean, "se": se, "n": d.get(n_key), "text": _cell(mean, se)}


def diagnostic_rows(runs: Sequence[RunGaps]) -> List[Tuple[str, str, str, List[Dict]]]:
    """The diagnostics table's rows, as :func:`extra_rows`; a row only where some run has its diagnostic."""
    diags = [r.summary.get("diagnostics") or {} for r in runs]
    rows = []

    def add(key, label, latex, name, cell_fn):
        if any(name in d for d in diags):
            rows.append((key, label, latex, [cell_fn(d[name]) if name in d else None for d in diags]))

    add("active_units", "active units (of D)", "active units (of $D$)", "active_units",
        lambda a: {"mean": a["num_active"], "se": None, "n": a.get("latent_dim", len(a["activity"])),
                   "text": f"{a['num_active']} / {a.get('latent_dim', len(a['activity']))}"})
    add("mutual_information", "I(x; z) (nats)", r"$I(x; z)$", "mutual_information",
        lambda m: _stat_cell(m, "mutual_information"))
    add("average_kl", "average KL(q(z|x) ‖ p(z)) (nats)", r"$\mathbb{E}_x\,\mathrm{KL}(q(z|x) \,\|\, p(z))$",
        "mutual_information", lambda m: _stat_cell(m, "kl_posterior_prior"))
    add("aggregate_kl", "aggregate KL(q(z) ‖ p(z)) (nats)", r"$\mathrm{KL}(q(z) \,\|\, p(z))$", "mutual_information",
        lambda m: _stat_cell(m, "kl_aggregate_prior"))
    add("jacobian_used", "decoder dimensions used (Jacobian)", "decoder dimensions used (Jacobian)", "jacobian",
        lambda j: {"mean": j["mean_num_used"], "se": j["mean_num_used_se"], "n": j.get("num_points"),
                   "text": f"{_cell(j['mean_num_used'], j['mean_num_used_se'])} (median {j['median_num_used']:g})"})
    add("jacobian_median_used", "decoder dimensions used, median", None, "jacobian",
        lambda j: {"mean": j["median_num_used"], "se": None, "n": j.get("num_points"), "text": ""})
    add("iwae_curve_gap", "IWAE_k − L[q] at the largest k (nats)", r"$\mathrm{IWAE}_k - \mathcal{L}[q]$, largest $k$",
        "iwae_curve", lambda c: {"mean": c["gap_mean"][-1], "se": c["gap_se"][-1], "n": c["num_finite"],
                                 "text": f"{_cell(c['gap_mean'][-1], c['gap_se'][-1])} (k = {c['ks'][-1]:,})"})
    wanted = [asked(r.summary, "generalization") or asked(_train_summary(r.path, r.epoch), "generalization")
              for r in runs]
    if any(wanted):
        rows.append(("generalization", "encoder generalization: amortization gap held-out − train (nats)",
                     "encoder generalization (held-out $-$ train)",
                     [_generalization_cell(r) if w else None for r, w in zip(runs, wanted)]))
    return rows


def _train_summary(run_dir: Path, epoch: Optional[int] = None) -> Optional[Dict]:
    """The run's train-split gaps summary (gaps/train.json, or gaps/epoch_<E>/train.json), or None."""
    return read_json_or_none(gaps_folder(run_dir, epoch) / "train.json")


def _generalization_cell(r: RunGaps):
    """The amortization gap of r's (held-out) points against the run's training points, or None.

    None for a train column; a dash and what to run when the run has no gaps of the train split.
    """
    from gapbench.diagnostics import encoder_generalization

    if r.summary.get("split") == "train":
        return None
    train_csv = gaps_folder(r.path, r.epoch) / "train.csv"
    if not train_csv.is_file():
        return {"mean": None, "se": None, "n": None, "text": "— (no gaps of the train split)"}
    try:
        g = encoder_generalization(pd.read_csv(train_csv), r.points)
    except GapbenchError as exc:
        raise GapbenchError(f"{r.path}: {exc}") from None
    return {"mean": g["difference"], "se": g["difference_se"], "n": g["num_heldout"],
            "text": f"{_cell(g['difference'], g['difference_se'])} (train {_cell(g['train'], g['train_se'])}, "
                    f"held-out {_cell(g['heldout'], g['heldout_se'])}; {g['num_train']} + {g['num_heldout']} points)"}


def per_class_tables(runs: Sequence[RunGaps]) -> List[Tuple[RunGaps, pd.DataFrame]]:
    """Gaps per class label of the runs that asked for per_class and whose gaps table has labels."""
    from gapbench.data.registry import class_name
    from gapbench.diagnostics import gaps_by_class

    out = []
    for r in runs:
        if asked(r.summary, "per_class") and "label" in r.points:
            table = gaps_by_class(r.points, r.points["label"])
            names = [class_name(r.summary.get("dataset"), int(label)) for label in table.index]
            if any(names):
                table.insert(0, "name", names)
            out.append((r, table))
    return out


def class_text(label, row) -> str:
    """A per-class table's first cell: '0 (T-shirt/top)', or the label alone."""
    name = row.get("name", "")
    return f"{label} ({name})" if isinstance(name, str) and name else str(label)


def diagnostics_markdown(runs: Sequence[RunGaps], rows, per_class) -> str:
    lines = ["# Diagnostics", ""]
    if rows:
        lines += ["| | " + " | ".join(r.label for r in runs) + " |", "|---|" + "---:|" * len(runs)]
        for key, label, _, cells in rows:
            if _in_tables(key):
                texts = [label] + ["—" if c is None else c["text"] for c in cells]
                lines.append("| " + " | ".join(t.replace("|", r"\|") for t in texts) + " |")  # q(z|x) in a cell
        lines.append("")
        lines += [f"* {DIAGNOSTIC_NOTES[key]}" for key, *_ in rows if key in DIAGNOSTIC_NOTES]
        lines.append("")
    for r, table in per_class:
        gaps = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
        lines += [f"## Gaps per class: {r.label}", "",
                  "| class | datapoints | " + " | ".join(g.replace("_", " ").capitalize() for g in gaps) + " |",
                  "|---:|---:|" + "---:|" * len(gaps)]
        for label, row in table.iterrows():
            cells = [_cell(row[f"{g}_mean"], row[f"{g}_se"]) for g in gaps]
            lines.append(f"| {class_text(label, row)} | {int(row['count'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def diagnostics_latex(runs: Sequence[RunGaps], rows) -> str:
    def esc(text: str) -> str:
        return (text.replace("_", r"\_").replace("&", r"\&").replace("±", r"$\pm$").replace("−", "$-$")
                .replace("—", "--"))

    lines = [r"\begin{tabular}{l" + "r" * len(runs) + "}", r"\toprule",
             " & ".join([""] + [esc(r.label) for r in runs]) + r" \\", r"\midrule"]
    for key, _, latex, cells in rows:
        if _in_tables(key):
            lines.append(" & ".join([latex] + ["--" if c is None else esc(c["text"]) for c in cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _diagnostic_outputs(runs: Sequence[RunGaps]) -> Dict[str, str]:
    """The diagnostics files' contents by name (none when no run has diagnostics)."""
    if not any(r.summary.get("diagnostics") or (r.summary.get("settings") or {}).get("diagnostics") for r in runs):
        return {}
    rows = diagnostic_rows(runs)
    per_class = per_class_tables(runs)
    out = {"diagnostics.md": diagnostics_markdown(runs, rows, per_class)}
    if rows:
        out["diagnostics.tex"] = diagnostics_latex(runs, rows)
        out["diagnostics.csv"] = pd.DataFrame(_cell_rows(runs, rows)).to_csv(index=False, float_format="%.4f")
    if per_class:
        frames = [t.reset_index().rename(columns={"label": "class"}).assign(run=r.label) for r, t in per_class]
        both = pd.concat(frames, ignore_index=True)
        out["per_class.csv"] = both[["run"] + [c for c in both.columns if c != "run"]].to_csv(
            index=False, float_format="%.4f")
    return out


# ---------------------------------------------------------------- seeds

#: The files a report writes only when some of its runs differ in nothing but their seed (removed otherwise).
SEED_FILES = ("seeds.md", "seeds.tex", "seeds.csv")
#: The recipe keys in which the runs of one seed group may differ.
SEED_FREE_KEYS = ("seed", "name")
SEED_NOTES = (
    "mean ± SE between seeds: the average over the seeds' runs of each run's mean over its datapoints, ± the "
    "standard deviation of those means / √(number of seeds); within-run SE: the average of the runs' standard "
    "errors over their datapoints",
    "each seed's run evaluates the datapoints its own seed selects (evaluate.num_points of the split, drawn with "
    "the recipe's seed), so the SE between seeds holds the spread of training and of the chosen datapoints both",
    "a column groups runs whose recipe.yaml agree but for seed and name and that were evaluated alike (split, "
    "number of points, settings); table.md has a column per run",
)


@dataclass
class SeedGroup:
    """Runs that differ only in their seed: a column of seeds.md."""

    label: str
    runs: List[RunGaps]  # one per seed, in the order given

    @property
    def seeds(self) -> List:
        return [_seed_of(r) for r in self.runs]


def _seed_setup(r: RunGaps) -> Optional[str]:
    """What must match for runs to be seeds of one experiment: the recipe.yaml but for SEED_FREE_KEYS and the
    evaluation (split, number of points, settings); None for a run without a readable recipe.yaml."""
    import json

    import yaml

    from gapbench.experiment import RECIPE_FILE

    try:
        recipe = yaml.safe_load((r.path / RECIPE_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(recipe, dict):
        return None
    setup = {"recipe": {k: v for k, v in recipe.items() if k not in SEED_FREE_KEYS},
             "split": r.summary.get("split"), "num_points": r.summary.get("num_points"),
             "settings": r.summary.get("settings")}
    return json.dumps(setup, sort_keys=True, default=str)


def seed_groups(runs: Sequence[RunGaps]) -> List[SeedGroup]:
    """The groups of two or more runs that differ only in their seed (see :func:`_seed_setup`), in order.

    A folder given twice counts once; a group in which two folders share a seed is not one (it would
    count one seed twice).
    """
    import logging
    import os

    by_setup: Dict[str, List[RunGaps]] = {}
    for r in runs:
        setup = _seed_setup(r)
        if setup is None or _seed_of(r) is None:
            continue
        members = by_setup.setdefault(setup, [])
        if all(os.path.realpath(m.path) != os.path.realpath(r.path) for m in members):
            members.append(r)
    groups = []
    for members in by_setup.values():
        seeds = [_seed_of(r) for r in members]
        if len(members) < 2:
            continue
        if len(set(seeds)) < len(seeds):
            logging.getLogger(__name__).warning(
                "report: %s share a recipe and a seed, so they are not averaged over seeds",
                ", ".join(str(r.path) for r in members))
            continue
        label = f"{members[0].summary.get('dataset', '?')} / " + FAMILY_LABEL.get(
            members[0].summary["encoder_family"], members[0].summary["encoder_family"])
        if len({r.summary.get("split") for r in runs}) > 1:
            label += f" [{members[0].summary.get('split', '?')}]"
        groups.append(SeedGroup(label=label, runs=members))
    labels = [g.label for g in groups]
    for g in groups:
        if labels.count(g.label) > 1:
            name = g.runs[0].summary.get("run")
            g.label = f"{g.label} ({name})" if name else g.label
    labels = [g.label for g in groups]
    for i, g in enumerate(groups, start=1):
        if labels.count(g.label) > 1:
            g.label = f"{g.label} #{i}"
    return groups


def seed_frame(groups: Sequence[SeedGroup]) -> pd.DataFrame:
    """Long table: one row per (quantity, group) with the mean over seeds, its standard error between seeds
    (std of the runs' means / √n_seeds) and the runs' average standard error over datapoints.

        mean = (1/S) Σ_s m_s,   se_between_seeds = sd(m_1..m_S) / √S,   se_within_runs = (1/S) Σ_s se_s
    """
    import numpy as np

    rows = []
    for key, label, _ in table_rows([r for g in groups for r in g.runs]):
        for g in groups:
            stats = [r.summary["stats"].get(key) for r in g.runs]
            row = {"quantity": key, "label": label, "group": g.label, "mean": None, "se_between_seeds": None,
                   "se_within_runs": None, "num_seeds": len(g.runs), "seeds": " ".join(str(s) for s in g.seeds),
                   "num_points": g.runs[0].summary.get("num_points")}
            if all(s is not None for s in stats):
                means = np.array([s["mean"] for s in stats], dtype=float)  # [S]
                ses = np.array([math.nan if s.get("se") is None else s["se"] for s in stats], dtype=float)  # [S]
                row.update(mean=float(means.mean()),
                           se_between_seeds=float(means.std(ddof=1) / math.sqrt(len(means))),
                           se_within_runs=float(ses.mean()))
            rows.append(row)
    return pd.DataFrame(rows)


def _se_text(mean, se, latex=False) -> str:
    """The within-run SE beside a mean: a dash where the mean is missing."""
    if mean is None or pd.isna(mean):
        return "--" if latex else "—"
    return _fmt_se(None if se is None or pd.isna(se) else float(se))


def seeds_markdown(groups: Sequence[SeedGroup], frame: pd.DataFrame, out_dir: Path) -> str:
    import os

    lines = ["# Seeds", "",
             "| | " + " | ".join(f"{g.label} | within-run SE" for g in groups) + " |",
             "|---|" + "---:|---:|" * len(groups)]
    for key, label, _ in table_rows([r for g in groups for r in g.runs]):
        sub = frame[frame.quantity == key].set_index("group")
        cells = [f"{_cell(sub.loc[g.label, 'mean'], sub.loc[g.label, 'se_between_seeds'])} | "
                 f"{_se_text(sub.loc[g.label, 'mean'], sub.loc[g.label, 'se_within_runs'])}" for g in groups]
        name = f"**{label}**" if key in GAP_ROWS else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| seeds | " + " | ".join(f"{len(g.runs)} ({', '.join(map(str, g.seeds))}) | " for g in groups) + " |")
    lines += [""] + [f"* {note}" for note in SEED_NOTES]
    for g in groups:
        paths = [os.path.relpath(Path(r.path).resolve(), Path(out_dir).resolve()) for r in g.runs]
        lines.append(f"* {g.label}: " + ", ".join(paths))
    return "\n".join(lines) + "\n"


def seeds_latex(groups: Sequence[SeedGroup], frame: pd.DataFrame) -> str:
    def esc(text: str) -> str:
        return text.replace("_", r"\_").replace("&", r"\&")

    lines = [r"\begin{tabular}{l" + "rr" * len(groups) + "}", r"\toprule",
             " & ".join([""] + [rf"\multicolumn{{2}}{{c}}{{{esc(g.label)}}}" for g in groups]) + r" \\",
             " & ".join([""] + [r"mean $\pm$ SE between seeds & within-run SE"] * len(groups)) + r" \\",
             r"\midrule"]
    for key, _, label in table_rows([r for g in groups for r in g.runs]):
        if key == "approximation_gap":
            lines.append(r"\midrule")
        sub = frame[frame.quantity == key].set_index("group")
        cells = [f"{_cell(sub.loc[g.label, 'mean'], sub.loc[g.label, 'se_between_seeds'], latex=True)} & "
                 f"{_se_text(sub.loc[g.label, 'mean'], sub.loc[g.label, 'se_within_runs'], latex=True)}"
                 for g in groups]
        lines.append(" & ".join([label] + cells) + r" \\")
    lines.append(r"\midrule")
    lines.append(" & ".join(["seeds"] + [rf"\multicolumn{{2}}{{c}}{{{len(g.runs)} ({', '.join(map(str, g.seeds))})}}"
                                         for g in groups]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _seed_outputs(runs: Sequence[RunGaps], out_dir: Path) -> Dict[str, str]:
    """The seeds files' contents by name (none when no runs differ only in their seed)."""
    groups = seed_groups(runs)
    if not groups:
        return {}
    frame = seed_frame(groups)
    return {"seeds.md": seeds_markdown(groups, frame, out_dir), "seeds.tex": seeds_latex(groups, frame),
            "seeds.csv": frame.to_csv(index=False, float_format="%.4f")}


REPORT_INPUTS = "inputs.json"


def report_inputs(run_dirs: Sequence[Path], splits: Sequence[str], out_dir: Path,
                  checkpoints: Optional[Sequence[int]] = None) -> Dict:
    """What a report is made from: each run's gaps files (by content hash), the splits, the kept
    checkpoints' epochs (when it tabulates those), the code."""
    import hashlib
    import os

    from gapbench.provenance import code_versions

    runs = []
    for p in run_dirs:
        entry = {"path": os.path.relpath(Path(p).resolve(), Path(out_dir).resolve()), "gaps": {}}
        for epoch in checkpoints or [None]:
            folder = gaps_folder(p, epoch)
            prefix = "" if epoch is None else f"epoch_{epoch}/"
            # the encoder's generalization reads the train split's gaps as well
            generalization = any(asked(read_json_or_none(folder / f"{s}.json"), "generalization")
                                 for s in [*splits, "train"])
            for s in list(splits) + (["train"] if generalization and "train" not in splits else []):
                for ext in ("json", "csv"):
                    f = folder / f"{s}.{ext}"
                    digest = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None
                    entry["gaps"][f"{prefix}{s}.{ext}"] = digest
        runs.append(entry)
    kept = {"checkpoints": [int(e) for e in checkpoints]} if checkpoints else {}
    return {"runs": runs, "splits": list(splits), **kept, **code_versions()}


def report_is_current(run_dirs: Sequence[Path], out_dir: Path, split: Union[str, Sequence[str]] = "test",
                      checkpoints: Optional[Sequence[int]] = None) -> bool:
    """Whether ``out_dir`` holds a report made from exactly these runs' current gaps, by this code."""
    splits = [split] if isinstance(split, str) else list(split)
    saved = read_json_or_none(Path(out_dir) / REPORT_INPUTS)
    return (saved is not None and saved == report_inputs(run_dirs, splits, out_dir, checkpoints)
            and all((Path(out_dir) / name).is_file() for name in ("table.md", "report.html")))


def rebuild_report(out_dir: Path, default_runs: Sequence[Path], default_split: str) -> List[Path]:
    """Make the report in ``out_dir`` again from the runs and splits it was made from (its inputs.json).

    A report written before inputs.json existed is rebuilt from ``default_runs`` and ``default_split``.
    """
    try:
        saved = read_json(Path(out_dir) / REPORT_INPUTS)
        runs = [(Path(out_dir) / r["path"]) for r in saved["runs"]]
        splits = saved["splits"]
        checkpoints = saved.get("checkpoints")
    except (OSError, ValueError, KeyError, TypeError):
        runs, splits, checkpoints = list(default_runs), [default_split], None
    if not all((gaps_folder(r, e) / f"{s}.json").is_file()
               for r in runs for s in splits for e in checkpoints or [None]):
        runs, splits, checkpoints = list(default_runs), [default_split], None
    return make_report(runs, out_dir, split=splits if len(splits) > 1 else splits[0], checkpoints=checkpoints)


def _lock_target(out_dir: Path) -> Path:
    """The folder whose lock guards ``out_dir``: the run folder it sits in (RUN/report), else itself."""
    from gapbench.experiment import RECIPE_FILE

    parent = Path(out_dir).parent
    return parent if (parent / RECIPE_FILE).is_file() else Path(out_dir)


def make_report(run_dirs: Sequence[Path], out_dir: Path, split: Union[str, Sequence[str]] = "test",
                checkpoints: Optional[Sequence[int]] = None) -> List[Path]:
    """Write table.{md,tex,csv}, the figures and report.html for ``run_dirs`` into ``out_dir``; returns the paths.

    ``split`` may list several splits (e.g. ["train", "test"]): then each run gives one
    column per split, labelled with it, to set training against held-out points.
    ``checkpoints`` [E1, E2, ...]: tabulate the evaluations of the weights each run kept at those
    epochs (gaps/epoch_<E>/) instead of its final model's, a column per run and epoch.
    ``inputs.json`` records what the report was made from (see :func:`report_is_current`).
    """
    from gapbench import figures
    from gapbench.io import check_writable, output_dir
    from gapbench.lock import command_line, folder_lock

    out_dir = Path(out_dir)
    splits = [split] if isinstance(split, str) else list(split)
    runs = [load_run_gaps(Path(p), s, e) for p in run_dirs for e in checkpoints or [None] for s in splits]
    if len(splits) > 1:
        for r in runs:
            r.label = f"{r.label} [{r.summary.get('split', '?')}]"
    for r in runs:
        if r.epoch is not None:
            r.label = f"{r.label} [epoch {r.epoch}]"
    _unique_labels(runs)
    check_writable(out_dir)
    frame = table_frame(runs)
    diagnostics = _diagnostic_outputs(runs)  # before writing anything: it may refuse (generalization)
    seeds = _seed_outputs(runs, out_dir)  # runs that differ only in their seed: their mean over seeds
    written = []
    target = _lock_target(out_dir)
    with output_dir(out_dir), folder_lock(target, command_line()):
        for name, text in (
            ("table.md", table_markdown(runs, frame)),
            ("table.tex", table_latex(runs, frame)),
            ("table.csv", frame.to_csv(index=False, float_format="%.4f")),
        ):
            write_text(out_dir / name, text)
            written.append(out_dir / name)
        for name, text in {**diagnostics, **seeds}.items():
            write_text(out_dir / name, text)
            written.append(out_dir / name)
        for name, fig in figures.all_figures(runs):
            for ext in ("png", "pdf"):
                buf = io.BytesIO()
                # no creation date in the PDF: the same gaps give byte-identical figures
                fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight",
                            metadata={"CreationDate": None} if ext == "pdf" else None)
                write_bytes(out_dir / f"{name}.{ext}", buf.getvalue())
                written.append(out_dir / f"{name}.{ext}")
            figures.close(fig)
        from gapbench.method_comparison import METHOD_FILES, compare_methods, is_method_comparison

        # runs that differ in their training method
        if len(splits) == 1 and not checkpoints and is_method_comparison(run_dirs):
            written += compare_methods(run_dirs, splits[0], out_dir)
        # a report never keeps tables or figures its runs no longer have
        for name in DIAGNOSTIC_FILES + METHOD_FILES + SEED_FILES + figures.TRAINING_FILES:
            if out_dir / name not in written and (out_dir / name).is_file():
                (out_dir / name).unlink()
        from gapbench.report_html import REPORT_HTML, render_report

        # everything above on one self-contained page
        write_text(out_dir / REPORT_HTML, render_report(runs, frame, out_dir, written, run_dirs, splits))
        written.append(out_dir / REPORT_HTML)
        from gapbench.io import write_json

        write_json(out_dir / REPORT_INPUTS, report_inputs([r for r in run_dirs], splits, out_dir, checkpoints))
        written.append(out_dir / REPORT_INPUTS)
    return written
