"""Figures of a gap report: matplotlib, drawn off-screen, every axis labelled in nats."""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FAMILY = {"ffg": "FFG", "flow": "Flow", "realnvp": "RealNVP"}
APPROX_COLOR = "#4C72B0"
AMORT_COLOR = "#DD8452"


def close(fig) -> None:
    plt.close(fig)


def gaps_stacked(runs) -> "plt.Figure":
    """Approximation and amortization gap stacked per run: their sum is the inference gap."""
    fig, ax = plt.subplots(figsize=(2.6 + 1.4 * len(runs), 4))
    x = np.arange(len(runs))
    approx = np.array([r.summary["stats"]["approximation_gap"]["mean"] for r in runs])
    amort = np.array([r.summary["stats"]["amortization_gap"]["mean"] for r in runs])
    approx_se = np.array([r.summary["stats"]["approximation_gap"]["se"] for r in runs])
    amort_se = np.array([r.summary["stats"]["amortization_gap"]["se"] for r in runs])
    ax.bar(x, approx, color=APPROX_COLOR, label="approximation gap  log p̂(x) − L[q*]", yerr=approx_se, capsize=3)
    ax.bar(x, amort, bottom=approx, color=AMORT_COLOR, label="amortization gap  L[q*] − L[q]", yerr=amort_se, capsize=3)
    for xi, total in zip(x, approx + amort):
        ax.annotate(f"{total:.2f}", (xi, total), textcoords="offset points", xytext=(8, 2), ha="left", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([r.label for r in runs], rotation=20, ha="right")
    ax.set_ylabel("gap (nats)")
    ax.set_title("Inference gap = approximation + amortization", fontsize=10, pad=24)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(top=max(1e-9, float(np.nanmax(approx + amort))) * 1.15)
    # Above the axes: below them, long run labels (rotated) would run into it.
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return fig


#: Panels per row of the figures with a panel per run; more runs wrap onto further rows.
PANELS_PER_ROW = 3


def _panels(num: int, width: float, height: float):
    """A figure with ``num`` panels of ``width`` x ``height`` inches, at most PANELS_PER_ROW a row, and its
    first ``num`` axes in order (the grid's unused cells hidden)."""
    cols = max(1, min(PANELS_PER_ROW, num))
    rows = max(1, -(-num // cols))
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    cells = list(grid.flat)
    for ax in cells[num:]:
        ax.set_visible(False)
    return fig, cells[:num]


def gap_distributions(runs) -> "plt.Figure":
    """Per-datapoint histograms of the two gaps, one panel per run; negative values are real estimates."""
    fig, axes = _panels(len(runs), 4, 3.4)
    for ax, r in zip(axes, runs):
        df = r.points[r.points["finite"].astype(bool)]
        both = np.concatenate([df["approximation_gap"], df["amortization_gap"]])
        bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=30)
        ax.hist(df["approximation_gap"], bins=bins, alpha=0.6, color=APPROX_COLOR, label="approximation")
        ax.hist(df["amortization_gap"], bins=bins, alpha=0.6, color=AMORT_COLOR, label="amortization")
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("gap per datapoint (nats)")
        ax.set_ylabel("datapoints")
        ax.set_title(r.label, fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Distribution of the gaps over datapoints", fontsize=10)
    fig.tight_layout()
    return fig


def local_convergence(runs) -> "plt.Figure":
    """Local optimization of q*: ELBO − L[q] against Adam steps, per datapoint and on average.

    Measured from each datapoint's own amortized ELBO, so curves of datapoints with very
    different log p(x) share one scale: the curve ends at that point's amortization gap.
    """
    fig, axes = _panels(len(runs), 4.5, 3.6)
    for ax, r in zip(axes, runs):
        traces = r.summary.get("traces", {})
        elbo_q = r.points["elbo_q"].to_numpy(dtype=float)
        for i, (stage, tr) in enumerate(sorted((k, v) for k, v in traces.items() if k.startswith("local_"))):
            color = f"C{i}"
            fam = stage.split("_", 1)[1]
            steps = np.array(tr["steps"], dtype=float)
            for j, curve in enumerate(tr["elbo_points"]):
                ax.plot(steps, np.array(curve, dtype=float) - elbo_q[j], color=color, alpha=0.3, linewidth=0.8)
            mean = np.array(tr["elbo_mean"], dtype=float) - np.nanmean(elbo_q)
            ax.plot(steps, mean, color=color, linewidth=2, label=f"q*_{FAMILY.get(fam, fam)}, mean over points")
        ax.axhline(0, color="gray", linestyle="--", linewidth=1, label="amortized q (L[q])")
        ax.set_xlabel("Adam steps")
        ax.set_ylabel("ELBO − L[q] (nats)")
        ax.set_title(r.label, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Local optimization of q* (thin lines: single datapoints; loss averaged per check)", fontsize=10)
    fig.tight_layout()
    return fig


def ais_convergence(runs) -> "plt.Figure":
    """AIS estimate against the number of intermediate distributions, relative to the longest run.

    Differences are paired per datapoint (the same points at every length), so the
    error bars show AIS's own noise, not the spread of log p(x) across datapoints.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, r in enumerate(runs):
        sweep = r.summary.get("traces", {}).get("ais_sweep")
        if not sweep:
            continue
        steps = np.array(sweep["num_steps"], dtype=float)
        values = np.array(sweep["log_px"], dtype=float)  # [points, grid]
        diff = values - values[:, -1:]
        mean = np.nanmean(diff, axis=0)
        n = values.shape[0]
        se = np.nanstd(diff, axis=0, ddof=1) / np.sqrt(n) if n > 1 else 0 * mean
        ax.errorbar(steps, mean, yerr=se, marker="o", color=f"C{i}", capsize=3, label=f"{r.label} ({n} points)")
    ax.set_xscale("log")
    ax.axhline(0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("intermediate distributions (AIS steps)")
    ax.set_ylabel("AIS log p̂(x) − AIS at the most steps (nats)")
    ax.set_title("AIS convergence: the estimate rises to log p(x) as chains lengthen", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _iwae_curve(r):
    return (r.summary.get("diagnostics") or {}).get("iwae_curve")


def iwae_gap_curve(runs) -> "plt.Figure":
    """IWAE_k − L[q] against k, one curve per run with a band of ± one standard error over datapoints.

    The gap that importance sampling with k draws from q closes (Cremer, Morris & Duvenaud 2017): 0 at
    k = 1, rising toward the inference gap log p̂(x) − L[q] (dotted, from the gaps table) as k grows.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, r in enumerate(runs):
        curve = _iwae_curve(r)
        if not curve:
            continue
        ks = np.array(curve["ks"], dtype=float)
        mean = np.array(curve["gap_mean"], dtype=float)  # JSON null (no finite point) -> NaN
        se = np.nan_to_num(np.array(curve["gap_se"], dtype=float))
        color = f"C{i}"
        ax.plot(ks, mean, marker="o", color=color, label=f"{r.label} ({curve['num_finite']} points)")
        ax.fill_between(ks, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)
        gap = r.summary.get("stats", {}).get("inference_gap")
        if gap and gap.get("mean") is not None:
            ax.axhline(gap["mean"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.axhline(0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("k (importance samples from q)")
    ax.set_ylabel("IWAE_k − L[q] (nats)")
    ax.set_title("Inference gap closed by q̃_k (dotted: log p̂(x) − L[q]; bands: ± SE)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


#: The files of the figure training_curves (removed from a report whose runs have no train_log.csv).
TRAINING_FILES = ("training_curves.png", "training_curves.pdf")
_LABEL_SUFFIX = re.compile(r"\s*\[(epoch \d+|train|valid|test)\]")


def _training_logs(runs) -> List[Tuple[str, "object", List[int]]]:
    """(label, train_log.csv as a DataFrame, evaluated kept epochs) per run folder that has a readable log."""
    import pandas as pd

    by_path: Dict[str, list] = {}
    for r in runs:
        entry = by_path.setdefault(str(r.path), [r, []])
        if getattr(r, "epoch", None) is not None:
            entry[1].append(int(r.epoch))
    out = []
    for r, epochs in by_path.values():
        try:
            log = pd.read_csv(r.path / "train_log.csv")
        except (OSError, ValueError):
            continue
        if not {"epoch", "lr", "kl_weight", "train_elbo", "valid_elbo"} <= set(log.columns) or log.empty:
            continue
        out.append((_LABEL_SUFFIX.sub("", r.label), log, sorted(set(epochs))))
    return out


def training_curves(runs) -> "plt.Figure":
    """Each run's training: its bounds, learning rate and KL weight against epoch (train_log.csv).

    Left: the training ELBO (solid; a mean over the epoch's batches as the weights changed), the training
    objective where it differs (dashed: the KL-weighted or importance-weighted bound the method maximizes)
    and the validation ELBO (dots, at the epochs validated). Grey dotted lines mark kept epochs evaluated.
    """
    from matplotlib.lines import Line2D

    logs = _training_logs(runs)
    # One legend of runs (colors) under the panels, however many runs, and one of line styles.
    legend_rows = -(-len(logs) // 3)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8 + 0.22 * legend_rows))
    bounds, lr_ax, kl_ax = axes
    values = []
    for i, (label, log, epochs) in enumerate(logs):
        color = f"C{i}"
        epoch = log["epoch"].to_numpy(dtype=float)
        train = log["train_elbo"].to_numpy(dtype=float)
        bounds.plot(epoch, train, color=color, linewidth=1.5, label=f"{label}: train ELBO")
        if "train_objective" in log:
            objective = log["train_objective"].to_numpy(dtype=float)
            if not np.allclose(objective, train, equal_nan=True):
                bounds.plot(epoch, objective, color=color, linestyle="--", linewidth=1,
                            label=f"{label}: train objective")
                values.append(objective)
        valid = log["valid_elbo"].to_numpy(dtype=float)
        seen = np.isfinite(valid)
        bounds.plot(epoch[seen], valid[seen], color=color, linestyle=":", marker="o", markersize=3,
                    label=f"{label}: valid ELBO")
        values += [train, valid[seen]]
        for e in epochs:
            bounds.axvline(e, color="gray", linestyle=":", linewidth=0.8)
        lr_ax.plot(epoch, log["lr"].to_numpy(dtype=float), color=color, label=label)
        kl_ax.plot(epoch, log["kl_weight"].to_numpy(dtype=float), color=color, label=label)
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if finite.size:  # the first epochs' bounds would squash the rest: show from the 5th percentile up
        low, high = np.percentile(finite, 5), finite.max()
        pad = 0.05 * max(high - low, 1e-6)
        bounds.set_ylim(low - pad, high + pad)
    bounds.set_xlabel("epoch")
    bounds.set_ylabel("bound (nats)")
    bounds.set_title("Training and validation bounds", fontsize=9)
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate")
    if logs and all((log["lr"] > 0).all() for _, log, _ in logs):
        lr_ax.set_yscale("log")
    lr_ax.set_title("Learning rate", fontsize=9)
    kl_ax.set_xlabel("epoch")
    kl_ax.set_ylabel("KL weight β (at the epoch's last batch)")
    kl_ax.set_ylim(-0.05, 1.05)
    kl_ax.set_title("KL weight (warm-up)", fontsize=9)
    styles = [Line2D([], [], color="gray", linewidth=1.5, label="train ELBO"),
              Line2D([], [], color="gray", linestyle="--", linewidth=1, label="train objective"),
              Line2D([], [], color="gray", linestyle=":", marker="o", markersize=3, label="valid ELBO")]
    bounds.legend(handles=styles, fontsize=7, loc="lower right")
    if logs:
        fig.legend(handles=[Line2D([], [], color=f"C{i}", linewidth=1.5, label=label)
                            for i, (label, _, _) in enumerate(logs)],
                   loc="lower center", ncol=min(3, len(logs)), fontsize=7, frameon=False)
    fig.suptitle("Training curves (train_log.csv)", fontsize=10)
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.1) / (3.8 + 0.22 * legend_rows), 1, 1))
    return fig


def all_figures(runs: Sequence) -> Iterator[Tuple[str, "plt.Figure"]]:
    yield "gaps_stacked", gaps_stacked(runs)
    yield "gap_distributions", gap_distributions(runs)
    yield "local_convergence", local_convergence(runs)
    if any(r.summary.get("traces", {}).get("ais_sweep") for r in runs):
        yield "ais_convergence", ais_convergence(runs)
    if any(_iwae_curve(r) for r in runs):
        yield "iwae_gap_curve", iwae_gap_curve(runs)
    if _training_logs(runs):
        yield "training_curves", training_curves(runs)
