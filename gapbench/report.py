"""gapbench report: the table of Cremer et al. (2018, Table 2) and figures, for one or more runs.

A column per run (dataset × encoder family); rows log p̂(x), L[q*_Flow],
L[q*_FFG], L[q], and the approximation, amortization and inference gaps; every
cell is a mean over datapoints ± its standard error, in nats. Written as
Markdown, LaTeX (booktabs) and CSV, with figures as PNG and PDF.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import pandas as pd

from gapbench.errors import GapbenchError
from gapbench.io import read_json, write_bytes, write_text

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


@dataclass
class RunGaps:
    """One run's evaluation, as the report needs it."""

    path: Path
    label: str
    summary: Dict
    points: pd.DataFrame


def load_run_gaps(path: Path, split: str) -> RunGaps:
    summary_path = path / "gaps" / f"{split}.json"
    csv_path = path / "gaps" / f"{split}.csv"
    if not path.is_dir():
        raise GapbenchError(f"{path} is not a folder; pass run folders written by 'gapbench train'")
    if not summary_path.is_file() or not csv_path.is_file():
        raise GapbenchError(
            f"{path} has no gap evaluation of the {split} split; run 'gapbench evaluate-gaps {path} --split {split}' first"
        )
    summary = read_json(summary_path)
    label = f"{summary.get('dataset', '?')} / {FAMILY_LABEL.get(summary['encoder_family'], summary['encoder_family'])}"
    return RunGaps(path=path, label=label, summary=summary, points=pd.read_csv(csv_path))


def _unique_labels(runs: List[RunGaps]) -> None:
    seen: Dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.summary.get('run', r.path.name)})"


def table_frame(runs: Sequence[RunGaps]) -> pd.DataFrame:
    """Long table: one row per (quantity, run) with mean, standard error and n."""
    rows = []
    for key, label, _ in ROWS:
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
    return pd.DataFrame(rows)


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
    for key, label, _ in ROWS:
        sub = frame[frame.quantity == key].set_index("run")
        cells = [_cell(sub.loc[r.label, "mean"], sub.loc[r.label, "se"]) for r in runs]
        bold = key.endswith("_gap")
        name = f"**{label}**" if bold else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| datapoints (finite / all) | " + " | ".join(
        f"{r.summary['num_finite']} / {r.summary['num_points']}" for r in runs) + " |")
    lines.append("| bounds out of order | " + " | ".join(
        str(r.summary["num_order_violations"]) for r in runs) + " |")
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
    for key, _, label in ROWS:
        if key == "approximation_gap":
            lines.append(r"\midrule")
        sub = frame[frame.quantity == key].set_index("run")
        cells = [_cell(sub.loc[r.label, "mean"], sub.loc[r.label, "se"], latex=True) for r in runs]
        lines.append(" & ".join([label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def make_report(run_dirs: Sequence[Path], out_dir: Path, split: Union[str, Sequence[str]] = "test") -> List[Path]:
    """Write table.{md,tex,csv} and the figures for ``run_dirs`` into ``out_dir``; returns the paths.

    ``split`` may list several splits (e.g. ["train", "test"]): then each run gives one
    column per split, labelled with it, to set training against held-out points.
    """
    from gapbench import figures
    from gapbench.io import check_writable

    splits = [split] if isinstance(split, str) else list(split)
    runs = [load_run_gaps(Path(p), s) for p in run_dirs for s in splits]
    if len(splits) > 1:
        for r in runs:
            r.label = f"{r.label} [{r.summary.get('split', '?')}]"
    _unique_labels(runs)
    check_writable(out_dir)
    frame = table_frame(runs)
    written = []
    for name, text in (
        ("table.md", table_markdown(runs, frame)),
        ("table.tex", table_latex(runs, frame)),
        ("table.csv", frame.to_csv(index=False, float_format="%.4f")),
    ):
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
    return written
