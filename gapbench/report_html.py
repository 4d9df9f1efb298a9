"""report.html: everything a gap report writes, on one self-contained page that opens offline.

The page holds the gaps table (table.md's cells, from the same frame), each run's warnings at the
top (local fits stopped at the step cap, an AIS sweep that moved more than its tolerance, bounds out
of order, non-finite values), the diagnostics, gaps per class, seeds and method comparison tables
when the report has them, every figure the report wrote (its PNG embedded as a base64 data URI,
with a caption) and each column's provenance: the checkpoint's hash, the code and torch versions,
the device, the evaluation's settings, seed and timings, and the run's meta.json and recipe.yaml.

CSS is inline and there is no script; a Content-Security-Policy lets the page load nothing but its
own data URIs, so it shows the same thing on a machine without a network. Every text is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from gapbench.io import read_json_or_none

REPORT_HTML = "report.html"

#: What each figure shows, under it on the page (figures not named here get their file name only).
FIGURE_CAPTIONS: Dict[str, str] = {
    "gaps_stacked": "The approximation gap log p̂(x) − L[q*] and the amortization gap L[q*] − L[q] stacked per "
                    "column: their sum is the inference gap (bars: ± SE over datapoints).",
    "gap_distributions": "Each gap per datapoint, one panel per column; negative values are real estimates.",
    "local_convergence": "Local optimization of q*: ELBO − L[q] against Adam steps, per datapoint (thin) and on "
                         "average (thick).",
    "ais_convergence": "AIS estimate against the number of intermediate distributions, relative to the longest "
                       "chain, paired over the same datapoints (bars: ± SE).",
    "iwae_gap_curve": "IWAE_k − L[q] against k: the part of the inference gap that importance sampling with k "
                      "draws from q closes (dotted: log p̂(x) − L[q]; bands: ± SE).",
    "training_curves": "Training: the bounds, the learning rate and the KL weight against epoch (train_log.csv).",
    "gaps_by_method": "The gaps per training method; a refining method's amortization gap splits into the part its "
                      "test-time refinement closes and the part that remains (whiskers: SE of the inference gap).",
    "amortization_vs_cost": "Amortization gap against training seconds per epoch; hollow: what remains after "
                            "test-time refinement (bars: ± SE).",
    "validation_curves": "Each method's validation ELBO against epoch.",
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f1f1f;
  max-width:1280px;margin:1.5rem auto;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.3rem;border-bottom:1px solid #bbb;margin-top:2.2rem}
h3{font-size:1.05rem;margin-top:1.4rem}.sub{color:#555;margin-top:0}
nav ul{columns:2;max-width:40rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{padding:.22rem .6rem;border-bottom:1px solid #e2e2e2;vertical-align:top}
thead th{border-bottom:2px solid #444;text-align:right;white-space:nowrap}
tbody th{text-align:left;font-weight:normal;min-width:14rem}
td{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.gap th,tr.gap td{font-weight:bold}tr.first-gap th,tr.first-gap td{border-top:2px solid #888}
td.warn,tr td.warn{background:#fbe0de;color:#8a1212;font-weight:bold}
table.kv td{text-align:left;white-space:normal;word-break:break-all;
  font-family:ui-monospace,"DejaVu Sans Mono",monospace}
table.kv th{white-space:nowrap;min-width:0}table.compact tbody th{min-width:0}
table.wrap td{white-space:normal;min-width:11rem}
.warnings{border:2px solid #b3261e;background:#fdeceb;padding:.4rem 1rem;border-radius:4px}
.warnings h2{border:none;color:#8a1212;margin-top:.4rem}
.ok{border:1px solid #2e7d32;background:#eaf5ea;padding:.5rem 1rem;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:1.5rem}.cards>div{flex:1 1 28rem;min-width:0}
figure{margin:1.2rem 0}img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9rem;color:#333}code{font-size:.85em}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}
ul.notes{font-size:.9rem;color:#333}
"""


_WARN = ' class="warn"'  # a cell the reader must not miss


def _e(text) -> str:
    """``text`` escaped for HTML (quotes too: it may land in an attribute)."""
    return html.escape(str(text), quote=True)


@dataclass
class _Row:
    """A table row: its label, one text per column, and which of them to mark."""

    label: str
    cells: List[str]
    key: Optional[str] = None  # the quantity (data-quantity), as in table.csv
    bold: bool = False
    warn: List[bool] = field(default_factory=list)


def _table(table_id: str, head: Sequence[str], rows: Sequence[_Row], first_gap: Optional[str] = None,
           style: str = "") -> str:
    """An HTML table with a header row and a row header per row; every text escaped.

    ``first_gap``: the key of the row a rule goes above; ``style``: CSS classes of the table
    ("wrap": long cells wrap; "compact": narrow row headers).
    """
    classes = f' class="{style}"' if style else ""
    out = [f'<div class="scroll"><table id="{_e(table_id)}"{classes}>', "<thead><tr>"]
    out += [f'<th scope="col">{_e(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        classes = " ".join(c for c, on in (("gap", row.bold), ("first-gap", first_gap is not None
                                                                  and row.key == first_gap)) if on)
        attrs = (f' data-quantity="{_e(row.key)}"' if row.key else "") + (f' class="{classes}"' if classes else "")
        warn = row.warn or [False] * len(row.cells)
        tds = "".join(f"<td{_WARN if w else ''}>{_e(c)}</td>" for c, w in zip(row.cells, warn))
        out.append(f'<tr{attrs}><th scope="row">{_e(row.label)}</th>{tds}</tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _kv_table(rows: Sequence[Tuple[str, str, bool]]) -> str:
    """A two-column table of (name, value, marked) rows."""
    body = "".join(f'<tr><th scope="row">{_e(k)}</th><td{_WARN if w else ""}>{_e(v)}</td></tr>' for k, v, w in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _notes(lines: Sequence[str]) -> str:
    return '<ul class="notes">' + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>" if lines else ""


# ---------------------------------------------------------------- warnings


def run_warnings(r) -> List[str]:
    """What a reader of ``r``'s numbers must know: local fits stopped at the step cap, an AIS sweep not within
    its tolerance, bounds out of order, non-finite values; and the evaluation's own warnings, once each."""
    from gapbench.convergence import warnings_for
    from gapbench.report import convergence_of, table_rows

    s = r.summary
    lines = warnings_for(convergence_of(r))
    lines += [w for w in s.get("warnings") or [] if w not in lines]
    num_points = s.get("num_points", 0)
    nonfinite = num_points - s.get("num_finite", num_points)
    if nonfinite:
        lines.append(f"{nonfinite} of {num_points} datapoints gave a non-finite estimate; every mean leaves them out")
    if s.get("num_order_violations"):
        pairs = [f"{name} at {v['count']} (by up to {v['max_size']:.3g} nats)"
                 for name, v in (s.get("order_violations") or {}).items() if v.get("count")]
        lines.append(f"bounds out of order at {s['num_order_violations']} of {num_points} datapoints "
                     "(L[q] ≤ L[q*] ≤ log p̂(x) fails)" + (": " + "; ".join(pairs) if pairs else ""))
    for key, label, _ in table_rows([r]):
        stat = s["stats"].get(key)
        if stat is not None and (stat.get("mean") is None or not math.isfinite(stat["mean"])):
            lines.append(f"{label} is not finite (no finite datapoint)")
    return lines


def _cell_warns(runs, key: str) -> List[bool]:
    """Which cells of an extra row of the gaps table to mark (see :func:`gapbench.report.extra_rows`)."""
    from gapbench.report import convergence_of

    marks = []
    for r in runs:
        s, conv = r.summary, convergence_of(r)
        if key == "num_finite":
            marks.append(s["num_finite"] < s["num_points"])
        elif key == "num_order_violations":
            marks.append(bool(s["num_order_violations"]))
        elif key.startswith("converged_"):
            c = conv.get("local", {}).get(key[len("converged_"):])
            marks.append(bool(c and (c["at_step_cap"] or c["failed"] or c.get("collapsed"))))
        elif key == "ais_last_doubling_change":
            marks.append(bool(conv.get("ais") and not conv["ais"]["converged"]))
        else:
            marks.append(False)
    return marks


# ---------------------------------------------------------------- tables


def _gaps_table(runs, frame: pd.DataFrame) -> str:
    """table.md as HTML: the same cells, from the same frame and rows."""
    from gapbench.report import GAP_ROWS, _cell, extra_rows, table_rows

    rows = []
    for key, label, _ in table_rows(runs):
        sub = frame[frame.quantity == key].set_index("run")
        rows.append(_Row(label, [_cell(sub.loc[r.label, "mean"], sub.loc[r.label, "se"]) for r in runs],
                         key=key, bold=key in GAP_ROWS))
    for key, label, _, cells in extra_rows(runs):
        rows.append(_Row(label, ["—" if c is None else c["text"] for c in cells], key=key,
                         warn=_cell_warns(runs, key)))
    return _table("gaps-table", [""] + [r.label for r in runs], rows, first_gap="approximation_gap")


def _diagnostics_section(runs) -> str:
    from gapbench.report import DIAGNOSTIC_NOTES, _cell, _in_tables, diagnostic_rows, class_text, per_class_tables

    parts = []
    rows = diagnostic_rows(runs)
    if rows:
        body = [_Row(label, ["—" if c is None else c["text"] for c in cells], key=key)
                for key, label, _, cells in rows if _in_tables(key)]
        parts.append(_table("diagnostics-table", [""] + [r.label for r in runs], body, style="wrap"))
        parts.append(_notes([DIAGNOSTIC_NOTES[key] for key, *_ in rows if key in DIAGNOSTIC_NOTES]))
    for i, (r, table) in enumerate(per_class_tables(runs)):
        gaps = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean")]
        body = [_Row(class_text(label, row), [str(int(row["count"]))]
                     + [_cell(row[f"{g}_mean"], row[f"{g}_se"]) for g in gaps])
                for label, row in table.iterrows()]
        parts.append(f'<h3 id="per-class-{i}">Gaps per class: {_e(r.label)}</h3>')
        parts.append(_table(f"per-class-table-{i}", ["class", "datapoints"]
                            + [g.replace("_", " ").capitalize() for g in gaps], body, style="compact"))
    return "\n".join(parts)


def _seeds_section(runs, out_dir: Path) -> str:
    from gapbench.report import GAP_ROWS, SEED_NOTES, _cell, _se_text, seed_frame, seed_groups, table_rows

    groups = seed_groups(runs)
    frame = seed_frame(groups)
    rows = []
    for key, label, _ in table_rows([r for g in groups for r in g.runs]):
        sub = frame[frame.quantity == key].set_index("group")
        cells = []
        for g in groups:
            cells += [_cell(sub.loc[g.label, "mean"], sub.loc[g.label, "se_between_seeds"]),
                      _se_text(sub.loc[g.label, "mean"], sub.loc[g.label, "se_within_runs"])]
        rows.append(_Row(label, cells, key=key, bold=key in GAP_ROWS))
    seeds = []
    for g in groups:
        seeds += [f"{len(g.runs)} ({', '.join(map(str, g.seeds))})", ""]
    rows.append(_Row("seeds", seeds, key="seeds"))
    head = [""] + [h for g in groups for h in (f"{g.label}: mean ± SE between seeds", "within-run SE")]
    folders = [f"{g.label}: " + ", ".join(_relative(r.path, out_dir) for r in g.runs) for g in groups]
    return _table("seeds-table", head, rows, first_gap="approximation_gap") + _notes(list(SEED_NOTES) + folders)


def _methods_section(run_dirs, split: str) -> str:
    from gapbench.method_comparison import GAP_ROWS, load_method_runs, method_table, table_notes, wide_table

    runs = load_method_runs(run_dirs, split)
    frame = method_table(runs)
    wide = wide_table(frame)
    keys = list(dict.fromkeys(frame["quantity"]))
    rows = [_Row(label, list(cells), key=key, bold=key in GAP_ROWS)
            for key, (label, cells) in zip(keys, wide.iterrows())]
    return _table("methods-table", [""] + list(wide.columns), rows, first_gap="approximation_gap") + _notes(
        table_notes(runs))


def _figures_section(pngs: Sequence[Path]) -> str:
    parts = []
    for png in pngs:
        name = png.stem
        caption = FIGURE_CAPTIONS.get(name, "")
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        also = f" ({name}.pdf beside it)" if png.with_suffix(".pdf").is_file() else ""
        parts.append(f'<figure id="figure-{_e(name)}"><img src="data:image/png;base64,{data}" '
                     f'alt="{_e(name)}: {_e(caption)}"><figcaption><b>{_e(name)}</b>{_e(also)}. '
                     f"{_e(caption)}</figcaption></figure>")
    return "\n".join(parts)


# ---------------------------------------------------------------- provenance


def _relative(path: Path, out_dir: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())


def _text(value) -> str:
    """A recorded value as text: strings as they are, everything else as JSON (null, true, [1, 2])."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return json.dumps(value, default=str)


def _flatten(d: Dict, prefix: str = "") -> List[Tuple[str, str, bool]]:
    """Nested settings as (dotted key, value, False) rows."""
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", _text(v), False))
    return rows


def _provenance(r, out_dir: Path) -> str:
    """One column's provenance: what made its numbers (gaps file, meta.json, recipe.yaml)."""
    from gapbench.experiment import RECIPE_FILE
    from gapbench.report import _seed_of

    s = r.summary
    p = s.get("provenance") or {}
    data = p.get("data") or {}
    missing = "not recorded"

    def row(name, value, mark=False):
        return (name, missing if value is None else _text(value), mark)

    folder = "gaps/" if r.epoch is None else f"gaps/epoch_{r.epoch}/"
    dirty = p.get("git_dirty")
    rows = [
        row("run folder", _relative(r.path, out_dir)),
        row("gaps file", f"{folder}{s.get('split', '?')}.json"),
        row("run name", s.get("run")), row("dataset", s.get("dataset")), row("split", s.get("split")),
        row("seed", _seed_of(r)), row("encoder family", s.get("encoder_family")),
        row("local families", ", ".join(s.get("families", [])) or None),
        *([row("test-time refinement", s["refinement"])] if s.get("refinement") else []),
        row("datapoints (finite / all)", f"{s.get('num_finite', '?')} / {s.get('num_points', '?')}",
            s.get("num_finite") != s.get("num_points")),
        row("checkpoint sha256", p.get("checkpoint_sha256")), row("checkpoint epoch", p.get("checkpoint_epoch")),
        row("evaluated points sha256", data.get("points_sha256")),
        row("evaluated values sha256", data.get("values_sha256")),
        row("gapbench version", p.get("gapbench_version")), row("git commit", p.get("git_commit")),
        ("git dirty (gapbench sources changed)", "unknown" if dirty is None else ("yes" if dirty else "no"),
         bool(dirty)),
        row("torch version", p.get("torch_version")), row("device", s.get("device", p.get("device"))),
        row("device name", p.get("device_name")), row("evaluated at", p.get("date")),
        row("evaluation fingerprint", p.get("fingerprint")),
    ]
    seconds = s.get("stage_seconds") or {}
    timings = [(f"evaluation stage {stage} (s)", f"{float(t):.1f}", False) for stage, t in seconds.items()]
    if seconds:
        timings.append(("evaluation, all stages (s)", f"{sum(float(t) for t in seconds.values()):.1f}", False))
    meta = read_json_or_none(r.path / "meta.json")
    if isinstance(meta, dict):
        timings += [(name, f"{float(meta[k]):.1f}", False) for k, name in
                    (("train_seconds", "training (s)"), ("wall_seconds", "training, wall clock (s)"))
                    if isinstance(meta.get(k), (int, float))]
    other = {k: v for k, v in p.items() if k != "stages"}
    try:
        recipe = (r.path / RECIPE_FILE).read_text()
    except OSError:
        recipe = None
    left = [_kv_table(rows), "<h4>Timings</h4>" + (_kv_table(timings) if timings else f"<p>{missing}</p>")]
    right = ["<h4>Evaluation settings</h4>" + (_kv_table(_flatten(s["settings"])) if s.get("settings")
                                               else f"<p>{missing}</p>")]
    details = [("all provenance of the gaps file", _kv_table(_flatten(other)) if other else None),
               ("meta.json (training)", _kv_table(_flatten(meta)) if isinstance(meta, dict) else None),
               (RECIPE_FILE, None if recipe is None else f"<pre>{_e(recipe)}</pre>")]
    right += [f"<details><summary>{_e(name)}</summary>{body}</details>" for name, body in details if body]
    return (f'<div class="cards"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>')


# ---------------------------------------------------------------- page


def render_report(runs, frame: pd.DataFrame, out_dir: Path, written: Sequence[Path], run_dirs: Sequence[Path],
                  splits: Sequence[str]) -> str:
    """The page of a report whose files ``written`` are in ``out_dir``.

    ``runs`` and ``frame``: the report's columns and its long table (:func:`gapbench.report.table_frame`);
    the diagnostics, seeds and method comparison sections appear when the report wrote their files,
    each figure whose PNG it wrote, in order. ``run_dirs`` and ``splits``: what the report was asked for.
    """
    from gapbench.provenance import code_versions

    out_dir = Path(out_dir)
    names = {Path(p).name for p in written}
    sections: List[Tuple[str, str, str]] = []  # (anchor, heading, body)
    sections.append(("gaps", "Gaps", _gaps_table(runs, frame) + _notes([
        "mean ± standard error over datapoints, in nats; gaps are paired per datapoint",
        "marked cells: local fits stopped at the step cap or failed, an AIS sweep not within its tolerance, "
        "bounds out of order, non-finite datapoints (see Warnings)",
        "the same numbers as table.md, table.tex and table.csv"])))
    if "diagnostics.md" in names:
        sections.append(("diagnostics", "Diagnostics", _diagnostics_section(runs)))
    if "seeds.md" in names:
        sections.append(("seeds", "Seeds", _seeds_section(runs, out_dir)))
    if "methods.md" in names:
        sections.append(("methods", "Training methods", _methods_section(run_dirs, splits[0])))
    pngs = [Path(p) for p in written if Path(p).suffix == ".png"]
    if pngs:
        sections.append(("figures", "Figures", _figures_section(pngs)))
    sections.append(("provenance", "Provenance", "\n".join(
        f'<h3 id="provenance-{i}">{_e(r.label)}</h3>{_provenance(r, out_dir)}' for i, r in enumerate(runs))))

    warnings = [(r.label, line) for r in runs for line in run_warnings(r)]
    if warnings:
        alert = ('<section id="warnings" class="warnings"><h2>Warnings</h2><ul>'
                 + "".join(f"<li><b>{_e(label)}</b>: {_e(line)}</li>" for label, line in warnings)
                 + "</ul></section>")
    else:
        alert = ('<section id="warnings" class="ok"><b>No warnings</b>: no local fit stopped at its step cap, no '
                 "AIS sweep moved more than its tolerance, no bounds out of order, no non-finite values.</section>")
    code = code_versions()
    made = f"gapbench {code['gapbench_version']}"
    made += f", commit {code['git_commit'][:12]}" if code["git_commit"] else ""
    made += " (modified)" if code["git_dirty"] else ""
    columns = ", ".join(r.label for r in runs)
    toc = "".join(f'<li><a href="#{a}">{_e(h)}</a></li>' for a, h, _ in
                  [("warnings", "Warnings" + (f" ({len(warnings)})" if warnings else " (none)"), "")] + sections)
    body = "\n".join(f'<section id="{a}"><h2>{_e(h)}</h2>\n{b}\n</section>' for a, h, b in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gapbench report: {_e(columns)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>gapbench report</h1>
<p class="sub">{_e(columns)} · split {_e(", ".join(splits))} · made by {_e(made)}</p></header>
{alert}
<nav><h2>Contents</h2><ul>{toc}</ul></nav>
{body}
</body>
</html>
"""
